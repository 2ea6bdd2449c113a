"""MiniLLM's policy-gradient objective for on-policy distillation of language models.

Gu et al., MiniLLM: Knowledge Distillation of Large Language Models, ICLR 2024,
https://arxiv.org/abs/2306.08543. The student ``q`` minimises the sequence-level reverse
KL ``KL(q || p)`` to the teacher ``p`` over its own samples. With the per-token reward
``r_t = log p(y_t | y_<t, x) - log q(y_t | y_<t, x)``, the gradient is split (Sec. 2.2) into

* a *single-step* part: the exact reverse KL over the vocabulary at each generated
  position, ``KL_t = sum_v q(v) (log q(v) - log p(v))``, differentiated through ``q``;
* a *long-term* part: the score-function (policy-gradient) term
  ``-A_t * grad log q(y_t)`` with the length-normalised, discounted return of the rewards
  after ``t`` as the advantage ``A_t`` (detached);
* with *teacher-mixed sampling* (tokens drawn from ``p~ = a p + (1 - a) q``), the
  long-term term is importance-weighted by ``w_t = q(y_t) / p~(y_t)``, under PPO's
  clipped objective.

What follows the official code (microsoft/LMOps, ``minillm/minillm/{losses,sampler}.py``)
and what does not is listed in :func:`minillm_loss`.
"""

from __future__ import annotations

from typing import Literal

import torch

from ._types import Reduction
from .divergences import _reduced

__all__ = ["minillm_importance_weights", "minillm_loss", "minillm_returns"]


