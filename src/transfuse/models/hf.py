"""Hugging Face ``transformers`` classifiers loaded from a local folder.

Nothing is downloaded: ``from_pretrained`` runs with ``local_files_only=True``, so ``path``
must be a folder written by ``save_pretrained`` (or a populated hub cache snapshot).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from .base import MODELS

TASKS = ("image-classification", "sequence-classification")
_INSTALL_HINT = "the 'hf' model needs the transformers package: pip install 'transfuse[hf]'"


def _transformers() -> Any:
    # Imported on first use: transformers is an optional extra and slow to import.
    try:
        import transformers
    except ImportError as err:
        raise ImportError(_INSTALL_HINT) from err
    return transformers


def detect_task(path: Path) -> str:
    """The task of a saved model, from the ``architectures`` in its ``config.json``."""
    config = path / "config.json"
    architectures: list[str] = []
    if config.is_file():
        architectures = json.loads(config.read_text()).get("architectures") or []
    for arch in architectures:
        if arch.endswith("ForImageClassification"):
            return "image-classification"
        if arch.endswith("ForSequenceClassification"):
            return "sequence-classification"
    raise ValueError(
        f"model 'hf': cannot tell the task of {path} from its config.json architectures {architectures}; "
        f"set options.task to one of {', '.join(TASKS)}"
    )


class HFClassifier(nn.Module):
    """Wraps a ``...ForImageClassification`` / ``...ForSequenceClassification`` model so that
    ``forward`` returns the logits tensor ``(B, num_labels)``.

    The input is a tensor (``pixel_values`` ``(B, C, H, W)`` for images, ``input_ids``
    ``(B, T)`` for text) or a dict of tensors passed as keyword arguments
    (``input_ids``, ``attention_mask``, ...). The wrapped model is ``self.model``, so its
    module paths for taps start with ``model.``.
    """

    def __init__(self, model: nn.Module, task: str) -> None:
        super().__init__()
        self.model = model
        self.task = task
        # No declared taps: a transformer's useful features are not a module's output
        # (e.g. the [CLS] slice); name a module path instead.
        self.feature_layer: str | None = None
        self.hint_layer: str | None = None
        self.map_layer: str | None = None

    def forward(self, x: torch.Tensor | dict[str, torch.Tensor]) -> torch.Tensor:
        if isinstance(x, dict):
            out = self.model(**x)
        elif self.task == "image-classification":
            out = self.model(pixel_values=x)
        else:
            out = self.model(input_ids=x)
        return out.logits  # (B, num_labels)


@MODELS.register("hf", summary="Hugging Face image/sequence classifier from a local folder")
def hf(
    *,
    input_shape: tuple[int, ...],
    num_classes: int,
    path: str | None = None,
    task: Literal["image-classification", "sequence-classification", "auto"] = "auto",
) -> HFClassifier:
    """A :class:`HFClassifier` over ``AutoModelFor{Image,Sequence}Classification.from_pretrained(path)``.

    ``path``: a local folder with ``config.json`` and weights; ``task``: ``auto`` reads it
    from the config's ``architectures``. The model's ``num_labels`` must equal the data's
    ``num_classes``. ``input_shape`` is not used: the saved config fixes the input.
    """
    if not path:
        raise ValueError("model 'hf' needs options.path: a local folder written by save_pretrained")
    folder = Path(path).expanduser()
    if not folder.exists():
        raise FileNotFoundError(f"model 'hf': no such model folder: {folder}")
    if task != "auto" and task not in TASKS:
        raise ValueError(f"model 'hf': task must be one of {', '.join(TASKS)} or 'auto'; got {task!r}")
    transformers = _transformers()
    task = detect_task(folder) if task == "auto" else task
    auto = (
        transformers.AutoModelForImageClassification
        if task == "image-classification"
        else transformers.AutoModelForSequenceClassification
    )
    model = auto.from_pretrained(str(folder), local_files_only=True)
    num_labels = int(model.config.num_labels)
    if num_labels != num_classes:
        raise ValueError(
            f"model 'hf': {folder} predicts {num_labels} labels but the data set has {num_classes} classes; "
            "use a model trained for this label set"
        )
    return HFClassifier(model, task)
