"""BD-KD: the student's balanced-divergence loss, its entropy-gap weights, the scheme, a tiny run."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

import transfuse.losses.online  # noqa: F401  (registers `balanced_kl` until the losses package imports it)
from transfuse.config import ConfigError, config_from_dict
from transfuse.functional.online import bdkd, bdkd_parts, bdkd_weights, entropy
from transfuse.functional import kd
from transfuse.losses import LOSSES


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def test_formula_on_hand_computed_values():
    # student q = [1/2, 1/2] (logits [0, 0]); teacher p = [3/4, 1/4] (logits [log 3, 0]).
    student = torch.tensor([[0.0, 0.0]], dtype=torch.float64)
    teacher = torch.tensor([[math.log(3.0), 0.0]], dtype=torch.float64)
    h_q = math.log(2)
    h_p = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    forward = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)  # KL(p || q)
    reverse = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)  # KL(q || p)
    w = _sigmoid(10.0 * (h_p - h_q))  # the student is less confident (h_q > h_p): mostly reverse KL
    assert w < 0.5
    assert entropy(student).item() == pytest.approx(h_q, abs=1e-12)
    assert entropy(teacher).item() == pytest.approx(h_p, abs=1e-12)
    assert bdkd_weights(student, teacher).item() == pytest.approx(w, abs=1e-12)
    f, r = bdkd_parts(student, teacher)
    assert (f.item(), r.item()) == (pytest.approx(forward, abs=1e-12), pytest.approx(reverse, abs=1e-12))
    assert bdkd(student, teacher).item() == pytest.approx(w * forward + (1 - w) * reverse, abs=1e-12)
    # Swapping the roles: now the student is the over-confident one, so the forward KL dominates.
    w_swapped = _sigmoid(10.0 * (h_q - h_p))
    assert w_swapped == pytest.approx(1 - w) and w_swapped > 0.5
    assert bdkd(teacher, student).item() == pytest.approx(w_swapped * reverse + (1 - w_swapped) * forward, abs=1e-12)


def test_temperature_scales_both_divergences_and_the_entropies():
    torch.manual_seed(0)
    s, t = torch.randn(5, 7, dtype=torch.float64), torch.randn(5, 7, dtype=torch.float64)
    T = 3.0
    w = torch.sigmoid(2.0 * (entropy(t / T) - entropy(s / T)))
    forward = kd(s, t, temperature=T, reduction="none")  # T^2 KL(p_T || q_T)
    reverse = kd(t, s, temperature=T, reduction="none")  # T^2 KL(q_T || p_T)
    expected = (w * forward + (1 - w) * reverse).mean()
    assert torch.allclose(bdkd(s, t, temperature=T, sharpness=2.0), expected, atol=1e-12)


def test_weights_lie_in_0_1_and_grow_with_the_entropy_gap():
    torch.manual_seed(1)
    s = torch.randn(400, 10) * torch.rand(400, 1) * 4
    t = torch.randn(400, 10) * torch.rand(400, 1) * 4
    w = bdkd_weights(s, t, sharpness=5.0)
    assert w.shape == (400,) and w.requires_grad is False
    assert ((w >= 0) & (w <= 1)).all()
    gap = entropy(t) - entropy(s)
    order = gap.argsort()
    assert (w[order].diff() >= 0).all(), "w must be non-decreasing in H(p) - H(q)"
    # Over-confident student (sharp q, flat p): forward KL; under-confident: reverse KL.
    sharp, flat = torch.tensor([[12.0, 0.0, 0.0]]), torch.zeros(1, 3)
    assert bdkd_weights(sharp, flat).item() > 0.999
    assert bdkd_weights(flat, sharp).item() < 0.001
    assert bdkd_weights(flat, flat).item() == 0.5
    # A sharper switch moves every weight away from 1/2, never across it.
    w_sharp = bdkd_weights(s, t, sharpness=50.0)
    assert ((w_sharp - 0.5).abs() >= (w - 0.5).abs() - 1e-6).all() and ((w_sharp - 0.5) * (w - 0.5) >= 0).all()


def test_equal_distributions_give_zero_and_the_loss_is_never_negative():
    torch.manual_seed(2)
    z = torch.randn(6, 4, 5)
    assert bdkd(z, z.clone()).abs().item() < 1e-6
    assert bdkd(z, z + 3.0).abs().item() < 1e-5  # same softmax, shifted logits
    s, t = torch.randn(64, 10) * 3, torch.randn(64, 10) * 3
    assert (bdkd(s, t, reduction="none") >= -1e-7).all()


def test_mask_weights_reduction_and_gradients():
    torch.manual_seed(3)
    s = torch.randn(6, 5, requires_grad=True)
    t = torch.randn(6, 5, requires_grad=True)
    mask = torch.tensor([True, False, True, True, False, True])
    weights = torch.rand(6) + 0.5
    per = bdkd(s, t, reduction="none")
    assert per.shape == (6,)
    value = bdkd(s, t, mask=mask, weights=weights)
    assert torch.allclose(value, (per * weights)[mask].sum() / mask.sum())
    value.backward()
    assert s.grad[~mask].abs().sum() == 0 and s.grad[mask].abs().sum() > 0
    assert bdkd(s, t, weights=torch.zeros(6)).item() == 0.0
    assert bdkd(s, t, mask=torch.zeros(6, dtype=torch.bool)).item() == 0.0
    # Sequences: per-token values, per-sample mask.
    seq_s, seq_t = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    assert bdkd(seq_s, seq_t, reduction="none").shape == (2, 3)
    assert torch.allclose(bdkd(seq_s, seq_t, mask=torch.tensor([True, False])), bdkd(seq_s[:1], seq_t[:1]))


def test_bad_inputs_are_refused():
    s, t = torch.randn(2, 3), torch.randn(2, 4)
    with pytest.raises(ValueError, match="same shape"):
        bdkd(s, t)
    with pytest.raises(ValueError, match="temperature"):
        bdkd(s, s, temperature=0.0)
    with pytest.raises(ValueError, match="sharpness"):
        bdkd(s, s, sharpness=float("inf"))
    with pytest.raises(ValueError, match="reduction"):
        bdkd(s, s, reduction="sum")


def test_registered_loss_is_the_function():
    spec = LOSSES.get("balanced_kl")
    assert (spec.weight, spec.ce_weight, spec.inputs, spec.positionwise) == (1.0, 1.0, "logits", True)
    assert "https://arxiv.org/abs/2212.12965" in spec.paper
    assert spec.option_defaults() == {"temperature": 1.0, "sharpness": 10.0}
    s, t = torch.randn(4, 6), torch.randn(4, 6)
    assert torch.equal(spec.build(sharpness=3.0)(s, t), bdkd(s, t, sharpness=3.0))
    with pytest.raises(ValueError, match="sharpness"):
        spec.validate_options({"sharpness": 0})


# ----------------------------------------------------------------------------- the scheme


def _bdkd_config(base_config: dict, **distill) -> dict:
    cfg = dict(base_config)
    teacher = dict(cfg.pop("teacher"))
    teacher.pop("train")
    teacher.pop("cache_dir")
    cfg["participants"] = {"student": cfg.pop("student"), "teacher": {**teacher, "trainable": True}}
    cfg["distill"] = {"method": "bdkd", **distill}
    return cfg


def test_scheme_wires_both_sides(base_config):
    cfg = config_from_dict(_bdkd_config(base_config, options={"temperature": 2.0, "teacher_weight": 0.5}, weight=0.7))
    terms = {t.name: t for t in cfg.resolved_terms()}
    assert list(terms) == ["ce_student", "balanced_kl", "ce_teacher", "teacher_reverse_kl"]
    student = terms["balanced_kl"]
    assert (student.loss, student.input, student.target, student.weight) == (
        "balanced_kl", "student.logits", "teacher.logits", 0.7)
    assert student.options == {"temperature": 2.0, "sharpness": 10.0}
    # The teacher's reverse KL(q || p) is kd with the roles swapped.
    rev = terms["teacher_reverse_kl"]
    assert (rev.loss, rev.input, rev.target, rev.weight, rev.options) == (
        "kd", "teacher.logits", "student.logits", 0.5, {"temperature": 2.0})
    assert terms["ce_teacher"].input == "teacher.logits" and terms["ce_student"].weight == 1.0
    no_ce = config_from_dict(_bdkd_config(base_config, ce_weight=0))
    assert [t.name for t in no_ce.resolved_terms()] == ["balanced_kl", "teacher_reverse_kl"]


def test_scheme_refuses_a_frozen_teacher_and_unknown_options(base_config):
    frozen = {**base_config, "distill": {"method": "bdkd"}}
    with pytest.raises(ConfigError, match="'student' and 'teacher' must both exist with trainable: true"):
        config_from_dict(frozen)
    with pytest.raises(ConfigError, match="it accepts: temperature, sharpness, teacher_weight"):
        config_from_dict(_bdkd_config(base_config, options={"sharpnes": 2.0}))
    with pytest.raises(ConfigError, match="sharpness"):
        config_from_dict(_bdkd_config(base_config, options={"sharpness": -1.0}))


def test_tiny_seeded_run_trains_both(base_config, tmp_path):
    from transfuse.run import run

    cfg = config_from_dict(_bdkd_config(base_config))
    summary = run(cfg, out_dir=tmp_path / "run", quiet=True)
    assert summary["steps"] == 40 and summary["method"] == "bdkd"
    assert set(summary["terms"]) == {"ce_student", "balanced_kl", "ce_teacher", "teacher_reverse_kl"}
    # the trained-together teacher is still the summary's teacher, with its agreement
    assert summary["teacher"] == summary["participants"]["teacher"] and 0 < summary["agreement"] <= 1
    for name in ("student", "teacher"):
        assert summary["participants"][name]["trainable"] is True
        assert summary["participants"][name]["accuracy"] > 0.2  # 40 steps from scratch on 10 classes
        state = load_file(tmp_path / "run" / f"{name}.safetensors")
        assert all(torch.isfinite(v).all() for v in state.values())
    run(cfg, out_dir=tmp_path / "again", quiet=True)  # seeded: the same weights again
    a, b = load_file(tmp_path / "run" / "student.safetensors"), load_file(tmp_path / "again" / "student.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
