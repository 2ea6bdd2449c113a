"""Federated knowledge distillation: clients share predictions on a transfer set, not weights.

KnFu (Seyedmohammadi et al., 2024): each client trains on its own data, shares its soft
predictions on a shared unlabelled transfer set, and distils a *personalised* fusion of
its semantic neighbours' predictions. The pieces are independent of how messages travel
(every message is a numpy array):

* :mod:`~transfuse.federated.splits` -- Dirichlet non-IID client splits, the held-out transfer set;
* :class:`Client` -- local training and KD fine-tuning, each one run of :func:`transfuse.engine.fit`;
* :class:`FusionServer` -- ``fuse({client: knowledge}) -> {client: fused}`` (``knfu`` or ``uniform``);
* :class:`KnowledgeTable` -- the fused knowledge as a source answering by ``sample_id``;
* :func:`simulate` -- N clients and the server in one process for R rounds.

``docs/federated.md`` shows the simulation and how a Flower client and strategy carry the
same objects.
"""

from .client import Client, ClientSettings
from .knowledge import KnowledgeTable
from .server import RULES, FusionServer
from .simulate import (
    SCHEMES, FederatedOptions, Federation, RoundResult, SimulationResult, build_federation, evaluate_clients, run_round,
    simulate,
)
from .splits import class_proportions, dirichlet_split, holdout_split

__all__ = [
    "Client", "ClientSettings", "FederatedOptions", "Federation", "FusionServer", "KnowledgeTable", "RULES",
    "RoundResult", "SCHEMES", "SimulationResult", "build_federation", "class_proportions", "dirichlet_split",
    "evaluate_clients", "holdout_split", "run_round", "simulate",
]
