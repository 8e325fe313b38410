"""Subspace updates spread over data-parallel ranks (``distributed="shard_updates"``) against every rank computing
every update, and against one process: ``python -m gradspace.bench distributed``."""

from __future__ import annotations

import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from ..distributed import MODES
from ..train.report import markdown_table
from . import distributed_memory


def llama_shapes(hidden: int = 512, intermediate: int = 1376, layers: int = 8) -> list[tuple[int, int]]:
    """The projected weights of a LLaMA (defaults: the 60M preset): q, k, v, o, gate, up, down per layer."""
    per_layer = [(hidden, hidden)] * 4 + [(intermediate, hidden)] * 2 + [(hidden, intermediate)]
    return per_layer * layers


def _bench(rank: int, world: int, init: str | None, mode: str | None, tracker: str, steps: int, out: list) -> None:
    """Median ms of an optimizer step in which every basis moves (update_proj_gap=1), after one warm-up step."""
    from ..optimizer import SubspaceOptimizer

    torch.set_num_threads(1)
    if init is not None:
        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    gen = torch.Generator().manual_seed(0)  # same weights and gradients on every rank, as after DDP's all-reduce
    params = [nn.Parameter(torch.randn(*s, generator=gen) * 0.02) for s in llama_shapes()]
    grads = [torch.randn(*s, generator=gen) for s in llama_shapes()]
    opt = SubspaceOptimizer(
        [{"params": params, "rank": 128, "update_proj_gap": 1}],
        tracker=tracker,
        moments="rotate" if tracker == "adarank" else "keep",
        distributed=mode,
        diagnostics=False,
    )
    times = []
    for i in range(steps + 1):
        for p, g in zip(params, grads):
            p.grad = g
        if init is not None:
            dist.barrier()
        t0 = time.perf_counter()
        opt.step()
        if init is not None:
            dist.barrier()
        if i > 0:  # step 0 computes the first bases
            times.append(1e3 * (time.perf_counter() - t0))
    if rank == 0:
        out.append(statistics.median(times))
    if init is not None:
        dist.destroy_process_group()


def _bench_spawned(rank, world, init, mode, tracker, steps, path):
    out: list = []
    _bench(rank, world, init, mode, tracker, steps, out)
    if out:
        torch.save(out[0], path)


def run(tracker: str = "svd", steps: int = 3) -> str:
    """Step time with every basis moving on a LLaMA-60M-shaped parameter set: one process, then two gloo
    processes replicating and sharding the updates."""
    out: list = []
    _bench(0, 1, None, None, tracker, steps, out)
    rows = [["1 process", out[0], 1.0]]
    for mode in MODES:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "ms.pt")
            mp.spawn(_bench_spawned, args=(2, f"file://{tmp}/init", mode, tracker, steps, path), nprocs=2)
            ms = torch.load(path)
            rows.append([f"2 processes, {mode}", ms, ms / out[0]])
    title = (
        f"One optimizer step in which all {len(llama_shapes())} bases of a LLaMA-60M-shaped parameter set move "
        f"(tracker {tracker}, rank 128, 1 thread per process, median of {steps})"
    )
    return f"{title}\n\n" + markdown_table(["run", "ms per step", "x 1 process"], rows)


def register(subparsers) -> None:
    """``bench distributed``: this module's step times, or ``distributed_memory`` with ``--memory``."""
    dst = subparsers.add_parser(
        "distributed", help="subspace updates sharded over 2 gloo ranks vs replicated vs 1 process"
    )
    dst.add_argument("--tracker", default="svd")
    dst.add_argument("--steps", type=int, default=3)
    dst.add_argument("--memory", action="store_true", help="instead: per-rank memory of DDP, layer-wise DDP, FSDP2")
    dst.add_argument("--preset", default="60m", help="with --memory: the LLaMA preset")
    dst.set_defaults(main=cli)


def cli(args) -> str:
    """``bench distributed`` from its parsed flags."""
    if args.memory:
        return distributed_memory.run(args.preset)
    return run(args.tracker, args.steps)
