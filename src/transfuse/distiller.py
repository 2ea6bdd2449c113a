"""The Distiller: participants, sources and weighted terms, composed into one loss.

``Distiller(sources, terms)(batch, step)`` asks every source for the outputs some term
references (each source once per batch), evaluates every :class:`Term` and returns
``{"loss": scalar, "parts": {term: unweighted value}, "weights": {term: float},
"logits": {trainable participant: (B, ...)}, "by_input": {trainable participant: the
weighted sum of the terms that train it}, "inputs": {participant: its term names}}``.

* A term compares ``input`` (a reference ``"<source>.<field>"`` on a trainable
  participant, e.g. ``student.logits``) with ``target`` (``teacher.logits``,
  ``peer.feature``, ``teachers.logits``); the target is detached by default, so a term
  trains only its input's participant. Deep mutual learning is two trainable
  participants and two symmetric terms.
* Every loss sees the term's ``mask`` (a boolean batch entry; losses that read labels
  default to ``batch["labelled"]`` when the batch has it, so unlabelled transfer-set
  samples count for the teacher terms only) and optional per-sample ``weights`` (a batch
  entry): both go through the one reduction, :func:`transfuse.functional.reduce_positions`.
* The Distiller is an ``nn.Module`` whose children are the trainable participants' models
  (``models.<name>``) and the terms' losses (``losses.<term>``, learnable parts such as
  FitNets' regressor included). Frozen participants and other sources are held outside
  the module tree: they are in neither ``parameters()`` nor ``state_dict()``. Two kinds
  of source are children too: learned ones (``learned.<name>``, optimised) and stateful
  ones without parameters (``stateful.<name>``: buffers only, e.g. a label-only teacher's
  query count), which are checkpointed and restored but never optimised.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch
from torch import nn

from .data.text import PREDICTED
from .errors import UserError
from .participants import LOGITS, Outputs, Participant, Source
from .schedules import Constant, Schedule

#: Batch entry that marks labelled samples in a transfer set (absent: all are labelled).
LABELLED = "labelled"



class DistillShapeError(UserError, ValueError):
    """Two outputs that a term cannot compare."""


class MissingBatchKeyError(UserError, KeyError):
    """A loss needs a batch entry (``target``, ``index``) the batch does not have."""

    def __str__(self) -> str:
        return str(self.args[0])


@dataclass(frozen=True)
class Ref:
    """A reference to one output of one source: ``Ref("teacher", "logits")``."""

    source: str
    field: str = LOGITS

    @classmethod
    def parse(cls, text: "str | Ref") -> "Ref":
        """``"student"`` -> logits of student; ``"student.layers.act1"`` -> that module path's output."""
        if isinstance(text, Ref):
            return text
        source, _, rest = text.partition(".")
        if not source:
            raise ValueError(f"reference {text!r}: expected '<source>.<field>', e.g. 'teacher.logits'")
        return cls(source, rest or LOGITS)

    def __str__(self) -> str:
        return f"{self.source}.{self.field}"


@dataclass
class Term:
    """One weighted loss between an input and a target reference.

    The contribution at step ``s`` is ``weight * schedule.factor(s) * loss(input, target)``.
    ``target`` is ignored (and may be None) for losses that read no target (``ce``).
    ``detach_target``: stop gradients into the target's participant (default); set it to
    False only for a method that trains both sides through one term.
    ``mask``: a boolean batch entry selecting the positions/samples the loss counts
    (default: ``"predicted"`` for position-wise losses on token rows; else ``"labelled"``
    for losses that read labels, when the batch has it).
    ``sample_weights``: a float batch entry ``(B,)`` of per-sample weights.
    """

    name: str
    loss: nn.Module
    weight: float = 1.0
    input: Ref | str = "student.logits"
    target: Ref | str | None = "teacher.logits"
    schedule: Schedule = field(default_factory=Constant)
    detach_target: bool = True
    mask: str | None = None
    sample_weights: str | None = None

    def __post_init__(self) -> None:
        self.input = Ref.parse(self.input)
        self.target = Ref.parse(self.target) if self.target is not None and self.uses_target else None
        if self.uses_target and self.target is None:
            raise ValueError(f"term {self.name!r}: its loss compares with a target, but target is None")

    @property
    def needs(self) -> tuple[str, ...]:
        """Batch entries the loss reads (``target``, ``index``)."""
        return tuple(getattr(self.loss, "needs", ()))

    @property
    def uses_target(self) -> bool:
        return bool(getattr(self.loss, "uses_teacher", True))


