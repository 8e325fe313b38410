"""Data-parallel training with SubspaceOptimizer: DDP, FSDP2, and subspace updates spread over the ranks.

**DDP.** Gradients are all-reduced, so every rank steps the same weights with the same gradient. With
``SubspaceOptimizer(..., distributed=None)`` (the default, also spelled ``"replicate"``) every rank computes every
subspace update itself, with no communication: ranks agree bit for bit as long as the kernels are deterministic
for identical inputs (the same hardware and library builds), which is also what plain AdamW under DDP relies on.
Random trackers draw from generators seeded by (seed, parameter index, basis number), never the global RNG.

``distributed="shard_updates"`` spreads the updates: at a step where bases move, each one is computed by a single
rank (longest-first greedy by cost, deterministic) and broadcast, so N ranks do about 1/N of the update work, and
every rank holds the *same bits* by construction, whatever the hardware. We broadcast rather than fix SVD signs
canonically: canonical signs do not remove last-bit differences of nondeterministic solvers, which then grow over
training; a broadcast of the k x r bases costs far less than the gradient all-reduce. The first basis of each
weight is computed on every rank (once) and the owner's copy broadcast. Layer-wise stepping
(``gradspace.layerwise``) computes its updates on every rank.

**FSDP2** (``torch.distributed.fsdp.fully_shard``): parameters are DTensors sharded on rows (``Shard(0)``). Every
rank steps its own rows. A weight whose basis is on the right (``G Q``, Q n x r replicated; ``proj_type="std"``
with m >= n, or ``"right"``) is projected, stepped by the inner rule and projected back on the local shard: its
moments are sharded like the weight. The full gradient is gathered (``full_tensor()``) only for the tracker: at
subspace updates, and every step for trackers that read every gradient (subtrack, online_pca, adarank), whose
state is then replicated. A weight whose basis is on the left (``Q^T G`` sums over the sharded rows), or with
recovery scaling (its limiter needs the full residual), gathers its gradient every step and keeps replicated
r x n moments; only the write to the weight is local. ``proj_type="right"`` keeps wide weights sharded too (a
different method: an n x r basis). The inner rule must be elementwise (adamw, lion, sgd): Adafactor's factored
moments and 8-bit Adam's blocks would differ on a shard. Diagnostics' captured energy is the local shard's.

FSDP1 (``use_orig_params=False`` or ``True``) and DeepSpeed ZeRO hand the optimizer flattened 1-D parameters, which
cannot be projected: that is an error, never a silent fall-back to full rank.

    model = wrap_model(model, "fsdp2", blocks=model.layers)      # or "ddp"; then build the optimizer
    opt = create_optimizer("galore", model, rank=128, distributed="shard_updates")

``python -m gradspace.bench distributed`` times the update step of a LLaMA-60M-shaped parameter set on one and
two ranks.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from .rules import RULES, get_rule
from .trackers import get_tracker

MODES = ("replicate", "shard_updates")

try:
    from torch.distributed.tensor import DTensor, Shard
except ImportError:  # pragma: no cover - builds without torch.distributed
    DTensor, Shard = (), None


def check_mode(mode: str | None) -> str | None:
    if mode is not None and mode not in MODES:
        raise ValueError(f"distributed must be None, 'replicate' or 'shard_updates', got {mode!r}")
    if mode == "shard_updates" and not (dist.is_available() and dist.is_initialized()):
        raise ValueError(
            "distributed='shard_updates' needs an initialised process group: call "
            "torch.distributed.init_process_group (torchrun sets its environment) before building the optimizer"
        )
    return None if mode == "replicate" else mode


def is_dtensor(t: torch.Tensor) -> bool:
    return isinstance(t, DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of an FSDP2 DTensor (an alias: in-place changes reach the parameter), else ``t``."""
    return t.to_local() if isinstance(t, DTensor) else t


def flattened_message(label: str, shape: tuple) -> str:
    return (
        f"{label} has shape {shape}, but only 2-D weights can be projected. A 1-D parameter in a group with 'rank' "
        "usually means the model was wrapped by FSDP1 (FullyShardedDataParallel) or DeepSpeed ZeRO, which flatten "
        "parameters: use DDP or FSDP2 (torch.distributed.fsdp.fully_shard, whose DTensor parameters keep their "
        "shape), or move the parameter to a param group without 'rank'"
    )


