"""HARD: the bounded affine warp, the augmentor's objective, and the hard_affine / hard_pixel transforms."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from transfuse.checkpoint import load_weights, rng_state, set_rng_state
from transfuse.config import config_from_dict
from transfuse.distiller import Distiller, Term
from transfuse.functional import AFFINE_PARAMS, affine_matrices, affine_warp, hard_objective, kd
from transfuse.hard import HardAffine, HardPixel, eval_mode
from transfuse.losses import LOSSES
from transfuse.participants import Participant
from transfuse.run import run
from transfuse.sources import CachedOutputs, Ensemble
from transfuse.transforms import TRANSFORMS, make_transform

NO_WARP = {"max_rotation": 0.0, "max_scale": 0.0, "max_shear": 0.0, "max_translate": 0.0}


def _images(b=8, seed=0, size=8):
    return torch.rand(b, 1, size, size, generator=torch.Generator().manual_seed(seed))


class _CNN(nn.Module):
    """A tiny CNN with batch norm (running statistics the transform must not touch) and global pooling."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        return self.head(F.relu(self.bn(self.conv(x))).mean(dim=(2, 3)))


def _distiller(seed=0, *, student=None):
    torch.manual_seed(seed)
    teacher = _CNN()
    student = student or nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    parts = [Participant("student", student), Participant("teacher", teacher, trainable=False)]
    return Distiller(parts, [Term("kd", LOSSES.get("kd").build())]), teacher, student


def _batch(b=8, seed=0):
    return {"input": _images(b, seed), "target": torch.arange(b) % 10, "index": torch.arange(b),
            "sample_id": torch.arange(b) + 100}


# ---------------------------------------------------------------------------------------
# The warp


def test_zero_parameters_are_the_identity():
    assert torch.equal(affine_matrices(torch.zeros(3, 5)), torch.tensor([[1.0, 0, 0], [0, 1, 0]]).expand(3, 2, 3))
    x = _images(4, size=9)
    assert torch.allclose(affine_warp(x, torch.zeros(4, 5)), x, atol=1e-6)


def test_each_column_does_what_it_says():
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    one = lambda col: torch.eye(5)[col][None]  # noqa: E731  (column ``col`` at its bound)
    # +90 degrees of rotation lands pixel centres on pixel centres: a quarter turn.
    rotated = affine_warp(x, one(0), **{**NO_WARP, "max_rotation": 90.0})
    assert torch.allclose(rotated, torch.rot90(x, 1, (2, 3)), atol=1e-5)
    # A translation of 1/4 of the side is one pixel here; the vacated column repeats the border.
    moved = affine_warp(x, one(3), **{**NO_WARP, "max_translate": 0.25})
    assert torch.allclose(moved[..., :3], x[..., 1:], atol=1e-5) and torch.allclose(moved[..., 3], x[..., 3], atol=1e-5)
    moved_y = affine_warp(x, -one(4), **{**NO_WARP, "max_translate": 0.25})
    assert torch.allclose(moved_y[..., 1:, :], x[..., :3, :], atol=1e-5)
    # Zoom and shear by the formula: [R @ [[1, h], [0, 1]] * s | 2 t].
    u = torch.tensor([[0.5, -0.5, 1.0, 0.2, -1.0]])
    theta = affine_matrices(u, max_rotation=30.0, max_scale=0.2, max_shear=0.3, max_translate=0.1)
    a, s, h = math.radians(15.0), 0.9, 0.3
    expected = torch.tensor([[math.cos(a) * s, (math.cos(a) * h - math.sin(a)) * s, 0.04],
                             [math.sin(a) * s, (math.sin(a) * h + math.cos(a)) * s, -0.2]])
    assert torch.allclose(theta[0], expected, atol=1e-6)
    assert AFFINE_PARAMS == ("rotation", "scale", "shear", "translate_x", "translate_y")


def test_parameters_outside_the_box_are_clamped_to_their_bounds():
    u = torch.randn(16, 5) * 5
    assert torch.equal(affine_matrices(u), affine_matrices(u.clamp(-1, 1)))
    x = _images(16)
    assert torch.equal(affine_warp(x, u), affine_warp(x, u.clamp(-1, 1)))


