"""The contract every registered distillation loss module follows.

A loss module holds hyper-parameters and any learnable part (a regressor, a projection
head, a memory bank); the arithmetic lives in :mod:`transfuse.functional`.

``forward(student, teacher, **needs)`` returns a scalar tensor, where ``student`` and
``teacher`` are what the :class:`~transfuse.distiller.Term` routes to it (logits, or a
tapped feature) and ``needs`` are the batch entries named in :attr:`DistillLoss.needs`
(``"target"`` for DKD and CE, ``"index"`` for CRD's memory bank).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from ..registry import Registry

#: Every loss a config can name. Metadata per entry (see :func:`register_loss`).
LOSSES: Registry[type["DistillLoss"]] = Registry("method")


class DistillLoss(nn.Module):
    """Base class of registered losses.

    Class attributes a subclass sets:

    * ``needs`` -- batch keys passed to ``forward`` as keyword arguments.
    * ``uses_teacher`` -- False for supervised terms (CE) that never look at the teacher;
      a run whose terms all have ``uses_teacher=False`` never runs the teacher.
    """

    needs: ClassVar[tuple[str, ...]] = ()
    uses_teacher: ClassVar[bool] = True

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

    def forward(self, student: torch.Tensor, teacher: torch.Tensor | None, **needs: torch.Tensor) -> torch.Tensor:  # noqa: D401
        raise NotImplementedError


def register_loss(
    name: str,
    *,
    kind: str,
    paper: str,
    summary: str,
    weight: float,
    ce_weight: float,
    inputs: str = "logits",
):
    """Register a :class:`DistillLoss` subclass as a method users can name.

    ``kind``: ``"logits"``, ``"feature"`` or ``"relation"`` (for listings).
    ``paper``: citation with a link. ``summary``: one line for ``transfuse methods``.
    ``weight``/``ce_weight``: the paper's default weights of this term and of the
    cross-entropy term added beside it when a config names only ``method:``.
    ``inputs``: ``"logits"``, ``"feature"`` or ``"hint"`` -- what the term compares by default
    (``"feature"``: the model's penultimate embedding; ``"hint"``: its intermediate map).
    """
    return LOSSES.register(
        name, summary=summary, kind=kind, paper=paper, weight=weight, ce_weight=ce_weight, inputs=inputs
    )
