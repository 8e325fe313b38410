"""The gradspace command line: pretrain, checkpoints (atomic, exact resume, clean errors), compare's report."""

import json

import pytest
import torch

from conftest import lines, run
from gradspace.train.checkpoint import list_checkpoints, load_checkpoint

torch.set_num_threads(1)
SMALL = [
    "--steps",
    "6",
    "--seq-len",
    "32",
    "--batch-size",
    "4",
    "--log-every",
    "1",
    "--eval-every",
    "3",
    "--eval-batches",
    "2",
    "--threads",
    "1",
]


def assert_clean_error(capsys, code, *words):
    err = capsys.readouterr().err
    assert code not in (0, None) and "Traceback" not in err
    msg = [ln for ln in err.splitlines() if ln.startswith("gradspace: error:")]
    assert len(msg) == 1, err
    for w in words:
        assert w in msg[0], msg[0]


def test_pretrain_writes_metrics_and_checkpoint(tmp_path):
    out = tmp_path / "run"
    assert run("pretrain", *SMALL, "--method", "galore", "--update-gap", "2", "--out", out) == 0
    recs = lines(out / "metrics.jsonl")
    train = [r for r in recs if r["type"] == "train"]
    evals = [r for r in recs if r["type"] == "eval"]
    assert [r["step"] for r in train] == list(range(1, 7)) and [e["step"] for e in evals] == [3, 6]
    assert all({"loss", "lr", "tokens_per_s", "step_time"} <= set(r) for r in train)
    assert all(e["val_ppl"] > 1 for e in evals)
    (ckpt,) = list_checkpoints(out / "checkpoints")
    state = load_checkpoint(ckpt)
    assert state["step"] == 6 and state["config"]["method"] == "galore" and state["stream"]["step"] == 6
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]


def test_interrupt_and_resume_is_bit_identical(tmp_path, capsys):
    args = [*SMALL, "--method", "galore", "--update-gap", "2", "--rank", "8"]
    assert run("pretrain", *args, "--out", tmp_path / "full") == 0
    assert run("pretrain", *args, "--out", tmp_path / "cut", "--stop-after", "3") == 130
    err = capsys.readouterr().err
    assert "interrupted at step 3" in err and "--resume" in err
    assert [p.name for p in list_checkpoints(tmp_path / "cut" / "checkpoints")] == ["ckpt-0000003.pt"]
    assert run("pretrain", "--resume", tmp_path / "cut", "--threads", "1") == 0
    full = load_checkpoint(list_checkpoints(tmp_path / "full" / "checkpoints")[-1])
    cut = load_checkpoint(list_checkpoints(tmp_path / "cut" / "checkpoints")[-1])
    assert full["step"] == cut["step"] == 6
    for k, v in full["model"].items():
        assert torch.equal(v, cut["model"][k]), k

    def curve(run_dir):
        return [(r["type"], r["step"], r.get("loss"), r.get("val_loss")) for r in lines(run_dir / "metrics.jsonl")]

    assert curve(tmp_path / "full") == curve(tmp_path / "cut")


def test_corrupt_and_mismatched_checkpoints_fail_cleanly(tmp_path, capsys):
    out = tmp_path / "run"
    assert run("pretrain", *SMALL, "--steps", "2", "--out", out) == 0
    good = list_checkpoints(out / "checkpoints")[-1]
    bad = tmp_path / "bad.pt"
    bad.write_bytes(good.read_bytes()[:5000])
    capsys.readouterr()
    assert_clean_error(capsys, run("pretrain", "--resume", bad), "corrupt")
    assert_clean_error(capsys, run("pretrain", "--resume", out, "--method", "adamw"), "method")
    assert_clean_error(capsys, run("pretrain", "--resume", out, "--preset", "mini"), "preset")
    assert_clean_error(capsys, run("pretrain", "--resume", tmp_path / "missing"), "does not exist")
    assert list_checkpoints(out / "checkpoints") == [good]
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize(
    "argv, words",
    [
        (["pretrain", "--method", "nope"], ["unknown method", "galore"]),
        (["pretrain", "--preset", "huge"], ["unknown preset"]),
        (["pretrain", "--dataset", "no/such/file.txt"], ["unknown dataset"]),
        (["pretrain", "--rank", "65"], ["maximum allowed is 64"]),
        (["pretrain", "--method", "adamw", "--rank", "8"], ["does not apply"]),
        (["pretrain", "--seq-len", "100000"], ["seq-len"]),
        (["pretrain", "--dataset", "@small.txt", "--seq-len", "512"], ["does not fit the data"]),
        (["compare", "--methods", "adamw,nope"], ["unknown method"]),
        (["pretrain", "--config", "missing.yaml"], ["config file"]),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, argv, words):
    out = tmp_path / "out"
    (tmp_path / "small.txt").write_text("To be, or not to be, that is the question.\n" * 20)
    argv = [str(tmp_path / a[1:]) if a.startswith("@") else a for a in argv]
    assert_clean_error(capsys, run(*argv, "--out", out), *words)
    assert not out.exists()


def test_config_file_keys_and_flag_override(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        "steps: 3\nseq-len: 32\nbatch_size: 4\nmethod: adamw\nlr: 0.001\neval_batches: 1\nthreads: 1\nlog_every: 1\n"
    )
    out = tmp_path / "run"
    assert run("pretrain", "--config", cfg, "--lr", "0.002", "--out", out) == 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["steps"] == 3 and saved["seq_len"] == 32 and saved["method"] == "adamw" and saved["lr"] == 0.002
    assert [r["step"] for r in lines(out / "metrics.jsonl") if r["type"] == "train"] == [1, 2, 3]
    toml = tmp_path / "run.toml"
    toml.write_text('steps = 2\nseq_len = 32\nbatch_size = 4\nmethod = "galore"\neval_batches = 1\nthreads = 1\n')
    assert run("pretrain", "--config", toml, "--out", tmp_path / "t") == 0
    assert json.loads((tmp_path / "t" / "config.json").read_text())["method"] == "galore"


def test_compare_writes_report(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert run("compare", "--methods", "adamw,galore", *SMALL, "--out", out) == 0
    report = (out / "report.md").read_text()
    assert "| adamw |" in report and "| galore |" in report
    for png in ("loss.png", "state_bytes.png", "energy.png"):
        assert (out / png).stat().st_size > 1000
    assert not (out / "rank.png").exists()  # both ranks fixed: a flat line says nothing
    raw = json.loads((out / "metrics.json").read_text())["results"]
    assert raw["galore"]["state_bytes"] < raw["adamw"]["state_bytes"]
    assert raw["galore"]["weights"] and all(w["rank"] == 16 for w in raw["galore"]["weights"].values())
    assert (out / "adamw" / "metrics.jsonl").exists() and (out / "galore" / "metrics.jsonl").exists()
    printed = capsys.readouterr().out
    assert "galore" in printed and "vs adamw" in printed and "x adamw" in printed
