"""Analysis: metrics against hand-computed values, and predict over data sets."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from transfuse.analysis import accuracy, agreement, expected_calibration_error, flips, predict
from transfuse.data import ArrayDataset, from_datasets


def _logits(probs: list[list[float]]) -> torch.Tensor:
    return torch.tensor(probs).log()  # softmax(log p) = p


def test_ece_hand_computed():
    # 4 bins: (0, .25], (.25, .5], (.5, .75], (.75, 1].
    # Bin 4 holds confidences .9 (right) and .8 (wrong): |0.5 - 0.85| * 2/4 = 0.175.
    # Bin 3 holds .6 (right) and .7 (wrong):             |0.5 - 0.65| * 2/4 = 0.075.
    logits = _logits([[0.9, 0.1], [0.8, 0.2], [0.4, 0.6], [0.3, 0.7]])
    targets = torch.tensor([0, 1, 1, 0])
    assert expected_calibration_error(logits, targets, n_bins=4) == pytest.approx(0.25)


def test_ece_matches_a_loop_over_bins():
    gen = torch.Generator().manual_seed(0)
    logits, targets = torch.randn(500, 5, generator=gen) * 2, torch.randint(0, 5, (500,), generator=gen)
    conf, pred = logits.softmax(1).max(1)
    expected = 0.0
    for b in range(15):
        inside = (conf > b / 15) & (conf <= (b + 1) / 15)
        if inside.any():
            gap = (pred[inside] == targets[inside]).float().mean() - conf[inside].mean()
            expected += inside.float().mean().item() * abs(gap.item())
    assert expected_calibration_error(logits, targets) == pytest.approx(expected, abs=1e-6)


def test_ece_is_zero_for_confident_correct_predictions():
    logits = torch.tensor([[100.0, 0.0], [0.0, 100.0]])
    assert expected_calibration_error(logits, torch.tensor([0, 1])) == pytest.approx(0.0, abs=1e-12)


def test_accuracy_and_agreement():
    student = torch.tensor([[2.0, 1.0], [0.0, 3.0], [1.0, 0.0], [0.0, 1.0]])  # predicts 0, 1, 0, 1
    teacher = torch.tensor([[2.0, 1.0], [3.0, 0.0], [1.0, 0.0], [3.0, 0.0]])  # predicts 0, 0, 0, 0
    targets = torch.tensor([0, 1, 1, 1])
    assert accuracy(student, targets) == pytest.approx(0.75)
    assert accuracy(teacher, targets) == pytest.approx(0.25)
    assert agreement(student, teacher) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="targets must have shape"):
        accuracy(student, targets[:3])


def test_flips():
    targets = torch.tensor([0, 0, 0, 0, 0])
    before = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [0.0, 1.0]])  # right, right, wrong x3
    after = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])  # right, wrong, right, right, wrong
    result = flips(before, after, targets)
    assert result == {"positive_flips": pytest.approx(0.4), "negative_flips": pytest.approx(0.2)}
    change = accuracy(after, targets) - accuracy(before, targets)
    assert math.isclose(result["positive_flips"] - result["negative_flips"], change, abs_tol=1e-7)


class Tagged(nn.Module):
    """A linear model that returns its logits in one of three output styles."""

    def __init__(self, style: str = "tensor") -> None:
        super().__init__()
        self.linear = nn.Linear(3, 4)
        self.frozen = nn.Dropout(0.5)
        self.style = style

    def forward(self, x: torch.Tensor):
        logits = self.linear(self.frozen(x))
        if self.style == "dict":
            return {"logits": logits}
        if self.style == "object":
            return SimpleNamespace(logits=logits)
        return logits


@pytest.mark.parametrize("style", ["tensor", "dict", "object"])
def test_predict_collects_everything_in_order(style):
    data = ArrayDataset(torch.randn(10, 3), torch.arange(10) % 4)
    model = Tagged(style)
    logits, targets = predict(model, data, batch_size=3)
    assert logits.shape == (10, 4) and torch.equal(targets, data.targets)
    torch.testing.assert_close(logits, model.linear(data.inputs).detach())  # dropout was off: eval mode
    assert not logits.is_inference()  # usable outside inference mode


def test_predict_restores_each_module_mode():
    model = Tagged().train()
    model.frozen.eval()  # a submodule the caller keeps in eval mode
    predict(model, ArrayDataset(torch.randn(4, 3), torch.zeros(4)))
    assert model.training and model.linear.training and not model.frozen.training
    model.eval()
    predict(model, ArrayDataset(torch.randn(4, 3), torch.zeros(4)))
    assert not model.training


def test_predict_on_a_dataset_of_dict_samples():
    class Dicts(torch.utils.data.Dataset):
        def __len__(self):
            return 5

        def __getitem__(self, i):
            return {"input": torch.full((3,), float(i)), "target": i % 2}

    splits = from_datasets(Dicts(), Dicts(), num_classes=2, input_shape=(3,))
    logits, targets = predict(Tagged(), splits.test, batch_size=2)
    assert logits.shape == (5, 4) and targets.tolist() == [0, 1, 0, 1, 0]
