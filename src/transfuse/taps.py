"""Feature taps: read intermediate outputs of a model by module path, without editing it.

A tap is a forward hook on a named submodule (``"layer2.0.conv1"``). Paths are declared
once per model and resolved when the :class:`FeatureTaps` is built, so a typo fails at
start-up with the closest valid paths. Hooks exist only inside a ``with taps:`` block:
they are registered on entry and removed on exit, even when the forward pass raises.
"""

from __future__ import annotations

import difflib
from typing import Any, Iterable

import torch
from torch import nn

from .errors import UserError


class TapError(UserError, ValueError):
    """A tap path that does not name a submodule, or a tap that saw no tensor."""


def _first_tensor(output: Any) -> torch.Tensor | None:
    # Modules may return tuples (RNN, attention) or output objects (Hugging Face);
    # the feature a user means is the first tensor in them.
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        for item in output:
            found = _first_tensor(item)
            if found is not None:
                return found
    if isinstance(output, dict):
        for item in output.values():
            found = _first_tensor(item)
            if found is not None:
                return found
    if hasattr(output, "to_tuple"):  # transformers.utils.ModelOutput
        return _first_tensor(output.to_tuple())
    return None


def resolve_module(model: nn.Module, path: str, *, role: str = "model") -> nn.Module:
    """The submodule at ``path``; an unknown path lists the closest valid ones."""
    try:
        return model.get_submodule(path)
    except AttributeError:
        valid = [name for name, _ in model.named_modules() if name]
        close = difflib.get_close_matches(path, valid, n=5, cutoff=0.4) or valid[:10]
        raise TapError(
            f"{role} has no submodule {path!r} to tap. Closest module paths: {', '.join(close)}. "
            f"(`transfuse.taps.module_paths(model)` lists them all.)"
        ) from None


def module_paths(model: nn.Module) -> list[str]:
    """Every tappable module path of ``model``, in registration order."""
    return [name for name, _ in model.named_modules() if name]


class FeatureTaps:
    """Forward hooks on named submodules of one model.

    >>> taps = FeatureTaps(model, ["layer1", "layer3"])
    >>> with taps:
    ...     logits = model(x)
    >>> taps.features["layer3"].shape
    """

    def __init__(self, model: nn.Module, paths: Iterable[str], *, role: str = "model") -> None:
        self.paths = list(dict.fromkeys(paths))  # de-duplicated, order kept
        self.role = role
        self._modules = {p: resolve_module(model, p, role=role) for p in self.paths}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self.features: dict[str, torch.Tensor] = {}

    def _hook(self, path: str):
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            tensor = _first_tensor(output)
            if tensor is None:
                raise TapError(f"{self.role} module {path!r} returned no tensor ({type(output).__name__}); tap another module")
            self.features[path] = tensor

        return hook

    def __enter__(self) -> "FeatureTaps":
        if self._handles:
            raise RuntimeError("FeatureTaps is already active; taps do not nest")
        self.features = {}
        self._handles = [m.register_forward_hook(self._hook(p)) for p, m in self._modules.items()]
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def collect(self) -> dict[str, torch.Tensor]:
        """The features of the last forward pass; fails naming any tap that did not fire."""
        missing = [p for p in self.paths if p not in self.features]
        if missing:
            raise TapError(
                f"{self.role} modules {missing} were not called during forward, so their taps saw nothing; "
                "tap a module that the forward pass uses"
            )
        return dict(self.features)
