"""Participants and sources: frozen ones are eval-locked and gradient-free, trainable ones are not."""

import pytest
import torch
from torch import nn

from transfuse.models.outputs import logits_of
from transfuse.participants import Participant
from transfuse.sources import Ensemble, mean_probs_logits


def _net(classes=3):
    return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, classes))


def test_frozen_participant_is_eval_locked_and_gradient_free():
    teacher = Participant("teacher", _net(), trainable=False)
    teacher.model.train()  # a caller switching it to training mode must not switch on dropout
    x = {"input": torch.randn(8, 4)}
    a, b = teacher.provide(x)["logits"], teacher.provide(x)["logits"]
    assert torch.equal(a, b), "dropout must stay off: frozen participants are eval-locked"
    assert not a.requires_grad
    assert all(not p.requires_grad for p in teacher.model.parameters())


def test_trainable_participant_runs_with_autograd_in_its_mode():
    student = Participant("student", _net())
    student.model.train()
    out = student.provide({"input": torch.randn(8, 4)})["logits"]
    assert out.requires_grad


def test_taps_and_field_aliases():
    class Net(nn.Sequential):
        feature_layer = "1"

    p = Participant("teacher", Net(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3)), trainable=False)
    path = p.resolve_field("feature")
    assert path == "1" and p.resolve_field("logits") == "logits"
    p.add_taps([path])
    out = p.provide({"input": torch.randn(2, 4)}, ["logits", path])
    assert out["1"].shape == (2, 16) and out["logits"].shape == (2, 3)
    with pytest.raises(ValueError, match="declares no default 'hint'"):
        p.resolve_field("hint")


def test_participant_names_are_identifiers():
    with pytest.raises(ValueError, match="identifier"):
        Participant("my teacher", _net())


def test_mean_probs_logits_soften_to_the_weighted_mean_of_probabilities():
    torch.manual_seed(0)
    z1, z2 = torch.randn(5, 4), torch.randn(5, 4)
    T = 3.0
    logits = mean_probs_logits([z1, z2], temperature=T, weights=[0.25, 0.75])
    expected = 0.25 * torch.softmax(z1 / T, -1) + 0.75 * torch.softmax(z2 / T, -1)
    assert torch.allclose(torch.softmax(logits / T, -1), expected, atol=1e-6)


def test_ensemble_validates_and_combines():
    with pytest.raises(ValueError, match="weights"):
        Ensemble("e", ["a", "b"], weights=[1.0])
    with pytest.raises(ValueError, match="temperature"):
        Ensemble("e", ["a"], temperature=0.0)
    ens = Ensemble("e", ["a", "b"], combine="mean_logits")
    up = {"a": {"logits": torch.ones(2, 3)}, "b": {"logits": 3 * torch.ones(2, 3)}}
    assert torch.equal(ens.provide({}, ["logits"], up)["logits"], 2 * torch.ones(2, 3))


def test_logits_of_accepts_common_output_types():
    t = torch.randn(2, 3)
    assert logits_of(t) is t
    assert logits_of({"logits": t}) is t

    class Out:
        logits = t

    assert logits_of(Out()) is t
