"""Contract tests for every registered loss, parametrised over the registry.

A newly registered loss is built from shapes that suit its ``inputs`` and checked for a
finite, non-negative scalar, gradients that reach the student, the mask/weights contract
of its family (position-wise or batch-relation), and (unless listed in
``NOT_ZERO_AT_EQUALITY``) a value of ~0 when student and teacher agree.
"""

from __future__ import annotations

import copy
import inspect
import pickle

import pytest
import torch

from transfuse import functional as TF
from transfuse.functional import Temperature
from transfuse.losses import (
    CRD,
    LOSSES,
    DistillLoss,
    FitNet,
    FunctionLoss,
    LossSpec,
    ScheduleDefault,
    build_regressor,
    describe_losses,
    register_loss,
)
from transfuse.registry import Registry, UnknownNameError

BATCH, CLASSES, NUM_TRAIN = 8, 10, 64

#: Per-sample (student, teacher) shapes for each kind of input a method compares.
SHAPES = {"logits": ((CLASSES,), (CLASSES,)), "feature": ((16,), (32,)), "hint": ((4, 8, 8), (8, 8, 8)), "map": ((4, 4, 4), (8, 4, 4))}

#: Losses that are not ~0 when the student equals the teacher, and why.
NOT_ZERO_AT_EQUALITY = {
    "mixkd": "its term includes the CE with the (mixed) labels",
    "ce": "compares with the labels, not the teacher",
    "crd": "a contrastive bound: positive > 0 even for identical embeddings",
    "fitnet": "the regressor is random at initialisation (identity case tested below)",
    "label_only": "hard labels carry no confidence: CE against the student's own argmax is > 0",
    "crkd": "the official cross-entropy form: the teacher's entropy, times the learnable weight, remains",
    "uno": "reads no teacher: swapped prediction against Sinkhorn pseudo-labels",
    "meta_dmoe_inner": "the target is the aggregator's transformation of the teacher feature",
    "concentration": "a cross-entropy against top-K soft targets: the teacher's entropy remains",
    "tgeo": "its per-sample fusion includes the cross-entropy with the labels",
    "trg": "its InfoNCE is > 0 even for identical tokens, and the projection is random",
    "scalekd": "the projectors are random at initialisation",
}

#: Options a loss cannot be built without (the known classes of a novel-class-discovery loss).
REQUIRED_OPTIONS = {"crkd": {"known": [0, 1, 2, 3, 4]}, "uno": {"known": [0, 1, 2, 3, 4]}}

#: The papers' default weights (term weight, CE weight beside it) and inputs, pinned.
DEFAULTS = {
    "ce": (1.0, 0.0, "logits"), "kd": (0.9, 0.1, "logits"), "dkd": (1.0, 1.0, "logits"),
    "dist": (2.0, 1.0, "logits"), "dist_t4": (2.0, 1.0, "logits"),
    "selective_kd": (1.0, 1.0, "logits"), "balanced_kl": (1.0, 1.0, "logits"), "fitnet": (100.0, 1.0, "hint"), "at": (1000.0, 1.0, "hint"),
    "sp": (3000.0, 1.0, "map"), "rkd": (1.0, 1.0, "feature"), "pkt": (30000.0, 1.0, "feature"),
    "crd": (0.8, 1.0, "feature"), "label_only": (1.0, 0.0, "logits"),
    "taid": (1.0, 0.0, "logits"), "ctkd": (0.9, 0.1, "logits"), "mixkd": (1.0, 0.0, "logits"),
    "crkd": (0.1, 0.0, "logits"), "uno": (1.0, 0.0, "logits"),
    "meta_dmoe_inner": (1.0, 0.0, "feature"), "concentration": (1.0, 0.0, "logits"), "tgeo": (1.0, 0.0, "logits"),
    "trg": (1.0, 1.0, "map"), "scalekd": (1.0, 1.0, "map"),
    **{name: (1.0, 0.0, "logits") for name in ("fkl", "rkl", "tvd", "jsd", "skew_fkl", "skew_rkl", "adaptive_kl",
                                                "sampled_rkl", "minillm")},
}

