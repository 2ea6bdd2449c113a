"""``build_model``: a zoo model by name, its options checked against its signature first."""

from __future__ import annotations

from typing import Any, Sequence

from torch import nn

from .base import MODELS


def build_model(name: str, *, input_shape: Sequence[int], num_classes: int, **options: Any) -> nn.Module:
    """The registered model ``name`` for inputs of ``input_shape`` (per sample) and ``num_classes``.

    An unknown name raises :class:`~transfuse.registry.UnknownNameError` listing the valid
    ones; an option the model does not take raises ``ValueError`` naming it.
    """
    MODELS.check_options(name, options, where="build_model")
    return MODELS.get(name)(input_shape=tuple(int(d) for d in input_shape), num_classes=int(num_classes), **options)
