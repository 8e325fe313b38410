"""FSDP2 checkpoints through ``torch.distributed.checkpoint`` (DCP), readable by any number of processes.

Every rank writes its own rows of the model and of the optimizer state into ``ckpt-<step>.dcp/`` (no rank ever
holds the full state); rank 0 then writes ``ckpt-<step>.pt``, the file ``find_checkpoint`` picks, with the rest
(step, scheduler, data position, RNG, config, the optimizer's non-tensor state). A run resumes from it with FSDP2
on any number of processes, with DDP, or in one process: DCP reads each tensor into whatever layout the resuming
run holds it in.

Which optimizer tensors are sharded is the optimizer's layout, not a property of the file: the moments of an
unprojected weight are sharded like the weight (rows), those of a weight projected on the local shard
(``gradspace.distributed``) along the weight's rows too (their last dimension, ``r x rows`` in the oriented
frame), and everything else (bases, tracker state, moments of gathered weights) is the same on every rank and
stored once. ``state_shard_dim`` says which, at save and at load, for the run at hand.

DCP's ``.metadata`` file is a pickle; it is read with an unpickler that accepts DCP's own metadata classes only,
and the tensor data with ``torch.load(weights_only=True)``, so a checkpoint cannot run code when it is loaded.
"""

from __future__ import annotations

import pickle
import shutil
import warnings
from contextlib import contextmanager
from copy import deepcopy
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError

OPTIMIZER_KEY = "optimizer"
MODEL_KEY = "model"


def dcp_path(checkpoint: Path) -> Path:
    """The DCP folder that goes with ``ckpt-<step>.pt``."""
    return Path(checkpoint).with_suffix(".dcp")


