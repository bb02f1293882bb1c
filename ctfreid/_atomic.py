"""Atomic file writes: write to a temporary file beside the target, fsync, rename over it, fsync the folder.

- a crash, a kill or a full disk never leaves a half-written target: either the old file or the new one;
  once the write returns, the new one survives a power loss too (the folder's entry is synced as well);
- the temporary file is ``.NAME.PID.RANDOM.tmp``; one left behind by a killed writer (its process is gone)
  is removed by the next write of the same target;
- the new file keeps the old one's permissions (a private 0600 index stays private), else gets those of a
  plain ``open()`` (0666 & ~umask);
- writing to a symbolic link replaces the file it points to and keeps the link;
- errors name the user's path, not the temporary file.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _umask() -> int:
    """The process umask, read without changing it: setting it to 0 and back, even briefly, would give
    files that other threads of the process create meanwhile world-writable modes."""
    with contextlib.suppress(OSError, ValueError), open("/proc/self/status") as f:
        for line in f:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    umask = os.umask(0o077)  # no /proc: the briefest change, to the most private mask
    os.umask(umask)
    return umask


def fsync_dir(path: str | os.PathLike) -> None:
    """Make the entries of folder ``path`` durable (a file created or renamed there survives a power loss
    only once its folder is synced). Skipped where folders cannot be synced (no O_DIRECTORY, EINVAL)."""
    if not hasattr(os, "O_DIRECTORY"):
        return
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def remove_stale_temporaries(path: Path) -> list[Path]:
    """Remove the temporary files of earlier writes of ``path`` whose writer process is gone."""
    removed = []
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        parts = tmp.name[len(path.name) + 2 :].split(".")
        if len(parts) == 3 and parts[0].isdigit() and not _alive(int(parts[0])):
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
                removed.append(tmp)
    return removed


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file for writing; on success it replaces ``path`` atomically.

    On any exception the temporary file is removed and an existing ``path`` is left untouched; an
    ``OSError`` (a full disk, a missing permission) is re-raised naming ``path`` and the cause.
    """
    user = path = Path(path)  # messages name the path the user gave, also when it is a link
    if path.is_symlink():
        path = Path(os.path.realpath(path))  # update the link's target, keep the link
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise FileNotFoundError(f"cannot write {user}: folder {parent} does not exist")
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, f"cannot write {user}: it is a directory, expected a file path")
    remove_stale_temporaries(path)
    try:
        old_mode = stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        old_mode = 0o666 & ~_umask()
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=parent)
    except OSError as e:
        raise type(e)(e.errno, f"cannot write {user}: {e.strerror}") from None
    try:
        os.chmod(tmp, old_mode)
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(parent)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        # a full disk (also as the RuntimeError torch.save chains to it) becomes one error naming the file;
        # an error about another file (one the caller opened while writing) keeps its own message
        cause = e if isinstance(e, OSError) else (e.__cause__ or e.__context__) if isinstance(e, RuntimeError) else None
        if isinstance(cause, OSError) and cause.errno is not None and cause.filename in (None, tmp, str(path)):
            raise OSError(cause.errno, f"cannot write {user}: {os.strerror(cause.errno)}") from e
        raise
