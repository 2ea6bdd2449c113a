"""The classic feature and relation methods against their official code.

Official code read for these tests: RepDistiller (github.com/HobbitLong/RepDistiller, the
CRD authors' code base, which also holds FitNets, AT, SP, RKD and PKT) and mdistiller
(github.com/megvii-research/mdistiller). Each ``official_*`` function below is a
re-statement, written here, of the formula those code bases compute (same operations,
same order of normalisations and means), used as the reference on random tensors. The
default tests pin each method's hyper-parameters to the official values and say where
each comes from.
"""

from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from transfuse import functional as TF
from transfuse.functional.relations import crd_nce_with_gradient
from transfuse.losses import CRD, LOSSES
from transfuse.models import build_model
from transfuse.participants import Participant

# ---------------------------------------------------------------------------------------
# Official formulas, re-stated


def official_sp(f_s, f_t):
    """RepDistiller ``Similarity.similarity_loss`` / mdistiller ``similarity_loss``."""
    b = f_s.shape[0]
    g_s = F.normalize(f_s.reshape(b, -1) @ f_s.reshape(b, -1).t())
    g_t = F.normalize(f_t.reshape(b, -1) @ f_t.reshape(b, -1).t())
    return ((g_t - g_s) ** 2).sum() / (b * b)


def official_pdist(e, eps=1e-12):
    sq = e.pow(2).sum(1)
    d = (sq[:, None] + sq[None, :] - 2 * e @ e.t()).clamp(min=eps).sqrt().clone()
    d[range(len(e)), range(len(e))] = 0
    return d


def official_rkd(f_s, f_t, w_d=25.0, w_a=50.0):
    """RepDistiller ``RKDLoss`` / mdistiller ``rkd_loss`` (teacher side without gradient there;
    the teacher's features are detached here anyway)."""
    s, t = f_s.reshape(f_s.shape[0], -1), f_t.reshape(f_t.shape[0], -1)
    t_d = official_pdist(t)
    t_d = t_d / t_d[t_d > 0].mean()
    d = official_pdist(s)
    d = d / d[d > 0].mean()
    loss_d = F.smooth_l1_loss(d, t_d)
    return w_d * loss_d + w_a * official_rkd_angle(s, t)


def official_rkd_angle(s, t):
    def angles(e):
        unit = F.normalize(e.unsqueeze(0) - e.unsqueeze(1), p=2, dim=2)
        return torch.bmm(unit, unit.transpose(1, 2)).reshape(-1)

    return F.smooth_l1_loss(angles(s), angles(t))


def official_pkt(f_s, f_t, eps=1e-7):
    """RepDistiller ``PKT.cosine_similarity_loss`` / mdistiller ``pkt_loss``."""

    def probs(f):
        f = f / (f.pow(2).sum(1, keepdim=True).sqrt() + eps)
        sim = (f @ f.t() + 1.0) / 2.0
        return sim / sim.sum(1, keepdim=True)

    p_s, p_t = probs(f_s), probs(f_t)
    return (p_t * torch.log((p_t + eps) / (p_s + eps))).mean()


def official_at(f_s, f_t, p=2):
    """mdistiller ``single_stage_at_loss`` (RepDistiller ``Attention.at_loss`` is the same)."""

    def at(f):
        return F.normalize(f.pow(p).mean(1).reshape(f.shape[0], -1))

    s_h, t_h = f_s.shape[2], f_t.shape[2]
    if s_h > t_h:
        f_s = F.adaptive_avg_pool2d(f_s, (t_h, t_h))
    elif s_h < t_h:
        f_t = F.adaptive_avg_pool2d(f_t, (s_h, s_h))
    return (at(f_s) - at(f_t)).pow(2).mean()


