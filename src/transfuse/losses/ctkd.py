"""CTKD: KD at a learnable temperature that is trained adversarially, with a curriculum.

Written after the paper (Li et al., Curriculum Temperature for Knowledge Distillation,
AAAI 2023, https://arxiv.org/abs/2211.16231) and the authors' code (zhengli97/CTKD):
``models/temp_global.py`` (``Global_T``: one parameter, initialised to 1, behind a
gradient reversal layer), ``helper/loops.py`` (``temp = t_start + t_end * sigmoid(.)``),
``train_student.py`` (``CosineDecay`` of the reversal factor; defaults) and
``scripts/run_cifar_distill.sh``/``run_imagenet_distill.sh`` (the settings used).
The arithmetic is in :mod:`transfuse.functional.ctkd`.
"""

from __future__ import annotations

import math
from typing import Annotated

import torch
from pydantic import Field
from torch import nn

from ..functional._types import NonNegative, Positive
from ..functional.ctkd import ctkd, ctkd_temperature, reverse_gradient
from .base import register_loss
from .module import DistillLoss

#: A step count where 0 means "not given".
StepCount = Annotated[int, Field(ge=0)]
#: Any finite float (the temperature's initial unconstrained parameter).
Finite = Annotated[float, Field(allow_inf_nan=False)]

#: The official curriculum lasts 10 of 240 epochs (CIFAR-100) and 5 of 120 (ImageNet): 1/24 of training.
CURRICULUM_FRACTION = 1 / 24


