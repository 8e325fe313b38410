"""Randomized vs exact SVD on real gradients at a preset's shapes: captured energy and time, per (oversample,
power iterations). This is how ``svd="randomized"``'s defaults were chosen.

The gradients are real: a LLaMA of the preset's shapes (with fewer blocks, so that it fits and runs quickly) takes
``steps`` AdamW steps on Shakespeare, and the gradient of the last step's batch is used. For each projected weight
the exact basis (``torch.linalg.svd``) and each randomized one capture an energy ``||S^T G||^2 / ||G||^2``;
the table gives the worst and mean ratio randomized / exact over the weights, and the time ratio summed over them.
"""

from __future__ import annotations

import time

import torch

from ..trackers import Context
from ..trackers.svd import randomized_basis, top_singular_basis
from ..train.models import PRESETS, build_llama
from ..train.report import markdown_table
from .formula import projected_names

GRID = ((0, 0), (8, 0), (16, 0), (8, 1), (16, 1), (32, 1), (16, 2))


def real_gradients(preset: str, layers: int, steps: int, batch: int, seq_len: int, seed: int = 0):
    """{name: gradient} of the projected weights after ``steps`` AdamW steps of a ``layers``-block model."""
    from ..train.data import TokenDataset

    data = TokenDataset.from_corpus("shakespeare", compact=True)
    torch.manual_seed(seed)
    model = build_llama(preset, vocab_size=data.vocab_size, num_hidden_layers=layers)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batches = data.fixed_batches("train", steps + 1, batch, seq_len, seed=seed)
    names = projected_names(model)
    for i, (x, y) in enumerate(batches):
        model.zero_grad(set_to_none=True)
        model(input_ids=x, labels=y).loss.backward()
        if i < steps:
            opt.step()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if n in names}


def run(
    preset: str = "1b",
    rank: int | None = None,
    layers: int = 1,
    steps: int = 20,
    batch: int = 4,
    seq_len: int = 256,
    grid=GRID,
) -> str:
    rank = rank or PRESETS[preset][0] // 4
    grads = real_gradients(preset, layers, steps, batch, seq_len)
    exact_s, energy_exact = 0.0, {}
    rows = {cfg: {"ratios": [], "seconds": 0.0} for cfg in grid}
    for index, (name, g) in enumerate(grads.items()):
        right = g.shape[0] >= g.shape[1]
        gn = g.mT if right else g  # oriented: the basis spans the smaller side, as std projection does
        total = gn.square().sum()
        t0 = time.perf_counter()
        exact = top_singular_basis(gn, rank, right)
        exact_s += time.perf_counter() - t0
        energy_exact[name] = float((exact.mT @ gn).square().sum() / total)
        for cfg in grid:
            t0 = time.perf_counter()
            basis = randomized_basis(gn, rank, Context(index, right, 0), 0, *cfg)
            rows[cfg]["seconds"] += time.perf_counter() - t0
            rows[cfg]["ratios"].append(float((basis.mT @ gn).square().sum() / total) / energy_exact[name])
    table = [
        [
            p,
            q,
            f"{100 * (1 - min(r['ratios'])):.3f}",
            f"{100 * (1 - sum(r['ratios']) / len(r['ratios'])):.3f}",
            r["seconds"],
            r["seconds"] / exact_s,
        ]
        for (p, q), r in rows.items()
    ]
    shapes = sorted({tuple(g.shape) for g in grads.values()})
    low, high = min(energy_exact.values()), max(energy_exact.values())
    return (
        f"Randomized vs exact SVD, rank {rank}, on the real gradients of {len(grads)} projected weights of shapes "
        f"{', '.join('x'.join(map(str, s)) for s in shapes)} (LLaMA-{preset} blocks, {layers} of them, after "
        f"{steps} AdamW steps on Shakespeare, batch {batch} x {seq_len}); exact SVDs took {exact_s:.1f} s and "
        f"captured {low:.5f}-{high:.5f} of the energy; shortfall = 100 (1 - randomized / exact energy), %\n\n"
        + markdown_table(
            ["oversample", "power iterations", "shortfall % (worst)", "shortfall % (mean)", "s", "x exact time"],
            table,
        )
    )


def register(subparsers) -> None:
    """``bench svd``."""
    rsv = subparsers.add_parser("svd", help="randomized vs exact SVD on real gradients: captured energy and time")
    rsv.add_argument("--preset", default="1b")
    rsv.add_argument("--rank", type=int, default=None, help="default: hidden/4")
    rsv.add_argument("--layers", type=int, default=1, help="blocks of the preset to build (their shapes are real)")
    rsv.add_argument("--steps", type=int, default=5, help="AdamW steps before the gradient is taken")
    rsv.set_defaults(main=cli)


def cli(args) -> str:
    """``bench svd`` from its parsed flags."""
    return run(args.preset, args.rank, args.layers, args.steps)