class OfficialCRD:
    """RepDistiller's ``ContrastMemory`` + ``ContrastLoss`` (mdistiller copies them), with the
    dataset's contrast indices given: ``idx[:, 0]`` the positive, ``idx[:, 1:]`` the K negatives."""

    def __init__(self, memory_v1, memory_v2, temperature=0.07, momentum=0.5):
        self.memory_v1, self.memory_v2 = memory_v1.clone(), memory_v2.clone()  # (N, F) student / teacher banks
        self.t, self.m = temperature, momentum
        self.z_v1 = self.z_v2 = -1.0

    def step(self, v1, v2, y, idx):
        n, k = self.memory_v1.shape[0], idx.shape[1] - 1
        out_v2 = torch.exp(torch.bmm(self.memory_v1[idx.reshape(-1)].reshape(*idx.shape, -1), v2[:, :, None]) / self.t)
        out_v1 = torch.exp(torch.bmm(self.memory_v2[idx.reshape(-1)].reshape(*idx.shape, -1), v1[:, :, None]) / self.t)
        if self.z_v1 < 0:
            self.z_v1 = (out_v1.mean() * n).item()
        if self.z_v2 < 0:
            self.z_v2 = (out_v2.mean() * n).item()
        out_v1, out_v2 = (out_v1 / self.z_v1).squeeze(2), (out_v2 / self.z_v2).squeeze(2)
        with torch.no_grad():
            for bank, v in ((self.memory_v1, v1), (self.memory_v2, v2)):
                pos = bank[y] * self.m + v * (1 - self.m)
                bank[y] = pos / pos.pow(2).sum(1, keepdim=True).sqrt()

        def contrast_loss(x):
            pn, eps = 1 / n, 1e-7
            log_d1 = torch.log(x[:, 0] / (x[:, 0] + k * pn + eps))
            log_d0 = torch.log((k * pn) / (x[:, 1:] + k * pn + eps))
            return -(log_d1.sum() + log_d0.sum()) / x.shape[0]

        return contrast_loss(out_v1) + contrast_loss(out_v2)  # student anchor + teacher anchor


def _grads(value, inputs):
    return torch.autograd.grad(value, inputs)


def _assert_same(ours, official, inputs, *, rtol=1e-9, atol=1e-12):
    assert torch.allclose(ours, official, rtol=rtol, atol=atol), (ours.item(), official.item())
    for a, b in zip(_grads(ours, inputs), _grads(official, inputs)):
        assert torch.allclose(a, b, rtol=rtol * 1e3, atol=atol * 1e3), (a - b).abs().max()


