"""A tiny Vision Transformer for little images (28x28 Fashion-MNIST, 8x8 digits), any ``(C, H, W)``.

Patches -> linear embedding + learned position embedding -> pre-norm transformer blocks
(``nn.TransformerEncoderLayer``) -> final LayerNorm -> the patch tokens as a map -> global
average pooling -> linear classifier. The patch tokens pass through their
``(B, D, H', W')`` map form at the middle block and at the end, so the feature taps see a
ViT exactly as they see a CNN: ``hint`` and ``map`` are ``(B, C, H, W)`` maps whose
positions are the patches, and the classifier reads the pooled map, as a CNN's does.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from ._common import image_shape
from .base import MODELS

#: The default patch grid: ``H/4 x W/4`` patches, 16 tokens (patch 7 on 28x28, patch 2 on 8x8).
DEFAULT_GRID = 4


class TokensToMap(nn.Module):
    """``(B, H'*W', D)`` tokens -> ``(B, D, H', W')`` map (row-major patch order), a view-like reshape."""

    def __init__(self, grid: tuple[int, int]) -> None:
        super().__init__()
        self.grid = tuple(grid)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        b, n, d = tokens.shape
        return tokens.transpose(1, 2).reshape(b, d, *self.grid)

    def extra_repr(self) -> str:
        return f"grid={self.grid}"


def map_to_tokens(feature_map: torch.Tensor) -> torch.Tensor:
    """``(B, D, H', W')`` -> ``(B, H'*W', D)``, the inverse of :class:`TokensToMap`."""
    return feature_map.flatten(2).transpose(1, 2)


class TinyViT(nn.Module):
    """A small ViT with mean-pooled tokens (no class token) and a linear head.

    Module paths: ``patch_embed`` (a convolution whose kernel and stride are the patch),
    ``blocks.block{i}`` (``i`` from 1; each an ``nn.TransformerEncoderLayer``, pre-norm,
    GELU, no dropout), ``hint_map`` (the middle block's tokens as a map), ``norm``,
    ``map`` (the normalised last tokens as a map), ``pool``, ``flatten``, ``embedding``
    (the classifier's input, ``(B, D)``) and ``classifier``. Taps: ``hint_layer`` =
    ``hint_map`` (after block ``ceil(depth / 2)``), ``map_layer`` = ``map``,
    ``feature_layer`` = ``embedding``.
    """

    def __init__(
        self, input_shape: tuple[int, int, int], num_classes: int, *, patch_size: tuple[int, int], dim: int,
        depth: int, heads: int, mlp_ratio: float,
    ) -> None:
        super().__init__()
        c, h, w = input_shape
        self.grid = (h // patch_size[0], w // patch_size[1])
        num_tokens = self.grid[0] * self.grid[1]
        self.patch_embed = nn.Conv2d(c, dim, kernel_size=patch_size, stride=patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, num_tokens, dim))
        self.blocks = nn.Sequential(OrderedDict(
            (f"block{i}", nn.TransformerEncoderLayer(
                d_model=dim, nhead=heads, dim_feedforward=max(1, round(dim * mlp_ratio)), dropout=0.0,
                activation="gelu", batch_first=True, norm_first=True,
            ))
            for i in range(1, depth + 1)
        ))
        self.middle = (depth + 1) // 2  # block ceil(depth / 2), as the CNN's middle block
        self.hint_map = TokensToMap(self.grid)
        self.norm = nn.LayerNorm(dim)
        self.map = TokensToMap(self.grid)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.embedding = nn.Identity()
        self.classifier = nn.Linear(dim, num_classes)
        self.feature_layer = "embedding"
        self.hint_layer = "hint_map"
        self.map_layer = "map"
        self._init_weights()

    def _init_weights(self) -> None:
        # The ViT paper's (and timm's) initialisation: truncated normal 0.02 for the position
        # embedding and every linear layer, zero biases, unit LayerNorms.
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = map_to_tokens(self.patch_embed(x)) + self.pos_embed  # (B, N, D), N = H' * W'
        for i, block in enumerate(self.blocks, start=1):
            tokens = block(tokens)  # (B, N, D)
            if i == self.middle:
                # Through the map form and back (a reshape): the hint tap sees (B, D, H', W').
                tokens = map_to_tokens(self.hint_map(tokens))
        feature_map = self.map(self.norm(tokens))  # (B, D, H', W')
        x = self.embedding(self.flatten(self.pool(feature_map)))  # (B, D)
        return self.classifier(x)  # (B, num_classes)


def _positive_int(value: object, *, option: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"model 'vit': option {option!r} must be a positive integer; got {value!r}")
    return value


@MODELS.register("vit", summary="tiny Vision Transformer: patch embedding, pre-norm blocks, mean-pooled tokens")
def vit(
    *,
    input_shape: tuple[int, ...],
    num_classes: int,
    patch_size: int | None = None,
    dim: int = 64,
    depth: int = 4,
    heads: int = 4,
    mlp_ratio: float = 2.0,
) -> TinyViT:
    """A :class:`TinyViT`. ``patch_size``: side of the square patches, which must divide the
    image's height and width (None: a 4x4 grid, ``H/4``, e.g. 7 on 28x28 and 2 on 8x8; a
    non-square image gets ``H/4 x W/4`` patches); ``dim``: token width; ``depth``: number of
    blocks; ``heads``: attention heads (must divide ``dim``); ``mlp_ratio``: the blocks'
    hidden width over ``dim``.

    Taps: ``map_layer`` = the final-normalised patch tokens as a map ``(B, dim, H/p, W/p)``
    (what the classifier pools); ``hint_layer`` = the tokens after block
    ``ceil(depth / 2)`` as the same kind of map; ``feature_layer`` = the pooled embedding
    ``(B, dim)``.
    """
    c, h, w = image_shape(input_shape, model="vit")
    for option, value in (("dim", dim), ("depth", depth), ("heads", heads)):
        _positive_int(value, option=option)
    if patch_size is None:
        if h % DEFAULT_GRID or w % DEFAULT_GRID:
            raise ValueError(
                f"model 'vit': the default patch size cuts the image into a {DEFAULT_GRID}x{DEFAULT_GRID} grid, "
                f"which needs height and width divisible by {DEFAULT_GRID}; got {h}x{w}: set options.patch_size "
                "to a common divisor of both"
            )
        patch = (h // DEFAULT_GRID, w // DEFAULT_GRID)
    else:
        _positive_int(patch_size, option="patch_size")
        if h % patch_size or w % patch_size:
            raise ValueError(
                f"model 'vit': option 'patch_size' = {patch_size} must divide the image's height and width ({h}x{w})"
            )
        patch = (patch_size, patch_size)
    if dim % heads:
        raise ValueError(f"model 'vit': option 'heads' = {heads} must divide option 'dim' = {dim}")
    if not (isinstance(mlp_ratio, (int, float)) and not isinstance(mlp_ratio, bool) and 0 < mlp_ratio < float("inf")):
        raise ValueError(f"model 'vit': option 'mlp_ratio' must be a finite number > 0; got {mlp_ratio!r}")
    return TinyViT((c, h, w), num_classes, patch_size=patch, dim=dim, depth=depth, heads=heads,
                   mlp_ratio=float(mlp_ratio))
