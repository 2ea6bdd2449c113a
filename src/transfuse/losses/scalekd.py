"""ScaleKD-lite: the cross-attention feature projector and dual-view feature mimicking.

Written after the paper (Fan, Li, Liu & Yao, ScaleKD: Strong Vision Transformers Could Be
Excellent Teachers, NeurIPS 2024, https://arxiv.org/abs/2411.06786) and the authors' code
(deep-optimization/ScaleKD: ``mmcls/models/dis_losses/fmdv2.py`` ``AttentionProjector`` and
``FreqMaskingDistillLossv2``, ``attention.py`` ``WindowMultiheadPosAttention``, and the
configurations in ``configs/distillers/``). The arithmetic of the loss is in
:mod:`transfuse.functional.scalekd`.

"Lite": the third component, teacher parameter perception (the projected student features
sent through the frozen teacher's last stage, and the stage-4 projector queried with the
result), is not built: a term sees two tapped maps, not the teacher's modules.
"""

from __future__ import annotations

import math
from typing import Annotated, Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ..functional._types import NonNegative, Positive
from ..functional.scalekd import scalekd_mimic
from .base import register_loss
from .module import DistillLoss

#: A head count where 0 means "automatic" (see :func:`auto_heads`).
HeadCount = Annotated[int, Field(ge=0)]

#: The FFN's hidden width over the teacher's width (mmcv ``FFN(feedforward_channels=teacher_dims * 4)``).
FFN_RATIO = 4
#: The official configurations use attention heads of width 128 (384 dims / 3 heads, 768 / 6).
HEAD_WIDTH = 128


