"""Run a model over a data set, batch by batch, and collect its logits and the targets."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..data.base import collate_batch
from ..models.outputs import call_model


def _restore_modes(modes: dict[nn.Module, bool]) -> None:
    for module, training in modes.items():
        module.train(training)


def predict(
    model: nn.Module, dataset: Dataset, *, batch_size: int = 512, device: str | torch.device = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits ``(N, C)`` (float32, on the CPU) and targets ``(N,)`` for every sample, in order.

    The model runs in eval mode under ``torch.inference_mode``; afterwards every submodule
    gets back its own previous train/eval mode. Batches are sent to ``device``, where the
    model must already be. ``dataset`` yields dict samples (``input`` or token fields, and
    ``target`` or ``labels``), pre-batched dicts (``ArrayDataset``) or ``(input, target)``
    pairs. The model may return a tensor, a dict with ``"logits"`` or an object with ``.logits``.
    """
    # Per module, not model.train(was_training): a submodule deliberately kept in eval
    # mode (a frozen part) must not come back in training mode.
    modes = {m: m.training for m in model.modules()}
    # A model kept in half precision (bf16-true) takes inputs of its own dtype.
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_batch)
    logits, targets = [], []
    model.eval()
    try:
        with torch.inference_mode():
            for batch in loader:
                batch = {k: v.to(device, dtype) if v.is_floating_point() and dtype else v.to(device) for k, v in batch.items()}
                key = "target" if "target" in batch else "labels"
                if key not in batch:
                    raise ValueError(f"predict needs a 'target' (or 'labels') field in each batch; got {sorted(batch)}")
                logits.append(call_model(model, batch).float().cpu())  # (B, C)
                targets.append(batch[key].cpu())  # (B,)
    finally:
        _restore_modes(modes)
    if not logits:
        raise ValueError("predict got an empty data set")
    # Concatenated outside inference mode, so the results are ordinary tensors.
    return torch.cat(logits), torch.cat(targets)
