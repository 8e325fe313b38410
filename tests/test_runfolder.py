"""A run folder is never lost: a second run into it is refused (nothing touched) unless --overwrite, a live writer
holds a lock another process cannot take, and a killed run's stale lock does not block the next one."""

import json
import os

from conftest import run
from gradspace.train.runfolder import LOCK
from test_cli import SMALL, assert_clean_error


def snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_a_second_run_into_a_used_folder_is_refused_unless_overwrite(tmp_path, capsys):
    out = tmp_path / "run"
    assert run("pretrain", *SMALL, "--method", "adamw", "--out", out) == 0
    before = snapshot(out)
    code = run("pretrain", *SMALL, "--method", "galore", "--out", out)
    assert_clean_error(capsys, code, "already holds a run", "--resume", "--overwrite")
    assert snapshot(out) == before  # nothing touched
    (out / "notes.txt").write_text("mine")
    assert run("pretrain", *SMALL, "--method", "galore", "--overwrite", "--out", out) == 0
    assert json.loads((out / "config.json").read_text())["method"] == "galore"
    assert (out / "notes.txt").read_text() == "mine"  # only gradspace's own files are replaced
    assert not (out / LOCK).exists()


def test_a_live_writer_locks_the_folder_and_a_stale_lock_is_taken_over(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK).write_text(str(os.getppid()))  # a live process that is not this one
    code = run("pretrain", *SMALL, "--out", out)
    assert_clean_error(capsys, code, "another gradspace process", str(os.getppid()))
    assert not (out / "config.json").exists()
    (out / LOCK).write_text("999999999")  # no such process: a killed run's lock
    assert run("pretrain", *SMALL, "--out", out) == 0
    assert not (out / LOCK).exists()


def test_compare_continues_its_own_folder_and_refuses_another_comparison_unless_overwrite(tmp_path, capsys):
    out = tmp_path / "cmp"
    args = ["compare", "--methods", "adamw", *SMALL, "--steps", "2", "--out", out]
    assert run(*args) == 0
    done = (out / "adamw" / "summary.json").stat().st_mtime_ns
    assert run(*args) == 0 and (out / "adamw" / "summary.json").stat().st_mtime_ns == done  # nothing reran
    assert_clean_error(capsys, run(*args, "--lr", "1e-3"), "other settings (lr)", "--overwrite")
    assert run(*args, "--lr", "1e-3", "--overwrite") == 0
    assert (out / "adamw" / "summary.json").stat().st_mtime_ns != done
    (out / "compare.json").unlink()  # a folder from before compare.json: nothing says what it was
    assert_clean_error(capsys, run(*args), "cannot be resumed", "--overwrite")


def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, capsys):
    out = tmp_path / "run"
    assert run("pretrain", *SMALL, "--save-every", "2", "--out", out) == 0
    ckpts = sorted((out / "checkpoints").glob("ckpt-*.pt"))
    assert [p.name for p in ckpts] == ["ckpt-0000004.pt", "ckpt-0000006.pt"]
    ckpts[-1].write_bytes(ckpts[-1].read_bytes()[:1000])  # truncated, as by a full disk
    orphan = out / "checkpoints" / ".ckpt-0000008.pt.999999999.tmp"
    orphan.write_bytes(b"half")
    with (out / "metrics.jsonl").open("a") as f:
        f.write('{"type": "train", "st')  # a killed run's half-written line
    assert run("pretrain", "--resume", out, "--steps", "8", "--threads", "1") == 0
    err = capsys.readouterr().err
    assert "ckpt-0000006.pt is corrupt" in err and "resuming from ckpt-0000004.pt" in err
    assert not orphan.exists() and "removed" in err
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    assert steps == sorted(steps) and steps[-1] == 8


def test_sigterm_saves_a_checkpoint_and_exits_143(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "run"
    argv = [
        sys.executable,
        "-m",
        "gradspace",
        "pretrain",
        *SMALL,
        "--steps",
        "400",
        "--eval-every",
        "0",
        "--out",
        str(out),
    ]
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "metrics.jsonl").exists() or not (out / "metrics.jsonl").read_text().strip():
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-500:]
    saved = sorted((out / "checkpoints").glob("ckpt-*.pt"))
    assert saved and not (out / LOCK).exists() and "interrupt received" in err
    step = int(saved[-1].stem.split("-")[1])
    assert 1 <= step < 400
    assert run("pretrain", "--resume", out, "--steps", str(step + 2), "--threads", "1") == 0  # it resumes


def test_a_diverging_run_ends_with_exit_3_and_everything_saved(tmp_path, capsys):
    out = tmp_path / "run"
    code = run(
        "pretrain",
        *SMALL,
        "--steps",
        "24",
        "--eval-every",
        "0",
        "--method",
        "adamw",
        "--lr",
        "50",
        "--grad-clip",
        "0",
        "--warmup",
        "0",
        "--scheduler",
        "constant",
        "--nonfinite",
        "skip",
        "--out",
        out,
    )
    err = capsys.readouterr().err
    assert code == 3 and "diverged" in err and "lower --lr" in err, err[-400:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["diverged"] is True and list((out / "checkpoints").glob("ckpt-*.pt"))


def test_config_values_of_the_wrong_type_name_the_key(tmp_path, capsys):
    for text, key in (("steps: true\n", "steps"), ('lr: "1e-3"\n', "lr"), ("grad_clip: yes\n", "grad-clip")):
        cfg = tmp_path / "c.yaml"
        cfg.write_text(text)
        code = run("pretrain", "--config", cfg, "--threads", "1", "--out", tmp_path / "bad")
        assert_clean_error(capsys, code, key)
        assert not (tmp_path / "bad").exists()


def test_the_divergence_rule():
    from gradspace.train.summary import has_diverged

    rising = [{"loss": 2.0 + 0.1 * i} for i in range(30)]  # 2.0 -> 4.9: +145%
    assert has_diverged(rising, sum(r["loss"] for r in rising[-3:]) / 3)
    flat = [{"loss": 2.0 + (0.3 if i % 2 else -0.3)} for i in range(30)]  # noisy but not rising
    assert not has_diverged(flat, 2.0)
    assert not has_diverged([{"loss": 1.0}, {"loss": 1.4}, {"loss": 1.8}], 1.8)  # 3 steps say nothing
    assert has_diverged([{"loss": float("nan")}] * 3, float("nan"))
