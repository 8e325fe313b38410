"""The memory benchmark: its closed-form state formula equals the bytes the optimizer really holds, the meta-device
count equals the real one, and the CLI runs end to end on a tiny config."""

import json
import math

import pytest
import torch

from gradspace.basis_storage import basis_shape
from gradspace.bench import memory
from gradspace.bench.__main__ import main

RANK = 16  # tiny preset: hidden 64, rank hidden/4
VOCAB = 256
LABELS = [v[0] for v in memory.variants()]


def _variant(label):
    return next(v for v in memory.variants() if v[0] == label)


def test_variants_cover_every_preset_and_the_extras():
    from gradspace.methods import METHODS

    methods = {m for _, m, _ in memory.variants()}
    assert methods == set(METHODS)
    assert {"subtrack accumulate=False", "adamw 8-bit", "galore 8-bit"} <= set(LABELS)


def test_formula_by_hand_for_one_weight():
    # GaLore on a 172 x 64 weight at rank 16: float32 basis 64 x 16, two float32 moments 16 x 172
    assert memory.weight_bytes((172, 64), 4, "galore", 16, {}) == 4 * 64 * 16 + 2 * 4 * 16 * 172
    # SubTrack keeps a float32 m x n gradient sum on top, unless accumulate=False
    assert memory.weight_bytes((172, 64), 4, "subtrack", 16, {}) == 4 * 64 * 16 + 2 * 4 * 16 * 172 + 4 * 172 * 64
    assert memory.weight_bytes((172, 64), 4, "subtrack", 16, {"accumulate": False}) == 4 * 64 * 16 + 2 * 4 * 16 * 172
    # 8-bit moments: one byte per element plus a float32 absmax per block of 256
    assert memory.weight_bytes((172, 64), 4, "galore", 16, {"base": "adamw8bit"}) == 4 * 64 * 16 + 2 * (
        16 * 172 + 4 * math.ceil(16 * 172 / 256)
    )
    # rank >= min(m, n) and full-rank methods: two moments of the weight's size, in its dtype
    assert memory.weight_bytes((172, 64), 2, "galore", 64, {}) == 2 * 2 * 172 * 64
    assert memory.weight_bytes((172,), 4, "adamw", 16, {}) == 2 * 4 * 172


@pytest.mark.parametrize("label", LABELS)
def test_formula_equals_bytes_held_on_real_tensors(label):
    _, method, options = _variant(label)
    held, counted, model, opt = memory.count_state("tiny", method, RANK, options, "cpu", VOCAB)
    names = {p: n for n, p in model.named_parameters()}
    # adarank chooses its rank from the data: the formula takes the chosen ranks (and nothing else) as input
    ranks = {names[p]: basis_shape(st)[1] for p, st in opt.state.items() if "basis" in st}
    formula = memory.formula_bytes(model, method, RANK, {"update_proj_gap": 200, **options}, ranks)
    assert held == counted == formula
    if method != "adamw":
        assert len(ranks) == 2 * 7  # tiny has 2 layers of 7 projected linears


def test_formula_follows_adarank_rank_changes_and_refreshes():
    ids = torch.randint(0, 40, (4000,), generator=torch.Generator().manual_seed(0))
    out, table = memory.adarank_table("tiny", rank=RANK, steps=10, gap=8, batch=2, seq_len=16, ids=ids)
    # adarank_table raises if the formula misses a byte; its rank is chosen from data and must be below galore's
    assert out["adarank"]["refreshes"] >= 1
    assert out["adarank"]["mean_rank"] < out["galore"]["mean_rank"] == RANK
    assert out["adarank"]["bytes"] < out["galore"]["bytes"]
    assert "| adarank |" in table


@pytest.mark.parametrize("label", LABELS)
def test_meta_device_counts_equal_real_counts(label):
    _, method, options = _variant(label)
    if method == "adarank":
        options = {**options, "eta_th": 1e-9}  # no rank meets it: the real run keeps r_max, as the meta count does
    meta = memory.count_state("tiny", method, RANK, options, "meta", VOCAB)[:2]
    real = memory.count_state("tiny", method, RANK, options, "cpu", VOCAB)[:2]
    assert meta == real


