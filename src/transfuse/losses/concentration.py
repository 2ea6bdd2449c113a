"""Knowledge Concentration's student loss, with a learnable scale per vertical (class group).

Written after the paper (Gao, Guo, Li, Nevatia, Knowledge Concentration: Learning 100K
Object Classifiers in a Single CNN, 2017, https://arxiv.org/abs/1711.07607); there is no
official code. The arithmetic is in :mod:`transfuse.functional.concentration`; the
scheme that sets up the specialists and their routing is
:mod:`transfuse.schemes.concentration` (``knowledge_concentration``).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch import nn

from ..functional._types import Positive, PositiveInt, Temperature
from ..functional.concentration import knowledge_concentration
from .base import register_loss
from .module import DistillLoss

PAPER = ("Gao et al., Knowledge Concentration: Learning 100K Object Classifiers in a Single CNN, 2017, "
         "https://arxiv.org/abs/1711.07607")


def check_groups(groups: list[list[int]], *, num_classes: int | None = None, what: str = "groups") -> None:
    """Refuse class groups that are empty, overlap, or (given ``num_classes``) name a class
    the logits do not have or leave a class without a group. Messages name the classes."""
    if not groups:
        raise ValueError(f"{what}: expected at least one class group, got none")
    owner: dict[int, int] = {}
    for v, group in enumerate(groups):
        if not group:
            raise ValueError(f"{what}: group {v} is empty; every vertical needs at least one class")
        for cls in group:
            if isinstance(cls, bool) or not isinstance(cls, int) or cls < 0:
                raise ValueError(f"{what}: group {v} holds {cls!r}; class ids are ints >= 0")
            if cls in owner:
                where = f"groups {owner[cls]} and {v}" if owner[cls] != v else f"group {v} twice"
                raise ValueError(f"{what}: class {cls} is in {where}; the verticals must be disjoint")
            owner[cls] = v
    if num_classes is None:
        return
    outside = sorted(c for c in owner if c >= num_classes)
    if outside:
        raise ValueError(f"{what}: class(es) {outside} are not classes of the {num_classes}-class logits")
    missing = [c for c in range(num_classes) if c not in owner]
    if missing:
        raise ValueError(f"{what}: class(es) {missing} of the {num_classes} are in no group; every class must belong to "
                         "exactly one vertical (one specialist)")


@register_loss(
    name="concentration",
    kind="logits",
    summary="sigmoid CE with the top-K probabilities of the specialist of the sample's class group, on L2-normalised "
            "logits times a learnable scale per group",
    paper=PAPER,
    weight=1.0,
    ce_weight=0.0,
    needs=("target",),
)
class Concentration(DistillLoss):
    """Knowledge Concentration: the student learns each sample from the specialist of its vertical.

    ``-(1/N_b) sum_i sum_j [z*_ij log sigmoid(x_ij) + (1 - z*_ij) log(1 - sigmoid(x_ij))]``
    (:func:`transfuse.functional.knowledge_concentration`). ``z*_i``: the target's
    probabilities (``teacher_activation`` of the logits at ``temperature``) kept at their
    ``top_k`` classes, 0 elsewhere -- the target being the specialist of sample ``i``'s
    vertical, which a ``by_class_group`` source picks. ``x_i``: with ``self_paced`` (the
    paper's self-paced learning), the student's logits L2-normalised and multiplied by
    ``gamma_v``, a learnable scale of sample ``i``'s vertical ``v``, initialised to
    ``sqrt(N_v)`` (``N_v``: the classes of vertical ``v``) or to ``gamma_init`` when given;
    without it, the plain logits.

    ``groups``: the class ids of each vertical, in the order of the specialists (a
    partition of the classes; checked against the logits when the term is built). The
    sample's vertical is the group of its label (``target``), so samples without a label
    are left out by the default mask. None: one vertical of every class. The scales
    ``gamma`` ``(V,)`` are a parameter, optimised with the student (its optimizer's
    weight decay included) and checkpointed.
    """

    needs = ("target",)

    def __init__(
        self,
        *,
        groups: list[list[int]] | None = None,
        top_k: PositiveInt = 100,
        temperature: Temperature = 1.0,
        teacher_activation: Literal["softmax", "sigmoid"] = "softmax",
        self_paced: bool = True,
        gamma_init: Positive | None = None,
    ) -> None:
        super().__init__()
        if groups is not None:
            groups = [[int(c) for c in g] for g in groups]
            check_groups(groups)
        self.groups = groups
        self.top_k = top_k
        self.temperature = temperature
        self.teacher_activation = teacher_activation
        self.self_paced = self_paced
        self.gamma_init = gamma_init
        sizes = [len(g) for g in groups] if groups is not None else [1]
        table = torch.zeros(1, dtype=torch.long)  # one vertical of every class
        if groups is not None:
            table = torch.full((max(c for g in groups for c in g) + 1,), -1, dtype=torch.long)
            for v, group in enumerate(groups):
                table[group] = v
        # Config, not state: rebuilt from the options, so kept out of checkpoints.
        self.register_buffer("group_of_class", table, persistent=False)  # (max class + 1,), -1: no vertical
        if self_paced:
            start = [gamma_init if gamma_init is not None else math.sqrt(n) for n in sizes]
            self.gamma = nn.Parameter(torch.tensor(start, dtype=torch.float32))  # (V,)
        else:
            self.register_parameter("gamma", None)
        # Built without groups and without from_shapes: sqrt(C) needs C, known at the first call.
        self._size_pending = self_paced and groups is None and gamma_init is None

    @classmethod
    def from_shapes(
        cls,
        *,
        student_shape: tuple[int, ...],
        teacher_shape: tuple[int, ...] | None,
        num_train_samples: int,
        **options: Any,
    ) -> "Concentration":
        if teacher_shape is None:
            raise ValueError("concentration learns from the specialists' logits; teacher_shape is required")
        if tuple(student_shape) != tuple(teacher_shape) or len(student_shape) < 1:
            raise ValueError(f"concentration compares logits of one shape; got student {tuple(student_shape)} and "
                             f"teacher {tuple(teacher_shape)}")
        num_classes = student_shape[-1]
        groups = options.pop("groups", None)
        if groups is None:
            groups = [list(range(num_classes))]
        check_groups(groups, num_classes=num_classes, what="options.groups")
        return cls(groups=groups, **options)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # A loaded gamma is the trained one: never overwrite it with the initial value.
        self._size_pending = False
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def verticals(self, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(group, known)``: each position's vertical ``(...)`` int64 (0 where unknown) and
        whether it has one ``(...)`` bool -- a label >= 0 that some group contains."""
        table = self.group_of_class
        if self.groups is None:  # one vertical of every class
            known = target >= 0
            return torch.zeros_like(target, dtype=torch.long), known
        in_range = (target >= 0) & (target < len(table))
        group = table[target.clamp(0, len(table) - 1).long()]  # (...)
        known = in_range & (group >= 0)
        return torch.where(known, group, torch.zeros_like(group)), known

    def forward(
        self,
        student: torch.Tensor,
        teacher: torch.Tensor,
        *,
        mask: torch.Tensor | None = None,
        weights: torch.Tensor | None = None,
        target: torch.Tensor,
        group: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if target.dtype.is_floating_point or target.dtype == torch.bool or target.shape != student.shape[:-1]:
            raise ValueError(f"concentration: target must hold integer class ids of shape {tuple(student.shape[:-1])}; "
                             f"got {target.dtype} {tuple(target.shape)}")
        if group is None:
            group, known = self.verticals(target)
        else:  # the vertical as a by_class_group source answered it (e.g. for unlabelled samples)
            known = group >= 0
            group = group.clamp_min(0).long()
        # A position without a vertical has no specialist to learn from: it does not count.
        if mask is not None and mask.dtype != torch.bool:
            raise ValueError(f"concentration: mask must be a bool tensor (True = keep the position), got dtype {mask.dtype}")
        mask = known if mask is None else mask & known
        scale = None
        if self.gamma is not None:
            if self._size_pending:
                with torch.no_grad():
                    self.gamma.fill_(math.sqrt(student.shape[-1]))
                self._size_pending = False
            scale = self.gamma[group]  # (...): the scale of each position's vertical
        return knowledge_concentration(
            student, teacher, scale, top_k=self.top_k, temperature=self.temperature,
            teacher_activation=self.teacher_activation, mask=mask, weights=weights,
        )

    def extra_repr(self) -> str:
        return (f"groups={self.groups}, top_k={self.top_k}, temperature={self.temperature}, "
                f"teacher_activation={self.teacher_activation!r}, self_paced={self.self_paced}, "
                f"gamma_init={self.gamma_init}")
