"""What a hostile round tried on run folders, each refused or repaired with nothing lost: two processes racing for
a folder's lock, a resume that lands inside its own run or onto a loose checkpoint, a run resumed from another
directory, an export of an older step over a newer model, a run killed while exporting, a comparison whose run
was extended by hand, and paths that cannot hold a run folder."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import lines, run
from gradspace.train import export as export_module
from gradspace.train.runfolder import LOCK, PLOTS, QUARANTINE
from test_cli import SMALL, assert_clean_error
from test_compare_rerun import TINY
from test_run_history import checkpoints, finished_run, steps_logged
from test_runfolder import snapshot


@pytest.fixture
def finished(tmp_path):
    return finished_run(tmp_path)


RACER = textwrap.dedent(
    """
    import os, sys, time
    from gradspace.train.config import UsageError
    from gradspace.train.runfolder import RunLock

    folder, log, until = sys.argv[1], sys.argv[2], time.time() + float(sys.argv[3])
    held = 0
    while time.time() < until:
        try:
            with RunLock(folder):
                with open(log, "a") as f:
                    f.write(f"in {os.getpid()}\\n")
                time.sleep(0.002)
                with open(log, "a") as f:
                    f.write(f"out {os.getpid()}\\n")
                held += 1
        except UsageError:
            pass
    print(held)
    """
)


def test_processes_racing_for_a_lock_never_hold_it_together(tmp_path):
    folder, log = tmp_path / "run", tmp_path / "log"
    folder.mkdir()
    racers = [
        subprocess.Popen([sys.executable, "-c", RACER, folder, log, "3"], stdout=subprocess.PIPE, text=True)
        for _ in range(4)
    ]
    held = [int(p.communicate(timeout=60)[0]) for p in racers]
    assert all(p.returncode == 0 for p in racers)
    events = log.read_text().split("\n")[:-1]
    assert sum(held) == len(events) // 2 and sum(1 for h in held if h) >= 2  # contended, and taken in turns
    for enter, leave in zip(events[::2], events[1::2]):  # every "in" is followed by the same process's "out"
        assert enter.startswith("in ") and leave == "out " + enter[3:]
    assert not (folder / LOCK).exists()


def test_paths_that_cannot_hold_a_run_are_clean_errors(tmp_path, capsys):
    link = tmp_path / "dangling"
    link.symlink_to(tmp_path / "nowhere")
    assert_clean_error(capsys, run("pretrain", *SMALL, "--out", link), "symbolic link to nothing")
    file = tmp_path / "file"
    file.write_text("mine")
    assert_clean_error(capsys, run("pretrain", *SMALL, "--out", file / "run"), "is a file", "--out")
    busy = tmp_path / "busy"
    (busy / LOCK).mkdir(parents=True)
    assert_clean_error(capsys, run("pretrain", *SMALL, "--out", busy), "is a folder", "lock")
    assert file.read_text() == "mine" and not (tmp_path / "nowhere").exists()


def test_a_resume_into_a_folder_inside_or_around_its_run_is_refused(finished, capsys):
    before = snapshot(finished)
    code = run("pretrain", "--resume", finished, "--steps", "8", "--out", finished / "longer")
    assert_clean_error(capsys, code, "one inside the other")
    code = run("pretrain", "--resume", finished, "--steps", "8", "--out", finished.parent)
    assert_clean_error(capsys, code, "one inside the other")
    assert snapshot(finished) == before and not (finished / "longer").exists()


def test_a_loose_checkpoint_does_not_resume_into_a_folder_holding_a_run(finished, tmp_path, capsys):
    loose = tmp_path / "loose"
    loose.mkdir()
    (loose / "ckpt-0000004.pt").write_bytes((finished / "checkpoints" / "ckpt-0000004.pt").read_bytes())
    before = snapshot(finished)
    code = run("pretrain", "--resume", loose / "ckpt-0000004.pt", "--steps", "6", "--out", finished)
    assert_clean_error(capsys, code, "already holds another run", "a loose file")
    assert snapshot(finished) == before
    branch = tmp_path / "branch"  # into an empty folder it trains, and says it has no history before step 4
    assert run("pretrain", "--resume", loose / "ckpt-0000004.pt", "--steps", "6", "--out", branch) == 0
    assert "belongs to no run folder" in capsys.readouterr().err
    assert steps_logged(branch) == [5, 6]


def test_a_run_resumes_with_its_own_data_from_any_directory(tmp_path, monkeypatch):
    home, elsewhere = tmp_path / "home", tmp_path / "elsewhere"
    home.mkdir()
    elsewhere.mkdir()
    (home / "corpus.txt").write_text("the quick brown fox jumps over the lazy dog. " * 400)
    (elsewhere / "corpus.txt").write_text("zzzz " * 2000)  # same name, other text
    monkeypatch.chdir(home)
    cut = [*SMALL, "--dataset", "corpus.txt", "--tokenizer", "chars", "--out", tmp_path / "run"]
    assert run("pretrain", *cut, "--stop-after", "3") == 130
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["dataset"] == str(home / "corpus.txt")  # absolute: it names the same file from anywhere
    monkeypatch.chdir(elsewhere)
    assert run("pretrain", "--resume", tmp_path / "run", "--threads", "1") == 0
    monkeypatch.chdir(home)
    whole = tmp_path / "whole"
    assert run("pretrain", *SMALL, "--dataset", "corpus.txt", "--tokenizer", "chars", "--out", whole) == 0
    resumed = torch.load(checkpoints_of(tmp_path / "run")[-1], weights_only=True)["model"]
    straight = torch.load(checkpoints_of(whole)[-1], weights_only=True)["model"]
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)


def checkpoints_of(folder):
    return sorted((folder / "checkpoints").glob("ckpt-*.pt"))


def test_export_of_an_earlier_step_does_not_replace_a_later_model_unless_asked(finished, capsys):
    model = finished / "model"
    before = snapshot(model)
    ckpt = finished / "checkpoints" / "ckpt-0000004.pt"
    assert_clean_error(capsys, run("export", ckpt), "step 6", "step 4", "--overwrite")
    assert snapshot(model) == before
    assert run("export", ckpt, "--overwrite") == 0
    assert json.loads((model / export_module.MARKER).read_text())["step"] == 4
    assert_clean_error(capsys, run("export", finished / "nothing"), "does not exist", "run folder")


def test_a_run_killed_while_exporting_is_completed_by_its_resume(finished, capsys):
    import shutil

    summary = json.loads((finished / "summary.json").read_text())
    dead = subprocess.Popen(["true"])
    dead.wait()  # the pid of a writer that is gone
    # killed between the two renames of the model folder's swap: the old folder aside, a half-written new one
    os.replace(finished / "model", finished / f".model.{dead.pid}.old")
    (finished / f".model.{dead.pid}.tmp").mkdir()
    (finished / f".model.{dead.pid}.tmp" / "config.json").write_text("{}")
    (finished / "summary.json").unlink()
    shutil.rmtree(finished / f".model.{dead.pid}.old")  # and the old export gone too: nothing to fall back on
    assert run("pretrain", "--resume", finished, "--threads", "1") == 0
    err = capsys.readouterr().err
    assert "writing its model folder and summary" in err and "removed" in err
    assert json.loads((finished / "model" / export_module.MARKER).read_text())["step"] == 6
    again = json.loads((finished / "summary.json").read_text())
    assert again["val_loss"] == summary["val_loss"] and again["history"] == summary["history"]
    assert [e["step"] for e in again["evals"]] == [e["step"] for e in summary["evals"]]  # no extra evaluation
    assert not [p for p in finished.iterdir() if p.name.startswith(".model")]
    assert checkpoints(finished) == ["ckpt-0000004.pt", "ckpt-0000006.pt"]  # nothing rewritten or pruned
    assert_clean_error(capsys, run("pretrain", "--resume", finished), "nothing to do")
    assert_clean_error(capsys, run("pretrain", "--resume", finished, "--steps", "5"), "past this run's 5 steps")


def test_an_in_place_resume_that_stops_leaves_no_stale_summary(finished):
    assert run("pretrain", "--resume", finished, "--steps", "10", "--stop-after", "7", "--threads", "1") == 130
    assert not (finished / "summary.json").exists()  # it described step 6 of a 6-step run
    assert run("pretrain", "--resume", finished, "--threads", "1") == 0
    assert json.loads((finished / "summary.json").read_text())["steps"] == 10


def test_damaged_metrics_lines_are_dropped_with_a_warning(finished, capsys):
    path = finished / "metrics.jsonl"
    kept = path.read_text().splitlines()
    path.write_text("\n".join([kept[0], "{not json", *kept[1:]]) + "\n")
    assert run("pretrain", "--resume", finished, "--steps", "7", "--threads", "1") == 0
    assert "unreadable lines (2)" in capsys.readouterr().err
    assert steps_logged(finished) == list(range(1, 8))


def test_a_longer_resume_keeps_the_warmup_it_started_with(tmp_path):
    out = tmp_path / "run"
    assert run("pretrain", *SMALL, "--steps", "30", "--stop-after", "2", "--out", out) == 130
    assert run("pretrain", "--resume", out, "--steps", "60", "--stop-after", "3", "--threads", "1") == 130
    ckpt = torch.load(checkpoints_of(out)[-1], weights_only=True)
    assert ckpt["config"]["warmup"] == 3  # 10% of the 30 steps it started with, not of 60


def test_overwriting_a_run_clears_its_plots_and_quarantine_keeps_every_corrupt_file(finished, tmp_path):
    (finished / PLOTS[-1]).write_bytes(b"a comparison's plot")
    assert run("pretrain", *SMALL, "--method", "adamw", "--save-every", "2", "--out", finished, "--overwrite") == 0
    assert not (finished / PLOTS[-1]).exists()
    newest = finished / "checkpoints" / "ckpt-0000006.pt"
    for _ in range(2):  # the newest checkpoint corrupt twice: each bad copy is kept under its own name
        newest.write_bytes(b"corrupt")
        assert run("pretrain", "--resume", finished, "--threads", "1") == 0
    aside = sorted(p.name for p in (finished / "checkpoints").iterdir() if QUARANTINE in p.name)
    assert aside == [f"ckpt-0000006.pt{QUARANTINE}", f"ckpt-0000006.pt{QUARANTINE}.1"]


def test_a_comparison_whose_run_was_extended_by_hand_is_not_silently_rerun(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert run("compare", "--methods", "adamw", *TINY, "--out", out) == 0
    assert run("pretrain", "--resume", out / "adamw", "--steps", "3", "--threads", "1") == 0
    extended = snapshot(out / "adamw")
    code = run("compare", "--methods", "adamw", *TINY, "--out", out)
    assert_clean_error(capsys, code, "other settings", "steps", "--overwrite")
    assert snapshot(out / "adamw") == extended
    code = run("pretrain", *SMALL, "--out", out)  # nor does a single run go into a comparison's folder
    assert_clean_error(capsys, code, "comparison")
    assert run("compare", "--methods", "adamw", *TINY, "--out", out, "--overwrite") == 0
    assert [r["step"] for r in lines(out / "adamw" / "metrics.jsonl") if r["type"] == "train"] == [1, 2]
