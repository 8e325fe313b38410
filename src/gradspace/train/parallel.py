"""A run's place in a ``torchrun`` job (``Parallel``), each rank's share of the data (``RankStream``), and
checkpoints that DDP, FSDP2 and single-process runs write and read (FSDP2: one optimizer shard per rank)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .config import UsageError


class Parallel:
    """This process's place in a ``torchrun`` job. Without one (WORLD_SIZE unset or 1) it is a single process and
    every method is a no-op, so the training code has one path."""

    def __init__(self, fsdp: bool = False, shard_updates: bool = False, device: str = "cpu"):
        from ..distributed import init_from_env

        if (fsdp or shard_updates) and int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            flag = "--fsdp" if fsdp else "--shard-updates"
            raise UsageError(f"{flag} needs several processes: start the run with torchrun --nproc_per_node N")
        self.rank, self.world, self.device = init_from_env(device)
        self.strategy = "none" if self.world == 1 else "fsdp2" if fsdp else "ddp"
        self.distributed = "shard_updates" if shard_updates else None
        self.main = self.rank == 0

    def wrap(self, model, blocks, layerwise: bool = False) -> tuple[Any, Any]:
        """``(model to train, module whose parameters the optimizer gets)``. Under DDP that is ``model.module``,
        with the single-process parameter names, so target modules match and checkpoints are interchangeable.
        Layer-wise data parallelism trains the model unwrapped, started from rank 0's weights (its gradients are
        averaged by ``Layerwise``)."""
        from ..distributed import replicate, wrap_model

        if layerwise and self.strategy == "ddp":
            return replicate(model), model
        wrapped = wrap_model(model, self.strategy, blocks=blocks)
        return wrapped, model

    @property
    def group(self):
        """The process group of the job (None in one process)."""
        if self.world == 1:
            return None
        import torch.distributed as dist

        return dist.group.WORLD

    def _reduce(self, value: float, op) -> float:
        import torch
        import torch.distributed as dist

        if self.world == 1:
            return value
        t = torch.tensor([float(value)], device=self.device)
        dist.all_reduce(t, op=op)
        return float(t.item())

    def all_ok(self, ok: bool) -> bool:
        import torch.distributed as dist

        return self._reduce(1.0 if ok else 0.0, dist.ReduceOp.MIN) > 0.0

    def any(self, flag: bool) -> bool:
        import torch.distributed as dist

        return self._reduce(1.0 if flag else 0.0, dist.ReduceOp.MAX) > 0.0

    def mean(self, value: float) -> float:
        import torch.distributed as dist

        return self._reduce(value, dist.ReduceOp.SUM) / self.world

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def agree(self, error: BaseException | None) -> None:
        """Raise ``error`` here, or exit 2 quietly when another rank failed (it prints the one-line message); an
        error on one rank must not leave the others waiting in a collective."""
        if not self.all_ok(error is None):
            if error is not None:
                raise error
            raise SystemExit(2)

    def first(self, fn):
        """``fn()`` on rank 0, then on the others: caches (tokenised corpus, downloaded model) are filled once."""
        if self.world == 1:
            return fn()
        out, error = None, None
        if self.main:
            try:
                out = fn()
            except (UsageError, ValueError, OSError, RuntimeError) as err:
                error = err
        self.agree(error)
        return out if self.main else fn()

    def shard(self, stream) -> Any:
        return stream if self.world == 1 else RankStream(stream, self.rank, self.world)

    def close(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.destroy_process_group()


class RankStream:
    """Rank ``rank``'s part of a stream: of every ``world`` consecutive batches, the ``rank``-th. All ranks advance
    the same seeded stream, so the data position is the stream's own state (saved once, resumable), and ranks
    with batch B see together what one process with batch ``world * B`` sees."""

    def __init__(self, stream, rank: int, world: int):
        self.stream, self.rank, self.world = stream, rank, world

    def __iter__(self):
        return self

    def __next__(self):
        batches = [next(self.stream) for _ in range(self.world)]
        return batches[self.rank]

    def state_dict(self) -> dict[str, Any]:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stream.load_state_dict(state)


def save_parallel(
    folder: Path, step: int, parallel: Parallel, *, model, inner, optimizer, scheduler, stream, config: dict[str, Any]
) -> Path:
    """Rank 0 writes ``ckpt-<step>.pt`` with the unwrapped model's full state dict, so one process can resume a
    torchrun run and the other way round. DDP's optimizer state is the same on every rank: rank 0's is saved.
    FSDP2's is per rank: each other rank writes ``ckpt-<step>.rank<r>.pt`` first, and rank 0 writes its main file
    only after a barrier, so a main file that exists is a complete checkpoint."""
    from . import checkpoint as ck

    state = None
    if parallel.strategy == "fsdp2":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        part = _local_optimizer_state(optimizer)
        if not parallel.main:
            ck.save_shard(folder, step, parallel.rank, {"step": step, **part})
        parallel.barrier()
    else:
        part = {"optimizer": optimizer.state_dict()}
    if parallel.main:
        ck.save_checkpoint(
            folder,
            step,
            model=inner,
            optimizer=None,
            scheduler=scheduler,
            stream=stream,
            config=config,
            model_state=state,
            extra={**part, "world_size": parallel.world, "strategy": parallel.strategy},
        )
    parallel.barrier()
    return ck.checkpoint_path(folder, step)


def _local_optimizer_state(optimizer) -> dict[str, Any]:
    """FSDP2: the optimizer state with its DTensors (moments of unprojected weights) as this rank's local tensors,
    which load with ``weights_only=True`` and without a device mesh; ``dtensor_keys`` says where to re-wrap them."""
    from ..distributed import is_dtensor

    sd = optimizer.state_dict()
    keys = [[i, k] for i, s in sd["state"].items() for k, v in s.items() if is_dtensor(v)]
    sd["state"] = {i: {k: v.to_local() if is_dtensor(v) else v for k, v in s.items()} for i, s in sd["state"].items()}
    return {"optimizer": sd, "dtensor_keys": keys}


def load_parallel(resume: dict, parallel: Parallel, model, inner, optimizer) -> None:
    """The model and optimizer state of ``resume``. FSDP2 checkpoints need the same strategy and world size (each
    rank's optimizer state fits its own shard); DDP and single-process checkpoints load into each other."""
    from . import checkpoint as ck

    saved_world, saved = int(resume.get("world_size", 1)), resume.get("strategy", "none")
    if (saved == "fsdp2" or parallel.strategy == "fsdp2") and (saved, saved_world) != (
        parallel.strategy,
        parallel.world,
    ):
        how = (
            f"with torchrun --nproc_per_node {saved_world} ... --fsdp"
            if saved == "fsdp2"
            else "without --fsdp (with DDP or in one process)"
        )
        raise ck.CheckpointError(
            f"checkpoint {resume.get('path', '')} was written by {saved_world} process(es) "
            f"with {saved}; resume it {how}"
        )
    if parallel.strategy == "fsdp2":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
        from torch.distributed.tensor import DTensor

        set_model_state_dict(model, resume["model"], options=StateDictOptions(full_state_dict=True))
        part = resume if parallel.main else ck.load_shard(Path(resume["path"]), parallel.rank)
        sd = part["optimizer"]
        params = [p for g in optimizer.param_groups for p in g["params"]]  # state_dict's numbering
        for index, key in part.get("dtensor_keys", []):
            p, state = params[index], sd["state"][index]
            state[key] = DTensor.from_local(
                state[key].to(p.device), p.device_mesh, p.placements, shape=p.shape, stride=p.stride()
            )
        optimizer.load_state_dict(sd)
    else:
        inner.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
