"""Claiming folders that one process writes: a run folder, a teacher's work folder.

A folder is claimed with an exclusive ``flock`` on a ``.lock`` file inside it, held for the
life of the claim. The kernel drops the lock when the process ends, however it ends, so a
killed run never leaves a folder locked; and two processes that start together cannot
both pass the check, because taking the lock *is* the check (no check-then-write race).
"""

from __future__ import annotations

import errno
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import UserError

LOCK_FILE = ".lock"

try:  # POSIX; on other systems folders are not locked (documented in docs/usage.md)
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]


class RunDirError(UserError, FileExistsError):
    """A run folder that cannot be used: it holds a different or finished run, another
    process is using it, or it cannot be created or written."""


class FolderLock:
    """An exclusive lock on ``folder`` (created if missing), held until :meth:`release`.

    ``wait=False`` fails at once with :class:`RunDirError` naming the holder's pid when
    another process holds it; ``wait=True`` calls ``on_wait(pid)`` (to say why nothing
    happens) and blocks until that process is done.
    """

    def __init__(self, folder: str | os.PathLike, *, what: str = "run folder", wait: bool = False,
                 on_wait=None) -> None:
        self.folder = Path(folder)
        self._fd: int | None = None
        make_folder(self.folder, what=what)
        path = self.folder / LOCK_FILE
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as err:
            raise RunDirError(f"cannot use {what} {str(self.folder)!r}: {_reason(err)}") from None
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_pid(fd)
                if wait:
                    if on_wait is not None:
                        on_wait(holder)
                    fcntl.flock(fd, fcntl.LOCK_EX)
                else:
                    os.close(fd)
                    raise RunDirError(
                        f"{what} {str(self.folder)!r} is in use by another transfuse process"
                        f"{f' (pid {holder})' if holder else ''}; wait for it to finish, or choose another --out"
                    ) from None
        # The holder's pid, for the message above; written after the lock is ours.
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        """Drop the lock (closing the file releases the ``flock``); safe to call twice."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "FolderLock":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read_pid(fd: int) -> str:
    try:
        return os.pread(fd, 32, 0).decode(errors="replace").strip()
    except OSError:
        return ""


def make_folder(folder: Path, *, what: str) -> None:
    """``mkdir -p`` whose failure (a file in the way, no permission, a full or read-only
    disk) is a one-paragraph :class:`RunDirError` naming the folder."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise RunDirError(f"cannot create {what} {str(folder)!r}: a file of that name (or above it) is in the way") from None
    except OSError as err:
        raise RunDirError(f"cannot create {what} {str(folder)!r}: {_reason(err)}") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise RunDirError(f"cannot write to {what} {str(folder)!r}: permission denied; choose another --out")


#: errno values that mean "this disk cannot take the write", not "transfuse has a bug".
DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EFBIG}


def _reason(err: OSError) -> str:
    return {
        errno.ENOSPC: "the disk is full",
        errno.EDQUOT: "the disk quota is exhausted",
        errno.EROFS: "the file system is read-only",
        errno.EACCES: "permission denied",
        errno.EPERM: "permission denied",
        errno.ENOTDIR: "a file is in the way of a folder",
    }.get(err.errno, err.strerror or str(err))


@contextmanager
def disk_errors(folder: str | os.PathLike, *, advice: str) -> Iterator[None]:
    """Turn an ``OSError`` that means the disk refused a write (full, read-only, no
    permission) into a :class:`RunDirError` naming the file and ``advice``; any other
    error passes through unchanged."""
    try:
        yield
    except OSError as err:
        if isinstance(err, UserError) or err.errno not in DISK_ERRNOS:
            raise
        where = err.filename or folder
        raise RunDirError(f"writing {str(where)!r} failed: {_reason(err)}. {advice}") from None
