"""The teacher: a frozen model that answers a batch with its logits and tapped features.

It stays in eval mode whatever ``train()`` is called on it, never requires gradients,
and is kept outside the :class:`~transfuse.distiller.Distiller`'s module tree, so it is
neither in ``distiller.parameters()`` (the optimizer) nor in its ``state_dict()``
(checkpoints). Anything with the same ``predict(batch)`` method can stand in for it,
such as a cache that answers by ``batch["index"]``.
"""

from __future__ import annotations

from typing import Iterable, Protocol, runtime_checkable

import torch
from torch import nn

from .taps import FeatureTaps

Outputs = dict[str, torch.Tensor]


def logits_of(output: object) -> torch.Tensor:
    """Logits from a model's output: a tensor, an object with ``.logits``, or a dict with ``"logits"``."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict) and "logits" in output:
        return output["logits"]
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    raise TypeError(
        f"cannot find logits in a model output of type {type(output).__name__}: return a tensor, "
        "a dict with 'logits', or an object with a .logits attribute"
    )


def model_input(batch: dict[str, torch.Tensor]) -> object:
    """What a model is called with: ``batch["input"]``, or the whole dict for token batches."""
    if "input" in batch:
        return batch["input"]
    return {k: v for k, v in batch.items() if k not in ("target", "index", "labels")}


@runtime_checkable
class TeacherLike(Protocol):
    """What the Distiller needs of a teacher."""

    def predict(self, batch: dict[str, torch.Tensor]) -> Outputs: ...


class Teacher(nn.Module):
    """A frozen, eval-locked model with optional feature taps.

    ``predict(batch)`` returns ``{"logits": (B, C), <tap path>: feature, ...}``, computed
    without autograd.
    """

    def __init__(self, model: nn.Module, *, taps: Iterable[str] = ()) -> None:
        super().__init__()
        self.model = model
        model.requires_grad_(False)
        self.taps = FeatureTaps(model, taps, role="teacher")
        super().train(False)

    def train(self, mode: bool = True) -> "Teacher":
        # Eval-locked: a student's train() must never switch on the teacher's dropout or
        # batch-norm statistics updates.
        return super().train(False)

    def add_taps(self, paths: Iterable[str]) -> None:
        """Tap more module paths (called while the Distiller is assembled)."""
        self.taps = FeatureTaps(self.model, [*self.taps.paths, *paths], role="teacher")

    @torch.no_grad()
    def predict(self, batch: dict[str, torch.Tensor]) -> Outputs:
        with self.taps:
            logits = logits_of(self.model(model_input(batch)))
        return {"logits": logits, **self.taps.collect()}

    def forward(self, batch: dict[str, torch.Tensor]) -> Outputs:  # noqa: D102
        return self.predict(batch)