def auto_heads(teacher_channels: int) -> int:
    """The largest head count ``<= teacher_channels / 128`` (at least 1) that divides the width."""
    heads = max(1, teacher_channels // HEAD_WIDTH)
    while teacher_channels % heads:
        heads -= 1
    return heads


def _map_shape(shape: tuple[int, ...], who: str) -> tuple[int, int, int]:
    if len(shape) != 3:
        raise ValueError(
            f"scalekd compares (C, H, W) maps; the {who}'s input has per-sample shape {tuple(shape)}: tap a map "
            "(the default 'map' layer of a zoo cnn/resnet/wrn/vit)"
        )
    return tuple(int(d) for d in shape)  # type: ignore[return-value]


class CrossAttentionProjector(nn.Module):
    """Student map ``(B, C_s, H_s, W_s)`` -> teacher-shaped map ``(B, C_t, H_t, W_t)``.

    ``conv3x3-BN-ReLU`` on the student map plus a learnable position embedding ``(C_s, H_s,
    W_s)`` (truncated normal, std 0.02) give the keys' and values' tokens; ``H_t * W_t``
    learnable queries of width ``C_t`` (``nn.Embedding``, then a position-wise linear layer
    + ReLU, the official ``1x1 conv + ReLU``) cross-attend to them with ``num_heads`` heads
    and logits scaled by ``softmax_scale / sqrt(head width)``, followed by an output
    projection; then ``y = LN(a) + FFN(LN(a))`` (mmcv's ``FFN``: ``Linear(C_t, 4 C_t)``,
    ReLU, ``Linear(4 C_t, C_t)``, identity shortcut). Tokens are read in row-major order.
    """

    def __init__(
        self, student_shape: tuple[int, int, int], teacher_shape: tuple[int, int, int], *, num_heads: int,
        softmax_scale: float,
    ) -> None:
        super().__init__()
        c_s, h_s, w_s = student_shape
        c_t, h_t, w_t = teacher_shape
        if c_t % num_heads:
            raise ValueError(f"scalekd: num_heads = {num_heads} must divide the teacher's {c_t} channels")
        self.teacher_shape = (c_t, h_t, w_t)
        self.num_heads, self.softmax_scale = num_heads, float(softmax_scale)
        self.proj_student = nn.Sequential(
            nn.Conv2d(c_s, c_s, kernel_size=3, padding=1), nn.BatchNorm2d(c_s), nn.ReLU(),
        )
        self.pos_embed = nn.Parameter(torch.zeros(1, c_s, h_s, w_s))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.query = nn.Embedding(h_t * w_t, c_t)
        self.proj_query = nn.Sequential(nn.Linear(c_t, c_t), nn.ReLU())
        self.q = nn.Linear(c_t, c_t)
        self.k = nn.Linear(c_s, c_t)
        self.v = nn.Linear(c_s, c_t)
        self.proj = nn.Linear(c_t, c_t)
        self.norm = nn.LayerNorm(c_t)
        self.ffn = nn.Sequential(nn.Linear(c_t, FFN_RATIO * c_t), nn.ReLU(), nn.Linear(FFN_RATIO * c_t, c_t))

    def forward(self, student_map: torch.Tensor) -> torch.Tensor:
        b = student_map.shape[0]
        c_t, h_t, w_t = self.teacher_shape
        heads, width = self.num_heads, c_t // self.num_heads
        keys_in = (self.proj_student(student_map) + self.pos_embed).flatten(2).transpose(1, 2)  # (B, N_s, C_s)
        queries = self.proj_query(self.query.weight).unsqueeze(0).expand(b, -1, -1)  # (B, N_t, C_t)

        def split(x: torch.Tensor) -> torch.Tensor:  # (B, N, C_t) -> (B, heads, N, width)
            return x.reshape(b, x.shape[1], heads, width).transpose(1, 2)

        q, k, v = split(self.q(queries)), split(self.k(keys_in)), split(self.v(keys_in))
        # The official logits are q k^T * width^-0.5 * softmax_scale: a sharper softmax.
        scale = self.softmax_scale / math.sqrt(width)
        attended = F.scaled_dot_product_attention(q, k, v, scale=scale)  # (B, heads, N_t, width)
        attended = self.proj(attended.transpose(1, 2).reshape(b, h_t * w_t, c_t))  # (B, N_t, C_t)
        normed = self.norm(attended)
        tokens = normed + self.ffn(normed)  # (B, N_t, C_t)
        return tokens.transpose(1, 2).reshape(b, c_t, h_t, w_t)  # (B, C_t, H_t, W_t)

    def extra_repr(self) -> str:
        return f"teacher_shape={self.teacher_shape}, num_heads={self.num_heads}, softmax_scale={self.softmax_scale}"


@register_loss(
    name="scalekd",
    kind="feature",
    summary="cross-attention projector + spatial and DC-free frequency mimicking of the teacher's map (ScaleKD-lite)",
    paper=(
        "Fan et al., ScaleKD: Strong Vision Transformers Could Be Excellent Teachers, NeurIPS 2024, "
        "https://arxiv.org/abs/2411.06786"
    ),
    weight=1.0,
    ce_weight=1.0,
    inputs="map",
)
class ScaleKD(DistillLoss):
    """ScaleKD-lite: ``alpha_s * spatial(P_0(S), T) + alpha_f * frequency(P_1(S), T)``.

    ``P_0``, ``P_1``: two :class:`CrossAttentionProjector` (one per view, as the official
    ``projector_0``/``projector_1``), built by :meth:`from_shapes` from the per-sample
    shapes of the student's and the teacher's maps (``(C, H, W)`` each; a ViT's patch
    tokens are a map too). The views are :func:`transfuse.functional.scalekd_mimic`.

    Options (official defaults): ``alpha_spatial=0.08``, ``alpha_frequency=0.06`` (the
    stage-3 ``alpha=[0.08, 0.06]`` of every configuration), ``softmax_scale=5.0``
    (``softmax_scale=[5., 5.]``), ``num_heads=0`` = automatic: the official heads are 128
    wide (``num_heads=3`` for 384 teacher channels, 6 for 768), so ``C_t / 128`` rounded down
    to a divisor of ``C_t``, at least 1.

    Position-wise, one value per sample (``mask``/``weights`` ``(B,)``). The projectors run
    on the whole batch, so in training their BatchNorm also sees masked-out samples.
    """

    def __init__(
        self,
        *,
        alpha_spatial: NonNegative = 0.08,
        alpha_frequency: NonNegative = 0.06,
        softmax_scale: Positive = 5.0,
        num_heads: HeadCount = 0,
    ) -> None:
        super().__init__()
        for what, value in (("alpha_spatial", alpha_spatial), ("alpha_frequency", alpha_frequency)):
            if not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"scalekd: {what} must be a finite number >= 0, got {value}")
        if not (softmax_scale > 0 and math.isfinite(softmax_scale)):
            raise ValueError(f"scalekd: softmax_scale must be finite and > 0, got {softmax_scale}")
        if num_heads < 0:
            raise ValueError(f"scalekd: num_heads must be >= 0 (0 = automatic), got {num_heads}")
        self.alpha_spatial, self.alpha_frequency = float(alpha_spatial), float(alpha_frequency)
        self.softmax_scale, self.num_heads = float(softmax_scale), int(num_heads)
        self.projector_spatial: nn.Module | None = None
        self.projector_frequency: nn.Module | None = None

    @classmethod
    def from_shapes(
        cls,
        *,
        student_shape: tuple[int, ...],
        teacher_shape: tuple[int, ...] | None,
        num_train_samples: int,
        **options: Any,
    ) -> "ScaleKD":
        if teacher_shape is None:
            raise ValueError("scalekd compares with the teacher's map; teacher_shape is required")
        loss = cls(**options)
        s_shape, t_shape = _map_shape(tuple(student_shape), "student"), _map_shape(tuple(teacher_shape), "teacher")
        heads = loss.num_heads or auto_heads(t_shape[0])
        loss.projector_spatial = CrossAttentionProjector(s_shape, t_shape, num_heads=heads,
                                                         softmax_scale=loss.softmax_scale)
        loss.projector_frequency = CrossAttentionProjector(s_shape, t_shape, num_heads=heads,
                                                           softmax_scale=loss.softmax_scale)
        return loss

    def forward(
        self,
        student: torch.Tensor,
        teacher: torch.Tensor,
        *,
        mask: torch.Tensor | None = None,
        weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if self.projector_spatial is None or self.projector_frequency is None:
            raise RuntimeError("scalekd: build the loss with from_shapes(student_shape=..., teacher_shape=...)")
        return scalekd_mimic(
            self.projector_spatial(student), teacher, self.projector_frequency(student),
            alpha_spatial=self.alpha_spatial, alpha_frequency=self.alpha_frequency, mask=mask, weights=weights,
        )

    def extra_repr(self) -> str:
        return (f"alpha_spatial={self.alpha_spatial}, alpha_frequency={self.alpha_frequency}, "
                f"softmax_scale={self.softmax_scale}, num_heads={self.num_heads or 'auto'}")


__all__ = ["CrossAttentionProjector", "ScaleKD", "auto_heads"]
