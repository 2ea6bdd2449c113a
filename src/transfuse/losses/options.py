"""A loss's options model, built from the typed signature of its function or module.

The keyword-only parameters of a registered function (``kd(..., *, temperature:
Temperature = 4.0, mask=None, weights=None, reduction="mean")``) or of a module's
``__init__`` are its options; their ``Annotated`` types (:mod:`transfuse.functional._types`)
carry the constraints. One pydantic model per loss checks a config's options at load
time, so ``temperature: 0`` fails there, naming the option, the value and the constraint.
"""

from __future__ import annotations

import inspect
import typing
from typing import Any, Callable

import annotated_types
import pydantic
from pydantic import ConfigDict

#: Keyword parameters of a loss function that are per-call inputs, not options.
PER_CALL = frozenset({"mask", "weights", "reduction"})


def options_model(source: Callable, *, name: str, exclude: frozenset[str] = PER_CALL) -> type[pydantic.BaseModel]:
    """A pydantic model of ``source``'s keyword-only parameters (a function, or a class's ``__init__``).

    Every option must be keyword-only and have a default (a loss is buildable without
    options); its annotation, with any ``Annotated`` constraints, is the field's type.
    Raises ``TypeError`` for a signature that breaks these rules, at registration.
    """
    target = source.__init__ if inspect.isclass(source) else source
    hints = typing.get_type_hints(target, include_extras=True)
    fields: dict[str, Any] = {}
    for p in inspect.signature(target).parameters.values():
        if p.name == "self" or p.name in exclude:
            continue
        if p.kind is inspect.Parameter.VAR_KEYWORD:
            raise TypeError(f"loss {name!r}: options must be named keyword-only parameters, not **{p.name}")
        if p.kind is not inspect.Parameter.KEYWORD_ONLY:
            if inspect.isclass(source):
                raise TypeError(f"loss {name!r}: option {p.name!r} of {source.__name__}.__init__ must be keyword-only")
            continue  # a function's positional inputs (logits, features, target) are not options
        if p.default is inspect.Parameter.empty:
            raise TypeError(f"loss {name!r}: option {p.name!r} needs a default, so the loss builds without options")
        fields[p.name] = (hints.get(p.name, Any), p.default)
    model_name = "".join(part.capitalize() for part in name.split("_")) + "Options"
    # Lax mode, so a YAML value like `1e-7` (a string to YAML 1.1) still reads as a float.
    config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=(), validate_default=True)
    model = pydantic.create_model(model_name, __config__=config, **fields)
    try:
        model()
    except pydantic.ValidationError as err:
        raise TypeError(f"loss {name!r}: a default violates its own constraint: {err}") from None
    return model


def describe_field(info: pydantic.fields.FieldInfo) -> str:
    """``float > 0, finite; default 4.0``: an option's type, constraints and default, for messages and docs."""
    annotation = info.annotation
    type_name = getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")
    parts = [type_name]
    for meta in info.metadata:
        for attr, sign in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<=")):
            value = getattr(meta, attr, None)
            if isinstance(meta, annotated_types.BaseMetadata) and value is not None:
                parts.append(f"{sign} {value}")
        if getattr(meta, "allow_inf_nan", True) is False:
            parts.append("finite")
    return f"{parts[0]}{' ' + ', '.join(parts[1:]) if parts[1:] else ''}; default {info.default!r}"


def _accepts(model: type[pydantic.BaseModel]) -> str:
    fields = model.model_fields
    return "; ".join(f"{k} ({describe_field(v)})" for k, v in sorted(fields.items())) or "(none)"


def validate(model: type[pydantic.BaseModel], options: dict[str, Any], *, name: str) -> dict[str, Any]:
    """The given ``options`` checked against ``model`` and converted (``2`` -> ``2.0``).

    Returns only the keys given (defaults stay implicit). Raises ``ValueError`` naming
    each unknown option, or each bad value and the constraint it breaks, and listing the
    accepted options with their types, constraints and defaults.
    """
    fields = model.model_fields
    unknown = sorted(set(options) - set(fields))
    if unknown:
        raise ValueError(
            f"loss {name!r} has no option(s) {', '.join(map(repr, unknown))}; it accepts: {_accepts(model)}."
        )
    problems = []
    for key, value in options.items():
        # Lax mode would read True as 1.0; a boolean for a number is always a slip.
        if isinstance(value, bool) and fields[key].annotation is not bool:
            problems.append(f"option {key!r} = {value!r}: expected a number, got a boolean")
    if not problems:
        try:
            parsed = model.model_validate(options)
        except pydantic.ValidationError as err:
            for e in err.errors():
                key = str(e["loc"][0]) if e["loc"] else "?"
                problems.append(f"option {key!r} = {options.get(key)!r}: {e['msg'][0].lower()}{e['msg'][1:]}")
        else:
            return {k: getattr(parsed, k) for k in options}
    raise ValueError(f"loss {name!r}: {'; '.join(problems)}. It accepts: {_accepts(model)}.")


def with_defaults(model: type[pydantic.BaseModel], defaults: dict[str, Any], *, name: str) -> type[pydantic.BaseModel]:
    """A copy of an options ``model`` whose defaults are ``defaults`` (a named setting of
    a loss, e.g. DIST's CIFAR setting ``tau=4``); every constraint is kept, and the new
    defaults are checked against them at registration."""
    from pydantic.fields import FieldInfo

    unknown = sorted(set(defaults) - set(model.model_fields))
    if unknown:
        raise TypeError(f"loss {name!r}: defaults for unknown option(s) {unknown}; options: {sorted(model.model_fields)}")
    fields = {k: (f.annotation, FieldInfo.merge_field_infos(f, default=defaults[k]))
              for k, f in model.model_fields.items() if k in defaults}
    derived = pydantic.create_model(f"{model.__name__}_{name}", __base__=model, **fields)
    validate(derived, dict(defaults), name=name)  # a default outside its own constraint fails here
    return derived