def _float_mask(mask: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """``mask`` as a float ``(B, T)`` tensor (all ones without a mask)."""
    if mask is None:
        return torch.ones_like(like, dtype=torch.float32)
    if mask.shape != like.shape:
        raise ValueError(f"minillm: mask {tuple(mask.shape)} must be per position, {tuple(like.shape)}")
    return mask.to(torch.float32)


def minillm_returns(rewards: torch.Tensor, mask: torch.Tensor | None = None, *, gamma: float = 1.0,
                    length_norm: bool = True, reward_from: Literal["next", "current"] = "next") -> torch.Tensor:
    """MiniLLM's long-term return per position ``(B, T)`` from per-token ``rewards`` ``(B, T)``.

    ``mask`` ``(B, T)`` marks the generated positions of each row (the others hold no
    reward and are skipped by the normalisation). With ``reward_from="next"`` (the paper's
    ``R_{t+1}``, Eq. 5) the return at ``t`` is ``sum_{s > t} gamma^(s - t - 1) r_s``; with
    ``"current"`` (the official code's ``_get_advantages_and_returns``) it starts at ``t``:
    ``sum_{s >= t} gamma^(s - t) r_s``. ``length_norm`` divides it by the number of
    generated positions it sums over (at least 1), as both do. Positions outside ``mask``
    get 0. Shapes: ``rewards``, ``mask`` ``(B, T)``; the result ``(B, T)`` float32.
    """
    if reward_from not in ("next", "current"):
        raise ValueError(f"minillm: reward_from must be 'next' or 'current', got {reward_from!r}")
    if rewards.dim() != 2:
        raise ValueError(f"minillm: rewards must be (B, T), got {tuple(rewards.shape)}")
    m = _float_mask(mask, rewards)  # (B, T)
    r = torch.where(m > 0, rewards.float(), torch.zeros_like(rewards, dtype=torch.float32))  # (B, T)
    returns = torch.zeros_like(r)  # (B, T): sum_{s >= t} gamma^(s - t) r_s
    running = torch.zeros_like(r[:, 0])  # (B,)
    for t in reversed(range(r.shape[1])):
        running = r[:, t] + gamma * running
        returns[:, t] = running
    counts = m.flip(-1).cumsum(-1).flip(-1)  # (B, T): generated positions s >= t
    if reward_from == "next":
        returns = torch.cat([returns[:, 1:], torch.zeros_like(returns[:, :1])], dim=1)
        counts = counts - m
    if length_norm:
        returns = returns / counts.clamp(min=1)
    return returns * m


def minillm_importance_weights(student_logprob: torch.Tensor | None,
                               sample_logprob: torch.Tensor | None) -> torch.Tensor | None:
    """``w = q(y) / p~(y)`` per position (unclipped), from the log-probabilities of each sampled
    token under the student (``student_logprob``) and under the distribution it was drawn
    from (``sample_logprob``, the teacher-student mixture). None when either is None (the
    tokens came from the student: ``w = 1``). Positions where both are 0 (not sampled) get 1.
    """
    if student_logprob is None or sample_logprob is None:
        return None
    return torch.exp(student_logprob.float() - sample_logprob.float())


def _whiten(values: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """``(values - mean) / sqrt(var + 1e-8)`` over the positions ``m`` keeps (the official
    code's ``whiten``, there over every position of the padded batch; here over the masked-in
    ones). Unbiased variance, as ``torch.var_mean``; 0 with a single position."""
    n = m.sum()
    mean = (values * m).sum() / n.clamp(min=1)
    var = (((values - mean) * m) ** 2).sum() / (n - 1).clamp(min=1)
    return (values - mean) * torch.rsqrt(var + 1e-8) * m


def minillm_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor, *,
    sample_logprob: torch.Tensor | None = None, student_logprob: torch.Tensor | None = None,
    gamma: float = 0.95, length_norm: bool = True, single_step: bool = True,
    reward_from: Literal["next", "current"] = "next", reward_clip: float | None = None, whiten: bool = True,
    clip: float = 0.2, mask: torch.Tensor | None = None, weights: torch.Tensor | None = None,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """MiniLLM (Gu et al., ICLR 2024, https://arxiv.org/abs/2306.08543): a surrogate whose
    gradient is MiniLLM's policy gradient of the sequence-level reverse KL.

    Inputs: ``student_logits``/``teacher_logits`` ``(B, T, V)`` (position ``t`` predicts
    ``target[:, t]``); ``target`` ``(B, T)`` int64, the sampled next tokens (negative = no
    token: left out); ``mask`` ``(B, T)`` bool, the generated positions (the ``predicted``
    the ``on_policy`` transform writes); ``sample_logprob``/``student_logprob`` ``(B, T)``,
    aligned with ``target``: each sampled token's log-probability under the distribution it
    was drawn from (the teacher-student mixture ``p~``) and under the student at sampling
    time; both None when the student sampled alone (importance weight 1). ``weights``
    ``(B, T)`` or ``(B,)`` multiply the per-position values. Logits ``(B, V)`` with
    ``target`` ``(B,)`` are one position per row (no future: the long-term return is 0).

    Per generated position, with ``log q``, ``log p`` the student's and teacher's
    log-probabilities of ``target`` (from the logits; ``p`` detached):

    * reward ``r_t = log p(y_t) - log q(y_t)`` (detached), clipped to ``[-reward_clip,
      reward_clip]`` (None, the default: not clipped);
    * advantage ``A_t`` = :func:`minillm_returns` (``gamma``, ``length_norm``,
      ``reward_from``), whitened over the masked-in positions of the batch if ``whiten``;
    * importance weight ``w_t = exp(student_logprob - sample_logprob)`` = ``q / p~``;
    * long-term term (PPO's clipped surrogate, ratio ``rho = exp(log q - stopgrad log q)``,
      1 in value): ``L_t = max(-A_t w_t rho, -A_t clamp(w_t rho, 1 - clip, 1 + clip))``;
      its gradient is ``-A_t w_t grad log q(y_t)``, or 0 where the clamp binds;
    * single-step term (``single_step=True``): the exact ``KL_t = sum_v q(v) (log q(v) -
      log p(v))``, differentiated through ``q``.

    **Returned value**: the exact per-position reverse KL ``KL_t`` (the quantity the
    student minimises; not the surrogate's value, whose long-term part has no meaning as a
    number), reduced by the library's rule: the mean over the masked-in positions that have
    a target (``weights`` multiply per position or per row; ``reduction="none"``: the
    ``(B, T)`` values, masked-out 0). **Gradient**: that of ``mean_t(KL_t + L_t)`` over the
    same positions when ``single_step`` (else of ``mean_t L_t``; ``KL_t`` is then only
    reported). Each term is averaged over the generated tokens, as the official code's
    ``pg_loss`` and ``reg_loss`` (``sum / mask.sum()``) are.

    Follows the official code (microsoft/LMOps ``minillm``, ``train_base_xl.sh``): the
    reward ``log p - log q`` (``t_rewards + ent_rewards``), the return divided by the
    number of tokens it sums over (``--length-norm``), ``gamma = 0.95`` (its default),
    whitened advantages, ``q / p~`` inside PPO's clip (``--cliprange 0.2``), the exact
    single-step reverse KL *without* importance weight (its ``_reg_loss``). Rewards are not
    clipped by default: the script's ``--cliprange-reward 100`` after ``--reward-scaling
    0.5`` never binds (``reward_clip: 1`` gives the argument parser's default; the scaling
    is not an option: whitening cancels it). Deviations: ``reward_from="next"`` (default)
    is the paper's ``R_{t+1}`` (Eq. 5), which the single-step term complements; the code's
    return starts at ``t`` (``reward_from="current"``). One update per sample (no rollout
    buffer, no 4 PPO epochs: ``rho`` is 1 in value, so PPO's clip acts on the importance
    weight alone). Whitening is over the masked-in positions of the batch (the code's
    includes padding). No value head (the code has none either), and no pre-training term
    (the code adds ``0.5 * CE + 0.5 * soft-label CE to the teacher`` on a separate
    language-modelling corpus, ``--lm-coef 1 --kd-ratio 0.5``).
    """
    name = "minillm"
    if student_logits.dim() not in (2, 3) or student_logits.shape != teacher_logits.shape:
        raise ValueError(f"{name}: student and teacher logits must both be (B, T, V) (or (B, V)) of one shape; got "
                         f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}")
    if student_logits.dim() == 2:  # (B, V): each row one position, with no future (its return is 0)
        one = {k: None if v is None else v.unsqueeze(1)
               for k, v in (("sample_logprob", sample_logprob), ("student_logprob", student_logprob), ("mask", mask),
                            ("weights", weights))}
        if mask is not None and mask.shape != target.shape:
            raise ValueError(f"{name}: mask {tuple(mask.shape)} must be per position, {tuple(target.shape)}")
        value = minillm_loss(student_logits.unsqueeze(1), teacher_logits.unsqueeze(1), target.unsqueeze(1), gamma=gamma,
                             length_norm=length_norm, single_step=single_step, reward_from=reward_from,
                             reward_clip=reward_clip, whiten=whiten, clip=clip, reduction=reduction, **one)
        return value.squeeze(1) if reduction == "none" else value
    if target.shape != student_logits.shape[:-1]:
        raise ValueError(f"{name}: target {tuple(target.shape)} must have the logits' positions "
                         f"{tuple(student_logits.shape[:-1])}")
    if not 0 <= gamma <= 1:
        raise ValueError(f"{name}: gamma must be in [0, 1], got {gamma!r}")
    if not clip >= 0:
        raise ValueError(f"{name}: clip must be >= 0, got {clip!r}")
    if reward_clip is not None and not reward_clip > 0:
        raise ValueError(f"{name}: reward_clip must be > 0 or None, got {reward_clip!r}")
    if (sample_logprob is None) != (student_logprob is None):
        raise ValueError(f"{name}: give both sample_logprob and student_logprob (importance weights) or neither")
    for key, value in (("sample_logprob", sample_logprob), ("student_logprob", student_logprob)):
        if value is not None and value.shape != target.shape:
            raise ValueError(f"{name}: {key} {tuple(value.shape)} must be aligned with target {tuple(target.shape)}")
    has_token = target >= 0  # (B, T)
    keep = has_token if mask is None else (mask.bool() & has_token)  # (B, T)
    m = keep.float()
    index = target.clamp(min=0).long().unsqueeze(-1)  # (B, T, 1)
    log_q_all = torch.log_softmax(student_logits.float(), dim=-1)  # (B, T, V)
    log_p_all = torch.log_softmax(teacher_logits.float(), dim=-1).detach()  # (B, T, V)
    log_q = log_q_all.gather(-1, index).squeeze(-1)  # (B, T)
    log_p = log_p_all.gather(-1, index).squeeze(-1)  # (B, T)

    rewards = (log_p - log_q).detach()  # (B, T)
    if reward_clip is not None:
        rewards = rewards.clamp(-reward_clip, reward_clip)
    advantages = minillm_returns(rewards, keep, gamma=gamma, length_norm=length_norm, reward_from=reward_from)
    if whiten:
        advantages = _whiten(advantages, m)
    w = minillm_importance_weights(student_logprob, sample_logprob)  # (B, T) or None
    ratio = torch.exp(log_q - log_q.detach())  # (B, T): 1 in value, grad log q in gradient
    if w is not None:
        ratio = ratio * torch.where(keep, w, torch.ones_like(w))
    long_term = torch.max(-advantages * ratio, -advantages * ratio.clamp(1.0 - clip, 1.0 + clip))  # (B, T)

    # Exact reverse KL over the vocabulary; masked-out positions may hold anything (0 * inf guarded).
    rkl = (log_q_all.exp() * (log_q_all - log_p_all)).sum(-1)  # (B, T)
    rkl = torch.where(keep, rkl, torch.zeros_like(rkl))
    long_term = torch.where(keep, long_term, torch.zeros_like(long_term))
    surrogate = rkl + long_term if single_step else long_term
    # Value: the exact reverse KL; gradient: the surrogate's.
    values = rkl.detach() + (surrogate - surrogate.detach())
    return _reduced(values, keep, weights, reduction, name)