# ------------------------------------------------------------------------------------------------ reading safely
class _MetadataUnpickler(pickle.Unpickler):
    """Only the classes a DCP ``.metadata`` file is made of, each named exactly (no dotted names: a pickle could
    otherwise reach ``os.system`` through a module attribute)."""

    ALLOWED = {
        ("torch.distributed.checkpoint.metadata", name)
        for name in (
            "Metadata",
            "TensorStorageMetadata",
            "TensorProperties",
            "ChunkStorageMetadata",
            "BytesStorageMetadata",
            "MetadataIndex",
            "StorageMeta",
            "_MEM_FORMAT_ENCODING",
        )
    }
    ALLOWED |= {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size")}
    ALLOWED |= {("torch.serialization", "_get_layout"), ("collections", "OrderedDict")}
    ALLOWED |= {("pathlib", name) for name in ("Path", "PosixPath", "WindowsPath", "PurePosixPath")}

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and "." not in name:
            found = getattr(torch, name, None)
            if isinstance(found, (torch.dtype, torch.memory_format)):
                return found
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a checkpoint's metadata")


def _reader(folder: Path):
    from torch.distributed.checkpoint import FileSystemReader

    class SafeReader(FileSystemReader):
        """DCP's file reader, with the metadata read by an unpickler that cannot run code."""

        def read_metadata(self, *args: Any, **kwargs: Any):
            from torch.distributed.checkpoint.metadata import StorageMeta

            path = self._get_metadata_path(kwargs.get("rank"))
            with self.fs.create_stream(path, "rb") as f:
                metadata = _MetadataUnpickler(f).load()
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(folder)


def read_metadata(folder: Path):
    """DCP's metadata of ``folder`` (global shape and dtype of every saved tensor); a missing or unreadable folder
    is a :class:`CheckpointError`."""
    folder = Path(folder)
    if not (folder / ".metadata").is_file():
        raise CheckpointError(f"checkpoint folder {folder} is missing or incomplete (no .metadata)")
    try:
        return _reader(folder).read_metadata()
    except Exception as err:
        raise CheckpointError(f"checkpoint folder {folder} is corrupt ({type(err).__name__}: {err})") from None


def _tensor_sizes(folder: Path) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """``{flat key: (global shape, dtype)}`` of the saved tensors (DCP's keys: ``optimizer.3.rule.exp_avg``,
    ``model.<name>``)."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    meta = read_metadata(folder).state_dict_metadata
    return {k: (tuple(v.size), v.properties.dtype) for k, v in meta.items() if isinstance(v, TensorStorageMetadata)}


# ------------------------------------------------------------------------------------------------------- saving
def split_optimizer_state(optimizer) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(tensors, rest)`` of ``optimizer.state_dict()``: the state's tensors, as DTensors where this rank holds
    only part of one (``state_shard_dim``), and the state dict with those entries left out."""
    from ..components import flat_items, set_flat
    from ..distributed import as_sharded, state_shard_dim

    sd = optimizer.state_dict()
    params = [p for g in optimizer.param_groups for p in g["params"]]  # state_dict's numbering
    tensors: dict[str, Any] = {}
    rest = {**sd, "state": {}}
    for index, state in sd["state"].items():
        p = params[index] if isinstance(index, int) and index < len(params) else None
        kept: dict[str, Any] = {}
        for key, value in flat_items(state):
            if not isinstance(value, torch.Tensor):
                set_flat(kept, key, value)
                continue
            dim = None if p is None else state_shard_dim(optimizer, p, key, _global_shape(value, p))
            tensors[f"{index}.{key}"] = as_sharded(value, p, dim) if dim is not None else value
        rest["state"][index] = kept
    return tensors, rest


def _global_shape(value: torch.Tensor, p: torch.Tensor) -> tuple[int, ...]:
    """The shape a state tensor has in one process: a DTensor's global shape; a local ``r x rows`` moment of a
    sharded weight has the weight's rows as its last dimension."""
    from ..distributed import is_dtensor, local_rows

    if is_dtensor(value):
        return tuple(value.shape)
    if is_dtensor(p) and value.dim() == 2 and value.shape[-1] == local_rows(p):
        return (value.shape[0], p.shape[0])
    return tuple(value.shape)


def save(folder: Path, model, optimizer) -> dict[str, Any]:
    """Write this rank's part of the model and optimizer state into ``folder`` (collective: every rank calls it);
    returns the optimizer's non-tensor state, for the main checkpoint file."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    tensors, rest = split_optimizer_state(optimizer)
    with _one_process_quiet():
        state = {MODEL_KEY: get_model_state_dict(model), OPTIMIZER_KEY: tensors}
        dcp.save(state, checkpoint_id=str(folder), no_dist=_one_process())
    return rest


def _one_process() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized())


@contextmanager
def _one_process_quiet():
    """Without DCP's warning that, with no process group, it assumes one process (which is what we mean)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield


def remove(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)


# ------------------------------------------------------------------------------------------------------ loading
def load(folder: Path, rest: dict[str, Any], model, optimizer, fsdp: bool) -> None:
    """Read a DCP checkpoint into ``model`` and ``optimizer``, in this run's layout (collective under torchrun).

    ``fsdp``: ``model`` is FSDP2-sharded (its state dict holds DTensors); else it is the plain module, whole on
    every rank. ``rest`` is the optimizer state without its tensors, as :func:`save` returned it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict

    from ..components import set_flat
    from ..distributed import empty_sharded, state_shard_dim

    sizes = _tensor_sizes(folder)
    model_sd = get_model_state_dict(model) if fsdp else model.state_dict()
    missing = [k for k in model_sd if f"{MODEL_KEY}.{k}" not in sizes]
    if missing:
        raise CheckpointError(f"checkpoint {folder} has no {missing[0]!r}: it was saved for a different model")
    params = [p for g in optimizer.param_groups for p in g["params"]]
    prefix = f"{OPTIMIZER_KEY}."
    targets: dict[str, torch.Tensor] = {}
    dims: dict[str, int | None] = {}
    for flat, (shape, dtype) in sizes.items():
        if not flat.startswith(prefix):
            continue
        name = flat[len(prefix) :]
        index, _, key = name.partition(".")
        if not index.isdigit() or int(index) >= len(params):
            raise CheckpointError(f"checkpoint {folder} has optimizer state for a parameter this model lacks")
        p = params[int(index)]
        dims[name] = state_shard_dim(optimizer, p, key, shape) if fsdp else None
        if dims[name] is None:
            targets[name] = torch.empty(shape, dtype=dtype, device=p.device)
        else:
            targets[name] = empty_sharded(shape, dtype, p, dims[name])
    _read({MODEL_KEY: model_sd, OPTIMIZER_KEY: targets}, folder)
    if fsdp:
        set_model_state_dict(model, model_sd, options=StateDictOptions(strict=True))
    else:
        model.load_state_dict(model_sd)
    sd = {**rest, "state": {int(i): deepcopy(s) for i, s in rest["state"].items()}}
    for name, value in targets.items():
        index, _, key = name.partition(".")
        # the optimizer keeps an unprojected weight's moments as DTensors like the weight, and the moments of a
        # weight stepped on its rows as plain local tensors
        set_flat(sd["state"].setdefault(int(index), {}), key, value.to_local() if dims[name] == 1 else value)
    optimizer.load_state_dict(sd)


def shard_full_state(optimizer, sd: dict[str, Any]) -> dict[str, Any]:
    """A one-process (or DDP) optimizer state dict cut to this FSDP2 rank's part (``state_shard_dim``)."""
    from ..components import flat_items, set_flat
    from ..distributed import shard_of, state_shard_dim

    params = [p for g in optimizer.param_groups for p in g["params"]]
    out = {**sd, "state": {}}
    for index, state in sd["state"].items():
        p = params[index]
        out["state"][index] = kept = {}
        for key, value in flat_items(state):
            dim = state_shard_dim(optimizer, p, key, tuple(value.shape)) if isinstance(value, torch.Tensor) else None
            if dim is None:
                set_flat(kept, key, value)
                continue
            part = shard_of(value.to(p.device), p, dim)
            set_flat(kept, key, part.to_local() if dim == 1 else part)  # as the optimizer keeps it (see load)
    return out


def full_state(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The whole model state of an FSDP2 checkpoint (``ckpt-<step>.pt``), read in one process (no process group):
    e.g. to compare runs or to export the weights."""
    folder = dcp_path(checkpoint)
    sizes = _tensor_sizes(folder)
    prefix = f"{MODEL_KEY}."
    model = {k[len(prefix) :]: torch.empty(s, dtype=d) for k, (s, d) in sizes.items() if k.startswith(prefix)}
    _read({MODEL_KEY: model}, folder)
    return model


def _read(state: dict[str, Any], folder: Path) -> None:
    """``dcp.load`` into ``state``, in place, with the safe reader."""
    import torch.distributed.checkpoint as dcp

    with _one_process_quiet():
        dcp.load(state, storage_reader=_reader(Path(folder)), no_dist=_one_process())