def _pair(b, d_s, d_t, *, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(b, *d_s, generator=g, dtype=dtype).requires_grad_(True)
    t = torch.randn(b, *d_t, generator=g, dtype=dtype).requires_grad_(True)
    return s, t


# ---------------------------------------------------------------------------------------
# Default hyper-parameters, one test per method


def _weights(name):
    spec = LOSSES.get(name)
    return spec.weight, spec.ce_weight, spec.inputs


def test_fitnet_defaults_are_official():
    """RepDistiller: ``-b 100`` with ``-r 1`` (scripts/run_cifar_distill.sh), ``HintLoss`` = MSE;
    mdistiller: ``FITNET.LOSS.FEAT_WEIGHT 100``, ``CE_WEIGHT 1``. The hint is the middle stage
    (``--hint_layer 2`` / ``HINT_LAYER: 2``), tapped through ``hint``."""
    assert _weights("fitnet") == (100.0, 1.0, "hint")
    assert LOSSES.get("fitnet").option_defaults() == {"relu": False}  # a documented deviation (ConvReg has a ReLU)


def test_at_defaults_are_official():
    """mdistiller: ``AT.P 2``, ``FEAT_WEIGHT 1000``, ``CE_WEIGHT 1``; RepDistiller: ``Attention(p=2)``, ``-b 1000``."""
    assert _weights("at") == (1000.0, 1.0, "hint")
    assert LOSSES.get("at").option_defaults() == {"p": 2.0}


def test_sp_defaults_are_official():
    """mdistiller: ``SP.LOSS.FEAT_WEIGHT 3000``, ``CE_WEIGHT 1``; RepDistiller: ``-b 3000``. No options."""
    weight, ce_weight, _ = _weights("sp")
    assert (weight, ce_weight) == (3000.0, 1.0)
    assert LOSSES.get("sp").option_defaults() == {}


def test_rkd_defaults_are_official():
    """mdistiller: ``RKD.DISTANCE_WEIGHT 25``, ``ANGLE_WEIGHT 50``, ``FEAT_WEIGHT 1``, ``CE_WEIGHT 1``;
    RepDistiller: ``RKDLoss(w_d=25, w_a=50)``, ``-b 1``. On the pooled embedding (``feat[-1]``)."""
    assert _weights("rkd") == (1.0, 1.0, "feature")
    assert LOSSES.get("rkd").option_defaults() == {"distance_weight": 25.0, "angle_weight": 50.0}


def test_pkt_defaults_are_official():
    """mdistiller: ``PKT.LOSS.FEAT_WEIGHT 30000``, ``CE_WEIGHT 1``, ``eps=1e-7``; RepDistiller ``-b 30000``.
    On the pooled embedding (``feat[-1]``)."""
    assert _weights("pkt") == (30000.0, 1.0, "feature")
    assert LOSSES.get("pkt").option_defaults() == {"eps": 1e-7}


def test_crd_defaults_are_official():
    """RepDistiller ``train_student.py``: ``--feat_dim 128 --nce_k 16384 --nce_t 0.07 --nce_m 0.5
    --mode exact``, run with ``-b 0.8 -r 1``; mdistiller ``CFG.CRD``: the same (``FEAT.DIM 128``,
    ``NCE.K 16384``, ``NCE.TEMPERATURE 0.07``, ``NCE.MOMENTUM 0.5``, ``MODE exact``,
    ``FEAT_WEIGHT 0.8``, ``CE_WEIGHT 1``). On the pooled embedding (``feat[-1]``)."""
    assert _weights("crd") == (0.8, 1.0, "feature")
    assert LOSSES.get("crd").option_defaults() == {
        "feat_dim": 128, "num_negatives": 16384, "nce_temperature": 0.07, "momentum": 0.5, "negatives": "exact",
    }
    assert LOSSES.get("crd").needs == ("index", "target")


# ---------------------------------------------------------------------------------------
# Formulas against the official ones


@pytest.mark.parametrize("shapes", [((6,), (9,)), ((3, 4, 4), (5, 2, 2))])
def test_sp_equals_the_official_formula(shapes):
    s, t = _pair(10, *shapes)
    _assert_same(TF.similarity_preserving(s, t), official_sp(s, t), (s, t))


@pytest.mark.parametrize("batch, d_s, d_t", [(7, 5, 3), (24, 16, 40), (130, 12, 6)])
def test_rkd_equals_the_official_formula(batch, d_s, d_t):
    # 130 samples: the angle term is computed in several blocks of vertices, the last one partial.
    s, t = _pair(batch, (d_s,), (d_t,), seed=batch)
    _assert_same(TF.rkd(s, t), official_rkd(s, t), (s, t))


def test_rkd_angle_gram_form_keeps_degenerate_triplets_at_zero():
    # Duplicate samples: zero edges, whose unit vector is 0 in the official F.normalize form.
    s, t = _pair(9, (4,), (3,), seed=3)
    s = torch.cat([s, s[:2]]).detach().requires_grad_(True)
    t = torch.cat([t, t[:2]]).detach().requires_grad_(True)
    _assert_same(TF.rkd_angle(s, t), official_rkd_angle(s, t), (s, t))
    s32 = s.detach().float().requires_grad_(True)
    TF.rkd_angle(s32, t.detach().float()).backward()
    assert torch.isfinite(s32.grad).all()


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any operation returns."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for item in tree_flatten(out)[0]:
            if isinstance(item, torch.Tensor):
                self.largest = max(self.largest, item.numel())
        return out


def test_rkd_angle_never_builds_difference_vectors():
    # The straightforward form holds the B x B x D edge vectors (and a B^3 D product); the
    # Gram form needs B^2 D for the Gram matrix and blocks of at most B^3 cosines.
    batch, dim = 24, 500
    s, t = torch.randn(batch, dim, requires_grad=True), torch.randn(batch, dim)
    with _LargestTensor() as seen:
        TF.rkd_angle(s, t).backward()
    assert seen.largest <= batch**3 < batch * batch * dim


def test_pkt_equals_the_official_formula():
    s, t = _pair(12, (7,), (5,))
    _assert_same(TF.pkt(s, t), official_pkt(s, t), (s, t))


@pytest.mark.parametrize("shapes", [((3, 8, 8), (5, 8, 8)), ((3, 8, 8), (4, 4, 4)), ((2, 2, 2), (6, 4, 4))])
def test_at_equals_the_official_formula(shapes):
    s, t = _pair(5, *shapes)
    _assert_same(TF.attention_transfer(s, t), official_at(s, t), (s, t))


def test_fitnet_is_mse_of_the_regressed_hint():
    loss = LOSSES.get("fitnet").from_shapes(student_shape=(4, 8, 8), teacher_shape=(6, 8, 8), num_train_samples=1)
    s, t = torch.randn(3, 4, 8, 8, requires_grad=True), torch.randn(3, 6, 8, 8)
    assert torch.equal(loss(s, t), F.mse_loss(loss.regressor(s), t))  # RepDistiller HintLoss = nn.MSELoss


# ---------------------------------------------------------------------------------------
# Which layer is tapped


@pytest.mark.parametrize(
    "name, options, hint, last_map",
    [
        ("resnet", {"depth": 8, "width": 4}, "layer2", "layer3"),  # feats[2] / feats[-2] of the official resnets
        ("wrn", {"depth": 10, "widen_factor": 1}, "layer2", "layer3"),  # raw stage outputs, as officially tapped
        ("cnn", {"channels": [8, 16]}, "features.block1", "features.block2"),  # the 2-block CNN of configs/digits
        ("cnn", {"channels": [4, 4, 4]}, "features.block2", "features.block3"),
        ("mlp", {"hidden": [32, 16, 8]}, "layers.act2", "layers.act3"),
        ("mlp", {"hidden": [32]}, "layers.act1", "layers.act1"),
    ],
)
def test_hint_is_the_middle_stage_and_map_the_last(name, options, hint, last_map):
    model = build_model(name, input_shape=(3, 16, 16), num_classes=10, **options)
    student = Participant("student", model)
    assert student.resolve_field("hint") == hint  # FitNets' (and AT's) default input
    assert model.map_layer == last_map  # SP's official layer: name it as student.<path>


def test_fitnet_default_term_taps_the_middle_stage():
    from transfuse.config import TermConfig

    assert TermConfig(loss="fitnet").refs() == ("student.hint", "teacher.hint")
    assert TermConfig(loss="sp", input="student.layer3", target="teacher.layer3").refs() == (
        "student.layer3", "teacher.layer3")


# ---------------------------------------------------------------------------------------
# CRD


def _crd(num_train, *, seed=0, **options):
    torch.manual_seed(seed)
    loss = CRD.from_shapes(student_shape=(6,), teacher_shape=(5,), num_train_samples=num_train, **options)
    return loss.train()


def _fixed_negatives(loss, negatives):
    loss._draw_negatives = lambda index, target: negatives  # the official dataset hands them in


@pytest.mark.parametrize("num_train, num_neg", [(40, 16), (40, 300)])  # gathered scores; counted draws (N <= K)
def test_crd_equals_the_official_code_over_two_steps(num_train, num_neg):
    loss = _crd(num_train, feat_dim=8, num_negatives=num_neg)
    official = OfficialCRD(loss.student_memory, loss.teacher_memory)
    g = torch.Generator().manual_seed(1)
    for _ in range(2):  # the second step sees the banks and Z the first one left
        index = torch.randperm(num_train, generator=g)[:6]
        target = torch.randint(3, (6,), generator=g)
        negatives = torch.randint(num_train, (6, num_neg), generator=g)
        _fixed_negatives(loss, negatives)
        s = torch.randn(6, 6, generator=g, requires_grad=True)
        t = torch.randn(6, 5, generator=g, requires_grad=True)
        ours = loss(s, t, index=index, target=target)
        v1 = F.normalize(loss.embed_student(s), dim=1)
        v2 = F.normalize(loss.embed_teacher(t), dim=1)
        reference = official.step(v1, v2, index, torch.cat([index[:, None], negatives], 1))
        assert torch.allclose(ours, reference, rtol=1e-5), (ours.item(), reference.item())
        params = [s, t, loss.embed_student.weight, loss.embed_teacher.weight]
        for a, b in zip(_grads(ours, params), _grads(reference, params)):
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-5), (a - b).abs().max()  # float32 sums
        assert loss.z_student.item() == pytest.approx(official.z_v1, rel=1e-5)
        assert loss.z_teacher.item() == pytest.approx(official.z_v2, rel=1e-5)
        assert torch.allclose(loss.student_memory, official.memory_v1, atol=1e-6)
        assert torch.allclose(loss.teacher_memory, official.memory_v2, atol=1e-6)


