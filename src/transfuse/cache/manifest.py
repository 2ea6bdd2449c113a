"""What a cache holds and what it was built for: :class:`FieldSpec`, :class:`Manifest`, ``manifest.json``."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

from .encodings import Encoding, make_encoding
from .errors import corrupt
from .layout import SAFE_STEM

#: The layout of a cache whose fields are all dense: what every transfuse reads, and what the
#: writer still records for such a cache, so that it reads exactly as before top-k existed.
FORMAT_VERSION = 1
#: The layout that adds the ``topk`` encoding. A cache with a top-k field records this, so a
#: transfuse that predates top-k refuses it at open ("has format_version 2, but this transfuse
#: reads version 1") instead of misreading its files.
TOPK_FORMAT_VERSION = 2
#: Every version this transfuse reads, and the encoding kinds each may hold.
READ_VERSIONS: dict[int, tuple[str, ...]] = {FORMAT_VERSION: ("dense",), TOPK_FORMAT_VERSION: ("dense", "topk")}


def required_version(fields: dict[str, "FieldSpec"]) -> int:
    """The oldest format version that can describe ``fields``: 1 when every field is dense, else 2."""
    kinds = {spec.encoding.get("kind") for spec in fields.values()}
    return min(v for v, allowed in READ_VERSIONS.items() if kinds <= set(allowed))


def _version_problem(version: Any) -> str | None:
    """None for a version this transfuse reads, else what is wrong with it (for an error message)."""
    is_int = isinstance(version, int) and not isinstance(version, bool)
    if is_int and version in READ_VERSIONS:
        return None
    newer = is_int and version > max(READ_VERSIONS)
    return (f"format_version {version!r}, but this transfuse reads versions {sorted(READ_VERSIONS)}"
            + (" (a newer transfuse wrote it: upgrade transfuse to read it)" if newer else ""))


_TOP_KEYS = {"format_version", "num_samples", "fields", "identity", "created_by"}
_FIELD_KEYS = {"shape", "encoding", "file"}


@dataclass(frozen=True)
class FieldSpec:
    """One cached output per sample, e.g. ``logits`` or a tap path ``layer2.0``.

    name: the name training asks for.
    shape: per-sample shape, e.g. ``(C,)`` for logits or ``(C, H, W)`` for a feature map; a batch is ``(B, *shape)``.
    encoding: how values are stored: ``{"kind": "dense", "dtype": "float32" | "float16"}``, or for
        logits ``(..., V)`` ``{"kind": "topk", "k": K, "dtype": ..., "index_dtype": "int32" | "int64"}``
        (see :mod:`transfuse.cache.encodings`).
    file: file stem inside the cache folder; the writer assigns it, leave it empty.
    """

    name: str
    shape: tuple[int, ...]
    encoding: dict
    file: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"field name must be a non-empty string, got {self.name!r}")
        shape = tuple(self.shape) if isinstance(self.shape, (tuple, list)) else None
        if shape is None or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape):
            raise ValueError(f"field {self.name!r}: shape must be a tuple of positive ints (per sample), got {self.shape!r}")
        try:
            make_encoding(self.encoding).parts(shape)  # the encoding fits this shape (top-k: k <= V)
        except ValueError as err:
            raise ValueError(f"field {self.name!r}: {err}") from None
        if self.file and not SAFE_STEM.match(self.file):
            raise ValueError(f"field {self.name!r}: file stem {self.file!r} must match {SAFE_STEM.pattern}")
        # Frozen: normalise through object.__setattr__; copy the dict so the caller's later edits cannot leak in.
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "encoding", dict(self.encoding))

    @property
    def codec(self) -> Encoding:
        """The :class:`~transfuse.cache.encodings.Encoding` object for ``encoding``."""
        return make_encoding(self.encoding)

    @property
    def numel(self) -> int:
        """Values per sample: ``prod(shape)``."""
        return math.prod(self.shape)


def _str_dict(value: Any, what: str) -> dict[str, str]:
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise ValueError(f"{what} must map strings to strings, got {value!r}")
    return dict(value)


@dataclass(frozen=True)
class Manifest:
    """Everything about a cache except the numbers: written last, as ``manifest.json``.

    format_version: layout version: :data:`FORMAT_VERSION` (1, dense fields only) or
        :data:`TOPK_FORMAT_VERSION` (2, top-k fields too; see :func:`required_version`); a
        reader refuses any other, and a version-1 manifest with a top-k field.
    num_samples: N, the rows of ``sample_ids.npy`` and of every field file.
    fields: name -> :class:`FieldSpec` (with ``file`` assigned).
    identity: what must match for the cache to serve a run, compared key by key, e.g.
        ``{"teacher_weights_sha256": ..., "teacher_model": ..., "dataset": fingerprint(...)}``.
    created_by: versions and the like; informational, never compared.
    """

    format_version: int
    num_samples: int
    fields: dict[str, FieldSpec]
    identity: dict[str, str]
    created_by: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        problem = _version_problem(self.format_version)
        if problem:
            raise ValueError(f"manifest has {problem}")
        if not isinstance(self.num_samples, int) or isinstance(self.num_samples, bool) or self.num_samples < 1:
            raise ValueError(f"num_samples must be a positive int, got {self.num_samples!r}")
        if not isinstance(self.fields, dict) or not self.fields:
            raise ValueError(f"fields must be a non-empty dict of name -> FieldSpec, got {self.fields!r}")
        for name, spec in self.fields.items():
            if not isinstance(spec, FieldSpec) or spec.name != name:
                raise ValueError(f"fields[{name!r}] must be a FieldSpec named {name!r}, got {spec!r}")
        allowed = READ_VERSIONS[self.format_version]
        for name, spec in self.fields.items():
            if spec.encoding.get("kind") not in allowed:
                raise ValueError(f"fields[{name!r}] has encoding kind {spec.encoding.get('kind')!r}, which format_version "
                                 f"{self.format_version} does not hold (it holds {list(allowed)}; "
                                 f"{spec.encoding.get('kind')!r} needs version {required_version({name: spec})})")
        stems = [spec.file for spec in self.fields.values()]
        if len(set(stems)) != len(stems):
            raise ValueError(f"field file stems must be distinct, got {stems}")
        object.__setattr__(self, "identity", _str_dict(self.identity, "identity"))
        object.__setattr__(self, "created_by", _str_dict(self.created_by, "created_by"))

    def to_json(self) -> str:
        """The ``manifest.json`` text (pretty-printed, so a person can read what a cache is)."""
        doc = {
            "format_version": self.format_version,
            "num_samples": self.num_samples,
            "fields": {name: {"shape": list(s.shape), "encoding": s.encoding, "file": s.file} for name, s in self.fields.items()},
            "identity": self.identity,
            "created_by": self.created_by,
        }
        return json.dumps(doc, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str, *, source: str | os.PathLike) -> "Manifest":
        """Parse ``manifest.json`` strictly; anything unexpected -> CacheError naming ``source`` and the key."""
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as err:
            raise corrupt(source, f"is not valid JSON ({err})") from None
        if not isinstance(doc, dict):
            raise corrupt(source, "must hold a JSON object")
        # The version first: a newer layout may differ in every other key.
        version = doc.get("format_version")
        problem = _version_problem(version)
        if problem:
            raise corrupt(source, f"has {problem}")
        missing, extra = sorted(_TOP_KEYS - set(doc)), sorted(set(doc) - _TOP_KEYS)
        if missing or extra:
            raise corrupt(source, f"has missing key(s) {missing} / unexpected key(s) {extra}; expected {sorted(_TOP_KEYS)}")
        try:
            fields = {}
            if not isinstance(doc["fields"], dict):
                raise ValueError(f"'fields' must be an object, got {doc['fields']!r}")
            for name, entry in doc["fields"].items():
                if not isinstance(entry, dict) or set(entry) != _FIELD_KEYS:
                    raise ValueError(f"fields[{name!r}] must be an object with keys {sorted(_FIELD_KEYS)}, got {entry!r}")
                if not isinstance(entry["shape"], list) or not entry["file"]:
                    raise ValueError(f"fields[{name!r}] needs a 'shape' list and a non-empty 'file', got {entry!r}")
                fields[name] = FieldSpec(name, tuple(entry["shape"]), entry["encoding"], entry["file"])
            return cls(version, doc["num_samples"], fields, doc["identity"], doc["created_by"])
        except ValueError as err:
            raise corrupt(source, str(err)) from None
