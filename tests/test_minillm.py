"""MiniLLM (Gu et al., ICLR 2024): the single-step term is the exact reverse KL, the
long-term return and its gradient match hand-written ones, importance weights are q / p~
and clipped as PPO clips them, and teacher-mixed sampling draws from the mixture."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from transfuse.functional.divergences import rkl
from transfuse.functional.minillm import minillm_importance_weights, minillm_loss, minillm_returns
from transfuse.losses import LOSSES

V = 6


def _logits(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, V, generator=torch.Generator().manual_seed(seed)) * 2


# ---------------------------------------------------------------- the pure function


def test_the_value_is_the_exact_reverse_kl_and_the_single_step_gradient_is_its_gradient():
    s, t = _logits(2, 5, seed=0).requires_grad_(), _logits(2, 5, seed=1)
    target = torch.randint(V, (2, 5), generator=torch.Generator().manual_seed(2))
    mask = torch.tensor([[0, 1, 1, 1, 0], [0, 0, 1, 1, 1]], dtype=torch.bool)
    value = minillm_loss(s, t, target, mask=mask)
    assert torch.allclose(value, rkl(s, t, mask=mask), atol=1e-6)
    # The gradient with the single-step term minus the one without = the exact RKL's gradient.
    with_ss = torch.autograd.grad(minillm_loss(s, t, target, mask=mask), s)[0]
    without = torch.autograd.grad(minillm_loss(s, t, target, mask=mask, single_step=False), s)[0]
    exact = torch.autograd.grad(rkl(s, t, mask=mask), s)[0]
    assert torch.allclose(with_ss - without, exact, atol=1e-6)


def test_returns_by_hand_one_row():
    rewards = torch.tensor([[9.0, 0.5, -1.0, 2.0, 7.0]])  # position 0 (prompt) and 4 (no target) are masked out
    mask = torch.tensor([[0, 1, 1, 1, 0]], dtype=torch.bool)
    g = 0.5
    nxt = minillm_returns(rewards, mask, gamma=g, length_norm=True, reward_from="next")
    # R_1 = (r2 + g r3) / 2 tokens; R_2 = r3 / 1; R_3 = nothing after it = 0.
    assert torch.allclose(nxt, torch.tensor([[0.0, (-1.0 + g * 2.0) / 2, 2.0, 0.0, 0.0]]))
    cur = minillm_returns(rewards, mask, gamma=g, length_norm=True, reward_from="current")
    assert torch.allclose(cur, torch.tensor([[0.0, (0.5 - g * 1.0 + g * g * 2.0) / 3, (-1.0 + g * 2.0) / 2, 2.0, 0.0]]))
    raw = minillm_returns(rewards, mask, gamma=1.0, length_norm=False, reward_from="next")
    assert torch.allclose(raw, torch.tensor([[0.0, 1.0, 2.0, 0.0, 0.0]]))


def test_the_rewards_are_log_p_minus_log_q_at_the_sampled_tokens():
    # One row, whitening and reward clipping off: the long-term gradient is -A_t grad log q(y_t),
    # A from the hand-computed rewards log p(y) - log q(y).
    s, t = _logits(1, 4, seed=3).requires_grad_(), _logits(1, 4, seed=4)
    target = torch.tensor([[1, 4, 0, 2]])
    mask = torch.tensor([[1, 1, 1, 0]], dtype=torch.bool)
    log_q = torch.log_softmax(s, -1)[0, torch.arange(4), target[0]]
    log_p = torch.log_softmax(t, -1)[0, torch.arange(4), target[0]]
    r = (log_p - log_q).detach()
    g = 0.9
    advantage = [(r[1] + g * r[2]) / 2, r[2] / 1, 0.0]  # from t + 1, length-normalised
    surrogate = -sum(a * log_q[i] for i, a in enumerate(advantage)) / 3
    want = torch.autograd.grad(surrogate, s)[0]
    got = torch.autograd.grad(minillm_loss(s, t, target, mask=mask, gamma=g, whiten=False, reward_clip=None,
                                           single_step=False), s)[0]
    assert torch.allclose(got, want, atol=1e-6)


def _hand_gradient(s, t, target, mask, w, *, gamma, clip, reward_clip):
    """The MiniLLM surrogate written out position by position (loops, no shared code)."""
    B, T = target.shape
    log_q_all, log_p_all = torch.log_softmax(s, -1), torch.log_softmax(t, -1).detach()
    kept = [(b, i) for b in range(B) for i in range(T) if mask[b, i]]
    r = {(b, i): float((log_p_all[b, i, target[b, i]] - log_q_all[b, i, target[b, i]]).detach()) for b, i in kept}
    r = {k: max(-reward_clip, min(reward_clip, v)) for k, v in r.items()}
    ret = {}
    for b, i in kept:
        future = [j for j in range(i + 1, T) if mask[b, j]]
        ret[b, i] = sum(gamma ** (j - i - 1) * r[b, j] for j in future) / max(len(future), 1)
    vals = torch.tensor([ret[k] for k in kept], dtype=torch.float64)
    mean, var = vals.mean(), vals.var()  # unbiased, as torch.var_mean
    total, n_clipped = 0.0, 0
    for b, i in kept:
        a = (ret[b, i] - float(mean)) / math.sqrt(float(var) + 1e-8)
        wt = float(w[b, i])
        clipped = (a > 0 and wt > 1 + clip) or (a < 0 and wt < 1 - clip)  # PPO's max picks the clamped, flat side
        n_clipped += clipped
        coef = 0.0 if clipped else a * wt
        kl = (log_q_all[b, i].exp() * (log_q_all[b, i] - log_p_all[b, i])).sum()
        total = total + kl - coef * log_q_all[b, i, target[b, i]]
    return torch.autograd.grad(total / len(kept), s)[0], r, n_clipped


def test_the_gradient_equals_the_hand_written_surrogate_with_clipped_importance_weights():
    s, t = _logits(2, 6, seed=5).requires_grad_(), _logits(2, 6, seed=6)
    target = torch.randint(V, (2, 6), generator=torch.Generator().manual_seed(7))
    target[1, 5] = -100  # no token: left out even though the mask keeps it
    mask = torch.tensor([[0, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1]], dtype=torch.bool)
    # Importance weights far outside [0.8, 1.2] on both sides, so the clip binds somewhere.
    w = torch.tensor([[1.0, 2.0, 0.5, 1.1, 3.0, 1.0], [1.0, 1.0, 0.3, 2.5, 0.9, 1.0]])
    student_lp = torch.randn(2, 6, generator=torch.Generator().manual_seed(8))
    sample_lp = student_lp - w.log()
    assert torch.allclose(minillm_importance_weights(student_lp, sample_lp), w, atol=1e-6)
    want, r, n_clipped = _hand_gradient(s, t, target, mask & (target >= 0), w, gamma=0.95, clip=0.2, reward_clip=1.0)
    assert any(abs(v) == 1.0 for v in r.values())  # reward clipping is exercised
    assert 0 < n_clipped < len(r)  # the importance-weight clip binds at some positions, not all
    value = minillm_loss(s, t, target, mask=mask, sample_logprob=sample_lp, student_logprob=student_lp,
                         reward_clip=1.0)
    got = torch.autograd.grad(value, s)[0]
    assert torch.allclose(got, want.float(), atol=1e-5)
    # Without the clip the weights multiply the whole long-term gradient: a different gradient.
    unclipped = torch.autograd.grad(minillm_loss(s, t, target, mask=mask, sample_logprob=sample_lp,
                                                 student_logprob=student_lp, reward_clip=1.0, clip=1.0), s)[0]
    assert not torch.allclose(unclipped, got, atol=1e-4)


def test_a_clipped_weight_stops_the_long_term_gradient():
    # One generated position after which one more token comes: A_0 = r_1 (no whitening).
    s, t = torch.zeros(1, 2, V, requires_grad=True), torch.zeros(1, 2, V)
    t[0, 1, 3] = 2.0  # the teacher likes token 3 at position 1: r_1 > 0, so A_0 > 0
    target = torch.tensor([[0, 3]])
    kwargs = dict(whiten=False, single_step=False, reward_clip=None)
    for w, flat in ((2.0, True), (0.5, False), (1.1, False)):
        lp = torch.zeros(1, 2)
        g = torch.autograd.grad(minillm_loss(s, t, target, sample_logprob=lp - math.log(w), student_logprob=lp,
                                             **kwargs), s)[0]
        assert (g[0, 0].abs().max() == 0) == flat


def test_the_registered_loss_reads_the_sampled_log_probs_where_the_batch_has_them():
    spec = LOSSES.get("minillm")
    assert spec.needs == ("target",) and spec.weight == 1.0 and spec.ce_weight == 0.0
    loss = spec.build(whiten=False)
    s, t = _logits(1, 4, seed=9).requires_grad_(), _logits(1, 4, seed=10)
    target, mask = torch.tensor([[1, 2, 3, 0]]), torch.tensor([[1, 1, 1, 0]], dtype=torch.bool)
    lp = torch.zeros(1, 4)
    same = minillm_loss(s, t, target, mask=mask, whiten=False, sample_logprob=lp - 1.0, student_logprob=lp)
    assert torch.equal(loss(s, t, target=target, mask=mask, sample_logprob=lp - 1.0, student_logprob=lp), same)
    assert torch.equal(loss(s, t, target=target, mask=mask), minillm_loss(s, t, target, mask=mask, whiten=False))
    with pytest.raises(ValueError, match="reward_from"):
        spec.build(reward_from="later")


# ---------------------------------------------------------------- teacher-mixed sampling

pytest.importorskip("transformers")

from transfuse.config import config_from_dict  # noqa: E402
from transfuse.data import TokenRows  # noqa: E402
from transfuse.distiller import Distiller, Term  # noqa: E402
from transfuse.models import build_model  # noqa: E402
from transfuse.on_policy import OnPolicy, sample_continuations, sample_mixed_continuations  # noqa: E402
from transfuse.participants import Participant  # noqa: E402
from transfuse.run import run  # noqa: E402
from test_on_policy import VOCAB, _Always  # noqa: E402  (one always-token-7 model for the on-policy tests)

T = 10


def _lm(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return build_model("causal_lm", input_shape=(T,), num_classes=VOCAB, layers=1, width=16, heads=2).eval()


def _distiller(student: nn.Module, teacher: nn.Module) -> Distiller:
    return Distiller([Participant("student", student), Participant("teacher", teacher, trainable=False)],
                     [Term(name="minillm", loss=LOSSES.get("minillm").build(), input="student.logits",
                           target="teacher.logits")])


def _batch(n: int = 4) -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    return TokenRows(torch.randint(VOCAB, (n, T))).__getitems__(list(range(n)))


def test_teacher_mix_zero_draws_what_the_student_alone_draws_and_leaves_the_batch_as_before():
    student, teacher = _lm(0), _lm(1)
    ids, prompts = torch.randint(VOCAB, (4, T)), torch.tensor([2, 3, 3, 5])
    torch.manual_seed(3)
    alone = sample_continuations(student, ids, prompts)
    torch.manual_seed(3)
    mixed, sample_lp, student_lp = sample_mixed_continuations(student, teacher, ids, prompts, teacher_mix=0.0)
    assert torch.equal(alone, mixed) and torch.equal(sample_lp, student_lp)
    batch, outs = _batch(), []
    for mix in (None, 0.0):
        torch.manual_seed(3)
        transform = OnPolicy(lmbda=1.0, prompt_tokens=3) if mix is None else OnPolicy(lmbda=1.0, prompt_tokens=3,
                                                                                       teacher_mix=mix)
        outs.append(transform(batch, step=0, distiller=_distiller(student, teacher)))
    assert outs[0].keys() == outs[1].keys() and "sample_logprob" not in outs[1]
    assert all(torch.equal(outs[0][k], outs[1][k]) for k in outs[0])


def test_teacher_mix_one_draws_the_teachers_tokens():
    student = _lm(0)
    transform = OnPolicy(lmbda=1.0, prompt_tokens=3, teacher_mix=1.0)
    out = transform(_batch(), step=0, distiller=_distiller(student, _Always()))
    assert (out["input_ids"][:, 3:] == 7).all()
    generated = out["predicted"]  # positions 2..T-2 predict the generated tokens 3..T-1
    assert torch.allclose(out["sample_logprob"][generated], torch.zeros(()), atol=1e-6)  # p~ = p: log 1
    with torch.no_grad():
        index = out["target"].clamp(min=0)[..., None]
        log_q = torch.log_softmax(student(out["input_ids"]), -1).gather(-1, index)[..., 0]
    assert torch.allclose(out["student_logprob"][generated], log_q[generated], atol=1e-5)
    assert (out["sample_logprob"][~generated] == 0).all() and (out["student_logprob"][~generated] == 0).all()


def test_the_stored_log_probs_are_those_of_the_mixture_and_of_the_student():
    student, teacher, a = _lm(0), _lm(1), 0.2
    torch.manual_seed(4)
    out = OnPolicy(lmbda=1.0, prompt_tokens=2, teacher_mix=a)(_batch(), step=0, distiller=_distiller(student, teacher))
    with torch.no_grad():
        q = torch.softmax(student(out["input_ids"]), -1)  # (B, T, V)
        p = torch.softmax(teacher(out["input_ids"]), -1)
    index = out["target"].clamp(min=0)[..., None]
    mix = (a * p + (1 - a) * q).gather(-1, index)[..., 0]
    keep = out["predicted"]
    assert torch.allclose(out["sample_logprob"][keep], mix.log()[keep], atol=1e-5)
    assert torch.allclose(out["student_logprob"][keep], q.gather(-1, index)[..., 0].log()[keep], atol=1e-5)
    w = minillm_importance_weights(out["student_logprob"], out["sample_logprob"])
    assert torch.allclose(w[keep], (q.gather(-1, index)[..., 0] / mix)[keep], atol=1e-4)


def test_teacher_mix_options_are_checked():
    with pytest.raises(ValueError, match="teacher_mix"):
        OnPolicy(teacher_mix=1.5)
    with pytest.raises(ValueError, match="temperature > 0"):
        OnPolicy(teacher_mix=0.2, temperature=0.0)
    with pytest.raises(ValueError, match="'mentor'"):
        OnPolicy(teacher_mix=0.2, teacher="mentor")(_batch(), step=0, distiller=_distiller(_lm(0), _lm(1)))


def test_a_minillm_run_with_teacher_mixed_sampling_trains_and_reports_perplexity(tmp_path):
    cfg = {
        "name": "minillm", "seed": 0,
        "data": {"name": "markov", "options": {"block_size": 16, "num_train": 200, "num_test": 40}},
        "student": {"name": "causal_lm", "options": {"layers": 1, "width": 32, "heads": 2}},
        "teacher": {"name": "causal_lm", "options": {"layers": 1, "width": 48, "heads": 2},
                    "train": {"steps": 60, "batch_size": 32, "optim": {"name": "adam", "lr": 0.003}},
                    "cache_dir": str(tmp_path / "cache")},
        "distill": {"method": "minillm"},
        "transforms": [{"name": "on_policy", "options": {"lmbda": 1.0, "prompt_tokens": 4, "teacher_mix": 0.2}}],
        "optim": {"name": "adam", "lr": 0.003},
        "train": {"steps": 20, "batch_size": 8, "log_every": 10, "checkpoint_every": 20, "progress": False},
    }
    summary = run(config_from_dict(cfg), out_dir=tmp_path / "run", quiet=True)
    assert summary["steps"] == 20 and summary["terms"] == {"minillm": 1.0}
    # The markov data has 16 tokens: a uniform (untrained) student has perplexity 16.
    assert 1.0 < summary["student"]["perplexity"] < 15.0


def test_a_step_is_the_mean_over_the_generated_tokens_the_library_rule():
    # Rows with prompts of different lengths (their unlabelled prefix): each row generates T - prompt tokens,
    # and the term's value is the exact reverse KL summed over those positions, divided by their count.
    student, teacher = _lm(0), _lm(1)
    ids = torch.randint(VOCAB, (3, T), generator=torch.Generator().manual_seed(0))
    prompts = [2, 5, 7]
    labels = ids.clone()
    for row, p in enumerate(prompts):
        labels[row, :p] = -100
    batch = TokenRows(ids, torch.ones_like(ids), labels).__getitems__([0, 1, 2])
    distiller = _distiller(student, teacher)
    torch.manual_seed(0)
    out = OnPolicy(lmbda=1.0, teacher_mix=0.2)(batch, step=0, distiller=distiller)
    generated = [T - p for p in prompts]
    assert out["predicted"].sum(1).tolist() == generated
    with torch.no_grad():
        value = distiller.eval()(out, 0)["parts"]["minillm"].double()
        log_q, log_p = torch.log_softmax(student(out).double(), -1), torch.log_softmax(teacher(out).double(), -1)
    per_position = (log_q.exp() * (log_q - log_p)).sum(-1)  # (3, T)
    torch.testing.assert_close(value, per_position[out["predicted"]].sum() / sum(generated), rtol=1e-5, atol=1e-9)
