"""Meta-DMoE and the data sets with synthetic domains."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from transfuse.config import ConfigError, config_from_dict
from transfuse.data import load_dataset
from transfuse.data.domains import TRANSFORMS, DomainDataset, apply_domains, assign_domains, parse_domain
from transfuse.functional import drop_tokens, expert_keep_mask, feature_mse, inner_step, masked_token_mean
from transfuse.participants import Participant

torch.set_num_threads(1)


# ----------------------------------------------------------------------------- domains


def test_domain_assignment_is_deterministic_and_balanced():
    a, b = assign_domains(103, 4, seed=5), assign_domains(103, 4, seed=5)
    assert torch.equal(a, b) and a.dtype == torch.int64
    assert sorted(torch.bincount(a).tolist()) == [25, 26, 26, 26]
    assert not torch.equal(a, assign_domains(103, 4, seed=6))


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_every_transform_is_well_formed(name):
    torch.manual_seed(0)
    x = torch.rand(6, 1, 8, 8)
    domains = torch.zeros(6, dtype=torch.long)
    out = apply_domains(x, domains, [name], seed=3)
    assert out.shape == x.shape and out.dtype == x.dtype and torch.isfinite(out).all()
    assert out.min() >= -1e-6 and out.max() <= 1 + 1e-6
    assert torch.equal(out, apply_domains(x, domains, [name], seed=3))  # noise included: same seed, same draw
    assert torch.equal(x, x.clone())  # the input is left alone
    if name == "identity":
        assert torch.equal(out, x)
    else:
        assert not torch.allclose(out, x)


def test_transforms_do_what_they_say():
    x = torch.rand(2, 1, 6, 6)
    assert torch.allclose(TRANSFORMS["rotate"][0](x, 90.0, None), torch.rot90(x, 1, dims=(2, 3)), atol=1e-5)
    assert torch.allclose(TRANSFORMS["invert"][0](x, 0.0, None), 1 - x)
    low = TRANSFORMS["contrast"][0](x, 0.5, None)
    assert torch.allclose(low.std(dim=(1, 2, 3)), 0.5 * x.std(dim=(1, 2, 3)), atol=1e-5)
    flat = torch.full((1, 1, 5, 5), 0.3)
    assert torch.allclose(TRANSFORMS["blur"][0](flat, 1.0, None), flat)
    assert parse_domain("rotate:30") == ("rotate", 30.0) and parse_domain("noise") == ("noise", 0.3)


def test_domain_data_set_fields_subset_and_held_out_target():
    splits = load_dataset("digits_domains", target_domain=2, seed=1)
    train, test = splits.train, splits.test
    assert isinstance(train, DomainDataset) and train.domains.dtype == torch.int64
    assert 2 not in train.domains.tolist() and set(test.domains.tolist()) == {2}
    batch = train.__getitems__([0, 5, 7])
    assert torch.equal(batch["domain"], train.domains[[0, 5, 7]]) and set(batch) >= {"input", "target", "index", "sample_id"}
    assert train[3]["domain"] == train.domains[3]
    sub = train.subset(torch.tensor([4, 1]))
    assert torch.equal(sub.domains, train.domains[[4, 1]]) and torch.equal(sub.sample_ids, train.sample_ids[[4, 1]])
    # The same options give the same data; another seed another assignment.
    again = load_dataset("digits_domains", target_domain=2, seed=1)
    assert torch.equal(again.train.inputs, train.inputs) and torch.equal(again.train.domains, train.domains)
    other = load_dataset("digits_domains", seed=2)
    assert not torch.equal(other.train.domains, load_dataset("digits_domains", seed=1).train.domains)


@pytest.mark.parametrize("options, match", [
    ({"domains": ["identity", "sharpen"]}, "unknown transform 'sharpen'; valid: identity, rotate"),
    ({"domains": ["identity", "noise:-1"]}, "standard deviation > 0"),
    ({"domains": ["identity", "invert:2"]}, "takes no strength"),
    ({"domains": ["identity", "rotate:left"]}, "not a number"),
    ({"domains": ["identity"]}, "at least two"),
    ({"target_domain": 4}, "target_domain must be a domain index in 0..3"),
])
def test_bad_domain_options_fail_clearly(options, match):
    with pytest.raises(ValueError, match=match):
        load_dataset("digits_domains", **options)


# ----------------------------------------------------------------------------- pure pieces


def test_own_domain_expert_is_masked_out_of_the_aggregation():
    domains = torch.tensor([0, 2, 1, 5])
    keep = expert_keep_mask(domains, [[0], [1, 2], [3]])
    assert keep.tolist() == [[False, True, True], [True, False, True], [True, False, True], [True, True, True]]
    from transfuse.schemes.meta_dmoe import ExpertAggregator

    torch.manual_seed(0)
    agg = ExpertAggregator(8, heads=2, dropout=0.1).eval()
    tokens = torch.randn(3, 3, 8)
    keep = expert_keep_mask(torch.tensor([0, 1, 2]), [[0], [1], [2]])
    masked = agg(tokens, keep)
    # Equal to aggregating only the other experts' tokens (the official exclusion) ...
    assert torch.allclose(masked, agg(drop_tokens(tokens, keep)), atol=1e-5)
    # ... and blind to the masked token's value.
    poisoned = tokens.clone()
    poisoned[~keep] = 1e3
    assert torch.allclose(agg(poisoned, keep), masked, atol=1e-5)
    assert torch.allclose(masked_token_mean(tokens, keep), (tokens * keep.unsqueeze(-1)).sum(1) / 2)


def test_inner_step_equals_a_hand_written_step_on_a_linear_model():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    x, t = torch.randn(5, 3), torch.randn(5, 2)
    params = dict(model.named_parameters())
    loss = feature_mse(model(x), t)
    assert torch.allclose(loss, ((x @ model.weight.T + model.bias - t) ** 2).mean())
    adapted = inner_step(params, loss, lr=0.1)
    residual = x @ model.weight.T + model.bias - t  # (5, 2); d mean(r^2) / dr = 2 r / 10
    grad_w, grad_b = (2 / 10) * residual.T @ x, (2 / 10) * residual.sum(0)
    assert torch.allclose(adapted["weight"], model.weight - 0.1 * grad_w, atol=1e-6)
    assert torch.allclose(adapted["bias"], model.bias - 0.1 * grad_b, atol=1e-6)
    # Second order: theta' depends on the target; first order: it does not.
    target = t.clone().requires_grad_(True)
    second = inner_step(params, feature_mse(model(x), target), lr=0.1)
    (g,) = torch.autograd.grad(second["weight"].sum(), target)
    assert g.abs().sum() > 0
    first = inner_step(params, feature_mse(model(x), target), lr=0.1, first_order=True)
    assert not first["weight"].grad_fn or torch.autograd.grad(first["weight"].sum(), target, allow_unused=True)[0] is None


def test_feature_mse_mask_and_reduction():
    s, t = torch.randn(4, 3), torch.randn(4, 3)
    per = feature_mse(s, t, reduction="none")
    assert per.shape == (4,) and torch.allclose(per.mean(), feature_mse(s, t))
    mask = torch.tensor([True, False, True, False])
    assert torch.allclose(feature_mse(s, t, mask=mask), per[mask].mean())
    with pytest.raises(ValueError, match="one shape"):
        feature_mse(s, torch.randn(4, 5))


def test_domain_tasks_split_support_first():
    from transfuse.schemes.meta_dmoe import domain_tasks

    domains = torch.tensor([1, 0, 1, 1, 0, 2, 1])
    tasks = domain_tasks(domains, support_fraction=0.5)
    assert [(d, s.tolist(), q.tolist()) for d, s, q in tasks] == [(0, [1], [4]), (1, [0, 2], [3, 6])]  # domain 2: 1 sample
    (largest,) = domain_tasks(domains, support_fraction=0.5, mode="largest")
    assert largest[0] == 1


# ----------------------------------------------------------------------------- the step


def _setup(first_order=False, lr_scale=1.0):
    from transfuse.losses import LOSSES

    torch.manual_seed(0)
    student = Participant("student", nn.Sequential(nn.Flatten(), nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)))
    experts = [Participant(f"e{i}", nn.Sequential(nn.Flatten(), nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)),
                           trainable=False) for i in range(3)]
    loss = LOSSES.get("meta_dmoe_inner").from_shapes(
        student_shape=(8,), teacher_shape=(8,), num_train_samples=10, heads=2, inner_lr=0.5, first_order=first_order,
        aggregator_lr_scale=lr_scale, experts=("e0", "e1", "e2"), expert_domains=((0,), (1,), (2,)))
    for p in (student, *experts):
        p.model.feature_layer = "2"  # the tanh output is the feature
    batch = {"input": torch.randn(12, 1, 2, 2), "target": torch.randint(3, (12,)),
             "domain": torch.tensor([0, 1, 2] * 4)}
    return student, experts, loss, batch


@pytest.mark.parametrize("first_order", [False, True])
def test_outer_update_reaches_the_aggregator_and_the_student(first_order):
    from transfuse.schemes.meta_dmoe import meta_losses

    student, experts, loss, batch = _setup(first_order)
    outer, parts = meta_losses(student, experts, loss, batch, feature_path="2")
    outer.backward()
    assert torch.isfinite(outer) and set(parts) == {"meta_dmoe_inner", "meta_dmoe_query_ce"}
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in student.model.parameters())
    agg = [p.grad for p in loss.parameters()]
    if first_order:  # FOMAML: the step's gradient is a constant, so nothing reaches the target's maker
        assert all(g is None or g.abs().sum() == 0 for g in agg)
    else:
        assert sum(float(g.abs().sum()) for g in agg if g is not None) > 0
    assert all(p.grad is None for e in experts for p in e.model.parameters())


def test_masked_expert_does_not_influence_its_domain_task():
    from transfuse.schemes.meta_dmoe import meta_losses

    student, experts, loss, batch = _setup()
    loss.eval()  # as the recipe runs it (official selector.eval()): no dropout draws between the calls
    batch = {k: v[batch["domain"] == 0] for k, v in batch.items()}  # one task, of domain 0
    base, _ = meta_losses(student, experts, loss, batch, feature_path="2")
    with torch.no_grad():
        experts[0].model[1].weight.mul_(5.0)  # the own-domain expert changes ...
    same, _ = meta_losses(student, experts, loss, batch, feature_path="2")
    with torch.no_grad():
        experts[1].model[1].weight.mul_(5.0)  # ... an other-domain expert does matter
    other, _ = meta_losses(student, experts, loss, batch, feature_path="2")
    assert torch.equal(base, same) and not torch.equal(base, other)


def test_test_time_adaptation_changes_a_copy_from_unlabelled_inputs_only():
    from transfuse.schemes.meta_dmoe import test_time_adapt

    student, experts, loss, _ = _setup()
    before = copy.deepcopy(student.model.state_dict())
    x = torch.randn(6, 1, 2, 2)
    adapted = test_time_adapt(student.model, [e.model for e in experts], loss, x, student_layer="2", expert_layer="2")
    assert all(torch.equal(v, student.model.state_dict()[k]) for k, v in before.items())  # the student is untouched
    new = adapted.state_dict()
    assert not torch.equal(new["1.weight"], before["1.weight"])  # the feature layers moved ...
    assert torch.equal(new["3.weight"], before["3.weight"])  # ... the head did not (the inner loss never reaches it)
    other = test_time_adapt(student.model, [e.model for e in experts], loss, x + 1, student_layer="2", expert_layer="2")
    assert not torch.equal(other.state_dict()["1.weight"], new["1.weight"])  # it depends on the target inputs


# ----------------------------------------------------------------------------- configs and runs


def _config(**changes):
    expert = {"name": "mlp", "options": {"hidden": [16]}, "trainable": False,
              "train": {"steps": 30, "batch_size": 32, "optim": {"name": "adam", "lr": 0.01}}}
    data = {
        "name": "t-meta-dmoe", "seed": 0,
        "data": {"name": "digits_domains", "options": {"domains": ["identity", "rotate:90", "invert"], "target_domain": 2}},
        "participants": {"student": {"name": "mlp", "options": {"hidden": [16]}},
                         "e0": copy.deepcopy(expert), "e1": copy.deepcopy(expert)},
        "distill": {"method": "meta_dmoe", "options": {"heads": 4, "inner_lr": 0.1, "aggregator_lr_scale": 0.5}},
        "recipe": {"name": "meta_dmoe"},
        "optim": {"name": "adam", "lr": 0.003},
        "train": {"steps": 4, "batch_size": 24, "log_every": 2, "checkpoint_every": 2, "progress": False},
    }
    data["participants"]["e0"]["train"]["domains"] = [0]
    data["participants"]["e1"]["train"]["domains"] = [1]
    for key, value in changes.items():
        node = data
        *path, last = key.split(".")
        for part in path:
            node = node[part]
        node[last] = value
    return config_from_dict(data)


def test_resume_is_exact_and_the_run_adapts(tmp_path):
    import shutil

    from transfuse.analysis import accuracy
    from transfuse.build import load_data
    from transfuse.checkpoint import load_latest_checkpoint
    from transfuse.run import run
    from transfuse.schemes.meta_dmoe import adapted_predictions, restore

    cfg = _config()
    run(cfg, out_dir=tmp_path / "full", quiet=True)
    shutil.copytree(tmp_path / "full", tmp_path / "part")
    shutil.rmtree(tmp_path / "part" / "checkpoints" / "step-00000004")
    (tmp_path / "part" / "summary.json").unlink()
    run(cfg, out_dir=tmp_path / "part", resume=True, quiet=True)
    full = load_latest_checkpoint(tmp_path / "full" / "checkpoints").model_state
    part = load_latest_checkpoint(tmp_path / "part" / "checkpoints").model_state
    assert set(full) == set(part) and any(k.startswith("losses.meta_dmoe.aggregator") for k in full)
    assert all(torch.equal(full[k], part[k]) for k in full)
    # The trained run restores (student, aggregator, experts) and adapts per target domain.
    distiller = restore(cfg, tmp_path / "full")
    splits, _ = load_data(cfg.data)
    logits, targets = adapted_predictions(distiller, splits.test, support_size=16)
    assert logits.shape == (len(splits.test), 10) and torch.isfinite(logits).all()
    assert 0.0 <= accuracy(logits, targets) <= 1.0


@pytest.mark.parametrize("name", ["adam", "sgd"])
def test_scaling_the_update_equals_a_smaller_learning_rate(name):
    # The recipe's aggregator_lr_scale: the optimizer's update times s equals that group at lr * s.
    from transfuse.optim import make_optimizer

    torch.manual_seed(0)
    a, b = nn.Parameter(torch.randn(5)), nn.Parameter(torch.randn(5))
    b.data.copy_(a.data)
    opt_a = make_optimizer([a], name=name, lr=0.1, weight_decay=0.01)
    opt_b = make_optimizer([b], name=name, lr=0.1 * 0.03, weight_decay=0.01)
    for _ in range(4):
        g = torch.randn(5)
        a.grad, b.grad = g.clone(), g.clone()
        old = a.detach().clone()
        opt_a.step()
        with torch.no_grad():
            a.copy_(old + 0.03 * (a - old))
        opt_b.step()
    assert torch.allclose(a, b, atol=1e-7)


@pytest.mark.parametrize("changes, match", [
    ({"participants.e1.train": {"steps": 30}}, "have no train.domains"),
    ({"participants.e1.train.domains": [0]}, "every expert covers domain 0"),
    ({"distill.options": {"tasks": "all"}}, "tasks"),
    ({"distill.options": {"support_fraction": 1.0}}, "support_fraction"),
    ({"distill.options": {"expert_domains": [[0]]}}, "expected 2 lists"),
])
def test_bad_options_fail_at_load(changes, match):
    with pytest.raises(ConfigError, match=match):
        _config(**changes)


def test_without_its_recipe_or_domains_it_fails_clearly(tmp_path):
    from transfuse.errors import UserError
    from transfuse.run import run

    with pytest.raises(UserError, match=r"recipe: \{name: meta_dmoe\}"):
        run(_config(**{"recipe": {"name": "default"}}), out_dir=tmp_path / "a", quiet=True)
    with pytest.raises(ValueError, match="heads must divide"):
        run(_config(**{"distill.options": {"heads": 5}}), out_dir=tmp_path / "b", quiet=True)
