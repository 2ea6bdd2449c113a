"""N federated clients and their server in one process: KnFu, FedMD-style averaging, or local training.

:func:`simulate` splits a data set's training split into a shared unlabelled transfer set
and ``num_clients`` Dirichlet non-IID client sets (:mod:`~transfuse.federated.splits`),
builds one :class:`~transfuse.federated.client.Client` per set and a
:class:`~transfuse.federated.server.FusionServer`, and runs ``rounds`` rounds of

1. local training (every client, on its own data);
2. knowledge extraction (every client's predictions on the transfer set);
3. fusion on the server (KnFu: each client's semantic neighbours; ``uniform``: all clients);
4. fine-tuning (every client distils its fused knowledge on the transfer set),

passing only numpy arrays between clients and server, as a real transport would. The
``local`` scheme runs step 1 alone. After each round every client is evaluated on the
global test set: its accuracy there, and its accuracy on its *own* test distribution
(per-class accuracies weighted by the client's training label mix) -- the mean of the
latter over clients is the paper's ALMA (average local model accuracy).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from ..data.base import ArrayDataset, DataSplits
from ..data.transfer import IGNORE_TARGET
from .client import Client, ClientSettings
from .server import FusionServer
from .splits import class_proportions, dirichlet_split, holdout_split

#: What a simulation can run: local training only, FedMD's uniform fusion, KnFu.
SCHEMES: tuple[str, ...] = ("local", "uniform", "knfu")

ModelFn = Callable[[tuple[int, ...], int], nn.Module]

__all__ = ["SCHEMES", "Federation", "FederatedOptions", "RoundResult", "SimulationResult", "build_federation",
           "evaluate_clients", "run_round", "simulate"]


@dataclass(frozen=True)
class FederatedOptions:
    """Every knob of a simulation (checked on construction; a bad value names the field).

    Data: ``num_clients``, Dirichlet ``alpha`` (> 0; small = skewed), ``transfer_size``
    training samples held out as the shared unlabelled transfer set, ``pool_size`` (the
    number of the remaining training samples dealt to the clients, a seeded random subset;
    None: all), ``min_client_size``. Clients: ``hidden`` (the default MLP's widths),
    ``local_steps``, ``fine_tune_steps``, ``batch_size``, ``lr``, ``temperature``,
    ``kd_weight`` (see :class:`~transfuse.federated.client.ClientSettings`). Server:
    ``scheme`` (``local``, ``uniform``, ``knfu``), ``beta``, ``measure``, ``criterion``,
    ``include_self`` (None: the rule's default; see
    :class:`~transfuse.federated.server.FusionServer`). ``rounds``; ``seed`` drives
    the split, the models' initialisation and every data order.
    """

    scheme: str = "knfu"
    num_clients: int = 10
    alpha: float = 1.0
    rounds: int = 3
    transfer_size: int = 1000
    pool_size: int | None = None
    min_client_size: int = 10
    hidden: tuple[int, ...] = (64,)
    local_steps: int = 100
    fine_tune_steps: int = 50
    batch_size: int = 32
    lr: float = 1e-3
    temperature: float = 1.0
    kd_weight: float = 1.0
    beta: float = 10.0
    measure: str = "epd"
    criterion: str = "below_mean"
    include_self: bool | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise ValueError(f"scheme must be one of {', '.join(SCHEMES)}; got {self.scheme!r}")
        if not (isinstance(self.num_clients, int) and self.num_clients >= 1):
            raise ValueError(f"num_clients must be an integer >= 1, got {self.num_clients!r}")
        if self.scheme != "local" and self.num_clients < 2:
            raise ValueError(f"scheme {self.scheme!r} fuses other clients' knowledge: num_clients must be >= 2")
        if not (isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"alpha (the Dirichlet concentration) must be a finite number > 0, got {self.alpha!r}")
        if not (isinstance(self.rounds, int) and self.rounds >= 1):
            raise ValueError(f"rounds must be an integer >= 1, got {self.rounds!r}")
        if not (isinstance(self.transfer_size, int) and self.transfer_size >= 1):
            raise ValueError(f"transfer_size must be an integer >= 1, got {self.transfer_size!r}")
        if self.pool_size is not None and not (isinstance(self.pool_size, int) and self.pool_size >= 1):
            raise ValueError(f"pool_size must be None or an integer >= 1, got {self.pool_size!r}")
        if not (isinstance(self.min_client_size, int) and self.min_client_size >= 0):
            raise ValueError(f"min_client_size must be an integer >= 0, got {self.min_client_size!r}")
        object.__setattr__(self, "hidden", tuple(self.hidden))
        self.client_settings(0)  # checks the client fields
        if self.scheme != "local":
            self.server()  # checks beta, measure, criterion

    def client_settings(self, client: int) -> ClientSettings:
        """Client ``client``'s settings (its own seed)."""
        return ClientSettings(local_steps=self.local_steps, fine_tune_steps=self.fine_tune_steps,
                              batch_size=self.batch_size, lr=self.lr, temperature=self.temperature,
                              kd_weight=self.kd_weight, seed=self.seed * 1009 + client)

    def server(self) -> FusionServer | None:
        """The fusion server of this scheme (None for ``local``)."""
        if self.scheme == "local":
            return None
        return FusionServer(rule=self.scheme, beta=self.beta, measure=self.measure, criterion=self.criterion,
                            include_self=self.include_self)


@dataclass
class Federation:
    """The simulated federation: clients, server, the shared transfer set, each client's label mix."""

    clients: list[Client]
    server: FusionServer | None
    transfer: object
    proportions: np.ndarray  #: (clients, classes) each client's training label distribution
    num_classes: int


@dataclass
class RoundResult:
    """One round's evaluation: means over clients and per-client values (in client order)."""

    round: int
    alma: float  #: mean over clients of the accuracy on the client's own test distribution
    global_accuracy: float  #: mean over clients of the accuracy on the global test set
    client_alma: list[float]
    client_global: list[float]
    weights: dict[str, dict[str, float]] | None = None  #: the server's fusion weights this round


@dataclass
class SimulationResult:
    options: FederatedOptions
    rounds: list[RoundResult]
    client_sizes: list[int]
    seconds: float

    @property
    def alma(self) -> float:
        """ALMA after the last round."""
        return self.rounds[-1].alma

    @property
    def global_accuracy(self) -> float:
        """Mean global-test accuracy after the last round."""
        return self.rounds[-1].global_accuracy

    def to_dict(self) -> dict:
        return {"options": asdict(self.options), "rounds": [asdict(r) for r in self.rounds],
                "client_sizes": self.client_sizes, "seconds": self.seconds}


def _targets(dataset) -> np.ndarray:
    targets = getattr(dataset, "targets", None)
    if targets is None:
        targets = [int(dataset[i]["target"]) for i in range(len(dataset))]
    return np.asarray(torch.as_tensor(targets).long().numpy())


def _subset(dataset, indices: np.ndarray):
    if not isinstance(dataset, ArrayDataset):
        raise TypeError(
            f"the federated simulation splits an ArrayDataset (transfuse.data); got {type(dataset).__name__}"
        )
    return dataset.subset(torch.as_tensor(indices, dtype=torch.long))


def _unlabelled(dataset: ArrayDataset) -> ArrayDataset:
    """The same samples and ids with every label hidden (the transfer set is unlabelled)."""
    return ArrayDataset(dataset.inputs, torch.full_like(dataset.targets, IGNORE_TARGET), ids=dataset.sample_ids)


def default_model(hidden: Sequence[int]) -> ModelFn:
    """A factory of the MLP every client uses by default."""
    from ..models.mlp import mlp

    return lambda input_shape, num_classes: mlp(input_shape=input_shape, num_classes=num_classes, hidden=list(hidden))


def build_federation(
    splits: DataSplits, options: FederatedOptions, *, model_fn: ModelFn | None = None,
    work_dir: str | Path | None = None,
) -> Federation:
    """Split ``splits.train`` and build the clients and the server (see :func:`simulate`)."""
    train = splits.train
    n = len(train)
    if options.transfer_size >= n:
        raise ValueError(f"transfer_size ({options.transfer_size}) must be below the {n} training samples")
    transfer_idx, rest = holdout_split(n, size=options.transfer_size, seed=options.seed)
    if options.pool_size is not None:
        if options.pool_size > len(rest):
            raise ValueError(f"pool_size ({options.pool_size}) is more than the {len(rest)} training samples left "
                             f"after the transfer set")
        rest = np.sort(np.random.default_rng(options.seed + 1).choice(rest, options.pool_size, replace=False))
    targets = _targets(train)
    parts = dirichlet_split(targets[rest], num_clients=options.num_clients, alpha=options.alpha, seed=options.seed,
                            min_size=options.min_client_size)
    transfer = _unlabelled(_subset(train, transfer_idx))
    make = model_fn or default_model(options.hidden)
    clients, proportions = [], []
    for k, part in enumerate(parts):
        positions = rest[part]
        torch.manual_seed(options.seed * 7919 + k)  # each client's initialisation: a function of (seed, client)
        model = make(tuple(splits.input_shape), splits.num_classes)
        clients.append(Client(f"client{k}", model, _subset(train, positions), transfer,
                              settings=options.client_settings(k),
                              work_dir=None if work_dir is None else Path(work_dir) / f"client{k}"))
        proportions.append(class_proportions(targets[positions], num_classes=splits.num_classes))
    return Federation(clients=clients, server=options.server(), transfer=transfer, proportions=np.stack(proportions),
                      num_classes=splits.num_classes)


def run_round(federation: Federation, round: int) -> dict[str, dict[str, float]] | None:
    """One round: local training, then (unless ``local``) knowledge, fusion and fine-tuning.

    Returns the server's fusion weights ``{receiver: {sender: weight}}`` (None for ``local``).
    """
    for client in federation.clients:
        client.train_local(round)
    if federation.server is None:
        return None
    knowledge = {client.name: client.knowledge() for client in federation.clients}  # messages up: (N, K) arrays
    fused = federation.server.fuse(knowledge)  # messages down: one (N, K) array per client
    for client in federation.clients:
        client.fine_tune(fused[client.name], round)
    return federation.server.weights


def evaluate_clients(federation: Federation, test_set) -> tuple[list[float], list[float]]:
    """Per client: ``(accuracy on its own test distribution, accuracy on the global test set)``.

    The own-distribution accuracy weighs the client's per-class accuracies on the global
    test set by the client's training label mix (what a test set drawn like its data
    would give, without splitting the test set).
    """
    targets = torch.as_tensor(_targets(test_set))  # (M,)
    k = federation.num_classes
    counts = torch.bincount(targets, minlength=k).double().clamp_min(1)  # (K,)
    own, overall = [], []
    for client, mix in zip(federation.clients, federation.proportions):
        correct = (client.logits(test_set).argmax(-1) == targets).double()  # (M,)
        per_class = torch.zeros(k, dtype=torch.float64).index_add_(0, targets, correct) / counts  # (K,)
        own.append(float((per_class.numpy() * mix).sum()))
        overall.append(float(correct.mean()))
    return own, overall


def simulate(
    splits: DataSplits, options: FederatedOptions = FederatedOptions(), *, model_fn: ModelFn | None = None,
    work_dir: str | Path | None = None,
    on_round: Callable[[RoundResult], None] | None = None,
) -> SimulationResult:
    """Run ``options.rounds`` rounds of ``options.scheme`` on ``splits`` and evaluate after each round.

    ``model_fn(input_shape, num_classes)`` builds a client's model (default: an MLP of
    ``options.hidden``); ``work_dir`` keeps the engine's run folders (temporary ones
    otherwise); ``on_round`` is called with each round's result. Deterministic per
    ``options.seed`` on the CPU.
    """
    t0 = time.perf_counter()
    federation = build_federation(splits, options, model_fn=model_fn, work_dir=work_dir)
    rounds = []
    for r in range(options.rounds):
        weights = run_round(federation, r)
        own, overall = evaluate_clients(federation, splits.test)
        result = RoundResult(round=r + 1, alma=float(np.mean(own)), global_accuracy=float(np.mean(overall)),
                             client_alma=own, client_global=overall, weights=weights)
        rounds.append(result)
        if on_round is not None:
            on_round(result)
    return SimulationResult(options=options, rounds=rounds, client_sizes=[len(c.train_set) for c in federation.clients],
                            seconds=time.perf_counter() - t0)
