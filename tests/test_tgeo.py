"""TGeo-KD: the relation features, the fused loss, the bilevel recipe and its exact resume."""

from __future__ import annotations

import copy
import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F
import yaml
from lightning_fabric import Fabric
from safetensors.torch import load_file
from torch import nn

import transfuse.losses.tgeo  # noqa: F401  (registers "tgeo" and the recipe "tgeo_bilevel")
from transfuse.checkpoint import MODEL_FILE
from transfuse.cli import main
from transfuse.config import config_from_dict
from transfuse.data.base import ArrayDataset
from transfuse.distiller import Distiller, Term
from transfuse.engine import FitSettings, fit
from transfuse.functional.tgeo import class_prediction_sums, tgeo_fused, tgeo_relations
from transfuse.losses import LOSSES
from transfuse.losses.tgeo import TGeo, TGeoBilevel, TGeoUsageError
from transfuse.participants import Participant
from transfuse.recipes import RECIPES, make_recipe


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny models: thread hand-offs cost more than they save, and the machine is shared.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------
# The pure functions


def test_relations_equal_a_hand_computation():
    s = torch.tensor([[0.5, 0.3, 0.2]])
    t = torch.tensor([[0.7, 0.2, 0.1]])
    target = torch.tensor([0])
    means = torch.tensor([[0.6, 0.3, 0.1], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6]])
    delta = tgeo_relations(s, t, target, means)
    by_hand = [
        -0.2, 0.1, 0.1,      # s - t
        -0.5, 0.3, 0.2,      # s - g, g = [1, 0, 0]
        -0.3, 0.2, 0.1,      # t - g
        0.1, -0.1, 0.0,      # t - tbar_0
    ]
    assert delta.shape == (1, 12)
    assert torch.allclose(delta[0], torch.tensor(by_hand), atol=1e-6)
    # Sequences: (B, T, C) positions, each indexed by its own label.
    s3, t3 = torch.rand(2, 4, 3).softmax(-1), torch.rand(2, 4, 3).softmax(-1)
    y3 = torch.randint(3, (2, 4))
    d3 = tgeo_relations(s3, t3, y3, means)
    assert d3.shape == (2, 4, 12)
    assert torch.allclose(d3[1, 2, 9:], t3[1, 2] - means[y3[1, 2]])
    with pytest.raises(ValueError, match=r"class_means must be \(C, C\)"):
        tgeo_relations(s, t, target, means[:2])
    with pytest.raises(ValueError, match="integer class ids"):
        tgeo_relations(s, t, target.float(), means)


def test_class_sums_count_only_masked_in_samples():
    t = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8], [0.5, 0.5]])
    target = torch.tensor([0, 0, 1, -1])  # the last is unlabelled
    mask = torch.tensor([True, True, True, False])
    sums, counts = class_prediction_sums(t, target, mask=mask)
    assert torch.allclose(sums, torch.tensor([[1.5, 0.5], [0.2, 0.8]]))
    assert counts.tolist() == [2.0, 1.0]


def _logits(b=6, c=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, c, generator=g) * 2, torch.randn(b, c, generator=g) * 2, torch.randint(c, (b,), generator=g)


def test_fused_loss_is_alpha_kl_plus_one_minus_alpha_ce_per_sample():
    s, t, y = _logits()
    alpha = torch.tensor([0.0, 0.2, 0.5, 0.7, 0.9, 1.0])
    per_sample = tgeo_fused(s, t, y, alpha, reduction="none")
    kl = (t.softmax(-1) * (t.log_softmax(-1) - s.log_softmax(-1))).sum(-1)  # KL(p || q), independent of kd()
    ce = -s.log_softmax(-1)[torch.arange(6), y]
    assert torch.allclose(per_sample, alpha * kl + (1 - alpha) * ce, atol=1e-6)
    assert torch.allclose(tgeo_fused(s, t, y, alpha), (alpha * kl + (1 - alpha) * ce).mean(), atol=1e-6)
    # At temperature T the soft part is T^2 * KL(p_T || q_T).
    kl4 = 16 * (F.softmax(t / 4, -1) * (F.log_softmax(t / 4, -1) - F.log_softmax(s / 4, -1))).sum(-1)
    assert torch.allclose(tgeo_fused(s, t, y, alpha, temperature=4.0, reduction="none"), alpha * kl4 + (1 - alpha) * ce, atol=1e-5)
    # Mask and weights go through the one reduction; a masked-out sample may carry label -1.
    mask = torch.tensor([True, False, True, True, False, True])
    weights = torch.rand(6) + 0.5
    y_unlabelled = torch.where(mask, y, torch.full_like(y, -1))
    value = tgeo_fused(s, t, y_unlabelled, alpha, mask=mask, weights=weights)
    expected = ((alpha * kl + (1 - alpha) * ce) * weights)[mask].sum() / mask.sum()
    assert torch.allclose(value, expected, atol=1e-6)
    with pytest.raises(ValueError, match="alpha must have the positions' shape"):
        tgeo_fused(s, t, y, alpha[:3])


