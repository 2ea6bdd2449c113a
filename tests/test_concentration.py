"""Knowledge Concentration: the pure pieces against hand-computed values, the loss module's
per-group scales, the ``knowledge_concentration`` scheme's expansion and refusals, and a
digits run end to end."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from safetensors.torch import load_file

from transfuse import functional as TF
from transfuse.config import ConfigError, config_from_dict
from transfuse.distiller import DistillShapeError
from transfuse.losses import LOSSES
from transfuse.run import run
from transfuse.schemes import SCHEMES

GROUPS = [[0, 2, 4, 6], [5, 7, 9], [1, 3, 8]]


def _sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _bce(x: float, z: float) -> float:
    return -(z * math.log(_sig(x)) + (1 - z) * math.log(1 - _sig(x)))


# --- pure functions ---------------------------------------------------------------------


def test_top_k_keeps_the_k_most_probable_and_zeroes_the_rest():
    probs = torch.tensor([[0.1, 0.5, 0.15, 0.25], [0.4, 0.3, 0.2, 0.1]])
    assert torch.equal(TF.top_k_soft_targets(probs, top_k=2), torch.tensor([[0.0, 0.5, 0.0, 0.25], [0.4, 0.3, 0.0, 0.0]]))
    assert torch.equal(TF.top_k_soft_targets(probs, top_k=1), torch.tensor([[0.0, 0.5, 0.0, 0.0], [0.4, 0.0, 0.0, 0.0]]))
    assert torch.equal(TF.top_k_soft_targets(probs, top_k=100), probs)  # K >= C keeps everything
    with pytest.raises(ValueError, match="top_k must be an int >= 1"):
        TF.top_k_soft_targets(probs, top_k=0)


def test_sigmoid_soft_bce_equals_its_formula():
    x = torch.tensor([[0.0, math.log(3.0)], [2.0, -1.0]])
    z = torch.tensor([[0.5, 1.0], [0.2, 0.0]])
    rows = [_bce(0.0, 0.5) + _bce(math.log(3.0), 1.0), _bce(2.0, 0.2) + _bce(-1.0, 0.0)]
    assert rows[0] == pytest.approx(math.log(2) + math.log(4 / 3))  # by hand: -log(1/2) - log(3/4)
    # Summed over classes, averaged over the batch (the paper's 1/N_b).
    assert TF.sigmoid_soft_bce(x, z).item() == pytest.approx(sum(rows) / 2, rel=1e-6)
    assert TF.sigmoid_soft_bce(x, z, reduction="none").tolist() == pytest.approx(rows, rel=1e-6)
    masked = TF.sigmoid_soft_bce(x, z, mask=torch.tensor([False, True]), weights=torch.tensor([5.0, 2.0]))
    assert masked.item() == pytest.approx(2 * rows[1], rel=1e-6)


def test_self_paced_logits_normalise_then_scale_and_keep_the_argmax():
    x = torch.tensor([[3.0, 4.0], [0.0, -2.0]], requires_grad=True)
    scale = torch.tensor([5.0, 0.5], requires_grad=True)
    out = TF.self_paced_logits(x, scale)
    assert torch.allclose(out, torch.tensor([[3.0, 4.0], [0.0, -0.5]]))
    assert torch.equal(out.argmax(-1), x.argmax(-1))
    out.sum().backward()
    # d/ds of s * x/|x| summed over classes: sum(x)/|x|.
    assert scale.grad.tolist() == pytest.approx([7 / 5, -1.0])
    assert x.grad is not None and x.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="one value per position"):
        TF.self_paced_logits(x, torch.ones(3))


def test_knowledge_concentration_equals_its_formula_by_hand():
    # Student [3, 4] -> normalised [0.6, 0.8] -> times gamma 5 -> [3, 4] again; the teacher's
    # softmax of [0, ln 3] is [1/4, 3/4]; top-1 keeps z* = [0, 3/4].
    student = torch.tensor([[3.0, 4.0]])
    teacher = torch.tensor([[0.0, math.log(3.0)]])
    value = TF.knowledge_concentration(student, teacher, torch.tensor([5.0]), top_k=1)
    assert value.item() == pytest.approx(_bce(3.0, 0.0) + _bce(4.0, 0.75), rel=1e-6)
    # gamma 10 doubles the normalised logits; sigmoid teachers read sigmoid(t / T).
    value = TF.knowledge_concentration(student, teacher, torch.tensor([10.0]), top_k=2, temperature=2.0,
                                       teacher_activation="sigmoid")
    z = [_sig(0.0), _sig(math.log(3.0) / 2)]
    assert value.item() == pytest.approx(_bce(6.0, z[0]) + _bce(8.0, z[1]), rel=1e-6)
    # Without a scale: the plain logits.
    assert TF.knowledge_concentration(student, teacher, top_k=1).item() == pytest.approx(
        _bce(3.0, 0.0) + _bce(4.0, 0.75), rel=1e-6)
    with pytest.raises(ValueError, match="same shape"):
        TF.knowledge_concentration(student, torch.zeros(1, 3))


# --- the loss module ----------------------------------------------------------------------


def _loss(**options):
    return LOSSES.get("concentration").from_shapes(student_shape=(10,), teacher_shape=(10,), num_train_samples=8,
                                                   **options)


def test_gamma_starts_at_sqrt_of_each_groups_size_or_gamma_init():
    loss = _loss(groups=GROUPS)
    assert loss.gamma.tolist() == pytest.approx([2.0, math.sqrt(3), math.sqrt(3)])
    assert _loss(groups=GROUPS, gamma_init=0.5).gamma.tolist() == [0.5, 0.5, 0.5]
    assert _loss().gamma.tolist() == pytest.approx([math.sqrt(10)])  # one vertical of every class
    assert list(_loss(groups=GROUPS, self_paced=False).parameters()) == []
    # Built directly without groups, sqrt(C) is known at the first call and then kept.
    direct = LOSSES.get("concentration").build()
    direct(torch.randn(2, 10), torch.randn(2, 10), target=torch.tensor([1, 2]))
    assert direct.gamma.tolist() == pytest.approx([math.sqrt(10)])


def test_each_sample_uses_the_gamma_of_its_labels_group():
    torch.manual_seed(0)
    loss = _loss(groups=GROUPS, top_k=3)
    with torch.no_grad():
        loss.gamma.copy_(torch.tensor([1.5, 4.0, 7.0]))
    student, teacher = torch.randn(5, 10), torch.randn(5, 10)
    target = torch.tensor([6, 9, 3, 0, 7])  # groups 0, 1, 2, 0, 1
    expected = TF.knowledge_concentration(student, teacher, torch.tensor([1.5, 4.0, 7.0, 1.5, 4.0]), top_k=3)
    assert loss(student, teacher, target=target).item() == pytest.approx(expected.item(), rel=1e-6)
    # A group answered by the source (unlabelled samples) takes precedence over the label.
    group = torch.tensor([2, 2, 2, 2, 2])
    expected = TF.knowledge_concentration(student, teacher, torch.full((5,), 7.0), top_k=3)
    assert loss(student, teacher, target=target, group=group).item() == pytest.approx(expected.item(), rel=1e-6)


def test_samples_without_a_label_do_not_count():
    torch.manual_seed(1)
    loss = _loss(groups=GROUPS)
    student, teacher = torch.randn(4, 10), torch.randn(4, 10)
    target = torch.tensor([1, -1, 5, 2])
    kept = loss(student[[0, 2, 3]], teacher[[0, 2, 3]], target=target[[0, 2, 3]])
    assert loss(student, teacher, target=target).item() == pytest.approx(kept.item(), rel=1e-6)
    with pytest.raises(ValueError, match="integer class ids"):
        loss(student, teacher, target=target.float())


def test_gamma_learns_only_for_the_groups_in_the_batch():
    torch.manual_seed(0)
    loss = _loss(groups=GROUPS)
    start = loss.gamma.detach().clone()
    # Logits that already rank every sample's class first: a sharper sigmoid lowers the loss.
    target = torch.tensor([0, 2, 5, 9])  # groups 0 and 1 only
    teacher = torch.nn.functional.one_hot(target, 10).float() * 8.0
    student = teacher.clone() - 2.0
    opt = torch.optim.SGD(loss.parameters(), lr=0.5)
    losses = []
    for _ in range(20):
        opt.zero_grad()
        value = loss(student, teacher, target=target)
        value.backward()
        assert loss.gamma.grad[2].item() == 0.0  # no sample of group 2 in the batch
        opt.step()
        losses.append(value.item())
    assert (loss.gamma[:2] > start[:2] + 0.5).all() and loss.gamma[2] == start[2]
    assert losses[-1] < losses[0]


def test_groups_must_partition_the_classes_of_the_logits():
    spec = LOSSES.get("concentration")
    with pytest.raises(ValueError, match=r"class\(es\) \[1, 3, 8\] of the 10 are in no group"):
        _loss(groups=GROUPS[:2])
    with pytest.raises(ValueError, match="class 5 is in groups 1 and 2"):
        spec.build(groups=[[0], [5], [5, 6]])
    with pytest.raises(ValueError, match=r"class\(es\) \[12\] are not classes"):
        _loss(groups=[*GROUPS, [12]])
    with pytest.raises(ValueError, match="group 1 is empty"):
        spec.build(groups=[[0], []])
    with pytest.raises(ValueError, match="option 'top_k'"):
        spec.validate_options({"top_k": 0})
    with pytest.raises(ValueError, match="option 'teacher_activation'"):
        spec.validate_options({"teacher_activation": "tanh"})


def test_gamma_resumes_from_a_state_dict_and_is_not_reinitialised():
    loss = LOSSES.get("concentration").build()
    state = {"gamma": torch.tensor([9.0])}
    loss.load_state_dict(state)
    loss(torch.randn(2, 10), torch.randn(2, 10), target=torch.tensor([0, 1]))
    assert loss.gamma.tolist() == [9.0]
    assert set(_loss(groups=GROUPS).state_dict()) == {"gamma"}  # the class table is config, not state


# --- the scheme -------------------------------------------------------------------------


def _specialist(classes, **extra):
    return {"name": "mlp", "options": {"hidden": [32]}, "trainable": False,
            "train": {"steps": 150, "batch_size": 64, "optim": {"name": "adam", "lr": 0.003}, "classes": classes},
            **extra}


def _kc_config(base: dict, groups=GROUPS, **options) -> dict:
    cfg = copy.deepcopy(base)
    cfg.pop("teacher")
    cfg["participants"] = {"student": cfg.pop("student"),
                           **{f"spec_{i}": _specialist(g) for i, g in enumerate(groups)}}
    cfg["distill"] = {"method": "knowledge_concentration", "options": options}
    return cfg


def test_scheme_builds_the_routing_source_and_the_term(base_config):
    cfg = config_from_dict(_kc_config(base_config, top_k=3, gamma_init=2.0))
    terms, sources = cfg.resolved_terms(), cfg.resolved_sources()
    assert list(sources) == ["specialists"]
    assert sources["specialists"].combine == "by_class_group"
    assert sources["specialists"].members == ["spec_0", "spec_1", "spec_2"]
    assert [t.loss for t in terms] == ["concentration"]  # the paper's student learns from soft targets only
    term = terms[0]
    assert (term.input, term.target, term.weight) == ("student.logits", "specialists.logits", 1.0)
    assert term.options == {"groups": GROUPS, "top_k": 3, "temperature": 1.0, "teacher_activation": "softmax",
                            "self_paced": True, "gamma_init": 2.0}
    raw = _kc_config(base_config)
    raw["distill"].update(ce_weight=0.5, weight=2.0)
    terms = config_from_dict(raw).resolved_terms()
    assert [(t.loss, t.weight) for t in terms] == [("ce", 0.5), ("concentration", 2.0)]


def test_scheme_refuses_bad_setups(base_config):
    good = _kc_config(base_config)
    bad = copy.deepcopy(good)
    del bad["participants"]["spec_1"]["train"]["classes"]
    with pytest.raises(ConfigError, match=r"participants.spec_1.train.classes is not given"):
        config_from_dict(bad)
    bad = copy.deepcopy(good)
    bad["participants"]["spec_2"]["train"]["classes"] = [1, 3, 8, 9]
    with pytest.raises(ConfigError, match="class 9 is in the train.classes of both 'spec_1' and 'spec_2'"):
        config_from_dict(bad)
    bad = copy.deepcopy(good)
    bad["participants"] = {k: v for k, v in bad["participants"].items() if k == "student"}
    with pytest.raises(ConfigError, match="needs specialists"):
        config_from_dict(bad)
    bad = copy.deepcopy(good)
    bad["participants"]["learner"] = bad["participants"].pop("student")
    with pytest.raises(ConfigError, match="participant 'student'"):
        config_from_dict(bad)
    bad = copy.deepcopy(good)
    bad["participants"]["specialists"] = bad["participants"].pop("spec_2")
    with pytest.raises(ConfigError, match="adds a source named 'specialists'"):
        config_from_dict(bad)
    bad = copy.deepcopy(good)
    bad["distill"]["options"] = {"top_k": 0}
    with pytest.raises(ConfigError, match="top_k"):
        config_from_dict(bad)
    assert "knowledge_concentration" in SCHEMES.names()


def test_groups_that_miss_a_class_fail_before_anything_trains(base_config, tmp_path):
    cfg = config_from_dict(_kc_config(base_config, groups=GROUPS[:2]))
    with pytest.raises(DistillShapeError, match=r"in no group"):
        run(cfg, out_dir=tmp_path / "run", quiet=True)
    assert not (tmp_path / "run" / "summary.json").exists()


def test_digits_run_end_to_end_learns_gamma_and_beats_chance(base_config, tmp_path):
    raw = _kc_config(base_config)
    raw["train"].update(steps=300, checkpoint_every=300)
    summary = run(config_from_dict(raw), out_dir=tmp_path / "run", quiet=True)
    assert summary["method"] == "knowledge_concentration"
    assert set(summary["terms"]) == {"concentration"}
    # Each specialist knows only its own group; routed by label, they teach every class.
    for i, group in enumerate(GROUPS):
        assert summary["participants"][f"spec_{i}"]["accuracy"] < len(group) / 10 + 0.05
    assert summary["student"]["accuracy"] > 0.85
    state = load_file(str(tmp_path / "run" / "checkpoints" / "step-00000300" / "model.safetensors"))
    gamma = state["losses.concentration.gamma"]
    assert (gamma > torch.tensor([2.0, math.sqrt(3), math.sqrt(3)]) + 0.1).all()  # every group's scale moved up
