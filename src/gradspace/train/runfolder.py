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
#: the plots a run (curves, energy, rank) or a comparison (also loss, state bytes) writes beside them
PLOTS = ("curves.png", "energy.png", "rank.png", "loss.png", "state_bytes.png")
LOCK = ".gradspace.lock"
#: the suffix a checkpoint that does not load gets when a resume falls back past it: kept, never counted or pruned
QUARANTINE = ".corrupt"


def holds_run(folder: Path) -> bool:
    return any((folder / name).exists() for name in RUN_ARTEFACTS)


def holds_compare(folder: Path) -> bool:
    """A comparison's report, or runs in subfolders (a run's own ``model/`` and ``checkpoints/`` do not count)."""
    if any((folder / name).exists() for name in COMPARE_ARTEFACTS):
        return True
    subs = (
        [sub for sub in folder.iterdir() if sub.is_dir() and sub.name not in RUN_ARTEFACTS] if folder.is_dir() else []
    )
    return any(holds_run(sub) or holds_compare(sub) for sub in subs)


def check_out(folder: Path) -> None:
    """``--out`` must name a folder, or a path where one can be made."""
    folder = Path(folder)
    if folder.is_symlink() and not folder.exists():
        raise UsageError(f"--out {folder} is a symbolic link to nothing: remove it or choose another --out")
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"--out {folder} is a file, not a folder: choose another --out")
    blocked = next((p for p in folder.parents if p.exists() and not p.is_dir()), None)
    if blocked is not None:
        raise UsageError(f"--out {folder}: {blocked} is a file, so no folder can be made there; choose another --out")


def refuse_existing(folder: Path, command: str, overwrite: bool) -> None:
    """Exit 2 (nothing touched) when ``folder`` already holds a run, or a comparison (or runs in its subfolders),
    and ``overwrite`` was not asked for (a comparison's own folder is checked by ``compare.check_manifest``: a rerun
    continues it)."""
    check_out(folder)
    if overwrite:
        return
    if holds_run(folder):
        raise UsageError(
            f"{folder} already holds a run: resume it with `gradspace {command} --resume {folder}`, choose another "
            "--out, or pass --overwrite to replace it"
        )
    if holds_compare(folder):
        raise UsageError(
            f"{folder} holds a comparison or runs in its subfolders; a run there would mix with them: choose another "
            "--out"
        )


def clear(folder: Path) -> None:
    """Remove what an earlier run wrote (only gradspace's own files: anything else in the folder stays)."""
    for name in (*RUN_ARTEFACTS, *COMPARE_ARTEFACTS, *PLOTS):
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
    """``folder/.gradspace.lock`` while a process writes the folder: an exclusive ``flock`` on the file, which the
    kernel releases however the process ends (a killed run's lock is simply taken over), and the writer's pid in
    it for the message. Taking the lock checks that the locked file is still the one at the path (a releasing
    writer unlinks it), so two processes can never both hold it. A file naming a live process that holds no lock
    (written by hand, or by an older gradspace) is respected too. Reentrant within a process (the command line takes
    it before it reads a checkpoint, the Trainer again around training and export). With ``create``, a folder the
    lock made and nothing filled is removed again, with the parents it made: bad input leaves nothing behind."""

    _held: dict[Path, tuple[int, int]] = {}  # lock path -> (fd, depth)

    def __init__(self, folder: Path, create: bool = False):
        self.folder = Path(folder)
        self.path = self.folder / LOCK
        self.key = self.path.absolute()
        self.created = create and not self.folder.exists() and not self.folder.is_symlink()
        #: the folders this lock makes, the run folder first, then the missing parents (removed again if unused)
        self.made = [self.folder, *(p for p in self.folder.parents if not p.exists())] if self.created else []

    def __enter__(self) -> RunLock:
        if self.key in self._held:
            fd, depth = self._held[self.key]
            self._held[self.key] = (fd, depth + 1)
            return self
        check_out(self.folder)
        if self.created:
            self.folder.mkdir(parents=True, exist_ok=True)
        try:
            self._held[self.key] = (self._acquire(), 1)
        except BaseException:
            self._remove_if_made()
            raise
        return self

    def _acquire(self) -> int:
        import fcntl

        while True:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
            except IsADirectoryError:
                raise UsageError(f"{self.path} is a folder; it should be gradspace's lock file: remove it") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid = _pid_in(fd)
                os.close(fd)
                raise UsageError(self._busy(pid)) from None
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if not same:  # released and unlinked between our open and our lock: take the new file
                os.close(fd)
                continue
            pid = _pid_in(fd)
            if pid and pid != os.getpid() and alive(pid):
                os.close(fd)
                raise UsageError(self._busy(pid))
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
            return fd

    def _busy(self, pid: int) -> str:
        who = f"another gradspace process (pid {pid})" if pid else "another gradspace process"
        return (
            f"{who} is writing {self.folder}; wait for it to end, or choose another --out (if no such run exists, "
            f"delete {self.path})"
        )

    def __exit__(self, *exc) -> bool:
        fd, depth = self._held.get(self.key, (None, 0))
        if depth > 1:
            self._held[self.key] = (fd, depth - 1)
        elif depth == 1:
            del self._held[self.key]
            self.path.unlink(missing_ok=True)  # while still locked: a waiting opener sees the path change
            os.close(fd)
            self._remove_if_made()
        return False

    def _remove_if_made(self) -> None:
        for folder in self.made:  # innermost first: a parent goes only once it is empty
            if not (folder.is_dir() and not any(folder.iterdir())):
                return
            folder.rmdir()


