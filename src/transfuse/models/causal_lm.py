"""Hugging Face causal language models as participants: a saved folder, or a small config.

Nothing is downloaded: a ``path`` is read with ``local_files_only=True`` (a folder written
by ``save_pretrained``); without a ``path`` the model is built from ``architecture``
(``gpt2`` or ``llama``) and size options, with random weights -- the way tests and
benchmarks make teachers and students of known size here. Either way the vocabulary must
equal the data set's (``DataSplits.num_classes`` of a text data set is its vocabulary
size), because teacher and student must share one tokenizer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from .base import MODELS
from .hf import _transformers

ARCHITECTURES = ("gpt2", "llama")


class CausalLM(nn.Module):
    """Wraps a ``...ForCausalLM`` so that ``forward`` returns the logits ``(B, T, V)``.

    The input is ``input_ids`` ``(B, T)`` or a dict of keyword inputs (``input_ids``,
    ``attention_mask``); a batch's ``labels`` are never passed, so the wrapped model never
    computes a loss of its own (the distillation terms own the loss and its
    normalisation). The wrapped model is ``self.model`` (module paths for taps start with
    ``model.``); :meth:`save_pretrained` writes it for plain ``transformers`` to load.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        # The last hidden states (B, T, H) are the input of the lm_head: what a fused,
        # chunked loss (transfuse.functional.chunked_divergence) needs with lm_head.weight.
        self.feature_layer: str | None = None
        self.hint_layer: str | None = None
        self.map_layer: str | None = None

    @property
    def vocab_size(self) -> int:
        return int(self.model.get_output_embeddings().weight.shape[0])

    def forward(self, x: torch.Tensor | dict[str, torch.Tensor]) -> torch.Tensor:
        inputs = x if isinstance(x, dict) else {"input_ids": x}
        inputs = {k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask", "position_ids")}
        return self.model(**inputs, use_cache=False).logits  # (B, T, V)

    def save_pretrained(self, folder: str | Path) -> None:
        """Write the wrapped model with ``save_pretrained`` (safetensors), loadable by plain transformers."""
        from transformers.utils import logging as hf_logging

        # transformers draws a progress bar per write; a run reports its own progress.
        was_enabled = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        try:
            self.model.save_pretrained(str(folder), safe_serialization=True)
        finally:
            if was_enabled:
                hf_logging.enable_progress_bar()


def _config(transformers: Any, architecture: str, vocab: int, context: int, layers: int, width: int, heads: int):
    if architecture == "gpt2":
        # No special tokens: the data's tokenizer owns them (GPT-2's default ids lie outside a small vocabulary).
        return transformers.GPT2Config(vocab_size=vocab, n_positions=context, n_embd=width, n_layer=layers,
                                       n_head=heads, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                       bos_token_id=None, eos_token_id=None)
    return transformers.LlamaConfig(vocab_size=vocab, max_position_embeddings=context, hidden_size=width,
                                    intermediate_size=4 * width, num_hidden_layers=layers, num_attention_heads=heads,
                                    num_key_value_heads=heads, bos_token_id=None, eos_token_id=None, pad_token_id=None)


@MODELS.register("causal_lm", summary="Hugging Face causal LM: a local save_pretrained folder, or gpt2/llama built from sizes")
def causal_lm(
    *,
    input_shape: tuple[int, ...],
    num_classes: int,
    path: str | None = None,
    architecture: Literal["gpt2", "llama"] = "gpt2",
    layers: int = 2,
    width: int = 64,
    heads: int = 2,
    context: int | None = None,
) -> CausalLM:
    """A :class:`CausalLM`: ``AutoModelForCausalLM.from_pretrained(path)``, or, without a
    ``path``, a randomly initialised ``architecture`` with ``layers`` blocks of ``width``
    and ``heads`` heads and a context of ``context`` tokens (default: the data's row length,
    ``input_shape[0]``). The vocabulary is the data's ``num_classes`` and must equal a
    loaded model's.
    """
    transformers = _transformers()
    if path:
        folder = Path(path).expanduser()
        if not folder.is_dir():
            raise FileNotFoundError(f"model 'causal_lm': no such model folder: {folder} (a folder written by "
                                    "save_pretrained; nothing is downloaded)")
        model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True)
    else:
        if architecture not in ARCHITECTURES:
            raise ValueError(f"model 'causal_lm': architecture must be one of {', '.join(ARCHITECTURES)}; "
                             f"got {architecture!r}")
        for name, value in (("layers", layers), ("width", width), ("heads", heads)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"model 'causal_lm': {name} must be an int >= 1, got {value!r}")
        if width % heads:
            raise ValueError(f"model 'causal_lm': heads ({heads}) must divide width ({width})")
        length = context if context is not None else int(input_shape[0]) if input_shape else 128
        model = transformers.AutoModelForCausalLM.from_config(
            _config(transformers, architecture, num_classes, length, layers, width, heads))
    wrapped = CausalLM(model)
    if wrapped.vocab_size != num_classes:
        raise ValueError(f"model 'causal_lm': the model's vocabulary has {wrapped.vocab_size} tokens but the data's "
                         f"has {num_classes}; teacher, student and data must share one tokenizer")
    return wrapped
