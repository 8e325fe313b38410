"""The memory budget of a model too large to train here (LLaMA-7B): weights and optimizer state counted exactly on
the meta device, activations and transients scaled from a measured run.

``python -m gradspace.bench budget --preset 7b --rank 1024``: bfloat16 weights, GaLore with the 8-bit inner rule,
layer-wise (so no gradient outlives its backward step), for each ``basis_dtype``. The activation and transient
figure is the one measured on LLaMA-1B (layer-wise, gradient checkpointing, batch 1 x 256; docs/benchmarks.md)
scaled by the hidden size and halved for bfloat16: an estimate, and labelled so.
"""

from __future__ import annotations

import torch

from ..methods import create_optimizer
from ..optimizer import optimizer_state_bytes
from ..train.models import PRESETS, build_llama
from ..train.report import markdown_table

GB = 1e9


def state_bytes(preset: str, rank: int, basis_dtype: str, vocab: int = 32000, base: str = "adamw8bit") -> tuple:
    """(weight bytes, state bytes) of GaLore on the preset in bfloat16, counted after one step on meta tensors."""
    model = build_llama(preset, vocab_size=vocab, device="meta").to(torch.bfloat16)
    for p in model.parameters():
        p.grad = torch.empty_like(p)
    opt = create_optimizer(
        "galore", model, lr=1e-6, rank=rank, base=base, basis_dtype=basis_dtype, nonfinite="off", diagnostics=False
    )
    opt.step()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return weights, optimizer_state_bytes(opt)


def run(preset: str = "7b", rank: int = 1024, transient_1b: float | None = None, vocab: int = 32000) -> str:
    """``transient_1b``: the measured 1B float32 activations + transients in bytes (see the module docstring)."""
    scale = PRESETS[preset][0] / PRESETS["1b"][0] / 2  # hidden-size ratio, and bfloat16 halves activations
    rows = []
    for kind in ("float32", "bfloat16", "int8"):
        weights, state = state_bytes(preset, rank, kind, vocab)
        extra = transient_1b * scale if transient_1b is not None else None
        total = weights + state + (extra or 0)
        rows.append(
            [
                kind,
                weights / GB,
                state / GB,
                "-" if extra is None else f"{extra / GB:.2f} (estimate)",
                total / GB,
            ]
        )
    return (
        f"LLaMA-{preset} (vocabulary {vocab}) in bfloat16, GaLore rank {rank}, 8-bit inner rule, layer-wise, batch 1 "
        f"x 256 with gradient checkpointing; weights and state counted on the meta device, GB = 1e9 bytes\n\n"
        + markdown_table(
            ["basis_dtype", "weights GB", "optimizer state GB", "activations + transients GB", "total GB"], rows
        )
    )


def register(subparsers) -> None:
    """``bench budget``."""
    bud = subparsers.add_parser("budget", help="memory budget of a model too large to run: counted weights and state")
    bud.add_argument("--preset", default="7b")
    bud.add_argument("--rank", type=int, default=1024)
    bud.add_argument("--transient-1b-gib", type=float, default=None, help="measured 1B activations + transients")
    bud.set_defaults(main=cli)


def cli(args) -> str:
    """``bench budget`` from its parsed flags (``--transient-1b-gib`` in GiB, ``run`` takes bytes)."""
    extra = None if args.transient_1b_gib is None else args.transient_1b_gib * 2**30
    return run(args.preset, args.rank, extra)