def test_the_warp_is_differentiable_in_its_parameters():
    u = torch.zeros(2, 5, requires_grad=True)
    affine_warp(_images(2), u).square().sum().backward()
    assert u.grad is not None and u.grad.abs().sum() > 0


def test_warp_refuses_bad_arguments():
    with pytest.raises(ValueError, match=r"\(B, 5\)"):
        affine_matrices(torch.zeros(2, 4))
    with pytest.raises(ValueError, match="max_scale must be < 1"):
        affine_warp(_images(2), torch.zeros(2, 5), max_scale=1.0)
    with pytest.raises(ValueError, match="max_rotation"):
        affine_warp(_images(2), torch.zeros(2, 5), max_rotation=-1.0)
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        affine_warp(torch.zeros(2, 64), torch.zeros(2, 5))
    with pytest.raises(ValueError, match="padding_mode"):
        affine_warp(_images(2), torch.zeros(2, 5), padding_mode="reflect")


# ---------------------------------------------------------------------------------------
# The objective


def test_objective_by_hand():
    s, t, t0 = torch.tensor([[0.0, 1.0]]), torch.tensor([[1.0, 0.0]]), torch.tensor([[2.0, 0.0]])
    p = [math.exp(1) / (1 + math.exp(1)), 1 / (1 + math.exp(1))]  # softmax(t)
    q = [1 / (1 + math.exp(1)), math.exp(1) / (1 + math.exp(1))]  # softmax(s)
    p0 = [math.exp(2) / (1 + math.exp(2)), 1 / (1 + math.exp(2))]  # softmax(t0)
    disagreement = sum(a * math.log(a / b) for a, b in zip(p, q))
    change = sum(a * math.log(a / b) for a, b in zip(p0, p))
    value = hard_objective(s, t, t0, lam=0.5)
    assert value.item() == pytest.approx(disagreement - 0.5 * change, rel=1e-6)
    assert hard_objective(s, t, t0, lam=0.0).item() == pytest.approx(disagreement, rel=1e-6)


def test_objective_is_two_kd_terms_with_masks_and_weights():
    g = torch.Generator().manual_seed(1)
    s, t, t0 = (torch.randn(6, 5, generator=g) for _ in range(3))
    mask, w = torch.tensor([True, True, False, True, False, True]), torch.rand(6, generator=g)
    per = kd(s, t, temperature=2.0, reduction="none") - 0.3 * kd(t, t0, temperature=2.0, reduction="none")
    got = hard_objective(s, t, t0, lam=0.3, temperature=2.0, reduction="none")
    assert torch.allclose(got, per, atol=1e-6)
    masked = hard_objective(s, t, t0, lam=0.3, temperature=2.0, mask=mask, weights=w)
    assert torch.allclose(masked, (per * w)[mask].sum() / mask.sum(), atol=1e-6)
    assert hard_objective(t, t, t, lam=1.0).abs().item() < 1e-6  # no disagreement, no change
    with pytest.raises(ValueError, match="lam"):
        hard_objective(s, t, t0, lam=-1.0)
    with pytest.raises(ValueError, match="same shape"):
        hard_objective(s, t, t0[:3])
    with pytest.raises(ValueError, match="reduction"):
        hard_objective(s, t, t0, reduction="sum")


# ---------------------------------------------------------------------------------------
# The transforms


def _objective(transform, x, params, teacher, student):
    with torch.no_grad(), eval_mode(teacher, student):
        moved = transform.augment(x, params)
        return hard_objective(student(moved), teacher(moved), teacher(x), lam=transform.lam, reduction="none")


