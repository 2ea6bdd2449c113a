"""Where transfuse keeps files that outlive one run.

Trained teachers are cached by content hash so that a second run with the same teacher
recipe skips training it. The cache belongs to the user, not to the current directory:
running from another folder must not retrain the teacher.
"""

from __future__ import annotations

import os
from pathlib import Path

#: Environment variable that moves every transfuse cache (trained teachers included).
CACHE_ENV = "TRANSFUSE_CACHE_DIR"


def cache_root() -> Path:
    """``$TRANSFUSE_CACHE_DIR``, else the platform's per-user cache folder for transfuse
    (``~/.cache/transfuse`` on Linux, ``~/Library/Caches/transfuse`` on macOS,
    ``%LOCALAPPDATA%\\transfuse\\Cache`` on Windows)."""
    configured = os.environ.get(CACHE_ENV)
    if configured:
        return Path(configured).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("transfuse", appauthor=False))


def teacher_cache_dir(configured: str | os.PathLike | None = None) -> Path:
    """The trained-teacher cache: a participant's ``cache_dir`` if set (relative paths are
    relative to the current directory, as the user typed them), else ``cache_root()/teachers``."""
    if configured:
        return Path(configured).expanduser()
    return cache_root() / "teachers"