def _old_formula(v, memory, rows, z, num_data):
    """The loss before the rewrite: crd_scores + crd_nce_loss, differentiated by autograd."""
    scores = TF.crd_scores(v, memory, rows, temperature=0.07)
    return TF.crd_nce_loss(scores / z, num_data=num_data)


@pytest.mark.parametrize("num_data, num_neg, feat_dim", [(50, 20, 8), (50, 200, 8), (400, 3, 4)])
def test_crd_one_pass_gradient_equals_autograd_of_the_old_formula(num_data, num_neg, feat_dim):
    # (50, 20): scores gathered from one (B, N) product; (50, 200): draws counted per row;
    # (400, 3, 4): N > (1 + K) F, rows gathered.
    g = torch.Generator().manual_seed(num_data + num_neg)
    memory = F.normalize(torch.randn(num_data, feat_dim, generator=g), dim=1)
    anchor = F.normalize(torch.randn(7, feat_dim, generator=g), dim=1).requires_grad_(True)
    positive = torch.randint(num_data, (7,), generator=g)
    negatives = torch.randint(num_data, (7, num_neg), generator=g)
    rows = torch.cat([positive[:, None], negatives], 1)
    value, grad, z = crd_nce_with_gradient(anchor, memory, positive, negatives, temperature=0.07)
    z_old = TF.crd_scores(anchor, memory, rows, temperature=0.07).detach().mean() * num_data
    assert z.item() == pytest.approx(z_old.item(), rel=1e-5)  # the first batch's estimate
    old = _old_formula(anchor, memory, rows, z_old, num_data)
    assert value.item() == pytest.approx(old.item(), rel=1e-5)
    assert torch.allclose(grad, _grads(old, [anchor])[0], rtol=1e-4, atol=1e-6)
    again, _, _ = crd_nce_with_gradient(anchor, memory, positive, negatives, temperature=0.07, z=z, gradient=False)
    assert again.item() == pytest.approx(value.item(), rel=1e-6)