# ---------------------------------------------------------------------------------------
# The module


def _loss(c=5, **options):
    torch.manual_seed(0)
    return LOSSES.get("tgeo").from_shapes(student_shape=(c,), teacher_shape=(c,), num_train_samples=10, **options)


def test_registration_and_options():
    spec = LOSSES.get("tgeo")
    assert (spec.weight, spec.ce_weight, spec.needs, spec.inputs) == (1.0, 0.0, ("target",), "logits")
    assert spec.option_defaults() == {"hidden": 100, "temperature": 1.0, "omega_lr": 1e-3, "omega_weight_decay": 1e-4}
    loss = _loss()
    assert loss.fusion[0].in_features == 20 and loss.fusion[2].out_features == 1
    for bad, match in (({"temperature": 0}, "temperature"), ({"hidden": 0}, "hidden"), ({"omega_lr": -1.0}, "omega_lr"),
                       ({"omega_weight_decay": -1.0}, "omega_weight_decay"), ({"beta": 1.0}, "beta")):
        with pytest.raises(ValueError, match=match):
            LOSSES.check_options("tgeo", bad, where="distill.options")
    with pytest.raises(ValueError, match="same classes"):
        LOSSES.get("tgeo").from_shapes(student_shape=(5,), teacher_shape=(7,), num_train_samples=1)
    with pytest.raises(TGeoUsageError, match="no fusion network"):
        TGeo()(*_logits()[:2], target=_logits()[2])


def test_alpha_is_in_0_1_and_learns_only_inside_the_virtual_pass():
    loss = _loss()
    s, t, y = _logits()
    s.requires_grad_(True)
    alpha = loss.ratio(s, t, y)
    assert alpha.shape == (6,) and ((alpha > 0) & (alpha < 1)).all()
    assert not alpha.requires_grad  # outside the virtual pass: no graph to omega
    value = loss(s, t, target=y)
    value.backward()
    assert all(p.grad is None for p in loss.parameters()), "the student's own loss must not train omega"
    with loss.outer_graph():
        alpha = loss.ratio(s, t, y)
    assert alpha.requires_grad
    (grad_s,) = torch.autograd.grad(alpha.sum(), [s], allow_unused=True)
    assert grad_s is None, "the features are detached: alpha passes no gradient to the student"
    with loss.outer_graph():
        loss(s, t, target=y).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in loss.omega_parameters())


def test_class_means_grow_in_training_only_and_include_the_batch():
    loss = _loss(c=3)
    s, t, y = _logits(b=8, c=3)
    mask = torch.ones(8, dtype=torch.bool)
    mask[0] = False
    loss.eval()
    loss(s, t, target=y, mask=mask)
    assert loss.class_counts.sum() == 0
    loss.train()
    with loss.outer_graph():
        loss(s, t, target=y, mask=mask)
    assert loss.class_counts.sum() == 0, "the virtual pass reads the class sums without adding to them"
    loss(s, t, target=y, mask=mask)
    probs = t.softmax(-1)
    for c in range(3):
        keep = mask & (y == c)
        assert loss.class_counts[c].item() == keep.sum().item()
        assert torch.allclose(loss.class_sums[c], probs[keep].sum(0), atol=1e-6)
    # The inter-sample relation uses the class means with this batch included (eval too, unstored).
    fresh = _loss(c=3).eval()
    sums = torch.zeros(3, 3).index_add_(0, y, probs)
    batch_means = sums / torch.bincount(y, minlength=3).clamp_min(1)[:, None]
    delta = tgeo_relations(s.softmax(-1), probs, y, batch_means)
    with torch.no_grad():
        expected = torch.sigmoid(fresh.fusion(delta)).squeeze(-1)
    assert torch.allclose(fresh.ratio(s, t, y), expected, atol=1e-6)
    assert fresh.class_counts.sum() == 0


