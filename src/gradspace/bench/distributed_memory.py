"""Per-rank memory of data-parallel training with GaLore: DDP and FSDP2, each in the ordinary and the layer-wise
mode, two gloo processes: ``python -m gradspace.bench distributed --memory --preset 60m``.

Each rank builds LLaMA-<preset> (vocabulary 32,000, float32, gradient checkpointing), wraps it, and takes two
steps of batch 1 x 256 tokens (its own tokens) with GaLore at the preset's rank and the randomized SVD. Per rank:
the weights it holds, the gradients held after backward (their largest total), the optimizer state it holds, peak
RSS (VmHWM) and the rest (peak - RSS after the build - gradients - state: activations, DDP's buckets, FSDP2's
all-gathered blocks, transients); next to them the formula of one process (weights + gradients + state).
"""

from __future__ import annotations

import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ..components import flat_items
from ..train.report import markdown_table

GiB = 2**30
#: (label, strategy, layer-wise)
STRATEGIES = [
    ("DDP", "ddp", False),
    ("DDP layer-wise", "ddp", True),
    ("FSDP2", "fsdp2", False),
    ("FSDP2 layer-wise", "fsdp2", True),
]
WORLD = 2


def _bytes(tensors) -> int:
    from ..distributed import local

    return sum(local(t).numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def _worker(rank: int, init: str, spec: dict, path: str) -> None:
    from ..distributed import replicate, wrap_model
    from ..layerwise import Layerwise
    from ..methods import create_optimizer
    from ..train.allocator import return_freed_memory
    from ..train.models import build_llama, checkpoint_activations
    from .real_memory import _hwm, _rss

    return_freed_memory()
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(0)
        model = build_llama(spec["preset"], vocab_size=32000)
        checkpoint_activations(model)
        ddp = spec["strategy"] == "ddp"
        if spec["layerwise"] and ddp:
            train = replicate(model)
        else:
            train = wrap_model(model, spec["strategy"], blocks=model.model.layers)
        opt = create_optimizer(
            "galore", model, lr=1e-5, rank=spec["rank"], update_proj_gap=200, svd="randomized", diagnostics=False
        )
        if spec["layerwise"]:
            Layerwise(opt, process_group=dist.group.WORLD if ddp else None)
        built = _rss()
        x = torch.randint(0, 32000, (1, 256), generator=torch.Generator().manual_seed(1 + rank))
        grads = 0
        for _ in range(2):
            train(input_ids=x, labels=x).loss.backward()
            grads = max(grads, _bytes(p.grad for p in model.parameters()))
            opt.step()  # layer-wise: nothing is left to step
            opt.zero_grad(set_to_none=True)
        state = _bytes(v for s in opt.state.values() for _, v in flat_items(s) if isinstance(v, torch.Tensor))
        out = {"weights": _bytes(model.parameters()), "grads": grads, "state": state, "built": built, "peak": _hwm()}
        torch.save(out, path.format(rank=rank))
    finally:
        dist.destroy_process_group()


def run(preset: str = "60m") -> str:
    from ..train.config import PRESET_PROJECTION
    from ..train.models import build_llama
    from .formula import formula_bytes

    rank = PRESET_PROJECTION[preset][0]
    meta = build_llama(preset, vocab_size=32000, device="meta")
    weights = sum(p.numel() * p.element_size() for p in meta.parameters())
    state = formula_bytes(meta, "galore", rank, {"update_proj_gap": 200})
    rows = []
    for label, strategy, layerwise in STRATEGIES:
        spec = {"preset": preset, "rank": rank, "strategy": strategy, "layerwise": layerwise}
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "rank{rank}.pt")
            mp.spawn(_worker, args=(f"file://{tmp}/init", spec, path), nprocs=WORLD)
            results = [torch.load(path.format(rank=r), weights_only=True) for r in range(WORLD)]
        grads = 0 if layerwise else weights  # (FSDP2 layer-wise holds the root's and one block's, sharded)
        formula = (weights + grads + state) / GiB
        for r, m in enumerate(results):
            rest = m["peak"] - m["built"] - m["grads"] - m["state"]
            rows.append(
                [
                    f"{label}, rank {r}",
                    m["weights"] / GiB,
                    m["grads"] / GiB,
                    m["state"] / GiB,
                    rest / GiB,
                    m["peak"] / GiB,
                    formula,
                ]
            )
    title = (
        f"Per-rank memory, LLaMA-{preset} (vocabulary 32000, float32, gradient checkpointing), GaLore rank {rank}, "
        f"{WORLD} gloo processes, batch 1 x 256 per rank, 2 steps, GiB; formula = one process's weights + "
        "gradients + counted state"
    )
    header = ["run", "weights", "gradients held", "optimizer state", "rest", "peak RSS", "formula (1 process)"]
    return f"{title}\n\n" + markdown_table(header, rows)
