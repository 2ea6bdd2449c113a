"""Novel class discovery: ``crkd`` (Cr-KD's class-relation distillation), ``uno`` (the discovery loss)
and the batch transform ``two_views`` they train with.

Written after the paper (Gu, Zhang et al., Class-relation Knowledge Distillation for Novel
Class Discovery, ICCV 2023, https://arxiv.org/abs/2307.09158) and the authors' code
(kleinzcy/Cr-KD-NCD: ``rKD.py``, ``model/losses.py``, ``scripts/discover_cifar.yaml``).
The arithmetic is in :mod:`transfuse.functional.crkd`.

A run (``configs/digits/crkd.yaml``): ``data.novel_classes`` hides the labels of the novel
classes' training samples (``batch["labelled"]`` false), a frozen participant trained on
the known classes (``train.classes``) is the supervised model, the ``two_views`` transform
gives every sample two augmented views, and two terms train the student: ``uno`` (swapped
prediction with Sinkhorn pseudo-labels on the novel head, cross-entropy on the labelled
samples) and ``crkd`` (weight 0.1) from the supervised model.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch

from ..functional._types import PositiveInt, Temperature
from ..functional.crkd import ClassIndices, crkd, uno_swapped_prediction
from ..transforms import TRANSFORMS, refuse_cached_sources
from .base import register_loss
from .module import DistillLoss

#: Batch entry the ``two_views`` transform writes: which view (0, 1, ...) each row is.
VIEW = "view"

_PAPER = (
    "Gu, Zhang et al., Class-relation Knowledge Distillation for Novel Class Discovery, ICCV 2023, "
    "https://arxiv.org/abs/2307.09158"
)


def _and(mask: torch.Tensor | None, keep: torch.Tensor) -> torch.Tensor:
    if mask is None:
        return keep
    if mask.dtype != torch.bool or mask.shape != keep.shape:
        raise ValueError(f"mask must be a bool tensor of shape {tuple(keep.shape)} (one entry per sample), "
                         f"got {mask.dtype} {tuple(mask.shape)}")
    return mask & keep


@register_loss(
    name="crkd",
    kind="logits",
    summary="Cr-KD: a known-class model's class relations on unlabelled samples, weighted by their known-class mass",
    paper=_PAPER,
    weight=0.1,
    ce_weight=0.0,
    needs=("labelled",),
)
class CrKD(DistillLoss):
    """Cr-KD: ``-sum_{k in known} p_k log q_k * T^2 * w`` on the unlabelled samples (:func:`~transfuse.functional.crkd.crkd`).

    ``p``/``q``: the supervised (teacher) and discovery (student) models' softmaxes over the
    ``known`` classes at ``0.1 * T``; ``w``: the student's probability mass on the known
    classes over its whole head, divided by its mean over the batch's unlabelled samples,
    not detached. The samples counted are those with ``batch["labelled"]`` false (and, if
    the term names a ``mask``, kept by it). The term's default weight 0.1 is the official
    ``alpha``; ``ce_weight`` 0, since the discovery loss ``uno`` carries the labelled
    samples' cross-entropy.
    """

    needs = ("labelled",)

    def __init__(
        self, *, known: ClassIndices | None = None, temperature: Temperature = 4.0, logit_temperature: Temperature = 0.1
    ) -> None:
        super().__init__()
        self.known = None if known is None else tuple(int(k) for k in known)
        self.temperature, self.logit_temperature = float(temperature), float(logit_temperature)

    def forward(
        self,
        student: torch.Tensor,
        teacher: torch.Tensor,
        *,
        labelled: torch.Tensor,
        mask: torch.Tensor | None = None,
        weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if labelled.dtype != torch.bool:
            raise ValueError(f"crkd: batch entry 'labelled' must be bool, got {labelled.dtype}")
        return crkd(student, teacher, known=self.known, temperature=self.temperature,
                    logit_temperature=self.logit_temperature, mask=_and(mask, ~labelled), weights=weights)

    def extra_repr(self) -> str:
        return f"known={self.known}, temperature={self.temperature}, logit_temperature={self.logit_temperature}"


@register_loss(
    name="uno",
    kind="logits",
    summary="UNO's discovery loss: swapped prediction between two views, Sinkhorn pseudo-labels on the novel head",
    paper=(
        "Fini et al., A Unified Objective for Novel Class Discovery, ICCV 2021, https://arxiv.org/abs/2108.08536 "
        "(as run by Cr-KD, https://arxiv.org/abs/2307.09158)"
    ),
    weight=1.0,
    ce_weight=0.0,
    needs=("labelled",),
    uses_teacher=False,
)
class UNO(DistillLoss):
    """UNO's swapped prediction (:func:`~transfuse.functional.crkd.uno_swapped_prediction`) on the student alone.

    The batch's rows are ``V`` views of ``B`` samples in blocks (rows ``v*B .. v*B+B-1`` are
    view ``v``), as the ``two_views`` transform writes them with the batch entry ``view``.
    Labelled samples (``batch["labelled"]``) learn their ``target`` by cross-entropy over
    the whole head; unlabelled ones predict the other view's Sinkhorn pseudo-labels over
    the novel head (the classes not in ``known``). A batch without ``view`` (the probe batch
    a run checks shapes on, or training without the transform) is one view predicting its
    own pseudo-labels; in training that draws a warning, since the method needs two views.

    ``target`` and ``view`` are read where the batch has them (:attr:`optional_needs`):
    ``target`` is not in :attr:`needs` because a loss that needs it gets the labelled
    samples as its default mask, and this loss must count the unlabelled ones too.
    """

    needs = ("labelled",)
    optional_needs = ("target", VIEW)
    uses_teacher = False

    def __init__(
        self,
        *,
        known: ClassIndices | None = None,
        temperature: Temperature = 0.1,
        epsilon: Temperature = 0.05,
        iterations: PositiveInt = 3,
    ) -> None:
        super().__init__()
        self.known = None if known is None else tuple(int(k) for k in known)
        self.temperature, self.epsilon, self.iterations = float(temperature), float(epsilon), int(iterations)
        self._warned = False

    def forward(
        self,
        student: torch.Tensor,
        teacher: torch.Tensor | None = None,
        *,
        labelled: torch.Tensor,
        target: torch.Tensor | None = None,
        view: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if labelled.dtype != torch.bool or labelled.shape != student.shape[:1]:
            raise ValueError(f"uno: batch entry 'labelled' must be bool of shape {tuple(student.shape[:1])}, "
                             f"got {labelled.dtype} {tuple(labelled.shape)}")
        if target is None:
            if bool(labelled.any()):  # a host sync, only on this unusual path
                raise ValueError("uno: the batch has labelled samples but no 'target' entry")
            target = torch.zeros_like(labelled, dtype=torch.long)
        if view is None:
            if self.training and not self._warned:
                warnings.warn("uno: the batch has one view (no 'view' entry); UNO's swapped prediction needs two -- "
                              "add the two_views transform (transforms: [{name: two_views}])", stacklevel=2)
                self._warned = True
            num_views = 1
        else:
            num_views = int(view[-1]) + 1  # a host sync; blocks of equal size, the last one is view V-1
        rows = student.shape[0]
        if rows % num_views:
            raise ValueError(f"uno: {rows} rows are not {num_views} equal blocks of views")
        size = rows // num_views
        view_logits = student.reshape(num_views, size, *student.shape[1:])  # (V, B, C)
        # Labels, masks and weights are per sample: the first block's stand for every view.
        return uno_swapped_prediction(
            view_logits, target[:size], labelled[:size], known=self.known, temperature=self.temperature,
            epsilon=self.epsilon, iterations=self.iterations,
            mask=None if mask is None else mask[:size], weights=None if weights is None else weights[:size],
        )

    def extra_repr(self) -> str:
        return f"known={self.known}, temperature={self.temperature}, epsilon={self.epsilon}, iterations={self.iterations}"


@TRANSFORMS.register("two_views", summary="UNO/Cr-KD: the batch twice, each copy augmented on its own (random shift, noise)")
class TwoViews:
    """``V`` augmented views of every sample, stacked in blocks: ``B`` rows become ``V * B``.

    Every per-sample batch entry is repeated ``V`` times; ``input`` is augmented
    independently per copy: a random translation by up to ``shift`` pixels in each
    direction (image inputs ``(B, C, H, W)``; edges replicated), an optional horizontal
    ``flip`` with probability 1/2, then ``noise_std * N(0, 1)`` added. The entry ``view``
    (long, ``(V * B,)``) says which view each row is; the ``uno`` loss pairs the views by
    it. Every participant sees the views, so the supervised model's Cr-KD targets are
    computed on the same augmented images as the student's outputs (the official code
    distils on both large crops). Randomness from torch's RNG (checkpointed).

    The official runs use torchvision's CIFAR augmentation (random resized crops, flips,
    colour jitter) with two large and two small crops; for the small grayscale images here
    a shift and noise stand in for it. A teacher answered from an output cache would label
    the unaugmented samples, so this transform refuses such a run.
    """

    def __init__(self, *, views: int = 2, shift: int = 2, flip: bool = False, noise_std: float = 0.1) -> None:
        if isinstance(views, bool) or not isinstance(views, int) or views < 2:
            raise ValueError(f"two_views: views must be an int >= 2, got {views!r}")
        if isinstance(shift, bool) or not isinstance(shift, int) or shift < 0:
            raise ValueError(f"two_views: shift (pixels) must be an int >= 0, got {shift!r}")
        if not isinstance(flip, bool):
            raise ValueError(f"two_views: flip must be true or false, got {flip!r}")
        if isinstance(noise_std, bool) or not (noise_std >= 0 and math.isfinite(noise_std)):
            raise ValueError(f"two_views: noise_std must be a finite number >= 0, got {noise_std!r}")
        self.views, self.shift, self.flip, self.noise_std = views, shift, flip, float(noise_std)
        self._checked_sources = False

    def __call__(self, batch: dict[str, torch.Tensor], *, step: int, distiller: Any = None) -> dict[str, torch.Tensor]:
        x = batch.get("input")
        if x is None or not x.is_floating_point():
            raise ValueError("two_views needs a float 'input' in the batch (image or feature data)")
        if not self._checked_sources and distiller is not None:
            refuse_cached_sources(distiller, transform="two_views")
            self._checked_sources = True
        size = x.shape[0]
        out = {k: (v.repeat(self.views, *([1] * (v.dim() - 1))) if torch.is_tensor(v) and v.dim() and v.shape[0] == size
                   else v) for k, v in batch.items()}
        out["input"] = torch.cat([self._augment(x) for _ in range(self.views)])  # (V * B, ...)
        out[VIEW] = torch.arange(self.views, device=x.device).repeat_interleave(size)  # (V * B,)
        return out

    def _augment(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4 and self.shift:
            x = random_shift(x, self.shift)
        if x.dim() == 4 and self.flip:
            flipped = torch.rand(x.shape[0], device=x.device) < 0.5  # (B,)
            x = torch.where(flipped.view(-1, 1, 1, 1), x.flip(-1), x)
        if self.noise_std:
            x = x + self.noise_std * torch.randn_like(x)
        return x


def random_shift(images: torch.Tensor, shift: int) -> torch.Tensor:
    """Each image ``(B, C, H, W)`` translated by its own random offset in ``[-shift, shift]`` per axis, edges replicated."""
    b, _, h, w = images.shape
    padded = torch.nn.functional.pad(images, (shift, shift, shift, shift), mode="replicate")  # (B, C, H+2s, W+2s)
    dy = torch.randint(0, 2 * shift + 1, (b,), device=images.device)  # (B,)
    dx = torch.randint(0, 2 * shift + 1, (b,), device=images.device)  # (B,)
    rows = (dy[:, None] + torch.arange(h, device=images.device)).view(b, 1, h, 1).expand(-1, padded.shape[1], -1, padded.shape[3])
    picked = padded.gather(2, rows)  # (B, C, H, W+2s)
    cols = (dx[:, None] + torch.arange(w, device=images.device)).view(b, 1, 1, w).expand(-1, padded.shape[1], h, -1)
    return picked.gather(3, cols)  # (B, C, H, W)


__all__ = ["CrKD", "TwoViews", "UNO", "VIEW", "random_shift"]
