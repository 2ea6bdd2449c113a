"""How one field's per-sample values are stored on disk.

An encoding turns a batch ``(B, *shape)`` into one or more named numpy arrays ("parts"), each
stored as its own ``.npy`` file with ``num_samples`` rows, and turns rows of those parts back into
a float32 tensor. Dense storage has one part, ``values``. A later top-k encoding (``values`` and
``indices``, shape ``(k,)`` each) or a quantized one (codes plus scales) is a new class registered
in :data:`ENCODINGS`; the manifest, writer and reader do not change.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np
import torch


class Encoding(Protocol):
    """What the writer and reader need from an encoding."""

    def parts(self, shape: tuple[int, ...]) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """Per-sample shape and dtype of each stored array, keyed by part name."""

    def encode(self, x: torch.Tensor, *, field: str) -> dict[str, np.ndarray]:
        """``x`` (B, *shape), any float dtype/device -> part name -> array (B, *part_shape)."""

    def decode(self, parts: dict[str, np.ndarray]) -> torch.Tensor:
        """Rows of every part (B, *part_shape) -> float32 CPU tensor (B, *shape)."""


_DENSE_DTYPES = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16)}
_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16}


@dataclass(frozen=True)
class Dense:
    """Every value stored, as float32 (bit-exact) or float16 (half the disk, ~3 significant digits)."""

    dtype: str

    @classmethod
    def from_dict(cls, encoding: dict) -> "Dense":
        """``{"kind": "dense", "dtype": "float32" | "float16"}`` -> Dense; ValueError naming the bad key."""
        extra = sorted(set(encoding) - {"kind", "dtype"})
        if extra:
            raise ValueError(f"dense encoding has unexpected key(s) {extra}; expected only 'kind' and 'dtype'")
        dtype = encoding.get("dtype")
        if dtype not in _DENSE_DTYPES:
            raise ValueError(f"dense encoding 'dtype' is {dtype!r}; expected one of {sorted(_DENSE_DTYPES)}")
        return cls(dtype)

    def parts(self, shape: tuple[int, ...]) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        return {"values": (shape, _DENSE_DTYPES[self.dtype])}

    def encode(self, x: torch.Tensor, *, field: str) -> dict[str, np.ndarray]:
        # Convert in torch (numpy has no bfloat16), on the CPU so .numpy() works.
        stored = x.detach().to(device="cpu", dtype=_TORCH_DTYPES[self.dtype])
        if self.dtype == "float16":
            # A finite teacher logit above 65504 would silently become inf in float16.
            overflow = torch.isinf(stored) & torch.isfinite(x.detach().cpu())
            if bool(overflow.any()):
                raise ValueError(f"field {field!r} has finite values beyond the float16 range (|x| > 65504); "
                                 "store it with dtype 'float32'")
        return {"values": stored.contiguous().numpy()}

    def decode(self, parts: dict[str, np.ndarray]) -> torch.Tensor:
        # Fancy indexing of a memmap already copied the rows, so this is writable memory torch may own.
        values = np.ascontiguousarray(parts["values"], dtype=np.float32)
        return torch.from_numpy(values)


# kind -> constructor from the encoding dict (which raises ValueError naming what is wrong).
ENCODINGS: dict[str, Callable[[dict], Encoding]] = {"dense": Dense.from_dict}


def make_encoding(encoding: dict) -> Encoding:
    """Build the :class:`Encoding` an encoding dict describes; ValueError naming the kind or key that is wrong."""
    if not isinstance(encoding, dict):
        raise ValueError(f"encoding must be a dict like {{'kind': 'dense', 'dtype': 'float32'}}, got {encoding!r}")
    kind = encoding.get("kind")
    if kind not in ENCODINGS:
        raise ValueError(f"encoding 'kind' is {kind!r}; expected one of {sorted(ENCODINGS)}")
    return ENCODINGS[kind](encoding)