class Distiller(nn.Module):
    """Composes sources and terms; ``forward(batch, step)`` returns the loss and its parts."""

    def __init__(self, sources: Sequence[Source], terms: Sequence[Term]) -> None:
        super().__init__()
        if not terms:
            raise ValueError("a Distiller needs at least one term")
        names = [t.name for t in terms]
        if len(set(names)) != len(names):
            raise ValueError(f"term names must be unique, got {names}")
        by_name: dict[str, Source] = {}
        for source in sources:
            if source.name in by_name:
                raise ValueError(f"two sources are named {source.name!r}")
            by_name[source.name] = source
        self.terms = list(terms)
        self.losses = nn.ModuleDict({t.name: t.loss for t in terms})
        # Only the trainable participants are children: optimised, checkpointed, DDP-wrapped.
        self.models = nn.ModuleDict({s.name: s.model for s in sources if isinstance(s, Participant) and s.trainable})
        if not self.models:
            raise ValueError("a Distiller needs at least one trainable participant")
        # Sources with parameters of their own (a learned ensemble): trained and checkpointed too.
        self.learned = nn.ModuleDict({s.name: s for s in sources if _is_learnable_source(s)})
        object.__setattr__(self, "sources", by_name)  # outside the module tree on purpose
        self._terms_by_input = {name: {t.name for t in terms if t.input.source == name} for name in self.trainable_names}

        self._check_refs(by_name)
        # Fields each source must produce, resolved once (aliases -> module paths).
        fields: dict[str, set[str]] = {name: set() for name in by_name}
        for name, source in by_name.items():
            if isinstance(source, Participant) and source.trainable:
                fields[name].add(LOGITS)  # evaluation and logging read every trainable model's logits
        for term in self.terms:
            for ref in (term.input, term.target):
                if ref is not None:
                    fields[ref.source].add(ref.field)  # as written: each source resolves its own aliases
        order, fields = fields_by_source(by_name, fields)
        # Sources no term reads (a teacher of a labels-only run) are dropped: never run, never set up.
        self._order = [n for n in order if fields[n]]
        self._fields = {n: sorted(fields[n]) for n in self._order}
        object.__setattr__(self, "sources", {n: by_name[n] for n in self._order})
        # Sources with state but nothing to optimise (a label-only teacher's query count and
        # answers): in state_dict(), so checkpoints resume them exactly; never optimised.
        self.stateful = nn.ModuleDict({n: by_name[n] for n in self._order if _is_stateful_source(by_name[n])})
        for name in self._order:
            source = by_name[name]
            if isinstance(source, Participant):
                source.add_taps(source.resolve_field(f) for f in fields[name])

    def _check_refs(self, by_name: Mapping[str, Source]) -> None:
        for term in self.terms:
            for role, ref in (("input", term.input), ("target", term.target)):
                if ref is None:
                    continue
                if ref.source not in by_name:
                    raise ValueError(
                        f"term {term.name!r}: {role} {str(ref)!r} names no source; sources: {', '.join(sorted(by_name))}"
                    )
            source = by_name[term.input.source]
            if not (isinstance(source, Participant) and source.trainable or _is_learnable_source(source)):
                raise ValueError(
                    f"term {term.name!r}: its input {str(term.input)!r} is not a trainable participant, so the term "
                    "could train nothing; put a trainable participant on the input side"
                )

    @property
    def trainable_names(self) -> list[str]:
        """Everything a term can train, in order: the trainable participants, then learned sources."""
        return [*self.models, *self.learned]

    @property
    def participants(self) -> dict[str, Participant]:
        """The participants (trainable, and frozen ones some term reads, directly or through a
        source that runs them itself, such as a label-only teacher), by name."""
        found = {n: s for n, s in self.sources.items() if isinstance(s, Participant)}
        for source in self.sources.values():
            for member in getattr(source, "members", ()):
                if isinstance(member, Participant):
                    found.setdefault(member.name, member)
        return found

    def frozen(self) -> list[Participant]:
        """The frozen participants that some term reads, directly or through a source that runs
        them itself (the engine sets them up on Fabric; a run trains or loads their weights)."""
        return [s for s in self.participants.values() if not s.trainable]

    def outputs(self, batch: Mapping[str, torch.Tensor]) -> dict[str, Outputs]:
        """Every source's requested outputs for ``batch``, each source computed once."""
        outs: dict[str, Outputs] = {}
        for name in self._order:
            outs[name] = self.sources[name].provide(batch, self._fields[name], outs)
        return outs

    def forward(self, batch: Mapping[str, torch.Tensor], step: int = 0) -> dict[str, object]:
        if self.training:
            # Losses with per-step state (TAID's t, CTKD's curriculum) learn the optimizer step
            # here, on every micro-batch; they do their per-step work once per step.
            for loss in self.losses.values():
                begin_step = getattr(loss, "begin_step", None)
                if begin_step is not None:
                    begin_step(step)
        outs = self.outputs(batch)
        total: torch.Tensor | None = None
        parts: dict[str, torch.Tensor] = {}
        weights: dict[str, float] = {}
        by_input: dict[str, torch.Tensor] = {}  # the weighted sum of the terms that train each participant
        for term in self.terms:
            value = self._evaluate(term, outs, batch)
            weight = term.weight * term.schedule.factor(step)
            parts[term.name] = value.detach()
            weights[term.name] = weight
            # One product per term, shared by the total and its owner's sum (each step's graph
            # and Python work stay as small as a hand-written loss).
            weighted = weight * value
            total = weighted if total is None else total + weighted
            owner = term.input.source
            by_input[owner] = weighted if owner not in by_input else by_input[owner] + weighted
        logits = {name: outs[name][LOGITS] for name in self.models}
        return {"loss": total, "parts": parts, "weights": weights, "logits": logits, "by_input": by_input,
                "inputs": self._terms_by_input}

    @torch.no_grad()
    def check(self, batch: Mapping[str, torch.Tensor]) -> None:
        """Evaluate every term once on ``batch`` (eval mode, no autograd) so that outputs a
        loss cannot compare fail now, naming the term and both shapes, instead of at the
        first training step. Train/eval modes are restored afterwards."""
        modes = {m: m.training for m in self.modules()}
        # A dry run spends nothing: stateful sources (a label-only teacher's budget) get their state back.
        saved = {k: v.clone() for k, v in self.stateful.state_dict().items()}
        self.eval()
        try:
            outs = self.outputs(batch)
            for term in self.terms:
                try:
                    self._evaluate(term, outs, batch)
                except DistillShapeError:
                    raise
                except (ValueError, RuntimeError, IndexError) as err:
                    s = self._lookup(outs, term.input)
                    sides = f"{term.input} {tuple(s.shape[1:])}"
                    if term.target is not None:
                        sides += f" with {term.target} {tuple(self._lookup(outs, term.target).shape[1:])}"
                    raise DistillShapeError(f"term {term.name!r} cannot compare {sides} (per-sample shapes): {err}") from None
        finally:
            for module, training in modes.items():
                module.train(training)
            self.stateful.load_state_dict(saved)

    def _evaluate(self, term: Term, outs: Mapping[str, Outputs], batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The term's unweighted loss on this batch's source outputs."""
        s = self._lookup(outs, term.input)
        t = None
        if term.target is not None:
            t = self._lookup(outs, term.target)
            if term.detach_target:
                t = t.detach()
            _check_pair(term, s, t)
        return term.loss(s, t, mask=_mask(term, batch), weights=_entry(term, batch, term.sample_weights), **_needs(term, batch))

    def _lookup(self, outs: Mapping[str, Outputs], ref: Ref) -> torch.Tensor:
        return outs[ref.source][ref.field]


def _is_learnable_source(source: object) -> bool:
    return isinstance(source, nn.Module) and not isinstance(source, Participant) and any(
        p.requires_grad for p in source.parameters()
    )


def _is_stateful_source(source: object) -> bool:
    """A source that is a module with buffers but no learnable parameters (a label-only teacher)."""
    return (isinstance(source, nn.Module) and not isinstance(source, Participant) and not _is_learnable_source(source)
            and any(True for _ in source.buffers()))


def fields_by_source(sources: Mapping[str, Source], wanted: Mapping[str, set[str]]) -> tuple[list[str], dict[str, set[str]]]:
    """``(order, fields)``: source names ordered so that each comes after the sources it
    reads, and the fields each must produce -- ``wanted`` plus, for every ensemble, its
    own fields asked of its members."""
    order = _topological(sources)
    fields = {name: set(wanted.get(name, ())) for name in sources}
    for name in reversed(order):  # readers before the sources they read
        for member in sources[name].inputs:
            fields[member] |= fields[name]
    return order, fields


def _topological(sources: Mapping[str, Source]) -> list[str]:
    """Source names ordered so that every source comes after the sources it reads."""
    order: list[str] = []
    state: dict[str, int] = {}

    def visit(name: str, path: tuple[str, ...]) -> None:
        if state.get(name) == 2:
            return
        if state.get(name) == 1:
            raise ValueError(f"sources read each other in a cycle: {' -> '.join((*path, name))}")
        if name not in sources:
            raise ValueError(f"source {path[-1]!r} reads {name!r}, which is not a source; sources: {', '.join(sorted(sources))}")
        state[name] = 1
        for member in sources[name].inputs:
            visit(member, (*path, name))
        state[name] = 2
        order.append(name)

    for name in sources:
        visit(name, ())
    return order


def _entry(term: Term, batch: Mapping[str, torch.Tensor], key: str | None) -> torch.Tensor | None:
    if key is None:
        return None
    if key not in batch:
        raise MissingBatchKeyError(f"term {term.name!r} reads batch entry {key!r}, but the batch has only {sorted(batch)}")
    return batch[key]


def _mask(term: Term, batch: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
    if term.mask is not None:
        return _entry(term, batch, term.mask)
    # Token rows: only the positions that predict a token carrying loss count, for every
    # position-wise term (not the last position, padding or a prompt).
    if PREDICTED in batch and getattr(term.loss, "positionwise", True):
        return batch[PREDICTED]
    # A loss that reads labels must not count samples that have none.
    if "target" in term.needs and LABELLED in batch:
        return batch[LABELLED]
    return None


def _needs(term: Term, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    missing = [k for k in term.needs if k not in batch]
    if missing:
        raise MissingBatchKeyError(
            f"term {term.name!r} needs batch entries {missing}, but the batch has only {sorted(batch)}. "
            "Datasets built by transfuse.data provide 'input', 'target', 'index' and 'sample_id'; a custom dataset "
            "must return them too."
        )
    needs = {k: batch[k] for k in term.needs}
    # Entries a loss reads where the batch has them (a mixup's partner labels) and does without otherwise.
    needs.update({k: batch[k] for k in getattr(term.loss, "optional_needs", ()) if k in batch})
    return needs


def _check_pair(term: Term, student: torch.Tensor, teacher: torch.Tensor) -> None:
    if student.shape[:1] != teacher.shape[:1]:
        raise DistillShapeError(
            f"term {term.name!r}: {term.input} has batch size {student.shape[0]} but {term.target} has "
            f"{teacher.shape[0]}; both sides must see the same batch."
        )
    if term.input.field == LOGITS and term.target.field == LOGITS and student.shape != teacher.shape:
        s_classes, t_classes = student.shape[-1], teacher.shape[-1]
        what = (
            f"{term.input.source} predicts {s_classes} classes and {term.target.source} {t_classes}"
            if s_classes != t_classes
            else "their non-class dimensions differ"
        )
        raise DistillShapeError(
            f"term {term.name!r} compares {term.input} of shape {tuple(student.shape)} with {term.target} "
            f"of shape {tuple(teacher.shape)}: {what}. Logit losses need both models to share one label "
            "space; build the student with the teacher's num_classes, or distil features instead."
        )
