"""The timing benchmarks run end to end on small shapes and report every contender (times are not asserted)."""

import argparse
import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gradspace.bench import (
    adarank_sweep,
    budget,
    distributed_memory,
    gpu,
    memory,
    plan_accuracy,
    real_memory,
    sharded_updates,
    step,
    svd,
    update,
)
from gradspace.bench.__main__ import build_parser
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


def test_step_floor_and_ops_benches_report_every_row():
    out = step.floor("tiny", rank=16, repeats=1, layers=2)
    rows = _rows(out)
    assert set(rows) - {"step"} == {"floor (by hand)", "gradspace galore", "gradspace galore, batched"}
    assert float(rows["floor (by hand)"][1]) == 1.0
    counts = _rows(step.ops("tiny", ["galore", "fira"], rank=16, layers=2))
    loop, batch = (int(counts["gradspace galore"][i]) for i in (0, 1))
    assert batch < loop / 2  # GaLore batches
    assert int(counts["gradspace fira"][1]) >= int(counts["gradspace fira"][0]) * 0.9  # Fira's recovery: the loop


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


BENCH = Path(__file__).resolve().parents[1] / "src" / "gradspace" / "bench"
#: every function a subcommand dispatches to (stubbed in the flag test)
RUNNERS = [
    (update, "run"),
    (update, "run_preset"),
    (step, "run"),
    (step, "stagger"),
    (step, "ops"),
    (step, "floor"),
    (svd, "run"),
    (budget, "run"),
    (sharded_updates, "run"),
    (distributed_memory, "run"),
    (adarank_sweep, "run"),
    (adarank_sweep, "run_variants"),
    (memory, "run"),
    (real_memory, "run"),
    (plan_accuracy, "run"),
    (gpu, "run"),
]


class _Reads(argparse.Namespace):
    """A namespace that records the flags read from it."""

    def __getattribute__(self, name):
        if not name.startswith("_"):
            object.__getattribute__(self, "_read").add(name)
        return object.__getattribute__(self, name)


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_the_subcommands_keep_their_order():
    assert list(_subcommands()) == [
        "update",
        "step",
        "svd",
        "budget",
        "plan-accuracy",
        "distributed",
        "adarank",
        "memory",
        "gpu",
    ]


@pytest.mark.parametrize("name", list(_subcommands()))
def test_every_flag_of_a_subcommand_is_read(name, monkeypatch):
    """A flag parsed and never read is a bug (``memory --real-steps`` was one): across the plain run and one run per
    store_true mode flag (``--real``, ``--stagger``...), the subcommand must read every flag it parses."""
    for module, fn in RUNNERS:
        monkeypatch.setattr(module, fn, lambda *a, **k: "")
    parser = _subcommands()[name]
    modes = [[]] + [a.option_strings[:1] for a in parser._actions if isinstance(a, argparse._StoreTrueAction)]
    read = set()
    for mode in modes:
        args = build_parser().parse_args([name, *mode])
        ns = _Reads(**vars(args), _read=set())
        assert ns.main(ns) == ""
        read |= ns._read
    parsed = {a.dest for a in parser._actions if not isinstance(a, argparse._HelpAction)}
    assert parsed - read == set()


def _imports(path: Path) -> set[str]:
    """Modules of gradspace.bench that ``path`` imports, at any depth (a lazy import is still an edge)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            names = [node.module] if node.module else [a.name for a in node.names]
            out |= {n.split(".")[0] for n in names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("gradspace.bench."):
            out.add(node.module.split(".")[2])
    return out


def test_bench_modules_import_no_cycle():
    graph = {p.stem: _imports(p) & {q.stem for q in BENCH.glob("*.py")} for p in BENCH.glob("*.py")}
    done, path = set(), []

    def visit(mod):
        assert mod not in path, f"import cycle: {' -> '.join([*path[path.index(mod) :], mod])}"
        if mod not in done:
            path.append(mod)
            for dep in sorted(graph[mod]):
                visit(dep)
            path.pop()
            done.add(mod)

    for mod in sorted(graph):
        visit(mod)


def test_no_long_bench_function_without_a_reason():
    """Over 80 lines, a function's docstring must say why it is not split (as "long because ...")."""
    long = [
        f"{p.name}:{node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for p in BENCH.glob("*.py")
        for node in ast.walk(ast.parse(p.read_text()))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.end_lineno - node.lineno + 1 > 80
        and "long because" not in (ast.get_docstring(node) or "")
    ]
    assert long == []


def test_gpu_check_dry_run_runs_every_part_on_the_cpu():
    """The prepared GPU script, as CI can run it: the cuda tests on the CPU, and every table with every row."""
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run(
        ["bash", str(root / "tools" / "gpu_check.sh"), "--dry-run"],
        env={**os.environ, "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout + done.stderr
    for title in ("1. The cuda tests", "2. Training speed", "3. The optimizer step", "4. Peak memory"):
        assert f"## {title}" in out
    assert "**failed**" not in out
    assert re.search(r"\*\*\d+ passed, \d+ skipped", out)  # the cuda tests ran (on the CPU), not all skipped
    for label in gpu.TRAINERS:
        assert re.search(rf"\| {re.escape(label)} \| [\d.]+ \|", out), label
    for label, _, _ in gpu.MEMORY_CONFIGS:
        assert f"LLaMA-tiny {label}" in out


def test_gpu_check_reports_a_failed_part_and_still_runs_the_others(monkeypatch, tmp_path):
    def broken(sizes):
        raise RuntimeError("no kernel for this")

    monkeypatch.setattr(gpu, "PARTS", (("Broken", broken), ("Speed", lambda sizes: f"ran on {sizes.device}")))
    with pytest.raises(SystemExit, match="a part failed"):
        gpu.cli(argparse.Namespace(dry_run=True, out=tmp_path / "gpu.md", parts=""))
    page = (tmp_path / "gpu.md").read_text()
    assert "## 1. Broken" in page and "**failed**: RuntimeError: no kernel for this" in page
    assert "## 2. Speed" in page and "ran on cpu" in page
    assert gpu.run(dry_run=True, parts=("2",)).count("## ") == 1  # --parts 2: that part alone, and it passes


def test_gpu_check_without_a_gpu_says_to_dry_run(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="no CUDA device here; --dry-run"):
        gpu.run(dry_run=False)
