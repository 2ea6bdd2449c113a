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
"""

from .encodings import ENCODINGS, Dense, Encoding, make_encoding
from .errors import CacheError, CacheMismatchError
from .hashing import file_sha256, fingerprint
from .manifest import FORMAT_VERSION, FieldSpec, Manifest
from .reader import TeacherCache
from .writer import CacheWriter

__all__ = [
    "CacheError", "CacheMismatchError", "CacheWriter", "Dense", "ENCODINGS", "Encoding", "FORMAT_VERSION",
    "FieldSpec", "Manifest", "TeacherCache", "file_sha256", "fingerprint", "make_encoding",
]