@pytest.mark.parametrize("name", ["hard_affine", "hard_pixel"])
def test_the_ascent_increases_the_objective_and_stays_in_the_box(name):
    _, teacher, student = _distiller()
    x = _images(16, seed=3)
    t = make_transform(name, steps=5, random_start=False)
    start = t.start(x)
    params = t.search(x, teacher, student)
    assert params.abs().max() <= 1.0 and not params.requires_grad
    before = _objective(t, x, start, teacher, student)
    after = _objective(t, x, params, teacher, student)
    assert after.sum() > before.sum() + 1e-3
    assert (after >= before - 1e-5).all(), "each sample keeps its best iterate, the start included"
    # ...and more than a random augmentation inside the same box does.
    torch.manual_seed(0)
    random = _objective(t, x, torch.rand_like(params) * 2 - 1, teacher, student)
    assert after.sum() > random.sum()


def test_teacher_validity_term_holds_the_teacher_back():
    _, teacher, student = _distiller()
    x = _images(16, seed=4)
    change = {}
    for lam in (0.0, 100.0):
        t = make_transform("hard_pixel", eps=2.0, steps=8, lam=lam, random_start=False)
        params = t.search(x, teacher, student)
        with torch.no_grad():
            change[lam] = kd(teacher(t.augment(x, params)), teacher(x), temperature=1.0).item()
    assert change[100.0] < change[0.0]


def test_no_gradient_is_left_and_modes_and_running_stats_are_restored():
    bn_student = _CNN()
    d, teacher, student = _distiller(student=bn_student)
    student.train()
    student.bn.eval()  # a submodule deliberately in eval stays in eval
    stats = [b.clone() for b in student.bn.buffers()] + [b.clone() for b in teacher.bn.buffers()]
    out = make_transform("hard_affine", steps=3)(_batch(), step=0, distiller=d)
    assert all(p.grad is None for p in [*teacher.parameters(), *student.parameters()])
    assert student.training and student.conv.training and not student.bn.training and not teacher.training
    assert all(torch.equal(a, b) for a, b in zip(stats, [*student.bn.buffers(), *teacher.bn.buffers()]))
    assert not out["input"].requires_grad
    assert all(p.requires_grad for p in student.parameters()), "the student stays trainable"


@pytest.mark.parametrize("name", ["hard_affine", "hard_pixel"])
def test_only_the_chosen_share_changes_and_the_bookkeeping_stays(name):
    d, _, _ = _distiller()
    batch = _batch(10)
    out = make_transform(name, share=0.3)(batch, step=0, distiller=d)
    aug = out["augmented"]
    assert aug.dtype == torch.bool and aug.sum().item() == 3
    assert torch.equal(out["input"][~aug], batch["input"][~aug])
    assert not torch.equal(out["input"][aug], batch["input"][aug])
    for key in ("target", "index", "sample_id"):
        assert torch.equal(out[key], batch[key])
    if name == "hard_pixel":
        assert (out["input"] - batch["input"]).abs().max() <= 0.1 + 1e-6  # the L-inf ball of eps = 0.1
    none = make_transform(name, share=0.0)(batch, step=0, distiller=d)
    assert torch.equal(none["input"], batch["input"]) and not none["augmented"].any()


def test_deterministic_under_a_seed_and_resumes_from_the_rng_state():
    d, _, _ = _distiller()
    t = make_transform("hard_affine", steps=2)
    torch.manual_seed(5)
    first = t(_batch(seed=1), step=0, distiller=d)
    saved = rng_state()  # what a checkpoint holds
    second = t(_batch(seed=2), step=1, distiller=d)
    torch.manual_seed(5)
    again = t(_batch(seed=1), step=0, distiller=d)
    assert torch.equal(first["input"], again["input"]) and torch.equal(first["augmented"], again["augmented"])
    torch.manual_seed(99)  # a resumed process starts elsewhere, then loads the checkpoint's RNG
    set_rng_state(saved)
    resumed = t(_batch(seed=2), step=1, distiller=d)
    assert torch.equal(second["input"], resumed["input"])


