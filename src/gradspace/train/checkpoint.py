"""Training checkpoints: written atomically, read back with ``torch.load(weights_only=True)``.

A checkpoint holds everything a run needs to continue bit-exactly: model, optimizer, scheduler and data-stream
states, the step, the RNG states (torch CPU, CUDA when present, Python's ``random``) and the run config.

    save_checkpoint(run_dir / "checkpoints", step, model=..., optimizer=..., scheduler=..., stream=..., config=...)
    ckpt = load_checkpoint(find_checkpoint(run_dir))
"""

from __future__ import annotations

import os
import random
import re
import sys
from pathlib import Path
from typing import Any

import torch

from .atomic import alive, write_failed
from .errors import CheckpointError

#: the layout of what this gradspace writes and reads, and no other (3: each parameter's optimizer state nested by
#: owner, ``gradspace.components``; 2: FSDP2 shards only in ``ckpt-<step>.dcp/``, the data position that of the
#: global batch; 1 and before were development layouts that were never released)
FORMAT = 3
NAME = re.compile(r"^ckpt-(\d+)\.pt$")


class OtherFormat(CheckpointError):
    """A gradspace checkpoint of another :data:`FORMAT`: never read as this one's, nor passed over for an older."""


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    version, internal, gauss = random.getstate()
    state["python"] = [version, list(internal), gauss]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "python" in state:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))


def checkpoint_path(folder: Path, step: int) -> Path:
    return Path(folder) / f"ckpt-{step:07d}.pt"


def save_checkpoint(
    folder: str | Path,
    step: int,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    scheduler: Any = None,
    stream: Any = None,
    config: dict[str, Any] | None = None,
    keep: int = 2,
    model_state: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``ckpt-<step>.pt`` in ``folder`` (temp file in the same folder, then ``os.replace``), keeping the
    newest ``keep`` checkpoints (0: all; the older ones go with their FSDP2 folders). Returns the path.

    ``model_state`` replaces ``model.state_dict()`` (e.g. the full state gathered from FSDP2 shards); ``extra``
    adds or replaces fields (e.g. how many processes wrote it; ``optimizer=None`` with ``extra["optimizer"]``)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": FORMAT,
        "step": int(step),
        "model": model.state_dict() if model_state is None else model_state,
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "stream": stream.state_dict() if stream is not None else None,
        "rng": rng_state(),
        "config": dict(config or {}),
        **(extra or {}),
    }
    path = checkpoint_path(folder, step)
    _atomic_save(payload, path)
    if keep:
        for old in list_checkpoints(folder)[:-keep]:
            remove_checkpoint(old)
    return path


def remove_checkpoint(path: Path) -> None:
    """Delete a checkpoint with its FSDP2 folder; the main file first, so what is left is never taken for a
    checkpoint."""
    import shutil

    path.unlink(missing_ok=True)
    shutil.rmtree(path.with_suffix(".dcp"), ignore_errors=True)


def _atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temp file next to ``path``, then ``os.replace``: readers never see half a file."""
    tmp = path.parent / f".{path.name}.{os.getpid()}.tmp"
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:  # a full disk is "unexpected pos" from torch's zip writer
        raise write_failed(err, path, "checkpoint") from None
    finally:
        if tmp.exists():
            tmp.unlink()


def list_checkpoints(folder: str | Path) -> list[Path]:
    """Checkpoints in ``folder``, oldest step first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def remove_orphans(folder: str | Path) -> list[Path]:
    """Delete ``.*.tmp`` files that a killed save left behind (a file whose writer, the pid in its name, is still
    alive is kept), and FSDP2 folders that a killed save left: ``.ckpt-<step>.dcp.tmp`` (being written), or
    ``ckpt-<step>.dcp`` whose main file was never written."""
    import shutil

    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for part in [*folder.glob("ckpt-*.dcp"), *folder.glob(".ckpt-*.dcp.tmp")]:
        if part.is_dir() and (part.name.endswith(".tmp") or not part.with_suffix(".pt").exists()):
            shutil.rmtree(part, ignore_errors=True)
            removed.append(part)
    for tmp in folder.glob(".*.tmp"):
        pid = next((int(x) for x in reversed(tmp.name.split(".")) if x.isdigit()), 0)
        if pid and pid != os.getpid() and alive(pid):
            continue
        tmp.unlink(missing_ok=True)
        removed.append(tmp)
    return removed


def load_newest_good(path: str | Path) -> dict[str, Any]:
    """``load_checkpoint`` of ``find_checkpoint(path)`` (with its ``path``); for a run folder, a corrupt newest
    checkpoint falls back to the previous one with a warning (a file named explicitly must load). ``skipped``
    lists the newer checkpoints that did not load (a resume in place sets them aside: see ``runfolder.prepare``)."""
    path = Path(path).expanduser()
    chosen = find_checkpoint(path)
    if path.is_file():
        return {**load_checkpoint(chosen), "path": str(chosen)}
    errors, skipped = [], []
    for candidate in list_checkpoints(chosen.parent)[::-1]:
        try:
            ckpt = load_checkpoint(candidate)
        except OtherFormat:
            raise
        except CheckpointError as err:
            errors.append(str(err))
            skipped.append(str(candidate))
            continue
        for message in errors:
            print(f"gradspace: warning: {message}; resuming from {candidate.name} instead", file=sys.stderr)
        return {**ckpt, "path": str(candidate), "skipped": skipped}
    raise CheckpointError(errors[0] if len(errors) == 1 else f"no readable checkpoint in {chosen.parent}: {errors[0]}")


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint file as given, or the newest one of a run folder (or of its ``checkpoints`` subfolder)."""
    path = Path(path).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        for folder in (path / "checkpoints", path):
            found = list_checkpoints(folder)
            if found:
                return found[-1]
        raise CheckpointError(f"no checkpoint (ckpt-*.pt) in {path} or {path / 'checkpoints'}")
    raise CheckpointError(f"{path} does not exist: give a run folder or a checkpoint file (ckpt-*.pt)")


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True``; unreadable or incomplete files raise :class:`CheckpointError`."""
    path = Path(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        reason = reason.split(". ")[0].rstrip(".")[:160]
        raise CheckpointError(
            f"checkpoint {path} is corrupt, truncated or not a gradspace checkpoint ({reason})"
        ) from None
    needed = ("format", "step", "model", "optimizer", "rng", "config")
    if isinstance(ckpt, dict) and "format" in ckpt:
        check_format(ckpt, path)  # before the fields: another format may have others
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in needed):
        raise CheckpointError(f"checkpoint {path} is not a gradspace training checkpoint (missing fields)")
    return ckpt


def check_format(ckpt: dict[str, Any], path: str | Path) -> None:
    """A checkpoint of another :data:`FORMAT` is one line saying what wrote it and what to do: reading it as this
    format would resume from the wrong state."""
    found = ckpt.get("format")
    if found == FORMAT:
        return
    newer = isinstance(found, int) and not isinstance(found, bool) and found > FORMAT
    writer = "a newer gradspace" if newer else "an unreleased development version of gradspace"
    todo = "upgrade gradspace to resume it" if newer else "it cannot be resumed: start the run again"
    raise OtherFormat(
        f"checkpoint {path} has format {found!r}, written by {writer} (this one reads format {FORMAT}): {todo}"
    )
