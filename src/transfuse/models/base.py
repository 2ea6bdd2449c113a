"""The model zoo's registry and the convention its models follow.

A zoo model is a plain ``nn.Module`` mapping a batch of inputs to logits
``(B, num_classes)``. It also names module paths the feature taps use by default:

* ``feature_layer`` -- the penultimate embedding ``(B, D)`` (relation losses: RKD, PKT, CRD);
* ``hint_layer`` -- the middle stage's output, FitNets' hint (the official code bases'
  ``hint_layer: 2`` on a three-stage network); attention transfer reads it too;
* ``map_layer`` -- the last stage's output, the map before pooling (what the official code
  bases feed SP); an MLP, which has no map, names its last hidden layer.

"Stage ``i`` of ``n``" for the middle is ``ceil(n / 2)``: stage 2 of a ResNet's or WRN's
three, block 1 of a two-block CNN (the depth's midpoint), hidden layer 1 of 1 or 2.

Nothing else about the model changes: taps read these through forward hooks.
"""

from __future__ import annotations

from typing import Callable

from torch import nn

from ..registry import Registry

#: Models a config can name. Each entry is ``fn(*, input_shape, num_classes, **options) -> nn.Module``.
MODELS: Registry[Callable[..., nn.Module]] = Registry("model")
