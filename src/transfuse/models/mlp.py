"""A multi-layer perceptron: flatten, then ``Linear -> activation -> dropout`` per hidden layer."""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Literal, Sequence

import torch
from torch import nn

from ._common import positive_ints
from .base import MODELS

_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU}


class MLP(nn.Module):
    """Flatten ``(B, *input_shape)`` and map it through hidden layers to ``(B, num_classes)``.

    Module paths: ``layers.fc{i}``, ``layers.act{i}``, ``layers.drop{i}`` (``i`` from 1),
    ``embedding`` (the classifier's input) and ``classifier``.
    """

    def __init__(
        self, in_features: int, hidden: Sequence[int], num_classes: int, *, activation: str = "relu", dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.flatten = nn.Flatten()
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        width = in_features
        for i, h in enumerate(hidden, start=1):
            layers[f"fc{i}"] = nn.Linear(width, h)
            # One activation module per layer: a shared one would fire its hook once per layer.
            layers[f"act{i}"] = _ACTIVATIONS[activation]()
            if dropout > 0:
                layers[f"drop{i}"] = nn.Dropout(dropout)
            width = h
        self.layers = nn.Sequential(layers)
        self.embedding = nn.Identity()
        self.classifier = nn.Linear(width, num_classes)
        # The penultimate embedding is the last activation's output (before dropout, so a
        # feature loss sees the same vector in train and eval mode); the hint is the middle
        # one, ceil(L / 2); an MLP has no conv map, so its "last map" is the last hidden layer.
        # With no hidden layer all fall back to the flattened input.
        self.feature_layer = f"layers.act{len(hidden)}" if hidden else "flatten"
        self.hint_layer = f"layers.act{(len(hidden) + 1) // 2}" if hidden else "flatten"
        self.map_layer = self.feature_layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.flatten(x)  # (B, prod(input_shape))
        x = self.layers(x)  # (B, hidden[-1])
        return self.classifier(self.embedding(x))  # (B, num_classes)


@MODELS.register("mlp", summary="multi-layer perceptron on the flattened input")
def mlp(
    *,
    input_shape: tuple[int, ...],
    num_classes: int,
    hidden: Sequence[int] = (128,),
    activation: Literal["relu", "gelu"] = "relu",
    dropout: float = 0.0,
) -> MLP:
    """An :class:`MLP`. ``hidden``: widths of the hidden layers (``[]``: a linear classifier);
    ``activation``: ``relu`` or ``gelu``; ``dropout``: probability after each activation.

    Taps: ``feature_layer`` = last hidden activation ``(B, hidden[-1])``; ``hint_layer`` = the
    middle hidden activation, layer ``ceil(L / 2)`` of ``L`` (the first for one or two);
    ``map_layer`` = ``feature_layer`` (an MLP has no conv map; SP's official layer is the
    last one before pooling, and the last hidden layer stands in for it).
    """
    widths = positive_ints(hidden, option="hidden", model="mlp")  # [] is allowed
    if activation not in _ACTIVATIONS:
        raise ValueError(f"model 'mlp': activation must be one of {sorted(_ACTIVATIONS)}; got {activation!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"model 'mlp': dropout must be in [0, 1); got {dropout}")
    in_features = math.prod(int(d) for d in input_shape)
    return MLP(in_features, widths, num_classes, activation=activation, dropout=dropout)