def test_cli_smoke(tmp_path, capsys):
    main(
        [
            "--threads",
            "1",
            "memory",
            "--configs",
            "tiny",
            "--vocab",
            str(VOCAB),
            "--check-preset",
            "",
            "--adarank-preset",
            "",
            "--peak-preset",
            "tiny",
            "--peak-methods",
            "galore",
            "--peak-steps",
            "2",
            "--seq-len",
            "16",
            "--jobs",
            "2",
            "--out",
            str(tmp_path),
        ]
    )
    text = capsys.readouterr().out
    assert "| tiny | 16 | galore 8-bit |" in text and "| NO |" not in text
    assert "| galore | layer-wise |" in text
    assert (tmp_path / "state_bytes.png").stat().st_size > 1000
    assert (tmp_path / "memory.md").read_text().strip() in text
    results = json.loads((tmp_path / "memory.json").read_text())
    assert len(results["state"]) == len(LABELS)
    assert [r["spec"]["layerwise"] for r in results["peak"]] == [False, True]
    for r in results["peak"]:  # measured in a fresh subprocess each
        assert r["state"] == r["formula"] > 0
        assert (
            r["steady_peak"] >= r["after"] >= r["state"]
        )  # the state is live after the steps, and was not at the baseline
        assert r["all_grads"] > r["projected_grads"] > 0


def test_budget_counts_bfloat16_weights_and_the_basis_in_its_storage_dtype():
    from gradspace.bench import budget
    from gradspace.bench.memory import formula_bytes
    from gradspace.train.models import build_llama

    model = build_llama("tiny", vocab_size=500, device="meta").to(torch.bfloat16)
    sizes = {}
    for kind in ("float32", "bfloat16", "int8"):
        weights, state = budget.state_bytes("tiny", 8, kind, vocab=500)
        assert weights == sum(p.numel() * 2 for p in model.parameters())
        assert state == formula_bytes(model, "galore", 8, {"base": "adamw8bit", "basis_dtype": kind})
        sizes[kind] = state
    assert sizes["float32"] > sizes["bfloat16"] > sizes["int8"]
    assert "estimate" in budget.run("tiny", 8, transient_1b=2**30, vocab=500)


def test_real_memory_runs_each_configuration_and_predicts_what_cannot_fit(monkeypatch):
    from gradspace.bench import real_memory

    assert real_memory._rank({"method": "apollo-mini", "rank": 8}) == 1  # a preset's own rank is kept

    out = real_memory.run(
        "tiny", 8, steps=2, seq_len=32, threads=1, labels=["AdamW", "GaLore 8-bit layer-wise"], vocab=500
    )
    rows = {
        r.split("|")[1].strip(): [c.strip() for c in r.split("|")[2:-1]]
        for r in out.splitlines()
        if r.startswith("| ") and "measured" in r
    }
    assert set(rows) == {"AdamW", "GaLore 8-bit layer-wise"}
    assert float(rows["GaLore 8-bit layer-wise"][2]) == 0.0  # no gradient outlives its backward step
    assert float(rows["AdamW"][2]) > 0 and float(rows["AdamW"][3]) > float(rows["GaLore 8-bit layer-wise"][3])
    monkeypatch.setattr(real_memory, "free_bytes", lambda: 0)
    out = real_memory.run("tiny", 8, steps=2, seq_len=32, threads=1, labels=["AdamW"], vocab=500)
    assert "| AdamW | predicted |" in out


def test_real_memory_cli_takes_its_steps_and_sequence_length(monkeypatch, capsys):
    """``--real-steps`` and ``--real-seq-len`` reach the training process (they were parsed and never read)."""
    from gradspace.bench import real_memory

    measure, seen = real_memory.measure, []

    def spy(label, spec, timeout):
        seen.append((spec, measure(label, spec, timeout)))
        return seen[-1][1]

    monkeypatch.setattr(real_memory, "measure", spy)
    real = ["--real", "--preset", "tiny", "--real-threads", "1", "--only", "AdamW", "--peak-rank", "8"]
    main(["--threads", "1", "memory", *real, "--vocab", "500", "--real-steps", "3", "--real-seq-len", "24"])
    out = capsys.readouterr().out
    assert "batch 1 x 24," in out and ", 3 steps," in out
    [(spec, res)] = seen
    assert (spec["steps"], spec["seq_len"]) == (3, 24)
    assert len(res["step_s"]) == 3  # the child took them all


def test_real_memory_needs_a_step():
    from gradspace.bench import real_memory

    with pytest.raises(ValueError, match="at least 1"):
        real_memory.run("tiny", 8, steps=0, labels=["AdamW"], vocab=500)
