"""The Core v2 witnesses, from the shipped configs: mutual learning, several teachers, the
teacher-output cache, the unlabelled transfer set, and bf16 precision on the CPU."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from transfuse.cache_teacher import cache_teacher
from transfuse.config import load_config
from transfuse.run import run

ROOT = Path(__file__).resolve().parents[1]
FAST = ["train.steps=60", "train.checkpoint_every=30", "train.log_every=30", "train.progress=false"]


def _cfg(name, teacher_cache, *extra):
    cfg = load_config(ROOT / "configs" / "digits" / f"{name}.yaml", [*FAST, *extra])
    # Tiny teachers trained once per session, in the session's cache folder.
    updates = {}
    for pname, p in cfg.participants.items():
        if not p.trainable:
            updates[pname] = p.model_copy(update={"cache_dir": str(teacher_cache), "train": p.train.model_copy(update={"steps": 150})})
    return cfg.model_copy(update={"participants": {**cfg.participants, **updates}})


def test_dml_trains_both_peers_and_reports_both(tmp_path, teacher_cache):
    summary = run(_cfg("dml", teacher_cache), out_dir=tmp_path / "dml", quiet=True)
    assert set(summary["participants"]) == {"student", "peer"}
    assert all(p["trainable"] and 0.3 < p["accuracy"] <= 1.0 for p in summary["participants"].values())
    assert summary["teacher"] is None
    assert sorted(summary["terms"]) == ["ce_peer", "ce_student", "kl_peer_from_student", "kl_student_from_peer"]
    a, b = load_file(tmp_path / "dml" / "student.safetensors"), load_file(tmp_path / "dml" / "peer.safetensors")
    assert any(not torch.equal(a[k], b[k]) for k in a), "the peers start from different weights"
    rows = [json.loads(r) for r in (tmp_path / "dml" / "metrics.jsonl").read_text().splitlines()]
    assert {"loss/kl_student_from_peer", "loss/kl_peer_from_student"} <= set(rows[-1])


def test_multi_teacher_learns_from_the_mean_of_two_teachers(tmp_path, teacher_cache):
    summary = run(_cfg("multi_teacher", teacher_cache), out_dir=tmp_path / "mt", quiet=True)
    frozen = {n: p for n, p in summary["participants"].items() if not p["trainable"]}
    assert set(frozen) == {"teacher", "teacher_2"} and all(p["accuracy"] > 0.5 for p in frozen.values())
    assert summary["terms"] == {"ce": 0.1, "multi_teacher": 0.9}


def test_kd_from_the_dense_cache_is_bit_identical_to_live_kd(tmp_path, teacher_cache):
    live = run(_cfg("kd", teacher_cache), out_dir=tmp_path / "live", quiet=True)
    report = cache_teacher(_cfg("kd", teacher_cache), tmp_path / "cache", quiet=True)
    assert report["samples"] == 1347 and report["fields"] == {"logits": [10]}
    cached = run(_cfg("kd", teacher_cache, f"teacher.cache={tmp_path / 'cache'}"), out_dir=tmp_path / "cached", quiet=True)
    assert cached["cached"] == ["teacher"] and live["student"]["accuracy"] == cached["student"]["accuracy"]
    a, b = load_file(tmp_path / "live" / "student.safetensors"), load_file(tmp_path / "cached" / "student.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # An fp16 cache is a close, not an exact, stand-in.
    cache_teacher(_cfg("kd", teacher_cache), tmp_path / "cache16", dtype="float16", quiet=True)
    half = run(_cfg("kd", teacher_cache, f"teacher.cache={tmp_path / 'cache16'}"), out_dir=tmp_path / "half", quiet=True)
    assert abs(half["student"]["accuracy"] - live["student"]["accuracy"]) < 0.05


def test_kd_with_a_transfer_set_sees_unlabelled_samples(tmp_path, teacher_cache):
    summary = run(_cfg("kd_transfer", teacher_cache), out_dir=tmp_path / "tr", quiet=True)
    assert summary["student_labelled_samples"] == 300 and summary["student_train_samples"] == 1347


def test_a_transfer_set_cache_covers_every_training_sample(tmp_path, teacher_cache):
    cfg = _cfg("kd_transfer", teacher_cache)
    cache_teacher(cfg, tmp_path / "cache", quiet=True)
    live = run(cfg, out_dir=tmp_path / "live", quiet=True)
    cached = run(_cfg("kd_transfer", teacher_cache, f"teacher.cache={tmp_path / 'cache'}"), out_dir=tmp_path / "c", quiet=True)
    a, b = load_file(tmp_path / "live" / "student.safetensors"), load_file(tmp_path / "c" / "student.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a) and live["student"]["accuracy"] == cached["student"]["accuracy"]


@pytest.mark.parametrize("precision", ["bf16-true", "bf16-mixed"])
def test_bf16_runs_complete_on_the_cpu(tmp_path, teacher_cache, precision):
    summary = run(_cfg("kd", teacher_cache, f"fabric.precision={precision}"), out_dir=tmp_path / precision, quiet=True)
    assert summary["steps"] == 60 and 0.0 <= summary["student"]["accuracy"] <= 1.0
    assert summary["teacher"]["accuracy"] > 0.5


def test_dml_with_the_alternating_recipe_and_its_own_optimizer_per_peer(tmp_path, teacher_cache):
    cfg = _cfg("dml", teacher_cache, "recipe.name=alternating", "participants.peer.optim={name: sgd, lr: 0.05}")
    summary = run(cfg, out_dir=tmp_path / "alt", quiet=True)
    assert all(p["accuracy"] > 0.3 for p in summary["participants"].values())
    from transfuse.checkpoint import latest_checkpoint, load_checkpoint

    _, state = load_checkpoint(latest_checkpoint(tmp_path / "alt" / "checkpoints"))
    assert sorted(state["optimizers"]) == ["peer", "student"]
    assert "momentum_buffer" in str(state["optimizers"]["peer"]) and "exp_avg" in str(state["optimizers"]["student"])


def test_a_learned_ensemble_from_a_config(tmp_path, teacher_cache):
    cfg = load_config(ROOT / "configs" / "digits" / "multi_teacher.yaml", [
        *FAST, f"teacher.cache_dir={teacher_cache}", "teacher.train.steps=150",
        f"participants.teacher_2.cache_dir={teacher_cache}", "participants.teacher_2.train.steps=5",
        "sources={teachers: {members: [teacher, teacher_2], combine: learned, temperature: 4.0, optim: {name: adam, lr: 0.05}}}",
        "distill={terms: [{loss: ce, weight: 0.1}, {loss: ce, name: ensemble_ce, input: teachers.logits},"
        " {loss: kd, weight: 0.9, target: teachers.logits}]}",
    ])
    summary = run(cfg, out_dir=tmp_path / "learned", quiet=True)
    weights = summary["learned_weights"]["teachers"]
    assert abs(sum(weights.values()) - 1) < 1e-6
    assert weights["teacher"] > weights["teacher_2"], "a 5-step teacher must earn the smaller weight"
