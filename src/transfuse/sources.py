"""Sources that are not models: the teacher-output cache and ensembles over other sources.

A term's target is a reference ``<source>.<field>``; the source may be a
:class:`~transfuse.participants.Participant`, a :class:`CachedOutputs` (a teacher answered
from disk by sample id, without loading or running it), an :class:`Ensemble` that
combines the outputs of several sources with fixed weights (several teachers into one
target), a :class:`LearnedEnsemble` whose weights are trained by the terms that take
it as their input (e.g. a label loss on the ensemble's prediction), or a
:class:`MostConfident` source that answers each sample with the member most confident in
its label (KL+DP's data partitioning).
"""

from __future__ import annotations

import math
from typing import Iterable, Literal, Mapping, Sequence

import torch
import torch.nn.functional as F

from torch import nn

from .distiller import MissingBatchKeyError
from .participants import LOGITS, Outputs

SAMPLE_ID = "sample_id"
TARGET = "target"
LABELLED = "labelled"


class CachedOutputs:
    """A frozen teacher replaced by its cached outputs, looked up by ``batch["sample_id"]``.

    ``cache`` is an opened :class:`transfuse.cache.TeacherCache`. ``aliases`` maps the
    fields a run asks for (``feature``) to the names stored in the cache (the module path
    the teacher was tapped at). Values come back as float32 on the batch's device; an fp32
    cache returns exactly what the teacher computed. A field stored as top-k logits (a
    language model's cache built with ``--topk K``) comes back as a
    :class:`~transfuse.functional.divergences.TopKLogits` (``logprobs``/``indices``
    ``(B, T, K)``, ``tail`` ``(B, T)``), which only the losses of
    :func:`~transfuse.losses.divergences.topk_losses` accept; :func:`check_topk_readers`
    refuses any other reader before training.
    """

    inputs: tuple[str, ...] = ()
    trainable = False

    def __init__(self, name: str, cache, *, aliases: Mapping[str, str] | None = None) -> None:
        self.name = name
        self.cache = cache
        self.aliases = dict(aliases or {})

    def __repr__(self) -> str:
        return f"CachedOutputs({self.name!r}, {len(self.cache)} samples)"

    def resolve_field(self, field: str) -> str:
        """An alias (``feature``/``hint``) to the cached field name it was stored under."""
        return self.aliases.get(field, field)

    @property
    def topk_fields(self) -> dict[str, int]:
        """The cached fields stored as top-k logits, with their k (empty for a dense cache)."""
        return self.cache.topk_fields()

    def provide(self, batch: Mapping[str, torch.Tensor], fields: Iterable[str], upstream=None) -> Outputs:
        if SAMPLE_ID not in batch:
            raise KeyError(
                f"source {self.name!r} answers from a teacher-output cache by sample id, but the batch has no "
                f"'{SAMPLE_ID}' (keys: {sorted(batch)}); datasets built by transfuse.data provide it"
            )
        ids = batch[SAMPLE_ID]
        return self.cache.lookup(ids, fields=list(fields), device=ids.device)


