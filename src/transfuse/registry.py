"""Name -> component registries.

A string name exists only where a user types it (a method, model or dataset name in a
config). Every such name lives in one :class:`Registry`; an unknown name fails with the
list of valid ones, and the options a user passes are checked against the component's
signature when the config is loaded, not at step 1,000.
"""

from __future__ import annotations

import difflib
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, Iterator, TypeVar

from .errors import UserError

T = TypeVar("T")


class UnknownNameError(UserError, KeyError, ValueError):
    """Raised for a name that is not registered; the message lists the valid names."""

    def __str__(self) -> str:  # KeyError quotes its message; we want plain text.
        return str(self.args[0])


@dataclass(frozen=True)
class Entry(Generic[T]):
    """One registered component: the object, and what users and docs need to know of it."""

    name: str
    obj: T
    summary: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    def option_names(self) -> set[str] | None:
        """Keyword options the component accepts, or None if it takes ``**kwargs``."""
        own = getattr(self.obj, "option_names", None)
        if callable(own) and not inspect.isclass(self.obj):
            return set(own())
        return accepted_options(self.obj)


def accepted_options(obj: Any) -> set[str] | None:
    """Names a callable (or a class's ``__init__``) accepts as keywords; None for ``**kwargs``."""
    target = obj.__init__ if inspect.isclass(obj) else obj
    params = inspect.signature(target).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return {
        p.name
        for p in params
        if p.name != "self"
        and p.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    }


class Registry(Generic[T]):
    """A named collection of components of one kind (losses, models, datasets).

    >>> MODELS = Registry("model")
    >>> @MODELS.register("mlp", summary="multi-layer perceptron")
    ... def mlp(*, input_shape, num_classes, hidden=(128,)): ...
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Entry[T]] = {}

    def register(self, name: str, *, summary: str = "", **meta: Any) -> Callable[[T], T]:
        """Decorator registering ``obj`` under ``name``; ``meta`` is free-form metadata."""

        def deco(obj: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            doc = summary or (inspect.getdoc(obj) or "").split("\n", 1)[0]
            self._entries[name] = Entry(name=name, obj=obj, summary=doc, meta=dict(meta))
            return obj

        return deco

    def entry(self, name: str) -> Entry[T]:
        """The entry for ``name``; an unknown name raises :class:`UnknownNameError` listing the valid ones."""
        try:
            return self._entries[name]
        except KeyError:
            valid = sorted(self._entries)
            close = difflib.get_close_matches(name, valid, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}.{hint} Valid {self.kind} names: {', '.join(valid)}."
            ) from None

    def get(self, name: str) -> T:
        """The registered object for ``name``."""
        return self.entry(name).obj

    def unregister(self, name: str) -> None:
        """Remove ``name`` (for tests that register a throw-away component)."""
        self.entry(name)  # an unknown name raises, listing the valid ones
        del self._entries[name]

    def check_options(self, name: str, options: dict[str, Any], *, where: str) -> None:
        """Fail if ``name`` is unknown (listing the valid names) or ``options`` has a key the
        component does not take (naming ``where``, a config path, and the accepted keys).

        Where the registered object has a ``validate_options(options)`` method (a
        ``LossSpec``), the option VALUES are checked too: its ``ValueError`` (naming the
        option, the value and the constraint, and the accepted options) is re-raised
        prefixed with ``where``. Other registries check names only.
        """
        obj = self.entry(name).obj
        validate = getattr(obj, "validate_options", None)
        if callable(validate) and not inspect.isclass(obj):
            try:
                validate(options)
            except ValueError as err:
                raise ValueError(f"{where}: {err}") from None
            return
        accepted = self.entry(name).option_names()
        if accepted is None:
            return
        unknown = sorted(set(options) - accepted)
        if unknown:
            raise ValueError(
                f"{where}: {self.kind} {name!r} has no option(s) {', '.join(map(repr, unknown))}; "
                f"it accepts: {', '.join(sorted(accepted)) or '(none)'}."
            )

    def names(self) -> list[str]:
        """All registered names, sorted."""
        return sorted(self._entries)

    def entries(self) -> list[Entry[T]]:
        """All entries, sorted by name."""
        return [self._entries[n] for n in self.names()]

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)