#: Batch-relation losses (a mask selects samples, weights are refused); the rest are position-wise.
BATCH_RELATION = {"dist", "dist_t4", "sp", "rkd", "pkt", "crd", "trg"}


def build(name: str, *, same_shapes: bool = False) -> DistillLoss:
    spec = LOSSES.get(name)
    s_shape, t_shape = SHAPES[spec.inputs]
    if same_shapes:
        t_shape = s_shape
    return spec.from_shapes(
        student_shape=s_shape,
        teacher_shape=t_shape if spec.uses_teacher else None,
        num_train_samples=NUM_TRAIN,
        **REQUIRED_OPTIONS.get(name, {}),
    )


def batch_for(name: str, *, same: bool = False) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, torch.Tensor]]:
    spec = LOSSES.get(name)
    s_shape, t_shape = SHAPES[spec.inputs]
    student = torch.randn(BATCH, *s_shape, requires_grad=True)
    teacher = student.detach().clone() if same else torch.randn(BATCH, *t_shape)  # requires_grad=False
    if getattr(spec.module, "target_field", None) == "labels":  # a label-only teacher answers class ids
        teacher = teacher.argmax(-1)
    # labelled: all False, so losses about unlabelled samples (crkd, uno) count every sample.
    needs = {"target": torch.randint(CLASSES, (BATCH,)), "index": torch.randperm(NUM_TRAIN)[:BATCH],
             "labelled": torch.zeros(BATCH, dtype=torch.bool)}
    return student, teacher if spec.uses_teacher else None, {k: needs[k] for k in spec.needs}


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


@pytest.mark.parametrize("name", LOSSES.names())
def test_contract_teacher_that_requires_grad(name):
    # A teacher tensor that asks for gradients (a trainable peer's output) still gives a
    # finite student gradient; detaching the teacher is the caller's business.
    torch.manual_seed(0)
    loss = build(name)
    student, teacher, needs = batch_for(name)
    if teacher is not None and teacher.is_floating_point():  # class ids (label_only) carry no gradient
        teacher = teacher.clone().requires_grad_(True)
    loss(student, teacher, **needs).backward()
    assert student.grad is not None and torch.isfinite(student.grad).all()


@pytest.mark.parametrize("name", sorted(set(LOSSES.names()) - set(NOT_ZERO_AT_EQUALITY)))
def test_contract_zero_when_student_equals_teacher(name):
    loss = build(name, same_shapes=True)
    student, teacher, needs = batch_for(name, same=True)
    assert loss(student, teacher, **needs).abs().item() < 1e-4