def check_topk_readers(sources: Mapping[str, object], readers: Iterable[tuple[str, object, object, object]]) -> None:
    """Refuse, before training, every reader of a top-k cached field that needs dense logits.

    ``sources``: the run's sources by name. ``readers``: one ``(term name, LossSpec, input
    Ref, target Ref or None)`` per term. A term whose target is a top-k field of a
    :class:`CachedOutputs` must use a loss that accepts a top-k teacher
    (:func:`~transfuse.losses.divergences.accepts_topk`); a source that combines its
    members' outputs (an ensemble, ``most_confident``, a label-only teacher, ...) cannot
    read a top-k member at all. Raises :class:`~transfuse.cache.CacheMismatchError` naming
    the term (or source), the participant, its cache folder, the field's k, and the losses
    that accept a top-k teacher.
    """
    from .cache import CacheMismatchError
    from .distiller import fields_by_source
    from .losses.divergences import accepts_topk, topk_losses

    topk = {name: s.topk_fields for name, s in sources.items() if isinstance(s, CachedOutputs) and s.topk_fields}
    if not topk:
        return
    readers = list(readers)

    def refuse(who: str, name: str, field: str, why: str) -> None:
        source = sources[name]
        raise CacheMismatchError(
            f"{who} {why}, but participant {name!r} is answered from the teacher-output cache "
            f"{str(source.cache.path)!r}, which stores {field!r} as its top-{topk[name][field]} tokens only "
            f"(cache-teacher --topk). The losses that accept a top-k teacher are {', '.join(topk_losses())}; use one "
            f"of them, or build a dense cache (without --topk) for this term",
            field=field, cached=f"topk k={topk[name][field]}", expected="dense")

    wanted: dict[str, set[str]] = {}
    for term, spec, inp, tgt in readers:
        for ref in (inp, tgt):
            if ref is not None:
                wanted.setdefault(ref.source, set()).add(ref.field)
        if tgt is None or tgt.source not in topk:
            continue
        field = sources[tgt.source].resolve_field(tgt.field)
        if field in topk[tgt.source] and not accepts_topk(spec):
            refuse(f"term {term!r} ({spec.name}: {inp} -> {tgt})", tgt.source, field,
                   f"needs the teacher's dense logits, which loss {spec.name!r} compares with")
    # A source that combines its members' outputs reads each member's dense tensors: the
    # fields it must produce are asked of every member (as the Distiller will ask them).
    _, fields = fields_by_source(sources, wanted)
    for name, source in sources.items():
        for member in source.inputs:
            if member in topk:
                stored = {sources[member].resolve_field(f) for f in fields[name]} & set(topk[member])
                for field in sorted(stored):
                    refuse(f"source {name!r} ({type(source).__name__})", member, field,
                           "combines its members' dense outputs")


Combine = Literal["mean_probs", "mean_logits"]


class Ensemble:
    """Several sources combined into one: e.g. the mean of k teachers' softened predictions.

    * ``combine="mean_probs"`` (logits only): ``logits = T * log(sum_i w_i softmax(z_i / T))``,
      so that ``softmax(logits / T)`` is exactly the weighted mean of the members'
      temperature-softened probabilities -- a KD term at the same temperature then
      distils the ensemble's average prediction (the multi-teacher KD of You et al.,
      KDD 2017, and the averaging baseline of most multi-teacher papers);
    * ``combine="mean_logits"``: the weighted mean of the members' logits (and of any
      other field, which then needs equal shapes).

    ``weights`` default to uniform and are normalised to sum to 1.
    """

    trainable = False

    def __init__(
        self, name: str, members: Sequence[str], *, combine: Combine = "mean_probs", temperature: float = 1.0,
        weights: Sequence[float] | None = None,
    ) -> None:
        _check_ensemble(name, members, temperature)
        if combine not in ("mean_probs", "mean_logits"):
            raise ValueError(f"ensemble {name!r}: combine must be 'mean_probs' or 'mean_logits', got {combine!r}")
        if weights is None:
            weights = [1.0] * len(members)
        if len(weights) != len(members) or any(not (w >= 0 and math.isfinite(w)) for w in weights) or sum(weights) <= 0:
            raise ValueError(
                f"ensemble {name!r}: weights must be {len(members)} finite non-negative numbers with a positive sum, "
                f"got {list(weights)}"
            )
        self.name = name
        self.inputs = tuple(members)
        self.combine = combine
        self.temperature = float(temperature)
        total = float(sum(weights))
        self.weights = [float(w) / total for w in weights]

    def __repr__(self) -> str:
        return f"Ensemble({self.name!r}, members={list(self.inputs)}, combine={self.combine!r})"

    def resolve_field(self, field: str) -> str:
        return field

    def provide(self, batch, fields: Iterable[str], upstream: Mapping[str, Outputs]) -> Outputs:
        return _combine(self, fields, upstream, self.weights, mean_probs=self.combine == "mean_probs")


def _check_ensemble(name: str, members: Sequence[str], temperature: float) -> None:
    if len(members) < 1:
        raise ValueError(f"ensemble {name!r} needs at least one member")
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"ensemble {name!r}: temperature must be a finite number > 0, got {temperature}")


def _combine(ensemble, fields: Iterable[str], upstream: Mapping[str, Outputs], weights, *, mean_probs: bool) -> Outputs:
    """Each field's weighted combination over ``ensemble.inputs``: logits as ``mean_probs``
    (if asked), everything else as the weighted mean."""
    out: Outputs = {}
    for field in fields:
        values = [upstream[m][field] for m in ensemble.inputs]
        if field == LOGITS and mean_probs:
            out[field] = mean_probs_logits(values, temperature=ensemble.temperature, weights=weights)
        else:
            out[field] = sum(weights[i] * v.float() for i, v in enumerate(values))
    return out


