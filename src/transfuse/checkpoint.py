"""Atomic, safe checkpoints.

A checkpoint is a folder ``checkpoints/step-00000100/`` holding

* ``model.safetensors`` -- the Distiller's state (every trainable participant, learnable
  loss parts and buffers such as CRD's memory banks); never a frozen participant;
* ``state.pt`` -- every optimizer's state, step, RNG states; read back with
  ``torch.load(weights_only=True)``, so a checkpoint cannot run code.

It is written under a temporary name (``.tmp-step-00000100-<pid>``), flushed to disk and
renamed into place, and ``checkpoints/latest`` is updated by rename too, so a run killed
at any instant leaves either the previous checkpoint or the new one, never a half-written
one under a ``step-*`` name. Whatever a killed process leaves behind (temporary folders,
a folder it was deleting) is removed by the next save or run start
(:func:`remove_leftovers`). A checkpoint damaged after the fact (a disk that lost the end
of a file) is skipped with a :class:`CheckpointFallbackWarning` by
:func:`load_latest_checkpoint`, which continues from the newest one that still loads.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
import struct
import warnings
import zipfile
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .atomic import give_default_mode, write_atomic
from .errors import UserError

MODEL_FILE = "model.safetensors"
STATE_FILE = "state.pt"
LATEST = "latest"
#: Prefix of everything transient in a checkpoint folder: folders being written or deleted.
TMP_PREFIX = ".tmp-"
# Eight digits is the written width; more appear only past step 99,999,999.
_STEP_DIR = re.compile(r"^step-(\d{8,})$")


class CheckpointError(UserError, FileNotFoundError):
    """A checkpoint or weights file that is missing or unreadable."""


class CheckpointFallbackWarning(UserWarning):
    """A newer checkpoint could not be loaded, so an older one was used instead."""


class LoadedCheckpoint(NamedTuple):
    """What :func:`load_latest_checkpoint` found: the folder used, its contents, and the
    newer folders it had to skip as ``(folder, why)`` pairs."""

    path: Path
    model_state: dict[str, torch.Tensor]
    train_state: dict[str, Any]
    skipped: list[tuple[Path, str]]


def tensors_for_saving(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous, unshared copies: what safetensors requires (tied weights share storage)."""
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}


def save_weights(path: str | os.PathLike, state: dict[str, torch.Tensor], *, metadata: dict[str, str] | None = None) -> None:
    """Write a state dict as safetensors, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file(tensors_for_saving(state), str(tmp), metadata=metadata)
    give_default_mode(tmp)
    os.replace(tmp, path)


def load_weights(path: str | os.PathLike, *, what: str = "weights") -> dict[str, torch.Tensor]:
    """Read a safetensors state dict; a missing or corrupt file names itself and says what is wrong with it."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} file {str(path)!r} does not exist")
    try:
        return load_file(str(path))
    except Exception as err:  # safetensors raises several error types for bad headers
        raise CheckpointError(f"{what} file {str(path)!r} is not a readable safetensors file: {_safetensors_problem(path, err)}") from None


def _safetensors_problem(path: Path, err: Exception) -> str:
    """A short diagnosis of a safetensors file that failed to load (the library's own
    messages describe its parser, not the file)."""
    if isinstance(err, OSError):
        return f"it cannot be read ({err.strerror or type(err).__name__})"
    size = path.stat().st_size
    if size == 0:
        return "it is empty (0 bytes): truncated, its writing or copying was cut short"
    expected = _safetensors_size(path)
    if expected is not None and size < expected:
        return f"it is truncated ({size} of at least {expected} bytes), so its writing or copying was cut short"
    return "its header is not a safetensors header (a file of another format, or a damaged one)"


def _safetensors_size(path: Path) -> int | None:
    """The size a safetensors file declares (an 8-byte header length, then a JSON header
    with each tensor's ``data_offsets``): at least the header's end when the header itself
    is cut short; None when the first bytes are no header length at all."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > 100_000_000:  # no real header is this large: the first bytes are not a length
                return None
            if path.stat().st_size < 8 + n:
                return 8 + n
            header = json.loads(f.read(n))
        ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
        return 8 + n + max(ends, default=0)
    except (OSError, ValueError, KeyError, IndexError, TypeError, struct.error, AttributeError):
        return None


def load_into(module: torch.nn.Module, state: dict[str, torch.Tensor], *, source: str) -> None:
    """``module.load_state_dict(state)`` with an error that names ``source`` and the mismatching keys."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
        if wrong:
            parts.append(
                "shape mismatch " + ", ".join(f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}" for k in wrong[:5])
            )
        raise CheckpointError(
            f"{source} does not fit this model ({'; '.join(parts)}). Was it saved from a model built with the same config?"
        )
    module.load_state_dict(state)