@register_loss(
    name="ctkd",
    kind="logits",
    summary="KD at a learnable temperature trained to raise the loss (gradient reversal), with a curriculum",
    paper=(
        "Li et al., Curriculum Temperature for Knowledge Distillation, AAAI 2023, "
        "https://arxiv.org/abs/2211.16231"
    ),
    weight=0.9,
    ce_weight=0.1,
)
class CTKD(DistillLoss):
    """CTKD (global temperature): ``T^2 * KL(softmax(z_t/T) || softmax(z_s/T))`` with a learned ``T``.

    ``T = min_temperature + temperature_range * sigmoid(theta)``, ``theta`` one learnable
    parameter (``temperature_logit``, initialised to ``init_logit``; optimised with the
    student, as :func:`transfuse.build.make_optimizers` adds a term's parameters to its
    input's optimizer). ``theta`` reaches the loss through a gradient reversal layer of
    strength ``lambda``, so the student minimises the loss while ``T`` is moved to
    maximise it: ``d theta = -lambda * dL/d theta``.

    The curriculum raises ``lambda`` from ``lambda_min`` to ``lambda_max`` along a cosine,
    ``lambda(s) = lambda_min + (lambda_max - lambda_min) * (1 - cos(pi * min((s + 1) / L, 1))) / 2``
    at optimizer step ``s`` (0-based), then holds it; ``L`` is ``curriculum_steps``, or
    ``round(total_steps / 24)`` when that is 0 (the official 10 of 240 CIFAR-100 epochs
    and 5 of 120 ImageNet epochs), and a run fills ``total_steps`` with ``train.steps``.
    With neither known, ``lambda = lambda_max`` from the start. The official curriculum
    is per epoch (epoch ``e`` from 1 uses ``e / L``); this one moves each step.

    The step comes from the Distiller (:meth:`begin_step`, before each training forward
    pass); a module used outside a Distiller counts its own training-mode calls. It is a
    buffer (``step``), so a resumed run continues the curriculum; ``theta`` is a
    parameter, in the checkpoint with its optimizer state.

    Defaults (official ``train_student.py`` and ``scripts/run_cifar_distill.sh``):
    ``min_temperature=1`` (``--t_start``), ``temperature_range=20`` (``--t_end``),
    ``init_logit=1`` (``torch.ones(1)``: ``T`` starts at ``1 + 20 * sigmoid(1) = 15.62``),
    reversal factor from 0 to -1 (``--decay_max 0 --decay_min -1``: ``lambda`` from 0 to 1),
    and the weights 0.9 (KD) and 0.1 (CE) of the CIFAR-100 script. The instance-wise
    variant (a temperature per sample from an MLP) is not in the official repository and
    is not built here; :func:`~transfuse.functional.ctkd.ctkd` takes per-position
    temperatures for it.
    """

    def __init__(
        self,
        *,
        min_temperature: Positive = 1.0,
        temperature_range: Positive = 20.0,
        init_logit: Finite = 1.0,
        lambda_min: NonNegative = 0.0,
        lambda_max: NonNegative = 1.0,
        curriculum_steps: StepCount = 0,
        total_steps: StepCount = 0,
    ) -> None:
        super().__init__()
        for what, value in (("min_temperature", min_temperature), ("temperature_range", temperature_range)):
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"ctkd: {what} must be finite and > 0, got {value}")
        if not (0.0 <= lambda_min <= lambda_max and math.isfinite(lambda_max)):
            raise ValueError(f"ctkd: need 0 <= lambda_min <= lambda_max, got {lambda_min} and {lambda_max}")
        if curriculum_steps < 0 or total_steps < 0:
            raise ValueError("ctkd: curriculum_steps and total_steps must be >= 0 (0 = not given)")
        self.min_temperature, self.temperature_range = float(min_temperature), float(temperature_range)
        self.init_logit = float(init_logit)
        self.lambda_min, self.lambda_max = float(lambda_min), float(lambda_max)
        self.curriculum_steps, self.total_steps = int(curriculum_steps), int(total_steps)
        self.temperature_logit = nn.Parameter(torch.tensor(self.init_logit))
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))
        self._told_step = False  # True once a Distiller calls begin_step

    @property
    def curriculum_length(self) -> int:
        """``L``, the curriculum's length in optimizer steps (0: none, ``lambda = lambda_max``)."""
        if self.curriculum_steps:
            return self.curriculum_steps
        return max(1, round(self.total_steps * CURRICULUM_FRACTION)) if self.total_steps else 0

    def strength(self) -> torch.Tensor:
        """The reversal strength ``lambda`` at the current step (a 0-dim tensor, no host synchronisation)."""
        length = self.curriculum_length
        if length == 0:
            return torch.full((), self.lambda_max, device=self.step.device)
        progress = ((self.step + 1).to(torch.float32) / length).clamp(max=1.0)
        ramp = (1 - torch.cos(math.pi * progress)) / 2
        return self.lambda_min + (self.lambda_max - self.lambda_min) * ramp

    @property
    def temperature(self) -> torch.Tensor:
        """The current temperature (detached), e.g. for logging."""
        return ctkd_temperature(self.temperature_logit.detach(), min_temperature=self.min_temperature,
                                temperature_range=self.temperature_range)

    def begin_step(self, step: int) -> None:
        """The Distiller's call before each training forward pass of optimizer step ``step``."""
        self._told_step = True
        self.step.fill_(step)

    def forward(
        self,
        student: torch.Tensor,
        teacher: torch.Tensor,
        *,
        mask: torch.Tensor | None = None,
        weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        logit = reverse_gradient(self.temperature_logit, self.strength())
        temperature = ctkd_temperature(logit, min_temperature=self.min_temperature,
                                       temperature_range=self.temperature_range)
        value = ctkd(student, teacher, temperature, mask=mask, weights=weights)
        if self.training and not self._told_step:
            self.step.add_(1)
        return value

    def extra_repr(self) -> str:
        return (f"min_temperature={self.min_temperature}, temperature_range={self.temperature_range}, "
                f"lambda=[{self.lambda_min}, {self.lambda_max}], curriculum_steps={self.curriculum_length}")


__all__ = ["CTKD", "CURRICULUM_FRACTION"]