def test_crd_updates_its_banks_in_place_after_the_loss():
    loss = _crd(30, num_negatives=50)
    banks = {name: getattr(loss, name) for name in ("student_memory", "teacher_memory")}
    pointers = {name: bank.data_ptr() for name, bank in banks.items()}
    before = {name: bank.clone() for name, bank in banks.items()}
    s = torch.randn(4, 6, requires_grad=True)
    value = loss(s, torch.randn(4, 5), index=torch.tensor([0, 3, 7, 9]), target=torch.tensor([0, 1, 0, 2]))
    for name, bank in banks.items():
        assert getattr(loss, name) is bank and bank.data_ptr() == pointers[name]  # not copied
        assert not torch.equal(bank, before[name])
    value.backward()  # the graph does not hold the banks: the in-place update cannot invalidate it
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0


def test_crd_exact_negatives_come_from_other_classes_only():
    n, classes = 60, 3
    labels = torch.arange(n) % classes
    loss = _crd(n, num_negatives=2000)
    index = torch.arange(n)
    loss(torch.randn(n, 6), torch.randn(n, 5), index=index, target=labels)  # every row seen once: an epoch
    assert torch.equal(loss.labels, labels)
    anchors = torch.tensor([0, 1, 2, 5])
    negatives = loss._draw_negatives(anchors, labels[anchors])  # (4, K), with replacement: K > pool
    assert negatives.shape == (4, 2000)
    for a, row in zip(anchors.tolist(), negatives):
        assert (labels[row] != labels[a]).all() and (row != a).all()
        counts = torch.bincount(row, minlength=n)[labels != labels[a]].float()  # 40 rows in the pool
        assert (counts > 0).all() and counts.std() / counts.mean() < 0.35  # uniform over the pool (2000/40 each)


