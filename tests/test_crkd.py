"""Cr-KD (class-relation KD for novel class discovery), UNO's discovery loss, Sinkhorn-Knopp,
the two_views transform and Hungarian clustering accuracy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from transfuse.analysis.clustering import cluster_accuracy, cluster_mapping, novel_class_scores
from transfuse.functional.crkd import crkd, known_class_mass, sinkhorn_knopp, uno_swapped_prediction
from transfuse.losses import LOSSES
from transfuse.transforms import TRANSFORMS, make_transform

KNOWN = (0, 1, 2, 3, 4)


def official_kd(old_logits, new_logits, mask_lab, *, nlc, temperature=0.1, T=4.0):
    """An independent re-statement of the official ``KD`` (model/losses.py), for a student
    head laid out [known | novel] and an old model with the known head only; logits are
    (views, heads, B, C) as in the official code."""
    old, new = old_logits / temperature, new_logits / temperature
    preds = torch.softmax(old[:, :, ~mask_lab] / T, dim=-1)
    pseudo_logits = new[:, :, ~mask_lab]
    pseudo_preds = torch.softmax(pseudo_logits[:, :, :, :nlc] / T, dim=-1)
    weight = torch.softmax(pseudo_logits / T, dim=-1)[:, :, :, :nlc].sum(-1, keepdim=True)
    weight = weight / weight.mean()
    return (-torch.log(pseudo_preds) * preds * T**2 * weight).sum(-1).mean(dim=[0, 2])  # per head


def test_crkd_equals_the_official_formula():
    torch.manual_seed(0)
    b, c = 12, 10
    student = torch.randn(b, c) * 2
    teacher_known = torch.randn(b, 5) * 2
    labelled = torch.rand(b) < 0.5
    ours = crkd(student, teacher_known, known=KNOWN, mask=~labelled)
    ref = official_kd(teacher_known[None, None], student[None, None], labelled, nlc=5)
    assert torch.allclose(ours, ref[0], rtol=1e-5)
    # A teacher with the full head: its known columns are used; known classes need not come first.
    perm = torch.randperm(c)
    known = tuple(int(perm[k]) for k in range(5))
    student_perm = torch.empty_like(student)
    student_perm[:, perm] = student  # column perm[k] holds the official column k
    teacher_full = torch.randn(b, c)
    teacher_full[:, list(known)] = teacher_known
    assert torch.allclose(crkd(student_perm, teacher_full, known=known, mask=~labelled), ref[0], rtol=1e-5)


def test_crkd_matches_a_hand_computed_value():
    # Two unlabelled samples, 2 known + 1 novel class, T=1 and logit_temperature=1.
    s = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    t = torch.tensor([[0.0, 0.0], [0.0, 0.0]])
    value = crkd(s, t, known=(0, 1), temperature=1.0, logit_temperature=1.0)
    mass = torch.tensor([2 / 3, (np.e + 1) / (np.e + 2)])
    w = mass / mass.mean()
    ce = torch.tensor([np.log(2), -0.5 * np.log(np.e / (np.e + 1)) - 0.5 * np.log(1 / (np.e + 1))])
    assert torch.allclose(value, (ce * w).mean().float(), rtol=1e-6)


def test_the_weight_carries_gradient_and_labelled_samples_contribute_nothing():
    torch.manual_seed(1)
    student = torch.randn(8, 10, requires_grad=True)
    teacher = torch.randn(8, 10)
    labelled = torch.tensor([True, False] * 4)
    loss = crkd(student, teacher, known=KNOWN, mask=~labelled)
    loss.backward()
    assert student.grad[labelled].abs().sum() == 0 and student.grad[~labelled].abs().sum() > 0
    # The weight is not detached: the novel logits (which reach the loss only through w) get gradient.
    assert student.grad[~labelled][:, 5:].abs().sum() > 0
    assert known_class_mass(student, known=KNOWN).requires_grad
    # Labelled samples' logits do not move the value either (not even through the weight's mean).
    changed = student.detach().clone()
    changed[labelled] += 5 * torch.randn_like(changed[labelled])
    assert torch.allclose(crkd(changed, teacher, known=KNOWN, mask=~labelled), loss.detach())


def test_crkd_module_counts_only_unlabelled_samples():
    torch.manual_seed(2)
    loss = LOSSES.get("crkd").build(known=list(KNOWN))
    student, teacher = torch.randn(6, 10), torch.randn(6, 10)
    labelled = torch.tensor([True, True, False, False, True, False])
    expected = crkd(student[~labelled], teacher[~labelled], known=KNOWN)
    assert torch.allclose(loss(student, teacher, labelled=labelled), expected)
    # A term mask narrows it further.
    extra = torch.tensor([True, True, True, False, True, True])
    assert torch.allclose(loss(student, teacher, labelled=labelled, mask=extra),
                          crkd(student[[2, 5]], teacher[[2, 5]], known=KNOWN))


def test_default_hyper_parameters_are_pinned():
    spec = LOSSES.get("crkd")
    assert spec.option_defaults() == {"known": None, "temperature": 4.0, "logit_temperature": 0.1}
    assert (spec.weight, spec.ce_weight, spec.needs, spec.uses_teacher) == (0.1, 0.0, ("labelled",), True)
    uno = LOSSES.get("uno")
    assert uno.option_defaults() == {"known": None, "temperature": 0.1, "epsilon": 0.05, "iterations": 3}
    assert (uno.weight, uno.ce_weight, uno.needs, uno.uses_teacher) == (1.0, 0.0, ("labelled",), False)
    assert uno.module.optional_needs == ("target", "view")


@pytest.mark.parametrize("options, match", [
    ({"known": []}, "at least 1"), ({"known": [-1]}, "greater than or equal"), ({"temperature": 0}, "greater than"),
])
def test_bad_options_fail_at_load(options, match):
    with pytest.raises(ValueError, match=match):
        LOSSES.get("crkd").validate_options(options)


def test_bad_known_classes_fail_with_a_clear_message():
    s, t = torch.randn(4, 10), torch.randn(4, 10)
    with pytest.raises(ValueError, match="options.known is required"):
        crkd(s, t)
    with pytest.raises(ValueError, match="outside the logits' classes"):
        crkd(s, t, known=(0, 12))
    with pytest.raises(ValueError, match="twice"):
        crkd(s, t, known=(1, 1))
    with pytest.raises(ValueError, match="expected 10 .* or 3"):
        crkd(s, torch.randn(4, 7), known=(0, 1, 2))
    with pytest.raises(ValueError, match="leave at least one novel class"):
        uno_swapped_prediction(s[None], torch.zeros(4, dtype=torch.long), torch.ones(4, dtype=torch.bool),
                               known=tuple(range(10)))


def test_sinkhorn_rows_sum_to_one_and_columns_are_equipartitioned():
    torch.manual_seed(3)
    logits = torch.randn(40, 5)
    q = sinkhorn_knopp(logits, epsilon=0.5, iterations=200)
    assert torch.allclose(q.sum(1), torch.ones(40), atol=1e-5)
    assert torch.allclose(q.sum(0), torch.full((5,), 40 / 5), atol=1e-3)
    # The official three iterations: rows exact, columns close; same values as the direct form.
    q3 = sinkhorn_knopp(logits, iterations=3)
    direct = torch.exp(logits / 0.05).t()
    direct /= direct.sum()
    for _ in range(3):
        direct /= direct.sum(1, keepdim=True) * 5
        direct /= direct.sum(0, keepdim=True) * 40
    assert torch.allclose(q3, (direct * 40).t(), atol=1e-5)
    # Logits far outside [-1, 1] stay finite (the direct form overflows).
    assert torch.isfinite(sinkhorn_knopp(100 * logits)).all()
    assert sinkhorn_knopp(torch.randn(0, 5)).shape == (0, 5)


def test_uno_targets_and_swap():
    torch.manual_seed(4)
    v, b, c = 2, 8, 10
    logits = torch.randn(v, b, c, requires_grad=True)
    labelled = torch.tensor([True, False] * 4)
    target = torch.where(labelled, torch.randint(5, (b,)), torch.full((b,), -1))
    value = uno_swapped_prediction(logits, target, labelled, known=KNOWN)
    # Re-stated: view u predicts view 1-u's targets.
    novel = list(range(5, 10))
    targets = []
    for i in range(v):
        t = torch.zeros(b, c)
        t[labelled] = F.one_hot(target[labelled], c).float()
        rows = (~labelled).nonzero().flatten()
        t[rows.unsqueeze(-1), torch.tensor(novel)] = sinkhorn_knopp(logits[i].detach()[~labelled][:, novel])
        targets.append(t)
    logp = F.log_softmax(logits / 0.1, dim=-1)
    ref = (-(targets[1] * logp[0]).sum(-1) - (targets[0] * logp[1]).sum(-1)) / 2
    assert torch.allclose(value, ref.mean(), rtol=1e-5)
    value.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_uno_module_reads_views_in_blocks():
    torch.manual_seed(5)
    loss = LOSSES.get("uno").build(known=list(KNOWN))
    b = 6
    student = torch.randn(2 * b, 10)
    labelled = torch.tensor([True, False, True, False, False, True]).repeat(2)
    target = torch.where(labelled, torch.randint(5, (2 * b,)), torch.full((2 * b,), -1))
    view = torch.arange(2).repeat_interleave(b)
    got = loss(student, None, labelled=labelled, target=target, view=view)
    ref = uno_swapped_prediction(student.view(2, b, 10), target[:b], labelled[:b], known=KNOWN)
    assert torch.allclose(got, ref)
    with pytest.raises(ValueError, match="no 'target'"):
        loss(student, None, labelled=labelled)
    loss.train()
    with pytest.warns(UserWarning, match="two_views"):
        loss(student[:b], None, labelled=labelled[:b], target=target[:b])


def test_two_views_transform_repeats_entries_and_augments_each_copy():
    assert "two_views" in TRANSFORMS
    torch.manual_seed(6)
    t = make_transform("two_views", shift=1, noise_std=0.0)
    x = torch.randn(5, 1, 8, 8)
    batch = {"input": x, "target": torch.arange(5), "labelled": torch.ones(5, dtype=torch.bool)}
    out = t(batch, step=0)
    assert out["input"].shape == (10, 1, 8, 8) and out["target"].tolist() == list(range(5)) * 2
    assert out["view"].tolist() == [0] * 5 + [1] * 5
    # A shift by at most one pixel: each view's centre region is the original, moved by <= 1.
    for img, orig in zip(out["input"], x.repeat(2, 1, 1, 1)):
        assert any(torch.equal(img[0, 1:7, 1:7], orig[0, 1 + dy:7 + dy, 1 + dx:7 + dx])
                   for dy in (-1, 0, 1) for dx in (-1, 0, 1))
    with pytest.raises(ValueError, match="views must be an int >= 2"):
        make_transform("two_views", views=1)


def test_cluster_accuracy_permuted_and_hand_example():
    y = np.array([0, 0, 1, 1, 2, 2, 2])
    assert cluster_accuracy(y, np.array([7, 7, 3, 3, 5, 5, 5])) == 1.0
    # Hand example: clusters {a: [0,0,1], b: [1,2], c: [2,2]} -> a=0, b=1, c=2: 2 + 1 + 2 = 5 of 7.
    y = np.array([0, 0, 1, 1, 2, 2, 2])
    pred = np.array([0, 0, 0, 1, 1, 2, 2])
    assert cluster_mapping(y, pred) == {0: 0, 1: 1, 2: 2}
    assert cluster_accuracy(y, pred) == pytest.approx(5 / 7)
    # More clusters than classes: the unmatched cluster's samples count as wrong.
    assert cluster_accuracy([0, 0, 1, 1], [0, 1, 2, 2]) == pytest.approx(3 / 4)
    with pytest.raises(ValueError, match="same length"):
        cluster_accuracy([0, 1], [0])


def test_novel_class_scores_task_aware():
    targets = torch.tensor([0, 1, 2, 2, 3, 3])
    logits = torch.full((6, 4), -5.0)
    # Known classes 0, 1 predicted right on the known head; novel 2, 3 swapped on the novel head.
    logits[0, 0] = logits[1, 1] = 5.0
    logits[2, 3] = logits[3, 3] = logits[4, 2] = logits[5, 2] = 5.0
    scores = novel_class_scores(logits, targets, novel=[2, 3])
    assert scores["novel_cluster_accuracy"] == 1.0 and scores["known_accuracy"] == 1.0
    assert scores["all_cluster_accuracy"] == 1.0
    logits[1, 0] = 9.0  # sample of class 1 now predicted 0 on the known head
    assert novel_class_scores(logits, targets, novel=[2, 3])["known_accuracy"] == 0.5


def test_digits_run_end_to_end(tmp_path):
    from pathlib import Path

    import yaml

    from transfuse.config import config_from_dict
    from transfuse.run import run

    cfg = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / "digits" / "crkd.yaml").read_text())
    cfg["train"] = {**cfg["train"], "steps": 30, "progress": False, "checkpoint_every": 30}
    cfg["participants"]["teacher"]["train"]["steps"] = 60
    summary = run(config_from_dict(cfg, source="crkd"), out_dir=tmp_path / "run", quiet=True)
    assert summary["steps"] == 30
    parts = [json_line for json_line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if "crkd" in json_line]
    assert parts, "the crkd term was logged"
