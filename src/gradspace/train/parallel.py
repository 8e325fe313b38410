"""A run's place in a ``torchrun`` job (``Parallel``), each rank's share of the data (``RankStream``), and
checkpoints that DDP, FSDP2 and single-process runs write and read (FSDP2: one optimizer shard per rank)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .errors import CheckpointError, UsageError


class Parallel:
    """This process's place in a ``torchrun`` job. Without one (WORLD_SIZE unset or 1) it is a single process and
    every method is a no-op, so the training code has one path."""

    tore_down = False  # set by ``close`` in a torchrun worker (see ``exit_torn_down``)

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

    def total(self, value: float) -> float:
        """The sum of ``value`` over the ranks (collective)."""
        import torch.distributed as dist

        return self._reduce(value, dist.ReduceOp.SUM)

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

    def rows(self, batch):
        """This rank's rows of a global batch."""
        return batch if self.world == 1 else rank_rows(batch, self.rank, self.world)

    def close(self) -> None:
        """Tear the process group down while the interpreter is whole: reference cycles (FSDP2's modules, unwaited
        collectives) are collected first, so no gloo worker thread frees a tensor during interpreter shutdown."""
        if self.world > 1:
            import gc

            import torch.distributed as dist

            gc.collect()
            dist.destroy_process_group()
            Parallel.tore_down = True


def exit_torn_down(code) -> None:
    """End a ``torchrun`` worker whose process group was torn down without running interpreter shutdown: a gloo
    worker thread that drops the last reference to a tensor then needs the GIL, and at shutdown that aborts the
    process ("terminate called without an active exception", exit -6) after every file was written. Everything the
    run writes is closed by now; only the standard streams need flushing. A no-op in a single process."""
    if not Parallel.tore_down:
        return
    import contextlib
    import sys

    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed or broken pipe: nothing more can be said
            stream.flush()
    os._exit(code if isinstance(code, int) else 0 if code is None else 1)


def rank_rows(batch, rank: int, world: int):
    """Rank ``rank``'s rows ``[r B, (r + 1) B)`` of a batch of ``world * B`` rows (a tensor, a tuple or list of
    them, or a dict of model inputs)."""
    if isinstance(batch, dict):
        return {k: rank_rows(v, rank, world) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(rank_rows(v, rank, world) for v in batch)
    size = batch.shape[0] // world
    return batch[rank * size : (rank + 1) * size]


class RankStream:
    """Rank ``rank``'s rows of each global batch. The stream itself draws batches of ``world * B`` (what one
    process with batch ``world * B`` sees) and rank r takes rows ``[r B, (r + 1) B)``, so the data position is the
    stream's own state, the same whatever the number of processes: a run resumes on another number of processes
    with the same global batch and sees the batches it would have seen."""

    def __init__(self, stream, rank: int, world: int):
        self.stream, self.rank, self.world = stream, rank, world

    def __iter__(self):
        return self

    def __next__(self):
        return rank_rows(next(self.stream), self.rank, self.world)

    def state_dict(self) -> dict[str, Any]:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stream.load_state_dict(state)


def stream_state(resume: dict[str, Any]) -> dict[str, Any]:
    """The data position of a checkpoint: its stream's state, that of the global batch (see :class:`RankStream`)
    whatever number of processes wrote it."""
    return resume["stream"]


def resumed_batch_size(saved: dict[str, Any], saved_world: int, world: int, path: Path) -> int:
    """The per-process batch size that keeps a checkpoint's global batch (batch size x processes) on ``world``
    processes; a global batch that ``world`` processes cannot split evenly is an error saying what can."""
    total = int(saved["batch_size"]) * saved_world
    if total % world:
        fits = ", ".join(str(n) for n in range(1, total + 1) if total % n == 0)
        raise CheckpointError(
            f"checkpoint {path} was written by {saved_world} process(es) with batch size {saved['batch_size']} "
            f"each (global batch {total}), which {world} processes cannot split evenly: resume it with a number "
            f"of processes that divides {total} ({fits})"
        )
    return total // world


def save_parallel(
    folder: Path, step: int, parallel: Parallel, *, model, inner, optimizer, scheduler, stream, config: dict[str, Any]
) -> Path:
    """Rank 0 writes ``ckpt-<step>.pt``. DDP and one process: with the unwrapped model's full state dict and the
    optimizer state (the same on every DDP rank), so one process can resume a torchrun run and the other way
    round. FSDP2: every rank first writes its shards into ``ckpt-<step>.dcp/`` (``gradspace.train.sharded``), and
    rank 0 writes the main file, the rest of the state, only after them, so a main file that exists is a
    complete checkpoint."""
    from . import checkpoint as ck
    from . import sharded

    extra: dict[str, Any] = {"world_size": parallel.world, "strategy": parallel.strategy}
    if parallel.strategy == "fsdp2":
        main_file = ck.checkpoint_path(folder, step)
        dcp_folder = sharded.dcp_path(main_file)
        tmp = dcp_folder.with_name(f".{dcp_folder.name}.tmp")  # renamed into place once complete
        if parallel.main:
            sharded.remove(tmp)  # left by a save that did not finish
        parallel.barrier()
        rest = sharded.save(tmp, model, optimizer)
        if parallel.main:  # an older checkpoint of this step (a rerun from an earlier one) goes, main file first
            main_file.unlink(missing_ok=True)
            sharded.remove(dcp_folder)
            tmp.rename(dcp_folder)
        extra.update(model=None, optimizer=rest, dcp=dcp_folder.name)
    else:
        extra["optimizer"] = optimizer.state_dict()
    if parallel.main:
        ck.save_checkpoint(
            folder,
            step,
            model=inner,
            optimizer=None,
            scheduler=scheduler,
            stream=stream,
            config=config,
            model_state={} if parallel.strategy == "fsdp2" else None,
            extra=extra,
        )
    parallel.barrier()
    return ck.checkpoint_path(folder, step)


def load_parallel(resume: dict, parallel: Parallel, model, inner, optimizer) -> None:
    """The model and optimizer state of ``resume``, whatever layout wrote it and whatever this run's is: an FSDP2
    checkpoint (``dcp``) is read by DCP into FSDP2 shards on any number of processes, or whole into DDP ranks or
    one process; a DDP or one-process checkpoint loads into each other (its full state is on every rank)."""
    from . import sharded

    path = Path(resume.get("path", ""))
    if resume.get("dcp"):
        target = model if parallel.strategy == "fsdp2" else inner
        sharded.load(path.parent / resume["dcp"], resume["optimizer"], target, optimizer, parallel.strategy == "fsdp2")
        return
    if parallel.strategy == "fsdp2":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(model, resume["model"], options=StateDictOptions(full_state_dict=True))
        optimizer.load_state_dict(sharded.shard_full_state(optimizer, resume["optimizer"]))
        return
    inner.load_state_dict(resume["model"])
    optimizer.load_state_dict(resume["optimizer"])
