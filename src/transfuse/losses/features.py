"""Registered feature losses: FitNets (with its learnable regressor) and attention transfer.

Both read the ``hint`` (a zoo model's middle stage). Attention transfer's official code
sums the loss over every stage's output (``feat[1:-1]``); here one term compares one pair,
so add one term per stage (``input: student.layer1``, ...) for the full form.

Both are position-wise: one value per sample (or per token for FitNets with a ``(B, T)``
mask), reduced with the shared rule (``mask``, ``weights``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from .. import functional as TF
from .base import register_loss
from .module import DistillLoss


class _Resize(nn.Module):
    """Resize ``(B, C, H, W)`` maps to a fixed spatial size: average-pool down, bilinear up."""

    def __init__(self, size: tuple[int, int]) -> None:
        super().__init__()
        self.size = tuple(size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[2:]) == self.size:
            return x
        if all(s >= t for s, t in zip(x.shape[2:], self.size)):
            # Shrinking: pooling averages every input pixel instead of skipping some.
            return nn.functional.adaptive_avg_pool2d(x, self.size)
        return nn.functional.interpolate(x, size=self.size, mode="bilinear", align_corners=False)

    def extra_repr(self) -> str:
        return f"size={self.size}"


def build_regressor(student_shape: tuple[int, ...], teacher_shape: tuple[int, ...], *, relu: bool = False) -> nn.Module:
    """FitNets' regressor mapping per-sample student features to the teacher's shape.

    * ``(C_s, H_s, W_s) -> (C_t, H_t, W_t)``: resize to ``(H_t, W_t)`` (adaptive average
      pooling when shrinking, bilinear when growing), then a 3x3 convolution to ``C_t``
      channels and BatchNorm (+ ReLU if ``relu``), as in mdistiller's ``ConvReg``;
    * teacher ``(D_t,)``: flatten the student and apply a ``Linear`` to ``D_t``;
    * ``(..., D_s) -> (..., D_t)`` with equal leading dims (tokens): a ``Linear`` on the last dim.
    """
    student_shape, teacher_shape = tuple(student_shape), tuple(teacher_shape)
    act: list[nn.Module] = [nn.ReLU(inplace=False)] if relu else []
    if len(student_shape) == 3 and len(teacher_shape) == 3:
        c_s, c_t = student_shape[0], teacher_shape[0]
        return nn.Sequential(
            _Resize(teacher_shape[1:]),
            nn.Conv2d(c_s, c_t, kernel_size=3, padding=1, bias=False),  # BN supplies the bias
            nn.BatchNorm2d(c_t),
            *act,
        )
    if len(teacher_shape) == 1:
        return nn.Sequential(nn.Flatten(1), nn.Linear(math.prod(student_shape), teacher_shape[0]), *act)
    if len(student_shape) == len(teacher_shape) and student_shape[:-1] == teacher_shape[:-1]:
        return nn.Sequential(nn.Linear(student_shape[-1], teacher_shape[-1]), *act)
    raise ValueError(
        f"fitnet: no regressor maps student features {student_shape} to teacher features {teacher_shape}; "
        "tap (C, H, W) maps on both models, or a flat (D,) teacher feature"
    )


@register_loss(
    name="fitnet",
    kind="feature",
    summary="MSE between a learnable regression of the student's hint and the teacher's hint",
    paper="Romero et al., FitNets: Hints for Thin Deep Nets, ICLR 2015, https://arxiv.org/abs/1412.6550",
    weight=100.0,
    ce_weight=1.0,
    inputs="hint",
)
class FitNet(DistillLoss):
    """FitNets: ``mean((r(F_s) - F_t)^2)`` with a learnable regressor ``r``.

    Default input: the ``hint`` of both models, which zoo models declare as their middle
    stage (``layer2`` of ``resnet``/``wrn``, block ``ceil(n/2)`` of ``cnn``): the official
    code's ``--hint_layer 2`` (RepDistiller) / ``HINT_LAYER: 2`` (mdistiller), index 2 of
    ``[stem, stage1, stage2, stage3, pooled]``, and the paper's "middle layer".

    ``from_shapes`` builds ``r`` from the student's and teacher's per-sample shapes (see
    :func:`build_regressor`). Built directly (``FitNet()``), ``r`` is the identity, so the
    shapes must already match. ``relu`` appends a ReLU to the regressor: use it when the
    teacher's hint is taken after a ReLU (as mdistiller assumes); the default leaves the
    output unconstrained, so it can match hints with negative values too.

    ``mask``/``weights`` are those of :func:`transfuse.functional.fitnet` (per sample, or
    per token with a ``(B, T)`` mask). The regressor still runs on the whole batch, so in
    training a BatchNorm in it also sees masked-out samples in its batch statistics.
    """

    def __init__(self, *, relu: bool = False) -> None:
        super().__init__()
        self.relu = relu
        self.regressor: nn.Module = nn.Identity()

    @classmethod
    def from_shapes(
        cls,
        *,
        student_shape: tuple[int, ...],
        teacher_shape: tuple[int, ...] | None,
        num_train_samples: int,
        **options: Any,
    ) -> "FitNet":
        if teacher_shape is None:
            raise ValueError("fitnet compares with the teacher's features; teacher_shape is required")
        loss = cls(**options)
        loss.regressor = build_regressor(student_shape, teacher_shape, relu=loss.relu)
        return loss

    def forward(
        self,
        student: torch.Tensor,
        teacher: torch.Tensor,
        *,
        mask: torch.Tensor | None = None,
        weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return TF.fitnet(self.regressor(student), teacher, mask=mask, weights=weights)

    def extra_repr(self) -> str:
        return f"relu={self.relu}"


register_loss(
    TF.attention_transfer,
    name="at",
    kind="feature",
    summary="match L2-normalised spatial attention maps (channel mean of |A|^p)",
    paper=(
        "Zagoruyko & Komodakis, Paying More Attention to Attention: Improving the Performance of "
        "Convolutional Neural Networks via Attention Transfer, ICLR 2017, https://arxiv.org/abs/1612.03928"
    ),
    weight=1000.0,
    ce_weight=1.0,
    inputs="hint",
)