def mean_probs_logits(
    logits: Sequence[torch.Tensor], *, temperature: float, weights: Sequence[float] | torch.Tensor
) -> torch.Tensor:
    """Logits whose softmax at ``temperature`` is ``sum_i w_i softmax(logits_i / T)``.

    Shapes: each ``(..., C)`` -> ``(..., C)``; ``weights`` ``(K,)`` (a tensor may carry
    gradients, as a learned ensemble's do). Computed in log space
    (``logsumexp_i(log w_i + log_softmax(z_i / T))``), so a tiny member probability stays finite.
    """
    stacked = torch.stack([F.log_softmax(z.float() / temperature, dim=-1) for z in logits])  # (K, ..., C)
    log_w = torch.log(torch.as_tensor(weights, dtype=stacked.dtype, device=stacked.device))  # (K,)
    log_w = log_w.reshape(-1, *([1] * (stacked.dim() - 1)))
    return temperature * torch.logsumexp(stacked + log_w, dim=0)  # (..., C)


class LearnedEnsemble(nn.Module):
    """An ensemble whose member weights are learned: ``w = softmax(theta)``, ``theta`` ``(K,)``
    starting at 0 (equal weights).

    It is *trainable*: the Distiller holds it in its module tree (optimised with its own
    optimizer, checkpointed), and a term may take it as its ``input`` -- e.g.
    ``{loss: ce, input: teachers.logits}`` learns which teacher to trust from the labels,
    while ``{loss: kd, input: student.logits, target: teachers.logits}`` distils the
    weighted ensemble (detached, so the KD term does not move the weights). Logits are
    combined as ``mean_probs`` at ``temperature`` (see :class:`Ensemble`), other fields by
    the weighted mean.
    """

    trainable = True

    def __init__(self, name: str, members: Sequence[str], *, temperature: float = 1.0) -> None:
        super().__init__()
        _check_ensemble(name, members, temperature)
        self.name = name
        self.inputs = tuple(members)
        self.temperature = float(temperature)
        self.theta = nn.Parameter(torch.zeros(len(members)))  # (K,) weight logits

    def extra_repr(self) -> str:
        return f"name={self.name!r}, members={list(self.inputs)}, temperature={self.temperature}"

    def weights(self) -> torch.Tensor:
        """The current member weights ``(K,)``, summing to 1."""
        return torch.softmax(self.theta, dim=0)

    def resolve_field(self, field: str) -> str:
        return field

    def provide(self, batch, fields: Iterable[str], upstream: Mapping[str, Outputs]) -> Outputs:
        return _combine(self, fields, upstream, self.weights(), mean_probs=True)


Criterion = Literal["label", "confidence"]
CRITERIA: tuple[str, ...] = ("label", "confidence")


