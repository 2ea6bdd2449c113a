"""Stable fingerprints for a cache's ``identity``: a weights file's sha256 and a data set's description."""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import numpy as np
import torch

# Bumped only if the encoding below changes; it keeps old and new fingerprints from colliding.
_FINGERPRINT_TAG = "transfuse-fingerprint-v1"


def file_sha256(path: str | os.PathLike, *, chunk_bytes: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes (e.g. the teacher's weights), read in ``chunk_bytes`` chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def _tensor_digest(x: torch.Tensor | np.ndarray) -> dict[str, Any]:
    """A tensor or array as dtype, shape and the sha256 of its raw bytes (C order, CPU)."""
    t = torch.from_numpy(np.ascontiguousarray(x)) if isinstance(x, np.ndarray) else x.detach().to("cpu").contiguous()
    # Reinterpret as bytes in torch: numpy cannot hold bfloat16.
    raw = t.reshape(-1).view(torch.uint8).numpy() if t.numel() else np.zeros(0, np.uint8)
    return {"__tensor__": str(t.dtype).removeprefix("torch."), "shape": list(t.shape),
            "sha256": hashlib.sha256(raw.tobytes()).hexdigest()}


def _canonical(value: Any, where: str) -> Any:
    """Replace tensors by their digests and check everything else is plain JSON, naming the bad item."""
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return _tensor_digest(value)
    if isinstance(value, dict):
        bad = [k for k in value if not isinstance(k, str)]
        if bad:  # json.dumps would turn 1 into "1" and make {1: x} and {"1": x} collide
            raise TypeError(f"fingerprint: {where} has non-string key(s) {bad[:5]}")
        return {k: _canonical(v, f"{where}[{k!r}]") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_canonical(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"fingerprint: {where} is a {type(value).__name__}; pass JSON values (str, int, float, bool, "
                    "None, lists, dicts with str keys) or tensors/arrays (e.g. str() a Path)")


def fingerprint(**parts: Any) -> str:
    """Hex sha256 identifying a data set (or anything else) from a description of it.

    Pass what decides which samples exist and what the teacher sees, e.g.
    ``fingerprint(name="cifar10", split="train", transform="center-crop-32", sample_ids=ids, labels=y)``:
    JSON values (str, int, float, bool, None, lists/tuples, dicts with str keys) go in as sorted JSON;
    tensors and numpy arrays go in as dtype, shape and the sha256 of their bytes (so a 1e-7 change
    to one value changes the fingerprint; floats are hashed exactly, not rounded).
    The same arguments give the same string on every machine and Python version; keyword order does not matter.
    """
    canonical = {k: _canonical(v, k) for k, v in parts.items()}
    try:
        text = json.dumps([_FINGERPRINT_TAG, canonical], sort_keys=True, separators=(",", ":"),
                          ensure_ascii=True, allow_nan=False)
    except ValueError as err:  # NaN or inf in a plain float
        raise ValueError(f"fingerprint: {err}; NaN/inf have no stable JSON form") from None
    return hashlib.sha256(text.encode("ascii")).hexdigest()
