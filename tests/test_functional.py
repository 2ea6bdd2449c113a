"""transfuse.functional against values computed by hand (plain Python loops and math).

Each reference below re-derives the paper's formula element by element, without the
torch ops the implementation uses, so a wrong reduction, temperature factor or
normalisation shows up as a mismatch.
"""

from __future__ import annotations

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
