"""The fused knowledge as a source: a client's personalised targets, answered by ``sample_id`` from memory.

The server's message to a client is an array ``(N, K)`` of probabilities over the ``N``
transfer samples, in the order of the transfer set's sample ids. :class:`KnowledgeTable`
holds it and answers any batch of transfer samples with those rows, so a ``kd`` term can
take it as its target exactly as it takes a teacher (``target: fused.logits``).
"""

from __future__ import annotations

import math
from typing import Iterable, Mapping

import numpy as np
import torch

from ..distiller import MissingBatchKeyError
from ..participants import LOGITS, Outputs

SAMPLE_ID = "sample_id"
PROBS = "probs"

__all__ = ["KnowledgeTable"]


class KnowledgeTable:
    """Per-sample class probabilities looked up by ``batch["sample_id"]``.

    ``ids``: ``(N,)`` distinct integer sample ids; ``probs``: ``(N, K)`` probabilities in
    the same order (numpy or torch). Fields: ``probs`` (as given, float32) and ``logits``
    = ``T * log(max(probs, eps))`` -- logits whose ``softmax(. / T)`` gives back the
    probabilities (up to the ``eps`` floor), so a ``kd`` term at temperature ``T``
    distils exactly these targets, as with an :class:`~transfuse.sources.Ensemble`'s
    ``mean_probs``. An id that is not in the table is a KeyError naming it.
    """

    inputs: tuple[str, ...] = ()
    trainable = False

    def __init__(self, name: str, ids, probs, *, temperature: float = 1.0, eps: float = 1e-8) -> None:
        ids_t = torch.as_tensor(np.asarray(ids)).long().flatten()  # (N,)
        probs_t = torch.as_tensor(np.asarray(probs, dtype=np.float32))  # (N, K)
        if probs_t.dim() != 2 or len(probs_t) != len(ids_t):
            raise ValueError(
                f"knowledge {name!r}: probs must be (N, K) with one row per sample id; got {tuple(probs_t.shape)} "
                f"for {len(ids_t)} ids"
            )
        if not torch.isfinite(probs_t).all() or (probs_t < 0).any():
            raise ValueError(f"knowledge {name!r}: probs must be finite and non-negative")
        if not (temperature > 0 and math.isfinite(temperature)):
            raise ValueError(f"knowledge {name!r}: temperature must be finite and > 0, got {temperature}")
        order = torch.argsort(ids_t)
        self._sorted = ids_t[order]  # (N,) ascending, for searchsorted
        if len(self._sorted) > 1 and (self._sorted[1:] == self._sorted[:-1]).any():
            raise ValueError(f"knowledge {name!r}: sample ids must be distinct")
        self._rows = order  # (N,) row of each sorted id
        self.name = name
        self.probs = probs_t
        self.temperature = float(temperature)
        self.eps = float(eps)

    def __repr__(self) -> str:
        return f"KnowledgeTable({self.name!r}, {len(self.probs)} samples)"

    def __len__(self) -> int:
        return len(self.probs)

    def resolve_field(self, field: str) -> str:
        return field

    def rows(self, sample_ids: torch.Tensor) -> torch.Tensor:
        """The table rows ``(B,)`` of ``sample_ids`` ``(B,)``."""
        query = sample_ids.detach().to("cpu", torch.int64)
        pos = torch.searchsorted(self._sorted, query).clamp_max(len(self._sorted) - 1)  # (B,)
        missing = query[self._sorted[pos] != query]
        if missing.numel():
            raise KeyError(f"knowledge {self.name!r} has no sample id(s) {missing[:5].tolist()}: it covers the "
                           f"{len(self)} transfer samples only")
        return self._rows[pos]

    def provide(self, batch: Mapping[str, torch.Tensor], fields: Iterable[str], upstream=None) -> Outputs:
        fields = list(fields)
        unknown = sorted(set(fields) - {LOGITS, PROBS})
        if unknown:
            raise ValueError(f"knowledge {self.name!r} answers only '{LOGITS}' and '{PROBS}', not {unknown}")
        if SAMPLE_ID not in batch:
            raise MissingBatchKeyError(
                f"knowledge {self.name!r} answers by sample id, but the batch has no '{SAMPLE_ID}' "
                f"(keys: {sorted(batch)})"
            )
        ids = batch[SAMPLE_ID]
        probs = self.probs[self.rows(ids)].to(ids.device)  # (B, K)
        out: Outputs = {}
        if PROBS in fields:
            out[PROBS] = probs
        if LOGITS in fields:
            out[LOGITS] = self.temperature * probs.clamp_min(self.eps).log()  # (B, K)
        return out