def test_crd_first_epoch_counts_unseen_rows_as_other_classes():
    loss = _crd(50, num_negatives=4000)
    seen = torch.arange(10)
    labels = torch.tensor([0, 1] * 5)
    loss(torch.randn(10, 6), torch.randn(10, 5), index=seen, target=labels)
    assert torch.equal(loss.labels[:10], labels) and (loss.labels[10:] == -1).all()
    negatives = loss._draw_negatives(torch.tensor([0]), torch.tensor([0]))[0]
    assert not torch.isin(negatives, seen[labels == 0]).any()  # seen rows of its class: never
    assert torch.isin(negatives, seen[labels == 1]).any() and (negatives >= 10).any()  # other class and unseen rows


def test_crd_sample_without_label_draws_from_every_other_row():
    loss = _crd(20, num_negatives=3000)
    loss.labels.copy_(torch.arange(20) % 2)
    negatives = loss._draw_negatives(torch.tensor([4]), torch.tensor([-1]))[0]  # IGNORE_TARGET
    assert not (negatives == 4).any() and torch.equal(torch.unique(negatives), torch.arange(20)[torch.arange(20) != 4])


def test_crd_uniform_negatives_need_no_labels():
    loss = _crd(20, num_negatives=3000, negatives="uniform")
    assert loss.needs == ("index",)  # the Distiller passes (and masks by) the index only
    value = loss(torch.randn(4, 6), torch.randn(4, 5), index=torch.tensor([1, 2, 3, 4]))
    assert torch.isfinite(value)
    negatives = loss._draw_negatives(torch.tensor([1]), None)[0]
    assert torch.equal(torch.unique(negatives), torch.arange(20))  # every row, the positive's included
    with pytest.raises(ValueError, match="needs the batch's target"):
        _crd(20)(torch.randn(4, 6), torch.randn(4, 5), index=torch.tensor([1, 2, 3, 4]))


def test_crd_checkpoint_restores_banks_labels_and_z():
    loss = _crd(30, num_negatives=40)
    for step in range(3):
        index = torch.arange(step * 8, step * 8 + 8)
        loss(torch.randn(8, 6), torch.randn(8, 5), index=index, target=index % 4).backward()
    state = loss.state_dict()
    assert {"student_memory", "teacher_memory", "labels", "z_student", "z_teacher"} <= set(state)
    fresh = _crd(30, num_negatives=40, seed=5)
    fresh.load_state_dict(state)
    for key, value in state.items():
        assert torch.equal(fresh.state_dict()[key], value), key
    torch.manual_seed(9)
    a = loss(torch.ones(2, 6), torch.ones(2, 5), index=torch.tensor([0, 29]), target=torch.tensor([0, 1]))
    torch.manual_seed(9)
    b = fresh(torch.ones(2, 6), torch.ones(2, 5), index=torch.tensor([0, 29]), target=torch.tensor([0, 1]))
    assert torch.equal(a, b)
    # A checkpoint written before the label bank existed still loads; its labels are learnt again.
    older = {k: v for k, v in state.items() if k != "labels"}
    fresh.load_state_dict(older)
    assert (fresh.labels == -1).all()


