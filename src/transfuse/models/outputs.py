"""How any model is called with a batch, and where its logits are in what it returns.

Batches are dicts. A vision batch carries ``input``; a token batch carries the model's
own keyword inputs (``input_ids``, ``attention_mask``, ...). Everything else in a batch
is bookkeeping for the losses and the data order, never a model input.
"""

from __future__ import annotations

import torch

#: Batch entries that describe a sample rather than feed a model.
#: (``domain``: a data set with domains; ``view``: which augmented view a row is, from ``two_views``;
#: ``predicted``: the positions of token rows that carry loss.)
BOOKKEEPING_KEYS = frozenset({"target", "labels", "index", "sample_id", "labelled", "domain", "view", "predicted"})


def logits_of(output: object) -> torch.Tensor:
    """Logits from a model's output: a tensor, an object with ``.logits``, or a dict with ``"logits"``."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict) and "logits" in output:
        return output["logits"]
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    raise TypeError(
        f"cannot find logits in a model output of type {type(output).__name__}: return a tensor, "
        "a dict with 'logits', or an object with a .logits attribute"
    )


def model_input(batch: dict[str, torch.Tensor]) -> object:
    """What a model is called with: ``batch["input"]``, or the dict of its keyword inputs for token batches."""
    if "input" in batch:
        return batch["input"]
    return {k: v for k, v in batch.items() if k not in BOOKKEEPING_KEYS}


def call_model(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """``logits_of(model(model_input(batch)))``: the one way every participant is called.

    A token batch's dict of inputs is passed as one positional argument, as the zoo's
    Hugging Face wrapper expects.
    """
    return logits_of(model(model_input(batch)))
