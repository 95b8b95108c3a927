"""Atomic writes: build the output beside its destination, then rename it into place.

Temporary names carry the writing process's id (``.NAME.<pid>.<random>.tmp``); a run killed before its
rename leaves one behind, and the next write of the same destination removes every such leftover whose
process is gone (a concurrent writer's, still alive, is left alone).
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _prefix(dest: Path) -> str:
    return f".{dest.name}.{os.getpid()}."


def remove_leftovers(dest: str | os.PathLike) -> list[Path]:
    """Remove the temporary files/folders killed writes of ``dest`` left beside it; returns what it removed."""
    d = Path(dest)
    removed = []
    if not d.parent.is_dir():
        return removed
    for t in d.parent.glob(f".{glob.escape(d.name)}.*.tmp"):
        pid = t.name[len(d.name) + 2:].split(".", 1)[0]
        if not pid.isdigit() or _alive(int(pid)):
            continue
        shutil.rmtree(t, ignore_errors=True) if t.is_dir() and not t.is_symlink() else t.unlink(missing_ok=True)
        removed.append(t)
    return removed


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in the destination's folder; on success rename it over ``path``."""
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(dest)
    fd, tmp = tempfile.mkstemp(prefix=_prefix(dest), suffix=".tmp", dir=dest.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp_path, dest)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success it replaces ``path`` (only with ``force``)."""
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists() and not force:
        raise FileExistsError(str(dest))
    remove_leftovers(dest)
    tmp = Path(tempfile.mkdtemp(prefix=_prefix(dest), suffix=".tmp", dir=dest.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old")
            if old.exists():
                shutil.rmtree(old)
            dest.rename(old)
            tmp.rename(dest)
            shutil.rmtree(old)
        else:
            tmp.rename(dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
