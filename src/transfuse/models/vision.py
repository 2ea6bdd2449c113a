"""Image classifiers from ``timm`` and ``torchvision``, built by architecture name.

Both packages are optional (``pip install 'transfuse[vision]'``) and imported on first
use. ``pretrained=True`` asks the package for its weights, which it reads from its own
cache or downloads; transfuse itself downloads nothing.
"""

from __future__ import annotations

import importlib
from typing import Any

from torch import nn

from .base import MODELS


def _require(package: str, arch: str | None) -> Any:
    """The imported ``package``, after checking that an architecture was named."""
    if not arch:
        raise ValueError(f"model {package!r} needs options.arch, e.g. 'resnet18'")
    try:
        return importlib.import_module(package)
    except ImportError as err:
        raise ImportError(f"the {package!r} model needs the {package} package: pip install 'transfuse[vision]'") from err


def _replace_head(model: nn.Module, num_classes: int, *, arch: str) -> None:
    """Swap the last ``nn.Linear`` for one with ``num_classes`` outputs (pretrained heads have 1000)."""
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"torchvision {arch!r} has no linear classifier to resize to {num_classes} classes")
    name, head = linears[-1]
    if head.out_features == num_classes:
        return
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, nn.Linear(head.in_features, num_classes, bias=head.bias is not None))


@MODELS.register("timm", summary="any timm architecture by name (optional extra 'vision')")
def timm(*, input_shape: tuple[int, ...], num_classes: int, arch: str | None = None, pretrained: bool = False) -> nn.Module:
    """``timm.create_model(arch, pretrained, num_classes, in_chans=input_shape[0])``.

    No default taps: name a module path (``transfuse.taps.module_paths(model)`` lists them).
    """
    lib = _require("timm", arch)
    return lib.create_model(arch, pretrained=pretrained, num_classes=num_classes, in_chans=int(input_shape[0]))


@MODELS.register("torchvision", summary="a torchvision classification architecture by name (optional extra 'vision')")
def torchvision(
    *, input_shape: tuple[int, ...], num_classes: int, arch: str | None = None, pretrained: bool = False
) -> nn.Module:
    """``torchvision.models.get_model(arch)``, with its default weights if ``pretrained`` (the
    classifier is then replaced by a fresh one when ``num_classes`` differs).

    torchvision models expect 3 input channels. No default taps: name a module path.
    """
    lib = _require("torchvision", arch)
    get_model = lib.models.get_model
    if not pretrained:
        return get_model(arch, weights=None, num_classes=num_classes)
    model = get_model(arch, weights="DEFAULT")
    _replace_head(model, num_classes, arch=arch)
    return model
