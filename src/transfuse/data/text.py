"""Token rows for causal language models: ``input_ids``, ``attention_mask`` and ``labels``.

A sample is a dict ``{"input_ids": (T,) int64, "attention_mask": (T,) int64, "labels": (T,)
int64, "index", "sample_id"}`` (plus any per-sample field a data set adds, e.g. ``domain``).
A batch stacks each entry: ``(B, T)``.

**Label convention (Hugging Face's): labels are stored UNSHIFTED.** ``labels[t]`` is the
token at position ``t`` when that token carries loss, and :data:`IGNORE_INDEX` (-100)
when it does not: padding, and the prompt of a prompt/completion row. A causal LM's
logits at position ``t`` predict token ``t + 1``, so the shift happens in the model or
the loss, never in the data: ``logits[:, :-1]`` is scored against ``labels[:, 1:]``
(:func:`shift_labels`). A row of ``T`` tokens therefore has at most ``T - 1`` predicted
positions: its first token is never a target. This is what ``transformers``' causal LMs
do when given ``labels=``, so the same batch trains a Hugging Face model directly.

* :class:`TokenRows` -- an in-memory dataset of such rows, with ``subset``, ``sample_ids``
  and ``__getitems__`` (a batch by one indexing op) like
  :class:`~transfuse.data.base.ArrayDataset`.
* :func:`pack_stream` -- cut a long token stream into full rows (language modelling).
* :func:`prompt_completion_rows` -- instruction-style rows whose loss counts only the
  completion (and the end-of-sequence token, if one is appended).
* :func:`shift_labels` -- the next-token targets and loss mask ``(B, T - 1)`` of a batch.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch.utils.data import Dataset

from .base import Batch
from .ids import check_ids

#: The label of a position that carries no loss (``torch.nn.CrossEntropyLoss``'s and Hugging Face's default).
IGNORE_INDEX = -100
#: The keys every token-row sample and batch holds besides ``index`` and ``sample_id``.
TOKEN_KEYS = ("input_ids", "attention_mask", "labels")


def _int_rows(values: Any, label: str, where: str) -> torch.Tensor:
    tensor = torch.as_tensor(values)
    if tensor.dim() != 2:
        raise ValueError(f"{where}: {label} must be a 2-d (N, T) tensor of token rows; got shape {tuple(tensor.shape)}")
    if tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool:
        raise ValueError(f"{where}: {label} must hold integers; got {tensor.dtype}")
    return tensor.long()


class TokenRows(Dataset):
    """Rows of tokens in memory: ``input_ids``, ``attention_mask``, ``labels`` all ``(N, T)`` int64.

    ``attention_mask`` defaults to all ones; ``labels`` defaults to ``input_ids`` where the
    attention mask is 1 and :data:`IGNORE_INDEX` elsewhere. ``fields`` are extra per-sample
    tensors ``(N, ...)`` (e.g. ``{"domain": (N,)}``) carried into samples and batches and
    kept by :meth:`subset`. ``ids`` are the stable sample ids (default ``0..N-1``).
    ``vocab_size``, when given, is checked against every token id (and every label that is
    not :data:`IGNORE_INDEX`).

    Samples also carry ``target`` ``(T,)``, the next-token target of every position
    (``labels`` shifted left, :data:`IGNORE_INDEX` at the last position), and ``predicted``
    ``(T,)`` bool, where that target carries loss: the model keeps its full ``(B, T, V)``
    logits, and ``predicted`` is the default mask of every position-wise term, so a loss is
    the mean over the positions that predict a labelled token (``T - 1`` of a full row).
    """

    def __init__(
        self,
        input_ids: Any,
        attention_mask: Any = None,
        labels: Any = None,
        *,
        fields: Mapping[str, Any] | None = None,
        ids: Any = None,
        vocab_size: int | None = None,
        name: str = "TokenRows",
    ) -> None:
        self.name = name
        self.input_ids = _int_rows(input_ids, "input_ids", name)
        shape = tuple(self.input_ids.shape)
        self.attention_mask = (
            torch.ones(shape, dtype=torch.long) if attention_mask is None else _int_rows(attention_mask, "attention_mask", name)
        )
        if labels is None:
            labels = torch.where(self.attention_mask.bool(), self.input_ids, torch.full((), IGNORE_INDEX))
        self.labels = _int_rows(labels, "labels", name)
        for label, tensor in (("attention_mask", self.attention_mask), ("labels", self.labels)):
            if tuple(tensor.shape) != shape:
                raise ValueError(f"{name}: {label} has shape {tuple(tensor.shape)}; input_ids has {shape}")
        if not bool(((self.attention_mask == 0) | (self.attention_mask == 1)).all()):
            raise ValueError(f"{name}: attention_mask must hold only 0 and 1")
        if bool(((self.labels != IGNORE_INDEX) & (self.attention_mask == 0)).any()):
            raise ValueError(f"{name}: a padded position (attention_mask 0) has a label; use {IGNORE_INDEX} there")
        if vocab_size is not None:
            self._check_vocab(int(vocab_size))
        self.vocab_size = None if vocab_size is None else int(vocab_size)
        self.fields: dict[str, torch.Tensor] = {}
        for key, values in (fields or {}).items():
            if key in TOKEN_KEYS or key in ("index", "sample_id"):
                raise ValueError(f"{name}: field {key!r} would overwrite a built-in entry of the samples")
            tensor = torch.as_tensor(values)
            if tensor.dim() < 1 or len(tensor) != shape[0]:
                raise ValueError(f"{name}: field {key!r} must have one value per row ({shape[0]}); got shape "
                                 f"{tuple(tensor.shape)}")
            self.fields[key] = tensor
        self._ids = torch.arange(shape[0]) if ids is None else check_ids(ids, shape[0], where=name)

    def _check_vocab(self, vocab_size: int) -> None:
        tokens = self.input_ids[self.attention_mask.bool()]
        targets = self.labels[self.labels != IGNORE_INDEX]
        for label, values in (("input_ids", tokens), ("labels", targets)):
            if values.numel() and (int(values.min()) < 0 or int(values.max()) >= vocab_size):
                bad = int(values.min()) if int(values.min()) < 0 else int(values.max())
                raise ValueError(f"{self.name}: {label} holds token id {bad}, outside the vocabulary [0, {vocab_size})")

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def block_size(self) -> int:
        """``T``, the length of every row."""
        return int(self.input_ids.shape[1])

    @property
    def sample_ids(self) -> torch.Tensor:
        """Stable sample ids ``(N,)`` int64, in dataset order (do not modify in place)."""
        return self._ids

    def _rows(self, idx: Any) -> Batch:
        labels = self.labels[idx]  # (..., T)
        out = {"input_ids": self.input_ids[idx], "attention_mask": self.attention_mask[idx], "labels": labels,
               **next_token_targets(labels)}
        out.update({key: values[idx] for key, values in self.fields.items()})
        return out

    def __getitem__(self, i: int) -> Batch:
        return {**self._rows(i), "index": torch.tensor(i), "sample_id": self._ids[i]}

    def __getitems__(self, indices: Sequence[int]) -> Batch:
        idx = torch.as_tensor(indices, dtype=torch.long)  # (B,)
        return {**self._rows(idx), "index": idx, "sample_id": self._ids[idx]}

    def _like(self, idx: Any, ids: torch.Tensor) -> "TokenRows":
        # type(self)(...) would call a subclass's own constructor; copy the object instead and
        # replace its rows, so subclasses keep whatever else they hold (a Markov chain family).
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        new.input_ids, new.attention_mask, new.labels = self.input_ids[idx], self.attention_mask[idx], self.labels[idx]
        new.fields = {key: values[idx] for key, values in self.fields.items()}
        new._ids = check_ids(ids, len(new.input_ids), where=self.name)
        return new

    def subset(self, indices: Any) -> "TokenRows":
        """A new dataset of the given rows: ``index`` is renumbered from 0, ``sample_id`` and fields kept."""
        indices = torch.as_tensor(indices)
        if indices.dtype == torch.bool:
            indices = indices.nonzero().flatten()
        indices = indices.long()
        return self._like(indices, self._ids[indices])

    def with_ids(self, ids: Any) -> "TokenRows":
        """The same rows (tensors shared) with new sample ids ``(N,)``."""
        return self._like(slice(None), torch.as_tensor(ids))

    def num_loss_tokens(self) -> int:
        """How many positions carry loss in the whole dataset (targets after the shift)."""
        return int((self.labels[:, 1:] != IGNORE_INDEX).sum())


#: Batch entry of token rows ``(..., T)`` bool: where position ``t``'s prediction (of token
#: ``t + 1``) carries loss. The Distiller's default mask for position-wise terms, and what a
#: step's token count is taken from under gradient accumulation.
PREDICTED = "predicted"


def prompt_ends(labels: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Per row, where its prompt ends: the position of its first labelled, attended token
    ``(N,)`` (a prompt/completion row's prompt length; 0 for plain text, every token
    labelled; the row length for a row without any labelled token). ``labels`` and
    ``attention_mask`` ``(N, T)``."""
    labelled = (labels != IGNORE_INDEX) & attention_mask.bool()  # (N, T)
    # argmax returns the first of equal maxima: the first labelled position.
    return torch.where(labelled.any(-1), labelled.long().argmax(-1),
                       torch.full_like(labelled[:, 0], labels.shape[1], dtype=torch.long))


