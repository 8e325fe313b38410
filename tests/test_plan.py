"""gradspace plan: the predicted peak beside real steps measured in a fresh process, the budget search, and the
check that refuses a run predicted not to fit before anything large is built."""

import json

import pytest

from conftest import run
from gradspace.bench.real_memory import measure
from gradspace.plan import fit
from gradspace.plan.memory import GiB, plan_memory
from gradspace.sizes import parse_bytes
from gradspace.train.models import build_llama
from test_cli import SMALL

VOCAB = 32000


def measured_peak(preset, method, base, layerwise, ckpt, batch, seq_len=256):
    spec = {
        "preset": preset, "method": method, "options": {"base": base}, "layerwise": layerwise, "rank": 16,
        "steps": 2, "seq_len": seq_len, "threads": 1, "device": "cpu", "vocab": VOCAB, "checkpointing": ckpt,
        "batch": batch,
    }  # fmt: skip
    return measure("plan test", spec)["peak"]


@pytest.mark.parametrize(
    "method, base, layerwise, ckpt, batch",
    [
        ("adamw", "adamw", False, False, 4),  # the loss's logits dominate: 4 x 256 x 32000 float32 = 125 MiB each
        ("galore", "adamw", False, True, 1),
        ("galore", "adamw8bit", True, False, 4),
    ],
)
def test_the_prediction_is_within_6_percent_of_real_steps(method, base, layerwise, ckpt, batch):
    model = build_llama("tiny", vocab_size=VOCAB, device="meta")
    plan = plan_memory(
        model, method=method, base=base, rank=16, layerwise=layerwise, grad_checkpointing=ckpt, batch_size=batch,
        seq_len=256, svd="randomized",
    )  # fmt: skip
    peak = measured_peak("tiny", method, base, layerwise, ckpt, batch)
    assert abs(plan.peak / peak - 1) < 0.06, (plan.table(), peak / GiB)


def test_lines_add_up_and_follow_the_options():
    model = build_llama("60m", vocab_size=VOCAB, device="meta")
    full = plan_memory(model, method="adamw", batch_size=2, seq_len=128)
    lines = {x.part: x.bytes for x in full.lines}
    state = sum(v for k, v in lines.items() if "state" in k or "moments" in k)
    backward = lines["weights"] + state + lines["activations"] + lines["loss backward"]
    step = lines["weights"] + state + lines["gradients"] + lines["step transients"]
    assert full.peak == lines["baseline"] + max(backward, step) + lines["allocator headroom"]
    weights = sum(p.numel() for p in model.parameters()) * 4
    assert lines["weights"] == weights and lines["gradients"] == weights
    assert lines["full-rank parameters' state"] == 2 * weights  # AdamW: m and v
    layerwise = plan_memory(model, method="galore", rank=128, layerwise=True, batch_size=2, seq_len=128)
    assert layerwise.line("gradients") == max(p.numel() for p in model.parameters()) * 4  # one at a time
    ckpt = plan_memory(model, method="adamw", grad_checkpointing=True, batch_size=2, seq_len=128)
    assert ckpt.line("activations") < full.line("activations") / 2
    bf16 = plan_memory(model, method="adamw", dtype="bfloat16", batch_size=2, seq_len=128)
    assert bf16.line("weights") == weights // 2
    double = plan_memory(model, method="adamw", batch_size=4, seq_len=128)
    assert double.line("activations") == 2 * full.line("activations")  # one sequence's worth per row


def test_parse_bytes():
    assert parse_bytes("24GiB") == 24 * 2**30 and parse_bytes("20 GB") == 20 * 10**9 and parse_bytes("512m") == 2**29
    for bad in ("", "lots", "-3GiB", "3 parsecs", "0GB"):
        with pytest.raises(ValueError, match="24GiB"):
            parse_bytes(bad)


def test_plan_json_and_the_budget_search(capsys):
    assert run("plan", "--preset", "60m", "--vocab-size", str(VOCAB), "--budget", "1GiB", "--json") == 0
    out = json.loads(capsys.readouterr().out)
    assert out["peak_bytes"] == out["peak_bytes"] and out["available_bytes"] == 2**30 and not out["fits"]
    found = out["fitting"]
    assert found and all(p["peak_bytes"] <= 2**30 for p in found)
    ranks = [p["setup"]["rank"] or 0 for p in found]
    assert ranks == sorted(ranks, reverse=True)  # the highest rank first
    assert all(p["command"].startswith("gradspace pretrain --preset 60m --method galore") for p in found)
    assert run("plan", "--preset", "60m", "--budget", "lots") == 2


def test_a_run_predicted_not_to_fit_is_refused_before_it_builds(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(fit, "available", lambda device="cpu": 600 * 2**20)  # 600 MiB
    out = tmp_path / "run"
    code = run("pretrain", *SMALL, "--preset", "mini", "--batch-size", "64", "--seq-len", "256", "--out", out)
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and "predicted to need" in err and "0.6 GiB are available" in err
    assert "--no-memory-check" in err and "--grad-accum" in err  # what fits keeps the global batch of 64
    assert not out.exists()  # nothing was written
    assert run("pretrain", *SMALL, "--out", out) == 0  # the tiny preset fits in 600 MiB
    monkeypatch.setattr(fit, "available", lambda device="cpu": 2**20)
    assert run("pretrain", *SMALL, "--out", tmp_path / "small") == 2  # nothing fits in 1 MiB
    assert "no configuration of this model fits" in capsys.readouterr().err
    assert run("pretrain", *SMALL, "--out", tmp_path / "small", "--no-memory-check") == 0


def test_the_7b_preset_is_refused_with_what_fits(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(fit, "available", lambda device="cpu": 22 * 2**30)
    code = run("pretrain", "--preset", "7b", "--steps", "1", "--out", tmp_path / "run")
    err = capsys.readouterr().err
    assert code == 2 and "predicted to need at least" in err and "these fit" in err, err
    first = next(line for line in err.splitlines() if line.strip().startswith("gradspace pretrain --preset 7b"))
    assert "--dtype int8" in first and "--layerwise" in first  # int8 weights: the fewest other tricks at batch 8


def test_a_finetuning_run_is_checked_on_the_model_it_loaded(tmp_path, monkeypatch, capsys):
    from test_finetune import FAST

    monkeypatch.setattr(fit, "available", lambda device="cpu": 2**20)
    args = ["finetune", "--task", "sms-spam", *FAST, "--steps", "2", "--eval-every", "0"]
    assert run(*args, "--out", tmp_path / "ft") == 2
    err = capsys.readouterr().err
    assert "predicted to need" in err and "no configuration of this model fits" in err
    assert not (tmp_path / "ft").exists()
    assert run(*args, "--out", tmp_path / "ft", "--no-memory-check") == 0


def test_the_accuracy_benchmark_reports_prediction_measurement_and_error():
    from gradspace.bench import plan_accuracy

    out = plan_accuracy.run(("tiny",), (1,), seq_len=32, steps=1, threads=1, vocab=500, labels=["AdamW"])
    rows = [line for line in out.splitlines() if line.startswith("| tiny | AdamW |")]
    assert len(rows) == 2  # checkpointing on and off
    for row in rows:
        error = float(row.strip("| ").split("|")[-1].strip().rstrip("%"))
        assert abs(error) < 10, out