def test_bf16_cast_keeps_the_statistics_and_step_counts_float32():
    loss = _loss().to(torch.bfloat16)
    assert loss.class_sums.dtype == torch.float32 and loss.class_counts.dtype == torch.float32
    assert loss.omega_state.get_buffer("0_weight_step").dtype == torch.float32
    assert loss.fusion[0].weight.dtype == torch.bfloat16
    s, t, y = _logits()
    assert torch.isfinite(loss(s.bfloat16(), t.bfloat16(), target=y))


# ---------------------------------------------------------------------------------------
# The bilevel recipe


def _data(n=320, d=6, classes=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long()
    return ArrayDataset(x[:256], y[:256]), ArrayDataset(x[256:], y[256:])


def _setup(*, omega_lr=0.01, batchnorm=True, dtype=torch.float32):
    torch.manual_seed(0)
    layers = [nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4)] if batchnorm else [nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 4)]
    student = nn.Sequential(*layers).to(dtype)
    teacher = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 4)).to(dtype)
    loss = TGeo.for_classes(4, omega_lr=omega_lr).to(dtype)
    d = Distiller([Participant("student", student), Participant("teacher", teacher, trainable=False)], [Term("tgeo", loss)])
    return d, student, loss


def _fit(d, optimizer, train, holdout, run_dir, *, steps, recipe=None, resume=False, precision="32-true", **kw):
    settings = FitSettings(steps=steps, batch_size=32, seed=3, checkpoint_every=kw.pop("checkpoint_every", steps),
                           keep_checkpoints=10, log_every=kw.pop("log_every", 5), progress=False, **kw)
    recipe = recipe or TGeoBilevel(holdout=holdout, seed=3)
    return fit(Fabric(accelerator="cpu", devices=1, precision=precision), d, optimizer, train, settings, run_dir=run_dir,
               recipe=recipe, resume=resume)


class _Stop(Exception):
    pass


def test_the_outer_update_moves_omega_only_and_the_real_update_leaves_omega_alone(tmp_path):
    train, holdout = _data()
    d, student, loss = _setup()
    # Worst case for leaks: omega in the student's optimizer (as a run's make_optimizers puts a
    # loss's parameters), with momentum and weight decay.
    optimizer = torch.optim.SGD([*student.parameters(), *loss.parameters()], lr=0.1, momentum=0.9, weight_decay=0.1)
    omega0 = [p.detach().clone() for p in loss.omega_parameters()]
    theta0 = [p.detach().clone() for p in student.parameters()]
    bn0 = [b.detach().clone() for b in student.buffers()]
    after_outer = {}
    step_omega = loss.step_omega

    def recording(grads):
        step_omega(grads)
        after_outer["omega"] = [p.detach().clone() for p in loss.omega_parameters()]
        after_outer["theta"] = [p.detach().clone() for p in student.parameters()]
        after_outer["bn"] = [b.detach().clone() for b in student.buffers()]

    loss.step_omega = recording
    _fit(d, optimizer, train, holdout, tmp_path / "run", steps=1)
    # The outer update: omega moved, the student did not, and the virtual pass left BatchNorm alone.
    assert all(not torch.equal(a, b) for a, b in zip(after_outer["omega"], omega0))
    assert all(torch.equal(a, b) for a, b in zip(after_outer["theta"], theta0))
    assert all(torch.equal(a, b) for a, b in zip(after_outer["bn"], bn0))
    # The real update: the student moved, omega is exactly where the outer update left it.
    assert all(not torch.equal(a, b) for a, b in zip(student.parameters(), theta0))
    assert all(torch.equal(a, b) for a, b in zip(loss.omega_parameters(), after_outer["omega"]))
    assert loss.class_counts.sum().item() == 32, "only the real pass adds the batch to the class sums"
    assert all(p.grad is None for p in loss.omega_parameters())
    assert loss.omega_state.get_buffer("0_weight_step").item() == 1.0


