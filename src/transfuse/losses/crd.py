"""Contrastive Representation Distillation: embeddings, two memory banks and an NCE loss."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import functional as TF
from ..functional import PositiveInt, Probability, Temperature
from ..functional.reduce import _refuse_weights, _rows_from_mask
from .base import register_loss
from .module import DistillLoss


@register_loss(
    name="crd",
    kind="relation",
    summary="contrastive (NCE) bound between student and teacher embeddings, negatives from memory banks",
    paper="Tian et al., Contrastive Representation Distillation, ICLR 2020, https://arxiv.org/abs/1910.10699",
    weight=0.8,
    ce_weight=1.0,
    inputs="feature",
    needs=("index",),
    positionwise=False,
)
class CRD(DistillLoss):
    """CRD: tell the paired teacher embedding of a sample from ``K`` others, both ways.

    Built by :meth:`from_shapes`, which adds

    * ``embed_student``/``embed_teacher``: ``Linear(D -> feat_dim)`` followed by L2
      normalisation (inputs are flattened first);
    * ``student_memory``/``teacher_memory``: buffers ``(num_train_samples, feat_dim)`` of past
      embeddings, one row per training sample (so they are checkpointed), initialised
      uniformly in ``[-s, s]`` with ``s = 1/sqrt(feat_dim/3)``;
    * ``z_student``/``z_teacher``: the partition-function estimates, set on the first
      training batch to ``mean(exp(score/T)) * N`` and then kept fixed.

    Forward, for a batch with dataset indices ``index`` ``(B,)``: ``K = min(num_negatives,
    N - 1)`` negatives per sample are drawn uniformly from the ``N`` rows with torch's
    default generator (so ``torch.manual_seed`` fixes them; the positive row is not
    excluded, which matters only for tiny ``N``). The student embedding is scored against
    the teacher memory (positive = the sample's own row) and the teacher embedding
    against the student memory; the loss is the sum of the two NCE losses
    (:func:`transfuse.functional.crd_nce_loss`). In training mode only, the positives'
    rows are then updated with momentum, ``row <- normalise(m * row + (1 - m) * v)``,
    outside autograd; evaluation leaves the banks untouched.

    ``mask`` (bool ``(B,)``) keeps the selected samples only: they alone are scored and
    update the banks; a mask that keeps none gives a graph-connected 0. ``weights`` are
    refused (the loss is a batch mean of a contrastive bound, registered as batch-relation).
    """

    needs = ("index",)
    positionwise = False

    def __init__(
        self,
        *,
        feat_dim: PositiveInt = 128,
        num_negatives: PositiveInt = 16384,
        nce_temperature: Temperature = 0.07,
        momentum: Probability = 0.5,
    ) -> None:
        super().__init__()
        if feat_dim < 1 or num_negatives < 1:
            raise ValueError("crd: feat_dim and num_negatives must be >= 1")
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"crd: momentum must be in [0, 1], got {momentum}")
        self.feat_dim, self.num_negatives = feat_dim, num_negatives
        self.nce_temperature, self.momentum = nce_temperature, momentum
        self.embed_student: nn.Module | None = None
        self.embed_teacher: nn.Module | None = None
        for name in ("student_memory", "teacher_memory", "z_student", "z_teacher"):
            self.register_buffer(name, None)

    @classmethod
    def from_shapes(
        cls,
        *,
        student_shape: tuple[int, ...],
        teacher_shape: tuple[int, ...] | None,
        num_train_samples: int,
        **options: Any,
    ) -> "CRD":
        if teacher_shape is None:
            raise ValueError("crd contrasts with the teacher's features; teacher_shape is required")
        if num_train_samples < 2:
            raise ValueError(f"crd needs at least 2 training samples for its memory banks, got {num_train_samples}")
        loss = cls(**options)
        loss.build(math.prod(student_shape), math.prod(teacher_shape), num_train_samples)
        return loss

    def build(self, student_dim: int, teacher_dim: int, num_train_samples: int) -> None:
        """Create the embeddings and memory banks (called by :meth:`from_shapes`)."""
        self.embed_student = nn.Linear(student_dim, self.feat_dim)
        self.embed_teacher = nn.Linear(teacher_dim, self.feat_dim)
        stdv = 1.0 / math.sqrt(self.feat_dim / 3)
        self.student_memory = torch.rand(num_train_samples, self.feat_dim).mul_(2 * stdv).sub_(stdv)
        self.teacher_memory = torch.rand(num_train_samples, self.feat_dim).mul_(2 * stdv).sub_(stdv)
        # -1 = not estimated yet; a tensor so it is saved with the banks.
        self.z_student = torch.tensor(-1.0)
        self.z_teacher = torch.tensor(-1.0)

    def forward(
        self,
        student: torch.Tensor,
        teacher: torch.Tensor,
        *,
        index: torch.Tensor,
        mask: torch.Tensor | None = None,
        weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if self.embed_student is None or self.student_memory is None:
            raise RuntimeError("CRD needs its embeddings and memory banks: build it with CRD.from_shapes(...)")
        _refuse_weights(weights, "crd")
        memory_s, memory_t = self.student_memory, self.teacher_memory
        num_data = memory_s.shape[0]
        index = index.reshape(-1).long().to(memory_s.device)  # (B,)
        if mask is not None:
            rows = _rows_from_mask(mask, (student.shape[0],), "crd")  # (B,)
            student, teacher, index = student[rows], teacher[rows.to(teacher.device)], index[rows.to(index.device)]
        batch = index.shape[0]
        if batch == 0:
            # Nothing to score; an empty NCE mean would be nan, and Z must not be estimated from it.
            return (student * 0).sum()

        v_s = F.normalize(self.embed_student(student.flatten(1)), dim=1)  # (B, F)
        v_t = F.normalize(self.embed_teacher(teacher.flatten(1)), dim=1)  # (B, F)

        num_neg = min(self.num_negatives, num_data - 1)
        negatives = torch.randint(num_data, (batch, num_neg), device=memory_s.device)  # (B, K)
        rows = torch.cat([index[:, None], negatives], dim=1)  # (B, 1 + K): positive first

        # Student anchor against the teacher bank, and teacher anchor against the student bank.
        scores_s = TF.crd_scores(v_s, memory_t, rows, temperature=self.nce_temperature)  # (B, 1 + K)
        scores_t = TF.crd_scores(v_t, memory_s, rows, temperature=self.nce_temperature)  # (B, 1 + K)
        z_s = self._normaliser("z_student", scores_s, num_data)
        z_t = self._normaliser("z_teacher", scores_t, num_data)
        loss = TF.crd_nce_loss(scores_s / z_s, num_data=num_data) + TF.crd_nce_loss(scores_t / z_t, num_data=num_data)

        if self.training:
            self._update_memory(index, v_s, v_t)
        return loss

    def _normaliser(self, name: str, scores: torch.Tensor, num_data: int) -> torch.Tensor:
        """``Z``: estimated once from the first training batch, then a constant."""
        z = getattr(self, name)
        if z.item() > 0:
            return z
        estimate = scores.detach().mean() * num_data
        if self.training:
            z.fill_(estimate.item())
        return estimate

    @torch.no_grad()
    def _update_memory(self, index: torch.Tensor, v_s: torch.Tensor, v_t: torch.Tensor) -> None:
        m = self.momentum
        for name, v in (("student_memory", v_s), ("teacher_memory", v_t)):
            bank = getattr(self, name)
            rows = F.normalize(bank[index] * m + v.detach().to(bank.dtype) * (1.0 - m), dim=1)  # (B, F)
            # Out of place on purpose: this step's scores saved `bank` for backward, and an
            # in-place write would invalidate it.
            setattr(self, name, bank.index_copy(0, index, rows))

    def extra_repr(self) -> str:
        return (
            f"feat_dim={self.feat_dim}, num_negatives={self.num_negatives}, "
            f"nce_temperature={self.nce_temperature}, momentum={self.momentum}"
        )
