"""gradspace compare as a protocol: seeds with their spread, a learning-rate grid per method, the noise rule, and
a comparison that resumes where it was stopped."""

import json
import statistics

import pytest

from conftest import lines, run
from gradspace.train import compare, spread
from gradspace.train.config import UsageError

TINY = ["--steps", "6", "--seq-len", "32", "--batch-size", "4", "--eval-every", "3", "--eval-batches", "2"]
TINY += ["--threads", "1", "--log-every", "1", "--tokenizer", "chars"]


def test_seeds_and_lr_grid_report_mean_spread_and_the_chosen_rate(tmp_path, capsys):
    out = tmp_path / "cmp"
    code = run(
        "compare", "--methods", "adamw,galore", "--seeds", "2", "--lr-grid", "galore=1e-3,1e30",
        "--tune-fraction", "0.5", *TINY, "--out", out,
    )  # fmt: skip
    assert code == 0
    raw = json.loads((out / "metrics.json").read_text())
    runs, results = raw["runs"], raw["results"]
    for method in ("adamw", "galore"):
        seeds = runs[method]
        assert sorted(seeds) == ["0", "1"]
        losses = [seeds[s]["val_loss"] for s in ("0", "1")]
        assert losses[0] != losses[1]  # two seeds are two runs
        assert results[method]["val_loss"] == pytest.approx(statistics.fmean(losses), abs=1e-12)
        assert results[method]["spread"]["val_loss"] == pytest.approx(statistics.stdev(losses), abs=1e-12)
        assert results[method]["n"] == 2 and (out / method / "seed-1" / "summary.json").exists()
    tuning = results["galore"]["tuning"]
    assert tuning["steps"] == 3 and tuning["chosen"] == 1e-3  # 1e30 diverges and can never win
    assert json.loads((out / "tune" / "galore" / "lr-1e+30" / "summary.json").read_text())["diverged"]
    assert all(runs["galore"][s]["lr"] == 1e-3 for s in ("0", "1")) and "tuning" not in results["adamw"]
    report = (out / "report.md").read_text()
    assert " ± " in report and "| galore | - | diverged | 0.001 |" not in report
    assert "| galore |" in report and "chosen" in report and "Rule: a difference" in report
    assert (out / "loss.png").stat().st_size > 1000


def test_an_interrupted_comparison_resumes_and_matches_an_uninterrupted_one(tmp_path, capsys):
    args = ["compare", "--methods", "galore", "--seeds", "2", "--rank", "8", "--update-gap", "2", *TINY]
    assert run(*args, "--out", tmp_path / "whole") == 0
    cut = tmp_path / "cut"
    assert run(*args, "--out", cut, "--stop-after", "4") == 130
    assert "run the same command again to continue" in capsys.readouterr().err
    assert (cut / "galore" / "seed-0" / "checkpoints").exists() and not (cut / "galore" / "seed-1").exists()
    assert run(*args, "--out", cut) == 0
    whole = json.loads((tmp_path / "whole" / "metrics.json").read_text())["runs"]["galore"]
    resumed = json.loads((cut / "metrics.json").read_text())["runs"]["galore"]
    for seed in ("0", "1"):
        assert resumed[seed]["val_loss"] == whole[seed]["val_loss"]  # bit-exact resume
    first = resumed["0"]
    assert first["start_step"] == 4 and [e["step"] for e in first["evals"]] == [3, 6]  # the whole run's curve
    assert [h["step"] for h in first["history"]] == list(range(1, 7))
    done = (cut / "galore" / "seed-1" / "summary.json").stat().st_mtime_ns
    assert run(*args, "--out", cut) == 0  # all finished: nothing reruns, the report is rewritten
    assert (cut / "galore" / "seed-1" / "summary.json").stat().st_mtime_ns == done


def test_a_rerun_must_ask_for_the_same_comparison(tmp_path, capsys):
    out = tmp_path / "cmp"
    base = ["compare", "--methods", "adamw", *TINY, "--steps", "2", "--out", out]
    assert run(*base) == 0
    assert run(*base[:-2], "--seq-len", "16", "--out", out) == 2
    err = capsys.readouterr().err
    assert "other settings (seq_len)" in err and "--overwrite" in err
    assert run("compare", "--methods", "adamw,sgd-nope", *TINY, "--out", out) == 2
    assert run(*base[:2], "adamw,galore", *base[3:]) == 0  # a method added: adamw is kept, galore runs
    assert set(json.loads((out / "metrics.json").read_text())["results"]) == {"adamw", "galore"}


