import torch
from torch import nn

from transfuse.distiller import Distiller, Term
from transfuse.losses import LOSSES
from transfuse.teacher import Teacher, logits_of


def _teacher_net():
    return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 3))


def test_teacher_is_frozen_and_eval_locked():
    teacher = Teacher(_teacher_net())
    teacher.train()
    assert not teacher.training and not teacher.model.training
    assert all(not p.requires_grad for p in teacher.parameters())
    x = {"input": torch.randn(8, 4)}
    a, b = teacher.predict(x)["logits"], teacher.predict(x)["logits"]
    assert torch.equal(a, b), "dropout must stay off: the teacher is eval-locked"
    assert not a.requires_grad


def test_teacher_is_outside_the_distillers_parameters_and_state():
    student = nn.Sequential(nn.Linear(4, 3))
    teacher = Teacher(_teacher_net())
    d = Distiller(student, teacher, [Term("kd", LOSSES.get("kd")())])
    d.train()
    assert not teacher.training
    ids = {id(p) for p in d.parameters()}
    assert ids == {id(p) for p in student.parameters()}
    assert all(k.startswith(("student.", "losses.")) for k in d.state_dict())


def test_teacher_taps_features():
    teacher = Teacher(_teacher_net(), taps=["1"])
    out = teacher.predict({"input": torch.randn(2, 4)})
    assert out["1"].shape == (2, 16) and out["logits"].shape == (2, 3)


def test_logits_of_accepts_common_output_types():
    t = torch.randn(2, 3)
    assert logits_of(t) is t
    assert logits_of({"logits": t}) is t

    class Out:
        logits = t

    assert logits_of(Out()) is t
