"""How one field's per-sample values are stored on disk.

An encoding turns a batch ``(B, *shape)`` into one or more named numpy arrays ("parts"), each
stored as its own ``.npy`` file with ``num_samples`` rows, and turns rows of those parts back into
what a run reads. Two kinds are registered in :data:`ENCODINGS`:

* ``dense`` (:class:`Dense`): one part, ``values`` ``(*shape)``; read back as a float32 tensor.
* ``topk`` (:class:`TopK`), for a language model's logits ``(..., V)``: the top-k
  log-probabilities at temperature 1 (``logprobs`` ``(..., k)``), their token ids
  (``indices`` ``(..., k)``, int32 while V < 2^31) and the mass of every other token
  (``tail`` ``(...)`` float32, computed before any rounding); read back as a
  :class:`~transfuse.functional.divergences.TopKLogits`.

A further kind (a quantized one: codes plus scales) is a new class registered here; the
writer and reader do not change, and the manifest records it under a new format version
(:data:`~transfuse.cache.manifest.FORMAT_VERSION`) so that older readers refuse it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol, Union

import numpy as np
import torch

from ..functional.divergences import TopKLogits

#: What a field's rows decode to: a float32 tensor ``(B, *shape)``, or a batch of top-k logits.
Decoded = Union[torch.Tensor, TopKLogits]


class Encoding(Protocol):
    """What the writer and reader need from an encoding."""

    def parts(self, shape: tuple[int, ...]) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """Per-sample shape and dtype of each stored array, keyed by part name."""

    def encode(self, x: torch.Tensor, *, field: str) -> dict[str, np.ndarray]:
        """``x`` (B, *shape), any float dtype/device -> part name -> array (B, *part_shape)."""

    def decode(self, parts: dict[str, np.ndarray], shape: tuple[int, ...]) -> Decoded:
        """Rows of every part (B, *part_shape) of a field of per-sample ``shape`` -> float32 CPU tensor
        (B, *shape), or what the kind reads as (:class:`TopKLogits` for ``topk``)."""


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

    def decode(self, parts: dict[str, np.ndarray], shape: tuple[int, ...]) -> torch.Tensor:
        # Fancy indexing of a memmap already copied the rows, so this is writable memory torch may own.
        values = np.ascontiguousarray(parts["values"], dtype=np.float32)
        return torch.from_numpy(values)


#: Index dtype by vocabulary size: int32 holds every token id below 2^31.
_INDEX_DTYPES = {"int32": np.dtype(np.int32), "int64": np.dtype(np.int64)}


def index_dtype(vocab_size: int) -> str:
    """``"int32"`` for a vocabulary of fewer than 2^31 tokens, else ``"int64"``."""
    return "int32" if vocab_size < 2**31 else "int64"


@dataclass(frozen=True)
class TopK:
    """A logits field ``(..., V)`` stored as its top ``k`` tokens per position plus the tail's mass.

    Parts: ``logprobs`` ``(..., k)`` in ``dtype`` (float32 or float16), the log-softmax at
    temperature 1 of the k most probable tokens, most probable first; ``indices``
    ``(..., k)`` (``int32`` when V < 2^31, else ``int64``), their token ids; ``tail``
    ``(...)`` float32 always, ``1 - sum exp(logprobs)`` computed from the teacher's
    unrounded distribution (the summed probability of the other V - k tokens), so a reader
    never rebuilds it from rounded values. Decodes to a
    :class:`~transfuse.functional.divergences.TopKLogits` (float32 logprobs, int64 indices).
    """

    k: int
    dtype: str
    index_dtype: str

    @classmethod
    def from_dict(cls, encoding: dict) -> "TopK":
        """``{"kind": "topk", "k": K, "dtype": "float32" | "float16", "index_dtype": "int32" | "int64"}`` -> TopK."""
        keys = {"kind", "k", "dtype", "index_dtype"}
        extra, missing = sorted(set(encoding) - keys), sorted(keys - set(encoding))
        if extra or missing:
            raise ValueError(f"topk encoding has unexpected key(s) {extra} / missing key(s) {missing}; expected "
                             f"{sorted(keys)}")
        k = encoding["k"]
        if not (isinstance(k, int) and not isinstance(k, bool) and k >= 1):
            raise ValueError(f"topk encoding 'k' is {k!r}; expected an int >= 1")
        if encoding["dtype"] not in _DENSE_DTYPES:
            raise ValueError(f"topk encoding 'dtype' is {encoding['dtype']!r}; expected one of {sorted(_DENSE_DTYPES)}")
        if encoding["index_dtype"] not in _INDEX_DTYPES:
            raise ValueError(f"topk encoding 'index_dtype' is {encoding['index_dtype']!r}; expected one of "
                             f"{sorted(_INDEX_DTYPES)}")
        return cls(k, encoding["dtype"], encoding["index_dtype"])

    def parts(self, shape: tuple[int, ...]) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        if not shape:
            raise ValueError("a topk encoding needs logits of shape (..., V); this field is one value per sample")
        *positions, vocab = shape
        if self.k > vocab:
            raise ValueError(f"topk encoding 'k' is {self.k}, more than the vocabulary V = {vocab} of shape {shape}")
        if index_dtype(vocab) == "int64" and self.index_dtype == "int32":
            raise ValueError(f"topk encoding 'index_dtype' int32 cannot hold the token ids of V = {vocab}")
        top = (*positions, self.k)
        return {"logprobs": (top, _DENSE_DTYPES[self.dtype]), "indices": (top, _INDEX_DTYPES[self.index_dtype]),
                "tail": (tuple(positions), np.dtype(np.float32))}

    def encode(self, x: torch.Tensor, *, field: str) -> dict[str, np.ndarray]:
        top = TopKLogits.from_logits(x, self.k)  # float32 on x's device, tail before any rounding
        return {"logprobs": top.logprobs.to(device="cpu", dtype=_TORCH_DTYPES[self.dtype]).contiguous().numpy(),
                "indices": top.indices.cpu().numpy().astype(_INDEX_DTYPES[self.index_dtype]),
                "tail": top.tail.cpu().contiguous().numpy()}

    def decode(self, parts: dict[str, np.ndarray], shape: tuple[int, ...]) -> TopKLogits:
        logprobs = torch.from_numpy(np.ascontiguousarray(parts["logprobs"], dtype=np.float32))  # (B, ..., k)
        indices = torch.from_numpy(np.ascontiguousarray(parts["indices"], dtype=np.int64))  # (B, ..., k)
        tail = torch.from_numpy(np.ascontiguousarray(parts["tail"], dtype=np.float32))  # (B, ...)
        return TopKLogits(logprobs, indices, tail, shape[-1])


# kind -> constructor from the encoding dict (which raises ValueError naming what is wrong).
ENCODINGS: dict[str, Callable[[dict], Encoding]] = {"dense": Dense.from_dict, "topk": TopK.from_dict}


def make_encoding(encoding: dict) -> Encoding:
    """Build the :class:`Encoding` an encoding dict describes; ValueError naming the kind or key that is wrong."""
    if not isinstance(encoding, dict):
        raise ValueError(f"encoding must be a dict like {{'kind': 'dense', 'dtype': 'float32'}}, got {encoding!r}")
    kind = encoding.get("kind")
    if kind not in ENCODINGS:
        raise ValueError(f"encoding 'kind' is {kind!r}; expected one of {sorted(ENCODINGS)}")
    return ENCODINGS[kind](encoding)
