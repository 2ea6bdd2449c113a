"""Contrastive Representation Distillation: embeddings, two memory banks, a label bank and an NCE loss."""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..functional import PositiveInt, Probability, Temperature
from ..functional.reduce import _refuse_weights, _rows_from_mask
from ..functional.relations import crd_nce_with_gradient
from .base import register_loss
from .module import DistillLoss

#: How CRD draws its negatives (see :class:`CRD`).
NEGATIVES = ("exact", "uniform")

#: The NCE loss's ``eps`` (added to its denominators), as in the official code.
NCE_EPS = 1e-7


class _WithGradient(torch.autograd.Function):
    """Return ``value`` (computed without autograd) whose gradient w.r.t. ``v_s``/``v_t`` is
    ``g_s``/``g_t``, computed with it. CRD computes its gradient in the forward pass, so that
    its memory banks can be updated in place right after: nothing in the graph reads them."""

    @staticmethod
    def forward(ctx, value, v_s, v_t, g_s, g_t):  # noqa: D102
        ctx.save_for_backward(g_s, g_t)
        return value.clone()

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        g_s, g_t = ctx.saved_tensors
        d_s = grad * g_s if ctx.needs_input_grad[1] else None
        d_t = grad * g_t if ctx.needs_input_grad[2] else None
        return None, d_s, d_t, None, None


