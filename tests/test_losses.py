"""Contract tests for every registered loss, parametrised over the registry.

A newly registered loss is built from shapes that suit its ``inputs`` metadata and checked
for a finite, non-negative scalar, gradients that reach the student, and (unless listed
in ``NOT_ZERO_AT_EQUALITY``) a value of ~0 when student and teacher agree.
"""

from __future__ import annotations

import inspect

import pytest
import torch

from transfuse.losses import CRD, LOSSES, DistillLoss, FitNet, build_regressor
from transfuse.registry import UnknownNameError

BATCH, CLASSES, NUM_TRAIN = 8, 10, 64

#: Per-sample (student, teacher) shapes for each kind of input a method compares.
SHAPES = {"logits": ((CLASSES,), (CLASSES,)), "feature": ((16,), (32,)), "hint": ((4, 8, 8), (8, 8, 8))}

#: Losses that are not ~0 when the student equals the teacher, and why.
NOT_ZERO_AT_EQUALITY = {
    "ce": "compares with the labels, not the teacher",
    "crd": "a contrastive bound: positive > 0 even for identical embeddings",
    "fitnet": "the regressor is random at initialisation (identity case tested below)",
}

#: The papers' default weights (term weight, CE weight beside it), pinned.
DEFAULT_WEIGHTS = {
    "ce": (1.0, 0.0), "kd": (0.9, 0.1), "dkd": (1.0, 1.0), "dist": (1.0, 1.0), "fitnet": (100.0, 1.0),
    "at": (1000.0, 1.0), "sp": (3000.0, 1.0), "rkd": (1.0, 1.0), "pkt": (30000.0, 1.0), "crd": (0.8, 1.0),
}


def build(name: str, *, same_shapes: bool = False) -> DistillLoss:
    entry = LOSSES.entry(name)
    s_shape, t_shape = SHAPES[entry.meta["inputs"]]
    if same_shapes:
        t_shape = s_shape
    return entry.obj.from_shapes(
        student_shape=s_shape,
        teacher_shape=t_shape if entry.obj.uses_teacher else None,
        num_train_samples=NUM_TRAIN,
    )


def batch_for(name: str, *, same: bool = False) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, torch.Tensor]]:
    entry = LOSSES.entry(name)
    s_shape, t_shape = SHAPES[entry.meta["inputs"]]
    student = torch.randn(BATCH, *s_shape, requires_grad=True)
    teacher = student.detach().clone() if same else torch.randn(BATCH, *t_shape)  # requires_grad=False
    needs = {"target": torch.randint(CLASSES, (BATCH,)), "index": torch.randperm(NUM_TRAIN)[:BATCH]}
    return student, teacher if entry.obj.uses_teacher else None, {k: needs[k] for k in entry.obj.needs}


@pytest.mark.parametrize("name", LOSSES.names())
def test_contract_finite_nonnegative_and_differentiable(name):
    loss = build(name)
    loss.train()
    student, teacher, needs = batch_for(name)
    value = loss(student, teacher, **needs)
    assert value.dim() == 0 and torch.isfinite(value)
    assert value.item() >= -1e-6  # PKT's eps may leave it a hair below 0
    value.backward()
    assert student.grad is not None and torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0
    for p in loss.parameters():
        assert p.grad is None or torch.isfinite(p.grad).all()


@pytest.mark.parametrize("name", sorted(set(LOSSES.names()) - set(NOT_ZERO_AT_EQUALITY)))
def test_contract_zero_when_student_equals_teacher(name):
    loss = build(name, same_shapes=True)
    student, teacher, needs = batch_for(name, same=True)
    assert loss(student, teacher, **needs).abs().item() < 1e-4


def test_fitnet_identity_regressor_is_zero_at_equality():
    f = torch.randn(BATCH, 8, 4, 4)
    assert FitNet()(f, f.clone()).item() == 0.0


@pytest.mark.parametrize("name", LOSSES.names())
def test_registry_metadata(name):
    entry = LOSSES.entry(name)
    meta = entry.meta
    assert meta["kind"] in {"logits", "feature", "relation"}
    assert meta["inputs"] in {"logits", "feature", "hint"}
    assert "https://arxiv.org/abs/" in meta["paper"]
    assert entry.summary and inspect.getdoc(entry.obj)
    assert isinstance(meta["weight"], float) and meta["weight"] > 0
    assert isinstance(meta["ce_weight"], float) and meta["ce_weight"] >= 0
    assert issubclass(entry.obj, DistillLoss)
    # Options are keyword-only, so config `options` map onto them unambiguously.
    assert entry.option_names() is not None, "an explicit __init__ lets configs' options be checked at load time"
    params = [p for p in inspect.signature(entry.obj.__init__).parameters.values() if p.name != "self"]
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is not inspect.Parameter.empty for p in params)
    if name in DEFAULT_WEIGHTS:
        assert (meta["weight"], meta["ce_weight"]) == DEFAULT_WEIGHTS[name]


def test_unknown_name_lists_valid_names():
    with pytest.raises(UnknownNameError) as err:
        LOSSES.get("kdd")
    message = str(err.value)
    assert "'kd'" in message and all(name in message for name in LOSSES.names())
    with pytest.raises(ValueError, match="temperatur"):
        LOSSES.check_options("kd", {"temprature": 2.0}, where="distill.options")