def most_confident(
    logits: Sequence[torch.Tensor],
    target: torch.Tensor | None = None,
    *,
    criterion: Criterion = "label",
    temperature: float = 1.0,
    labelled: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per position, the logits of the member that is most confident: ``(logits, choice)``.

    ``logits``: K tensors ``(..., C)`` (float32 results). ``criterion="label"``: the member
    whose ``softmax(z / T)`` gives the highest probability to ``target`` ``(...)`` (integer
    class ids); ``"confidence"``: the highest top-1 probability (no labels read).
    Returns the chosen logits ``(..., C)`` and the chosen member's index ``(...)`` (int64).

    Ties go to the EARLIER member: a later member is chosen only if it is strictly more
    confident. With ``criterion="label"``, a position without a label -- a negative
    target (:data:`transfuse.data.IGNORE_TARGET` = -1, or -100) or ``labelled`` False --
    gets the FIRST member. KL+DP lists the student's frozen original copy first, so the
    student keeps its own predictions wherever the teacher is not strictly more
    confident in the label, and wherever there is no label to judge by. A NaN
    probability never wins.

    This follows the data partitioning of Roth et al.'s official code (``most-conf``:
    ``softmax(teacher)[y] > softmax(original)[y]`` at temperature 1, per sample; the
    unsupervised ``most-conf_u`` compares the top-1 probabilities; several teachers: the
    argmax over ``[original, teacher_1, ...]``, which keeps the first on ties).
    """
    if len(logits) < 1:
        raise ValueError("most_confident needs at least one member's logits")
    if criterion not in CRITERIA:
        raise ValueError(f"most_confident: criterion must be one of {', '.join(CRITERIA)}; got {criterion!r}")
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"most_confident: temperature must be a finite number > 0, got {temperature}")
    shapes = {tuple(z.shape) for z in logits}
    if len(shapes) != 1:
        raise ValueError(f"most_confident: the members' logits must have one shape; got {sorted(shapes)}")
    stacked = torch.stack([z.float() for z in logits])  # (K, ..., C)
    probs = torch.softmax(stacked / temperature, dim=-1)  # (K, ..., C)
    if criterion == "label":
        if target is None:
            raise ValueError("most_confident: criterion 'label' needs the targets")
        if target.shape != stacked.shape[1:-1]:
            raise ValueError(
                f"most_confident: target shape {tuple(target.shape)} must equal the logits' leading shape "
                f"{tuple(stacked.shape[1:-1])}"
            )
        has_label = target >= 0  # (...)
        if labelled is not None:
            lab = labelled.to(device=target.device, dtype=torch.bool)  # (...) or a prefix, e.g. per-sample (B,)
            has_label = has_label & lab.reshape(*lab.shape, *([1] * (target.dim() - lab.dim())))
        index = torch.where(has_label, target, torch.zeros_like(target)).long()  # placeholder class where unlabelled
        scores = probs.gather(-1, index.reshape(1, *index.shape, 1).expand(len(logits), *index.shape, 1)).squeeze(-1)
    else:
        has_label = None
        scores = probs.max(dim=-1).values  # (K, ...)
    scores = torch.nan_to_num(scores, nan=-1.0)  # below every probability: NaN never wins
    k = len(logits)
    order = torch.arange(k, device=scores.device).reshape(k, *([1] * (scores.dim() - 1)))  # (K, 1, ...)
    is_best = scores == scores.max(dim=0, keepdim=True).values  # (K, ...)
    choice = torch.where(is_best, order, torch.full_like(order, k)).min(dim=0).values  # first best member, (...)
    if has_label is not None:
        choice = torch.where(has_label, choice, torch.zeros_like(choice))
    picked = stacked.gather(0, choice.reshape(1, *choice.shape, 1).expand(1, *stacked.shape[1:])).squeeze(0)
    return picked, choice


class MostConfident:
    """Per sample, the logits of the member most confident in the sample's label.

    The data partitioning of KL+DP (Roth et al., ICLR 2024): with members
    ``[original, teacher]`` a KD term targeting this source distils the teacher only on
    the samples where the teacher gives the label a strictly higher probability than the
    student's frozen original, and the original (the student's own starting point)
    everywhere else -- including unlabelled samples and ties (see :func:`most_confident`,
    which this source applies to ``batch["target"]``, and ``batch["labelled"]`` when
    present). ``criterion="confidence"`` compares top-1 probabilities instead and reads
    no labels. Probabilities are compared at ``temperature`` (1 in the official code).
    Only the ``logits`` field exists.
    """

    trainable = False

    def __init__(self, name: str, members: Sequence[str], *, criterion: Criterion = "label", temperature: float = 1.0) -> None:
        _check_ensemble(name, members, temperature)
        if criterion not in CRITERIA:
            raise ValueError(f"source {name!r}: criterion must be one of {', '.join(CRITERIA)}; got {criterion!r}")
        self.name = name
        self.inputs = tuple(members)
        self.criterion = criterion
        self.temperature = float(temperature)

    def __repr__(self) -> str:
        return f"MostConfident({self.name!r}, members={list(self.inputs)}, criterion={self.criterion!r})"

    def resolve_field(self, field: str) -> str:
        return field

    def provide(self, batch: Mapping[str, torch.Tensor], fields: Iterable[str], upstream: Mapping[str, Outputs]) -> Outputs:
        fields = list(fields)
        other = sorted(set(fields) - {LOGITS})
        if other:
            raise ValueError(f"source {self.name!r} (most_confident) answers only 'logits', not {other}")
        target = None
        if self.criterion == "label":
            if TARGET not in batch:
                raise MissingBatchKeyError(
                    f"source {self.name!r} picks, per sample, the member most confident in the label, but the batch "
                    f"has no '{TARGET}' (keys: {sorted(batch)}); use criterion: confidence for data without labels"
                )
            target = batch[TARGET]
        logits, _ = most_confident([upstream[m][LOGITS] for m in self.inputs], target, criterion=self.criterion,
                                   temperature=self.temperature, labelled=batch.get(LABELLED))
        return {LOGITS: logits} if fields else {}


def by_class_group(
    logits: Sequence[torch.Tensor], target: torch.Tensor | None, group_of_class: torch.Tensor,
    *, labelled: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per position, the logits of the specialist responsible for the position's label: ``(logits, group)``.

    ``logits``: K tensors ``(..., C)``; ``target`` ``(...)`` class ids; ``group_of_class``
    ``(C,)`` int64, the member responsible for each class (-1: none). A position without a
    label (negative target, ``labelled`` False, no target at all) or whose class no member
    covers gets the member with the highest top-1 probability (ties to the earlier one).
    Returns the chosen logits ``(..., C)`` (float32) and the member index ``(...)`` int64.
    """
    stacked = torch.stack([z.float() for z in logits])  # (K, ..., C)
    top1 = stacked.softmax(-1).amax(-1).nan_to_num(nan=-1.0)  # (K, ...)
    group = top1.argmax(0)  # (...): the most confident member, for positions no label routes
    if target is not None:
        known = target >= 0
        if labelled is not None:
            known = known & labelled.bool()
        cls = target.clamp(min=0, max=len(group_of_class) - 1)
        routed = group_of_class.to(target.device)[cls]  # (...)
        use = known & (target < len(group_of_class)) & (routed >= 0)
        group = torch.where(use, routed, group)
    chosen = stacked.gather(0, group.unsqueeze(0).unsqueeze(-1).expand(1, *stacked.shape[1:])).squeeze(0)
    return chosen, group


