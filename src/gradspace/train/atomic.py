"""Files and folders written whole or not at all (a temp name beside them, then ``os.replace``), and the one-line
error a failed write becomes: what was there before is intact, and a full disk says so."""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class WriteFailed(RuntimeError):
    """A file of the run could not be written (most often a full disk); what was there before is intact."""


def write_failed(err: BaseException, path: Path, what: str) -> WriteFailed:
    """A one-line error for a failed write of ``what`` at ``path``, saying when the disk is full (torch's own
    message for that is "unexpected pos" from deep inside its zip writer)."""
    folder = next((p for p in (path, *path.parents) if p.exists()), Path("."))
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        free = None
    full = getattr(err, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or (free is not None and free < 64 << 20)
    if full:
        left = f" ({free / 2**20:.0f} MiB free)" if free is not None else ""
        return WriteFailed(f"the disk is full{left}: could not write {what} {path}; free some space and run again")
    reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
    return WriteFailed(f"could not write {what} {path} ({reason})")


def write_atomic(path: Path, text: str) -> None:
    """``path`` holds ``text`` whole or keeps what it held: a temp file beside it, then ``os.replace``."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        raise write_failed(err, path, "file") from None
    finally:
        tmp.unlink(missing_ok=True)


def save_figure(fig, path: Path, dpi: int = 110) -> None:
    """A matplotlib figure as a PNG at ``path``, written whole or not at all."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.{os.getpid()}.tmp"
    try:
        fig.savefig(tmp, dpi=dpi, format="png")
        os.replace(tmp, path)
    except OSError as err:
        raise write_failed(err, path, "plot") from None
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_folder(final: Path, what: str = "folder") -> Iterator[Path]:
    """Yields a temp folder beside ``final``; once the block ends without error it replaces ``final`` (the old one
    renamed aside first, removed last), so ``final`` is always a complete folder, the old or the new one."""
    final = Path(final)
    tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
    old = final.with_name(f".{final.name}.{os.getpid()}.old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
    except (OSError, RuntimeError) as err:
        if old.exists() and not final.exists():
            os.replace(old, final)
        raise write_failed(err, final, what) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True
