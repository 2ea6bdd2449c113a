"""Novel class discovery: Cr-KD's class-relation distillation and the UNO discovery loss it is added to.

Paper: Gu, Zhang et al., Class-relation Knowledge Distillation for Novel Class Discovery,
ICCV 2023, https://arxiv.org/abs/2307.09158. Written after the authors' code
(kleinzcy/Cr-KD-NCD: ``model/losses.py`` -- ``KD`` and ``SinkhornKnopp`` --, ``rKD.py`` --
``swapped_prediction`` and the discovery loop -- and ``scripts/discover_cifar.yaml``).
The discovery loss is UNO's (Fini et al., A Unified Objective for Novel Class Discovery,
ICCV 2021, https://arxiv.org/abs/2108.08536), as the Cr-KD code runs it.

The setting: a model with one head over every class, whose columns ``known`` are the
classes labelled samples come from and whose other columns (the *novel head*) are to be
discovered on unlabelled samples. A frozen model trained on the known classes only (the
*supervised model*) supplies the class relations:

* :func:`crkd` -- on the unlabelled samples, the known-class distribution of the supervised
  model, distilled into the known-class head of the discovery model, each sample weighted
  by how much of its probability the discovery model puts on known classes (not detached);
* :func:`sinkhorn_knopp` -- equipartitioned soft pseudo-labels (SwAV, UNO);
* :func:`uno_swapped_prediction` -- UNO: each view predicts the other view's targets over
  the whole head: one-hot labels for labelled samples, Sinkhorn pseudo-labels over the
  novel head for unlabelled ones;
* :func:`known_class_mass` -- Cr-KD's sample weight before its batch normalisation.
"""

from __future__ import annotations

import math
from typing import Annotated, Sequence

import torch
import torch.nn.functional as F
from pydantic import Field

from ._types import PositiveInt, Reduction, Temperature
from .logits import _check_reduction, _check_target, _check_temperature
from .reduce import _checked, _reduce, _weigh

#: Class indices of the known classes: distinct ints >= 0, at least one (None: not given).
ClassIndices = Annotated[tuple[Annotated[int, Field(ge=0)], ...], Field(min_length=1)]


def _known_index(known: Sequence[int] | None, num_classes: int, name: str, *, need_novel: bool) -> list[int]:
    """``known`` checked against ``num_classes`` (host-side ints only: no device sync)."""
    if known is None:
        raise ValueError(
            f"{name}: options.known is required: the indices of the known classes (those labelled samples and the "
            f"supervised model were trained on), e.g. [0, 1, 2, 3, 4]; the other classes form the novel head"
        )
    index = [int(k) for k in known]
    if not index:
        raise ValueError(f"{name}: options.known must name at least one class")
    if len(set(index)) != len(index):
        raise ValueError(f"{name}: options.known lists a class twice: {index}")
    bad = [k for k in index if not 0 <= k < num_classes]
    if bad:
        raise ValueError(f"{name}: options.known has {bad}, outside the logits' classes 0..{num_classes - 1}")
    if need_novel and len(index) == num_classes:
        raise ValueError(f"{name}: options.known names all {num_classes} classes; leave at least one novel class")
    return index


def novel_classes(known: Sequence[int], num_classes: int) -> list[int]:
    """The class indices of ``0..num_classes-1`` that are not in ``known``, in order."""
    taken = {int(k) for k in known}
    return [c for c in range(num_classes) if c not in taken]


def known_class_mass(
    logits: torch.Tensor, *, known: Sequence[int], temperature: Temperature = 4.0, logit_temperature: Temperature = 0.1
) -> torch.Tensor:
    """``sum_{k in known} softmax(z / (logit_temperature * temperature))_k`` per position: ``(..., C) -> (...)``.

    Cr-KD's sample weight before its normalisation by the batch mean: how much of the
    discovery model's probability (over the whole head) a sample puts on known classes.
    Differentiable; not detached.
    """
    index = _known_index(known, logits.shape[-1], "known_class_mass", need_novel=False)
    probs = F.softmax(logits / (logit_temperature * temperature), dim=-1)  # (..., C)
    return probs[..., index].sum(-1)  # (...)