def test_default_options_match_the_papers():
    assert LOSSES.get("kd")().temperature == 4.0
    dkd = LOSSES.get("dkd")()
    assert (dkd.alpha, dkd.beta, dkd.temperature) == (1.0, 8.0, 4.0)
    dist = LOSSES.get("dist")()
    assert (dist.beta, dist.gamma, dist.temperature) == (1.0, 1.0, 1.0)
    rkd = LOSSES.get("rkd")()
    assert (rkd.distance_weight, rkd.angle_weight) == (25.0, 50.0)
    assert LOSSES.get("at")().p == 2.0
    crd = CRD()
    assert (crd.feat_dim, crd.num_negatives, crd.nce_temperature, crd.momentum) == (128, 16384, 0.07, 0.5)
    assert LOSSES.get("ce").uses_teacher is False and LOSSES.get("ce").needs == ("target",)
    assert LOSSES.get("dkd").needs == ("target",) and LOSSES.get("crd").needs == ("index",)


# ---------------------------------------------------------------------------------------
# FitNets' regressor


@pytest.mark.parametrize(
    "s_shape, t_shape",
    [
        ((4, 8, 8), (8, 8, 8)),  # channels only
        ((4, 8, 8), (8, 4, 4)),  # student map larger: pooled
        ((4, 4, 4), (6, 8, 8)),  # student map smaller: upsampled
        ((4, 8, 8), (32,)),  # conv map to a flat teacher feature
        ((16,), (32,)),  # flat to flat
        ((5, 16), (5, 24)),  # tokens: a Linear on the last dim
    ],
)
def test_fitnet_regressor_maps_to_teacher_shape(s_shape, t_shape):
    loss = FitNet.from_shapes(student_shape=s_shape, teacher_shape=t_shape, num_train_samples=1)
    out = loss.regressor(torch.randn(3, *s_shape))
    assert tuple(out.shape) == (3, *t_shape)
    assert sum(p.numel() for p in loss.parameters()) > 0  # learnable, trained with the student
    assert torch.isfinite(loss(torch.randn(3, *s_shape), torch.randn(3, *t_shape)))


def test_fitnet_regressor_errors_and_relu():
    with pytest.raises(ValueError, match="no regressor"):
        build_regressor((16,), (8, 4, 4))
    with pytest.raises(ValueError, match="teacher_shape"):
        FitNet.from_shapes(student_shape=(16,), teacher_shape=None, num_train_samples=1)
    relu = FitNet.from_shapes(student_shape=(16,), teacher_shape=(8,), num_train_samples=1, relu=True)
    assert (relu.regressor(torch.randn(4, 16)) >= 0).all()


# ---------------------------------------------------------------------------------------
# CRD


def _crd(seed: int = 0, **options) -> CRD:
    torch.manual_seed(seed)
    return CRD.from_shapes(student_shape=(16,), teacher_shape=(32,), num_train_samples=NUM_TRAIN, **options)


def test_crd_builds_banks_as_checkpointed_buffers():
    loss = _crd(feat_dim=12)
    state = loss.state_dict()
    assert state["student_memory"].shape == state["teacher_memory"].shape == (NUM_TRAIN, 12)
    bound = 1 / (12 / 3) ** 0.5
    assert state["student_memory"].abs().max() <= bound
    assert {"z_student", "z_teacher"} <= set(state)
    with pytest.raises(RuntimeError, match="from_shapes"):
        CRD()(torch.randn(2, 16), torch.randn(2, 32), index=torch.tensor([0, 1]))


def test_crd_updates_memory_only_in_training():
    loss = _crd()
    s, tt, index = torch.randn(BATCH, 16), torch.randn(BATCH, 32), torch.arange(BATCH) * 3
    before = {k: v.clone() for k, v in loss.state_dict().items()}

    loss.eval()
    loss(s, tt, index=index)
    assert all(torch.equal(before[k], v) for k, v in loss.state_dict().items())

    loss.train()
    value = loss(s, tt, index=index)
    value.backward()  # the update must not break the graph built before it
    after = loss.state_dict()
    for bank in ("student_memory", "teacher_memory"):
        changed = (after[bank] != before[bank]).any(dim=1)
        assert changed[index].all() and not changed[~torch.isin(torch.arange(NUM_TRAIN), index)].any()
        assert torch.allclose(after[bank][index].norm(dim=1), torch.ones(BATCH))
    assert after["z_student"] > 0 and after["z_teacher"] > 0
    # Z is estimated once and then fixed.
    z = after["z_student"].clone()
    loss(s, tt, index=index)
    assert torch.equal(loss.z_student, z)


def test_crd_gradients_reach_heads_not_teacher_features():
    loss = _crd()
    s = torch.randn(BATCH, 16, requires_grad=True)
    tt = torch.randn(BATCH, 32, requires_grad=True)  # even a teacher that asks for gradients
    loss(s, tt.detach(), index=torch.arange(BATCH)).backward()
    assert tt.grad is None
    assert loss.embed_teacher.weight.grad.abs().sum() > 0 and loss.embed_student.weight.grad.abs().sum() > 0
    assert s.grad.abs().sum() > 0


def test_crd_is_seeded_deterministic():
    def run(seed):
        loss = _crd(seed)
        torch.manual_seed(seed + 100)
        s, tt = torch.randn(BATCH, 16), torch.randn(BATCH, 32)
        values = [loss(s, tt, index=torch.arange(BATCH) + i).item() for i in range(3)]
        return values, loss.state_dict()

    (v1, st1), (v2, st2), (v3, _) = run(0), run(0), run(1)
    assert v1 == v2 and all(torch.equal(st1[k], st2[k]) for k in st1)
    assert v1 != v3


def test_crd_clamps_negatives_to_bank_size():
    loss = CRD.from_shapes(student_shape=(4,), teacher_shape=(4,), num_train_samples=5, num_negatives=100)
    assert torch.isfinite(loss(torch.randn(3, 4), torch.randn(3, 4), index=torch.tensor([0, 1, 4])))
