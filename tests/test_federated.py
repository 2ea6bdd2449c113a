"""Federated KD (KnFu): Dirichlet splits, the fusion arithmetic, the client's engine runs, the simulation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from transfuse import functional as TF
from transfuse.data import ArrayDataset, load_dataset
from transfuse.federated import (
    Client, ClientSettings, FederatedOptions, FusionServer, KnowledgeTable, dirichlet_split, holdout_split, simulate,
)
from transfuse.functional.knfu import knfu_divergence, knfu_fuse, knfu_neighbours, knfu_weights, uniform_weights
from transfuse.models.mlp import mlp


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _labels(n=600, k=6, seed=0):
    return np.random.default_rng(seed).integers(0, k, n)


# -- Dirichlet splits -------------------------------------------------------------------------


def test_dirichlet_split_partitions_every_sample_exactly_once_and_is_seeded():
    labels = _labels()
    parts = dirichlet_split(labels, num_clients=7, alpha=0.5, seed=3, min_size=5)
    assert len(parts) == 7 and min(len(p) for p in parts) >= 5
    everything = np.concatenate(parts)
    assert len(everything) == len(labels) and np.array_equal(np.sort(everything), np.arange(len(labels)))
    again = dirichlet_split(labels, num_clients=7, alpha=0.5, seed=3, min_size=5)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    other = dirichlet_split(labels, num_clients=7, alpha=0.5, seed=4, min_size=5)
    assert any(not np.array_equal(a, b) for a, b in zip(parts, other))


def _skew(parts, labels, k=6):
    """Mean over clients of the largest class share: 1/k for a perfectly mixed client, 1 for a single class."""
    return float(np.mean([np.bincount(labels[p], minlength=k).max() / len(p) for p in parts]))


def test_smaller_alpha_gives_more_skewed_clients():
    labels = _labels(3000)
    skews = {a: np.mean([_skew(dirichlet_split(labels, num_clients=10, alpha=a, seed=s, min_size=1), labels)
                         for s in range(3)]) for a in (0.1, 1.0, 100.0)}
    assert skews[0.1] > skews[1.0] + 0.15 > skews[100.0] + 0.15, skews
    assert skews[100.0] < 0.3  # near IID: close to 1/6


@pytest.mark.parametrize("kwargs, match", [
    ({"alpha": 0.0}, "alpha"),
    ({"alpha": -1.0}, "alpha"),
    ({"alpha": float("nan")}, "alpha"),
    ({"num_clients": 601}, "more than the 600 samples"),
    ({"num_clients": 0}, "num_clients"),
    ({"num_clients": 10, "min_size": 61}, "min_size"),
])
def test_dirichlet_split_bad_options_fail_clearly(kwargs, match):
    opts = {"num_clients": 4, "alpha": 1.0, **kwargs}
    with pytest.raises(ValueError, match=match):
        dirichlet_split(_labels(), **opts)


def test_impossible_min_size_fails_naming_the_way_out():
    labels = np.array([0] * 50 + [1] * 50)
    with pytest.raises(ValueError, match="larger alpha"):
        dirichlet_split(labels, num_clients=10, alpha=0.01, seed=0, min_size=10, max_tries=5)


def test_holdout_split_is_disjoint_and_complete():
    held, rest = holdout_split(100, size=20, seed=1)
    assert len(held) == 20 and np.array_equal(np.sort(np.concatenate([held, rest])), np.arange(100))
    with pytest.raises(ValueError, match="transfer set size"):
        holdout_split(100, size=100)


# -- the fusion arithmetic ----------------------------------------------------------------------


def _knowledge(rows):
    """(C, 1, K) knowledge with one transfer sample: client c predicts rows[c]."""
    return torch.tensor(rows, dtype=torch.float64)[:, None, :]


def test_divergence_and_weights_equal_a_hand_computation():
    # p0 = (.9, .1), p1 = (.8, .2), p2 = (.1, .9). By hand:
    # D[0,1] = .9 ln(.9/.8) + .1 ln(.1/.2);  D[0,2] = .9 ln 9 + .1 ln(1/9) = .8 ln 9.
    k = _knowledge([[0.9, 0.1], [0.8, 0.2], [0.1, 0.9]])
    d = knfu_divergence(k)
    d01 = 0.9 * math.log(0.9 / 0.8) + 0.1 * math.log(0.1 / 0.2)
    d02 = 0.8 * math.log(9.0)
    assert d[0, 1].item() == pytest.approx(d01, abs=1e-9) and d[0, 2].item() == pytest.approx(d02, abs=1e-9)
    assert torch.all(d.diagonal() == 0)
    # Every other client a neighbour: W[0] = softmax(-10 * (d01, d02)) over clients 1 and 2, 0 for itself.
    w = knfu_weights(d, knfu_neighbours(d, criterion="all"), beta=10.0)
    e1, e2 = math.exp(-10 * d01), math.exp(-10 * d02)
    assert w[0].tolist() == pytest.approx([0.0, e1 / (e1 + e2), e2 / (e1 + e2)], abs=1e-12)
    # below_mean: client 2 is farther from client 0 than the mean (d02 > (d01 + d02) / 2), so it is no neighbour.
    fused, w = knfu_fuse(k, beta=10.0)
    assert w[0].tolist() == [0.0, 1.0, 0.0]
    assert fused[0, 0].tolist() == pytest.approx([0.8, 0.2])


def test_below_mean_neighbours_and_weights_match_an_independent_restatement():
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.full(4, 0.5), size=(6, 20))  # (C=6, N=20, K=4)
    fused, w = knfu_fuse(torch.as_tensor(p), beta=10.0, measure="epd")
    epd = p.mean(1)  # (C, K)
    expected_w = np.zeros((6, 6))
    for a in range(6):
        div = np.array([np.sum(epd[a] * np.log(epd[a] / epd[b])) for b in range(6)])
        others = [b for b in range(6) if b != a]
        near = [b for b in others if div[b] <= div[others].mean()]
        z = sum(np.exp(-10 * div[b]) for b in near)
        for b in near:
            expected_w[a, b] = np.exp(-10 * div[b]) / z
    np.testing.assert_allclose(w.numpy(), expected_w, atol=1e-9)
    assert (w.numpy()[expected_w == 0] == 0).all()  # non-neighbours (and the client itself) weigh exactly 0
    np.testing.assert_allclose(fused.numpy(), np.einsum("kj,jnc->knc", expected_w, p), atol=1e-9)


def test_per_sample_measure_is_the_mean_kl_over_samples():
    rng = np.random.default_rng(1)
    p = rng.dirichlet(np.ones(3), size=(2, 5))
    d = knfu_divergence(torch.as_tensor(p), measure="per_sample")
    assert d[0, 1].item() == pytest.approx(np.mean(np.sum(p[0] * np.log(p[0] / p[1]), -1)), abs=1e-9)


def test_own_knowledge_is_fused_only_when_asked():
    k = _knowledge([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3]])
    _, w = knfu_fuse(k)
    assert torch.all(w.diagonal() == 0)
    _, w_self = knfu_fuse(k, include_self=True)
    assert torch.all(w_self.diagonal() > 0)  # D[k, k] = 0: with itself allowed, a client weighs itself most
    assert torch.all(w_self.diagonal() == w_self.max(dim=1).values)
    assert uniform_weights(3).tolist() == [[1 / 3] * 3] * 3  # FedMD: everyone, itself included
    assert uniform_weights(3, include_self=False)[0].tolist() == [0.0, 0.5, 0.5]


def test_beta_zero_is_the_plain_mean_over_neighbours():
    k = _knowledge([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.2, 0.8]])
    d = knfu_divergence(k)
    w = knfu_weights(d, knfu_neighbours(d, criterion="all"), beta=0.0)
    assert w[0].tolist() == pytest.approx([0.0, 1 / 3, 1 / 3, 1 / 3])


def test_fusion_functions_refuse_bad_input():
    with pytest.raises(ValueError, match="sum to 1"):
        knfu_fuse(torch.rand(3, 4, 5))  # positive, but not distributions
    with pytest.raises(ValueError, match="non-negative probabilities"):
        knfu_fuse(torch.randn(3, 4, 5))  # logits
    with pytest.raises(ValueError, match="clients, samples, classes"):
        knfu_fuse(torch.rand(4, 5))
    with pytest.raises(ValueError, match="beta"):
        knfu_fuse(_knowledge([[0.5, 0.5], [0.4, 0.6]]), beta=-1.0)
    with pytest.raises(ValueError, match="one client"):
        knfu_fuse(_knowledge([[0.5, 0.5]]))
    with pytest.raises(ValueError, match="criterion"):
        knfu_fuse(_knowledge([[0.5, 0.5], [0.4, 0.6]]), criterion="nearest")
    assert {"knfu_fuse", "knfu_weights", "fuse_knowledge"} <= set(TF.__all__)


# -- the server --------------------------------------------------------------------------------


def test_server_fuses_plain_arrays_per_client():
    rng = np.random.default_rng(2)
    msgs = {f"c{i}": rng.dirichlet(np.ones(3), size=8).astype(np.float32) for i in range(4)}
    server = FusionServer(rule="knfu", beta=10.0)
    fused = server.fuse(msgs)
    assert set(fused) == set(msgs) and all(v.shape == (8, 3) and v.dtype == np.float32 for v in fused.values())
    expected, w = knfu_fuse(torch.as_tensor(np.stack(list(msgs.values())), dtype=torch.float64))
    np.testing.assert_allclose(fused["c2"], expected[2].numpy(), atol=1e-6)
    assert all(server.weights[c][c] == 0 for c in msgs)
    uniform = FusionServer(rule="uniform").fuse(msgs)
    np.testing.assert_allclose(uniform["c0"], np.mean(list(msgs.values()), axis=0), atol=1e-6)


def test_server_bad_options_and_messages_fail_clearly():
    with pytest.raises(ValueError, match="knfu, uniform"):
        FusionServer(rule="fedavg")
    with pytest.raises(ValueError, match="beta"):
        FusionServer(beta=float("inf"))
    with pytest.raises(ValueError, match="same transfer set"):
        FusionServer().fuse({"a": np.full((4, 2), 0.5), "b": np.full((5, 2), 0.5)})
    with pytest.raises(ValueError, match="no client"):
        FusionServer().fuse({})


# -- the client: its knowledge source and the engine runs -------------------------------------


def test_knowledge_table_answers_by_sample_id():
    probs = np.array([[0.7, 0.3], [0.2, 0.8], [0.5, 0.5]], dtype=np.float32)
    table = KnowledgeTable("fused", [30, 10, 20], probs, temperature=2.0)
    out = table.provide({"sample_id": torch.tensor([20, 30, 30])}, ["logits", "probs"])
    assert torch.equal(out["probs"], torch.tensor([[0.5, 0.5], [0.7, 0.3], [0.7, 0.3]]))
    assert torch.allclose(torch.softmax(out["logits"] / 2.0, -1), out["probs"], atol=1e-6)
    with pytest.raises(KeyError, match="no sample id"):
        table.provide({"sample_id": torch.tensor([11])}, ["logits"])
    with pytest.raises(ValueError, match="distinct"):
        KnowledgeTable("fused", [1, 1, 2], probs)


def _digits_client(train_positions, transfer_positions, **settings):
    splits = load_dataset("digits")
    torch.manual_seed(0)
    model = mlp(input_shape=splits.input_shape, num_classes=10, hidden=[32])
    train = splits.train.subset(torch.as_tensor(train_positions))
    transfer = splits.train.subset(torch.as_tensor(transfer_positions))
    transfer = ArrayDataset(transfer.inputs, torch.full_like(transfer.targets, -1), ids=transfer.sample_ids)
    return Client("c", model, train, transfer, settings=ClientSettings(**settings)), splits


def _kl(p, q):
    return float(np.mean(np.sum(p * (np.log(p + 1e-12) - np.log(q + 1e-12)), -1)))


def test_fine_tune_moves_the_client_toward_the_fused_targets():
    client, _ = _digits_client(np.arange(200), np.arange(1000, 1200), local_steps=30, fine_tune_steps=60, lr=3e-3)
    client.train_local(0)
    before = client.knowledge()  # (200, 10)
    # Targets the client does not hold: its own predictions with the classes rotated by one.
    fused = np.roll(before, 1, axis=1) * 0.9 + 0.01
    fused /= fused.sum(1, keepdims=True)
    client.fine_tune(fused, 0)
    after = client.knowledge()
    assert _kl(fused, after) < 0.5 * _kl(fused, before), (_kl(fused, before), _kl(fused, after))
    with pytest.raises(ValueError, match="N = 200"):
        client.fine_tune(fused[:10], 1)


def test_local_training_learns_the_clients_labels():
    client, splits = _digits_client(np.arange(400), np.arange(1000, 1100), local_steps=80, lr=3e-3)
    test_targets = splits.test.targets
    chance = float((client.logits(splits.test).argmax(-1) == test_targets).float().mean())
    client.train_local(0)
    trained = float((client.logits(splits.test).argmax(-1) == test_targets).float().mean())
    assert trained > chance + 0.4, (chance, trained)


def test_client_settings_refuse_bad_values():
    with pytest.raises(ValueError, match="lr"):
        ClientSettings(lr=0.0)
    with pytest.raises(ValueError, match="local_steps"):
        ClientSettings(local_steps=-1)
    with pytest.raises(ValueError, match="temperature"):
        ClientSettings(temperature=float("nan"))


# -- the simulation ----------------------------------------------------------------------------


def _tiny(**kw):
    base = dict(num_clients=3, alpha=0.5, rounds=2, transfer_size=150, pool_size=600, min_client_size=20,
                hidden=(16,), local_steps=15, fine_tune_steps=10, batch_size=32, lr=3e-3, seed=0)
    return FederatedOptions(**{**base, **kw})


def test_simulation_is_deterministic_per_seed():
    splits = load_dataset("digits")
    a = simulate(splits, _tiny())
    b = simulate(splits, _tiny())
    assert [r.client_alma for r in a.rounds] == [r.client_alma for r in b.rounds]
    assert a.rounds[-1].weights == b.rounds[-1].weights and a.client_sizes == b.client_sizes
    assert all(a.rounds[-1].weights[c][c] == 0 for c in a.rounds[-1].weights)  # KnFu: no client fuses itself
    c = simulate(splits, _tiny(seed=1))
    assert c.client_sizes != a.client_sizes or c.rounds[-1].client_alma != a.rounds[-1].client_alma
    assert 0.0 <= a.alma <= 1.0 and 0.0 <= a.global_accuracy <= 1.0
    local = simulate(splits, _tiny(scheme="local"))
    assert local.rounds[-1].weights is None and local.client_sizes == a.client_sizes  # same split for every scheme


@pytest.mark.parametrize("kwargs, match", [
    ({"alpha": 0.0}, "alpha"),
    ({"alpha": -0.5}, "alpha"),
    ({"scheme": "fedavg"}, "local, uniform, knfu"),
    ({"num_clients": 1}, "num_clients must be >= 2"),
    ({"rounds": 0}, "rounds"),
    ({"beta": -1.0}, "beta"),
    ({"criterion": "top2"}, "criterion"),
    ({"lr": -1.0}, "lr"),
])
def test_bad_simulation_options_fail_on_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _tiny(**kwargs)


def test_more_clients_than_samples_fails_before_training():
    splits = load_dataset("digits")
    with pytest.raises(ValueError, match="more than the 50 samples"):
        simulate(splits, _tiny(num_clients=60, pool_size=50, min_client_size=0))
    with pytest.raises(ValueError, match="transfer_size"):
        simulate(splits, _tiny(transfer_size=10_000))
