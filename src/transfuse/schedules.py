"""Weight schedules for loss terms: the factor a term's weight is multiplied by at a step.

DKD warms its loss up linearly over the first epochs; other methods ramp a term in or
out. A schedule is a pure function of the optimizer step, so a resumed run gets the same
weights as an uninterrupted one.
"""

from __future__ import annotations

from dataclasses import dataclass

from .registry import Registry

SCHEDULES: Registry[type["Schedule"]] = Registry("schedule")


class Schedule:
    """``factor(step) -> float`` multiplies a term's weight at optimizer step ``step`` (0-based)."""

    def factor(self, step: int) -> float:  # pragma: no cover - interface
        raise NotImplementedError


@SCHEDULES.register("constant", summary="always 1")
@dataclass(frozen=True)
class Constant(Schedule):
    """Factor 1 at every step."""

    def factor(self, step: int) -> float:
        return 1.0


@SCHEDULES.register("warmup", summary="linear ramp from 0 to 1 over `steps`, then 1 (DKD's warm-up)")
@dataclass(frozen=True)
class Warmup(Schedule):
    """``min((step + 1) / steps, 1)``: DKD multiplies its loss by ``min(epoch / warmup, 1)``;
    counting in steps gives the same ramp at a finer grain."""

    steps: int

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"warmup schedule needs steps >= 1, got {self.steps}")

    def factor(self, step: int) -> float:
        return min((step + 1) / self.steps, 1.0)


@SCHEDULES.register("linear", summary="linear from `start` to `end` over `steps`, then `end`")
@dataclass(frozen=True)
class Linear(Schedule):
    """Linear interpolation from ``start`` at step 0 to ``end`` at step ``steps``."""

    steps: int
    start: float = 0.0
    end: float = 1.0

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"linear schedule needs steps >= 1, got {self.steps}")

    def factor(self, step: int) -> float:
        frac = min(step / self.steps, 1.0)
        return self.start + (self.end - self.start) * frac
