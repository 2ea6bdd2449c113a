import pytest
import torch
import torch.nn.functional as F
from torch import nn

from transfuse.distiller import Distiller, DistillShapeError, MissingBatchKeyError, Term, probe_shapes
from transfuse.functional import kd
from transfuse.losses import LOSSES
from transfuse.schedules import Linear, Warmup
from transfuse.teacher import Teacher


def _batch(n=6, classes=3):
    return {"input": torch.randn(n, 4), "target": torch.randint(0, classes, (n,)), "index": torch.arange(n)}


def _student(classes=3):
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, classes))


def test_total_is_the_weighted_sum_of_named_parts():
    student, teacher_net = _student(), _student()
    d = Distiller(student, Teacher(teacher_net), [Term("ce", LOSSES.get("ce")(), 0.1), Term("kd", LOSSES.get("kd")(temperature=2.0), 0.9)])
    batch = _batch()
    out = d(batch, step=0)
    s, t = student(batch["input"]), teacher_net(batch["input"])
    expected_ce = F.cross_entropy(s, batch["target"])
    expected_kd = kd(s, t, temperature=2.0)
    assert torch.allclose(out["parts"]["ce"], expected_ce)
    assert torch.allclose(out["parts"]["kd"], expected_kd)
    assert torch.allclose(out["loss"], 0.1 * expected_ce + 0.9 * expected_kd)
    out["loss"].backward()
    assert all(p.grad is None for p in teacher_net.parameters())
    assert all(p.grad is not None for p in student.parameters())


def test_schedule_scales_the_weight_by_step():
    d = Distiller(_student(), Teacher(_student()), [Term("kd", LOSSES.get("kd")(), 2.0, schedule=Warmup(steps=4))])
    batch = _batch()
    w = [d(batch, step=s)["weights"]["kd"] for s in range(6)]
    assert w == [0.5, 1.0, 1.5, 2.0, 2.0, 2.0]
    assert Linear(steps=10, start=1.0, end=0.0).factor(5) == 0.5


def test_class_count_mismatch_is_a_clear_error():
    d = Distiller(_student(3), Teacher(_student(5)), [Term("kd", LOSSES.get("kd")())])
    with pytest.raises(DistillShapeError, match="student predicts 3 classes and the teacher 5"):
        d(_batch())


def test_missing_batch_key_names_the_term():
    d = Distiller(_student(), None, [Term("ce", LOSSES.get("ce")())])
    with pytest.raises(MissingBatchKeyError, match=r"term 'ce' needs batch entries \['target'\]"):
        d({"input": torch.randn(2, 4)})


def test_teacher_not_run_without_teacher_terms():
    class Exploding(nn.Module):
        def forward(self, x):
            raise AssertionError("teacher must not run")

    d = Distiller(_student(), Teacher(Exploding()), [Term("ce", LOSSES.get("ce")())])
    assert d.teacher is None
    d(_batch())


def test_teacher_required_for_teacher_terms():
    with pytest.raises(ValueError, match="no teacher"):
        Distiller(_student(), None, [Term("kd", LOSSES.get("kd")())])


def test_feature_terms_tap_both_models():
    student, teacher_net = _student(), _student()
    loss = LOSSES.get("rkd")()
    d = Distiller(student, Teacher(teacher_net), [Term("rkd", loss, 1.0, student_key="1", teacher_key="1")])
    out = d(_batch())
    assert torch.isfinite(out["loss"])
    assert len(student[1]._forward_hooks) == 0 and len(teacher_net[1]._forward_hooks) == 0


def test_probe_shapes_restores_mode():
    student = _student()
    student.train()
    shapes = probe_shapes(student, ["1"], _batch(), role="student")
    assert shapes == {"logits": (3,), "1": (8,)} and student.training
