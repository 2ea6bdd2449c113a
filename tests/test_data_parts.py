"""Parts of the data: specialists trained on class groups, novel classes without labels,
held-out samples for a recipe, and the by_class_group source that routes by label."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file

from transfuse.build import load_student_data, teacher_train_set
from transfuse.config import ConfigError, DataConfig, config_from_dict
from transfuse.data import IGNORE_TARGET
from transfuse.recipes import RECIPES, DefaultRecipe
from transfuse.run import build_recipe, run
from transfuse.sources import ByClassGroup, by_class_group

GROUPS = [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]


def _specialists(base: dict) -> dict:
    cfg = copy.deepcopy(base)
    teacher = cfg.pop("teacher")
    cfg["participants"] = {
        "student": cfg.pop("student"),
        **{f"spec_{i}": {**copy.deepcopy(teacher), "trainable": False,
                         "train": {**teacher.get("train", {}), "classes": g}} for i, g in enumerate(GROUPS)},
    }
    cfg["sources"] = {"specialists": {"members": ["spec_0", "spec_1"], "combine": "by_class_group"}}
    cfg["distill"] = {"terms": [{"loss": "ce"}, {"loss": "kd", "target": "specialists.logits"}]}
    return cfg


def test_by_class_group_routes_each_labelled_sample_to_its_specialist_and_the_rest_by_confidence():
    a = torch.tensor([[4.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    b = torch.tensor([[0.0, 0.0, 3.0, 0.0], [0.0, 0.0, 5.0, 0.0], [0.0, 0.0, 0.0, 9.0], [0.0, 0.0, 0.0, 0.5]])
    table = torch.tensor([0, 0, 1, 1])  # classes 0, 1 -> member 0; 2, 3 -> member 1
    target = torch.tensor([2, 0, IGNORE_TARGET, 1])
    labelled = torch.tensor([True, True, True, False])
    logits, group = by_class_group([a, b], target, table, labelled=labelled)
    # 0: label 2 -> b; 1: label 0 -> a although b is more confident; 2: no label -> b (more confident);
    # 3: labelled False -> the more confident member, a (top-1 of a's row is higher than b's).
    assert group.tolist() == [1, 0, 1, 0]
    assert torch.equal(logits, torch.stack([b[0], a[1], b[2], a[3]]))


def test_by_class_group_source_answers_logits_and_group_and_refuses_overlaps():
    source = ByClassGroup("s", ["x", "y"], groups=[[0, 1], [2]])
    up = {"x": {"logits": torch.zeros(2, 3)}, "y": {"logits": torch.ones(2, 3)}}
    out = source.provide({"target": torch.tensor([2, 1])}, ["logits", "group"], up)
    assert out["group"].tolist() == [1, 0]
    with pytest.raises(ValueError, match="answers only"):
        source.provide({"target": torch.tensor([2, 1])}, ["feature"], up)
    with pytest.raises(ValueError, match="disjoint"):
        ByClassGroup("s", ["x", "y"], groups=[[0, 1], [1]])


def test_specialists_train_on_their_classes_only_and_the_student_learns_from_them(base_config, tmp_path):
    raw = _specialists(base_config)
    raw["train"]["steps"] = 300
    cfg = config_from_dict(raw)
    splits, _, _ = load_student_data(cfg.data)
    part = teacher_train_set(cfg.participants["spec_1"], splits, role="spec_1")
    assert set(torch.as_tensor(part.targets).unique().tolist()) == set(GROUPS[1])
    summary = run(cfg, out_dir=tmp_path / "run", quiet=True)
    # A specialist never saw the other group's classes: right on (nearly all of) its own half only.
    for name in ("spec_0", "spec_1"):
        assert 0.4 < summary["participants"][name]["accuracy"] < 0.55
    # Routed by label, together the specialists teach every class.
    assert summary["student"]["accuracy"] > 0.8


def test_specialist_options_are_checked_at_load(base_config):
    cfg = _specialists(base_config)
    bad = copy.deepcopy(cfg)
    bad["participants"]["spec_1"]["train"]["classes"] = [4, 5]
    with pytest.raises(ConfigError, match="class 4 is in the train.classes of both"):
        config_from_dict(bad)
    bad = copy.deepcopy(cfg)
    del bad["participants"]["spec_1"]["train"]["classes"]
    with pytest.raises(ConfigError, match="must be a frozen participant with train.classes"):
        config_from_dict(bad)
    bad = copy.deepcopy(cfg)
    bad["participants"]["student"]["train"] = {"classes": [1]}
    with pytest.raises(ConfigError, match="only a frozen participant that is trained first"):
        config_from_dict(bad)
    bad = copy.deepcopy(cfg)
    bad["participants"]["spec_0"]["train"]["classes"] = [1, 1]
    with pytest.raises(ConfigError, match="each value may appear once"):
        config_from_dict(bad)


def test_classes_outside_the_data_and_domains_without_domains_fail_before_training(base_config):
    cfg = _specialists(base_config)
    cfg["participants"]["spec_1"]["train"]["classes"] = [5, 6, 12]
    parsed = config_from_dict(cfg)
    splits, _, _ = load_student_data(parsed.data)
    with pytest.raises(ValueError, match=r"train.classes: \[12\] are not classes"):
        teacher_train_set(parsed.participants["spec_1"], splits, role="spec_1")
    cfg["participants"]["spec_1"]["train"]["classes"] = [5, 6]
    cfg["participants"]["spec_1"]["train"]["domains"] = [0]
    parsed = config_from_dict(cfg)
    with pytest.raises(ValueError, match="has no domains"):
        teacher_train_set(parsed.participants["spec_1"], splits, role="spec_1")


def test_novel_classes_lose_their_labels_in_training_only():
    splits, train_set, holdout = load_student_data(DataConfig(name="digits", novel_classes=[7, 8, 9]))
    assert holdout is None
    labelled = train_set.labelled
    assert not set(torch.as_tensor(labelled.targets).tolist()) & {7, 8, 9}
    batch = train_set.__getitems__(list(range(len(train_set))))
    unl = ~batch["labelled"]
    assert int(unl.sum()) == int(torch.isin(torch.as_tensor(splits.train.targets), torch.tensor([7, 8, 9])).sum())
    assert (batch["target"][unl] == IGNORE_TARGET).all()
    assert set(torch.as_tensor(splits.test.targets).unique().tolist()) == set(range(10))  # the test keeps every label
    with pytest.raises(ConfigError, match="leave transfer out"):
        config_from_dict({"data": {"name": "digits", "novel_classes": [9], "label_subset": 50, "transfer": "rest"},
                          "student": {"name": "mlp"}})


def test_holdout_is_stratified_disjoint_and_deterministic():
    cfg = DataConfig(name="digits", holdout_fraction=0.2)
    splits, train_set, holdout = load_student_data(cfg)
    n = len(splits.train)
    assert len(holdout) == round(0.2 * n) and len(train_set) + len(holdout) == n
    assert not set(holdout.sample_ids.tolist()) & set(train_set.sample_ids.tolist())
    counts = torch.bincount(torch.as_tensor(holdout.targets), minlength=10)
    assert int(counts.max() - counts.min()) <= 1
    _, _, again = load_student_data(cfg)
    assert torch.equal(again.sample_ids, holdout.sample_ids)
    # With a transfer set of the rest, the held-out samples are not in it either.
    _, tset, held = load_student_data(DataConfig(name="digits", label_subset=500, holdout_fraction=0.2, transfer="rest"))
    ids = torch.cat([tset.labelled.sample_ids, tset.unlabelled.sample_ids])
    assert not set(held.sample_ids.tolist()) & set(ids.tolist())
    assert len(ids) + len(held) == n


class _NeedsHoldout(DefaultRecipe):
    def __init__(self, *, holdout, seed: int = 0, lr: float = 0.1) -> None:
        self.holdout, self.seed, self.lr = holdout, seed, lr


def test_a_recipe_that_takes_holdout_gets_it_and_configs_are_checked(base_config):
    RECIPES.register("_test_needs_holdout", summary="test only")(_NeedsHoldout)
    try:
        recipe = build_recipe("_test_needs_holdout", {"lr": 0.5}, holdout="H", seed=3)
        assert (recipe.holdout, recipe.seed, recipe.lr) == ("H", 3, 0.5)
        cfg = copy.deepcopy(base_config)
        cfg["recipe"] = {"name": "_test_needs_holdout"}
        with pytest.raises(ConfigError, match="data.holdout_fraction: recipe '_test_needs_holdout' learns from held-out"):
            config_from_dict(cfg)
        cfg["data"]["holdout_fraction"] = 0.2
        config_from_dict(cfg)
    finally:
        RECIPES.unregister("_test_needs_holdout")
    cfg = copy.deepcopy(base_config)
    cfg["data"]["holdout_fraction"] = 0.2
    with pytest.raises(ConfigError, match="reads no held-out data"):
        config_from_dict(cfg)


def test_a_loss_with_its_own_step_names_the_recipe_it_needs(base_config):
    cfg = copy.deepcopy(base_config)
    cfg["distill"] = {"method": "tgeo"}
    with pytest.raises(ConfigError, match=r"loss 'tgeo' is trained by its own step; set recipe: \{name: tgeo_bilevel\}"):
        config_from_dict(cfg)
    cfg["recipe"] = {"name": "tgeo_bilevel", "options": {"holdout": [1, 2]}}
    cfg["data"]["holdout_fraction"] = 0.2
    with pytest.raises(ConfigError, match="recipe.options.holdout: the held-out samples come from data.holdout_fraction"):
        config_from_dict(cfg)
