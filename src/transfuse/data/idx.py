"""Reader for the IDX format of MNIST and Fashion-MNIST, gzip-compressed or plain.

An IDX file is a 4-byte magic number ``00 00 <dtype> <ndim>``, ``ndim`` big-endian uint32
dimensions, then the values in C order, big-endian.
http://yann.lecun.com/exdb/mnist/ (section "The IDX file format")
"""

from __future__ import annotations

import gzip
import math
from pathlib import Path

import numpy as np

#: IDX type byte -> numpy dtype (big-endian where it matters).
IDX_DTYPES = {0x08: np.dtype("u1"), 0x09: np.dtype("i1"), 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
              0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}

_GZIP_MAGIC = b"\x1f\x8b"


class IDXFormatError(ValueError):
    """A file that is not a well-formed IDX file; the message names the file."""


def read_idx(path: str | Path, *, ndim: int | None = None) -> np.ndarray:
    """The array stored in the IDX file at ``path`` (gzip detected from the content, not the name).

    ``ndim``: the number of dimensions expected (3 for images, 1 for labels); another
    count raises :class:`IDXFormatError`, as do a bad magic number or a truncated file.
    """
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == _GZIP_MAGIC:
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as err:
            raise IDXFormatError(f"{path}: corrupt gzip data ({err})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in IDX_DTYPES:
        raise IDXFormatError(
            f"{path}: not an IDX file (magic number {raw[:4].hex() or 'missing'}; expected 0000 followed by a "
            f"type byte in {{{', '.join(f'{t:02x}' for t in IDX_DTYPES)}}} and a dimension count)"
        )
    dtype, dims_count = IDX_DTYPES[raw[2]], raw[3]
    if ndim is not None and dims_count != ndim:
        raise IDXFormatError(f"{path}: expected an IDX file with {ndim} dimension(s), found {dims_count}")
    header = 4 + 4 * dims_count
    if len(raw) < header:
        raise IDXFormatError(f"{path}: truncated header ({len(raw)} bytes for {dims_count} dimensions)")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=dims_count, offset=4))
    expected = header + math.prod(shape) * dtype.itemsize
    if len(raw) != expected:
        raise IDXFormatError(f"{path}: {len(raw)} bytes, but shape {shape} of {dtype} needs {expected}")
    data = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    return data.astype(dtype.newbyteorder("="))  # native byte order, and a writable copy
