"""The model zoo's registry and the convention its models follow.

A zoo model is a plain ``nn.Module`` mapping a batch of inputs to logits
``(B, num_classes)``. It also names two module paths the feature taps use by default:

* ``feature_layer`` -- the penultimate embedding ``(B, D)`` (relation losses: RKD, PKT, SP, CRD);
* ``hint_layer`` -- an intermediate representation (FitNets' hint, attention transfer).

Nothing else about the model changes: taps read these through forward hooks.
"""

from __future__ import annotations

from typing import Callable

from torch import nn

from ..registry import Registry

#: Models a config can name. Each entry is ``fn(*, input_shape, num_classes, **options) -> nn.Module``.
MODELS: Registry[Callable[..., nn.Module]] = Registry("model")
