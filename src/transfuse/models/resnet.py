"""CIFAR-style ResNets (He et al., 2016, section 4.2) as used throughout the KD literature.

Depth ``6n + 2``: a 3x3 stem, three stages of ``n`` BasicBlocks with widths
``[w, 2w, 4w]`` (strides 1, 2, 2), global average pooling and a linear classifier.
``depth=20, width=16`` is resnet20 (0.27 M parameters); ``depth=32, width=64,
stem_width=32`` is the "resnet32x4" of the CRD/DKD benchmarks (stages 64-128-256 after a
32-channel stem, 7.43 M parameters for 100 classes). https://arxiv.org/abs/1512.03385

Wide ResNets (Zagoruyko & Komodakis, 2016): WRN-depth-k with pre-activation blocks.

Depth ``6n + 4``: a 3x3 stem with 16 channels, three stages of ``n`` blocks with widths
``[16k, 32k, 64k]`` (strides 1, 2, 2), a closing BN-ReLU, global average pooling and a
linear classifier. WRN-16-2 has 0.70 M parameters, WRN-40-2 2.25 M (the CRD teacher/student
pairs, for 100 classes). https://arxiv.org/abs/1605.07146
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from ._common import image_shape, init_conv_bn
from .base import MODELS


class BasicBlock(nn.Module):
    """``conv3x3-BN-ReLU-conv3x3-BN`` plus a shortcut, then ReLU. A 1x1 conv + BN projects the
    shortcut when the shape changes (option B of the paper, as in the CRD code)."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))  # (B, c_out, H/stride, W/stride)
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """Stem, ``layer1..layer3``, pooling, ``embedding`` (the classifier's input) and ``classifier``."""

    def __init__(self, in_channels: int, depth: int, width: int, num_classes: int, *, stem_width: int | None = None) -> None:
        super().__init__()
        n = (depth - 2) // 6
        widths = [width, 2 * width, 4 * width]
        c = stem_width or width
        self.stem = nn.Sequential(
            OrderedDict(conv=nn.Conv2d(in_channels, c, 3, padding=1, bias=False), bn=nn.BatchNorm2d(c), relu=nn.ReLU())
        )
        for i, (w, stride) in enumerate(zip(widths, (1, 2, 2)), start=1):
            blocks = [BasicBlock(c if j == 0 else w, w, stride if j == 0 else 1) for j in range(n)]
            self.add_module(f"layer{i}", nn.Sequential(*blocks))
            c = w
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.embedding = nn.Flatten()
        self.classifier = nn.Linear(c, num_classes)
        self.feature_layer = "embedding"
        # The official code bases' stage indices: feats[2] (FitNets' hint) = layer2,
        # feats[-2] / feats[-1] before pooling (SP) = layer3.
        self.hint_layer = "layer2"
        self.map_layer = "layer3"
        init_conv_bn(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)  # (B, stem_width, H, W)
        x = self.layer1(x)  # (B, w, H, W)
        x = self.layer2(x)  # (B, 2w, H/2, W/2)
        x = self.layer3(x)  # (B, 4w, H/4, W/4)
        x = self.embedding(self.pool(x))  # (B, 4w)
        return self.classifier(x)  # (B, num_classes)


@MODELS.register("resnet", summary="CIFAR-style ResNet (depth 6n+2: resnet8/14/20/32/56/110; width 64 = 'x4')")
def resnet(
    *, input_shape: tuple[int, ...], num_classes: int, depth: int = 20, width: int = 16, stem_width: int | None = None
) -> CifarResNet:
    """A :class:`CifarResNet`. ``depth``: 6n+2 (8, 14, 20, 32, 44, 56, 110); ``width``: channels
    of the first stage (stages are ``[width, 2*width, 4*width]``); ``stem_width``: channels of
    the stem (default ``width``). resnet8x4/resnet32x4 of the KD benchmarks: ``width=64, stem_width=32``.

    Taps: ``hint_layer`` = ``layer2`` output ``(B, 2*width, H/2, W/2)`` (FitNets' middle stage,
    ``hint_layer: 2`` in RepDistiller and mdistiller); ``map_layer`` = ``layer3`` output
    ``(B, 4*width, H/4, W/4)`` (the map before pooling, SP's layer); ``feature_layer`` = the
    pooled embedding ``(B, 4*width)``.
    """
    c, _, _ = image_shape(input_shape, model="resnet")
    if not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
        raise ValueError(f"model 'resnet': depth must be 6n+2 with n >= 1 (8, 14, 20, 32, 44, 56, 110); got {depth!r}")
    if not isinstance(width, int) or width < 1:
        raise ValueError(f"model 'resnet': width must be a positive integer; got {width!r}")
    if stem_width is not None and (not isinstance(stem_width, int) or stem_width < 1):
        raise ValueError(f"model 'resnet': stem_width must be a positive integer or null; got {stem_width!r}")
    return CifarResNet(c, depth, width, num_classes, stem_width=stem_width)


