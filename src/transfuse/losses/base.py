"""Loss registration: a :class:`LossSpec` per name a config can type, built from a pure function.

Adding a logit loss takes a function in :mod:`transfuse.functional` (keyword-only,
typed options; ``mask=None, weights=None`` per call), its test, and one call::

    register_loss(my_loss, name="my_loss", kind="logits", summary="one line for `transfuse methods`")

The registration makes the module (a :class:`~transfuse.losses.module.FunctionLoss`
subclass) and the options model (from the function's typed signature), so configs are
checked at load time. Losses with learnable parts register their own
:class:`DistillLoss` subclass the same way.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import pydantic
import torch

from ..registry import Registry
from .module import DistillLoss, FunctionLoss
from .options import describe_field, options_model, validate, with_defaults

KINDS = ("logits", "feature", "relation")
INPUTS = ("logits", "feature", "hint", "map")


@dataclass(frozen=True)
class ScheduleDefault:
    """A loss's default weight schedule: a schedule ``kind`` and its options.

    ``fraction``: for schedules with a length, that length as a fraction of
    ``train.steps`` (``ScheduleDefault("warmup", fraction=1/12)``); None where
    ``options`` gives everything.
    """

    kind: str
    fraction: float | None = None
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class LossSpec:
    """Everything the rest of transfuse knows about one registered loss."""

    name: str  #: what configs type
    kind: Literal["logits", "feature", "relation"]  #: for listings
    summary: str  #: one line for `transfuse methods`
    module: type[DistillLoss]  #: the nn.Module class that computes it (auto-made for a function)
    fn: Callable[..., torch.Tensor] | None = None  #: the pure function in transfuse.functional, if any
    paper: str | None = None  #: citation with link; None for an in-house loss
    inputs: str = "logits"  #: default field compared: "logits" | "feature" (penultimate) | "hint" (intermediate map)
    weight: float = 1.0  #: default weight of this term
    ce_weight: float = 0.0  #: weight of the label cross-entropy term added beside it by the short form
    schedule: ScheduleDefault | None = None  #: default weight schedule; None = constant
    needs: tuple[str, ...] = ()  #: batch keys passed to the loss as keyword arguments ("target", "index")
    uses_teacher: bool = True  #: False: never reads a target (ce)
    positionwise: bool = True  #: False: batch-relation loss (mask selects samples, weights refused)

    def __post_init__(self) -> None:
        # Built once, here, so a signature that cannot be validated fails at registration.
        if self.fn is not None and issubclass(self.module, FunctionLoss):
            model = self.module.options_model
        else:
            model = options_model(self.fn if self.fn is not None else self.module, name=self.name)
        object.__setattr__(self, "_options_model", model)

    def options_model(self) -> type[pydantic.BaseModel]:
        """The pydantic model of this loss's options (``extra="forbid"``), from the typed signature."""
        return self._options_model  # type: ignore[attr-defined]

    def option_names(self) -> set[str]:
        """The option names a config may give."""
        return set(self.options_model().model_fields)

    def option_defaults(self) -> dict[str, Any]:
        """Every option's default value."""
        return self.options_model()().model_dump()

    def validate_options(self, options: dict[str, Any]) -> dict[str, Any]:
        """``options`` checked and converted (only the given keys; defaults stay implicit).

        Raises ``ValueError`` naming each bad option, its value and the constraint, plus the
        accepted option names (with types, constraints and defaults).
        """
        return validate(self.options_model(), dict(options), name=self.name)

    def build(self, **options: Any) -> DistillLoss:
        """The loss module with these options (validated). Use :meth:`from_shapes` for losses with learnable parts."""
        return self.module(**self.validate_options(options))

    def from_shapes(
        self,
        *,
        student_shape: tuple[int, ...],
        teacher_shape: tuple[int, ...] | None,
        num_train_samples: int,
        **options: Any,
    ) -> DistillLoss:
        """The loss module sized for these per-sample shapes (delegates to ``module.from_shapes``)."""
        return self.module.from_shapes(
            student_shape=student_shape,
            teacher_shape=teacher_shape,
            num_train_samples=num_train_samples,
            **self.validate_options(options),
        )


#: Every loss a config can name; each entry's ``obj`` is its :class:`LossSpec`.
LOSSES: Registry[LossSpec] = Registry("method")


