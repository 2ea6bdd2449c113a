"""The loss-module contract, and the generic module that wraps a pure loss function.

A loss module holds hyper-parameters and any learnable part (a regressor, a projection
head, a memory bank); the arithmetic lives in :mod:`transfuse.functional`.

``forward(student, teacher, *, mask=None, weights=None, **needs)`` returns a scalar
tensor, where ``student`` and ``teacher`` are what the term routes to it (logits, or a
tapped feature), ``needs`` are the batch entries named in :attr:`DistillLoss.needs`
(``"target"`` for DKD and CE, ``"index"`` for CRD's memory bank), and ``mask``/``weights``
are as in :func:`transfuse.functional.reduce_positions` for a position-wise loss; a
batch-relation loss (``positionwise = False``) takes a bool ``(B,)`` sample mask and
refuses weights.
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar

import pydantic
import torch
from torch import nn

from .options import validate


class DistillLoss(nn.Module):
    """Base class of registered losses.

    Class attributes a subclass sets (they must agree with its registration):

    * ``needs`` -- batch keys passed to ``forward`` as keyword arguments.
    * ``uses_teacher`` -- False for supervised terms (CE) that never look at the teacher;
      a run whose terms all have ``uses_teacher=False`` never runs the teacher.
    * ``positionwise`` -- False for a batch-relation loss (mask selects samples, weights refused).
    * ``optional_needs`` -- batch keys passed only where the batch has them.

    A loss with per-step state may define ``begin_step(step)``: the Distiller calls it in
    training mode before each forward pass (every micro-batch), with the optimizer step.
    """

    needs: ClassVar[tuple[str, ...]] = ()
    #: Batch entries passed only where the batch has them (a mixup's ``target_b``, ``lam``).
    optional_needs: ClassVar[tuple[str, ...]] = ()
    uses_teacher: ClassVar[bool] = True
    positionwise: ClassVar[bool] = True

    @classmethod
    def from_shapes(
        cls,
        *,
        student_shape: tuple[int, ...],
        teacher_shape: tuple[int, ...] | None,
        num_train_samples: int,
        **options: Any,
    ) -> "DistillLoss":
        """Build the module once the shapes it compares are known.

        ``student_shape``/``teacher_shape`` are the per-sample shapes (no batch dim) of the
        two inputs, found by one probe forward pass. Losses with learnable parts that
        depend on them (FitNets' regressor, CRD's embeddings) override this; the rest just
        take their options.
        """
        return cls(**options)

    def forward(  # noqa: D401
        self,
        student: torch.Tensor,
        teacher: torch.Tensor | None,
        *,
        mask: torch.Tensor | None = None,
        weights: torch.Tensor | None = None,
        **needs: torch.Tensor,
    ) -> torch.Tensor:
        raise NotImplementedError


class FunctionLoss(DistillLoss):
    """A registered pure loss function as a module: the validated options, and a call.

    :func:`~transfuse.losses.register_loss` makes one subclass per function, setting
    ``fn``, ``loss_name``, ``options_model``, ``needs``, ``uses_teacher`` and
    ``positionwise``. Each option is an attribute (``loss.temperature``), read at every
    call, so changing it changes the next value. The call is
    ``fn(student, teacher, **needs, **options, mask=mask, weights=weights)``, without
    ``teacher`` when ``uses_teacher`` is False.
    """

    fn: ClassVar[Callable[..., torch.Tensor]]
    loss_name: ClassVar[str]
    options_model: ClassVar[type[pydantic.BaseModel]]

    def __init__(self, **options: Any) -> None:
        super().__init__()
        given = validate(self.options_model, options, name=self.loss_name)
        defaults = self.options_model()
        self.option_names = tuple(self.options_model.model_fields)
        for key in self.option_names:
            setattr(self, key, given.get(key, getattr(defaults, key)))

    @property
    def options(self) -> dict[str, Any]:
        """The current options, every one (defaults included)."""
        return {key: getattr(self, key) for key in self.option_names}

    def forward(
        self,
        student: torch.Tensor,
        teacher: torch.Tensor | None = None,
        *,
        mask: torch.Tensor | None = None,
        weights: torch.Tensor | None = None,
        **needs: torch.Tensor,
    ) -> torch.Tensor:
        if set(needs) != set(self.needs):
            raise TypeError(
                f"loss {self.loss_name!r} takes the batch entries {list(self.needs)} as keyword arguments, "
                f"got {sorted(needs)}"
            )
        inputs = (student, teacher) if self.uses_teacher else (student,)
        return type(self).fn(*inputs, **needs, **self.options, mask=mask, weights=weights)

    def extra_repr(self) -> str:
        return ", ".join(f"{key}={value}" for key, value in self.options.items())

    def __reduce__(self):
        # The class is made at registration, not importable by name; rebuild it from the
        # registry so the module pickles (spawned workers, torch.save of a whole model).
        return (_function_loss, (self.loss_name,), self.__getstate__())


def _function_loss(name: str) -> FunctionLoss:
    from .base import LOSSES

    cls = LOSSES.get(name).module
    return cls.__new__(cls)
