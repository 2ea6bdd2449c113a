"""transfuse.functional against values computed by hand (plain Python loops and math).

Each reference below re-derives the paper's formula element by element, without the
torch ops the implementation uses, so a wrong reduction, temperature factor or
normalisation shows up as a mismatch.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from transfuse import functional as TF

# ---------------------------------------------------------------------------------------
# Hand-written references (lists of floats in, a float out)


def softmax(row, temperature=1.0):
    exps = [math.exp(v / temperature) for v in row]
    total = sum(exps)
    return [e / total for e in exps]


def kl(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)


def pearson(a, b):
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    da, db = [x - ma for x in a], [x - mb for x in b]
    num = sum(x * y for x, y in zip(da, db))
    return num / (math.sqrt(sum(x * x for x in da)) * math.sqrt(sum(y * y for y in db)) + 1e-8)


def huber(x, y):
    d = abs(x - y)
    return 0.5 * d * d if d < 1 else d - 0.5


def norm(v):
    return math.sqrt(sum(x * x for x in v))


def cosine(a, b):
    na, nb = norm(a), norm(b)
    if na == 0 or nb == 0:
        return 0.0
    return sum(x * y for x, y in zip(a, b)) / (na * nb)


S = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]]  # (2, 3) student logits
T = [[2.0, 0.0, 1.0], [1.0, 1.0, -2.0]]  # (2, 3) teacher logits
Y = [2, 0]


def t(x, **kw):
    return torch.tensor(x, dtype=torch.float64, **kw)


def _grad_check(fn, student, teacher):
    """Backward reaches the student; the teacher (requires_grad=False) is left alone."""
    student = student.clone().requires_grad_(True)
    fn(student, teacher).backward()
    assert student.grad is not None and torch.isfinite(student.grad).all()
    assert student.grad.abs().sum() > 0
    assert teacher.grad is None


# ---------------------------------------------------------------------------------------
# kd


def test_kd_matches_hand_computed():
    temp = 2.0
    expected = sum(kl(softmax(tr, temp), softmax(sr, temp)) for sr, tr in zip(S, T)) / 2 * temp**2
    assert TF.kd(t(S), t(T), temperature=temp).item() == pytest.approx(expected, rel=1e-10)


def test_kd_temperature_squared_factor():
    # Scaling logits by T and dividing by T inside cancels, leaving exactly the T^2 factor.
    s, tt = t(S), t(T)
    assert TF.kd(3 * s, 3 * tt, temperature=3.0).item() == pytest.approx(9 * TF.kd(s, tt, temperature=1.0).item())


def test_kd_sequence_is_mean_over_tokens():
    torch.manual_seed(0)
    s, tt = torch.randn(2, 3, 5), torch.randn(2, 3, 5)  # (B, T, C)
    per_token = [TF.kd(s[b, i : i + 1], tt[b, i : i + 1]).item() for b in range(2) for i in range(3)]
    assert TF.kd(s, tt).item() == pytest.approx(sum(per_token) / 6, rel=1e-5)


def test_kd_properties():
    torch.manual_seed(0)
    s, tt = torch.randn(4, 7), torch.randn(4, 7)
    assert TF.kd(s, tt) > 0
    assert TF.kd(tt, tt).abs() < 1e-6
    assert TF.kd(s + 5.0, tt - 2.0).item() == pytest.approx(TF.kd(s, tt).item(), rel=1e-5)  # shift invariance
    _grad_check(TF.kd, s, tt)
    with pytest.raises(ValueError, match="same shape"):
        TF.kd(s, tt[:, :5])


# ---------------------------------------------------------------------------------------
# dkd


def _dkd_by_hand(student, teacher, target, temp):
    tckd = nckd = 0.0
    for sr, tr, y in zip(student, teacher, target):
        ps, pt = softmax(sr, temp), softmax(tr, temp)
        tckd += kl([pt[y], 1 - pt[y]], [ps[y], 1 - ps[y]])
        # Non-target distributions: renormalise the other classes.
        ps_nt = [p / (1 - ps[y]) for c, p in enumerate(ps) if c != y]
        pt_nt = [p / (1 - pt[y]) for c, p in enumerate(pt) if c != y]
        nckd += kl(pt_nt, ps_nt)
    n = len(target)
    return temp**2 * tckd / n, temp**2 * nckd / n


def test_dkd_matches_hand_computed():
    tckd, nckd = _dkd_by_hand(S, T, Y, 2.0)
    got_t, got_n = TF.dkd_parts(t(S), t(T), torch.tensor(Y), temperature=2.0)
    assert got_t.item() == pytest.approx(tckd, rel=1e-8)
    assert got_n.item() == pytest.approx(nckd, rel=1e-8)
    got = TF.dkd(t(S), t(T), torch.tensor(Y), alpha=2.0, beta=3.0, temperature=2.0)
    assert got.item() == pytest.approx(2.0 * tckd + 3.0 * nckd, rel=1e-8)


def test_dkd_reformulates_kd():
    # The paper's identity, per sample: KD = TCKD + (1 - p_target^teacher) * NCKD.
    s, tt, y = t(S[:1]), t(T[:1]), torch.tensor(Y[:1])
    tckd, nckd = TF.dkd_parts(s, tt, y, temperature=2.0)
    p_target = softmax(T[0], 2.0)[Y[0]]
    assert TF.kd(s, tt, temperature=2.0).item() == pytest.approx((tckd + (1 - p_target) * nckd).item(), rel=1e-8)


def test_dkd_properties():
    torch.manual_seed(0)
    s, tt, y = torch.randn(5, 6), torch.randn(5, 6), torch.randint(6, (5,))
    assert TF.dkd(s, tt, y) > 0
    assert TF.dkd(tt, tt, y).abs() < 1e-5
    _grad_check(lambda a, b: TF.dkd(a, b, y), s, tt)
    with pytest.raises(ValueError, match="target shape"):
        TF.dkd(s, tt, y[:3])


def test_dkd_finite_for_saturated_logits():
    # p_target rounds to 1 (or 0) in float32 here; the log-space form stays finite.
    s = torch.tensor([[200.0, -200.0, 0.0], [0.0, 0.0, 0.0]], requires_grad=True)
    tt = torch.tensor([[-200.0, 200.0, 0.0], [50.0, 0.0, 0.0]])
    loss = TF.dkd(s, tt, torch.tensor([0, 1]), temperature=1.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()


# ---------------------------------------------------------------------------------------
# dist


def test_dist_matches_hand_computed():
    temp = 2.0
    ys = [softmax(r, temp) for r in S]
    yt = [softmax(r, temp) for r in T]
    inter = 1 - sum(pearson(a, b) for a, b in zip(ys, yt)) / 2
    cols_s = [[row[c] for row in ys] for c in range(3)]
    cols_t = [[row[c] for row in yt] for c in range(3)]
    intra = 1 - sum(pearson(a, b) for a, b in zip(cols_s, cols_t)) / 3
    got = TF.dist(t(S), t(T), beta=2.0, gamma=0.5, temperature=temp)
    assert got.item() == pytest.approx(temp**2 * (2.0 * inter + 0.5 * intra), rel=1e-7)
    assert TF.dist(t(S), t(T), beta=1.0, gamma=0.0, temperature=temp).item() == pytest.approx(temp**2 * inter, rel=1e-7)


def test_dist_properties():
    torch.manual_seed(0)
    s, tt = torch.randn(6, 5), torch.randn(6, 5)
    assert TF.dist(tt, tt).abs() < 1e-5  # perfect correlation
    assert TF.dist(s, tt) > 0
    assert TF.dist(s + 3.0, tt).item() == pytest.approx(TF.dist(s, tt).item(), rel=1e-5)  # row shifts
    assert TF.dist(s, tt).item() <= 4.0  # each term is at most 2
    _grad_check(TF.dist, s, tt)


# ---------------------------------------------------------------------------------------
# fitnet, attention transfer


def test_fitnet_is_mse():
    a, b = [[1.0, 2.0], [3.0, -1.0]], [[0.0, 2.5], [1.0, 1.0]]
    expected = sum((x - y) ** 2 for ra, rb in zip(a, b) for x, y in zip(ra, rb)) / 4
    assert TF.fitnet(t(a), t(b)).item() == pytest.approx(expected)
    with pytest.raises(ValueError, match="regressor"):
        TF.fitnet(torch.zeros(2, 3), torch.zeros(2, 4))


def test_attention_transfer_matches_hand_computed():
    # (B=1, C=2, H=1, W=2) student, (B=1, C=3, H=1, W=2) teacher.
    s = [[[[1.0, -2.0]], [[3.0, 0.5]]]]
    tt = [[[[0.0, 1.0]], [[2.0, 2.0]], [[-1.0, 0.0]]]]

    def q(feat):
        channels = feat[0]
        amap = [sum(abs(ch[0][w]) ** 2 for ch in channels) / len(channels) for w in range(2)]
        n = norm(amap)
        return [v / n for v in amap]

    expected = sum((a - b) ** 2 for a, b in zip(q(s), q(tt))) / 2
    assert TF.attention_transfer(t(s), t(tt)).item() == pytest.approx(expected, rel=1e-10)


def test_attention_transfer_pools_larger_map_and_flat_inputs():
    torch.manual_seed(0)
    big, small = torch.randn(2, 3, 8, 8), torch.randn(2, 5, 4, 4)
    pooled = torch.nn.functional.avg_pool2d(big, 2)
    assert torch.allclose(TF.attention_transfer(big, small), TF.attention_transfer(pooled, small))
    assert torch.allclose(TF.attention_transfer(small, big), TF.attention_transfer(small, pooled))
    # Channel count does not matter, only where the energy is: a copy with more channels matches.
    assert TF.attention_transfer(small, torch.cat([small, small], 1)).abs() < 1e-7
    flat_s, flat_t = torch.randn(2, 6), torch.randn(2, 6)
    qs, qt = flat_s**2 / (flat_s**2).norm(dim=1, keepdim=True), flat_t**2 / (flat_t**2).norm(dim=1, keepdim=True)
    assert torch.allclose(TF.attention_transfer(flat_s, flat_t), ((qs - qt) ** 2).mean())
    with pytest.raises(ValueError, match="equal shapes"):
        TF.attention_transfer(torch.randn(2, 6), torch.randn(2, 7))
    _grad_check(TF.attention_transfer, small, torch.randn(2, 5, 4, 4))


# ---------------------------------------------------------------------------------------
# relations: sp, rkd, pkt

FS = [[1.0, 0.0, 2.0], [0.5, -1.0, 1.0], [-1.0, 2.0, 0.0]]  # (3, 3) student features
FT = [[2.0, 1.0], [0.0, 1.5], [1.0, -1.0]]  # (3, 2) teacher features (other width)


def test_similarity_preserving_matches_hand_computed():
    def g(f):
        gram = [[sum(x * y for x, y in zip(a, b)) for b in f] for a in f]
        return [[v / norm(row) for v in row] for row in gram]

    gs, gt = g(FS), g(FT)
    expected = sum((gs[i][j] - gt[i][j]) ** 2 for i in range(3) for j in range(3)) / 9
    assert TF.similarity_preserving(t(FS), t(FT)).item() == pytest.approx(expected, rel=1e-10)


def test_rkd_distance_matches_hand_computed():
    def psi(f):
        d = [[norm([x - y for x, y in zip(a, b)]) for b in f] for a in f]
        nonzero = [v for row in d for v in row if v > 0]
        mu = sum(nonzero) / len(nonzero)
        return [[v / mu for v in row] for row in d]

    ds, dt = psi(FS), psi(FT)
    expected = sum(huber(ds[i][j], dt[i][j]) for i in range(3) for j in range(3)) / 9
    assert TF.rkd_distance(t(FS), t(FT)).item() == pytest.approx(expected, rel=1e-8)


def test_rkd_angle_matches_hand_computed():
    def psi(f):
        out = []
        for j in range(3):
            for i in range(3):
                for k in range(3):
                    e1 = [a - b for a, b in zip(f[i], f[j])]
                    e2 = [a - b for a, b in zip(f[k], f[j])]
                    out.append(cosine(e1, e2))
        return out

    expected = sum(huber(a, b) for a, b in zip(psi(FS), psi(FT))) / 27
    assert TF.rkd_angle(t(FS), t(FT)).item() == pytest.approx(expected, rel=1e-8)
    combined = TF.rkd(t(FS), t(FT), distance_weight=2.0, angle_weight=3.0)
    assert combined.item() == pytest.approx(
        2.0 * TF.rkd_distance(t(FS), t(FT)).item() + 3.0 * expected, rel=1e-8
    )


def test_pkt_matches_hand_computed():
    eps = 1e-7

    def probs(f):
        k = [[(cosine(a, b) + 1) / 2 for b in f] for a in f]
        return [[v / sum(row) for v in row] for row in k]

    ps, pt = probs(FS), probs(FT)
    expected = sum(pt[i][j] * math.log((pt[i][j] + eps) / (ps[i][j] + eps)) for i in range(3) for j in range(3)) / 9
    assert TF.pkt(t(FS), t(FT), eps=eps).item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("fn", [TF.similarity_preserving, TF.rkd_distance, TF.rkd_angle, TF.rkd, TF.pkt])
def test_relation_properties(fn):
    torch.manual_seed(0)
    s, tt = torch.randn(6, 4, 2), torch.randn(6, 5)  # (B, ...) flattened; widths differ
    assert fn(s, tt) >= -1e-6
    same = torch.randn(6, 8)
    assert fn(same, same.clone()).abs() < 1e-5
    _grad_check(fn, s, tt)
    with pytest.raises(ValueError, match="at least 2"):
        fn(torch.randn(1, 3), torch.randn(1, 3))


def test_relation_invariances():
    torch.manual_seed(0)
    f = torch.randn(5, 4)
    # Distances are normalised by their mean, angles ignore scale and translation,
    # cosine kernels ignore scale: a rescaled (and for angles, shifted) copy matches.
    assert TF.rkd_distance(3 * f, f).abs() < 1e-6
    assert TF.rkd_angle(2 * f + 1.5, f).abs() < 1e-6
    assert TF.pkt(4 * f, f).abs() < 1e-6
    assert TF.similarity_preserving(2 * f, f).abs() < 1e-6
    # Duplicate samples have distance 0: excluded from the mean and with finite gradients.
    dup = torch.cat([f, f[:1]]).requires_grad_(True)
    TF.rkd(dup, torch.randn(6, 3)).backward()
    assert torch.isfinite(dup.grad).all()


# ---------------------------------------------------------------------------------------
# CRD pieces


def test_crd_scores_both_paths_match_hand_computed():
    torch.manual_seed(0)
    anchor = torch.nn.functional.normalize(torch.randn(2, 3), dim=1)
    memory = torch.randn(5, 3)
    index = torch.tensor([[4, 0, 1], [2, 2, 3]])  # (B, 1 + K)
    expected = [
        [math.exp(sum(a * m for a, m in zip(anchor[b].tolist(), memory[r].tolist())) / 0.5) for r in row]
        for b, row in enumerate(index.tolist())
    ]
    # N=5 <= (1+K)*F=9: the (B, N) product path.
    assert torch.allclose(TF.crd_scores(anchor, memory, index, temperature=0.5), torch.tensor(expected), rtol=1e-5)
    # N > (1+K)*F: the gather path (pad the bank with rows that are never indexed).
    big = torch.cat([memory, torch.randn(20, 3)])
    assert torch.allclose(TF.crd_scores(anchor, big, index, temperature=0.5), torch.tensor(expected), rtol=1e-5)


def test_crd_nce_loss_matches_hand_computed():
    probs = [[0.5, 0.01, 0.2], [0.05, 0.3, 0.001]]  # (B=2, 1 + K=3)
    n_data, eps = 10, 1e-7
    k_pn = 2 / n_data
    total = 0.0
    for row in probs:
        total += math.log(row[0] / (row[0] + k_pn + eps))
        total += sum(math.log(k_pn / (p + k_pn + eps)) for p in row[1:])
    got = TF.crd_nce_loss(t(probs), num_data=n_data, eps=eps)
    assert got.item() == pytest.approx(-total / 2, rel=1e-10)
    assert got > 0


# ---------------------------------------------------------------------------------------
# reduce_positions: the one reduction rule


def test_reduce_positions_without_mask_is_exactly_the_mean():
    torch.manual_seed(0)
    for shape in [(7,), (3, 5), (2, 3, 4)]:
        values = torch.randn(shape)
        assert torch.equal(TF.reduce_positions(values), values.mean())


def test_reduce_positions_mask_is_hand_computed_masked_mean():
    values = t([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[True, False, True], [False, False, True]])
    assert TF.reduce_positions(values, mask=mask).item() == pytest.approx((1 + 3 + 6) / 3)


def test_reduce_positions_weights_are_not_renormalised():
    values = t([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    weights = t([[0.5, 1.0, 2.0], [0.0, 3.0, 1.0]])
    expected = (0.5 * 1 + 2 + 6 + 0 + 15 + 6) / 6  # divided by the position count, not sum(weights)
    assert TF.reduce_positions(values, weights=weights).item() == pytest.approx(expected)
    assert TF.reduce_positions(values, weights=2 * torch.ones(2, 3, dtype=torch.float64)).item() == pytest.approx(
        2 * values.mean().item()
    )


def test_reduce_positions_aligns_prefix_shapes_from_the_left():
    # Per-sample (B,) mask and weights against per-token (B, T) values.
    values = t([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])  # (B=3, T=3)
    sample_mask = torch.tensor([True, False, True])
    sample_weights = t([2.0, 100.0, 0.5])
    got = TF.reduce_positions(values, mask=sample_mask, weights=sample_weights)
    expected = (2.0 * (1 + 2 + 3) + 0.5 * (7 + 8 + 9)) / 6  # 6 kept tokens
    assert got.item() == pytest.approx(expected)
    # Mixed: token mask (B, T) with per-sample weights (B,).
    token_mask = torch.tensor([[True, True, False], [True, False, False], [False, False, False]])
    got = TF.reduce_positions(values, mask=token_mask, weights=sample_weights)
    assert got.item() == pytest.approx((2.0 * (1 + 2) + 100.0 * 4) / 3)
    # A scalar weight is the empty prefix.
    assert TF.reduce_positions(values, weights=t(3.0)).item() == pytest.approx(3 * 5.0)


def test_reduce_positions_empty_mask_is_a_graph_connected_zero():
    values = torch.randn(4, 3, requires_grad=True)
    out = TF.reduce_positions(values * 2, mask=torch.zeros(4, dtype=torch.bool))
    assert out.item() == 0.0 and not torch.isnan(out)
    out.backward()
    assert values.grad is not None and torch.equal(values.grad, torch.zeros(4, 3))
    # No positions at all: 0 as well, not the nan of an empty mean.
    empty = torch.zeros(0, 5, requires_grad=True)
    out = TF.reduce_positions(empty)
    assert out.item() == 0.0
    out.backward()


def test_reduce_positions_masked_out_inf_and_nan_do_not_leak():
    values = torch.tensor([1.0, float("inf"), float("nan"), 3.0], requires_grad=True)
    mask = torch.tensor([True, False, False, True])
    out = TF.reduce_positions(values, mask=mask, weights=torch.tensor([1.0, 1.0, float("nan"), 1.0]))
    assert out.item() == 2.0
    out.backward()
    assert torch.equal(values.grad, torch.tensor([0.5, 0.0, 0.0, 0.5]))


def test_reduce_positions_validates_mask_and_shapes():
    values = torch.randn(2, 3)
    with pytest.raises(ValueError, match="bool"):
        TF.reduce_positions(values, mask=torch.ones(2, 3))
    with pytest.raises(ValueError, match="floating-point"):
        TF.reduce_positions(values, weights=torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"reduce_positions: mask of shape \(3,\).*\(2, 3\)"):
        TF.reduce_positions(values, mask=torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"reduce_positions: weights of shape \(2, 3, 1\).*\(2, 3\)"):
        TF.reduce_positions(values, weights=torch.ones(2, 3, 1))


def test_weigh_positions_is_what_reduction_none_returns():
    values = t([[1.0, 2.0], [3.0, 4.0]])
    out = TF.weigh_positions(values, mask=torch.tensor([True, False]), weights=t([[2.0, 3.0], [5.0, 7.0]]))
    assert torch.equal(out, t([[2.0, 6.0], [0.0, 0.0]]))


# ---------------------------------------------------------------------------------------
# Unmasked values are bit-identical to the formulas before masks existed (torch.equal).
# Each `_old_*` restates the earlier implementation op for op.


def _old_kl(log_p, log_q):
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def _old_kd(s, tt, temperature):
    log_q = torch.nn.functional.log_softmax(s / temperature, dim=-1)
    log_p = torch.nn.functional.log_softmax(tt / temperature, dim=-1)
    return temperature**2 * _old_kl(log_p, log_q).mean()


def _old_binary_logs(logits, gt):
    log_z = torch.logsumexp(logits, dim=-1)
    log_target = (logits * gt).sum(-1) - log_z
    log_rest = torch.logsumexp(logits.masked_fill(gt.bool(), float("-inf")), dim=-1) - log_z
    return torch.stack([log_target, log_rest], dim=-1)


def _old_dkd(s, tt, y, alpha, beta, temperature):
    c = s.shape[-1]
    z_s, z_t = s.reshape(-1, c) / temperature, tt.reshape(-1, c) / temperature
    gt = torch.nn.functional.one_hot(y.reshape(-1).long(), c).to(z_s.dtype)
    tckd = _old_kl(_old_binary_logs(z_t, gt), _old_binary_logs(z_s, gt))
    nckd = _old_kl(
        torch.nn.functional.log_softmax(z_t - 1000.0 * gt, dim=-1), torch.nn.functional.log_softmax(z_s - 1000.0 * gt, dim=-1)
    )
    scale = temperature**2
    return alpha * (scale * tckd.mean()) + beta * (scale * nckd.mean())


def _old_pearson(a, b, eps=1e-8):
    a, b = a - a.mean(dim=1, keepdim=True), b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


def _old_dist(s, tt, beta, gamma, temperature):
    c = s.shape[-1]
    y_s = torch.nn.functional.softmax(s.reshape(-1, c) / temperature, dim=-1)
    y_t = torch.nn.functional.softmax(tt.reshape(-1, c) / temperature, dim=-1)
    inter = 1.0 - _old_pearson(y_s, y_t).mean()
    intra = 1.0 - _old_pearson(y_s.t(), y_t.t()).mean()
    return temperature**2 * (beta * inter + gamma * intra)


@pytest.mark.parametrize("shape", [(8, 10), (3, 5, 7)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_logit_losses_unmasked_are_bit_identical_to_before(shape, dtype):
    torch.manual_seed(1)
    s, tt = torch.randn(shape, dtype=dtype) * 3, torch.randn(shape, dtype=dtype) * 3
    y = torch.randint(shape[-1], shape[:-1])
    for temp in (1.0, 2.0, 4.0, 3.7):
        assert torch.equal(TF.kd(s, tt, temperature=temp), _old_kd(s, tt, temp))
        assert torch.equal(TF.dkd(s, tt, y, alpha=0.7, beta=8.0, temperature=temp), _old_dkd(s, tt, y, 0.7, 8.0, temp))
        assert torch.equal(TF.dist(s, tt, beta=1.5, gamma=0.5, temperature=temp), _old_dist(s, tt, 1.5, 0.5, temp))
    for smoothing in (0.0, 0.1):
        old = torch.nn.functional.cross_entropy(
            s.reshape(-1, shape[-1]), y.reshape(-1).long(), label_smoothing=smoothing
        )
        assert torch.equal(TF.cross_entropy(s, y, label_smoothing=smoothing), old)


def test_feature_and_relation_losses_unmasked_are_bit_identical_to_before():
    torch.manual_seed(2)
    a, b = torch.randn(6, 4, 5, 5), torch.randn(6, 4, 5, 5)
    assert torch.equal(TF.fitnet(a, b), torch.nn.functional.mse_loss(a, b))
    c = torch.randn(6, 7, 5, 5)
    old_at = (TF.attention_map(a, p=3.0) - TF.attention_map(c, p=3.0)).pow(2).mean()
    assert torch.equal(TF.attention_transfer(a, c, p=3.0), old_at)
    fs, ft = torch.randn(6, 9), torch.randn(6, 4)

    def old_sp(x, y):
        gx, gy = torch.nn.functional.normalize(x @ x.t(), dim=1), torch.nn.functional.normalize(y @ y.t(), dim=1)
        return (gx - gy).pow(2).sum() / x.shape[0] ** 2

    def old_pkt(x, y, eps=1e-7):
        def probs(f):
            unit = f / (f.norm(dim=1, keepdim=True) + eps)
            k = (unit @ unit.t() + 1.0) / 2.0
            return k / k.sum(dim=1, keepdim=True)

        ps, pt = probs(x), probs(y)
        return (pt * torch.log((pt + eps) / (ps + eps))).mean()

    assert torch.equal(TF.similarity_preserving(fs, ft), old_sp(fs, ft))
    assert torch.equal(TF.pkt(fs, ft), old_pkt(fs, ft))
    # Selecting every sample is the unmasked computation.
    everyone = torch.ones(6, dtype=torch.bool)
    for fn in (TF.similarity_preserving, TF.rkd_distance, TF.rkd_angle, TF.rkd, TF.pkt):
        assert torch.equal(fn(fs, ft, mask=everyone), fn(fs, ft))


# ---------------------------------------------------------------------------------------
# Position-wise losses: mask, weights and reduction="none"


def _position_cases():
    """(name, call(mask, weights, reduction), positions shape, per-position reference(i) -> float)."""
    torch.manual_seed(3)
    s, tt = torch.randn(3, 4, 6, dtype=torch.float64), torch.randn(3, 4, 6, dtype=torch.float64)  # (B, T, C)
    y = torch.randint(6, (3, 4))
    fa, fb = torch.randn(3, 4, 5, dtype=torch.float64), torch.randn(3, 4, 5, dtype=torch.float64)  # (B, ...)
    ha, hb = torch.randn(3, 2, 4, 4, dtype=torch.float64), torch.randn(3, 5, 4, 4, dtype=torch.float64)

    def at_one(i):
        return TF.attention_transfer(ha[i[0] : i[0] + 1], hb[i[0] : i[0] + 1]).item()

    return [
        ("kd", lambda **kw: TF.kd(s, tt, temperature=2.0, **kw), (3, 4),
         lambda i: TF.kd(s[i], tt[i], temperature=2.0).item()),
        ("dkd", lambda **kw: TF.dkd(s, tt, y, alpha=0.5, beta=2.0, **kw), (3, 4),
         lambda i: TF.dkd(s[i][None], tt[i][None], y[i][None], alpha=0.5, beta=2.0).item()),
        ("ce", lambda **kw: TF.cross_entropy(s, y, label_smoothing=0.1, **kw), (3, 4),
         lambda i: TF.cross_entropy(s[i][None], y[i][None], label_smoothing=0.1).item()),
        ("fitnet", lambda **kw: TF.fitnet(fa, fb, **kw), (3,),
         lambda i: ((fa[i] - fb[i]) ** 2).mean().item()),
        ("at", lambda **kw: TF.attention_transfer(ha, hb, **kw), (3,), at_one),
    ]


@pytest.mark.parametrize("case", _position_cases(), ids=lambda c: c[0])
def test_position_wise_mask_and_weights_are_hand_computed(case):
    _, call, shape, one = case
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(0)) > 0.4
    mask.view(-1)[0] = True
    weights = torch.rand(shape[:1], dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 2  # per sample
    kept = [i for i in itertools.product(*map(range, shape)) if mask[i]]
    expected = sum(weights[i[0]].item() * one(i) for i in kept) / len(kept)
    assert call(mask=mask, weights=weights).item() == pytest.approx(expected, rel=1e-9)
    unweighted = sum(one(i) for i in kept) / len(kept)
    assert call(mask=mask).item() == pytest.approx(unweighted, rel=1e-9)


@pytest.mark.parametrize("case", _position_cases(), ids=lambda c: c[0])
def test_position_wise_reduction_none(case):
    _, call, shape, one = case
    values = call(reduction="none")
    assert tuple(values.shape) == shape
    assert values.mean().item() == pytest.approx(call().item(), rel=1e-9)
    first = (0,) * len(shape)
    assert values[first].item() == pytest.approx(one(first), rel=1e-9)
    # none applies weights and zeroes masked-out positions; reducing it by the mask gives the mean.
    mask = torch.zeros(shape, dtype=torch.bool)
    mask[0] = True
    weights = torch.full(shape[:1], 3.0, dtype=torch.float64)
    weighed = call(mask=mask, weights=weights, reduction="none")
    assert torch.equal(weighed[1:], torch.zeros_like(weighed[1:]))
    assert TF.reduce_positions(weighed, mask=mask).item() == pytest.approx(call(mask=mask, weights=weights).item())
    with pytest.raises(ValueError, match="reduction"):
        call(reduction="sum")


def test_fitnet_positions_follow_the_mask():
    a, b = t([[[1.0, 2.0], [3.0, 4.0]], [[0.0, 0.0], [1.0, 1.0]]]), torch.zeros(2, 2, 2, dtype=torch.float64)
    # Default positions: samples, mean over (T, D).
    assert torch.equal(TF.fitnet(a, b, reduction="none"), t([(1 + 4 + 9 + 16) / 4, (0 + 0 + 1 + 1) / 4]))
    # A (B, T) mask makes tokens the positions: mean over D per token.
    token_mask = torch.tensor([[True, False], [False, True]])
    assert TF.fitnet(a, b, mask=token_mask).item() == pytest.approx(((1 + 4) / 2 + (1 + 1) / 2) / 2)
    with pytest.raises(ValueError, match="cover 4 dims"):
        TF.fitnet(a, b, mask=torch.ones(2, 2, 2, 1, dtype=torch.bool))


def test_position_wise_losses_validate_masks_naming_themselves():
    s, tt = torch.randn(4, 5), torch.randn(4, 5)
    with pytest.raises(ValueError, match="kd: mask must be a bool"):
        TF.kd(s, tt, mask=torch.ones(4))
    with pytest.raises(ValueError, match=r"kd: mask of shape \(5,\).*\(4,\)"):
        TF.kd(s, tt, mask=torch.ones(5, dtype=torch.bool))
    with pytest.raises(ValueError, match="dkd: weights"):
        TF.dkd(s, tt, torch.zeros(4, dtype=torch.long), weights=torch.ones(3))
    with pytest.raises(ValueError, match="target shape"):
        TF.cross_entropy(s, torch.zeros(3, dtype=torch.long))


@pytest.mark.parametrize(
    "fn",
    [
        lambda s, tt, **kw: TF.kd(s, tt, **kw),
        lambda s, tt, **kw: TF.dkd(s, tt, torch.zeros(s.shape[:-1], dtype=torch.long), **kw),
        lambda s, tt, **kw: TF.cross_entropy(s, torch.zeros(s.shape[:-1], dtype=torch.long), **kw),
        lambda s, tt, **kw: TF.dist(s, tt, **kw),
    ],
    ids=["kd", "dkd", "ce", "dist"],
)
def test_empty_inputs_and_empty_masks_give_a_graph_connected_zero(fn):
    empty = torch.zeros(0, 5, requires_grad=True)
    out = fn(empty, torch.zeros(0, 5))
    assert out.dim() == 0 and out.item() == 0.0
    out.backward()
    s = torch.randn(4, 5, requires_grad=True)
    out = fn(s, torch.randn(4, 5), mask=torch.zeros(4, dtype=torch.bool))
    assert out.item() == 0.0
    out.backward()
    assert s.grad is not None and torch.equal(s.grad, torch.zeros(4, 5))


# ---------------------------------------------------------------------------------------
# Batch-relation losses: a mask selects samples, weights are refused

RELATION_FNS = [TF.dist, TF.similarity_preserving, TF.rkd_distance, TF.rkd_angle, TF.rkd, TF.pkt]


@pytest.mark.parametrize("fn", RELATION_FNS, ids=lambda f: f.__name__)
def test_relation_mask_selects_samples(fn):
    torch.manual_seed(4)
    s, tt = torch.randn(7, 6), torch.randn(7, 6)
    mask = torch.tensor([True, False, True, True, False, True, False])
    assert torch.equal(fn(s, tt, mask=mask), fn(s[mask], tt[mask]))
    with pytest.raises(ValueError, match=f"{fn.__name__} is a batch-relation loss; per-sample weights"):
        fn(s, tt, weights=torch.ones(7))
    with pytest.raises(ValueError, match="bool"):
        fn(s, tt, mask=mask.float())


@pytest.mark.parametrize("fn", RELATION_FNS[1:], ids=lambda f: f.__name__)
def test_relation_mask_leaving_fewer_than_two_gives_zero(fn):
    s = torch.randn(5, 4, requires_grad=True)
    for kept in (0, 1):
        mask = torch.arange(5) < kept
        out = fn(s, torch.randn(5, 3), mask=mask)
        assert out.item() == 0.0
        out.backward()
        assert torch.equal(s.grad, torch.zeros(5, 4))
        s.grad = None


@pytest.mark.parametrize(
    "name, call",
    [
        ("dkd", lambda s, tt, y: TF.dkd(s, tt, y)),
        ("dkd", lambda s, tt, y: sum(TF.dkd_parts(s, tt, y))),
        ("cross_entropy", lambda s, tt, y: TF.cross_entropy(s, y)),
    ],
    ids=["dkd", "dkd_parts", "ce"],
)
def test_losses_taking_a_target_refuse_non_integer_targets(name, call):
    s, tt = torch.randn(3, 4), torch.randn(3, 4)
    # Cast to int64, 0.5 and 1.2 would silently become classes 0 and 1.
    for target in (torch.tensor([0.5, 1.2, 2.0]), torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64),
                   torch.tensor([True, False, True]), torch.tensor([0, 1, 2], dtype=torch.complex64)):
        with pytest.raises(ValueError, match=rf"{name}: target must hold integer class ids; got dtype {target.dtype}"):
            call(s, tt, target)
    for dtype in (torch.int64, torch.int32, torch.uint8):  # any integer dtype is fine
        assert torch.isfinite(call(s, tt, torch.tensor([0, 1, 2], dtype=dtype)))


def test_kd_refuses_a_non_finite_or_non_positive_temperature():
    s, tt = torch.randn(2, 3), torch.randn(2, 3)
    for temperature in (float("inf"), float("nan"), 0.0, -1.0):
        with pytest.raises(ValueError, match="kd: temperature must be finite and > 0"):
            TF.kd(s, tt, temperature=temperature)
    with pytest.raises(ValueError, match="dkd: temperature must be finite"):
        TF.dkd(s, tt, torch.tensor([0, 1]), temperature=float("inf"))


def test_masked_out_positions_may_carry_placeholder_targets():
    torch.manual_seed(5)
    s, tt = torch.randn(4, 5), torch.randn(4, 5)
    labelled = torch.tensor([True, False, True, False])
    y = torch.tensor([1, -1, 3, -1])  # -1: no label
    got = TF.cross_entropy(s, y, mask=labelled)
    assert torch.allclose(got, torch.nn.functional.cross_entropy(s[labelled], y[labelled]))
    assert torch.allclose(TF.dkd(s, tt, y, mask=labelled), TF.dkd(s[labelled], tt[labelled], y[labelled]))
    assert TF.cross_entropy(s, y, mask=labelled, reduction="none")[~labelled].abs().sum() == 0