def crkd(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    known: ClassIndices | None = None,
    temperature: Temperature = 4.0,
    logit_temperature: Temperature = 0.1,
    mask: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """Cr-KD's class-relation distillation (the official ``KD`` in ``model/losses.py``).

    With ``tau = logit_temperature * temperature`` (0.1 * 4 = 0.4 by default), per position:

    * ``p = softmax(z_t[known] / tau)`` -- the supervised model's known-class distribution;
    * ``q = softmax(z_s[known] / tau)`` -- the discovery model's known-class head;
    * ``s = sum_{k in known} softmax(z_s / tau)_k`` (:func:`known_class_mass`) and
      ``w = s / mean(s)``, the mean over the positions ``mask`` keeps. ``w`` is NOT
      detached: the official "learnable weight", through which a sample lowers its loss by
      moving probability to the novel head;
    * value ``-sum_k p_k log q_k * T^2 * w``.

    The value is the cross-entropy ``H(p, q)``, as in the official code, not ``KL(p || q)``:
    with the weight attached to the graph the two differ in gradient (the teacher's entropy
    times ``w`` pulls on ``w``), so it is not 0 when the two models agree.

    Shapes: ``student_logits`` ``(..., C)``, over every class; ``teacher_logits`` ``(..., C)``
    (a model with the full head: its ``known`` columns are used) or ``(..., K)`` with
    ``K = len(known)`` (a model with the known classes only, as the official one, whose
    columns are ``known`` in order). ``mask``: bool ``(...)`` or a prefix -- the positions
    the loss is about, the *unlabelled* samples (the official code computes it on
    ``~mask_lab`` only); they also define the mean of ``w``. ``weights``: extra per-position
    factors on top of ``w``. Reduction (``"mean"``):
    :func:`~transfuse.functional.reduce_positions`, the mean over kept positions -- the
    official mean over views and unlabelled samples. ``"none"``: the ``(...)`` values.

    Defaults (official ``scripts/discover_cifar.yaml`` and ``utils/parse.py``): ``temperature``
    4 (``kd_temperature``), ``logit_temperature`` 0.1 (``temperature``, UNO's logit
    temperature, which the official code divides the logits by first). The official
    weight of the whole term, ``alpha`` 0.1, is the term's weight. ``known`` has no
    default: give the known classes' indices.

    Paper: Gu, Zhang et al., Class-relation Knowledge Distillation for Novel Class
    Discovery, ICCV 2023, https://arxiv.org/abs/2307.09158
    """
    name = "crkd"
    _check_temperature(temperature, name)
    _check_temperature(logit_temperature, name)
    _check_reduction(reduction, name)
    num_classes = student_logits.shape[-1]
    index = _known_index(known, num_classes, name, need_novel=False)
    if teacher_logits.shape[:-1] != student_logits.shape[:-1]:
        raise ValueError(f"{name}: student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} must have the same leading shape")
    if teacher_logits.shape[-1] == num_classes:
        teacher_known = teacher_logits[..., index]  # (..., K)
    elif teacher_logits.shape[-1] == len(index):
        teacher_known = teacher_logits  # a known-classes-only head, columns in `known` order
    else:
        raise ValueError(f"{name}: teacher logits have {teacher_logits.shape[-1]} classes; expected {num_classes} "
                         f"(the student's head) or {len(index)} (one per known class)")
    tau = logit_temperature * temperature
    p = F.softmax(teacher_known / tau, dim=-1)  # (..., K)
    log_q = F.log_softmax(student_logits[..., index] / tau, dim=-1)  # (..., K)
    mass = known_class_mass(student_logits, known=index, temperature=temperature,
                            logit_temperature=logit_temperature)  # (...)
    # w = s / mean(s) over the kept positions, as a reduction of its own; the mean stays in
    # the graph (not detached), as the official `weight / torch.mean(weight)`.
    mean_mass = _reduce(mass, mask, None, name)  # ()
    w = mass / mean_mass.clamp_min(torch.finfo(mass.dtype).tiny)  # (...)
    per_position = -(p * log_q).sum(-1) * (temperature**2) * w  # (...)
    if reduction == "none":
        return _weigh(per_position, mask, weights, name)
    return _reduce(per_position, mask, weights, name)


@torch.no_grad()
def sinkhorn_knopp(logits: torch.Tensor, *, epsilon: Temperature = 0.05, iterations: PositiveInt = 3) -> torch.Tensor:
    """Equipartitioned soft assignments of ``N`` samples to ``K`` clusters: ``(N, K) -> (N, K)``.

    Sinkhorn-Knopp on ``exp(logits / epsilon)``: ``iterations`` times, scale each cluster's
    column to total mass ``1/K``, then each sample's row to ``1/N``; the result is
    multiplied by ``N``, so every row sums to 1 and every cluster receives about ``N/K``
    samples (exactly in the limit of many iterations). Computed in log space (the official
    ``SinkhornKnopp`` exponentiates directly, which overflows for logits that are not
    cosine similarities in [-1, 1]); the official initial division by the total is a
    constant that the first column scaling removes, so the values are the same. No
    gradient flows (pseudo-labels are targets). ``N = 0`` gives an empty ``(0, K)``.

    Defaults (official ``utils/parse.py``, UNO): ``epsilon`` 0.05, ``iterations`` 3.
    """
    if logits.dim() != 2:
        raise ValueError(f"sinkhorn_knopp: expected logits (N, K), got shape {tuple(logits.shape)}")
    _check_temperature(epsilon, "sinkhorn_knopp")
    if isinstance(iterations, bool) or int(iterations) < 1:
        raise ValueError(f"sinkhorn_knopp: iterations must be an int >= 1, got {iterations!r}")
    n, k = logits.shape
    if n == 0:
        return logits.new_zeros((0, k))
    log_q = logits.detach().float() / epsilon  # (N, K)
    log_n, log_k = math.log(n), math.log(k)
    for _ in range(int(iterations)):
        log_q = log_q - torch.logsumexp(log_q, dim=0, keepdim=True) - log_k  # each cluster: mass 1/K
        log_q = log_q - torch.logsumexp(log_q, dim=1, keepdim=True) - log_n  # each sample: mass 1/N
    return (log_q + log_n).exp().to(logits.dtype)  # rows sum to 1


def uno_swapped_prediction(
    view_logits: torch.Tensor,
    target: torch.Tensor,
    labelled: torch.Tensor,
    *,
    known: ClassIndices | None = None,
    temperature: Temperature = 0.1,
    epsilon: Temperature = 0.05,
    iterations: PositiveInt = 3,
    mask: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """UNO's swapped-prediction loss over ``V`` views of a batch (the official ``swapped_prediction``).

    ``view_logits`` ``(V, B, C)``: the same ``B`` samples under ``V`` augmentations, over
    the whole head. Targets per view ``v`` (``(B, C)``): for a labelled sample the one-hot
    of its ``target``; for an unlabelled one, zero on the known classes and, on the novel
    head (the columns not in ``known``), the Sinkhorn-Knopp assignment
    (:func:`sinkhorn_knopp`, ``epsilon``, ``iterations``) of view ``v``'s novel-head logits
    computed over the batch's unlabelled samples that ``mask`` keeps. Each view ``u``
    predicts every other view's targets: per sample
    ``mean_{v != u} -sum_c target_v[c] * log softmax(z_u / temperature)[c]`` averaged over
    ``u``, so a labelled sample gets a plain cross-entropy over the whole head (as in UNO,
    where the labelled samples' logits include the novel head). With ``V = 1`` (a batch
    without a second view) the view predicts its own targets.

    ``target`` integer ``(B,)`` (any placeholder where unlabelled); ``labelled`` bool ``(B,)``.
    ``mask`` bool ``(B,)``: the samples that count (and enter the Sinkhorn batch);
    ``weights`` ``(B,)``. Reduction (``"mean"``): the mean over kept samples (official: the
    mean over the batch, labelled and unlabelled together); ``"none"``: ``(B,)`` values.

    Defaults (official ``scripts/discover_cifar.yaml``): ``temperature`` 0.1, ``epsilon``
    0.05, ``iterations`` 3. The official runs use 4 heads (the best one reported), 2 large
    and 2 small crops, and cosine-similarity heads; see the losses' documentation.

    Papers: Fini et al., A Unified Objective for Novel Class Discovery, ICCV 2021,
    https://arxiv.org/abs/2108.08536; as run by Gu, Zhang et al., ICCV 2023,
    https://arxiv.org/abs/2307.09158
    """
    name = "uno"
    if view_logits.dim() != 3:
        raise ValueError(f"{name}: view_logits must be (V, B, C), got shape {tuple(view_logits.shape)}")
    num_views, batch, num_classes = view_logits.shape
    _check_temperature(temperature, name)
    _check_reduction(reduction, name)
    index = _known_index(known, num_classes, name, need_novel=True)
    novel = novel_classes(index, num_classes)
    _check_target(view_logits[0], target, name)
    if labelled.dtype != torch.bool or tuple(labelled.shape) != (batch,):
        raise ValueError(f"{name}: labelled must be a bool tensor of shape ({batch},), got {labelled.dtype} "
                         f"{tuple(labelled.shape)}")
    keep, _ = _checked(labelled, mask, None, name)
    pseudo = ~labelled if keep is None else ~labelled & keep  # (B,) rows that get Sinkhorn targets
    rows = pseudo.nonzero().flatten()  # (U,)  a host sync, as the official boolean indexing
    novel_index = torch.tensor(novel, device=view_logits.device)  # (N,)
    safe_target = torch.where(labelled, target, torch.zeros((), dtype=target.dtype, device=target.device))
    one_hot = F.one_hot(safe_target.long(), num_classes).to(view_logits.dtype)  # (B, C)
    targets = []
    for v in range(num_views):
        t = one_hot * labelled.unsqueeze(-1).to(view_logits.dtype)  # (B, C); unlabelled rows 0 so far
        assigned = sinkhorn_knopp(view_logits[v][rows][:, novel_index], epsilon=epsilon, iterations=iterations)  # (U, N)
        t = t.index_put((rows.unsqueeze(-1), novel_index.unsqueeze(0)), assigned)  # (B, C)
        targets.append(t)
    log_probs = F.log_softmax(view_logits / temperature, dim=-1)  # (V, B, C)
    per_sample = view_logits.new_zeros(batch)  # (B,)
    pairs = 0
    for u in range(num_views):
        others = [v for v in range(num_views) if v != u] or [u]
        for v in others:
            per_sample = per_sample - (targets[v] * log_probs[u]).sum(-1)
            pairs += 1
    per_sample = per_sample / pairs  # (B,)
    if reduction == "none":
        return _weigh(per_sample, mask, weights, name)
    return _reduce(per_sample, mask, weights, name)


__all__ = ["ClassIndices", "crkd", "known_class_mass", "novel_classes", "sinkhorn_knopp", "uno_swapped_prediction"]
