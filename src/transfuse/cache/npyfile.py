"""``.npy`` files written in place through a memmap and read back without loading them whole."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from numpy.lib import format as npy_format

from .errors import corrupt


def create_rows(path: Path, rows: int, row_shape: tuple[int, ...], dtype: np.dtype) -> np.memmap:
    """A new writable memmap ``(rows, *row_shape)`` backed by ``path``; batches are assigned into it as they arrive."""
    return npy_format.open_memmap(path, mode="w+", dtype=dtype, shape=(rows, *row_shape))


def fsync_path(path: Path) -> None:
    """Flush a file's or folder's contents (a folder: its entries, so renames inside it survive a power cut)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def open_rows(path: Path, *, cache_dir: Path, shape: tuple[int, ...], dtype: np.dtype) -> np.memmap:
    """Map ``path`` read-only after checking its header says ``shape``/``dtype`` and its size holds every row.

    A file cut short (a killed copy, a full disk) would otherwise fail only when a late row is read,
    or not at all; here it is a CacheError naming the file, at open.
    """
    if not path.is_file():
        raise corrupt(cache_dir, f"data file {path.name!r} is missing")
    try:
        with open(path, "rb") as f:
            version = npy_format.read_magic(f)
            # (shape, fortran_order, dtype); our dtypes never need version 3's utf-8 header.
            if version == (1, 0):
                header = npy_format.read_array_header_1_0(f)
            elif version == (2, 0):
                header = npy_format.read_array_header_2_0(f)
            else:
                raise ValueError(f".npy format version {version} is not one a cache writes")
            offset = f.tell()
    except (OSError, ValueError) as err:
        raise corrupt(cache_dir, f"data file {path.name!r} has no readable .npy header ({err})") from None
    got_shape, fortran, got_dtype = header
    if tuple(got_shape) != shape or fortran or got_dtype != dtype:
        raise corrupt(cache_dir, f"data file {path.name!r} holds {got_dtype} {tuple(got_shape)}"
                                 f"{' (Fortran order)' if fortran else ''}; expected {dtype} {shape} from the manifest")
    expected = offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    size = path.stat().st_size
    if size != expected:
        raise corrupt(cache_dir, f"data file {path.name!r} is {size} bytes; expected {expected} "
                                 f"({'truncated' if size < expected else 'trailing bytes'})")
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as err:
        raise corrupt(cache_dir, f"data file {path.name!r} cannot be mapped ({err})") from None
