"""Prediction flips and `transfuse compare`: exact counts on hand-made logits, the CLI on two saved students."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import yaml
from safetensors.torch import save_file

from transfuse.analysis import compare, compare_logits, flips, prediction_flips
from transfuse.cli import main


def _one_hot_logits(classes: list[int], num_classes: int = 3) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(classes), num_classes).float() * 5.0


def test_exact_flip_counts_on_hand_made_logits():
    targets = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    before = _one_hot_logits([0, 1, 0, 1, 1, 2, 2, 0])  # right on 0, 1, 4, 5
    after = _one_hot_logits([0, 0, 2, 0, 2, 2, 1, 0])   # right on 0, 2, 3, 5
    result = prediction_flips(before, after, targets)
    # positive: wrong before, right after = samples 2, 3; negative: right before, wrong after = 1, 4.
    # Sample 6 changes class (2 -> 1) but is wrong both times; sample 7 stays wrong.
    assert result == {"samples": 8, "positive": 2, "negative": 2, "positive_rate": 0.25, "negative_rate": 0.25,
                      "changed": 5}
    assert flips(before, after, targets) == {"positive_flips": 0.25, "negative_flips": 0.25}
    reverse = prediction_flips(after, before, targets)
    assert (reverse["positive"], reverse["negative"]) == (2, 2)
    same = prediction_flips(before, before, targets)
    assert (same["positive"], same["negative"], same["changed"]) == (0, 0, 0)
    fixed = prediction_flips(before, _one_hot_logits(targets.tolist()), targets)
    assert (fixed["positive"], fixed["negative"]) == (4, 0)


def test_compare_logits_accounts_for_the_accuracy_change():
    torch.manual_seed(0)
    a, b = torch.randn(300, 5), torch.randn(300, 5)
    targets = torch.randint(5, (300,))
    report = compare_logits(a, b, targets)
    f = report["flips"]
    assert report["samples"] == 300
    assert report["b"]["accuracy"] - report["a"]["accuracy"] == pytest.approx(f["positive_rate"] - f["negative_rate"], abs=1e-6)
    assert report["agreement"] == pytest.approx(float((a.argmax(1) == b.argmax(1)).float().mean()))
    assert 0 <= report["a"]["ece"] <= 1 and 0 <= report["b"]["ece"] <= 1
    with pytest.raises(ValueError, match="differ in shape"):
        compare_logits(a, b[:, :4], targets)


def test_compare_runs_two_models_over_a_data_set():
    from transfuse.data import ArrayDataset

    torch.manual_seed(1)
    data = ArrayDataset(torch.randn(40, 6), torch.randint(3, (40,)))
    m1, m2 = torch.nn.Linear(6, 3), torch.nn.Linear(6, 3)
    report = compare(m1, m2, data, batch_size=7)
    assert report["samples"] == 40
    alone = compare(m1, m1, data)
    assert alone["agreement"] == 1.0 and alone["flips"]["changed"] == 0


@pytest.fixture
def two_students(base_config, tmp_path):
    """Two students of one config, saved by two tiny runs of different lengths."""
    from transfuse.config import config_from_dict
    from transfuse.run import run

    cfg = copy.deepcopy(base_config)
    del cfg["teacher"]
    cfg["distill"] = {"method": "none"}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    summaries = {}
    for steps in (10, 40):
        cfg["train"]["steps"] = steps
        summaries[steps] = run(config_from_dict(cfg), out_dir=tmp_path / f"s{steps}", quiet=True)
    return path, tmp_path / "s10" / "student.safetensors", tmp_path / "s40" / "student.safetensors", summaries


def test_cli_compare_two_saved_students(two_students, capsys):
    config, a, b, summaries = two_students
    assert main(["compare", str(config), str(a), str(b), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["participant"], report["model"], report["data"], report["split"]) == ("student", "mlp", "digits", "test")
    # The same numbers the runs' summaries give for their students on the test split.
    assert report["a"]["accuracy"] == pytest.approx(summaries[10]["student"]["accuracy"])
    assert report["b"]["accuracy"] == pytest.approx(summaries[40]["student"]["accuracy"])
    assert report["b"]["ece"] == pytest.approx(summaries[40]["student"]["ece"])
    assert report["a"]["weights"] == str(a)
    f = report["flips"]
    assert f["samples"] == report["samples"] and f["positive"] + f["negative"] <= f["changed"] <= f["samples"]
    assert report["b"]["accuracy"] - report["a"]["accuracy"] == pytest.approx(f["positive_rate"] - f["negative_rate"], abs=1e-6)

    assert main(["compare", str(config), str(a), str(b), "--split", "train"]) == 0
    text = capsys.readouterr().out
    assert "student (mlp) on digits train" in text and "flips A -> B: positive" in text and "agreement" in text


def test_cli_compare_errors_are_one_paragraph(two_students, tmp_path, capsys):
    config, a, b, _ = two_students
    assert main(["compare", str(config), str(a), str(b), "--participant", "peer"]) == 2
    assert "no such participant; participants: student" in capsys.readouterr().err
    pickle_file = tmp_path / "student.pt"
    torch.save({"w": torch.zeros(1)}, pickle_file)
    assert main(["compare", str(config), str(a), str(pickle_file)]) == 2
    err = capsys.readouterr().err
    assert "is not a readable safetensors file" in err and "Traceback" not in err
    other = tmp_path / "other.safetensors"
    save_file({"weight": torch.zeros(3, 3)}, str(other))
    assert main(["compare", str(config), str(other), str(b)]) == 2
    assert "does not fit this model" in capsys.readouterr().err