def check_param(p: torch.Tensor, label: str, rule: str) -> None:
    """Reject DTensor layouts and inner rules the FSDP2 path does not handle, before anything is built."""
    if not isinstance(p, DTensor):
        return
    if p.device_mesh.ndim != 1 or any(not (isinstance(pl, Shard) and pl.dim == 0) for pl in p.placements):
        raise ValueError(
            f"{label} is a DTensor with placements {p.placements} on a {p.device_mesh.ndim}-D mesh; "
            "SubspaceOptimizer supports FSDP2's row sharding (Shard(0) on a 1-D mesh) only"
        )
    if not get_rule(rule).elementwise:
        usable = ", ".join(name for name, r in RULES.items() if r.elementwise)
        raise ValueError(
            f"inner rule {rule!r} does not run on an FSDP2 shard ({label}): its state is not elementwise; "
            f"use one of {usable}, or DDP"
        )


def _rows(p: DTensor) -> slice:
    size, offset = Shard.local_shard_size_and_offset(p.shape[0], p.device_mesh.size(), p.device_mesh.get_local_rank())
    return slice(offset, offset + size)


@dataclass
class ParamView:
    """What one projected weight steps on this rank.

    ``grad`` is what the projection and the inner rule read: the gradient, this rank's rows of it (``local``), or
    the gathered full gradient; ``weight`` is what is written (the parameter or this rank's rows); ``rows`` are
    ``weight``'s rows in the full weight when ``grad`` is full but ``weight`` a shard.
    """

    weight: torch.Tensor
    grad: torch.Tensor
    rows: slice | None = None
    local: bool = False
    _source: torch.Tensor | None = field(default=None, repr=False)
    _full: torch.Tensor | None = field(default=None, repr=False)

    def full_grad(self) -> torch.Tensor:
        """The full gradient (all-gathered once, on first use, for a shard)."""
        if self._source is None:
            return self.grad
        if self._full is None:
            self._full = self._source.full_tensor()
        return self._full


def steps_on_shard(p: torch.Tensor, right: bool, gather: bool) -> bool:
    """Whether an FSDP2 weight is projected and stepped on its local rows alone (basis on the right, and no
    output that reads the full gradient), so that its moments hold only this rank's rows too."""
    return isinstance(p, DTensor) and right and not gather


def param_view(p: torch.Tensor, right: bool, gather: bool = False) -> ParamView:
    """Plain tensors step in place. An FSDP2 weight steps its local rows when its basis is on the right (the
    projection ``G_local Q`` and the write back are row-local); otherwise, or with ``gather``, the projection
    reads the full gradient and only the write is local."""
    if not isinstance(p, DTensor):
        return ParamView(p, p.grad)
    if steps_on_shard(p, right, gather):
        return ParamView(p.to_local(), p.grad.to_local(), local=True, _source=p.grad)
    return ParamView(p.to_local(), p.grad.full_tensor(), rows=_rows(p))


def local_rows(p: torch.Tensor) -> int:
    """How many of the weight's rows this rank holds (all of them for a plain tensor)."""
    if not isinstance(p, DTensor):
        return p.shape[0]
    rows = _rows(p)
    return rows.stop - rows.start


# ------------------------------------------------------------------------------- sharded optimizer state (DCP)
def state_shard_dim(opt, p: torch.Tensor, key: str, shape: tuple[int, ...]) -> int | None:
    """``opt.state_shard_dim(p, key)`` (from the components' ``state_keys``), for ``gradspace.train.sharded``;
    ``shape``, the entry's shape in one process, is checked against it: a sharded dimension has ``p``'s rows."""
    dim = opt.state_shard_dim(p, key)
    if dim is not None and (len(shape) <= dim or shape[dim] != p.shape[0]):
        raise ValueError(
            f"optimizer state {key!r} of shape {tuple(shape)} is declared like the gradient, but its dimension "
            f"{dim} does not have the weight's {p.shape[0]} rows"
        )
    return dim


