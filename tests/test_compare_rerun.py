"""A comparison's folder over several commands: a rerun with some of its methods reports all of them, and
SIGINT to compare's own pid stops it as a terminal's Ctrl-C does (each running run saves; a rerun continues)."""

import json
import os
import signal
import subprocess
import sys
import time

from conftest import run

TINY = ["--steps", "2", "--seq-len", "16", "--batch-size", "2", "--eval-batches", "1", "--threads", "1"]
TINY += ["--tokenizer", "chars", "--log-every", "1"]


def test_a_rerun_with_some_of_the_methods_reports_every_finished_one(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert run("compare", "--methods", "adamw,galore", *TINY, "--out", out) == 0
    first = json.loads((out / "metrics.json").read_text())["results"]
    assert run("compare", "--methods", "galore", *TINY, "--out", out) == 0
    results = json.loads((out / "metrics.json").read_text())["results"]
    assert list(results) == ["adamw", "galore"]  # adamw's finished run is still in the report, in its place
    assert results["adamw"]["val_loss"] == first["adamw"]["val_loss"]
    report = (out / "report.md").read_text()
    assert "| adamw |" in report and "| galore |" in report
    assert json.loads((out / "compare.json").read_text())["methods"] == ["adamw", "galore"]
    capsys.readouterr()
    assert run("compare", "--methods", "galore", *TINY, "--seeds", "2", "--out", out) == 0
    assert set(json.loads((out / "metrics.json").read_text())["results"]) == {"galore"}  # adamw has no seed 1
    assert "leaves out adamw" in capsys.readouterr().err


def test_sigint_to_compares_pid_saves_the_running_run_and_a_rerun_finishes(tmp_path):
    out = tmp_path / "cmp"
    argv = ["compare", "--methods", "galore", *TINY, "--steps", "400", "--eval-every", "0", "--out", str(out)]
    proc = subprocess.Popen([sys.executable, "-m", "gradspace", *argv], stderr=subprocess.PIPE, text=True)
    metrics = out / "galore" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and metrics.read_text().count("\n") >= 3) and time.monotonic() < deadline:
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGINT)  # compare's pid alone, as `kill -INT <pid>` does: not a process group
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "run the same command again" in err and list((out / "galore" / "checkpoints").glob("ckpt-*.pt"))
    stopped = json.loads((out / "galore" / "config.json").read_text())
    assert stopped["steps"] == 400 and not (out / "galore" / "summary.json").exists()
    assert run(*argv[:-4], "--steps", "400", "--eval-every", "0", "--out", out) == 0
    summary = json.loads((out / "galore" / "summary.json").read_text())
    assert 0 < summary["start_step"] < 400 and summary["steps"] == 400
