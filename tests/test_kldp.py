"""KL+DP: the most_confident source (data partitioning), the kl_dp scheme, a tiny run."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file

from transfuse.build import make_ensembles
from transfuse.config import ConfigError, config_from_dict
from transfuse.data import IGNORE_TARGET
from transfuse.sources import MostConfident, most_confident


def _label_probs(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return torch.softmax(logits.double(), dim=-1).gather(1, target.clamp_min(0)[:, None]).squeeze(1)


@pytest.mark.parametrize("seed", range(20))
def test_never_distils_from_the_teacher_where_the_original_is_at_least_as_confident(seed):
    """Property: on random logits, the target is the teacher's only where the teacher gives
    the label a strictly higher probability; everywhere else (ties and unlabelled samples
    included) it is exactly the original student's."""
    g = torch.Generator().manual_seed(seed)
    n, c = 256, 10
    original = torch.randn(n, c, generator=g) * 3
    teacher = torch.randn(n, c, generator=g) * 3
    teacher[:16] = original[:16]  # exact ties
    target = torch.randint(c, (n,), generator=g)
    target[16:40] = IGNORE_TARGET  # unlabelled
    picked, choice = most_confident([original, teacher], target)
    teacher_better = (_label_probs(teacher, target) > _label_probs(original, target)) & (target >= 0)
    assert torch.equal(choice == 1, teacher_better)
    assert torch.equal(picked[~teacher_better], original[~teacher_better])
    assert torch.equal(picked[teacher_better], teacher[teacher_better])
    assert (choice[:40] == 0).all()  # ties and unlabelled samples: the original
    assert 0 < teacher_better.sum() < n - 40  # the property was exercised both ways


def test_the_source_reads_target_and_labelled_from_the_batch():
    source = MostConfident("partition", ["original", "teacher"])
    original = torch.tensor([[2.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 2.0]])
    teacher = torch.tensor([[0.0, 3.0, 0.0], [0.0, 3.0, 0.0], [0.0, 3.0, 0.0]])
    upstream = {"original": {"logits": original}, "teacher": {"logits": teacher}}
    # Sample 0 (label 1): the teacher is more confident; 1 (label 1): too, but it is unlabelled; 2 (label 2): original.
    batch = {"target": torch.tensor([1, 1, 2]), "labelled": torch.tensor([True, False, True])}
    out = source.provide(batch, ["logits"], upstream)["logits"]
    assert torch.equal(out, torch.stack([teacher[0], original[1], original[2]]))
    with pytest.raises(ValueError, match="answers only 'logits'"):
        source.provide(batch, ["feature"], upstream)
    with pytest.raises(KeyError, match="no 'target'"):
        source.provide({"input": torch.zeros(3)}, ["logits"], upstream)


