"""Write a teacher cache once, so that no reader ever sees half of one.

Everything goes into a hidden temporary sibling folder; ``manifest.json`` is written last, after
every data file is flushed to disk, and the folder is then renamed to ``out_dir``. A write killed
at any instant leaves ``out_dir`` as it was (absent, or the previous cache) plus, at worst, a
``.<name>.tmp-<pid>-<token>`` folder that :class:`TeacherCache` refuses and that may be deleted.
"""

from __future__ import annotations

import os
import platform
import shutil
from importlib import metadata
from pathlib import Path

import numpy as np
import torch

from ..atomic import write_atomic
from .errors import CacheError
from .layout import MANIFEST, SAMPLE_IDS, abandoned_siblings, field_stem, part_file, temp_sibling
from .manifest import FieldSpec, Manifest, required_version
from .npyfile import create_rows, fsync_path


def _versions() -> dict[str, str]:
    """What built the cache, for a person reading manifest.json; never compared."""
    found = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__}
    try:
        found["transfuse"] = metadata.version("transfuse")
    except metadata.PackageNotFoundError:  # running from a source tree that was never installed
        pass
    return found


class CacheWriter:
    """Context manager that writes one cache folder.

    ``CacheWriter(out_dir, *, num_samples, fields, identity, created_by=None, overwrite=False)``

    num_samples: N, how many distinct sample ids will be written (each exactly once, any order).
    fields: name -> :class:`FieldSpec` (``file`` left empty; the writer assigns it).
    identity: string -> string, what a reader checks before trusting the cache (see :class:`Manifest`).
    created_by: extra informational strings, merged over the python/torch/numpy/transfuse versions.
    overwrite: replace an existing ``out_dir`` (atomically: the old one is renamed away, the new one
        renamed in, the old one deleted); without it an existing ``out_dir`` is a CacheError.

    ::

        with CacheWriter(out, num_samples=len(ds), fields={"logits": FieldSpec("logits", (C,), dense32)},
                         identity={"teacher_weights_sha256": file_sha256(w)}) as writer:
            for batch in loader:
                writer.write(batch["index"], {"logits": teacher(batch["input"])})
    """

    def __init__(self, out_dir: str | os.PathLike, *, num_samples: int, fields: dict[str, FieldSpec],
                 identity: dict[str, str], created_by: dict[str, str] | None = None, overwrite: bool = False) -> None:
        self.out_dir = Path(out_dir)
        if not isinstance(fields, dict) or not fields:
            raise ValueError(f"fields must be a non-empty dict of name -> FieldSpec, got {fields!r}")
        # Index-based stems: a tap path like "layer2.0.conv1" never becomes a file name.
        specs = {}
        for index, (name, spec) in enumerate(fields.items()):
            if not isinstance(spec, FieldSpec) or spec.name != name:
                raise ValueError(f"fields[{name!r}] must be a FieldSpec named {name!r}, got {spec!r}")
            specs[name] = FieldSpec(spec.name, spec.shape, spec.encoding, field_stem(index))
        # Manifest validates num_samples, identity and created_by now, not after an hour of teacher forward passes.
        # The oldest version that holds these encodings: an all-dense cache stays readable by every transfuse.
        self.manifest = Manifest(required_version(specs), num_samples, specs, identity,
                                 {**_versions(), **(created_by or {})})
        self.overwrite = overwrite
        self._tmp: Path | None = None
        self._ids: np.memmap | None = None
        self._parts: dict[str, dict[str, np.memmap]] = {}
        self._count = 0  # rows written so far; rows fill in arrival order

    # -- writing -------------------------------------------------------------------------------

    def __enter__(self) -> "CacheWriter":
        if self._tmp is not None:
            raise CacheError(f"CacheWriter for {str(self.out_dir)!r} is already open; use it in one `with` block")
        self._check_target()
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        for stale in abandoned_siblings(self.out_dir):  # left by a killed writer of this same cache
            shutil.rmtree(stale, ignore_errors=True)
        self._tmp = temp_sibling(self.out_dir, "tmp")
        self._tmp.mkdir()
        try:
            n = self.manifest.num_samples
            self._ids = create_rows(self._tmp / SAMPLE_IDS, n, (), np.dtype(np.int64))
            for name, spec in self.manifest.fields.items():
                self._parts[name] = {part: create_rows(self._tmp / part_file(spec.file, part), n, shape, dtype)
                                     for part, (shape, dtype) in spec.codec.parts(spec.shape).items()}
        except BaseException:
            self._discard()
            raise
        return self

    def write(self, sample_ids: torch.Tensor, outputs: dict[str, torch.Tensor]) -> None:
        """Store one batch: ``sample_ids`` (B,) integer, ``outputs[name]`` (B, *fields[name].shape), any float dtype/device.

        Every field must be given. Values are stored with the field's encoding (float32 bit-exact).
        Nothing is written unless the whole batch is valid.
        """
        if self._ids is None:
            raise CacheError("CacheWriter.write called outside its `with` block")
        ids = self._check_ids(sample_ids)
        batch = ids.shape[0]
        missing = sorted(set(self.manifest.fields) - set(outputs))
        extra = sorted(set(outputs) - set(self.manifest.fields))
        if missing or extra:
            raise CacheError(f"write to {str(self.out_dir)!r}: outputs miss field(s) {missing} / have undeclared "
                             f"field(s) {extra}; declared {list(self.manifest.fields)}")
        encoded = {}
        for name, spec in self.manifest.fields.items():
            x = outputs[name]
            if not isinstance(x, torch.Tensor) or not x.is_floating_point():
                raise CacheError(f"write: field {name!r} must be a floating-point tensor, got "
                                 f"{x.dtype if isinstance(x, torch.Tensor) else type(x).__name__}")
            if tuple(x.shape) != (batch, *spec.shape):
                raise CacheError(f"write: field {name!r} has shape {tuple(x.shape)}; expected {(batch, *spec.shape)} "
                                 f"(batch of {batch} sample ids, per-sample shape {spec.shape})")
            try:
                encoded[name] = spec.codec.encode(x, field=name)
            except ValueError as err:
                raise CacheError(f"write: {err}") from None
        start, stop = self._count, self._count + batch
        if stop > self.manifest.num_samples:
            raise CacheError(f"write to {str(self.out_dir)!r}: {stop} samples written but num_samples is "
                             f"{self.manifest.num_samples}; is a sample id written twice, or num_samples too small?")
        self._ids[start:stop] = ids
        for name, parts in encoded.items():
            for part, values in parts.items():
                self._parts[name][part][start:stop] = values
        self._count = stop

    def _check_ids(self, sample_ids: torch.Tensor) -> np.ndarray:
        if not isinstance(sample_ids, torch.Tensor) or sample_ids.dim() != 1 or sample_ids.is_floating_point() \
                or sample_ids.is_complex() or sample_ids.dtype == torch.bool:
            raise CacheError(f"write: sample_ids must be a 1-D integer tensor (B,), got "
                             f"{tuple(sample_ids.shape) if isinstance(sample_ids, torch.Tensor) else type(sample_ids).__name__}"
                             f"{' ' + str(sample_ids.dtype) if isinstance(sample_ids, torch.Tensor) else ''}")
        ids = sample_ids.detach().to(device="cpu", dtype=torch.int64).numpy()
        if np.unique(ids).shape[0] != ids.shape[0]:
            values, counts = np.unique(ids, return_counts=True)
            raise CacheError(f"write: sample id(s) {values[counts > 1][:5].tolist()} appear more than once in one batch")
        return ids

    # -- committing ----------------------------------------------------------------------------

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None:
            self._discard()
            return False
        try:
            self._commit()
        except BaseException:
            self._discard()
            raise
        return False

    def _commit(self) -> None:
        assert self._tmp is not None and self._ids is not None
        n = self.manifest.num_samples
        if self._count != n:
            raise CacheError(f"cache {str(self.out_dir)!r} not written: {n - self._count} of {n} declared samples "
                             f"are missing ({self._count} written); nothing was left at {str(self.out_dir)!r}")
        ids = np.sort(np.asarray(self._ids))  # vectorised duplicate check across batches
        dup = ids[1:][ids[1:] == ids[:-1]]
        if dup.size:
            raise CacheError(f"cache {str(self.out_dir)!r} not written: sample id(s) {np.unique(dup)[:5].tolist()} "
                             f"were written more than once; every sample must be written exactly once")
        # Data reaches the disk before the manifest that declares it complete.
        self._ids.flush()
        for parts in self._parts.values():
            for mm in parts.values():
                mm.flush()
        self._ids, self._parts = None, {}  # drop the maps; the files are complete
        for path in self._tmp.iterdir():
            fsync_path(path)
        write_atomic(self._tmp / MANIFEST, self.manifest.to_json())
        fsync_path(self._tmp)
        self._publish()

    def _check_target(self) -> None:
        if (self.out_dir.exists() or self.out_dir.is_symlink()) and not self.overwrite:
            raise CacheError(f"cache folder {str(self.out_dir)!r} already exists; pass overwrite=True to replace it")

    def _publish(self) -> None:
        """Rename the finished temp folder to ``out_dir``; with overwrite, move the old cache aside first."""
        assert self._tmp is not None
        self._check_target()  # again: another writer may have finished while we wrote
        old = None
        if self.out_dir.exists() or self.out_dir.is_symlink():
            old = temp_sibling(self.out_dir, "old")
            os.rename(self.out_dir, old)
        try:
            # rename() refuses a non-empty target, so a concurrent writer that won the race is never clobbered.
            os.rename(self._tmp, self.out_dir)
        except OSError as err:
            if old is not None and not self.out_dir.exists():
                os.rename(old, self.out_dir)  # put the previous cache back
            raise CacheError(f"cache folder {str(self.out_dir)!r} could not be put in place ({err}); "
                             "did another writer create it meanwhile?") from None
        self._tmp = None
        fsync_path(self.out_dir.parent)
        if old is not None:
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink()

    def _discard(self) -> None:
        """Drop the temp folder (after an error, or a failed commit); ``out_dir`` is never touched."""
        self._ids, self._parts = None, {}
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None
