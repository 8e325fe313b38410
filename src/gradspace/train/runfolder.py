"""A run folder is never lost: a new run into a folder that holds one is refused unless asked to overwrite, and
two processes never write one folder at once (a lock file holding the writer's pid)."""

from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path
from typing import Any

from .config import Command, UsageError

#: what a run writes into its folder (a compare also writes report.md, metrics.json and plots)
RUN_ARTEFACTS = ("config.json", "metrics.jsonl", "summary.json", "checkpoints", "tensorboard")
COMPARE_ARTEFACTS = ("report.md", "metrics.json")
LOCK = ".gradspace.lock"


def holds_run(folder: Path) -> bool:
    return any((folder / name).exists() for name in RUN_ARTEFACTS)


def holds_compare(folder: Path) -> bool:
    if any((folder / name).exists() for name in COMPARE_ARTEFACTS):
        return True
    return folder.is_dir() and any(holds_run(sub) for sub in folder.iterdir() if sub.is_dir())


def refuse_existing(folder: Path, command: str, overwrite: bool) -> None:
    """Exit 2 (nothing touched) when ``folder`` already holds a run and ``overwrite`` was not asked for (a
    comparison's folder is checked by ``compare.check_manifest``: a rerun continues it)."""
    if holds_run(folder) and not overwrite:
        raise UsageError(
            f"{folder} already holds a run: resume it with `gradspace {command} --resume {folder}`, choose another "
            "--out, or pass --overwrite to replace it"
        )


def clear(folder: Path) -> None:
    """Remove what an earlier run wrote (only gradspace's own files: anything else in the folder stays)."""
    for name in (*RUN_ARTEFACTS, *COMPARE_ARTEFACTS):
        path = folder / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


class RunLock:
    """``folder/.gradspace.lock`` while a process writes the folder. A lock whose process is gone (a killed run) is
    taken over; a live one is an error naming its pid."""

    def __init__(self, folder: Path):
        self.path = Path(folder) / LOCK
        self.held = False

    def __enter__(self) -> RunLock:
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    pid = int(self.path.read_text().strip() or 0)
                except (OSError, ValueError):
                    pid = 0
                if pid and pid != os.getpid() and _alive(pid):
                    raise UsageError(
                        f"another gradspace process (pid {pid}) is writing {self.path.parent}; wait for it to end, "
                        f"or choose another --out (if no such run exists, delete {self.path})"
                    ) from None
                self.path.unlink(missing_ok=True)  # stale: its process is gone
                continue
            with os.fdopen(fd, "w") as f:
                f.write(str(os.getpid()))
            self.held = True
            return self
        raise UsageError(f"could not take the lock {self.path}; delete it if no run is writing the folder")

    def __exit__(self, *exc) -> bool:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False
        return False


def resolve_run(args: argparse.Namespace, command: Command, name) -> tuple[dict[str, Any], Path, dict | None]:
    """``(config, run folder, checkpoint or None)`` from the flags, the config file and ``--resume``."""
    from . import checkpoint as ck
    from .config import FINETUNE, explicit_options
    from .parallel import resumed_batch_size

    defaults = command.defaults
    explicit = explicit_options(args, defaults)
    if not args.resume:
        cfg = {**defaults, **explicit}
        stamp = time.strftime("%Y%m%d-%H%M%S")
        return cfg, Path(args.out) if args.out else Path("runs") / f"{name(cfg)}-{stamp}", None
    resume = ck.load_newest_good(args.resume)
    path = Path(resume["path"])
    saved = resume["config"]
    if ("task" in saved) != (command is FINETUNE):
        other = "finetune" if "task" in saved else "pretrain"
        raise ck.CheckpointError(f"checkpoint {path} is from `gradspace {other}`; resume it with that command")
    world, saved_world = int(os.environ.get("WORLD_SIZE", "1")), int(resume.get("world_size", 1))
    if world != saved_world and "batch_size" in saved:  # the same global batch on another number of processes
        per_process = resumed_batch_size(saved, saved_world, world, path)
        if explicit.get("batch_size", per_process) != per_process:
            raise ck.CheckpointError(
                f"checkpoint {path} was written by {saved_world} process(es) with batch size {saved['batch_size']} "
                f"each (global batch {saved['batch_size'] * saved_world}); on {world} processes that is batch size "
                f"{per_process}, but this run asks for {explicit['batch_size']} (drop --batch-size to have it derived)"
            )
        saved = {**saved, "batch_size": per_process}
    for key in command.identity:
        if key in explicit and key in saved and explicit[key] != saved[key]:
            raise ck.CheckpointError(
                f"checkpoint {path} was saved with {key}={saved[key]!r} but this run asks for {key}={explicit[key]!r}"
            )
    cfg = {**defaults, **saved, **explicit}
    out = Path(args.out) if args.out else (path.parent.parent if path.parent.name == "checkpoints" else path.parent)
    return cfg, out, resume
