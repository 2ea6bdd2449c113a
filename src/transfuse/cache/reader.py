"""Read a teacher cache by sample id, through read-only memmaps (a large cache is never loaded whole)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from .encodings import Decoded
from .errors import CacheError, CacheMismatchError, REBUILD, corrupt
from .layout import MANIFEST, SAMPLE_IDS, part_file, temp_kind
from .manifest import Manifest
from .npyfile import open_rows


def _check_identity(path: Path, manifest: Manifest, expect: dict[str, str]) -> None:
    """Compare every expected key; raise naming all that differ (first one in the attributes)."""
    diffs = [(key, manifest.identity.get(key), str(want)) for key, want in expect.items()
             if manifest.identity.get(key) != str(want)]
    if diffs:
        lines = "; ".join(f"{key!r} is {'absent' if got is None else repr(got)} in the cache but {want!r} is expected"
                          for key, got, want in diffs)
        key, got, want = diffs[0]
        raise CacheMismatchError(
            f"teacher cache {str(path)!r} was built for something else: {lines}. Point the run at the right cache, "
            f"or {REBUILD[0].lower()}{REBUILD[1:]}", field=key, cached=got, expected=want, differences=diffs)


class TeacherCache:
    """A finished cache folder, opened for lookups by sample id. Build with :meth:`open`.

    manifest: the :class:`Manifest` read from ``manifest.json``.
    path: the cache folder.
    """

    def __init__(self, path: Path, manifest: Manifest) -> None:
        self.path = path
        self.manifest = manifest
        self._load_arrays()

    @classmethod
    def open(cls, path: str | os.PathLike, *, expect_identity: dict[str, str] | None = None,
             require_fields: Iterable[str] = ()) -> "TeacherCache":
        """Open and check a cache folder.

        CacheError: no folder, no ``manifest.json`` (not a cache, or a write that was killed), a malformed
            manifest, or a data file that is missing, truncated or of the wrong shape/dtype.
        CacheMismatchError: an ``expect_identity`` key whose cached value differs (all differing keys are
            listed), or a ``require_fields`` name the cache lacks.
        """
        path = Path(path)
        if not path.is_dir():
            raise CacheError(f"no teacher cache at {str(path)!r} ({'not a folder' if path.exists() else 'no such folder'}); "
                             "build one with `transfuse cache-teacher`, or fix the path")
        # A temp folder may hold a manifest (killed just before its rename); it is still never a cache.
        kind = temp_kind(path)
        if kind == "tmp":
            raise corrupt(path, "is a temporary folder left by a cache write that did not finish; it is not a cache")
        if kind == "old":
            raise CacheError(f"{str(path)!r} is a previous teacher cache moved aside by an overwrite that did not "
                             "finish; rename it back (without the leading dot and suffix) to use it, or delete it")
        manifest_path = path / MANIFEST
        if not manifest_path.is_file():
            raise corrupt(path, "has no manifest.json, so it is not a complete cache (was its write interrupted?)")
        try:
            text = manifest_path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise corrupt(path, f"manifest.json cannot be read ({err})") from None
        manifest = Manifest.from_json(text, source=manifest_path)
        _check_identity(path, manifest, dict(expect_identity or {}))
        for name in require_fields:
            if name not in manifest.fields:
                raise CacheMismatchError(
                    f"teacher cache {str(path)!r} has no field {name!r}; it holds {list(manifest.fields)}. "
                    f"Cache that output too (declare the tap when caching), or {REBUILD[0].lower()}{REBUILD[1:]}",
                    field=name, cached=None, expected=name)
        return cls(path, manifest)

    def _load_arrays(self) -> None:
        n = self.manifest.num_samples
        ids = np.asarray(open_rows(self.path / SAMPLE_IDS, cache_dir=self.path, shape=(n,), dtype=np.dtype(np.int64)))
        # Sorted ids + the permutation back to rows: a lookup is one searchsorted, whatever the ids are.
        self._order = np.argsort(ids, kind="stable")
        self._sorted = np.ascontiguousarray(ids[self._order])  # (N,) read into memory: 8 bytes per sample
        dup = self._sorted[1:][self._sorted[1:] == self._sorted[:-1]]
        if dup.size:
            raise corrupt(self.path, f"sample_ids.npy repeats id(s) {np.unique(dup)[:5].tolist()}")
        self._parts: dict[str, dict[str, np.memmap]] = {}
        for name, spec in self.manifest.fields.items():
            self._parts[name] = {
                part: open_rows(self.path / part_file(spec.file, part), cache_dir=self.path, shape=(n, *shape), dtype=dtype)
                for part, (shape, dtype) in spec.codec.parts(spec.shape).items()}

    # A pickled cache (DataLoader workers under "spawn") reopens its files instead of copying every row.
    def __getstate__(self) -> dict:
        return {"path": self.path, "manifest": self.manifest}

    def __setstate__(self, state: dict) -> None:
        self.path, self.manifest = state["path"], state["manifest"]
        self._load_arrays()

    def __len__(self) -> int:
        """N, the number of cached samples."""
        return self.manifest.num_samples

    def __repr__(self) -> str:
        return f"TeacherCache({str(self.path)!r}, samples={len(self)}, fields={list(self.manifest.fields)})"

    def topk_fields(self) -> dict[str, int]:
        """The fields stored as top-k logits, with their k (empty for a dense cache)."""
        return {name: spec.encoding["k"] for name, spec in self.manifest.fields.items()
                if spec.encoding.get("kind") == "topk"}

    def sample_ids(self) -> torch.Tensor:
        """Every cached sample id, (N,) int64, ascending."""
        return torch.from_numpy(self._sorted.copy())

    def lookup(self, sample_ids: torch.Tensor, *, fields: Iterable[str] | None = None,
               device: torch.device | str | None = None) -> dict[str, Decoded]:
        """Cached rows for ``sample_ids`` (B,) integer, in that order: name -> float32 (B, *shape) on ``device``
        for a dense field; a :class:`~transfuse.functional.divergences.TopKLogits` (``logprobs``/``indices``
        (B, ..., k), ``tail`` (B, ...)) for a top-k one.

        ``fields`` defaults to all. float32 fields come back bit-identical to what was written; float16
        ones upcast. An id that was never cached is a CacheError naming it.
        """
        names = list(self.manifest.fields) if fields is None else list(fields)
        for name in names:
            if name not in self.manifest.fields:
                raise CacheMismatchError(f"teacher cache {str(self.path)!r} has no field {name!r}; "
                                         f"it holds {list(self.manifest.fields)}", field=name, cached=None, expected=name)
        if not isinstance(sample_ids, torch.Tensor) or sample_ids.dim() != 1 or sample_ids.is_floating_point() \
                or sample_ids.is_complex() or sample_ids.dtype == torch.bool:
            raise TypeError(f"lookup: sample_ids must be a 1-D integer tensor (B,), got {sample_ids!r:.80}")
        query = sample_ids.detach().to(device="cpu", dtype=torch.int64).numpy()  # (B,)
        pos = np.searchsorted(self._sorted, query)  # (B,) insertion points; a hit has _sorted[pos] == query
        safe = np.minimum(pos, self._sorted.shape[0] - 1)
        unknown = query[self._sorted[safe] != query]
        if unknown.size:
            raise corrupt(self.path, f"has no sample id(s) {unknown[:5].tolist()}"
                                     f"{f' (and {unknown.size - 5} more)' if unknown.size > 5 else ''} of the "
                                     f"{query.size} looked up; was it built over a different data set or subset?")
        rows = self._order[safe]  # (B,) row numbers in the data files
        out = {}
        for name in names:
            # Fancy indexing reads only these rows from the memmap, into fresh memory.
            spec = self.manifest.fields[name]
            value = spec.codec.decode({part: mm[rows] for part, mm in self._parts[name].items()}, spec.shape)
            out[name] = value if device is None else value.to(device)
        return out