def _ddp_worker(rank, world, port, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        loss = _crd(40, num_negatives=30, seed=0)  # the same initial banks on both ranks
        index = torch.tensor([rank * 10 + i for i in range(4)])
        torch.manual_seed(rank)
        mask = None if rank == 0 else torch.tensor([True, True, False, True])  # unequal counts across ranks
        loss(torch.randn(4, 6), torch.randn(4, 5), index=index, target=index % 3, mask=mask)
        torch.save({k: v.clone() for k, v in loss.state_dict().items()}, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_crd_gathers_every_process_update(tmp_path):
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    torch.multiprocessing.spawn(_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    states = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    initial = _crd(40, num_negatives=30, seed=0).state_dict()
    for key in ("student_memory", "teacher_memory", "labels"):
        assert torch.equal(states[0][key], states[1][key]), key  # both ranks hold the same banks
    changed = (states[0]["student_memory"] != initial["student_memory"]).any(1)
    assert changed.nonzero().flatten().tolist() == [0, 1, 2, 3, 10, 11, 13]  # rank 0's rows and rank 1's kept rows
    assert states[0]["labels"][[0, 1, 2, 3, 10, 11, 13]].tolist() == [0, 1, 2, 0, 1, 2, 1]


def test_crd_pins_the_nce_constants():
    """``eps = 1e-7`` in ``ContrastLoss`` and ``Pn = 1 / n_data`` (noise over all rows, even
    though exact negatives come from other classes only), as in RepDistiller's criterion."""
    probs = torch.tensor([[0.5, 0.01, 0.2]])
    k_pn = 2 / 10
    expected = -(math.log(0.5 / (0.5 + k_pn + 1e-7)) + sum(math.log(k_pn / (p + k_pn + 1e-7)) for p in (0.01, 0.2)))
    assert TF.crd_nce_loss(probs, num_data=10).item() == pytest.approx(expected, rel=1e-6)


def test_crd_resume_is_bit_identical(tmp_path):
    """The banks, labels and Z are checkpointed buffers: a run resumed from a checkpoint ends
    exactly where the uninterrupted one does."""
    import shutil

    from lightning_fabric import Fabric
    from torch import nn

    from transfuse.checkpoint import latest_checkpoint
    from transfuse.data.base import ArrayDataset
    from transfuse.distiller import Distiller, Term
    from transfuse.engine import FitSettings, fit
    from transfuse.optim import make_optimizer

    g = torch.Generator().manual_seed(1)
    x = torch.randn(96, 6, generator=g)
    data = ArrayDataset(x, (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long())

    def train(run_dir, resume):
        torch.manual_seed(0)
        student = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 4))
        teacher = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 4))
        crd = CRD.from_shapes(student_shape=(16,), teacher_shape=(32,), num_train_samples=len(data), num_negatives=50)
        distiller = Distiller(
            [Participant("student", student), Participant("teacher", teacher, trainable=False)],
            [Term("ce", LOSSES.get("ce").build(), 1.0, target=None),
             Term("crd", crd, 0.8, input="student.1", target="teacher.1")],
        )
        settings = FitSettings(steps=12, batch_size=16, seed=3, log_every=4, checkpoint_every=4, keep_checkpoints=10,
                               progress=False)
        fit(Fabric(accelerator="cpu", devices=1), distiller, make_optimizer(distiller.parameters(), name="adam", lr=0.01),
            data, settings, run_dir=run_dir, resume=resume)
        return student, crd

    full_student, full_crd = train(tmp_path / "full", False)
    part = tmp_path / "part"
    shutil.copytree(tmp_path / "full", part)
    for ck in (part / "checkpoints").iterdir():
        if ck.name != "step-00000004":
            shutil.rmtree(ck) if ck.is_dir() else ck.unlink()
    assert latest_checkpoint(part / "checkpoints").name == "step-00000004"
    student, crd = train(part, True)
    for p, q in zip(full_student.parameters(), student.parameters()):
        assert torch.equal(p, q)
    for key, value in full_crd.state_dict().items():
        assert torch.equal(crd.state_dict()[key], value), key
    assert (crd.labels >= 0).all()  # 12 steps of 16 = two epochs of 96: every label seen
