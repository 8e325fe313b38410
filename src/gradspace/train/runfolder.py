"""A run folder holds exactly one run's history and is never lost: a new run into a folder that holds one is
refused unless asked to overwrite; a resume writes only into its own run's folder, or into one it may fill;
two processes never write one folder at once (a lock file holding the writer's pid, taken before a resumed run
picks its checkpoint and held until its model is exported); every file is written whole or not at all."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from .atomic import alive, write_atomic
from .config import Command, UsageError

#: what a run writes into its folder (a compare also writes report.md, metrics.json and plots)
RUN_ARTEFACTS = ("config.json", "metrics.jsonl", "summary.json", "checkpoints", "tensorboard", "model")
COMPARE_ARTEFACTS = ("report.md", "metrics.json")
LOCK = ".gradspace.lock"
#: the suffix a checkpoint that does not load gets when a resume falls back past it: kept, never counted or pruned
QUARANTINE = ".corrupt"


def holds_run(folder: Path) -> bool:
    return any((folder / name).exists() for name in RUN_ARTEFACTS)


def holds_compare(folder: Path) -> bool:
    if any((folder / name).exists() for name in COMPARE_ARTEFACTS):
        return True
    return folder.is_dir() and any(holds_run(sub) for sub in folder.iterdir() if sub.is_dir())


def check_out(folder: Path) -> None:
    """``--out`` must name a folder (or nothing yet)."""
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"--out {folder} is a file, not a folder: choose another --out")


def refuse_existing(folder: Path, command: str, overwrite: bool) -> None:
    """Exit 2 (nothing touched) when ``folder`` already holds a run and ``overwrite`` was not asked for (a
    comparison's folder is checked by ``compare.check_manifest``: a rerun continues it)."""
    check_out(folder)
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


def remove_orphans(folder: Path) -> list[Path]:
    """Temp files and folders (``.NAME.<pid>.tmp`` / ``.old``) that a killed write left in a run folder; those of a
    live process are kept."""
    removed = []
    for part in [*Path(folder).glob(".*.tmp"), *Path(folder).glob(".*.old")]:
        pid = next((int(x) for x in reversed(part.name.split(".")) if x.isdigit()), 0)
        if pid and pid != os.getpid() and alive(pid):
            continue
        if part.name.endswith(".old") and not (folder / part.name.split(".")[1]).exists():
            os.replace(part, folder / part.name.split(".")[1])  # the swap was killed between its two renames
            continue
        shutil.rmtree(part) if part.is_dir() else part.unlink(missing_ok=True)
        removed.append(part)
    return removed


class RunLock:
    """``folder/.gradspace.lock`` while a process writes the folder. A lock whose process is gone (a killed run) is
    taken over; a live one is an error naming its pid. Reentrant within a process (the command line takes it before
    it reads a checkpoint, the training driver again around training and export). With ``create``, a folder the
    lock made and nothing filled is removed again: bad input leaves nothing behind."""

    _held: dict[Path, int] = {}

    def __init__(self, folder: Path, create: bool = False):
        self.folder = Path(folder)
        self.path = self.folder / LOCK
        self.key = self.path.absolute()
        self.created = create and not self.folder.exists()

    def __enter__(self) -> RunLock:
        if self._held.get(self.key):
            self._held[self.key] += 1
            return self
        check_out(self.folder)
        if self.created:
            self.folder.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    pid = int(self.path.read_text().strip() or 0)
                except (OSError, ValueError):
                    pid = 0
                if pid and pid != os.getpid() and alive(pid):
                    self._remove_if_made()
                    raise UsageError(
                        f"another gradspace process (pid {pid}) is writing {self.folder}; wait for it to end, "
                        f"or choose another --out (if no such run exists, delete {self.path})"
                    ) from None
                self.path.unlink(missing_ok=True)  # stale: its process is gone
                continue
            with os.fdopen(fd, "w") as f:
                f.write(str(os.getpid()))
            self._held[self.key] = 1
            return self
        raise UsageError(f"could not take the lock {self.path}; delete it if no run is writing the folder")

    def __exit__(self, *exc) -> bool:
        count = self._held.get(self.key, 0)
        if count > 1:
            self._held[self.key] = count - 1
        elif count == 1:
            del self._held[self.key]
            self.path.unlink(missing_ok=True)
            self._remove_if_made()
        return False

    def _remove_if_made(self) -> None:
        if self.created and self.folder.is_dir() and not any(self.folder.iterdir()):
            self.folder.rmdir()


def folder_of(checkpoint: Path) -> Path:
    """The run folder a checkpoint file belongs to."""
    checkpoint = Path(checkpoint)
    return checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent


def target(args: argparse.Namespace, command: Command, name) -> Path:
    """The folder a run will write, known before anything is loaded (so the lock can be taken first)."""
    from . import checkpoint as ck
    from .config import explicit_options

    if args.out:
        return Path(args.out)
    if args.resume:
        return folder_of(ck.find_checkpoint(args.resume))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{name({**command.defaults, **explicit_options(args, command.defaults)})}-{stamp}"


def check(out: Path, resume: dict | None, overwrite: bool, command: str) -> list[Path]:
    """Refuse (nothing touched) a run that would mix two runs' histories in ``out`` or discard one's work: a fresh
    run needs a folder that holds no run, a resume into another run's folder an empty one, a resume in place from an
    older checkpoint leaves newer good ones in place; ``overwrite`` allows each. Returns the newer checkpoints that
    :func:`prepare` removes."""
    from . import checkpoint as ck

    check_out(out)
    if resume is None:
        refuse_existing(out, command, overwrite)
        return []
    start, source = int(resume["step"]), folder_of(Path(resume["path"]))
    if source.resolve() != out.resolve():
        if holds_run(out) and not overwrite:
            raise UsageError(
                f"{out} already holds another run: resuming {source} there would mix the two; choose an empty "
                f"--out, resume in place with `gradspace {command} --resume {source}`, or pass --overwrite to "
                f"replace the run in {out}"
            )
        return []
    skipped = {Path(p).name for p in resume.get("skipped", ())}
    newer = [
        p
        for p in ck.list_checkpoints(out / "checkpoints")
        if int(ck.NAME.match(p.name).group(1)) > start and p.name not in skipped
    ]
    if newer and not overwrite:
        raise UsageError(
            f"{out} has checkpoints after step {start} ({', '.join(p.name for p in newer)}): resuming from "
            f"step {start} here would discard them; resume from the newest with `gradspace {command} --resume "
            f"{out}`, branch into a new folder with --out, or pass --overwrite to discard them"
        )
    return newer


def prepare(out: Path, resume: dict | None, overwrite: bool, command: str) -> None:
    """Make ``out`` ready for this run, under its lock, before anything is written (after :func:`check`): a fresh
    run clears what an overwritten run left; a resume into another folder copies its run's history up to the
    checkpoint there; a resume in place sets aside the checkpoints that did not load (and, asked to, the newer
    ones)."""
    from . import checkpoint as ck

    newer = check(out, resume, overwrite, command)
    for orphan in [*ck.remove_orphans(out / "checkpoints"), *remove_orphans(out)]:
        print(f"gradspace: removed {orphan}, left by a write that did not finish", file=sys.stderr)
    if resume is None:
        clear(out)
        return
    source = folder_of(Path(resume["path"]))
    if source.resolve() != out.resolve():
        clear(out)
        _copy_history(source / "metrics.jsonl", out / "metrics.jsonl", int(resume["step"]))
        return
    for bad in resume.get("skipped", ()):
        _quarantine(Path(bad))
    for path in newer:
        ck.remove_checkpoint(path)


def _copy_history(source: Path, dest: Path, start: int) -> None:
    from .summary import logged_by

    lines = source.read_text(encoding="utf-8").splitlines() if source.exists() else []
    write_atomic(dest, "".join(ln + "\n" for ln in lines if logged_by(ln, start)))


def _quarantine(checkpoint: Path) -> None:
    """Rename a checkpoint that does not load (and its FSDP2 folder) out of the checkpoint list, keeping it."""
    from .sharded import dcp_path

    for part in (checkpoint, dcp_path(checkpoint)):
        if part.exists():
            os.replace(part, part.with_name(part.name + QUARANTINE))
            print(f"gradspace: set aside {part.name} (it does not load) as {part.name}{QUARANTINE}", file=sys.stderr)


def _same(command: Command, key: str, saved: dict[str, Any], asked: Any) -> bool:
    """Whether ``asked`` (a flag given on resume) is what the checkpoint's run used for ``key``, its defaults
    resolved: ``--rank 16`` matches a run that used the preset's rank 16."""
    if asked == saved.get(key):
        return True
    if key in ("rank", "update_gap", "scale", "lr"):
        setting = {"update_gap": "update_proj_gap"}.get(key, key)
        try:
            return command.settings({**saved, key: asked}).get(setting) == command.settings(saved).get(setting)
        except (KeyError, TypeError, ValueError):
            return False
    if key == "svd":
        return (asked or "exact") == (saved.get(key) or "exact")
    if key == "optim_args":
        from .config import parse_optim_args

        return parse_optim_args(asked) == parse_optim_args(saved.get(key))
    if key == "target_modules" and saved.get(key) is None and command.name == "pretrain":
        from ..params import DEFAULT_TARGETS

        return list(asked or ()) == list(DEFAULT_TARGETS)
    if key == "warmup" and saved.get(key) is None:
        return asked == max(1, int(saved["steps"]) // 10)
    if key in ("model", "dataset", "eval_dataset", "tokenizer") and asked and saved.get(key):
        first, second = Path(str(asked)).expanduser(), Path(str(saved[key])).expanduser()
        return first.exists() and second.exists() and first.resolve() == second.resolve()
    return False


def _shown(command: Command, key: str, saved: dict[str, Any]) -> str:
    value = saved.get(key)
    if value is None and key in ("rank", "update_gap", "scale", "lr"):
        setting = {"update_gap": "update_proj_gap"}.get(key, key)
        return f"{command.settings(saved).get(setting)!r} (the default)"
    return repr(value)


def resolve_run(args: argparse.Namespace, command: Command) -> tuple[dict[str, Any], dict | None]:
    """``(config, checkpoint or None)`` from the flags, the config file and ``--resume`` (the newest checkpoint
    that loads; call it under the run folder's lock, so that no other process writes a newer one meanwhile)."""
    from . import checkpoint as ck
    from .config import FINETUNE, explicit_options
    from .parallel import resumed_batch_size

    defaults = command.defaults
    explicit = explicit_options(args, defaults)
    if not args.resume:
        return {**defaults, **explicit}, None
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
        if key not in explicit or key not in saved:
            continue
        if not _same(command, key, saved, explicit[key]):
            raise ck.CheckpointError(
                f"checkpoint {path} was saved with {key}={_shown(command, key, saved)} but this run asks for "
                f"{key}={explicit[key]!r}"
            )
        explicit.pop(key)  # the same value, as the checkpoint's run spelled it
    return {**defaults, **saved, **explicit}, resume