class WideBlock(nn.Module):
    """Pre-activation block: ``BN-ReLU-conv3x3-BN-ReLU-dropout-conv3x3`` plus a shortcut.

    When the shape changes the shortcut is a 1x1 conv of the *pre-activated* input, as in
    the authors' code, so BN-ReLU is applied once and shared by both paths.
    """

    def __init__(self, c_in: int, c_out: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu2 = nn.ReLU()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.projection = None if (stride == 1 and c_in == c_out) else nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.relu1(self.bn1(x))  # (B, c_in, H, W)
        out = self.conv1(pre)  # (B, c_out, H/stride, W/stride)
        out = self.conv2(self.dropout(self.relu2(self.bn2(out))))
        shortcut = x if self.projection is None else self.projection(pre)
        return out + shortcut


class WideResNet(nn.Module):
    """Stem, ``layer1..layer3``, ``final`` (BN-ReLU), pooling, ``embedding``, ``classifier``."""

    def __init__(self, in_channels: int, depth: int, widen_factor: int, num_classes: int, dropout: float) -> None:
        super().__init__()
        n = (depth - 4) // 6
        widths = [16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.stem = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        c = 16
        for i, (w, stride) in enumerate(zip(widths, (1, 2, 2)), start=1):
            blocks = [WideBlock(c if j == 0 else w, w, stride if j == 0 else 1, dropout) for j in range(n)]
            self.add_module(f"layer{i}", nn.Sequential(*blocks))
            c = w
        self.final = nn.Sequential(nn.BatchNorm2d(c), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.embedding = nn.Flatten()
        self.classifier = nn.Linear(c, num_classes)
        self.feature_layer = "embedding"
        # The stages' raw outputs, as the official code bases tap them (pre-activation blocks
        # leave them un-normalised; FitNets' regressor has no ReLU by default, so it can
        # match them): layer2 is FitNets' hint, layer3 (before the closing BN-ReLU) SP's map.
        self.hint_layer = "layer2"
        self.map_layer = "layer3"
        init_conv_bn(self)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)  # (B, 16, H, W)
        x = self.layer1(x)  # (B, 16k, H, W)
        x = self.layer2(x)  # (B, 32k, H/2, W/2)
        x = self.final(self.layer3(x))  # (B, 64k, H/4, W/4)
        x = self.embedding(self.pool(x))  # (B, 64k)
        return self.classifier(x)  # (B, num_classes)


@MODELS.register("wrn", summary="Wide ResNet WRN-depth-k (depth 6n+4, pre-activation blocks)")
def wrn(
    *, input_shape: tuple[int, ...], num_classes: int, depth: int = 16, widen_factor: int = 2, dropout: float = 0.0
) -> WideResNet:
    """A :class:`WideResNet`. ``depth``: 6n+4 (10, 16, 22, 28, 40, ...); ``widen_factor``: k;
    ``dropout``: between the two convolutions of each block (the paper uses 0.3 on CIFAR).

    Taps: ``hint_layer`` = ``layer2`` output ``(B, 32k, H/2, W/2)`` (FitNets' middle stage, raw
    as in the official code); ``map_layer`` = ``layer3`` output before the closing BN-ReLU
    ``(B, 64k, H/4, W/4)`` (SP's layer in the official code); ``feature_layer`` = the pooled
    embedding ``(B, 64k)``.
    """
    c, _, _ = image_shape(input_shape, model="wrn")
    if not isinstance(depth, int) or depth < 10 or (depth - 4) % 6:
        raise ValueError(f"model 'wrn': depth must be 6n+4 with n >= 1 (10, 16, 22, 28, 40); got {depth!r}")
    if not isinstance(widen_factor, int) or widen_factor < 1:
        raise ValueError(f"model 'wrn': widen_factor must be a positive integer; got {widen_factor!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"model 'wrn': dropout must be in [0, 1); got {dropout}")
    return WideResNet(c, depth, widen_factor, num_classes, dropout)