def test_bad_options_fail_clearly():
    assert TRANSFORMS.get("hard_affine") is HardAffine and TRANSFORMS.get("hard_pixel") is HardPixel
    for options, match in (
        ({"steps": -1}, "steps"), ({"steps": 1.5}, "steps"), ({"share": 1.5}, "share"), ({"lam": -0.1}, "lam"),
        ({"step_size": 0.0}, "step_size"), ({"temperature": 0.0}, "temperature"), ({"max_scale": 1.0}, "max_scale"),
        ({"max_translate": -0.1}, "max_translate"), (NO_WARP, "every bound"), ({"padding_mode": "wrap"}, "padding_mode"),
        ({"teacher": "student"}, "two participants"), ({"steps": 0, "random_start": False}, "random_start"),
        ({"random_start": "yes"}, "random_start"),
    ):
        with pytest.raises(ValueError, match=match):
            make_transform("hard_affine", **options)
    with pytest.raises(ValueError, match="eps"):
        make_transform("hard_pixel", eps=0.0)
    with pytest.raises(ValueError, match="has no option.*eps"):
        make_transform("hard_affine", eps=0.1)
    with pytest.raises(Exception, match="steps"):  # at config load, naming the option
        config_from_dict({"name": "x", "data": {"name": "digits"}, "student": {"name": "mlp"},
                          "transforms": [{"name": "hard_affine", "options": {"steps": -2}}]})


def test_what_the_transform_cannot_augment_is_refused():
    d, teacher, student = _distiller()
    with pytest.raises(ValueError, match="distiller"):
        make_transform("hard_pixel")(_batch(), step=0)
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        make_transform("hard_affine")({"input": torch.rand(4, 64)}, step=0, distiller=d)
    with pytest.raises(ValueError, match="float 'input'"):
        make_transform("hard_pixel")({"input": torch.arange(4)}, step=0, distiller=d)
    with pytest.raises(ValueError, match="'mentor' is not a source.*participants: student, teacher"):
        make_transform("hard_pixel", teacher="mentor")(_batch(), step=0, distiller=d)

    class _Run:  # a teacher answered from disk by sample id would label the original samples
        sources = {"student": Participant("student", student), "teacher": CachedOutputs("teacher", cache=None)}

    with pytest.raises(ValueError, match="teacher-output cache"):
        make_transform("hard_affine")(_batch(), step=0, distiller=_Run())

    class _Ensembled:
        sources = {"student": Participant("student", student), "t1": Participant("t1", teacher, trainable=False),
                   "teacher": Ensemble("teacher", ["t1"])}

    with pytest.raises(ValueError, match="is a Ensemble, not a model"):
        make_transform("hard_affine")(_batch(), step=0, distiller=_Ensembled())


# ---------------------------------------------------------------------------------------
# End to end


def test_a_run_with_hard_affine_end_to_end(base_config, tmp_path):
    base_config["teacher"] = {
        "name": "cnn", "options": {"channels": [8]}, "cache_dir": base_config["teacher"]["cache_dir"],
        "train": {"steps": 60, "batch_size": 64, "optim": {"name": "adam", "lr": 0.01}},
    }
    base_config["transforms"] = [{"name": "hard_affine", "options": {"steps": 2, "share": 0.5}}]
    base_config["train"].update(steps=20, checkpoint_every=10)
    summary = run(config_from_dict(base_config), out_dir=tmp_path / "a", quiet=True)
    assert summary["steps"] == 20 and math.isfinite(summary["student"]["accuracy"])
    rows = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert rows and all(math.isfinite(r.get("loss", 0.0)) for r in rows)
    # Resumed from the step-10 checkpoint, the run ends where the uninterrupted one did (RNG restored).
    part = tmp_path / "part"
    shutil.copytree(tmp_path / "a", part)
    shutil.rmtree(part / "checkpoints" / "step-00000020")
    for leftover in ("summary.json", "student.safetensors"):
        (part / leftover).unlink()
    run(config_from_dict(base_config), out_dir=part, resume=True, quiet=True)
    full, resumed = load_weights(tmp_path / "a" / "student.safetensors"), load_weights(part / "student.safetensors")
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    # The augmentation changed what the student learned from.
    plain = dict(base_config, transforms=[])
    baseline = run(config_from_dict(plain), out_dir=tmp_path / "plain", quiet=True)
    assert baseline["student"] != summary["student"]