@pytest.mark.parametrize("name", LOSSES.names())
def test_contract_mask_and_weights(name):
    torch.manual_seed(0)
    loss = build(name)
    loss.eval()  # CRD: leave the banks alone, so the masked and the sliced call see the same state
    student, teacher, needs = batch_for(name)
    mask = torch.tensor([True, False] * (BATCH // 2))
    spec = LOSSES.get(name)
    if spec.positionwise:
        weights = torch.rand(BATCH) + 0.5
        value = loss(student, teacher, mask=mask, weights=weights, **needs)
        assert value.dim() == 0 and torch.isfinite(value) and value.item() >= -1e-6
        value.backward()
        assert torch.isfinite(student.grad).all()
        # Masked-out samples receive no gradient; weights of 0 give 0.
        assert student.grad[~mask].abs().sum() == 0  # eval mode: no BatchNorm batch statistics couple samples
        zero = loss(student, teacher, weights=torch.zeros(BATCH), **needs)
        assert zero.item() == 0.0
    else:
        with pytest.raises(ValueError, match="batch-relation"):
            loss(student, teacher, weights=torch.ones(BATCH), **needs)
        sliced_needs = {k: v[mask] for k, v in needs.items()}
        torch.manual_seed(1)
        masked = loss(student, teacher, mask=mask, **needs)
        torch.manual_seed(1)
        sliced = loss(student[mask], teacher[mask], **sliced_needs)
        assert torch.allclose(masked, sliced)
    # Nothing kept: a zero that still backpropagates.
    nothing = loss(student, teacher, mask=torch.zeros(BATCH, dtype=torch.bool), **needs)
    assert nothing.item() == 0.0
    nothing.backward()


def test_fitnet_identity_regressor_is_zero_at_equality():
    f = torch.randn(BATCH, 8, 4, 4)
    assert FitNet()(f, f.clone()).item() == 0.0


# ---------------------------------------------------------------------------------------
# Registration metadata


@pytest.mark.parametrize("name", LOSSES.names())
def test_registry_metadata(name):
    entry = LOSSES.entry(name)
    spec = entry.obj
    assert isinstance(spec, LossSpec) and LOSSES.get(name) is spec and spec.name == name
    assert spec.kind in {"logits", "feature", "relation"}
    assert spec.inputs in {"logits", "feature", "hint", "map"}
    assert "https://arxiv.org/abs/" in spec.paper
    assert spec.summary and entry.summary == spec.summary and inspect.getdoc(spec.module)
    assert isinstance(spec.weight, float) and spec.weight > 0
    assert isinstance(spec.ce_weight, float) and spec.ce_weight >= 0
    assert issubclass(spec.module, DistillLoss)
    # Only DKD has a default schedule: its official warm-up over the first 1/12 of training.
    assert spec.schedule == (ScheduleDefault("warmup", fraction=1 / 12) if name == "dkd" else None)
    assert spec.positionwise == (name not in BATCH_RELATION)
    # The module agrees with its spec (the Distiller reads these from the module).
    assert (spec.module.needs, spec.module.uses_teacher, spec.module.positionwise) == (
        spec.needs, spec.uses_teacher, spec.positionwise,
    )
    if spec.fn is not None:
        assert issubclass(spec.module, FunctionLoss) and spec.module.fn is spec.fn
        assert getattr(TF, spec.fn.__name__) is spec.fn  # the pure function is public
    # Options are keyword-only with defaults, so config `options` map onto them unambiguously.
    assert entry.option_names() == spec.option_names() == set(spec.options_model().model_fields)
    source = spec.fn if spec.fn is not None else spec.module.__init__
    params = [p for p in inspect.signature(source).parameters.values() if p.name in spec.option_names()]
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is not inspect.Parameter.empty for p in params)
    # A named setting (dist_t4) overrides some of its function's defaults; nothing else does.
    named_settings = {"dist_t4": {"temperature": 4.0}}
    assert spec.option_defaults() == {p.name: p.default for p in params} | named_settings.get(name, {})
    assert (spec.weight, spec.ce_weight, spec.inputs) == DEFAULTS[name]


def test_every_registered_loss_is_pinned():
    assert set(LOSSES.names()) == set(DEFAULTS)


def test_describe_losses():
    rows = {row["name"]: row for row in describe_losses()}
    assert list(rows) == LOSSES.names()
    kd = rows["kd"]
    assert (kd["kind"], kd["inputs"], kd["weight"], kd["ce_weight"]) == ("logits", "logits", 0.9, 0.1)
    assert kd["paper"].endswith("https://arxiv.org/abs/1503.02531") and kd["description"]
    assert kd["needs"] == [] and kd["uses_teacher"] is True and kd["positionwise"] is True and kd["schedule"] is None
    assert "temperature" in kd["options"] and "> 0" in kd["options"]["temperature"]
    assert rows["ce"]["uses_teacher"] is False and rows["ce"]["needs"] == ["target"]
    assert rows["crd"]["needs"] == ["index", "target"] and rows["crd"]["positionwise"] is False
    import json

    json.dumps(list(rows.values()))  # plain data


def test_unknown_name_lists_valid_names():
    with pytest.raises(UnknownNameError) as err:
        LOSSES.get("kdd")
    message = str(err.value)
    assert "'kd'" in message and all(name in message for name in LOSSES.names())
    with pytest.raises(ValueError, match="temperatur"):
        LOSSES.check_options("kd", {"temprature": 2.0}, where="distill.options")


# ---------------------------------------------------------------------------------------
# Option values, validated from the typed signatures


@pytest.mark.parametrize(
    "name, options, bad",
    [
        ("kd", {"temperature": 0}, "temperature"),
        ("kd", {"temperature": -1.0}, "temperature"),
        ("kd", {"temperature": float("inf")}, "temperature"),
        ("kd", {"temperature": float("nan")}, "temperature"),
        ("kd", {"temperature": True}, "temperature"),
        ("dkd", {"beta": -0.5}, "beta"),
        ("dkd", {"alpha": float("inf")}, "alpha"),
        ("dist", {"gamma": -1}, "gamma"),
        ("ce", {"label_smoothing": 1.0}, "label_smoothing"),
        ("ce", {"label_smoothing": -0.1}, "label_smoothing"),
        ("at", {"p": 0}, "p"),
        ("pkt", {"eps": 0.0}, "eps"),
        ("rkd", {"angle_weight": -1}, "angle_weight"),
        ("crd", {"momentum": 1.5}, "momentum"),
        ("crd", {"feat_dim": 0}, "feat_dim"),
        ("crd", {"num_negatives": 2.5}, "num_negatives"),
        ("fitnet", {"relu": "maybe"}, "relu"),
    ],
)
def test_option_values_are_validated(name, options, bad):
    with pytest.raises(ValueError) as err:
        LOSSES.check_options(name, options, where="distill.options")
    message = str(err.value)
    assert message.startswith("distill.options: ") and f"'{bad}'" in message
    assert repr(options[bad]) in message  # the bad value
    assert "accepts" in message and all(opt in message for opt in LOSSES.get(name).option_names())
    with pytest.raises(ValueError, match=bad):
        LOSSES.get(name).build(**options) if name not in {"crd"} else LOSSES.get(name).from_shapes(
            student_shape=(4,), teacher_shape=(4,), num_train_samples=4, **options
        )


def test_option_errors_name_the_constraint_and_list_accepted_options():
    with pytest.raises(ValueError, match=r"'temperature' = 0: input should be greater than 0") as err:
        LOSSES.check_options("kd", {"temperature": 0}, where="distill.options")
    assert "temperature (float > 0, finite; default 4.0)" in str(err.value)
    with pytest.raises(ValueError, match="finite number"):
        LOSSES.check_options("kd", {"temperature": float("inf")}, where="distill.options")
    with pytest.raises(ValueError, match=r"distill.options: loss 'dkd' has no option\(s\) 'gamma'; it accepts: ") as err:
        LOSSES.check_options("dkd", {"gamma": 1.0}, where="distill.options")
    assert all(opt in str(err.value) for opt in ("alpha", "beta", "temperature"))
    with pytest.raises(ValueError, match="has no option"):
        LOSSES.check_options("sp", {"eps": 1.0}, where="options")


def test_valid_options_are_converted_and_build():
    spec = LOSSES.get("kd")
    assert spec.validate_options({"temperature": 2}) == {"temperature": 2.0}
    assert spec.validate_options({}) == {}
    LOSSES.check_options("kd", {"temperature": 2}, where="options")
    LOSSES.check_options("dkd", {"beta": 0}, where="options")  # 0 switches a term off: allowed
    LOSSES.check_options("pkt", {"eps": "1e-7"}, where="options")  # YAML 1.1 reads 1e-7 as a string


def test_other_registries_still_check_names_only():
    models = Registry("model")

    @models.register("mlp")
    def mlp(*, hidden: int = 3): ...

    models.check_options("mlp", {"hidden": -5}, where="student.options")  # values are the component's business
    with pytest.raises(ValueError, match=r"student.options: model 'mlp' has no option\(s\) 'hiden'"):
        models.check_options("mlp", {"hiden": 3}, where="student.options")


def test_default_options_match_the_papers():
    assert LOSSES.get("kd").build().temperature == 4.0
    dkd = LOSSES.get("dkd").build()
    assert (dkd.alpha, dkd.beta, dkd.temperature) == (1.0, 8.0, 4.0)
    dist = LOSSES.get("dist").build()
    assert (dist.beta, dist.gamma, dist.temperature) == (1.0, 1.0, 1.0)  # official ImageNet setting
    dist_t4 = LOSSES.get("dist_t4").build()
    assert (dist_t4.beta, dist_t4.gamma, dist_t4.temperature) == (1.0, 1.0, 4.0)  # official CIFAR-100 setting
    assert LOSSES.get("dist_t4").build(temperature=2.0).temperature == 2.0
    rkd = LOSSES.get("rkd").build()
    assert (rkd.distance_weight, rkd.angle_weight) == (25.0, 50.0)
    assert LOSSES.get("at").build().p == 2.0
    assert LOSSES.get("pkt").build().eps == 1e-7
    assert LOSSES.get("ce").build().label_smoothing == 0.0
    crd = CRD()
    assert (crd.feat_dim, crd.num_negatives, crd.nce_temperature, crd.momentum) == (128, 16384, 0.07, 0.5)
    assert crd.negatives == "exact"
    assert LOSSES.get("ce").uses_teacher is False and LOSSES.get("ce").needs == ("target",)
    assert LOSSES.get("dkd").needs == ("target",) and LOSSES.get("crd").needs == ("index", "target")


# ---------------------------------------------------------------------------------------
# Function losses: the module is the function, bit for bit


def test_function_modules_equal_their_functions():
    torch.manual_seed(0)
    s, tt, y = torch.randn(6, 5), torch.randn(6, 5), torch.randint(5, (6,))
    kd = LOSSES.get("kd").build(temperature=2.0)
    assert torch.equal(kd(s, tt), TF.kd(s, tt, temperature=2.0))
    dkd = LOSSES.get("dkd").build(beta=2.0)
    assert torch.equal(dkd(s, tt, target=y), TF.dkd(s, tt, y, beta=2.0))
    ce = LOSSES.get("ce").build(label_smoothing=0.1)
    assert torch.equal(ce(s, None, target=y), torch.nn.functional.cross_entropy(s, y, label_smoothing=0.1))
    assert torch.equal(LOSSES.get("dist").build()(s, tt), TF.dist(s, tt))
    assert torch.equal(LOSSES.get("rkd").build()(s, tt), TF.rkd(s, tt))
    mask = torch.tensor([True, True, False, True, False, True])
    assert torch.equal(kd(s, tt, mask=mask), TF.kd(s, tt, temperature=2.0, mask=mask))
    # Options are attributes, read at each call, and shown by repr.
    kd.temperature = 3.0
    assert torch.equal(kd(s, tt), TF.kd(s, tt, temperature=3.0))
    assert repr(dkd) == "DkdLoss(alpha=1.0, beta=2.0, temperature=4.0)"
    with pytest.raises(TypeError, match="target"):
        dkd(s, tt)
    with pytest.raises(ValueError, match="has no option"):
        LOSSES.get("kd").module(temprature=2.0)  # the module validates when built directly too


def test_function_modules_pickle_and_copy():
    kd = LOSSES.get("kd").build(temperature=2.5)
    for clone in (pickle.loads(pickle.dumps(kd)), copy.deepcopy(kd)):
        assert type(clone) is type(kd) and clone.temperature == 2.5


def test_register_an_in_house_loss_from_a_function():
    def l1_probs(
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        *,
        temperature: Temperature = 2.0,
        mask: torch.Tensor | None = None,
        weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """L1 distance between the softened predictions, per row; mean over rows."""
        per_row = (torch.softmax(student_logits / temperature, -1) - torch.softmax(teacher_logits / temperature, -1))
        return TF.reduce_positions(per_row.abs().sum(-1), mask=mask, weights=weights)

    spec = register_loss(l1_probs, name="l1_probs", kind="logits", summary="L1 between softened predictions")
    try:
        assert LOSSES.get("l1_probs") is spec and spec.paper is None and spec.fn is l1_probs
        assert spec.option_names() == {"temperature"}
        s, tt = torch.randn(4, 3, requires_grad=True), torch.randn(4, 3)
        value = spec.build(temperature=4.0)(s, tt)
        value.backward()
        assert torch.isfinite(value) and s.grad.abs().sum() > 0
        assert spec.build()(tt, tt).item() == 0.0
        with pytest.raises(ValueError, match="'temperature' = -1"):
            LOSSES.check_options("l1_probs", {"temperature": -1}, where="distill.options")
        assert "l1_probs" in {row["name"] for row in describe_losses()}
        with pytest.raises(ValueError, match="registered twice"):
            register_loss(l1_probs, name="l1_probs", kind="logits", summary="again")
    finally:
        LOSSES.unregister("l1_probs")
    assert "l1_probs" not in LOSSES


def test_register_loss_as_a_decorator_and_its_checks():
    @register_loss(name="tmp_decorated", kind="logits", summary="a decorated function", schedule=ScheduleDefault("warmup", fraction=0.1))
    def tmp(s, t, *, mask=None, weights=None):
        return TF.reduce_positions((s - t).pow(2).sum(-1), mask=mask, weights=weights)

    try:
        assert callable(tmp) and LOSSES.get("tmp_decorated").fn is tmp  # the decorator returns the function
        assert LOSSES.get("tmp_decorated").schedule == ScheduleDefault("warmup", fraction=0.1)
        row = {r["name"]: r for r in describe_losses()}["tmp_decorated"]
        assert row["schedule"] == {"kind": "warmup", "fraction": 0.1, "options": {}}
    finally:
        LOSSES.unregister("tmp_decorated")

    def no_mask(s, t, *, scale: float = 1.0):
        return (s - t).sum() * scale

    with pytest.raises(TypeError, match="mask"):
        register_loss(no_mask, name="tmp_bad", kind="logits", summary="x")

    def no_default(s, t, *, scale: float, mask=None, weights=None):
        return (s - t).sum() * scale

    with pytest.raises(TypeError, match="default"):
        register_loss(no_default, name="tmp_bad", kind="logits", summary="x")

    def bad_default(s, t, *, temperature: Temperature = 0.0, mask=None, weights=None):
        return (s - t).sum()

    with pytest.raises(TypeError, match="constraint"):
        register_loss(bad_default, name="tmp_bad", kind="logits", summary="x")
    with pytest.raises(ValueError, match="kind"):
        register_loss(TF.kd, name="tmp_bad", kind="logit", summary="x")
    with pytest.raises(ValueError, match="declares"):
        register_loss(CRD, name="tmp_bad", kind="relation", summary="x")  # needs/positionwise disagree
    assert "tmp_bad" not in LOSSES
    with pytest.raises(UnknownNameError):
        LOSSES.unregister("tmp_bad")


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
    y = torch.arange(BATCH) % CLASSES
    before = {k: v.clone() for k, v in loss.state_dict().items()}

    loss.eval()
    loss(s, tt, index=index, target=y)
    assert all(torch.equal(before[k], v) for k, v in loss.state_dict().items())

    loss.train()
    value = loss(s, tt, index=index, target=y)
    value.backward()  # the update must not break the graph built before it
    after = loss.state_dict()
    for bank in ("student_memory", "teacher_memory"):
        changed = (after[bank] != before[bank]).any(dim=1)
        assert changed[index].all() and not changed[~torch.isin(torch.arange(NUM_TRAIN), index)].any()
        assert torch.allclose(after[bank][index].norm(dim=1), torch.ones(BATCH))
    assert after["z_student"] > 0 and after["z_teacher"] > 0
    # Z is estimated once and then fixed.
    z = after["z_student"].clone()
    loss(s, tt, index=index, target=y)
    assert torch.equal(loss.z_student, z)


def test_crd_gradients_reach_heads_not_teacher_features():
    loss = _crd()
    s = torch.randn(BATCH, 16, requires_grad=True)
    tt = torch.randn(BATCH, 32, requires_grad=True)  # even a teacher that asks for gradients
    loss(s, tt.detach(), index=torch.arange(BATCH), target=torch.arange(BATCH) % CLASSES).backward()
    assert tt.grad is None
    assert loss.embed_teacher.weight.grad.abs().sum() > 0 and loss.embed_student.weight.grad.abs().sum() > 0
    assert s.grad.abs().sum() > 0


def test_crd_is_seeded_deterministic():
    def run(seed):
        loss = _crd(seed)
        torch.manual_seed(seed + 100)
        s, tt = torch.randn(BATCH, 16), torch.randn(BATCH, 32)
        y = torch.arange(BATCH) % CLASSES
        values = [loss(s, tt, index=torch.arange(BATCH) + i, target=y).item() for i in range(3)]
        return values, loss.state_dict()

    (v1, st1), (v2, st2), (v3, _) = run(0), run(0), run(1)
    assert v1 == v2 and all(torch.equal(st1[k], st2[k]) for k in st1)
    assert v1 != v3


def test_crd_draws_more_negatives_than_rows_with_replacement():
    # The official sampler draws with replacement when K exceeds the other-class rows: no clamping.
    loss = CRD.from_shapes(student_shape=(4,), teacher_shape=(4,), num_train_samples=5, num_negatives=100)
    index, y = torch.tensor([0, 1, 4]), torch.tensor([0, 1, 1])
    assert torch.isfinite(loss(torch.randn(3, 4), torch.randn(3, 4), index=index, target=y))
    assert loss._draw_negatives(index, y).shape == (3, 100)


def test_crd_mask_keeps_selected_samples_and_refuses_weights():
    loss = _crd()
    s, tt, index = torch.randn(BATCH, 16), torch.randn(BATCH, 32), torch.arange(BATCH)
    y = torch.arange(BATCH) % CLASSES
    mask = torch.arange(BATCH) < 3
    before = {k: v.clone() for k, v in loss.state_dict().items()}
    loss.train()
    loss(s, tt, index=index, target=y, mask=mask)
    changed = (loss.student_memory != before["student_memory"]).any(dim=1)
    assert changed[:3].all() and not changed[3:].any()  # only the kept samples update the bank
    with pytest.raises(ValueError, match="batch-relation"):
        loss(s, tt, index=index, target=y, weights=torch.ones(BATCH))
    z = loss.z_student.clone()
    assert loss(s, tt, index=index, target=y, mask=torch.zeros(BATCH, dtype=torch.bool)).item() == 0.0
    assert torch.equal(loss.z_student, z)


def test_dkd_warms_up_over_the_first_twelfth_of_training_by_default(base_config):
    """The official DKD code ramps the loss over 20 of 240 epochs in every config."""
    from transfuse.build import load_data, make_distiller
    from transfuse.config import config_from_dict

    def dkd_schedule(**distill):
        data = {**base_config, "distill": {"method": "dkd", **distill}, "train": {**base_config["train"], "steps": 120}}
        cfg = config_from_dict(data)
        splits, train_set = load_data(cfg.data)
        [term] = [t for t in make_distiller(cfg, splits, train_set).terms if t.name == "dkd"]
        return [term.schedule.factor(s) for s in (0, 4, 9, 10, 119)]

    assert dkd_schedule() == pytest.approx([0.1, 0.5, 1.0, 1.0, 1.0])  # 120 / 12 = 10 steps
    assert dkd_schedule(warmup_steps=0) == [1.0] * 5
    assert dkd_schedule(warmup_steps=20) == pytest.approx([0.05, 0.25, 0.5, 0.55, 1.0])