def _pid_in(fd: int) -> int:
    try:
        return int(os.pread(fd, 32, 0).decode().strip() or 0)
    except (OSError, ValueError):
        return 0


def folder_of(checkpoint: Path) -> Path:
    """The folder a run resumed from ``checkpoint`` writes by default: the run folder of ``RUN/checkpoints/``, or
    the folder a loose checkpoint file lies in."""
    checkpoint = Path(checkpoint)
    return checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent


def source_of(checkpoint: Path) -> Path | None:
    """The run folder whose history a checkpoint continues (links followed): the one whose ``checkpoints/`` holds
    it; None for a loose checkpoint file, which belongs to no run folder."""
    real = Path(checkpoint).resolve()
    return real.parent.parent if real.parent.name == "checkpoints" else None


def target(args: argparse.Namespace, command: Command, name) -> Path:
    """The folder a run will write, known before anything is loaded (so the lock can be taken first)."""
    from . import checkpoint as ck
    from .config import explicit_options

    if args.out:
        return Path(args.out)
    if getattr(args, "config", None):
        from .llamafactory import file_output_dir

        out = file_output_dir(Path(args.config))
        if out is not None:
            return out
    if args.resume:
        return folder_of(ck.find_checkpoint(args.resume))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{name({**command.defaults, **explicit_options(args, command.defaults)})}-{stamp}"


def _inside(a: Path, b: Path) -> bool:
    a, b = a.resolve(), b.resolve()
    return a != b and (b in a.parents or a in b.parents)


