"""The server: fuses the clients' knowledge into one personalised target per client.

Messages are plain numpy arrays keyed by client name, so the same object serves the
in-process simulation and a real federated engine (a Flower ``Strategy`` calls
:meth:`FusionServer.fuse` from its ``aggregate_fit``; see ``docs/federated.md``).
The arithmetic is in :mod:`transfuse.functional.knfu`.
"""

from __future__ import annotations

import math
from typing import Mapping

import numpy as np
import torch

from ..functional.knfu import (
    CRITERIA, MEASURES, fuse_knowledge, knfu_divergence, knfu_neighbours, knfu_weights, uniform_weights,
)

#: Fusion rules a user can name: KnFu's personalised fusion, or FedMD's plain average.
RULES: tuple[str, ...] = ("knfu", "uniform")

__all__ = ["FusionServer", "RULES"]


class FusionServer:
    """``fuse({client: (N, K) probabilities}) -> {client: (N, K) fused probabilities}``.

    * ``rule="knfu"`` (KnFu): each client gets the ``exp(-beta * D)``-weighted mean of its
      semantic neighbours' knowledge (``measure``, ``criterion``, ``beta``; see
      :func:`~transfuse.functional.knfu.knfu_fuse`), its own excluded unless ``include_self``;
    * ``rule="uniform"`` (FedMD's consensus): every client gets the same plain average of
      all clients' knowledge, its own included unless ``include_self=False``.

    ``include_self=None`` takes the rule's own default. After each call, :attr:`weights`
    holds the fusion weights as ``{receiver: {sender: weight}}`` and :attr:`divergence`
    (KnFu only) the ``(C, C)`` divergences, in the order of :attr:`clients`.
    """

    def __init__(
        self, *, rule: str = "knfu", beta: float = 10.0, measure: str = "epd", criterion: str = "below_mean",
        include_self: bool | None = None, eps: float = 1e-8,
    ) -> None:
        if rule not in RULES:
            raise ValueError(f"fusion rule must be one of {', '.join(RULES)}; got {rule!r}")
        if measure not in MEASURES:
            raise ValueError(f"measure must be one of {', '.join(MEASURES)}; got {measure!r}")
        if criterion not in CRITERIA:
            raise ValueError(f"criterion must be one of {', '.join(CRITERIA)}; got {criterion!r}")
        if not (isinstance(beta, (int, float)) and math.isfinite(beta) and beta >= 0):
            raise ValueError(f"beta must be a finite number >= 0, got {beta!r}")
        self.rule = rule
        self.beta = float(beta)
        self.measure = measure
        self.criterion = criterion
        self.include_self = (rule == "uniform") if include_self is None else bool(include_self)
        self.eps = float(eps)
        self.clients: list[str] = []
        self.weights: dict[str, dict[str, float]] = {}
        self.divergence: np.ndarray | None = None

    def __repr__(self) -> str:
        return f"FusionServer(rule={self.rule!r}, beta={self.beta}, include_self={self.include_self})"

    def fuse(self, knowledge_by_client: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Each client's fused knowledge ``(N, K)`` float32 from every client's ``(N, K)`` knowledge."""
        if not knowledge_by_client:
            raise ValueError("fuse: no client sent knowledge")
        names = list(knowledge_by_client)
        shapes = {name: np.shape(k) for name, k in knowledge_by_client.items()}
        if len(set(shapes.values())) != 1 or len(next(iter(shapes.values()))) != 2:
            raise ValueError(
                f"fuse: every client's knowledge must be one (N, K) shape over the same transfer set; got {shapes}"
            )
        stacked = torch.as_tensor(
            np.stack([np.asarray(knowledge_by_client[n], dtype=np.float64) for n in names])
        )  # (C, N, K)
        if self.rule == "uniform":
            w = uniform_weights(len(names), include_self=self.include_self)  # (C, C)
            self.divergence = None
        else:
            d = knfu_divergence(stacked, measure=self.measure, eps=self.eps)  # (C, C)
            neighbours = knfu_neighbours(d, criterion=self.criterion, include_self=self.include_self)
            w = knfu_weights(d, neighbours, beta=self.beta)
            self.divergence = d.numpy()
        fused = fuse_knowledge(stacked, w).numpy().astype(np.float32)  # (C, N, K)
        self.clients = names
        self.weights = {r: {s: float(w[i, j]) for j, s in enumerate(names)} for i, r in enumerate(names)}
        return {name: fused[i] for i, name in enumerate(names)}