def test_a_nan_loss_is_a_diverged_run_with_its_summary(tmp_path, capsys):
    out = tmp_path / "run"
    assert run("pretrain", *TINY, "--lr", "1e30", "--out", out) == 3
    summary = json.loads((out / "summary.json").read_text())
    assert summary["diverged"] and "non-finite" in summary["nonfinite"] and summary["history"]
    assert "marked diverged" in capsys.readouterr().err


def test_method_options_parse_into_training_options_and_optim_args():
    assert compare.method_options("adarank:eta_th=0.02") == ("adarank", {}, {"eta_th": 0.02})
    assert compare.method_options("galore:rank=8;update-gap=100;base=lion") == (
        "galore",
        {"rank": 8, "update_gap": 100, "base": "lion"},
        {},
    )
    cfg = compare.run_config({"optim_args": "alpha=5", "lr": None}, "adarank:eta_th=0.02", seed=3)
    assert cfg["optim_args"] == {"alpha": 5, "eta_th": 0.02} and cfg["seed"] == 3 and cfg["method"] == "adarank"
    for bad, words in (("nope:x=1", "unknown method"), ("galore:rank", "key=value"), ("adamw:rank=4", "full rank")):
        with pytest.raises(UsageError, match=words):
            compare.method_options(bad)
    with pytest.raises(UsageError, match="given twice"):
        compare.parse_methods("galore,adamw,galore")


def test_lr_grid_forms():
    labels = ["adamw", "galore", "adarank:eta_th=0.02"]
    assert compare.parse_lr_grid(["3e-3,1e-3"], labels) == {m: [1e-3, 3e-3] for m in labels}
    grid = compare.parse_lr_grid(["1e-3,3e-3", "adamw=1e-4,3e-4", "adarank:eta_th=0.02=1e-2"], labels)
    assert grid == {"adamw": [1e-4, 3e-4], "galore": [1e-3, 3e-3], "adarank:eta_th=0.02": [1e-2]}
    assert compare.parse_lr_grid({"galore": [1e-3, 1e-2]}, labels) == {"galore": [1e-3, 1e-2]}
    assert compare.parse_lr_grid([1e-3, 1e-2], labels)["adamw"] == [1e-3, 1e-2]
    for bad, words in ((["fira=1e-3"], "not among"), (["1e-3,x"], "learning rates"), (["-1"], "positive")):
        with pytest.raises(UsageError, match=words):
            compare.parse_lr_grid(bad, labels)


def test_tuning_runs_scale_the_budget_and_warmup():
    cfg = compare.tuning_config({"steps": 2000, "warmup": 200, "eval_every": 100, "save_every": 500}, 0.25)
    assert cfg == {"steps": 500, "warmup": 50, "eval_every": 0, "save_every": 0}


def test_noise_rule_and_aggregate():
    runs = {s: {"val_loss": v, "state_bytes": 10, "history": [], "evals": []} for s, v in enumerate((2.0, 2.2, 2.1))}
    runs[3] = {"val_loss": float("nan"), "diverged": True}
    a = spread.aggregate(runs)
    assert a["n"] == 3 and a["diverged_seeds"] == [3] and a["val_loss"] == pytest.approx(2.1)
    assert a["spread"]["val_loss"] == pytest.approx(0.1) and a["state_bytes"] == 10 and "state_bytes" in a["spread"]
    b = {"val_loss": 2.25, "spread": {"val_loss": 0.05}}
    assert spread.within_noise(a, b, "val_loss")  # 0.15 <= 0.1 + 0.05
    assert not spread.within_noise(a, {**b, "val_loss": 2.26}, "val_loss")
    assert spread.within_noise(a, {"val_loss": 2.1}, "val_loss") is None  # one seed: cannot tell
    best, ties = spread.best_and_ties({"a": a, "b": b, "c": {**b, "val_loss": 2.5}}, "val_loss")
    assert best == "a" and ties == ["b"]


