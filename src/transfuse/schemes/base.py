"""What a scheme is, and the one function that turns a ``distill:`` section into terms."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from pydantic import BaseModel, ValidationError

if TYPE_CHECKING:
    from ..config import DistillConfig, EnsembleConfig, ParticipantConfig, TermConfig

NO_DISTILLATION = "none"

Expansion = tuple[list["TermConfig"], dict[str, "EnsembleConfig"]]


@dataclass(frozen=True)
class Scheme:
    """A short-form method that expands into several terms (and sources).

    ``options`` is a pydantic model of the scheme's ``distill.options`` (typed, with
    value constraints); ``build(distill, participants, options) -> (terms, sources)``.
    """

    name: str
    options: type[BaseModel]
    build: Callable[..., Expansion]
    paper: str | None = None

    def check(self, options: dict[str, Any]) -> BaseModel:
        """Validated options; a bad name or value raises ValueError naming it."""
        try:
            return self.options.model_validate(options)
        except ValidationError as err:
            problems = "; ".join(
                f"{'.'.join(map(str, e['loc'])) or '(options)'}: {e['msg'].removeprefix('Value error, ')}"
                + (f" (got {e['input']!r})" if e["type"] != "missing" and not isinstance(e.get("input"), dict) else "")
                for e in err.errors()
            )
            accepted = ", ".join(self.options.model_fields) or "(none)"
            raise ValueError(f"options: scheme {self.name!r}: {problems}; it accepts: {accepted}") from None

    def expand(self, distill: "DistillConfig", participants: dict[str, "ParticipantConfig"]) -> Expansion:
        return self.build(distill, participants, self.check(distill.options))


def expand(distill: "DistillConfig", participants: dict[str, "ParticipantConfig"]) -> Expansion:
    """``(terms, sources)`` of a ``distill:`` section: the long form as written, or the
    short form expanded (a scheme, a loss learnt from ``teacher``, or labels only)."""
    from ..config import TermConfig
    from ..losses import LOSSES
    from . import SCHEMES

    if distill.terms is not None:
        return list(distill.terms), {}
    method = distill.method or "kd"
    if method == NO_DISTILLATION:
        return [TermConfig(loss="ce", weight=1.0 if distill.ce_weight is None else distill.ce_weight)], {}
    if method in SCHEMES:
        return SCHEMES.get(method).expand(distill, participants)
    spec = LOSSES.get(method)
    ce_weight = spec.ce_weight if distill.ce_weight is None else distill.ce_weight
    terms = []
    if ce_weight > 0 and method != "ce":
        terms.append(TermConfig(loss="ce", weight=ce_weight))
    # None leaves the loss's own default schedule (DKD's warm-up); 0 turns any warm-up off.
    if distill.warmup_steps is None:
        schedule = None
    elif distill.warmup_steps == 0:
        schedule = {"kind": "constant"}
    else:
        schedule = {"kind": "warmup", "options": {"steps": distill.warmup_steps}}
    terms.append(
        TermConfig(
            loss=method,
            weight=distill.weight,
            options=distill.options,
            input=_side("student", distill.student_layer),
            target=_side("teacher", distill.teacher_layer) if spec.uses_teacher else None,
            schedule=schedule,
        )
    )
    return terms, {}


def _side(participant: str, layer: str) -> str:
    return participant if layer == "auto" else f"{participant}.{layer}"
