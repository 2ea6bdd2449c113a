"""The dense teacher-output cache: run a teacher once, read its outputs back by sample id.

A cache is one folder::

    manifest.json             what is stored and what it was built for (written last)
    sample_ids.npy            (N,) int64, the stable id of each row
    field-000.values.npy      (N, *shape) one file per field part (logits, tapped features)

Writing (everything lands in a temporary sibling folder that is renamed into place, so a killed
write leaves no half cache)::

    fields = {"logits": FieldSpec("logits", (10,), {"kind": "dense", "dtype": "float32"})}
    identity = {"teacher_weights_sha256": file_sha256(weights), "dataset": fingerprint(name="digits", ids=ids)}
    with CacheWriter(out, num_samples=N, fields=fields, identity=identity) as writer:
        for batch in loader:
            writer.write(batch["index"], {"logits": teacher(batch["input"])})   # (B,), (B, 10)

Reading (memory-mapped; only the looked-up rows are read)::

    cache = TeacherCache.open(out, expect_identity=identity, require_fields=["logits"])
    cache.lookup(batch["index"], device="cuda")["logits"]                     # (B, 10) float32

A language model's logits ``(T, V)`` can be stored as their top k per position instead
(``{"kind": "topk", "k": 16, "dtype": "float32", "index_dtype": "int32"}``: parts
``logprobs`` and ``indices`` ``(T, k)`` and ``tail`` ``(T,)``); such a field reads back as a
:class:`~transfuse.functional.divergences.TopKLogits`, and its cache records format version 2
(:data:`TOPK_FORMAT_VERSION`), which a transfuse without top-k refuses. An all-dense cache
is still written as version 1.
"""

from .encodings import ENCODINGS, Dense, Encoding, TopK, index_dtype, make_encoding
from .errors import CacheError, CacheMismatchError
from .hashing import file_sha256, fingerprint
from .manifest import FORMAT_VERSION, READ_VERSIONS, TOPK_FORMAT_VERSION, FieldSpec, Manifest, required_version
from .reader import TeacherCache
from .writer import CacheWriter

__all__ = [
    "CacheError", "CacheMismatchError", "CacheWriter", "Dense", "ENCODINGS", "Encoding", "FORMAT_VERSION",
    "FieldSpec", "Manifest", "READ_VERSIONS", "TOPK_FORMAT_VERSION", "TeacherCache", "TopK", "file_sha256",
    "fingerprint", "index_dtype", "make_encoding", "required_version",
]
