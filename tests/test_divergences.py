"""Token divergences: each equals its formula (float64 re-statement), masks and padding do
not change the mean, zero probabilities stay finite, and the limits hold."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from transfuse.functional import adaptive_kl, fkl, jsd, rkl, skew_fkl, skew_rkl, tvd

ALL = {"fkl": fkl, "rkl": rkl, "tvd": tvd, "jsd": jsd, "skew_fkl": skew_fkl, "skew_rkl": skew_rkl,
       "adaptive_kl": adaptive_kl}


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _kl(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(a > 0, a * (np.log(a) - np.log(b)), 0.0).sum(-1)


def _reference(name: str, zs: np.ndarray, zt: np.ndarray, T: float = 1.0, **opt) -> np.ndarray:
    """The formulas of the issue, in float64 numpy, per position."""
    p, q = _softmax(zt / T), _softmax(zs / T)
    if name == "fkl":
        return _kl(p, q)
    if name == "rkl":
        return _kl(q, p)
    if name == "tvd":
        return 0.5 * np.abs(p - q).sum(-1)
    if name == "jsd":
        b = opt.get("beta", 0.5)
        m = b * p + (1 - b) * q
        return b * _kl(p, m) + (1 - b) * _kl(q, m)
    if name == "skew_fkl":
        a = opt.get("alpha", 0.1)
        return _kl(p, a * p + (1 - a) * q)
    if name == "skew_rkl":
        a = opt.get("alpha", 0.1)
        return _kl(q, (1 - a) * p + a * q)
    if name == "adaptive_kl":
        mu = opt.get("mu", 0.5)
        out = []
        for pr, qr in zip(p.reshape(-1, p.shape[-1]), q.reshape(-1, q.shape[-1])):
            order = np.argsort(-pr, kind="stable")
            head, mass = set(), 0.0
            for v in order:  # the most probable tokens until their mass reaches mu
                if mass >= mu:
                    break
                head.add(int(v))
                mass += pr[v]
            gap = np.abs(pr - qr)
            gh = sum(gap[v] for v in head)
            gt = gap.sum() - gh
            out.append((gh * _kl(pr, qr) + gt * _kl(qr, pr)) / (gh + gt))
        return np.array(out).reshape(p.shape[:-1])
    raise KeyError(name)


@pytest.mark.parametrize("name", sorted(ALL))
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_equals_the_formula_per_position(name, temperature):
    g = torch.Generator().manual_seed(0)
    zs, zt = torch.randn(3, 5, 11, generator=g) * 2, torch.randn(3, 5, 11, generator=g) * 2
    got = ALL[name](zs, zt, temperature=temperature, reduction="none")
    want = _reference(name, zs.double().numpy(), zt.double().numpy(), temperature)
    assert got.shape == (3, 5)
    np.testing.assert_allclose(got.numpy(), want, rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(ALL[name](zs, zt, temperature=temperature).item(), want.mean(), rtol=2e-5, atol=1e-6)


def test_hand_computed_values():
    # p = (1/2, 1/2), q = (1/4, 3/4): FKL = 0.5 ln 2 + 0.5 ln(2/3); TVD = 1/4.
    zt = torch.tensor([[0.0, 0.0]])
    zs = torch.tensor([[0.0, math.log(3.0)]])
    assert fkl(zs, zt).item() == pytest.approx(0.5 * math.log(2) + 0.5 * math.log(2 / 3), abs=1e-6)
    assert rkl(zs, zt).item() == pytest.approx(0.25 * math.log(0.5) + 0.75 * math.log(1.5), abs=1e-6)
    assert tvd(zs, zt).item() == pytest.approx(0.25, abs=1e-6)
    # Symmetric JSD of these two: m = (3/8, 5/8).
    js = 0.5 * (0.5 * math.log(0.5 / 0.375) + 0.5 * math.log(0.5 / 0.625)) + \
        0.5 * (0.25 * math.log(0.25 / 0.375) + 0.75 * math.log(0.75 / 0.625))
    assert jsd(zs, zt).item() == pytest.approx(js, abs=1e-6)


@pytest.mark.parametrize("name", sorted(ALL))
def test_padding_does_not_change_the_mean(name):
    """The mean is over the masked-in positions: adding padded positions holding garbage
    (even inf) changes nothing, and so does splitting one batch into rows of any length."""
    g = torch.Generator().manual_seed(1)
    zs, zt = torch.randn(2, 4, 7, generator=g), torch.randn(2, 4, 7, generator=g)
    plain = ALL[name](zs, zt)
    pad_s = torch.cat([zs, torch.full((2, 3, 7), float("inf"))], dim=1)
    pad_t = torch.cat([zt, torch.randn(2, 3, 7, generator=g)], dim=1)
    mask = torch.cat([torch.ones(2, 4, dtype=torch.bool), torch.zeros(2, 3, dtype=torch.bool)], dim=1)
    padded = ALL[name](pad_s, pad_t, mask=mask)
    assert torch.isfinite(padded)
    torch.testing.assert_close(padded, plain)


@pytest.mark.parametrize("name", sorted(ALL))
def test_zero_when_equal_nonnegative_and_finite_gradients_at_extreme_logits(name):
    g = torch.Generator().manual_seed(2)
    z = torch.randn(6, 9, generator=g)
    assert ALL[name](z, z.clone()).item() == pytest.approx(0.0, abs=1e-6)
    # A teacher that gives some tokens exactly zero probability in float32.
    zt = torch.randn(6, 9, generator=g)
    zt[:, :3] = -1e4
    zs = (torch.randn(6, 9, generator=g) * 5).requires_grad_()
    value = ALL[name](zs, zt)
    value.backward()
    assert value.item() >= -1e-7 and torch.isfinite(value)
    assert torch.isfinite(zs.grad).all() and zs.grad.abs().sum() > 0


def test_limits_of_the_skewed_and_mixed_divergences():
    g = torch.Generator().manual_seed(3)
    zs, zt = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g)
    torch.testing.assert_close(skew_fkl(zs, zt, alpha=0.0), fkl(zs, zt))
    torch.testing.assert_close(skew_rkl(zs, zt, alpha=0.0), rkl(zs, zt))
    assert skew_fkl(zs, zt, alpha=1.0).item() == 0.0
    assert jsd(zs, zt, beta=0.0).item() == 0.0 and jsd(zs, zt, beta=1.0).item() == 0.0
    # The skewed forms are bounded where FKL/RKL are not: a student with ~0 mass on a teacher token.
    zt2, zs2 = torch.tensor([[0.0, 0.0]]), torch.tensor([[0.0, -60.0]])
    assert fkl(zs2, zt2).item() > 25
    assert skew_fkl(zs2, zt2, alpha=0.1).item() < 0.5 * math.log(1 / 0.1) + 1e-4


def test_adaptive_kl_weights_fkl_where_the_head_is_missed():
    # The teacher's head is token 0 (mass 0.9 >= mu = 0.5); a student that misses it is
    # judged by FKL mostly, one that misses only tail tokens by RKL mostly.
    zt = torch.log(torch.tensor([[0.9, 0.05, 0.05]]))
    miss_head = torch.log(torch.tensor([[0.5, 0.25, 0.25]]))
    value = adaptive_kl(miss_head, zt).item()
    p, q = np.array([0.9, 0.05, 0.05]), np.array([0.5, 0.25, 0.25])
    gh, gt = 0.4, 0.4
    assert value == pytest.approx((gh * _kl(p, q) + gt * _kl(q, p)) / (gh + gt), rel=1e-5)
    assert adaptive_kl(miss_head, zt, mu=1.0).item() == pytest.approx(fkl(miss_head, zt).item(), rel=1e-5)


def test_bfloat16_logits_are_computed_in_float32():
    g = torch.Generator().manual_seed(4)
    zs, zt = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    low = jsd(zs.bfloat16(), zt.bfloat16())
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, jsd(zs.bfloat16().float(), zt.bfloat16().float()))


@pytest.mark.parametrize("bad", [{"beta": 1.5}, {"beta": -0.1}, {"temperature": 0.0}])
def test_bad_options_are_refused(bad):
    with pytest.raises(ValueError, match="beta|temperature"):
        jsd(torch.zeros(2, 3), torch.zeros(2, 3), **bad)
    with pytest.raises(ValueError, match="same shape"):
        fkl(torch.zeros(2, 3), torch.zeros(2, 4))


@pytest.mark.parametrize("divergence", ["fkl", "rkl", "tvd", "jsd", "skew_fkl", "skew_rkl"])
def test_topk_with_every_token_equals_the_full_divergence(divergence):
    from transfuse.functional import topk_divergence

    g = torch.Generator().manual_seed(5)
    zs, zt = torch.randn(2, 3, 6, generator=g), torch.randn(2, 3, 6, generator=g)
    logp = torch.log_softmax(zt, -1)
    top, idx = logp.topk(6, dim=-1)
    got = topk_divergence(zs, top, idx, divergence=divergence)
    torch.testing.assert_close(got, ALL[divergence](zs, zt), rtol=1e-4, atol=1e-5)


def test_topk_buckets_equal_a_hand_computation_and_the_gradient_reaches_only_the_student():
    from transfuse.functional import topk_divergence

    zt = torch.log(torch.tensor([[0.6, 0.3, 0.05, 0.05]]))
    zs = torch.log(torch.tensor([[0.4, 0.4, 0.1, 0.1]])).requires_grad_()
    top, idx = zt.topk(2, dim=-1)  # tokens 0, 1; teacher tail 0.1, student tail 0.2
    value = topk_divergence(zs, top, idx, divergence="fkl")
    want = 0.6 * math.log(0.6 / 0.4) + 0.3 * math.log(0.3 / 0.4) + 0.1 * math.log(0.1 / 0.2)
    assert value.item() == pytest.approx(want, rel=1e-5)
    value.backward()
    assert torch.isfinite(zs.grad).all()
    with pytest.raises(ValueError, match="divergence must be one of"):
        topk_divergence(zs, top, idx, divergence="adaptive_kl")
    with pytest.raises(ValueError, match=r"must both be \(\.\.\., K\)"):
        topk_divergence(zs, top, idx[:, :1])


def test_topk_tail_stays_finite_when_the_top_k_hold_all_the_mass():
    from transfuse.functional import topk_divergence

    zt = torch.tensor([[30.0, 30.0, -30.0, -30.0]])
    zs = torch.tensor([[0.0, 0.0, 0.0, 0.0]], requires_grad=True)
    top, idx = torch.log_softmax(zt, -1).topk(2, dim=-1)
    value = topk_divergence(zs, top, idx, divergence="jsd")
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(zs.grad).all()


@pytest.mark.parametrize("divergence", ["fkl", "jsd", "adaptive_kl"])
def test_chunked_equals_the_plain_path_in_value_and_gradients(divergence):
    from transfuse.functional import DIVERGENCES, chunked_divergence

    g = torch.Generator().manual_seed(6)
    hidden = torch.randn(3, 7, 5, generator=g, dtype=torch.float64)
    head = torch.randn(13, 5, generator=g, dtype=torch.float64)
    bias = torch.randn(13, generator=g, dtype=torch.float64)
    teacher = torch.randn(3, 7, 13, generator=g)
    mask = torch.rand(3, 7, generator=g) > 0.3
    leaves = [t.clone().requires_grad_() for t in (hidden, head, bias)]
    plain = DIVERGENCES[divergence](torch.nn.functional.linear(*leaves), teacher, mask=mask, temperature=2.0)
    plain.backward()
    chunk_leaves = [t.clone().requires_grad_() for t in (hidden, head, bias)]
    chunked = chunked_divergence(chunk_leaves[0], chunk_leaves[1], teacher, head_bias=chunk_leaves[2],
                                 divergence=divergence, chunk_size=4, mask=mask, temperature=2.0)
    chunked.backward()
    torch.testing.assert_close(chunked.double(), plain.double(), rtol=1e-5, atol=1e-6)
    for a, b in zip(leaves, chunk_leaves):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6)


def test_chunked_refuses_bad_input():
    from transfuse.functional import chunked_divergence

    with pytest.raises(ValueError, match="divergence must be one of"):
        chunked_divergence(torch.zeros(2, 3), torch.zeros(4, 3), torch.zeros(2, 4), divergence="kl")
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_divergence(torch.zeros(2, 3), torch.zeros(4, 3), torch.zeros(2, 4), chunk_size=0)
    with pytest.raises(ValueError, match="must be"):
        chunked_divergence(torch.zeros(2, 3), torch.zeros(4, 3), torch.zeros(2, 5))


def test_sampled_reverse_kl_estimates_are_unbiased_and_k3_has_lower_variance():
    from transfuse.functional import sampled_reverse_kl

    g = torch.Generator().manual_seed(7)
    zs, zt = torch.randn(1, 6, generator=g), torch.randn(1, 6, generator=g)
    n = 40000
    q = torch.softmax(zs, -1)
    tokens = torch.multinomial(q.expand(n, -1), 1, replacement=True, generator=g).squeeze(-1)  # (n,)
    s_rep, t_rep = zs.expand(n, -1), zt.expand(n, -1)
    k1 = sampled_reverse_kl(s_rep, t_rep, tokens, estimator="k1", reduction="none")
    k3 = sampled_reverse_kl(s_rep, t_rep, tokens, estimator="k3", reduction="none")
    exact = rkl(zs, zt).item()
    assert k1.mean().item() == pytest.approx(exact, abs=0.03)
    assert k3.mean().item() == pytest.approx(exact, abs=0.03)
    assert (k3 >= 0).all() and k3.var() < k1.var()


def test_sampled_reverse_kl_gradient_is_the_score_function_estimator():
    from transfuse.functional import sampled_reverse_kl

    g = torch.Generator().manual_seed(8)
    zs = torch.randn(4, 5, generator=g).requires_grad_()
    zt = torch.randn(4, 5, generator=g).requires_grad_()
    tokens = torch.tensor([0, 3, 4, -100])  # the last position has no token
    value = sampled_reverse_kl(zs, zt, tokens)
    value.backward()
    assert zt.grad is None or not zt.grad.any()  # the teacher is a reward, never trained
    # By hand: mean over the 3 tokens of (log q(y) - log p(y)) * grad log q(y).
    ref = zs.detach().clone().requires_grad_()
    log_q = torch.log_softmax(ref, -1)[torch.arange(3), tokens[:3]]
    log_p = torch.log_softmax(zt.detach(), -1)[torch.arange(3), tokens[:3]]
    ((log_q - log_p).detach() * log_q).mean().backward()
    torch.testing.assert_close(zs.grad, ref.grad)
    with pytest.raises(ValueError, match="estimator"):
        sampled_reverse_kl(zs, zt, tokens, estimator="k2")