def _check_registration(name: str, kind: str, inputs: str, weight: float, ce_weight: float) -> None:
    if kind not in KINDS:
        raise ValueError(f"register_loss({name!r}): kind must be one of {KINDS}, got {kind!r}")
    if inputs not in INPUTS:
        raise ValueError(f"register_loss({name!r}): inputs must be one of {INPUTS}, got {inputs!r}")
    for what, value in (("weight", weight), ("ce_weight", ce_weight)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
            raise ValueError(f"register_loss({name!r}): {what} must be a finite number >= 0, got {value!r}")


def _function_module(
    fn: Callable[..., torch.Tensor], name: str, needs: tuple[str, ...], uses_teacher: bool, positionwise: bool
) -> type[FunctionLoss]:
    params = inspect.signature(fn).parameters
    missing = [p for p in ("mask", "weights", *needs) if p not in params]
    if missing:
        raise TypeError(f"register_loss({name!r}): {fn.__name__} has no parameter(s) {missing}")
    model = options_model(fn, name=name)
    clash = sorted(set(model.model_fields) & (set(dir(FunctionLoss)) | {"option_names"}))
    if clash:
        raise TypeError(f"register_loss({name!r}): option name(s) {clash} clash with the module's own attributes")
    class_name = "".join(part.capitalize() for part in fn.__name__.split("_")) + "Loss"
    return type(
        class_name,
        (FunctionLoss,),
        {
            "__doc__": inspect.getdoc(fn),
            "__module__": __name__,
            "fn": staticmethod(fn),
            "loss_name": name,
            "options_model": model,
            "needs": tuple(needs),
            "uses_teacher": uses_teacher,
            "positionwise": positionwise,
        },
    )


def register_loss(
    fn_or_module: Callable[..., torch.Tensor] | type[DistillLoss] | None = None,
    *,
    name: str,
    kind: Literal["logits", "feature", "relation"],
    summary: str,
    paper: str | None = None,
    inputs: str = "logits",
    weight: float = 1.0,
    ce_weight: float = 0.0,
    needs: tuple[str, ...] = (),
    uses_teacher: bool = True,
    positionwise: bool = True,
    schedule: ScheduleDefault | None = None,
    defaults: dict[str, Any] | None = None,
) -> Any:
    """Register a pure loss function, or a :class:`DistillLoss` subclass, under ``name``.

    * A function ``fn(student, teacher, *needs, *, <options>, mask=None, weights=None)``
      (``fn(student, *needs, ...)`` with ``uses_teacher=False``) gets a generic module
      (:class:`~transfuse.losses.module.FunctionLoss`) storing its validated options.
    * A module class (for losses with learnable parts) is registered as it is; its
      ``needs``/``uses_teacher``/``positionwise`` class attributes must agree with the
      arguments here.

    The options are the keyword-only parameters of the function (or of the class's
    ``__init__``), other than ``mask``, ``weights`` and ``reduction``; each needs a
    default, and its ``Annotated`` type (:mod:`transfuse.functional._types`) is what a
    config's value is checked against. ``kind``: ``"logits"``, ``"feature"`` or
    ``"relation"`` (for listings). ``summary``: one line for ``transfuse methods``.
    ``paper``: citation with a link, None for an in-house loss. ``inputs``: what the term
    compares by default (``"logits"``, ``"feature"`` = the penultimate embedding,
    ``"hint"`` = an intermediate map). ``weight``/``ce_weight``: the default weights of
    this term and of the cross-entropy term added beside it when a config names only
    ``method:``. ``needs``: batch keys passed as keyword arguments. ``uses_teacher``:
    False for a loss that never reads the teacher. ``positionwise``: False for a
    batch-relation loss. ``schedule``: a default weight schedule. ``defaults``: other
    default values for some options of a function (a *named setting*: the same function
    registered again under another name, e.g. ``dist_t4`` = ``dist`` with ``temperature=4``).

    A plain call returns the :class:`LossSpec`. Without ``fn_or_module`` it is a
    decorator, which registers the decorated object and returns it unchanged (the spec is
    ``LOSSES.get(name)``).
    """
    if fn_or_module is None:

        def deco(obj):
            register_loss(
                obj, name=name, kind=kind, summary=summary, paper=paper, inputs=inputs, weight=weight,
                ce_weight=ce_weight, needs=needs, uses_teacher=uses_teacher, positionwise=positionwise,
                schedule=schedule, defaults=defaults,
            )
            return obj

        return deco

    _check_registration(name, kind, inputs, weight, ce_weight)
    needs = tuple(needs)
    if inspect.isclass(fn_or_module):
        if not issubclass(fn_or_module, DistillLoss):
            raise TypeError(f"register_loss({name!r}): {fn_or_module.__name__} is not a DistillLoss subclass")
        module, fn = fn_or_module, None
        if defaults:
            raise TypeError(f"register_loss({name!r}): defaults= is for functions; give the class's __init__ its defaults")
        declared = {"needs": module.needs, "uses_teacher": module.uses_teacher, "positionwise": module.positionwise}
        given = {"needs": needs, "uses_teacher": uses_teacher, "positionwise": positionwise}
        if declared != given:
            raise ValueError(
                f"register_loss({name!r}): {module.__name__} declares {declared}, but the registration says {given}"
            )
    else:
        module, fn = _function_module(fn_or_module, name, needs, uses_teacher, positionwise), fn_or_module
        if defaults:
            module.options_model = with_defaults(module.options_model, dict(defaults), name=name)
    spec = LossSpec(
        name=name, kind=kind, summary=summary, module=module, fn=fn, paper=paper, inputs=inputs,
        weight=float(weight), ce_weight=float(ce_weight), schedule=schedule, needs=needs,
        uses_teacher=uses_teacher, positionwise=positionwise,
    )
    LOSSES.register(name, summary=summary)(spec)
    return spec


def describe_losses() -> list[dict[str, Any]]:
    """Every registered loss as plain data (for ``transfuse methods --json`` and docs), sorted by name."""
    rows = []
    for entry in LOSSES.entries():
        spec: LossSpec = entry.obj
        sched = spec.schedule
        rows.append({
            "name": spec.name,
            "kind": spec.kind,
            "paper": spec.paper,
            "description": spec.summary,
            "inputs": spec.inputs,
            "weight": spec.weight,
            "ce_weight": spec.ce_weight,
            "needs": list(spec.needs),
            "uses_teacher": spec.uses_teacher,
            "positionwise": spec.positionwise,
            "schedule": None if sched is None else
            {"kind": sched.kind, "fraction": sched.fraction, "options": dict(sched.options)},
            "options": {k: describe_field(v) for k, v in spec.options_model().model_fields.items()},
        })
    return rows


__all__ = [
    "INPUTS", "KINDS", "LOSSES", "DistillLoss", "FunctionLoss", "LossSpec", "ScheduleDefault",
    "describe_losses", "register_loss",
]