def _from_local(value: torch.Tensor, shape: list[int], p: DTensor, dim: int) -> DTensor:
    """``value`` as this rank's part, along ``dim``, of a contiguous DTensor of global ``shape`` on ``p``'s mesh."""
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(
        value, p.device_mesh, [Shard(dim)], shape=torch.Size(shape), stride=stride, run_check=False
    )


def as_sharded(value: torch.Tensor, p: DTensor, dim: int) -> torch.Tensor:
    """``value`` (this rank's part along ``dim``, or already a DTensor) as a DTensor on ``p``'s mesh."""
    if isinstance(value, DTensor):
        return value
    shape = list(value.shape)
    shape[dim] = p.shape[0]
    return _from_local(value, shape, p, dim)


def shard_of(value: torch.Tensor, p: DTensor, dim: int) -> DTensor:
    """This rank's part of the whole tensor ``value``, split along ``dim`` as FSDP2 splits ``p``'s rows."""
    mesh = p.device_mesh
    size, offset = Shard.local_shard_size_and_offset(value.shape[dim], mesh.size(), mesh.get_local_rank())
    return _from_local(value.narrow(dim, offset, size).contiguous(), list(value.shape), p, dim)


def empty_sharded(shape: tuple[int, ...], dtype: torch.dtype, p: DTensor, dim: int) -> torch.Tensor:
    """An uninitialised DTensor of global ``shape``, split along ``dim`` over ``p``'s mesh as FSDP2 splits rows
    (``torch.chunk``): the target into which a checkpoint reads this rank's part."""
    mesh = p.device_mesh
    size, _ = Shard.local_shard_size_and_offset(shape[dim], mesh.size(), mesh.get_local_rank())
    local_shape = list(shape)
    local_shape[dim] = size
    value = torch.empty(local_shape, dtype=dtype, device=p.to_local().device)
    return _from_local(value, list(shape), p, dim)


def all_finite(ok: bool, params: Iterable[torch.Tensor]) -> bool:
    """``ok`` on every rank that holds a shard of ``params`` (FSDP2: each rank checked only its own rows, and all
    must skip or raise together); ``ok`` itself when nothing is sharded."""
    mesh = next((p.device_mesh for p in params if isinstance(p, DTensor)), None)
    if mesh is None:
        return ok
    flag = torch.tensor([1.0 if ok else 0.0], device=mesh.device_type)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=mesh.get_group())
    return bool(flag.item() > 0.0)


# ---------------------------------------------------------------------------------------- sharded subspace updates
def owners(costs: list[float], world: int) -> list[int]:
    """Longest-first greedy: each job to the least-loaded rank (ties to the lower rank and earlier job)."""
    load = [0.0] * world
    out = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        r = min(range(world), key=lambda r: (load[r], r))
        out[i] = r
        load[r] += costs[i]
    return out


def broadcast_basis(basis: torch.Tensor, owner: int, group=None) -> torch.Tensor:
    """The owner's basis on every rank (same shape everywhere: used for first bases, whose rank every rank knows)."""
    basis = basis.contiguous()
    dist.broadcast(basis, src=dist.get_global_rank(group, owner) if group is not None else owner, group=group)
    return basis


