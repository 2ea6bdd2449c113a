"""selective_kd: KD from a peer only where the peer is the more reliable one."""

import math

import pytest
import torch

import transfuse.functional as TF
from transfuse.functional.selective import more_reliable, selective_kd


def test_gate_follows_the_cross_entropy_against_the_label():
    student = torch.tensor([[2.0, 0.0, 0.0], [0.0, 3.0, 0.0], [1.0, 1.0, 0.0]])
    teacher = torch.tensor([[0.0, 2.0, 0.0], [0.0, 2.0, 0.0], [1.0, 1.0, 0.0]])
    target = torch.tensor([1, 1, 0])
    # the peer is better on sample 0, worse on 1, equal on 2 (a tie teaches nothing)
    assert more_reliable(student, teacher, target).tolist() == [True, False, False]


def test_value_is_kd_on_the_selected_rows_averaged_over_all_rows():
    g = torch.Generator().manual_seed(1)
    student, teacher = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    target = torch.randint(0, 5, (6,), generator=g)
    gate = more_reliable(student, teacher, target)
    assert 0 < int(gate.sum()) < 6, "the draw must select some rows and not others"
    per_row = TF.kd(student, teacher, temperature=2.0, reduction="none")
    expected = (per_row * gate).sum() / 6
    assert torch.allclose(selective_kd(student, teacher, target, temperature=2.0), expected)
    # by hand for one row at T=1: KL(p || q)
    p, q = teacher[0].softmax(-1), student[0].softmax(-1)
    row = float((p * (p / q).log()).sum()) if gate[0] else 0.0
    assert math.isclose(float(selective_kd(student, teacher, target, reduction="none")[0]), row, rel_tol=1e-5)


def test_no_gradient_where_the_peer_is_not_more_reliable_and_none_through_the_gate():
    student = torch.tensor([[2.0, 0.0, 0.0], [0.0, 3.0, 0.0]], requires_grad=True)
    teacher = torch.tensor([[0.0, 2.0, 0.0], [0.0, 2.0, 0.0]])
    selective_kd(student, teacher, torch.tensor([1, 1])).backward()
    assert student.grad[0].abs().sum() > 0 and torch.equal(student.grad[1], torch.zeros(3))


def test_mask_drops_unlabelled_rows_whatever_their_placeholder_label():
    student, teacher = torch.randn(4, 3), torch.randn(4, 3)
    target = torch.tensor([0, -1, 2, -1])
    mask = target >= 0
    masked = selective_kd(student, teacher, target, mask=mask)
    kept = selective_kd(student[mask], teacher[mask], target[mask])
    assert torch.allclose(masked, kept)
    assert selective_kd(torch.zeros(0, 3), torch.zeros(0, 3), torch.zeros(0, dtype=torch.long)) == 0


def test_identical_peers_teach_nothing():
    z = torch.randn(5, 4)
    assert selective_kd(z, z.clone(), torch.randint(0, 4, (5,))) == 0


def test_float_targets_are_refused():
    with pytest.raises(ValueError, match="integer"):
        selective_kd(torch.randn(2, 3), torch.randn(2, 3), torch.tensor([0.0, 1.0]))


def test_collaborative_scheme_is_dml_with_selective_terms(base_config, tmp_path):
    import json

    import yaml

    from transfuse.cli import main
    from transfuse.config import config_from_dict

    del base_config["teacher"]
    base_config["participants"] = {"peer": {"name": "cnn", "options": {"channels": [4, 8]}, "trainable": True}}
    base_config["distill"] = {"method": "collaborative", "options": {"temperature": 2.0}}
    cfg = config_from_dict(base_config)
    terms = {t.name: (t.loss, t.input, t.target, t.options) for t in cfg.resolved_terms()}
    assert terms == {
        "ce_student": ("ce", "student.logits", None, {}),
        "skd_student_from_peer": ("selective_kd", "student.logits", "peer.logits", {"temperature": 2.0}),
        "ce_peer": ("ce", "peer.logits", None, {}),
        "skd_peer_from_student": ("selective_kd", "peer.logits", "student.logits", {"temperature": 2.0}),
    }
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(base_config))
    assert main(["run", str(path), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert {"loss/skd_student_from_peer", "loss/skd_peer_from_student"} <= set(rows[-1])
    assert (tmp_path / "out" / "peer.safetensors").is_file()


def test_collaborative_needs_two_trainable_peers(base_config):
    from transfuse.config import ConfigError, config_from_dict

    base_config["distill"] = {"method": "collaborative"}
    with pytest.raises(ConfigError, match="'collaborative' trains two or more participants"):
        config_from_dict(base_config)
