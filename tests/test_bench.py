"""The timing benchmarks run end to end on small shapes and report every contender (times are not asserted)."""

import re

from gradspace.bench import step, update
from gradspace.trackers import TRACKERS


def _rows(table: str) -> dict[str, list[str]]:
    """Row name -> cells, from the last table that has the row."""
    rows = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and len(cells) > 1 and not set(cells[1]) <= set("-"):
            rows[cells[0]] = cells[1:]  # the last table wins
    return rows


def test_update_bench_covers_every_shape_of_a_preset_and_every_tracker():
    out = update.run_preset("tiny", rank=8, repeats=1)
    assert re.findall(r"One subspace update, (\d+ x \d+) at rank 8", out) == ["64 x 64", "64 x 172"]
    rows = _rows(out)
    assert set(rows) >= {"torch.linalg.svd", *(t for t in TRACKERS if t != "svd")}
    assert float(rows["torch.linalg.svd"][1]) == 1.0


def test_step_bench_with_fewer_layers_and_no_references():
    out = step.run("tiny", ["galore", "subtrack"], rank=8, repeats=1, layers=1, references=False)
    assert "with 1 of its blocks" in out
    rows = _rows(out)
    assert "gradspace subtrack" in rows and "galore-torch GaLoreAdamW" not in rows
    assert float(rows["gradspace galore"][2]) == 1.0  # amortised ratio of galore to itself (T=200 column)


def test_stagger_bench_puts_one_update_on_every_step():
    out = step.stagger("tiny", rank=8, layers=1)
    rows = _rows(out)
    staggered = next(k for k in rows if "update_stagger" in k)
    assert "T = N = 7" in staggered  # one block: 7 projected weights
    assert float(rows[staggered][1]) > 0 and float(rows["galore, exact SVD, all updates on one step (forced)"][2]) > 0


def test_svd_bench_reports_every_grid_point(monkeypatch):
    import torch

    from gradspace.bench import svd

    fake = {"w": torch.randn(32, 80), "v": torch.randn(80, 32)}
    monkeypatch.setattr(svd, "real_gradients", lambda *a, **k: fake)
    out = svd.run("tiny", rank=4, grid=((0, 0), (8, 1)))
    rows = _rows(out)
    assert {"0", "8"} <= set(rows) and float(rows["8"][1]) < 5.0  # shortfall in %, power iteration on


def test_distributed_memory_bench_shows_what_each_strategy_holds_per_rank():
    from gradspace.bench import distributed_memory

    table = distributed_memory.run("tiny")
    rows = {
        line.split(" | ")[0].lstrip("| "): line.split(" | ")[1:] for line in table.splitlines() if ", rank " in line
    }
    assert len(rows) == 8
    weights = {k: float(v[0]) for k, v in rows.items()}
    grads = {k: float(v[1]) for k, v in rows.items()}
    assert grads["DDP layer-wise, rank 0"] == grads["DDP layer-wise, rank 1"] == 0  # freed after each step
    assert grads["FSDP2 layer-wise, rank 0"] == grads["FSDP2 layer-wise, rank 1"] == 0  # after each reduce-scatter
    assert grads["FSDP2, rank 0"] == weights["FSDP2, rank 0"] > 0
    assert grads["DDP, rank 0"] == weights["DDP, rank 0"] > 0
    assert abs(weights["FSDP2, rank 0"] - weights["DDP, rank 0"] / 2) < 0.01 * weights["DDP, rank 0"]  # rows