class ByClassGroup:
    """Specialist teachers, one per class group: per sample, the logits of the member whose
    classes contain the sample's label (Knowledge Concentration's routing of a sample to
    the teacher of its vertical). Fields: ``logits`` ``(B, C)`` and ``group`` ``(B,)``
    int64, the chosen member's position in ``members``. Unlabelled samples and classes
    that no member covers go to the member with the highest top-1 probability.
    """

    trainable = False
    FIELDS = (LOGITS, "group")
    own_field_shapes = {"group": ()}  #: per-sample shapes of the fields not taken from a member

    def __init__(self, name: str, members: Sequence[str], *, groups: Sequence[Sequence[int]]) -> None:
        _check_ensemble(name, members, 1.0)
        if len(groups) != len(members):
            raise ValueError(f"source {name!r}: {len(members)} members but {len(groups)} class groups")
        flat = [int(c) for g in groups for c in g]
        if any(c < 0 for c in flat) or len(set(flat)) != len(flat) or any(len(g) == 0 for g in groups):
            raise ValueError(f"source {name!r}: the class groups must be non-empty, disjoint and >= 0; got {list(groups)}")
        self.name = name
        self.inputs = tuple(members)
        self.groups = [sorted(int(c) for c in g) for g in groups]
        table = torch.full((max(flat) + 1,), -1, dtype=torch.long)
        for member, group in enumerate(self.groups):
            table[group] = member
        self.group_of_class = table  # (max class + 1,)

    def __repr__(self) -> str:
        return f"ByClassGroup({self.name!r}, members={list(self.inputs)}, groups={self.groups})"

    def resolve_field(self, field: str) -> str:
        return field

    def provide(self, batch: Mapping[str, torch.Tensor], fields: Iterable[str], upstream: Mapping[str, Outputs]) -> Outputs:
        fields = list(fields)
        other = sorted(set(fields) - set(self.FIELDS))
        if other:
            raise ValueError(f"source {self.name!r} (by_class_group) answers only {list(self.FIELDS)}, not {other}")
        if not fields:
            return {}
        logits, group = by_class_group([upstream[m][LOGITS] for m in self.inputs], batch.get(TARGET),
                                       self.group_of_class, labelled=batch.get(LABELLED))
        return {k: v for k, v in ((LOGITS, logits), ("group", group)) if k in fields}