def test_resumed_pretrain_summary_covers_the_whole_run(tmp_path):
    out = tmp_path / "run"
    assert run("pretrain", *TINY, "--out", out, "--stop-after", "2") == 130
    assert run("pretrain", "--resume", out, "--threads", "1") == 0
    summary = json.loads((out / "summary.json").read_text())
    train = [x for x in lines(out / "metrics.jsonl") if x["type"] == "train"]
    assert [h["step"] for h in summary["history"]] == list(range(1, 7)) and [e["step"] for e in summary["evals"]] == [
        3,
        6,
    ]
    assert summary["wall_time"] == pytest.approx(train[-1]["elapsed"], rel=0.5) and train[1]["elapsed"] > 0


def test_sigterm_to_compare_stops_its_children_with_a_checkpoint_and_a_rerun_finishes(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "cmp"
    argv = ["compare", "--methods", "galore", *TINY, "--steps", "400", "--eval-every", "0", "--out", str(out)]
    proc = subprocess.Popen([sys.executable, "-m", "gradspace", *argv], stderr=subprocess.PIPE, text=True)
    metrics = out / "galore" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and metrics.read_text().count("\n") >= 3) and time.monotonic() < deadline:
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "run the same command again" in err and list((out / "galore" / "checkpoints").glob("ckpt-*.pt"))
    assert run(*argv) == 0
    assert json.loads((out / "galore" / "summary.json").read_text())["start_step"] > 0


def test_a_grid_may_grow_but_not_lose_rates(tmp_path):
    m = {"config": {"steps": 2}, "lr_grid": {"galore": [1e-3, 3e-3]}, "tune_fraction": 0.25}
    (tmp_path / "compare.json").write_text(json.dumps(m))
    grown = {**m, "lr_grid": {"galore": [1e-3, 3e-3, 1e-2]}}
    assert compare.check_manifest(tmp_path, grown, False)["lr_grid"] == grown["lr_grid"]
    with pytest.raises(UsageError, match="lr_grid of galore"):
        compare.check_manifest(tmp_path, {**m, "lr_grid": {"galore": [1e-2]}}, False)
    with pytest.raises(UsageError, match="tune_fraction"):
        compare.check_manifest(tmp_path, {**m, "tune_fraction": 0.5}, False)
    kept = compare.check_manifest(tmp_path, {**m, "lr_grid": {"adamw": [1e-3]}}, False)["lr_grid"]
    assert kept == {"galore": [1e-3, 3e-3], "adamw": [1e-3]}  # the other method's grid stays on record
    assert compare.check_manifest(tmp_path, {**m, "config": {"steps": 3}}, True)["config"] == {"steps": 3}


def test_lr_from_runs_each_method_at_the_rate_an_earlier_comparison_chose(tmp_path, capsys):
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    results = {"adamw": {"lr": 2e-3}, "galore": {"lr": 5e-3}, "osd": {"lr": 7e-3}}
    (earlier / "metrics.json").write_text(json.dumps({"results": results}))
    out = tmp_path / "cmp"
    argv = ["compare", "--methods", "adamw,galore,osd", "--lr-from", earlier, "--lr-grid", "osd=1e-3", *TINY]
    assert run(*argv, "--steps", "2", "--out", out) == 0
    assert "lr adamw 0.002, galore 0.005, osd 0.001" in capsys.readouterr().err
    results = json.loads((out / "metrics.json").read_text())["results"]
    assert {m: r["lr"] for m, r in results.items()} == {"adamw": 2e-3, "galore": 5e-3, "osd": 1e-3}  # --lr-grid wins
    assert not (out / "tune").exists()  # one rate each: nothing to tune
    code = run("compare", "--methods", "adamw,apollo", "--lr-from", earlier / "metrics.json", *TINY, "--out", out)
    err = capsys.readouterr().err
    assert code == 2 and "no learning rate for apollo" in err and "--lr-grid apollo=" in err
    assert run("compare", "--methods", "adamw", "--lr-from", tmp_path / "none", *TINY, "--out", out) == 2
    assert "not a gradspace compare" in capsys.readouterr().err
