"""Atomic file writes: a reader (or a resumed run after SIGKILL) never sees a half-written file."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def _umask() -> int:
    # os.umask can only be read by setting it; set it straight back.
    mask = os.umask(0)
    os.umask(mask)
    return mask


def give_default_mode(path: str | os.PathLike) -> None:
    """Give a freshly written file the permissions an ordinary ``open()`` would (0o666
    minus the umask). Temporary files (``mkstemp``) and safetensors files are created
    0o600, which would make shared run folders and caches unreadable to others."""
    os.chmod(path, 0o666 & ~_umask())


def write_atomic(path: str | os.PathLike, text: str | bytes) -> None:
    """Write ``text`` to ``path`` via a temp file in the same folder and a rename, so
    readers never see a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = "wb" if isinstance(text, bytes) else "w"
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        give_default_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
