"""File names inside a cache folder, and the names of the temporary folders beside it.

A cache folder holds ``manifest.json`` (written last: its presence marks a complete cache),
``sample_ids.npy`` (N,) int64, and one ``<file>.<part>.npy`` per field part with N rows. Field
names (tap paths such as ``layer2.0.conv1``) never become file names: each field gets an
index-based stem (``field-000``) recorded in the manifest.
"""

from __future__ import annotations

import os
import re
import secrets
from pathlib import Path

MANIFEST = "manifest.json"
SAMPLE_IDS = "sample_ids.npy"

# Stems come from the manifest, which a reader must not trust to stay inside the folder.
SAFE_STEM = re.compile(r"^[A-Za-z0-9_-]+$")


def field_stem(index: int) -> str:
    """The file stem of the ``index``-th declared field: ``field-000``, ``field-001``, ..."""
    return f"field-{index:03d}"


def part_file(stem: str, part: str) -> str:
    """The ``.npy`` file name holding one part of one field, e.g. ``field-000.values.npy``."""
    return f"{stem}.{part}.npy"


def temp_sibling(out_dir: Path, tag: str) -> Path:
    """A fresh hidden sibling of ``out_dir`` (same file system, so renames are atomic), e.g.
    ``.cache.tmp-4242-9f3a1c0e``; pid and random token keep concurrent writers apart."""
    return out_dir.parent / f".{out_dir.name}.{tag}-{os.getpid()}-{secrets.token_hex(4)}"


def temp_kind(path: Path) -> str | None:
    """``"tmp"`` for a writer's unfinished folder, ``"old"`` for a cache moved aside by an unfinished
    overwrite, None for any other name. Both are left behind only by a killed writer."""
    match = re.match(r"^\..+\.(tmp|old)-\d+-[0-9a-f]+$", path.name)
    return match.group(1) if match else None


def abandoned_siblings(out_dir: Path) -> list[Path]:
    """Unfinished ``tmp`` folders of ``out_dir`` left by writers that no longer run (a
    killed ``transfuse cache-teacher``): safe to delete, since no process will finish them.
    Moved-aside ``old`` caches are kept (they may be the only copy of a cache)."""
    found = []
    pattern = re.compile(rf"^\.{re.escape(out_dir.name)}\.tmp-(\d+)-[0-9a-f]+$")
    if not out_dir.parent.is_dir():
        return found
    for path in out_dir.parent.iterdir():
        match = pattern.match(path.name)
        if match and not _alive(int(match.group(1))):
            found.append(path)
    return found


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    except OSError:
        return True
    return True
