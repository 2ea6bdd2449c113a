"""A small CNN for little grayscale images (8x8 digits, 28x28 Fashion-MNIST), any ``(C, H, W)``."""

from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import torch
from torch import nn

from ._common import image_shape, init_conv_bn, positive_ints
from .base import MODELS


def conv_block(c_in: int, c_out: int, *, pool: bool, batch_norm: bool) -> nn.Sequential:
    """``conv3x3 -> BN -> ReLU -> maxpool2`` (BN and pooling optional)."""
    return nn.Sequential(
        OrderedDict(
            conv=nn.Conv2d(c_in, c_out, 3, padding=1, bias=not batch_norm),  # BN's shift makes a bias redundant
            bn=nn.BatchNorm2d(c_out) if batch_norm else nn.Identity(),
            # Not in place: a tap on ``conv`` or ``bn`` must keep the values it saw.
            relu=nn.ReLU(),
            pool=nn.MaxPool2d(2) if pool else nn.Identity(),
        )
    )


class SmallCNN(nn.Module):
    """Conv blocks, global average pooling, an optional hidden layer and a linear classifier.

    Module paths: ``features.block{i}`` (``i`` from 1), ``pool``, ``flatten``, ``hidden``,
    ``embedding`` (the classifier's input, ``(B, D)``) and ``classifier``. Taps: ``hint_layer``
    the middle block (``ceil(n / 2)``), ``map_layer`` the last, ``feature_layer`` the embedding.
    With ``global_pool=False`` the last map is flattened instead of averaged: a shallow
    CNN on 28x28 images needs the spatial layout (about 80 % vs 90 % on Fashion-MNIST).
    """

    def __init__(
        self, input_shape: tuple[int, int, int], channels: Sequence[int], num_classes: int, *, hidden: int = 0,
        batch_norm: bool = True, global_pool: bool = True,
    ) -> None:
        super().__init__()
        c, h, w = input_shape
        blocks: OrderedDict[str, nn.Module] = OrderedDict()
        for i, c_out in enumerate(channels, start=1):
            # Pool only while the map stays at least 2x2: 8x8 digits would vanish after three pools.
            pool = min(h, w) // 2 >= 2
            blocks[f"block{i}"] = conv_block(c, c_out, pool=pool, batch_norm=batch_norm)
            c = c_out
            if pool:
                h, w = h // 2, w // 2
        self.features = nn.Sequential(blocks)
        self.pool = nn.AdaptiveAvgPool2d(1) if global_pool else nn.Identity()
        self.flatten = nn.Flatten()
        flat = c if global_pool else c * h * w
        self.hidden = nn.Sequential(nn.Linear(flat, hidden), nn.ReLU()) if hidden else nn.Identity()
        self.embedding = nn.Identity()
        self.classifier = nn.Linear(hidden or flat, num_classes)
        self.feature_layer = "embedding"
        # FitNets' hint is the middle stage (block ceil(n/2): block 1 of 2, at half the depth);
        # the last block's output is the map before pooling.
        self.hint_layer = f"features.block{(len(channels) + 1) // 2}"
        self.map_layer = f"features.block{len(channels)}"
        init_conv_bn(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)  # (B, channels[-1], H', W')
        x = self.flatten(self.pool(x))  # (B, channels[-1]) or (B, channels[-1] * H' * W')
        x = self.embedding(self.hidden(x))  # (B, hidden or channels[-1])
        return self.classifier(x)  # (B, num_classes)


@MODELS.register("cnn", summary="small CNN: conv3x3-BN-ReLU-maxpool blocks, global average pooling, linear head")
def cnn(
    *,
    input_shape: tuple[int, ...],
    num_classes: int,
    channels: Sequence[int] = (32, 64),
    hidden: int = 0,
    batch_norm: bool = True,
    global_pool: bool = True,
) -> SmallCNN:
    """A :class:`SmallCNN`. ``channels``: output channels of each conv block; ``hidden``: width
    of an extra fully connected layer before the classifier (0: none); ``batch_norm``: False
    builds a BN-free model (no running statistics to synchronise across processes);
    ``global_pool``: average the last map over space (True) or flatten it (False).

    Taps: ``hint_layer`` = the middle conv block's output, block ``ceil(n / 2)`` of ``n``
    (block 1 of the default 2: the official FitNets code's middle stage, at half the depth)
    ``(B, C, H, W)``; ``map_layer`` = the last conv block's output (the map before pooling);
    ``feature_layer`` = the embedding ``(B, D)`` with ``D = hidden or channels[-1]``
    (``hidden or C*H*W`` unpooled).
    """
    shape = image_shape(input_shape, model="cnn")
    widths = positive_ints(channels, option="channels", model="cnn")
    if not widths:
        raise ValueError("model 'cnn': option 'channels' needs at least one block")
    if not isinstance(hidden, int) or hidden < 0:
        raise ValueError(f"model 'cnn': option 'hidden' must be an integer >= 0; got {hidden!r}")
    return SmallCNN(shape, widths, num_classes, hidden=hidden, batch_norm=batch_norm, global_pool=bool(global_pool))
