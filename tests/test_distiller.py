import pytest
import torch
import torch.nn.functional as F
from torch import nn

from transfuse.distiller import Distiller, DistillShapeError, MissingBatchKeyError, Ref, Term
from transfuse.functional import kd
from transfuse.losses import LOSSES
from transfuse.participants import Participant
from transfuse.schedules import Linear, Warmup
from transfuse.sources import Ensemble


def _batch(n=6, classes=3):
    return {"input": torch.randn(n, 4), "target": torch.randint(0, classes, (n,)), "index": torch.arange(n)}


def _net(classes=3):
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, classes))


def _loss(name, **options):
    return LOSSES.get(name).build(**options)


def _kd_distiller(student, teacher, *terms):
    return Distiller([Participant("student", student), Participant("teacher", teacher, trainable=False)], list(terms))


def test_total_is_the_weighted_sum_of_named_parts_and_the_teacher_gets_no_gradient():
    student, teacher_net = _net(), _net()
    d = _kd_distiller(student, teacher_net, Term("ce", _loss("ce"), 0.1, target=None), Term("kd", _loss("kd", temperature=2.0), 0.9))
    # Even a teacher whose parameters were switched back to requires_grad gets no gradient.
    teacher_net.requires_grad_(True)
    batch = _batch()
    out = d(batch, step=0)
    s, t = student(batch["input"]), teacher_net(batch["input"])
    expected_ce = F.cross_entropy(s, batch["target"])
    expected_kd = kd(s, t.detach(), temperature=2.0)
    assert torch.allclose(out["parts"]["ce"], expected_ce)
    assert torch.allclose(out["parts"]["kd"], expected_kd)
    assert torch.allclose(out["loss"], 0.1 * expected_ce + 0.9 * expected_kd)
    out["loss"].backward()
    assert all(p.grad is None for p in teacher_net.parameters())
    assert all(p.grad is not None for p in student.parameters())


def test_trainable_target_is_detached_so_each_term_trains_only_its_input():
    # Deep mutual learning's cross term: the student learns from the peer; the peer must not
    # receive gradient from it (its own term is a separate one).
    student, peer = _net(), _net()
    d = Distiller([Participant("student", student), Participant("peer", peer)],
                  [Term("kl", _loss("kd", temperature=1.0), input="student.logits", target="peer.logits")])
    d(_batch())["loss"].backward()
    assert all(p.grad is None for p in peer.parameters())
    assert all(p.grad is not None for p in student.parameters())
    # Without detaching, the same term trains both sides.
    student.zero_grad(), peer.zero_grad()
    d2 = Distiller([Participant("student", student), Participant("peer", peer)],
                   [Term("kl", _loss("kd", temperature=1.0), input="student.logits", target="peer.logits", detach_target=False)])
    d2(_batch())["loss"].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in peer.parameters())


def test_only_trainable_participants_are_children():
    student, teacher_net = _net(), _net()
    d = _kd_distiller(student, teacher_net, Term("kd", _loss("kd")))
    d.train()
    assert not teacher_net.training
    assert {id(p) for p in d.parameters()} == {id(p) for p in student.parameters()}
    assert all(k.startswith(("models.student.", "losses.")) for k in d.state_dict())


def test_schedule_scales_the_weight_by_step():
    d = _kd_distiller(_net(), _net(), Term("kd", _loss("kd"), 2.0, schedule=Warmup(steps=4)))
    batch = _batch()
    w = [d(batch, step=s)["weights"]["kd"] for s in range(6)]
    assert w == [0.5, 1.0, 1.5, 2.0, 2.0, 2.0]
    assert Linear(steps=10, start=1.0, end=0.0).factor(5) == 0.5


def test_class_count_mismatch_is_a_clear_error():
    d = _kd_distiller(_net(3), _net(5), Term("kd", _loss("kd")))
    with pytest.raises(DistillShapeError, match="student predicts 3 classes and teacher 5"):
        d(_batch())


def test_missing_batch_key_names_the_term():
    d = Distiller([Participant("student", _net())], [Term("ce", _loss("ce"), target=None)])
    with pytest.raises(MissingBatchKeyError, match=r"term 'ce' needs batch entries \['target'\]"):
        d({"input": torch.randn(2, 4)})


def test_unused_sources_never_run():
    class Exploding(nn.Module):
        def forward(self, x):
            raise AssertionError("teacher must not run")

    d = Distiller([Participant("student", _net()), Participant("teacher", Exploding(), trainable=False)],
                  [Term("ce", _loss("ce"), target=None)])
    assert d.frozen() == [] and "teacher" not in d.sources
    d(_batch())


def test_references_are_checked_when_assembled():
    with pytest.raises(ValueError, match="names no source; sources: student"):
        Distiller([Participant("student", _net())], [Term("kd", _loss("kd"))])
    with pytest.raises(ValueError, match="not a trainable participant"):
        _kd_distiller(_net(), _net(), Term("kd", _loss("kd"), input="teacher.logits", target="student.logits"))
    assert Ref.parse("student.layers.act1") == Ref("student", "layers.act1") and Ref.parse("peer") == Ref("peer", "logits")