def test_confidence_criterion_and_several_teachers():
    original = torch.tensor([[1.0, 0.0], [5.0, 0.0], [0.0, 0.0]])
    t1 = torch.tensor([[3.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    t2 = torch.tensor([[0.0, 3.0], [0.0, 9.0], [0.0, 0.0]])
    target = torch.tensor([0, 1, 0])
    _, choice = most_confident([original, t1, t2], target)
    assert choice.tolist() == [1, 2, 0]  # label probability; a three-way tie keeps the first
    _, choice = most_confident([original, t1, t2], None, criterion="confidence")
    assert choice.tolist() == [1, 2, 0]  # top-1 probability: t1 and t2 tie on sample 0, the earlier wins
    _, choice = most_confident([original, t2], torch.tensor([0, 0, 0]), criterion="confidence")
    assert choice.tolist() == [1, 1, 0]  # no labels read
    with pytest.raises(ValueError, match="needs the targets"):
        most_confident([original, t1], None)
    nan = original.clone()
    nan[0] = float("nan")
    assert most_confident([nan, t1], target)[1][0].item() == 1  # a NaN prediction never wins


def test_sequences_with_a_per_sample_labelled_mask():
    original, teacher = torch.zeros(2, 3, 4), torch.zeros(2, 3, 4)
    teacher[..., 1] = 5.0
    target = torch.ones(2, 3, dtype=torch.long)
    _, choice = most_confident([original, teacher], target, labelled=torch.tensor([True, False]))
    assert choice.tolist() == [[1, 1, 1], [0, 0, 0]]


# ----------------------------------------------------------------------------- config


def _with_sources(base_config: dict, sources: dict, terms: list | None = None) -> dict:
    cfg = copy.deepcopy(base_config)
    cfg["participants"] = {"student": cfg.pop("student"), "teacher": {**cfg.pop("teacher"), "trainable": False},
                           "original": {"name": "mlp", "options": {"hidden": [16]}, "trainable": False}}
    cfg["sources"] = sources
    cfg["distill"] = {"terms": terms or [{"loss": "kd", "target": "partition.logits", "options": {"temperature": 1.0}}]}
    return cfg


def test_most_confident_source_config_is_typed_and_checked(base_config):
    cfg = config_from_dict(_with_sources(base_config, {"partition": {"members": ["original", "teacher"],
                                                                     "combine": "most_confident"}}))
    assert cfg.sources["partition"].criterion == "label"  # the default, written out
    built = make_ensembles(cfg.sources)["partition"]
    assert isinstance(built, MostConfident) and built.inputs == ("original", "teacher") and built.temperature == 1.0
    bad = [
        ({"members": ["original", "teacher"], "combine": "most_confident", "weights": [1, 1]}, "has no weights"),
        ({"members": ["teacher"], "combine": "most_confident"}, "at least two"),
        ({"members": ["original", "teacher"], "criterion": "label"}, "only a most_confident source"),
        ({"members": ["original", "teacher"], "combine": "most_confidnt"},
         "'mean_probs', 'mean_logits', 'learned', 'most_confident', 'label_only' or 'by_class_group'"),
        ({"members": ["original", "teacher"], "combine": "most_confident", "criterion": "labl"}, "'label' or 'confidence'"),
    ]
    for section, message in bad:
        with pytest.raises(ConfigError, match=message):
            config_from_dict(_with_sources(base_config, {"partition": section}))
    with pytest.raises(ConfigError, match="answers only 'logits'"):
        config_from_dict(_with_sources(
            base_config, {"partition": {"members": ["original", "teacher"], "combine": "most_confident"}},
            terms=[{"loss": "pkt", "target": "partition.feature"}]))


def _kl_dp_config(base_config: dict, weights: str, **distill) -> dict:
    cfg = copy.deepcopy(base_config)
    cfg["student"]["weights"] = weights
    cfg["distill"] = {"method": "kl_dp", **distill}
    return cfg


def test_scheme_adds_the_original_and_partitions_towards_it(base_config):
    cfg = config_from_dict(_kl_dp_config(base_config, "pre.safetensors"))
    original = cfg.participants["original"]
    assert (original.trainable, original.name, original.options, original.weights) == (
        False, "mlp", {"hidden": [16]}, "pre.safetensors")
    (term,) = cfg.resolved_terms()  # the official alpha = 1: no CE term by default
    assert (term.name, term.loss, term.input, term.target, term.weight, term.options) == (
        "kl_dp", "kd", "student.logits", "partition.logits", 1.0, {"temperature": 1.0})
    partition = cfg.resolved_sources()["partition"]
    assert (partition.members, partition.combine, partition.criterion, partition.temperature) == (
        ["original", "teacher"], "most_confident", "label", 1.0)
    # The resolved config lists `original`, and loads again to the same config.
    import yaml
    again = config_from_dict(yaml.safe_load(cfg.to_yaml()))
    assert again.model_dump() == cfg.model_dump()
    with_ce = config_from_dict(_kl_dp_config(base_config, "pre.safetensors", ce_weight=0.5,
                                             options={"criterion": "confidence", "temperature": 2.0}))
    assert [t.loss for t in with_ce.resolved_terms()] == ["ce", "kd"]
    assert with_ce.resolved_sources()["partition"].criterion == "confidence"


def test_scheme_refusals(base_config):
    with pytest.raises(ConfigError, match="PRETRAINED student: give participants.student.weights"):
        config_from_dict({**base_config, "distill": {"method": "kl_dp"}})
    other = _kl_dp_config(base_config, "pre.safetensors")
    other["participants"] = {"original": {"name": "mlp", "options": {"hidden": [32]}, "weights": "pre.safetensors",
                                          "trainable": False}}
    with pytest.raises(ConfigError, match="options differ"):
        config_from_dict(other)
    alone = _kl_dp_config(base_config, "pre.safetensors")
    del alone["teacher"]
    with pytest.raises(ConfigError, match="needs a teacher"):
        config_from_dict(alone)
    with pytest.raises(ConfigError, match="it accepts: temperature, criterion"):
        config_from_dict(_kl_dp_config(base_config, "pre.safetensors", options={"temprature": 1.0}))


def test_tiny_run_keeps_the_original_frozen_and_learns(base_config, tmp_path):
    from transfuse.run import run

    scratch = copy.deepcopy(base_config)
    del scratch["teacher"]
    scratch["distill"] = {"method": "none"}
    pre = run(config_from_dict(scratch), out_dir=tmp_path / "pre", quiet=True)
    weights = tmp_path / "pre" / "student.safetensors"
    cfg = config_from_dict(_kl_dp_config(base_config, str(weights)))
    summary = run(cfg, out_dir=tmp_path / "kl_dp", quiet=True)
    assert summary["method"] == "kl_dp" and summary["terms"] == {"kl_dp": 1.0} and summary["steps"] == 40
    parts = summary["participants"]
    assert parts["original"]["trainable"] is False
    assert parts["original"]["accuracy"] == pre["student"]["accuracy"]  # the frozen copy is the pretrained student
    trained = load_file(tmp_path / "kl_dp" / "student.safetensors")
    start = load_file(weights)
    assert any(not torch.equal(trained[k], start[k]) for k in start)  # the student moved
    assert all(torch.isfinite(v).all() for v in trained.values())
