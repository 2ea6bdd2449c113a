"""Sources that are not models: the teacher-output cache and ensembles over other sources.

A term's target is a reference ``<source>.<field>``; the source may be a
:class:`~transfuse.participants.Participant`, a :class:`CachedOutputs` (a teacher answered
from disk by sample id, without loading or running it), an :class:`Ensemble` that
combines the outputs of several sources with fixed weights (several teachers into one
target), or a :class:`LearnedEnsemble` whose weights are trained by the terms that take
it as their input (e.g. a label loss on the ensemble's prediction).
"""

from __future__ import annotations

import math
from typing import Iterable, Literal, Mapping, Sequence

import torch
import torch.nn.functional as F

from torch import nn

from .participants import LOGITS, Outputs

SAMPLE_ID = "sample_id"


class CachedOutputs:
    """A frozen teacher replaced by its cached outputs, looked up by ``batch["sample_id"]``.

    ``cache`` is an opened :class:`transfuse.cache.TeacherCache`. ``aliases`` maps the
    fields a run asks for (``feature``) to the names stored in the cache (the module path
    the teacher was tapped at). Values come back as float32 on the batch's device; an fp32
    cache returns exactly what the teacher computed.
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

    def provide(self, batch: Mapping[str, torch.Tensor], fields: Iterable[str], upstream=None) -> Outputs:
        if SAMPLE_ID not in batch:
            raise KeyError(
                f"source {self.name!r} answers from a teacher-output cache by sample id, but the batch has no "
                f"'{SAMPLE_ID}' (keys: {sorted(batch)}); datasets built by transfuse.data provide it"
            )
        ids = batch[SAMPLE_ID]
        return self.cache.lookup(ids, fields=list(fields), device=ids.device)


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