def rng_state() -> dict[str, Any]:
    """Every RNG a training step may draw from, in a form ``weights_only`` loading accepts."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def step_of(path: str | os.PathLike) -> int | None:
    """The step of a checkpoint folder name (``step-00000100`` -> 100), or None for any other name."""
    match = _STEP_DIR.match(Path(path).name)
    return int(match.group(1)) if match else None


def _is_complete(folder: Path) -> bool:
    return (folder / MODEL_FILE).is_file() and (folder / STATE_FILE).is_file()


def save_checkpoint(
    directory: str | os.PathLike, step: int, model_state: dict[str, torch.Tensor], train_state: dict[str, Any], *, keep: int = 2
) -> Path:
    """Write ``step``'s checkpoint atomically, point ``latest`` at it, and leave at most
    ``keep`` complete checkpoints: this one and the newest ``keep - 1`` older ones.

    Checkpoints of later steps than ``step`` are removed too: they belong to the future of
    a run that was resumed from an earlier step (perhaps because the later ones were
    damaged), which this run is now rewriting. Leftovers of killed processes go as well
    (:func:`remove_leftovers`). Only one process may write a checkpoint folder at a time.
    """
    if keep < 1:
        raise ValueError(f"keep must be at least 1 (train.keep_checkpoints), got {keep}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    remove_leftovers(directory)
    final = directory / f"step-{step:08d}"
    tmp = directory / f"{TMP_PREFIX}{final.name}-{os.getpid()}"
    tmp.mkdir()
    try:
        save_file(tensors_for_saving(model_state), str(tmp / MODEL_FILE))
        give_default_mode(tmp / MODEL_FILE)
        torch.save(train_state, tmp / STATE_FILE)
        # Data reaches the disk before the rename does; otherwise a power cut can leave a
        # complete-looking folder whose files are cut short.
        for name in (MODEL_FILE, STATE_FILE):
            _fsync(tmp / name)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if final.exists():  # an earlier attempt at this very step, e.g. before a resume
        # Moved aside (one atomic rename) rather than deleted in place, so no half-deleted
        # folder ever carries a step-* name.
        old = directory / f"{TMP_PREFIX}old-{final.name}-{os.getpid()}"
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync(directory)
    # The pointer moves before anything it could name is deleted.
    write_atomic(directory / LATEST, final.name + "\n")
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    older = [p for p in list_checkpoints(directory) if step_of(p) < step]
    newer = [p for p in list_checkpoints(directory) if step_of(p) > step]
    for stale in older[: max(len(older) - (keep - 1), 0)] + newer:  # oldest first
        _remove(stale)
    return final


def _fsync(path: Path) -> None:
    """Flush a file or folder to disk; skipped where the OS does not allow it (folders on Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove(folder: Path) -> None:
    """Delete a checkpoint folder: renamed to a temporary name first (atomic), so that a kill
    during the deletion leaves a leftover the next save removes, not a half-deleted step-*."""
    doomed = folder.with_name(f"{TMP_PREFIX}del-{folder.name}-{os.getpid()}")
    try:
        os.replace(folder, doomed)
    except OSError:
        doomed = folder
    shutil.rmtree(doomed, ignore_errors=True)


def remove_leftovers(directory: str | os.PathLike) -> list[Path]:
    """Remove what interrupted processes left in a checkpoint folder; return what was removed.

    That is every ``.tmp-*`` entry (a checkpoint being written or deleted when its process
    was killed), every temporary file of the ``latest`` pointer, and every ``step-*``
    folder missing ``model.safetensors`` or ``state.pt`` (a deletion cut short). Temporary
    entries are removed whatever process id they carry: only one process writes a run's
    checkpoints at a time (the run folder is locked), and process ids are reused -- in a
    container a restarted run often gets the very id of the killed one -- so a name's id
    cannot tell a live writer from a dead one. Call it only when this process is not
    writing a checkpoint itself.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = []
    for entry in sorted(directory.iterdir()):
        name = entry.name
        transient = name.startswith(TMP_PREFIX) or (name.startswith(f".{LATEST}.") and name.endswith(".tmp"))
        incomplete = step_of(entry) is not None and entry.is_dir() and not _is_complete(entry)
        if not (transient or incomplete):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def list_checkpoints(directory: str | os.PathLike) -> list[Path]:
    """Complete checkpoint folders (both files present), oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if step_of(p) is not None and _is_complete(p)]
    return sorted(found, key=step_of)


def latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint (the one ``latest`` names, else the highest step), or
    None. Its files are not read: see :func:`load_latest_checkpoint` for one that loads."""
    candidates = _candidates(Path(directory))
    return next((c for c in candidates if _is_complete(c)), None)


def _candidates(directory: Path) -> list[Path]:
    """Folders to try, best first: the one ``latest`` names (even if incomplete, so that its
    problem is reported), then every complete checkpoint from the highest step down."""
    found = list_checkpoints(directory)[::-1]
    pointer = directory / LATEST
    if pointer.is_file():
        named = directory / pointer.read_text().strip()
        if step_of(named) is not None and named.is_dir():
            found = [named] + [p for p in found if p != named]
    return found


def load_latest_checkpoint(directory: str | os.PathLike, *, warn: bool = True) -> LoadedCheckpoint | None:
    """The newest checkpoint in ``directory`` that loads, or None if there is none at all.

    A damaged newer checkpoint (a file cut short or zeroed by a crash) is skipped: with
    ``warn``, a :class:`CheckpointFallbackWarning` names it and why, and the next older one
    is tried. If checkpoints exist but none loads, :class:`CheckpointError` lists each
    folder and its problem.
    """
    directory = Path(directory)
    skipped: list[tuple[Path, str]] = []
    for folder in _candidates(directory):
        try:
            model_state, train_state = load_checkpoint(folder)
        except CheckpointError as err:
            skipped.append((folder, str(err)))
            continue
        if warn:
            for bad, why in skipped:
                warnings.warn(
                    f"skipping checkpoint {str(bad)!r}, which cannot be loaded ({why}); continuing from the older "
                    f"{str(folder)!r} (step {train_state['step']}) instead",
                    CheckpointFallbackWarning,
                    stacklevel=2,
                )
        return LoadedCheckpoint(folder, model_state, train_state, skipped)
    if skipped:
        tried = "; ".join(f"{bad.name}: {why}" for bad, why in skipped)
        raise CheckpointError(
            f"no checkpoint in {str(directory)!r} can be loaded ({tried}). Restore a checkpoint from a backup, or move "
            f"{str(directory)!r} away to train the run again from step 0."
        )
    return None


def load_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(model_state, train_state)`` of a checkpoint folder; nothing in it is executed."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    for name in (MODEL_FILE, STATE_FILE):
        if not (path / name).is_file():
            raise CheckpointError(f"checkpoint {str(path)!r} has no {name} (a deletion or copy was cut short)")
    model_state = load_weights(path / MODEL_FILE, what="checkpoint weights")
    state_file = path / STATE_FILE
    try:
        train_state = torch.load(state_file, map_location="cpu", weights_only=True)
    except Exception as err:
        # torch's own message advises loading with weights_only=False, i.e. running
        # whatever code the file holds: never relay it.
        raise CheckpointError(f"checkpoint state {str(state_file)!r} {_state_problem(state_file, err)}") from None
    if not isinstance(train_state, dict) or not isinstance(train_state.get("step"), int):
        raise CheckpointError(
            f"checkpoint state {str(state_file)!r} is not a transfuse checkpoint state (it holds no step number)"
        )
    return model_state, train_state


def _state_problem(path: Path, err: Exception) -> str:
    """Why ``torch.load`` failed on a ``state.pt``, in a few words a user can act on."""
    if isinstance(err, (PermissionError, IsADirectoryError)):
        return f"cannot be read ({err.strerror or type(err).__name__})"
    size = path.stat().st_size
    if size == 0:
        return "is empty (0 bytes): truncated, its writing or copying was cut short"
    if isinstance(err, pickle.UnpicklingError):  # the weights-only unpickler refused an instruction or a class
        return (
            "is not a transfuse checkpoint state: it holds Python objects other than tensors, numbers and containers "
            "(or is damaged), and transfuse refuses to load those because loading them could run code"
        )
    # torch.save writes a zip archive whose directory is at its end, so a file cut short
    # is no longer a zip archive.
    if not zipfile.is_zipfile(path):
        return f"is truncated or not a transfuse checkpoint state ({size} bytes, not a complete torch.save archive)"
    return "is damaged or not a transfuse checkpoint state (a complete archive whose contents cannot be read)"
