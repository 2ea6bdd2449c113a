"""Participants: the named models of a run, each trainable or frozen.

A run has one or more participants -- ``student``, ``teacher``, ``peer``, ``teacher_2``
-- and every participant is a :class:`Source`: it answers a batch with named outputs,
``"logits"`` and any tapped module path. The difference between a student and a teacher
is one flag:

* **trainable** participants run with autograd and in training mode; the
  :class:`~transfuse.distiller.Distiller` holds them in its module tree, so the engine
  optimises them (each may have its own optimizer) and checkpoints them;
* **frozen** participants are eval-locked, run without autograd, are never optimised and
  never checkpointed. They are kept *outside* the Distiller's module tree and are set up
  through Fabric separately (:meth:`Participant.setup`), so device and precision follow
  the run's ``fabric:`` section and a sharding strategy can be applied to them later
  without changing this API.

Sources that are not models -- the teacher-output cache, an ensemble over other sources --
live in :mod:`transfuse.sources`.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Protocol, runtime_checkable

import torch
from torch import nn

from .models.outputs import call_model
from .taps import FeatureTaps

LOGITS = "logits"
#: Field aliases a reference may use; each model names the module path behind them.
FIELD_ALIASES = {"feature": "feature_layer", "hint": "hint_layer", "map": "map_layer"}

Outputs = dict[str, torch.Tensor]


@runtime_checkable
class Source(Protocol):
    """Anything that answers a batch with named outputs.

    ``provide(batch, fields, upstream)`` returns ``{field: tensor}`` for every requested
    field; ``upstream`` holds the outputs of the sources computed before this one (an
    ensemble reads its members there). ``inputs`` names the sources it reads from.
    """

    name: str
    inputs: tuple[str, ...]

    def provide(self, batch: Mapping[str, torch.Tensor], fields: Iterable[str], upstream: Mapping[str, Outputs]) -> Outputs: ...


class Participant:
    """A named model of the run: trainable (optimised, checkpointed) or frozen (a teacher).

    >>> student = Participant("student", student_net)                  # trainable
    >>> teacher = Participant("teacher", teacher_net, trainable=False)  # frozen, eval-locked

    ``resolve_field("feature")`` turns the aliases ``feature``/``hint`` into the module path
    the model declares (``model.feature_layer``/``model.hint_layer``); ``add_taps(paths)``
    declares the module paths its outputs must include.
    """

    inputs: tuple[str, ...] = ()

    def __init__(self, name: str, model: nn.Module, *, trainable: bool = True) -> None:
        if not name.isidentifier():
            raise ValueError(f"participant name {name!r} must be an identifier (letters, digits, underscores)")
        self.name = name
        self.model = model
        self.trainable = trainable
        self.taps = FeatureTaps(model, [], role=name)
        if not trainable:
            model.requires_grad_(False)
            model.eval()
        self._precision = None  # a Fabric precision plugin once set up (frozen participants)

    def __repr__(self) -> str:
        kind = "trainable" if self.trainable else "frozen"
        return f"Participant({self.name!r}, {type(self.model).__name__}, {kind})"

    def resolve_field(self, field: str) -> str:
        """``logits``, a module path, or an alias (``feature``, ``hint``, ``map``) resolved to the model's declared path."""
        if field in FIELD_ALIASES:
            path = getattr(self.model, FIELD_ALIASES[field], None)
            if not path:
                raise ValueError(
                    f"participant {self.name!r} ({type(self.model).__name__}) declares no default {field!r} module; "
                    f"name a module path instead, e.g. {self.name}.<module path>"
                )
            return path
        return field

    def add_taps(self, paths: Iterable[str]) -> None:
        """Tap more module paths (duplicates are dropped); an unknown path fails here, listing close ones."""
        paths = [p for p in paths if p != LOGITS]
        self.taps = FeatureTaps(self.model, [*self.taps.paths, *paths], role=self.name)

    def setup(self, fabric) -> None:
        """Place a frozen participant on Fabric's device in Fabric's precision.

        Trainable participants are set up with the Distiller (``fabric.setup``), which also
        wraps them for DDP; a frozen one has no gradients to synchronise, so it is only
        converted and moved.
        """
        if self.trainable:
            return
        precision = fabric.strategy.precision
        self.model = precision.convert_module(self.model)
        self.model.to(fabric.device)
        self._precision = precision

    def provide(self, batch: Mapping[str, torch.Tensor], fields: Iterable[str] = (LOGITS,), upstream=None) -> Outputs:
        """``{"logits": (B, ...), <field>: feature, ...}`` for ``batch``, keyed by the fields
        as asked (``feature`` stays ``feature``; its module path must have been tapped with
        :meth:`add_taps`).

        A frozen participant runs in eval mode without autograd, whatever mode the caller
        is in; a trainable one runs as it is (the engine puts it in training mode).
        """
        if self.trainable:
            return self._named(self._forward(batch), fields)
        if self.model.training:  # eval-locked: a caller's .train() must not switch on dropout
            self.model.eval()
        with torch.no_grad():
            if self._precision is not None:
                with self._precision.forward_context():
                    out = self._forward(self._precision.convert_input(dict(batch)))
                return self._named(self._precision.convert_output(out), fields)
            return self._named(self._forward(batch), fields)

    def _named(self, out: Outputs, fields: Iterable[str]) -> Outputs:
        named = {LOGITS: out[LOGITS]}
        for field in fields:
            named[field] = out[self.resolve_field(field)]
        return named

    def _forward(self, batch: Mapping[str, torch.Tensor]) -> Outputs:
        with self.taps:
            logits = call_model(self.model, batch)
        return {LOGITS: logits, **self.taps.collect()}
