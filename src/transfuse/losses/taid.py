"""TAID: the KL to an interpolated target, whose interpolation ``t`` follows an adaptive schedule.

Written after the paper (Shing et al., ICLR 2025, https://arxiv.org/abs/2501.16937) and
the authors' ``src/distil_losses/taid.py`` (SakanaAI/TAID; option defaults from its
``src/arguments.py``). The arithmetic is :func:`transfuse.functional.taid.taid`; this
module holds ``t`` and its schedule as buffers, so a checkpoint of the Distiller carries
them and a resumed run continues the schedule exactly.
"""

from __future__ import annotations

import math
from typing import Annotated

import torch
from pydantic import Field

from ..functional._types import Probability
from ..functional.taid import taid
from .base import register_loss
from .module import DistillLoss

#: ``t_start``: a float in [0, 1) (the official code asserts ``0 <= t_start < 1``).
TStart = Annotated[float, Field(ge=0, lt=1, allow_inf_nan=False)]
#: ``t_end``: a float in (0, 1].
TEnd = Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)]
#: A step count where 0 means "not known".
StepCount = Annotated[int, Field(ge=0)]

#: The schedule's state: float buffers kept in float32 whatever precision the module is cast to.
_FLOAT_STATE = ("t", "momentum", "prev_loss", "pending_sum", "pending_count")