def shard_updates(opt, work: list, group=None) -> dict[torch.Tensor, torch.Tensor]:
    """The new basis of every weight whose basis moves at this step, each computed by one rank and broadcast.

    Runs before the per-parameter loop so that ranks compute at the same time; the loop then takes these bases
    instead of calling ``tracker.update`` (weights without a basis yet are left to it), and runs the moment policy
    and ``tracker.on_update`` on every rank. ``opt`` is a ``SubspaceOptimizer``, driven through its public
    per-parameter methods (``basis_due``, ``layout``, ``compute_basis``).
    """
    due = []
    for g, p in work:
        if opt.basis_due(p, g):
            due.append((g, p, opt.layout(p, g)[0], get_tracker(g["tracker"])))
    if not due:
        return {}
    world, me = dist.get_world_size(group), dist.get_rank(group)
    who = owners([float(p.shape[0] * p.shape[1] * min(p.shape)) for _, p, _, _ in due], world)
    full = [p.grad.full_tensor() if isinstance(p, DTensor) else p.grad for _, p, _, _ in due]  # collective: all
    new: dict[torch.Tensor, torch.Tensor] = {}
    for (g, p, _, _), owner, grad in zip(due, who, full):
        if owner == me:  # its time counts in this rank's diagnostics only
            new[p] = opt.compute_basis(p, grad, g)
    device = due[0][1].grad.device
    for src in range(world):
        jobs = [(g, p, right, tracker) for (g, p, right, tracker), owner in zip(due, who) if owner == src]
        if not jobs:
            continue
        ranks = torch.tensor([new[p].shape[1] if src == me else 0 for _, p, _, _ in jobs], device=device)
        root = dist.get_global_rank(group, src) if group is not None else src
        dist.broadcast(ranks, src=root, group=group)
        sizes = []
        for (_, p, right, tracker), r in zip(jobs, ranks.tolist()):
            sizes += [p.shape[1 if right else 0] * r] + [1] * len(tracker.update_diagnostics)
        if src == me:
            parts = []
            for _, p, _, tracker in jobs:
                parts.append(new[p].reshape(-1))
                parts += [opt.state[p]["tracker"][k].reshape(1).float() for k in tracker.update_diagnostics]
            flat = torch.cat(parts)
        else:
            flat = torch.empty(sum(sizes), device=device)
        dist.broadcast(flat, src=root, group=group)
        if src == me:
            continue
        chunks = iter(flat.split(sizes))
        for (_, p, _right, tracker), r in zip(jobs, ranks.tolist()):
            own = opt.state[p].setdefault("tracker", {})
            new[p] = next(chunks).view(-1, r).clone()  # its own storage: a view would keep (and save) all
            for key in tracker.update_diagnostics:
                own[key] = next(chunks).reshape(())
    return new


# ---------------------------------------------------------------------------------------------------- wrapping
STRATEGIES = ("none", "ddp", "fsdp2")


def wrap_model(model: nn.Module, strategy: str = "none", *, blocks: Iterable[nn.Module] = (), **kwargs) -> nn.Module:
    """Wrap ``model`` for data-parallel training (the process group must be initialised, e.g. by ``torchrun``).

    ``"ddp"``: ``DistributedDataParallel(model, **kwargs)``. ``"fsdp2"``: ``fully_shard`` each of ``blocks`` (e.g.
    the transformer layers) and then the root; the parameters become DTensors in place. Build the optimizer
    after this call, on the returned model's parameters.
    """
    if strategy == "none":
        return model
    if strategy == "ddp":
        return nn.parallel.DistributedDataParallel(model, **kwargs)
    if strategy == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for block in blocks:
            fully_shard(block, **kwargs)
        fully_shard(model, **kwargs)
        return model
    raise ValueError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")


@torch.no_grad()
def replicate(model: nn.Module, group=None) -> nn.Module:
    """Rank 0's parameters and buffers on every rank (what DDP's constructor does), for layer-wise data
    parallelism, which steps an unwrapped model (``Layerwise(opt, process_group=...)``)."""
    for t in model.state_dict().values():
        dist.broadcast(t, src=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
    return model


def init_from_env(device: str = "cpu") -> tuple[int, int, torch.device]:
    """``(rank, world size, device)`` of this process under ``torchrun``, which sets RANK, WORLD_SIZE and LOCAL_RANK.

    With WORLD_SIZE > 1 it initialises the default process group (nccl on CUDA, gloo otherwise) and gives each
    rank its own GPU, ``cuda:LOCAL_RANK``, so that ``--device cuda`` means the same thing on every rank.
    """
    import os

    world = int(os.environ.get("WORLD_SIZE", "1"))
    dev = torch.device(device)
    if world <= 1:
        return 0, 1, dev
    if dev.type == "cuda":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", device_id=dev if dev.type == "cuda" else None)
    return dist.get_rank(), dist.get_world_size(), dev