def test_feature_terms_tap_both_models_and_remove_hooks():
    student, teacher_net = _net(), _net()
    d = _kd_distiller(student, teacher_net, Term("rkd", _loss("rkd"), 1.0, input="student.1", target="teacher.1"))
    out = d(_batch())
    assert torch.isfinite(out["loss"])
    assert len(student[1]._forward_hooks) == 0 and len(teacher_net[1]._forward_hooks) == 0


def test_label_loss_counts_only_labelled_samples_and_teacher_terms_count_all():
    student, teacher_net = _net(), _net()
    d = _kd_distiller(student, teacher_net, Term("ce", _loss("ce"), 1.0, target=None), Term("kd", _loss("kd"), 1.0))
    batch = _batch(8)
    labelled = torch.tensor([True, False, True, False, True, True, False, False])
    batch["target"][~labelled] = -1  # unlabelled samples carry no usable target
    out = d({**batch, "labelled": labelled})
    s, t = student(batch["input"]), teacher_net(batch["input"])
    assert torch.allclose(out["parts"]["ce"], F.cross_entropy(s[labelled], batch["target"][labelled]))
    assert torch.allclose(out["parts"]["kd"], kd(s, t))


def test_per_sample_weights_come_from_a_batch_entry():
    student, teacher_net = _net(), _net()
    d = _kd_distiller(student, teacher_net, Term("kd", _loss("kd"), 1.0, sample_weights="w"))
    batch = _batch(4)
    w = torch.tensor([0.0, 1.0, 2.0, 1.0])
    out = d({**batch, "w": w})
    per_row = kd(student(batch["input"]), teacher_net(batch["input"]), reduction="none")
    assert torch.allclose(out["parts"]["kd"], (w * per_row).mean())


def test_ensemble_source_equals_kd_against_the_mean_prediction():
    student, t1, t2 = _net(), _net(), _net()
    T = 4.0
    d = Distiller(
        [Participant("student", student), Participant("a", t1, trainable=False), Participant("b", t2, trainable=False),
         Ensemble("teachers", ["a", "b"], temperature=T)],
        [Term("kd", _loss("kd", temperature=T), input="student.logits", target="teachers.logits")],
    )
    batch = _batch()
    s = student(batch["input"])
    p = 0.5 * (torch.softmax(t1(batch["input"]) / T, -1) + torch.softmax(t2(batch["input"]) / T, -1))
    expected = T**2 * (p * (p.log() - torch.log_softmax(s / T, -1))).sum(-1).mean()
    assert torch.allclose(d(batch)["loss"], expected, atol=1e-6)


def test_an_ensemble_of_feature_aliases_resolves_them_per_member():
    class Net(nn.Sequential):
        feature_layer = "1"

    def net():
        return Net(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))

    student, t1, t2 = net(), net(), net()
    d = Distiller(
        [Participant("student", student), Participant("a", t1, trainable=False), Participant("b", t2, trainable=False),
         Ensemble("teachers", ["a", "b"], combine="mean_logits")],
        [Term("fit", _loss("fitnet"), input="student.feature", target="teachers.feature")],
    )
    batch = _batch()
    expected = 0.5 * (t1[1](t1[0](batch["input"])) + t2[1](t2[0](batch["input"])))
    s = student[1](student[0](batch["input"]))
    assert torch.allclose(d(batch)["parts"]["fit"], F.mse_loss(s, expected), atol=1e-6)


def test_a_learned_ensemble_learns_to_trust_the_better_teacher(tmp_path):
    from lightning_fabric import Fabric

    from transfuse.data.base import ArrayDataset
    from transfuse.engine import FitSettings, fit
    from transfuse.optim import make_optimizer
    from transfuse.sources import LearnedEnsemble

    torch.manual_seed(0)
    x = torch.randn(256, 4)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()  # 3 classes

    class Oracle(nn.Module):  # a teacher that knows the rule
        def forward(self, inp):
            return 5.0 * F.one_hot((inp[:, 0] > 0).long() + (inp[:, 1] > 0).long(), 3).float()

    student, good, noise = _net(), Oracle(), _net()
    ens = LearnedEnsemble("teachers", ["good", "noise"], temperature=1.0)
    d = Distiller(
        [Participant("student", student), Participant("good", good, trainable=False),
         Participant("noise", noise, trainable=False), ens],
        [Term("ens_ce", _loss("ce"), input="teachers.logits", target=None),
         Term("kd", _loss("kd"), input="student.logits", target="teachers.logits")],
    )
    assert d.trainable_names == ["student", "teachers"] and "learned.teachers.theta" in d.state_dict()
    opts = {"student": make_optimizer(student.parameters(), name="adam", lr=0.01),
            "teachers": make_optimizer(ens.parameters(), name="adam", lr=0.1)}
    fit(Fabric(accelerator="cpu", devices=1), d, opts, ArrayDataset(x, y), FitSettings(steps=40, batch_size=32, progress=False,
        checkpoint_every=40), run_dir=tmp_path)
    w = ens.weights()
    assert w[0] > 0.9, w  # the labels taught it which teacher to trust
    # The KD term's target is detached: without the CE term on the ensemble, its weights would not move.
    d2 = Distiller([Participant("student", _net()), Participant("good", good, trainable=False),
                    Participant("noise", noise, trainable=False), LearnedEnsemble("teachers", ["good", "noise"])],
                   [Term("kd", _loss("kd"), input="student.logits", target="teachers.logits")])
    d2(_batch())["loss"].backward()
    assert d2.learned["teachers"].theta.grad is None