@register_loss(
    name="taid",
    kind="logits",
    summary="KL to a target interpolated from the (detached) student to the teacher, t raised adaptively",
    paper=(
        "Shing et al., TAID: Temporally Adaptive Interpolated Distillation for Efficient Knowledge Transfer "
        "in Language Models, ICLR 2025, https://arxiv.org/abs/2501.16937"
    ),
    weight=1.0,
    ce_weight=0.0,
)
class TAID(DistillLoss):
    """TAID: ``KL(p_t || q)``, ``p_t = softmax((1 - t) * stopgrad(z_s) + t * z_t)``, with ``t`` scheduled.

    The value at the current ``t`` is :func:`transfuse.functional.taid.taid`. After each
    optimizer step's loss ``J`` is known (the mean of that step's training-mode values),
    ``t`` is updated as in the authors' code:

    * the first step only records ``J_prev = J``;
    * then ``delta = (J_prev - J) / (J_prev + 1e-15)``,
      ``m <- beta * m + (1 - beta) * delta``,
      ``t <- min(t_end, max(t_lin, t + alpha * sigmoid(m) * (1 - t)))`` (``t <- t_lin``
      when ``adaptive`` is False), ``J_prev <- J``,

    where ``t_lin = t_start + (t_end - t_start) * s / total_steps`` for the step ``s``
    (0-based) whose loss ``J`` is, and ``t_lin = t_start`` when ``total_steps`` is 0
    (unknown): then only the adaptive rule raises ``t``. A run fills ``total_steps`` with
    ``train.steps`` unless the config gives it.

    **When the update happens.** The Distiller calls :meth:`begin_step` with the optimizer
    step before each training forward pass; the values of a step's micro-batches are
    summed and the update runs once, when the next step begins (so ``t`` changes once per
    optimizer step, also with gradient accumulation, and step ``s`` uses the ``t`` made
    from the losses of steps ``< s``, as in the official code). A module that is never
    told the step (used outside a Distiller) updates after every training-mode call.
    Evaluation-mode calls never update.

    State (buffers, in the Distiller's ``state_dict``): ``t``, ``momentum``, ``prev_loss``
    (``inf`` before the first step), ``step`` (the step the pending values belong to, or
    the next call's index), ``pending_sum``/``pending_count`` (a step's values not yet
    applied). They stay float32 when the module is cast to bf16/fp16 (a bf16 ``t`` could
    not hold increments of ``alpha * sigmoid(m) * (1 - t)``, about 1e-4). Under DDP the
    buffers are rank 0's (DDP broadcasts buffers before each forward).

    Defaults (official ``src/arguments.py``): ``t_start=0.4``, ``t_end=1.0``,
    ``alpha=5e-4``, ``beta=0.99``; the official scripts use ``t_start`` 0.4 (Phi-3 teacher)
    and 0.2 (Llama-2, StableLM). The official code updates ``t`` on every micro-batch
    (Lightning's ``training_step``) with the optimizer step's index; here it is once per
    optimizer step, from the mean over its micro-batches.
    """

    def __init__(
        self,
        *,
        t_start: TStart = 0.4,
        t_end: TEnd = 1.0,
        alpha: Probability = 5e-4,
        beta: Probability = 0.99,
        adaptive: bool = True,
        total_steps: StepCount = 0,
    ) -> None:
        super().__init__()
        if not 0.0 <= t_start < 1.0 or not 0.0 < t_end <= 1.0 or t_start > t_end:
            raise ValueError(f"taid: need 0 <= t_start < 1, 0 < t_end <= 1 and t_start <= t_end; "
                             f"got t_start={t_start}, t_end={t_end}")
        if not (0.0 <= alpha <= 1.0 and 0.0 <= beta <= 1.0):
            raise ValueError(f"taid: alpha and beta must be in [0, 1], got alpha={alpha}, beta={beta}")
        if total_steps < 0:
            raise ValueError(f"taid: total_steps must be >= 0 (0 = unknown), got {total_steps}")
        self.t_start, self.t_end, self.alpha, self.beta = float(t_start), float(t_end), float(alpha), float(beta)
        self.adaptive, self.total_steps = bool(adaptive), int(total_steps)
        self.register_buffer("t", torch.tensor(self.t_start, dtype=torch.float32))
        self.register_buffer("momentum", torch.zeros((), dtype=torch.float32))
        self.register_buffer("prev_loss", torch.tensor(math.inf, dtype=torch.float32))
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))
        self.register_buffer("pending_sum", torch.zeros((), dtype=torch.float32))
        self.register_buffer("pending_count", torch.zeros((), dtype=torch.float32))
        self._told_step = False  # True once a Distiller calls begin_step
        self._host_step: int | None = None  # a host copy of `step`, so begin_step need not synchronise

    # -- the loss ---------------------------------------------------------------------

    def forward(
        self,
        student: torch.Tensor,
        teacher: torch.Tensor,
        *,
        mask: torch.Tensor | None = None,
        weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        # A copy: the graph must not hold the buffer that the update below changes in place.
        value = taid(student, teacher, t=self.t.clone(), mask=mask, weights=weights)
        if self.training:
            observed = value.detach().to(torch.float32)
            if self._told_step:
                self.pending_sum.add_(observed)
                self.pending_count.add_(1.0)
            else:
                self._update(observed, torch.ones((), dtype=torch.bool, device=observed.device))
                self.step.add_(1)
                self._host_step = None
        return value

    # -- the schedule -----------------------------------------------------------------

    def begin_step(self, step: int) -> None:
        """The Distiller's call before each training forward pass of optimizer step ``step``.

        On the first call of a new step, the previous step's values (summed over its
        micro-batches) update ``t``; later calls of the same step change nothing.
        """
        self._told_step = True
        if self._host_step is None:
            self._host_step = int(self.step)  # one synchronisation after building or loading
        if step == self._host_step:
            return
        count = self.pending_count
        self._update(self.pending_sum / count.clamp_min(1.0), count > 0)
        self.pending_sum.zero_()
        self.pending_count.zero_()
        self.step.fill_(step)
        self._host_step = step

    def _update(self, loss: torch.Tensor, apply: torch.Tensor) -> None:
        """One update of ``t`` from the loss ``loss`` of step ``self.step``; a no-op where ``apply`` is False.

        All on the device, without a host synchronisation (``torch.where`` instead of branches).
        """
        with torch.no_grad():
            loss = loss.to(self.t.dtype)
            first = torch.isinf(self.prev_loss)  # the first step only records its loss
            delta = (self.prev_loss - loss) / (self.prev_loss + 1e-15)
            momentum = self.beta * self.momentum + (1 - self.beta) * delta
            if self.total_steps > 0:
                progress = self.step.to(self.t.dtype) / self.total_steps
                t_lin = (self.t_start + (self.t_end - self.t_start) * progress).clamp(max=self.t_end)
            else:
                t_lin = torch.full_like(self.t, self.t_start)
            if self.adaptive:
                t = torch.maximum(t_lin, self.t + self.alpha * torch.sigmoid(momentum) * (1 - self.t)).clamp(max=self.t_end)
            else:
                t = t_lin
            change = apply & ~first
            self.momentum.copy_(torch.where(change, momentum, self.momentum))
            self.t.copy_(torch.where(change, t, self.t))
            self.prev_loss.copy_(torch.where(apply, loss, self.prev_loss))

    # -- state ------------------------------------------------------------------------

    def _apply(self, fn, recurse=True):
        # Keep the schedule's float state in float32 under a cast to bf16/fp16 (Fabric's
        # "bf16-true" converts every floating buffer); moves between devices still apply.
        kept = {name: getattr(self, name) for name in _FLOAT_STATE}
        super()._apply(fn, recurse)
        for name, old in kept.items():
            new = getattr(self, name)
            if new.dtype != old.dtype:
                setattr(self, name, old.to(device=new.device))
        return self

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._host_step = None  # re-read from the loaded buffer at the next begin_step

    def extra_repr(self) -> str:
        return (f"t_start={self.t_start}, t_end={self.t_end}, alpha={self.alpha}, beta={self.beta}, "
                f"adaptive={self.adaptive}, total_steps={self.total_steps}")


__all__ = ["TAID"]
