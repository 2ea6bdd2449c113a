"""TRG: distillation via a token-level relationship graph, with its learnable projection.

Written after the paper (Zhang, Liu & He, Knowledge Distillation via Token-level
Relationship Graph, 2023, https://arxiv.org/abs/2306.12442); there is no official code.
The arithmetic is in :mod:`transfuse.functional.trg`.
"""

from __future__ import annotations

import math
from typing import Annotated, Any

import torch
from pydantic import Field
from torch import nn

from ..functional._types import NonNegative, Positive, PositiveInt, Temperature
from ..functional.trg import trg, trg_temperature
from .base import register_loss
from .module import DistillLoss

#: A step count where 0 means "not given".
StepCount = Annotated[int, Field(ge=0)]


def _token_width(shape: tuple[int, ...], who: str) -> int:
    """The width of one token: ``C`` of a ``(C, H, W)`` map, ``D`` of ``(N, D)`` tokens."""
    if len(shape) == 3:
        return int(shape[0])
    if len(shape) == 2:
        return int(shape[1])
    raise ValueError(
        f"trg relates tokens; the {who}'s input has per-sample shape {tuple(shape)}: tap a (C, H, W) map or "
        "(N, D) tokens (the default 'map' layer of a zoo cnn/resnet/wrn/vit)"
    )


@register_loss(
    name="trg",
    kind="relation",
    summary="token-level relationship graph: inner-image context, k-NN local structure, annealed InfoNCE over tokens",
    paper=(
        "Zhang, Liu & He, Knowledge Distillation via Token-level Relationship Graph, 2023, "
        "https://arxiv.org/abs/2306.12442"
    ),
    weight=1.0,
    ce_weight=1.0,
    inputs="map",
    positionwise=False,
)
class TRG(DistillLoss):
    """TRG: ``alpha * L_inner + beta * L_local + gamma * L_global`` over the two maps' tokens
    (:func:`transfuse.functional.trg`).

    :meth:`from_shapes` adds ``projection``, a ``Linear(C_s -> C_t)`` applied to each drawn
    student token before the global InfoNCE (trained with the student). The global loss's
    temperature goes from ``temperature_start`` to ``temperature_end`` along a half cosine
    over ``total_steps`` optimizer steps (a run fills it with ``train.steps``; without it,
    ``temperature_end``). The step comes from the Distiller (:meth:`begin_step`) and is a
    buffer, so a resumed run continues the schedule. The paper's logit term is the run's
    ``kd``/``ce`` terms (``configs/digits/trg.yaml``).

    The paper gives the loss's form but the values of its options are not in the text we
    could read and there is no official code: ``alpha = beta = gamma = 1``,
    ``tokens_per_image=8``, ``k=8``, ``sigma=1`` (on L2-normalised tokens) and the
    temperature from 1.0 to 0.1 are this implementation's choices.
    """

    positionwise = False

    def __init__(
        self,
        *,
        alpha: NonNegative = 1.0,
        beta: NonNegative = 1.0,
        gamma: NonNegative = 1.0,
        tokens_per_image: PositiveInt = 8,
        k: PositiveInt = 8,
        sigma: Positive = 1.0,
        temperature_start: Temperature = 1.0,
        temperature_end: Temperature = 0.1,
        total_steps: StepCount = 0,
    ) -> None:
        super().__init__()
        for what, value in (("alpha", alpha), ("beta", beta), ("gamma", gamma)):
            if not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"trg: {what} must be a finite number >= 0, got {value}")
        for what, value in (("sigma", sigma), ("temperature_start", temperature_start),
                            ("temperature_end", temperature_end)):
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"trg: {what} must be finite and > 0, got {value}")
        if tokens_per_image < 1 or k < 1 or total_steps < 0:
            raise ValueError("trg: tokens_per_image and k must be >= 1, total_steps >= 0 (0 = not given)")
        self.alpha, self.beta, self.gamma = float(alpha), float(beta), float(gamma)
        self.tokens_per_image, self.k, self.sigma = int(tokens_per_image), int(k), float(sigma)
        self.temperature_start, self.temperature_end = float(temperature_start), float(temperature_end)
        self.total_steps = int(total_steps)
        self.projection: nn.Module = nn.Identity()
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))
        self._told_step: int | None = None  # the step of the last begin_step, as a Python int (no device read)

    @classmethod
    def from_shapes(
        cls,
        *,
        student_shape: tuple[int, ...],
        teacher_shape: tuple[int, ...] | None,
        num_train_samples: int,
        **options: Any,
    ) -> "TRG":
        if teacher_shape is None:
            raise ValueError("trg relates the student's tokens to the teacher's; teacher_shape is required")
        loss = cls(**options)
        d_s, d_t = _token_width(tuple(student_shape), "student"), _token_width(tuple(teacher_shape), "teacher")
        loss.projection = nn.Linear(d_s, d_t)
        return loss

    @property
    def temperature(self) -> float:
        """The global loss's temperature at the current step."""
        step = self._told_step if self._told_step is not None else int(self.step)
        return trg_temperature(step, self.total_steps, start=self.temperature_start, end=self.temperature_end)

    def begin_step(self, step: int) -> None:
        """The Distiller's call before each training forward pass of optimizer step ``step``."""
        self._told_step = int(step)
        self.step.fill_(step)

    def forward(
        self,
        student: torch.Tensor,
        teacher: torch.Tensor,
        *,
        mask: torch.Tensor | None = None,
        weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return trg(
            student, teacher, projection=self.projection, alpha=self.alpha, beta=self.beta, gamma=self.gamma,
            tokens_per_image=self.tokens_per_image, k=self.k, sigma=self.sigma, temperature=self.temperature,
            mask=mask, weights=weights,
        )

    def extra_repr(self) -> str:
        return (f"alpha={self.alpha}, beta={self.beta}, gamma={self.gamma}, tokens_per_image={self.tokens_per_image}, "
                f"k={self.k}, sigma={self.sigma}, temperature={self.temperature_start}->{self.temperature_end}")


__all__ = ["TRG"]
