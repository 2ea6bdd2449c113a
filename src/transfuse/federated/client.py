"""A federated client: trains on its own data, shares its knowledge, fine-tunes on fused knowledge.

Everything a client sends or receives is a plain numpy array, so any transport can carry
it (in one process, :func:`~transfuse.federated.simulate.simulate`; across machines, a
Flower ``NumPyClient``, see ``docs/federated.md``):

* :meth:`Client.train_local` -- supervised training on the client's private data (a ``ce``
  term), through :func:`transfuse.engine.fit`;
* :meth:`Client.knowledge` -> ``(N, K)`` float32: ``softmax(logits / T)`` on the shared
  transfer set, rows in the transfer set's order;
* :meth:`Client.fine_tune` ``(N, K)``: distillation of the fused knowledge the server
  sent back (a ``kd`` term whose target is a :class:`~transfuse.federated.knowledge.KnowledgeTable`
  answering by ``sample_id``), again through :func:`transfuse.engine.fit`.

Both phases are ordinary :class:`~transfuse.distiller.Distiller` runs of the one engine: the
client's model is the one trainable participant, named ``client``.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..analysis.predict import predict
from ..distiller import Distiller, Term
from ..engine import FitSettings, fit
from ..losses import LOSSES
from ..participants import Participant
from .knowledge import KnowledgeTable

#: The participant name of a client's model inside its Distiller runs.
MODEL = "client"
#: The source name of the fused knowledge inside a fine-tune run.
FUSED = "fused"

__all__ = ["Client", "ClientSettings"]


@dataclass(frozen=True)
class ClientSettings:
    """How a client trains. ``local_steps``/``fine_tune_steps``: optimizer steps per round
    of local training and of distillation of the fused knowledge; ``batch_size``; ``lr``
    (Adam, a fresh optimizer per phase); ``temperature``: the softmax temperature of the
    shared knowledge, and of the ``kd`` term that distils the fused knowledge;
    ``kd_weight``: that term's weight; ``seed``: the client's own seed (data order of
    every phase is a function of it, the round and the phase)."""

    local_steps: int = 100
    fine_tune_steps: int = 50
    batch_size: int = 32
    lr: float = 1e-3
    temperature: float = 1.0
    kd_weight: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("local_steps", "fine_tune_steps"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= 0):
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        if not (isinstance(self.batch_size, int) and self.batch_size >= 1):
            raise ValueError(f"batch_size must be an integer >= 1, got {self.batch_size!r}")
        for name in ("lr", "temperature"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        if not (isinstance(self.kd_weight, (int, float)) and math.isfinite(self.kd_weight) and self.kd_weight >= 0):
            raise ValueError(f"kd_weight must be a finite number >= 0, got {self.kd_weight!r}")


def _fabric():
    from lightning_fabric import Fabric

    return Fabric(accelerator="cpu", devices=1)


class Client:
    """One client: ``model`` (any classifier ``(B, ...) -> (B, K)``), its private labelled
    ``train_set`` and the shared unlabelled ``transfer_set`` (dict samples with
    ``sample_id``, e.g. :class:`~transfuse.data.ArrayDataset`; labels there are never read).

    ``work_dir``: where the engine's run folders go (``<work_dir>/round<r>-<phase>``); a
    temporary folder, removed after each phase, when None. ``fabric``: the Lightning Fabric
    to train on (CPU, one device, by default).
    """

    def __init__(
        self, name: str, model: nn.Module, train_set, transfer_set, *, settings: ClientSettings = ClientSettings(),
        work_dir: str | Path | None = None, fabric=None,
    ) -> None:
        if len(train_set) < 1:
            raise ValueError(f"client {name!r} has no training samples")
        if len(transfer_set) < 1:
            raise ValueError(f"client {name!r}: the transfer set is empty")
        self.name = name
        self.model = model
        self.train_set = train_set
        self.transfer_set = transfer_set
        self.settings = settings
        self.work_dir = None if work_dir is None else Path(work_dir)
        self.fabric = fabric if fabric is not None else _fabric()
        self.transfer_ids = np.asarray([int(i) for i in _sample_ids(transfer_set)], dtype=np.int64)  # (N,)

    def __repr__(self) -> str:
        return f"Client({self.name!r}, {len(self.train_set)} samples)"

    # -- the two phases, each one engine run ------------------------------------------------

    def train_local(self, round: int = 0) -> None:
        """``local_steps`` steps of cross-entropy on the client's own data."""
        if self.settings.local_steps == 0:
            return
        ce = Term("ce", LOSSES.get("ce").build(), input=f"{MODEL}.logits", target=None)
        self._fit(Distiller([Participant(MODEL, self.model)], [ce]), self.train_set,
                  steps=self.settings.local_steps, round=round, phase=0)

    def fine_tune(self, fused: np.ndarray, round: int = 0) -> None:
        """``fine_tune_steps`` steps distilling ``fused`` ``(N, K)`` (rows in the transfer set's order)
        into the model on the transfer set: ``kd_weight * kd(client.logits, fused.logits)``."""
        fused = np.asarray(fused)
        if fused.shape[0] != len(self.transfer_ids) or fused.ndim != 2:
            raise ValueError(
                f"client {self.name!r}: fused knowledge must be (N, K) with N = {len(self.transfer_ids)} transfer "
                f"samples, got shape {fused.shape}"
            )
        if self.settings.fine_tune_steps == 0:
            return
        table = KnowledgeTable(FUSED, self.transfer_ids, fused, temperature=self.settings.temperature)
        kd = Term("kd", LOSSES.get("kd").build(temperature=self.settings.temperature), weight=self.settings.kd_weight,
                  input=f"{MODEL}.logits", target=f"{FUSED}.logits")
        self._fit(Distiller([Participant(MODEL, self.model), table], [kd]), self.transfer_set,
                  steps=self.settings.fine_tune_steps, round=round, phase=1)

    # -- messages ---------------------------------------------------------------------------

    def knowledge(self) -> np.ndarray:
        """The client's knowledge: ``softmax(logits / T)`` on the transfer set, ``(N, K)`` float32."""
        logits = self.logits(self.transfer_set)  # (N, K)
        return torch.softmax(logits / self.settings.temperature, dim=-1).numpy().astype(np.float32)

    def logits(self, dataset) -> torch.Tensor:
        """The model's logits ``(N, K)`` on ``dataset``, in order (eval mode)."""
        return predict(self.model, dataset)[0]

    # -- internals --------------------------------------------------------------------------

    def _fit(self, distiller: Distiller, data, *, steps: int, round: int, phase: int) -> None:
        s = self.settings
        # Data order of this phase: a function of (client seed, round, phase) only.
        seed = (s.seed * 1_000_003 + round * 2 + phase) % (2**31)
        settings = FitSettings(steps=steps, batch_size=min(s.batch_size, len(data)), seed=seed, log_every=steps,
                               checkpoint_every=steps, keep_checkpoints=1, progress=False)
        optimizer = torch.optim.Adam(self.model.parameters(), lr=s.lr)
        if self.work_dir is not None:
            folder = self.work_dir / f"round{round}-{'local' if phase == 0 else 'fuse'}"
            fit(self.fabric, distiller, optimizer, data, settings, run_dir=folder)
            return
        with tempfile.TemporaryDirectory(prefix="transfuse-client-") as tmp:
            fit(self.fabric, distiller, optimizer, data, settings, run_dir=tmp)


def _sample_ids(dataset):
    ids = getattr(dataset, "sample_ids", None)
    if ids is not None:
        return ids
    return [int(dataset[i]["sample_id"]) for i in range(len(dataset))]