def test_the_outer_gradient_equals_finite_differences(tmp_path):
    """An independent re-statement of the bilevel objective, differentiated numerically in float64:
    F(omega) = CE_heldout(theta - lr * grad_theta L(theta; omega)), L = mean(alpha KL + (1 - alpha) CE)."""
    train, holdout = _data()
    d, student, loss = _setup(batchnorm=False, dtype=torch.float64)
    teacher = d.participants["teacher"].model
    start = {"student": copy.deepcopy(student.state_dict()), "loss": copy.deepcopy(loss.state_dict())}
    captured = {}

    class Recording(TGeoBilevel):
        def step(self, ctx):
            batches = list(ctx.micro_batches)
            captured["batch"] = batches[0]
            captured["held"] = self.holdout_batch(ctx.step, 32)
            ctx.micro_batches = iter(batches)
            return super().step(ctx)

    def capture(grads):
        captured["grads"] = [g.detach().clone() for g in grads]
        raise _Stop

    loss.step_omega = capture
    lr = 0.5
    with pytest.raises(_Stop):
        _fit(d, torch.optim.SGD(student.parameters(), lr=lr), train, holdout, tmp_path / "run", steps=1,
             recipe=Recording(holdout=holdout, seed=3), precision="64-true")
    student.load_state_dict(start["student"])
    x, y = captured["batch"]["input"].double(), captured["batch"]["target"]
    xv, yv = captured["held"]["input"].double(), captured["held"]["target"]
    with torch.no_grad():
        t_logits = teacher(x)
        p_t = t_logits.softmax(-1)
    sums = torch.zeros(4, 4, dtype=torch.float64).index_add_(0, y, p_t)
    means = sums / torch.bincount(y, minlength=4).clamp_min(1).double()[:, None]
    g = F.one_hot(y, 4).double()
    names = [n for n, _ in student.named_parameters()]
    theta = [p.detach().clone().requires_grad_(True) for p in student.parameters()]

    def objective(omega_flat_0: torch.Tensor) -> float:
        w0 = omega_flat_0.reshape(loss.fusion[0].weight.shape)
        with torch.enable_grad():
            s_logits = torch.func.functional_call(student, dict(zip(names, theta)), (x,))
            p_s = s_logits.detach().softmax(-1)
            delta = torch.cat([p_s - p_t, p_s - g, p_t - g, p_t - means[y]], -1)
            hidden = torch.relu(delta @ w0.T + loss.fusion[0].bias)
            alpha = torch.sigmoid(hidden @ loss.fusion[2].weight.T + loss.fusion[2].bias).squeeze(-1)
            kl = (p_t * (p_t.log() - s_logits.log_softmax(-1))).sum(-1)
            ce = F.cross_entropy(s_logits, y, reduction="none")
            inner = (alpha * kl + (1 - alpha) * ce).mean()
            grads = torch.autograd.grad(inner, theta)
        virtual = {n: p - lr * gr for n, p, gr in zip(names, theta, grads)}
        with torch.no_grad():
            return F.cross_entropy(torch.func.functional_call(student, virtual, (xv,)), yv).item()

    w0 = loss.fusion[0].weight.detach().clone().reshape(-1)
    analytic = captured["grads"][0].reshape(-1)
    eps = 1e-6
    for i in torch.randperm(w0.numel(), generator=torch.Generator().manual_seed(0))[:6].tolist():
        e = torch.zeros_like(w0)
        e[i] = eps
        numeric = (objective(w0 + e) - objective(w0 - e)) / (2 * eps)
        assert numeric == pytest.approx(analytic[i].item(), rel=1e-4, abs=1e-9)
    assert analytic.abs().sum() > 0


def test_with_a_useless_teacher_omega_learns_to_trust_the_labels(tmp_path):
    # A random teacher knows nothing: the held-out CE rewards lowering alpha (less from the teacher).
    train, holdout = _data()
    d, student, loss = _setup(omega_lr=0.01)
    _fit(d, torch.optim.Adam(student.parameters(), lr=0.01), train, holdout, tmp_path / "run", steps=30, log_every=5)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    alphas = [r["loss/tgeo_alpha"] for r in rows if "loss/tgeo_alpha" in r]  # means over steps 1-5, ..., 26-30
    assert len(alphas) == 6 and all(0 < a < 1 for a in alphas)
    assert alphas[-1] < alphas[0] - 0.1, alphas
    assert all(math.isfinite(r["loss/tgeo_outer"]) for r in rows if "loss/tgeo_outer" in r)


def test_the_held_out_batch_is_a_function_of_seed_and_step():
    _, holdout = _data()
    recipe = TGeoBilevel(holdout=holdout, seed=3)
    a, b = recipe.holdout_batch(7, 16), TGeoBilevel(holdout=holdout, seed=3).holdout_batch(7, 16)
    assert torch.equal(a["index"], b["index"]) and len(a["index"]) == 16 and len(set(a["index"].tolist())) == 16
    assert not torch.equal(a["index"], recipe.holdout_batch(8, 16)["index"])
    assert not torch.equal(a["index"], TGeoBilevel(holdout=holdout, seed=4).holdout_batch(7, 16)["index"])
    assert len(recipe.holdout_batch(0, 1000)["index"]) == len(holdout)  # capped at the held-out set