def _distributed() -> bool:
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _gather_across_processes(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Each tensor concatenated over the processes of an initialised process group (rows may
    differ in number between processes); the tensors themselves on a single process."""
    if not _distributed():
        return tensors
    dist = torch.distributed
    world = dist.get_world_size()
    count = torch.tensor([tensors[0].shape[0]], device=tensors[0].device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    sizes = [int(c.item()) for c in counts]
    out = []
    for t in tensors:
        padded = t.new_zeros((max(sizes), *t.shape[1:]))
        padded[: t.shape[0]] = t
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded)
        out.append(torch.cat([p[:n] for p, n in zip(parts, sizes)]))
    return tuple(out)


@register_loss(
    name="crd",
    kind="relation",
    summary="contrastive (NCE) bound between student and teacher embeddings, negatives from memory banks",
    paper="Tian et al., Contrastive Representation Distillation, ICLR 2020, https://arxiv.org/abs/1910.10699",
    weight=0.8,
    ce_weight=1.0,
    inputs="feature",
    needs=("index", "target"),
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
    * ``labels``: a buffer ``(num_train_samples,)`` of the label seen with each row, ``-1``
      until the row's sample has been seen with a label;
    * ``z_student``/``z_teacher``: the partition-function estimates, set on the first
      training batch to ``mean(exp(score/T)) * N`` and then kept fixed.

    Forward, for a batch with dataset indices ``index`` ``(B,)`` and labels ``target``:
    ``K = num_negatives`` negatives per sample, drawn with replacement with torch's
    default generator (so ``torch.manual_seed`` fixes them):

    * ``negatives="exact"`` (default; the official code's ``mode='exact'`` sampling): from
      the rows whose label differs from the sample's. The labels come from the batches
      themselves (a loss sees no data set), so during the first epoch a row whose sample
      has not been seen yet counts as "another class": its bank row is still its random
      initial value, which carries no class either way, and by the end of the first epoch
      every row is known and the draw is exactly the official one. A sample without a
      label (``target < 0``, the unlabelled part of a transfer set) draws from every row
      but its own;
    * ``negatives="uniform"``: from all ``N`` rows, the positive's own included (the
      official memory module's fallback when no indices are given). Reads no labels.

    ``K`` is never clamped. The official data set draws without replacement when ``K`` is
    at most the pool (``np.random.choice(..., replace=k > pool)``; on CIFAR-100 16,384 of
    49,500), with replacement otherwise; here always with replacement: every draw is
    uniform over the pool either way, so the expected loss and gradient are the same
    (the variance of the negatives' sum is at most ``(pool - 1) / (pool - K)`` times
    larger, 1.5 on CIFAR-100), and no ``O(B N)`` sort per step is needed.

    The student embedding is scored against the teacher memory (positive = the sample's own
    row) and the teacher embedding against the student memory; the loss is the sum of the
    two NCE losses (:func:`transfuse.functional.crd_nce_loss`). Its gradient w.r.t. the two
    embeddings is computed in the same pass (the banks are constants to it), so in training
    mode the positives' rows can then be updated in place, ``row <- normalise(m * row +
    (1 - m) * v)``, outside autograd, as the official code does. Under
    ``torch.distributed`` the update (and the labels) of every process's samples are
    gathered first, so all processes keep the same banks. Evaluation mode leaves the banks,
    the labels and ``Z`` untouched.

    ``mask`` (bool ``(B,)``) keeps the selected samples only: they alone are scored and
    update the banks; a mask that keeps none gives a graph-connected 0. ``weights`` are
    refused (the loss is a batch mean of a contrastive bound, registered as batch-relation).

    Defaults are the official ones (RepDistiller ``train_student.py``: ``--feat_dim 128``,
    ``--nce_k 16384``, ``--nce_t 0.07``, ``--nce_m 0.5``, ``--mode exact``; mdistiller
    ``CFG.CRD``: the same). The term weight 0.8 is ``-b 0.8`` of RepDistiller's run script.
    """

    needs = ("index", "target")
    positionwise = False

    def __init__(
        self,
        *,
        feat_dim: PositiveInt = 128,
        num_negatives: PositiveInt = 16384,
        nce_temperature: Temperature = 0.07,
        momentum: Probability = 0.5,
        negatives: Literal["exact", "uniform"] = "exact",
    ) -> None:
        super().__init__()
        if feat_dim < 1 or num_negatives < 1:
            raise ValueError("crd: feat_dim and num_negatives must be >= 1")
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"crd: momentum must be in [0, 1], got {momentum}")
        if negatives not in NEGATIVES:
            raise ValueError(f"crd: negatives must be one of {NEGATIVES}, got {negatives!r}")
        self.feat_dim, self.num_negatives = feat_dim, num_negatives
        self.nce_temperature, self.momentum = nce_temperature, momentum
        self.negatives = negatives
        if negatives == "uniform":
            # Read by the Distiller per instance: no labels are passed, and none mask the samples.
            self.needs = ("index",)
        self.embed_student: nn.Module | None = None
        self.embed_teacher: nn.Module | None = None
        for name in ("student_memory", "teacher_memory", "labels", "z_student", "z_teacher"):
            self.register_buffer(name, None)
        self._pool: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # the label bank, sorted
        self._z_known: set[str] = set()  # Z buffers known to be set (read from the buffer once otherwise)
        self._scratch: torch.Tensor | None = None  # see _workspace

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
        """Create the embeddings, memory banks and label bank (called by :meth:`from_shapes`)."""
        self.embed_student = nn.Linear(student_dim, self.feat_dim)
        self.embed_teacher = nn.Linear(teacher_dim, self.feat_dim)
        stdv = 1.0 / math.sqrt(self.feat_dim / 3)
        self.student_memory = torch.rand(num_train_samples, self.feat_dim).mul_(2 * stdv).sub_(stdv)
        self.teacher_memory = torch.rand(num_train_samples, self.feat_dim).mul_(2 * stdv).sub_(stdv)
        self.labels = torch.full((num_train_samples,), -1, dtype=torch.long)
        # -1 = not estimated yet; a tensor so it is saved with the banks.
        self.z_student = torch.tensor(-1.0)
        self.z_teacher = torch.tensor(-1.0)
        self._pool = None
        self._z_known = set()

    def forward(
        self,
        student: torch.Tensor,
        teacher: torch.Tensor,
        *,
        index: torch.Tensor,
        target: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if self.embed_student is None or self.student_memory is None:
            raise RuntimeError("CRD needs its embeddings and memory banks: build it with CRD.from_shapes(...)")
        _refuse_weights(weights, "crd")
        memory_s = self.student_memory
        num_data = memory_s.shape[0]
        index = index.reshape(-1).long().to(memory_s.device)  # (B,)
        if self.negatives == "exact":
            if target is None:
                raise ValueError(
                    "crd: negatives='exact' draws each sample's negatives from the other classes and needs the "
                    "batch's target; pass target=..., or build it with negatives='uniform'"
                )
            target = target.reshape(-1).long().to(memory_s.device)  # (B,)
        else:
            target = None
        if mask is not None:
            rows = _rows_from_mask(mask, (student.shape[0],), "crd")  # (B,)
            student, teacher = student[rows], teacher[rows.to(teacher.device)]
            index = index[rows.to(index.device)]
            target = None if target is None else target[rows.to(target.device)]
        if index.shape[0] == 0:
            # Nothing to score; an empty NCE mean would be nan, and Z must not be estimated from it.
            if self.training:  # other processes may have samples: take part in their update
                empty = memory_s.new_zeros((0, self.feat_dim))
                self._update_memory(index, empty, empty, target)
            return (student * 0).sum()

        v_s = F.normalize(self.embed_student(student.flatten(1)), dim=1)  # (B, F)
        v_t = F.normalize(self.embed_teacher(teacher.flatten(1)), dim=1)  # (B, F)
        if self.training and target is not None:
            self._remember_labels(index, target)
        loss = self._nce(v_s, v_t, index, self._draw_negatives(index, target))
        if self.training:
            self._update_memory(index, v_s.detach(), v_t.detach(), target)
        return loss

    # -- the loss and its gradient ---------------------------------------------------------

    def _nce(self, v_s: torch.Tensor, v_t: torch.Tensor, index: torch.Tensor, negatives: torch.Tensor) -> torch.Tensor:
        """Both NCE losses, with their gradient w.r.t. ``v_s``/``v_t`` computed alongside."""
        want_grad = torch.is_grad_enabled() and (v_s.requires_grad or v_t.requires_grad)
        with torch.no_grad():
            value = 0.0
            grads = []
            # Student anchor against the teacher bank, and teacher anchor against the student bank.
            for anchor, memory, name in ((v_s, self.teacher_memory, "z_student"), (v_t, self.student_memory, "z_teacher")):
                loss, grad, z = crd_nce_with_gradient(
                    anchor, memory, index, negatives, temperature=self.nce_temperature, z=self._known_z(name),
                    eps=NCE_EPS, gradient=want_grad, workspace=self._workspace(index.shape[0], memory),
                )
                if self.training and name not in self._z_known:
                    getattr(self, name).copy_(z)
                    self._z_known.add(name)
                value = value + loss
                grads.append(None if grad is None else grad.to(anchor.dtype))
        if not want_grad:
            return value
        return _WithGradient.apply(value, v_s, v_t, *grads)

    def _workspace(self, batch: int, memory: torch.Tensor) -> torch.Tensor | None:
        """A ``(B, N)`` float32 scratch matrix kept between steps on the CPU, where a fresh one
        would be paged in on every step (an accelerator's caching allocator makes that free)."""
        if memory.device.type != "cpu":
            return None
        shape = (batch, memory.shape[0])
        if self._scratch is None or self._scratch.shape != shape:
            self._scratch = torch.empty(shape, dtype=torch.float32)
        return self._scratch

    def _known_z(self, name: str) -> torch.Tensor | None:
        """``Z`` once it has been estimated (on the first training batch), else None."""
        if name not in self._z_known and getattr(self, name).item() > 0:  # once, after building or loading
            self._z_known.add(name)
        return getattr(self, name) if name in self._z_known else None

    # -- negatives --------------------------------------------------------------------------

    def _draw_negatives(self, index: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
        """``(B, K)`` row indices, drawn with replacement (see the class docstring)."""
        num_data = self.student_memory.shape[0]
        shape = (index.shape[0], self.num_negatives)
        if target is None:  # uniform
            return torch.randint(num_data, shape, device=index.device)
        sorted_labels, order_twice, position = self._label_pool()
        # The rows to skip form one block [start, end) of the label-sorted order: the
        # anchor's class, or (for a sample without a label) the anchor alone. The pool is
        # the rest, end..N-1 then 0..start-1: positions end + u, u < N - (end - start), in
        # the order written twice.
        known = target >= 0
        start = torch.where(known, torch.searchsorted(sorted_labels, target), position[index])  # (B,)
        end = torch.where(known, torch.searchsorted(sorted_labels, target, right=True), position[index] + 1)  # (B,)
        pool = (num_data - (end - start)).clamp_min(1)  # (B,)
        # Uniform over the pool: floor(u * pool / 2^31) for a 31-bit draw u (one 32-bit
        # random number each), so each row's probability is within a relative N / 2^31 of 1 / pool.
        draw = torch.randint(1 << 31, shape, device=index.device).mul_(pool[:, None]).bitwise_right_shift_(31)
        draw += end[:, None]
        return torch.gather(order_twice, 0, draw.reshape(-1)).reshape(shape)

    def _label_pool(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The label bank sorted (stably), the sorting order written twice, and each row's
        position in the order; cached until a label changes."""
        labels = self.labels
        if self._pool is None or self._pool[0].device != labels.device:
            sorted_labels, order = torch.sort(labels, stable=True)
            position = torch.empty_like(order)
            position[order] = torch.arange(order.shape[0], device=order.device)
            self._pool = (sorted_labels, torch.cat([order, order]), position)
        return self._pool

    @torch.no_grad()
    def _remember_labels(self, index: torch.Tensor, target: torch.Tensor) -> None:
        """Write the labels of these rows into the label bank (a negative target, no label, leaves it)."""
        old = self.labels[index]
        new = torch.where(target >= 0, target.to(old.dtype), old)
        # On the CPU the comparison is cheap; elsewhere re-sorting beats a host synchronisation.
        if old.device.type != "cpu" or not torch.equal(old, new):
            self.labels.index_copy_(0, index, new)
            self._pool = None

    # -- state --------------------------------------------------------------------------------

    @torch.no_grad()
    def _update_memory(
        self, index: torch.Tensor, v_s: torch.Tensor, v_t: torch.Tensor, target: torch.Tensor | None
    ) -> None:
        """The positives' rows, in place: ``normalise(m * row + (1 - m) * v)`` (every process's samples)."""
        if _distributed():
            if target is None:
                index, v_s, v_t = _gather_across_processes(index, v_s, v_t)
            else:
                index, v_s, v_t, target = _gather_across_processes(index, v_s, v_t, target)
                self._remember_labels(index, target)  # the other processes' samples
        if index.shape[0] == 0:
            return
        m = self.momentum
        for bank, v in ((self.student_memory, v_s), (self.teacher_memory, v_t)):
            rows = bank.index_select(0, index) * m + v.to(bank.dtype) * (1.0 - m)  # (B, F)
            bank.index_copy_(0, index, F.normalize(rows, dim=1))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        # A checkpoint written before the label bank existed: its rows' labels are learnt again.
        if self.labels is not None and prefix + "labels" not in state_dict and prefix + "student_memory" in state_dict:
            state_dict[prefix + "labels"] = torch.full_like(self.labels, -1)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        self._pool = None
        self._z_known = set()

    def extra_repr(self) -> str:
        return (
            f"feat_dim={self.feat_dim}, num_negatives={self.num_negatives}, "
            f"nce_temperature={self.nce_temperature}, momentum={self.momentum}, negatives={self.negatives!r}"
        )
