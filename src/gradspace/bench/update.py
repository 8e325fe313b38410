"""Cost of one subspace update per tracker, side by side with ``torch.linalg.svd`` (GaLore's update)."""

from __future__ import annotations

import torch

from ..components import TrackerState
from ..optimizer import PROJECTION_DEFAULTS
from ..rules import get_rule
from ..trackers import TRACKERS, Context
from ..train.report import markdown_table
from .timing import race


def _group(tracker, rank: int, gap: int) -> dict:
    group = {**PROJECTION_DEFAULTS, **tracker.defaults, **get_rule("adamw").defaults}
    group.update(rank=rank, update_proj_gap=gap, lr=1e-3, tracker=tracker.name, base="adamw", weight_decay=0.0)
    return group


def update_call(name: str, g: torch.Tensor, rank: int, seed: int = 0):
    """A zero-argument callable doing one basis move of tracker ``name`` on gradient ``g`` (oriented: rows <= cols).

    Trackers that move every step (``online_pca``) are timed on their per-step move; the others on ``update``.
    """
    tracker = TRACKERS[name]
    group = _group(tracker, rank, gap=1)
    ctx = Context(index=0, right=False, seed=seed)
    core = {"step": 0, "updates": 0}
    state = TrackerState(core)
    core["basis"] = tracker.init(g, rank, state, group, ctx)
    gt = core["basis"].mT @ g
    tracker.observe(g, gt, state, group)
    core["step"] = 1
    if getattr(tracker, "moves_every_step", False):
        return lambda: tracker.after_step(g, state, group, ctx)
    return lambda: tracker.update(g, state, group, ctx)


def preset_shapes(preset: str) -> list[tuple[int, int]]:
    """The distinct projected weight shapes of a LLaMA preset: attention (d x d) and MLP (d x intermediate)."""
    from ..train.models import PRESETS

    hidden, intermediate, _, _ = PRESETS[preset]
    return [(hidden, hidden), (hidden, intermediate)]


def run_preset(
    preset: str, rank: int | None = None, repeats=3, device="cpu", dtype=torch.float32, trackers=None
) -> str:
    """``run`` for every projected weight shape of a preset at the papers' rank for it."""
    from .step import PAPER_RANKS

    rank = rank or PAPER_RANKS.get(preset, 128)
    return "\n\n".join(run(shape, rank, repeats, device, dtype, trackers) for shape in preset_shapes(preset))


def run(shape=(2048, 5461), rank=512, repeats=3, device="cpu", dtype=torch.float32, trackers=None) -> str:
    gen = torch.Generator(device="cpu").manual_seed(0)
    k, n = min(shape), max(shape)
    # a gradient with a decaying spectrum, as real ones have
    u = torch.linalg.qr(torch.randn(k, k, generator=gen)).Q
    v = torch.linalg.qr(torch.randn(n, k, generator=gen)).Q
    s = torch.logspace(0, -3, k)
    g = ((u * s) @ v.mT + 1e-4 * torch.randn(k, n, generator=gen)).to(device=device, dtype=dtype)
    names = trackers or [t for t in TRACKERS if t != "svd"]
    contenders = {"torch.linalg.svd": lambda: torch.linalg.svd(g.float(), full_matrices=False)}
    for name in names:
        contenders[name] = update_call(name, g, rank)
    times = race(contenders, repeats=repeats, device=device)
    base = times["torch.linalg.svd"]
    rows = [[name, t * 1e3, t / base] for name, t in times.items()]
    title = f"One subspace update, {shape[0]} x {shape[1]} at rank {rank}, {dtype} on {device} (median of {repeats})"
    return f"{title}\n\n" + markdown_table(["update", "ms", "ratio to SVD"], rows)


def register(subparsers) -> None:
    """``bench update``: one shape (``--shape``) or every projected shape of a preset (``--preset``)."""
    upd = subparsers.add_parser("update", help="cost of one subspace update per tracker vs torch.linalg.svd")
    upd.add_argument("--shape", default="2048x5461", help="weight shape, e.g. 2048x5461")
    upd.add_argument("--preset", default=None, help="every projected shape of a LLaMA preset instead of --shape")
    upd.add_argument("--rank", type=int, default=None, help="default: 512, or the papers' rank for --preset")
    upd.add_argument("--repeats", type=int, default=3)
    upd.add_argument("--device", default="cpu")
    upd.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    upd.add_argument("--trackers", default=None, help="comma-separated tracker names (default: all)")
    upd.set_defaults(main=cli)


def cli(args) -> str:
    """``bench update`` from its parsed flags."""
    trackers = args.trackers.split(",") if args.trackers else None
    dtype = getattr(torch, args.dtype)
    if args.preset:
        return run_preset(args.preset, args.rank, args.repeats, args.device, dtype, trackers)
    shape = tuple(int(x) for x in args.shape.lower().split("x"))
    return run(shape, args.rank or 512, args.repeats, args.device, dtype, trackers)