def next_token_targets(labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """``{"target", "predicted"}`` of unshifted ``labels`` ``(..., T)``, both ``(..., T)``.

    Position ``t``'s logits predict token ``t + 1``, so ``target`` is ``labels`` shifted left
    with :data:`IGNORE_INDEX` at the last position (which predicts nothing), and
    ``predicted`` is ``target != IGNORE_INDEX``. The model keeps its full ``(B, T, V)`` logits.
    """
    target = torch.cat([labels[..., 1:], torch.full_like(labels[..., :1], IGNORE_INDEX)], dim=-1)  # (..., T)
    return {"target": target, PREDICTED: target != IGNORE_INDEX}


def shift_labels(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token targets and their loss mask from unshifted ``labels`` ``(..., T)``.

    Returns ``targets`` ``(..., T - 1)`` = ``labels[..., 1:]`` and ``mask`` ``(..., T - 1)``
    bool, True where the target carries loss. Position ``t`` of the result pairs with
    ``logits[..., t, :]`` -- the model's prediction after reading tokens ``0..t`` -- so a
    loss reads ``logits[..., :-1, :]`` against ``targets`` where ``mask``. Masked-out targets
    keep the value :data:`IGNORE_INDEX`.
    """
    if labels.dim() < 1 or labels.shape[-1] < 1:
        raise ValueError(f"shift_labels: labels must be (..., T) with T >= 1; got shape {tuple(labels.shape)}")
    targets = labels[..., 1:]
    return targets, targets != IGNORE_INDEX


def pack_stream(
    tokens: Any, *, block_size: int, overlap: bool = True, name: str = "pack_stream", vocab_size: int | None = None
) -> TokenRows:
    """Cut a 1-d token stream into full rows of ``block_size`` tokens (no padding).

    With ``overlap`` (default) consecutive rows share one token -- row ``k`` starts at
    ``k * (block_size - 1)`` -- so that every token of the stream but the first is a
    predicted target exactly once (the first token of a row is never predicted). Without
    it rows are disjoint and the first token of each row is never a target. A tail too
    short for a full row is dropped. Every position carries loss (``labels == input_ids``).
    """
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 2:
        raise ValueError(f"{name}: block_size must be an integer >= 2 (one context token and one target); "
                         f"got {block_size!r}")
    stream = torch.as_tensor(tokens, dtype=torch.long).flatten()
    stride = block_size - 1 if overlap else block_size
    count = (len(stream) - block_size) // stride + 1 if len(stream) >= block_size else 0
    if count == 0:
        raise ValueError(f"{name}: the token stream holds {len(stream)} tokens, fewer than block_size={block_size}")
    starts = torch.arange(count) * stride  # (N,)
    rows = stream[starts[:, None] + torch.arange(block_size)]  # (N, T)
    return TokenRows(rows, name=name, vocab_size=vocab_size)


def _ids_of(value: Any, tokenizer: Any, label: str, where: str) -> list[int]:
    if isinstance(value, str):
        if tokenizer is None:
            raise ValueError(f"{where}: {label} is a string; pass tokenizer= to encode it, or give token ids")
        return list(tokenizer.encode(value))
    if isinstance(value, (list, tuple)) and not value:
        return []
    ids = torch.as_tensor(value)
    if ids.dim() != 1 or ids.is_floating_point() or ids.dtype == torch.bool:
        raise ValueError(f"{where}: {label} must be a string or a 1-d sequence of token ids")
    return [int(v) for v in ids.tolist()]


def prompt_completion_rows(
    pairs: Sequence[tuple[Any, Any]],
    *,
    block_size: int,
    pad_id: int,
    eos_id: int | None = None,
    tokenizer: Any = None,
    vocab_size: int | None = None,
    name: str = "prompt_completion_rows",
) -> TokenRows:
    """Instruction-style rows ``prompt + completion [+ eos]``, right-padded to ``block_size``.

    ``pairs``: ``(prompt, completion)`` pairs, each a string (encoded with ``tokenizer``,
    anything with ``encode(text) -> list[int]``) or a sequence of token ids. ``labels`` are
    :data:`IGNORE_INDEX` on the prompt and on the padding, so after the shift the loss
    counts exactly the completion tokens (and ``eos_id`` if given): the first completion
    token is predicted from the last prompt token. ``attention_mask`` is 0 on the padding
    (``pad_id`` fills ``input_ids`` there). A row longer than ``block_size`` loses the end
    of its completion; a prompt that leaves no room for one completion token, or an empty
    prompt or completion, raises ``ValueError`` naming the pair.
    """
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 2:
        raise ValueError(f"{name}: block_size must be an integer >= 2; got {block_size!r}")
    if isinstance(pad_id, bool) or not isinstance(pad_id, int) or pad_id < 0:
        raise ValueError(f"{name}: pad_id must be a non-negative token id; got {pad_id!r}")
    if eos_id is not None and (isinstance(eos_id, bool) or not isinstance(eos_id, int) or eos_id < 0):
        raise ValueError(f"{name}: eos_id must be a non-negative token id or None; got {eos_id!r}")
    if len(pairs) == 0:
        raise ValueError(f"{name}: no (prompt, completion) pairs given")
    input_ids = torch.full((len(pairs), block_size), pad_id, dtype=torch.long)  # (N, T)
    attention_mask = torch.zeros((len(pairs), block_size), dtype=torch.long)
    labels = torch.full((len(pairs), block_size), IGNORE_INDEX, dtype=torch.long)
    for i, pair in enumerate(pairs):
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise ValueError(f"{name}: pair {i} must be a (prompt, completion) pair")
        prompt = _ids_of(pair[0], tokenizer, f"the prompt of pair {i}", name)
        completion = _ids_of(pair[1], tokenizer, f"the completion of pair {i}", name)
        if not prompt or not completion:
            raise ValueError(f"{name}: pair {i} has an empty {'prompt' if not prompt else 'completion'}")
        if len(prompt) >= block_size:
            raise ValueError(f"{name}: the prompt of pair {i} has {len(prompt)} tokens; block_size={block_size} "
                             "leaves no room for a completion token")
        answer = (completion + ([eos_id] if eos_id is not None else []))[: block_size - len(prompt)]
        row = prompt + answer
        input_ids[i, : len(row)] = torch.tensor(row)
        attention_mask[i, : len(row)] = 1
        labels[i, len(prompt): len(row)] = torch.tensor(answer)
    return TokenRows(input_ids, attention_mask, labels, vocab_size=vocab_size, name=name)


__all__ = ["IGNORE_INDEX", "TOKEN_KEYS", "TokenRows", "pack_stream", "prompt_completion_rows", "prompt_ends", "shift_labels"]