def test_bad_recipe_options_and_misuse_fail_clearly(tmp_path):
    train, holdout = _data()
    assert "tgeo_bilevel" in RECIPES
    with pytest.raises(ValueError, match="holdout_batch_size"):
        make_recipe("tgeo_bilevel", holdout=holdout, holdout_batch_size=0)
    with pytest.raises(ValueError, match="virtual_lr"):
        make_recipe("tgeo_bilevel", holdout=holdout, virtual_lr=-1.0)
    with pytest.raises(ValueError, match="holdout must be a non-empty"):
        TGeoBilevel(holdout=ArrayDataset(torch.zeros(0, 6), torch.zeros(0)))
    with pytest.raises(ValueError, match="has no option"):
        make_recipe("tgeo_bilevel", holdout=holdout, lr=0.1)
    # The loss under the default recipe: omega could never learn, so training refuses to start.
    d, student, _ = _setup()
    with pytest.raises(TGeoUsageError, match="tgeo_bilevel"):
        _fit(d, torch.optim.SGD(student.parameters(), lr=0.1), train, holdout, tmp_path / "a", steps=1,
             recipe=make_recipe("default"))
    # The recipe without a tgeo term, or beside a loss with per-forward state.
    torch.manual_seed(0)
    s, t = nn.Linear(6, 4), nn.Linear(6, 4)
    plain = Distiller([Participant("student", s), Participant("teacher", t, trainable=False)], [Term("kd", LOSSES.get("kd").build())])
    with pytest.raises(TGeoUsageError, match="exactly one term whose loss is 'tgeo'"):
        _fit(plain, torch.optim.SGD(s.parameters(), lr=0.1), train, holdout, tmp_path / "b", steps=1)
    taid = Distiller([Participant("student", s), Participant("teacher", t, trainable=False)],
                     [Term("tgeo", TGeo.for_classes(4)), Term("taid", LOSSES.get("taid").build())])
    with pytest.raises(TGeoUsageError, match="per forward pass"):
        _fit(taid, torch.optim.SGD(s.parameters(), lr=0.1), train, holdout, tmp_path / "c", steps=1)


def test_a_config_without_holdout_fraction_fails_naming_both_fields(base_config):
    base_config["distill"] = {"method": "tgeo"}
    base_config["recipe"] = {"name": "tgeo_bilevel"}
    with pytest.raises(ValueError, match=r"holdout_fraction[\s\S]*tgeo_bilevel|tgeo_bilevel[\s\S]*holdout_fraction"):
        config_from_dict(base_config)


# ---------------------------------------------------------------------------------------
# End to end, and exact resume


def _final_state(run_dir, step=40):
    return load_file(run_dir / "checkpoints" / f"step-{step:08d}" / MODEL_FILE)


def test_a_run_resumed_mid_way_equals_an_uninterrupted_run_bit_for_bit(base_config, tmp_path):
    base_config["data"]["holdout_fraction"] = 0.2
    base_config["distill"] = {"method": "tgeo", "options": {"omega_lr": 0.01}}
    base_config["recipe"] = {"name": "tgeo_bilevel", "options": {"holdout_batch_size": 32}}
    base_config["train"].update(steps=40, checkpoint_every=20, keep_checkpoints=5)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(base_config))
    full = tmp_path / "full"
    assert main(["run", str(cfg), "--out", str(full), "--quiet"]) == 0
    final = _final_state(full)
    middle = load_file(full / "checkpoints" / "step-00000020" / MODEL_FILE)
    assert final["losses.tgeo.omega_state.0_weight_step"].item() == 40.0
    assert not torch.equal(final["losses.tgeo.fusion.0.weight"], middle["losses.tgeo.fusion.0.weight"]), "omega moved"
    assert final["losses.tgeo.class_counts"].sum() > middle["losses.tgeo.class_counts"].sum()

    part = tmp_path / "part"
    shutil.copytree(full, part)
    for entry in (part / "checkpoints").iterdir():
        if entry.name != "step-00000020":
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    (part / "summary.json").unlink()
    assert main(["run", str(cfg), "--out", str(part), "--resume", "--quiet"]) == 0
    assert json.loads((part / "summary.json").read_text())["resumed_from"] == 20
    resumed = _final_state(part)
    assert final.keys() == resumed.keys()
    for k in final:
        assert torch.equal(final[k], resumed[k]), f"{k} differs after resume"