def check(out: Path, resume: dict | None, overwrite: bool, command: str) -> list[Path]:
    """Refuse (nothing touched) a run that would mix two runs' histories in ``out`` or discard one's work: a fresh
    run needs a folder that holds no run nor comparison; a resume into another folder one that holds no run and is
    neither inside the source run nor around it; a resume in place from an older checkpoint leaves newer good ones
    in place; ``overwrite`` allows the first three. Returns the newer checkpoints that :func:`prepare` removes."""
    from . import checkpoint as ck

    check_out(out)
    if resume is None:
        refuse_existing(out, command, overwrite)
        return []
    start, source = int(resume["step"]), source_of(Path(resume["path"]))
    if source is None or source != out.resolve():
        if source is not None and _inside(out, source):
            raise UsageError(f"--out {out} and the run it resumes, {source}, lie one inside the other: choose another")
        if holds_run(out) and not overwrite:
            whose = (
                f"resuming {source} there" if source else f"resuming {Path(resume['path']).name} there (a loose file)"
            )
            raise UsageError(
                f"{out} already holds another run: {whose} would mix the two; choose an empty --out"
                + (f", resume in place with `gradspace {command} --resume {source}`" if source else "")
                + f", or pass --overwrite to replace the run in {out}"
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
    ones), and its summary, which stops describing the folder once training goes on (the model folder, which
    records its step, stays until it is replaced)."""
    from . import checkpoint as ck

    newer = check(out, resume, overwrite, command)
    for orphan in [*ck.remove_orphans(out / "checkpoints"), *remove_orphans(out)]:
        print(f"gradspace: removed {orphan}, left by a write that did not finish", file=sys.stderr)
    if resume is None:
        clear(out)
        return
    source, start = source_of(Path(resume["path"])), int(resume["step"])
    if source is None or source != out.resolve():
        clear(out)
        if source is None:
            print(
                f"gradspace: {Path(resume['path']).name} belongs to no run folder: {out} has no history before "
                f"step {start}",
                file=sys.stderr,
            )
        _copy_history(source / "metrics.jsonl" if source else None, out / "metrics.jsonl", start)
        return
    for bad in resume.get("skipped", ()):
        _quarantine(Path(bad))
    for path in newer:
        ck.remove_checkpoint(path)
    (out / "summary.json").unlink(missing_ok=True)


def _copy_history(source: Path | None, dest: Path, start: int) -> None:
    from .summary import logged_by

    lines = source.read_text(encoding="utf-8").splitlines() if source and source.exists() else []
    write_atomic(dest, "".join(ln + "\n" for ln in lines if logged_by(ln, start)))


def _quarantine(checkpoint: Path) -> None:
    """Rename a checkpoint that does not load (and its FSDP2 folder) out of the checkpoint list, keeping it."""
    from .sharded import dcp_path

    for part in (checkpoint, dcp_path(checkpoint)):
        if part.exists():
            aside = part.with_name(part.name + QUARANTINE)
            n = 1
            while aside.exists():  # an earlier one of the same step is kept too
                aside, n = part.with_name(f"{part.name}{QUARANTINE}.{n}"), n + 1
            os.replace(part, aside)
            print(f"gradspace: set aside {part.name} (it does not load) as {aside.name}", file=sys.stderr)


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
    if key in PATH_KEYS and asked and saved.get(key):
        first, second = Path(str(asked)).expanduser(), Path(str(saved[key])).expanduser()
        return first.exists() and second.exists() and first.resolve() == second.resolve()
    return False


def _shown(command: Command, key: str, saved: dict[str, Any]) -> str:
    value = saved.get(key)
    if value is None and key == "warmup" and "steps" in saved:
        return f"{max(1, int(saved['steps']) // 10)} (the default: 10% of its {saved['steps']} steps)"
    if value is None and key in ("rank", "update_gap", "scale", "lr"):
        setting = {"update_gap": "update_proj_gap"}.get(key, key)
        return f"{command.settings(saved).get(setting)!r} (the default)"
    return repr(value)


#: the options that may name a local file or folder (besides a built-in name or a hub name)
PATH_KEYS = ("dataset", "eval_dataset", "model", "tokenizer", "task")


def _builtin(key: str, value: str) -> bool:
    from .config import TOKENIZERS

    if key == "dataset":
        from .data import CORPORA

        return value in CORPORA
    if key == "task":
        from .tasks import BUILTIN

        return value in BUILTIN or value.startswith("glue/")
    if key == "model":
        from .encoder import BUILTIN as MODELS

        return value.lower() in MODELS
    return key == "tokenizer" and value in TOKENIZERS


def absolute_paths(cfg: dict[str, Any]) -> dict[str, Any]:
    """A new run's local files and folders as absolute paths, so that its config (in every checkpoint) names the
    same data wherever it is resumed or exported from, never a same-named file in another directory."""
    out = dict(cfg)
    for key in PATH_KEYS:
        value = out.get(key)
        if isinstance(value, str) and not _builtin(key, value) and Path(value).expanduser().exists():
            out[key] = str(Path(value).expanduser().resolve())
    return out


def resolve_run(args: argparse.Namespace, command: Command) -> tuple[dict[str, Any], dict | None]:
    """``(config, checkpoint or None)`` from the flags, the config file and ``--resume`` (the newest checkpoint
    that loads; call it under the run folder's lock, so that no other process writes a newer one meanwhile)."""
    from . import checkpoint as ck
    from .config import FINETUNE, explicit_options
    from .parallel import resumed_batch_size

    defaults = command.defaults
    explicit = explicit_options(args, defaults)
    if not args.resume:
        return absolute_paths({**defaults, **explicit}), None
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
    cfg = {**defaults, **saved, **explicit}
    started = max(1, int(saved.get("steps", cfg["steps"])) // 10)
    if cfg.get("warmup") is None and cfg["steps"] != saved.get("steps", cfg["steps"]) and started < cfg["steps"]:
        cfg["warmup"] = started  # a longer run keeps its warm-up, not 10% of the new total (nor a shorter one)
    return cfg, resume
