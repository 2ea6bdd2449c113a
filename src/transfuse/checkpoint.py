"""Atomic, safe checkpoints.

A checkpoint is a folder ``checkpoints/step-00000100/`` holding

* ``model.safetensors`` -- the Distiller's state (every trainable participant, learnable
  loss parts and buffers such as CRD's memory banks); never a frozen participant;
* ``state.pt`` -- every optimizer's state, step, RNG states; read back with
  ``torch.load(weights_only=True)``, so a checkpoint cannot run code.

It is written under a temporary name and renamed into place, and ``checkpoints/latest``
is updated by rename too, so a run killed at any instant leaves either the previous
checkpoint or the new one, never a half-written one.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .atomic import give_default_mode, write_atomic
from .errors import UserError

MODEL_FILE = "model.safetensors"
STATE_FILE = "state.pt"
LATEST = "latest"
_STEP_DIR = re.compile(r"^step-(\d{8})$")


class CheckpointError(UserError, FileNotFoundError):
    """A checkpoint or weights file that is missing or unreadable."""


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
    """Read a safetensors state dict; a missing or corrupt file names itself."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} file {str(path)!r} does not exist")
    try:
        return load_file(str(path))
    except Exception as err:  # safetensors raises several error types for bad headers
        raise CheckpointError(f"{what} file {str(path)!r} is not a readable safetensors file: {err}") from None


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


def save_checkpoint(
    directory: str | os.PathLike, step: int, model_state: dict[str, torch.Tensor], train_state: dict[str, Any], *, keep: int = 2
) -> Path:
    """Write ``step``'s checkpoint atomically, point ``latest`` at it, keep the newest ``keep``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"step-{step:08d}"
    tmp = directory / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_file(tensors_for_saving(model_state), str(tmp / MODEL_FILE))
    give_default_mode(tmp / MODEL_FILE)
    torch.save(train_state, tmp / STATE_FILE)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    write_atomic(directory / LATEST, final.name + "\n")
    for old in list_checkpoints(directory)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(directory: str | os.PathLike) -> list[Path]:
    """Complete checkpoint folders, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if _STEP_DIR.match(p.name) and (p / MODEL_FILE).is_file() and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: p.name)


def latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint (the one ``latest`` names, else the highest step), or None."""
    directory = Path(directory)
    pointer = directory / LATEST
    if pointer.is_file():
        named = directory / pointer.read_text().strip()
        if (named / MODEL_FILE).is_file() and (named / STATE_FILE).is_file():
            return named
    found = list_checkpoints(directory)
    return found[-1] if found else None


def load_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(model_state, train_state)`` of a checkpoint folder; nothing in it is executed."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    model_state = load_weights(path / MODEL_FILE, what="checkpoint weights")
    try:
        train_state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {str(path)!r} has no {STATE_FILE}") from None
    except Exception as err:
        raise CheckpointError(f"checkpoint state {str(path / STATE_FILE)!r} is unreadable or unsafe: {err}") from None
    return model_state, train_state
