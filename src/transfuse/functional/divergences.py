"""Token-level divergences between a teacher's and a student's next-token distributions.

Every function takes ``(student_logits, teacher_logits, *, temperature=1.0, mask=None,
weights=None, reduction="mean")`` with logits ``(..., V)`` -- ``(B, V)`` for a classifier,
``(B, T, V)`` for a language model -- and an optional boolean ``mask`` ``(...)`` (or a
prefix of it) that selects the positions that carry loss (a causal LM's predicted,
non-prompt, non-padding tokens). Per position the divergence is summed over the
vocabulary; the positions are reduced by :func:`~transfuse.functional.reduce_positions`:
the mean over the positions where ``mask`` is true, so the value does not depend on how
much padding a batch holds.

With ``p = softmax(teacher_logits / T)`` and ``q = softmax(student_logits / T)``:

* :func:`fkl` ``KL(p || q)`` (mode-covering), :func:`rkl` ``KL(q || p)`` (mode-seeking);
* :func:`tvd` ``0.5 * sum |p - q|``;
* :func:`jsd` ``beta * KL(p || m) + (1 - beta) * KL(q || m)``, ``m = beta * p + (1 - beta) * q``
  (the generalised Jensen-Shannon divergence of GKD);
* :func:`skew_fkl` ``KL(p || a * p + (1 - a) * q)`` and :func:`skew_rkl`
  ``KL(q || (1 - a) * p + a * q)`` (DistiLLM);
* :func:`adaptive_kl` the head/tail-weighted sum of FKL and RKL (Wu et al., 2024).

A teacher known only by its top-k tokens (a top-k teacher-output cache) is a
:class:`TopKLogits`; :func:`fkl`, :func:`rkl`, :func:`tvd`, :func:`jsd`, :func:`skew_fkl`
and :func:`skew_rkl` accept one in place of ``teacher_logits`` and then compute
:func:`topk_divergence` (the top-k tokens plus one tail bucket) with the same options.

The temperature is applied inside the loss and nowhere else, and these functions never
multiply by ``T^2`` (Hinton's factor, which :func:`~transfuse.functional.kd` applies):
for language models the divergence is the quantity reported and compared, so it is kept
as it is; scale the term's weight to compensate when you raise ``T``. All arithmetic is
in float32 (bf16 logits are upcast), and a mixture's log is computed with ``logaddexp``
so a zero probability never produces ``log 0 * 0 = nan``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Union

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ._types import Probability, Reduction, Temperature
from .logits import _check_pair, _check_reduction, _check_temperature
from .reduce import _checked, reduce_positions, weigh_positions

__all__ = [
    "DIVERGENCES", "TOPK_DIVERGENCES", "TopKLogits", "adaptive_kl", "chunked_divergence", "fkl", "jsd", "rkl", "sampled_reverse_kl",
    "skew_fkl", "skew_rkl", "topk_divergence", "tvd",
]


@dataclass(frozen=True)
class TopKLogits:
    """A teacher's next-token distribution known by its top-k tokens and the mass of the rest.

    What a top-k teacher-output cache returns for a logits field (in place of the dense
    ``(..., V)`` logits), and what :func:`fkl`, :func:`rkl`, :func:`tvd`, :func:`jsd`,
    :func:`skew_fkl` and :func:`skew_rkl` accept as their teacher.

    logprobs: ``(..., K)`` float, the log-probabilities (temperature 1) of the K most
        probable tokens, in descending order.
    indices: ``(..., K)`` int64, their token ids.
    tail: ``(...)`` float, the probability of every other token together,
        ``1 - sum_k exp(logprobs)``, computed from the unrounded distribution (so a
        float16 ``logprobs`` does not disturb it).
    vocab_size: V, the vocabulary the K tokens come from.

    ``shape`` is the shape of the logits it stands for, ``(..., V)``, so that shape
    checks between a student's logits and a teacher's work on either form.
    """

    logprobs: torch.Tensor
    indices: torch.Tensor
    tail: torch.Tensor
    vocab_size: int

    def __post_init__(self) -> None:
        lp, idx, tail = self.logprobs, self.indices, self.tail
        if lp.shape != idx.shape or tail.shape != lp.shape[:-1] or lp.dim() < 1:
            raise ValueError(f"TopKLogits: logprobs {tuple(lp.shape)} and indices {tuple(idx.shape)} must both be "
                             f"(..., K) and tail {tuple(tail.shape)} their leading (...)")
        if idx.is_floating_point() or idx.dtype == torch.bool:
            raise ValueError(f"TopKLogits: indices must be integer token ids, got {idx.dtype}")
        if not (isinstance(self.vocab_size, int) and lp.shape[-1] <= self.vocab_size):
            raise ValueError(f"TopKLogits: vocab_size must be an int >= K = {lp.shape[-1]}, got {self.vocab_size!r}")

    @classmethod
    def from_logits(cls, logits: torch.Tensor, k: int) -> "TopKLogits":
        """The top ``k`` of ``softmax(logits)`` ``(..., V)`` (any float dtype), in float32, with its exact tail.

        The tail is the summed probability of the V - k other tokens (``logsumexp`` over
        them), which equals ``1 - sum exp(logprobs)`` without the cancellation of that
        difference when the top k hold almost all the mass.
        """
        vocab = logits.shape[-1]
        if not (isinstance(k, int) and not isinstance(k, bool) and 1 <= k <= vocab):
            raise ValueError(f"TopKLogits.from_logits: k must be an int in [1, V = {vocab}], got {k!r}")
        log_p = F.log_softmax(logits.detach().float(), dim=-1)  # (..., V)
        top, index = log_p.topk(k, dim=-1)  # (..., K), (..., K) most probable first
        rest = log_p.scatter(-1, index, float("-inf"))  # (..., V): the top k taken out
        tail = torch.logsumexp(rest, dim=-1).exp()  # (...); exactly 0 when k == V
        return cls(top, index, tail, vocab)

    @property
    def k(self) -> int:
        """K, the tokens kept per position."""
        return self.logprobs.shape[-1]

    @property
    def shape(self) -> torch.Size:
        """The shape of the logits this stands for: ``(..., V)``."""
        return torch.Size((*self.logprobs.shape[:-1], self.vocab_size))

    def to(self, device: torch.device | str) -> "TopKLogits":
        """The same tensors on ``device``."""
        return TopKLogits(self.logprobs.to(device), self.indices.to(device), self.tail.to(device), self.vocab_size)

    def detach(self) -> "TopKLogits":
        """Without gradient history (a teacher target never has any; kept for the target's contract)."""
        return TopKLogits(self.logprobs.detach(), self.indices.detach(), self.tail.detach(), self.vocab_size)


#: A teacher given as dense logits ``(..., V)`` or by its top-k tokens.
TeacherLogits = Union[torch.Tensor, TopKLogits]


def _log_probs(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float, name: str):
    _check_pair(student_logits, teacher_logits, name)
    _check_temperature(temperature, name)
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)  # (..., V)
    log_p = F.log_softmax(teacher_logits.float() / temperature, dim=-1)  # (..., V)
    return log_q, log_p


def _kl(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """``KL(a || b)`` per position ``(...)`` from log-probabilities ``(..., V)``; ``0 log 0 = 0``."""
    a = log_a.exp()
    # where(), not a product: a token with a = 0 may have log_b = -inf (0 * inf = nan).
    terms = torch.where(a > 0, a * (log_a - log_b), torch.zeros((), dtype=a.dtype, device=a.device))
    return terms.sum(-1)


def _mix(log_a: torch.Tensor, log_b: torch.Tensor, weight_a: float) -> torch.Tensor:
    """``log(weight_a * a + (1 - weight_a) * b)`` from log-probabilities, exact at weights 0 and 1."""
    if weight_a <= 0.0:
        return log_b
    if weight_a >= 1.0:
        return log_a
    return torch.logaddexp(log_a + math.log(weight_a), log_b + math.log1p(-weight_a))


def _divergence(name: str, student_logits, teacher_logits, temperature, mask, weights, reduction, *,
                beta: float = 0.5, alpha: float = 0.1) -> torch.Tensor:
    """The full-vocabulary divergence ``name``: log-probabilities, per-position values, reduction.
    A :class:`TopKLogits` teacher goes to :func:`topk_divergence` with the same options."""
    if isinstance(teacher_logits, TopKLogits):
        if tuple(student_logits.shape) != tuple(teacher_logits.shape):
            raise ValueError(f"{name}: student logits {tuple(student_logits.shape)} and the top-k teacher's logits "
                             f"{tuple(teacher_logits.shape)} must have the same shape")
        return topk_divergence(student_logits, teacher_logits.logprobs, teacher_logits.indices,
                               topk_tail=teacher_logits.tail, divergence=name, temperature=temperature, beta=beta,
                               alpha=alpha, mask=mask, weights=weights, reduction=reduction)
    log_q, log_p = _log_probs(student_logits, teacher_logits, temperature, name)
    return _reduced(_bucket_values(name, log_q, log_p, beta=beta, alpha=alpha), mask, weights, reduction, name)


def _reduced(values: torch.Tensor, mask, weights, reduction: str, name: str) -> torch.Tensor:
    _check_reduction(reduction, name)
    if reduction == "none":
        return weigh_positions(values, mask=mask, weights=weights)
    return reduce_positions(values, mask=mask, weights=weights)


def fkl(
    student_logits: torch.Tensor, teacher_logits: TeacherLogits, *, temperature: Temperature = 1.0,
    mask: torch.Tensor | None = None, weights: torch.Tensor | None = None, reduction: Reduction = "mean",
) -> torch.Tensor:
    """Forward KL ``KL(p || q)`` per position (mode-covering: the student spreads over every
    token the teacher gives mass to).

    Shapes: logits ``(..., V)``; ``mask``/``weights`` ``(...)`` or a prefix. Reduction: the
    mean over masked-in positions (``reduction="none"``: the ``(...)`` values, masked-out 0).
    No ``T^2`` factor. ``teacher_logits`` may be a :class:`TopKLogits` (a top-k teacher
    cache): the value is then :func:`topk_divergence` over its K tokens and tail bucket
    (the same for every divergence that accepts one). Paper: Hinton et al., Distilling the Knowledge in a Neural Network,
    2015, https://arxiv.org/abs/1503.02531 (word-level KD for sequences: Kim & Rush, 2016).
    """
    return _divergence("fkl", student_logits, teacher_logits, temperature, mask, weights, reduction)


def rkl(
    student_logits: torch.Tensor, teacher_logits: TeacherLogits, *, temperature: Temperature = 1.0,
    mask: torch.Tensor | None = None, weights: torch.Tensor | None = None, reduction: Reduction = "mean",
) -> torch.Tensor:
    """Reverse KL ``KL(q || p)`` per position (mode-seeking: the student concentrates on the
    teacher's main modes). Shapes and reduction as :func:`fkl`.

    Paper: Gu et al., MiniLLM: Knowledge Distillation of Large Language Models, ICLR 2024,
    https://arxiv.org/abs/2306.08543 (which optimises it on the student's own samples).
    """
    return _divergence("rkl", student_logits, teacher_logits, temperature, mask, weights, reduction)


def tvd(
    student_logits: torch.Tensor, teacher_logits: TeacherLogits, *, temperature: Temperature = 1.0,
    mask: torch.Tensor | None = None, weights: torch.Tensor | None = None, reduction: Reduction = "mean",
) -> torch.Tensor:
    """Total variation distance ``0.5 * sum_v |p_v - q_v|`` per position, in ``[0, 1]``.
    Shapes and reduction as :func:`fkl`.

    Paper: Wen et al., f-Divergence Minimization for Sequence-Level Knowledge Distillation,
    ACL 2023, https://arxiv.org/abs/2307.15190
    """
    return _divergence("tvd", student_logits, teacher_logits, temperature, mask, weights, reduction)


def jsd(
    student_logits: torch.Tensor, teacher_logits: TeacherLogits, *, beta: Probability = 0.5,
    temperature: Temperature = 1.0, mask: torch.Tensor | None = None, weights: torch.Tensor | None = None,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """Generalised Jensen-Shannon divergence ``beta * KL(p || m) + (1 - beta) * KL(q || m)``
    with ``m = beta * p + (1 - beta) * q``, per position. ``beta = 0.5`` is the symmetric
    JSD; at ``beta`` 0 or 1 the mixture equals one side and the value is 0 (use :func:`fkl`
    or :func:`rkl` for those limits). Shapes and reduction as :func:`fkl`.

    Paper: Agarwal et al., On-Policy Distillation of Language Models: Learning from
    Self-Generated Mistakes (GKD), ICLR 2024, https://arxiv.org/abs/2306.13649
    """
    _check_probability(beta, "beta", "jsd")
    return _divergence("jsd", student_logits, teacher_logits, temperature, mask, weights, reduction, beta=beta)


def skew_fkl(
    student_logits: torch.Tensor, teacher_logits: TeacherLogits, *, alpha: Probability = 0.1,
    temperature: Temperature = 1.0, mask: torch.Tensor | None = None, weights: torch.Tensor | None = None,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """Skew forward KL ``KL(p || alpha * p + (1 - alpha) * q)`` per position: FKL against a
    student distribution mixed with a little of the teacher's, which bounds the loss where
    the student gives a teacher token almost no mass. ``alpha = 0`` is :func:`fkl`.
    Shapes and reduction as :func:`fkl`.

    Paper: Ko et al., DistiLLM: Towards Streamlined Distillation for Large Language Models,
    ICML 2024, https://arxiv.org/abs/2402.03898
    """
    _check_probability(alpha, "alpha", "skew_fkl")
    return _divergence("skew_fkl", student_logits, teacher_logits, temperature, mask, weights, reduction, alpha=alpha)


def skew_rkl(
    student_logits: torch.Tensor, teacher_logits: TeacherLogits, *, alpha: Probability = 0.1,
    temperature: Temperature = 1.0, mask: torch.Tensor | None = None, weights: torch.Tensor | None = None,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """Skew reverse KL ``KL(q || (1 - alpha) * p + alpha * q)`` per position. ``alpha = 0``
    is :func:`rkl`. Shapes and reduction as :func:`fkl`.

    Paper: Ko et al., DistiLLM, ICML 2024, https://arxiv.org/abs/2402.03898
    """
    _check_probability(alpha, "alpha", "skew_rkl")
    return _divergence("skew_rkl", student_logits, teacher_logits, temperature, mask, weights, reduction, alpha=alpha)


def adaptive_kl(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, mu: Probability = 0.5,
    temperature: Temperature = 1.0, mask: torch.Tensor | None = None, weights: torch.Tensor | None = None,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """Adaptive KL: ``g_head / (g_head + g_tail) * FKL + g_tail / (g_head + g_tail) * RKL`` per position.

    The head is the teacher's most probable tokens, taken in order of probability until
    their cumulative mass reaches ``mu`` (the token that crosses ``mu`` included); the
    tail is every other token. ``g_head = sum_head |p - q|``, ``g_tail = sum_tail |p - q|``:
    where the student misses the head FKL dominates, where it misses the tail RKL does.
    The weights are part of the graph (not detached), as in the reference code; a position
    with ``p == q`` exactly has both gaps 0 and gets the value 0. Shapes and reduction as
    :func:`fkl`.

    Paper: Wu et al., Rethinking Kullback-Leibler Divergence in Knowledge Distillation for
    Large Language Models, 2024, https://arxiv.org/abs/2404.02657
    """
    _check_probability(mu, "mu", "adaptive_kl")
    log_q, log_p = _log_probs(student_logits, teacher_logits, temperature, "adaptive_kl")
    p, q = log_p.exp(), log_q.exp()
    sorted_p, order = p.sort(dim=-1, descending=True)  # (..., V)
    mass_before = sorted_p.cumsum(-1) - sorted_p  # (..., V): the mass of the more probable tokens
    head_sorted = mass_before < mu  # (..., V): taken until the cumulative mass reaches mu
    head = torch.zeros_like(head_sorted).scatter(-1, order, head_sorted)  # back to vocabulary order
    gap = (p - q).abs()  # (..., V)
    g_head = torch.where(head, gap, torch.zeros_like(gap)).sum(-1)  # (...)
    g_tail = torch.where(head, torch.zeros_like(gap), gap).sum(-1)  # (...)
    total = g_head + g_tail
    safe = torch.where(total > 0, total, torch.ones_like(total))
    values = (g_head * _kl(log_p, log_q) + g_tail * _kl(log_q, log_p)) / safe
    return _reduced(values, mask, weights, reduction, "adaptive_kl")


#: The divergences :func:`topk_divergence` can compute on top-k buckets.
TOPK_DIVERGENCES = ("fkl", "rkl", "tvd", "jsd", "skew_fkl", "skew_rkl")


def _bucket_values(divergence: str, log_q: torch.Tensor, log_p: torch.Tensor, *, beta: float, alpha: float) -> torch.Tensor:
    """One divergence per position from log-probabilities over the same buckets ``(..., K)``: the
    whole vocabulary, or a teacher's top-k tokens plus the tail."""
    if divergence == "fkl":
        return _kl(log_p, log_q)
    if divergence == "rkl":
        return _kl(log_q, log_p)
    if divergence == "tvd":
        return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)
    if divergence == "jsd":
        log_m = _mix(log_p, log_q, beta)
        return beta * _kl(log_p, log_m) + (1.0 - beta) * _kl(log_q, log_m)
    if divergence == "skew_fkl":
        return _kl(log_p, _mix(log_p, log_q, alpha))
    if divergence == "skew_rkl":
        return _kl(log_q, _mix(log_q, log_p, alpha))
    raise ValueError(f"topk_divergence: divergence must be one of {', '.join(TOPK_DIVERGENCES)}; got {divergence!r}")


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x <= 0``, accurate near 0 and for very negative x (Maechler, 2012)."""
    x = x.clamp(max=0.0)
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


#: The smallest log-mass a tail bucket is given (e^-100 ~ 4e-44): a tail that rounds to 0 on
#: one side only would otherwise make a KL term infinite.
_TAIL_FLOOR = -100.0


def _with_tail(log_top: torch.Tensor, tail: torch.Tensor | None = None) -> torch.Tensor:
    """``(..., K)`` log-probabilities of K tokens -> ``(..., K + 1)`` with the rest's mass as the last bucket:
    ``tail`` ``(...)`` where it is known, else ``1 - sum exp(log_top)``."""
    if tail is None:
        log_tail = _log1mexp(torch.logsumexp(log_top, dim=-1, keepdim=True))
    else:
        log_tail = torch.log(tail.float().clamp(min=0.0)).unsqueeze(-1)  # log 0 = -inf, floored below
    return torch.cat([log_top, log_tail.clamp(min=_TAIL_FLOOR)], dim=-1)


def topk_divergence(
    student_logits: torch.Tensor, topk_logprobs: torch.Tensor, topk_indices: torch.Tensor, *,
    divergence: str = "fkl", temperature: Temperature = 1.0, beta: Probability = 0.5, alpha: Probability = 0.1,
    mask: torch.Tensor | None = None, weights: torch.Tensor | None = None, reduction: Reduction = "mean",
    topk_tail: torch.Tensor | None = None,
) -> torch.Tensor:
    """A divergence against a teacher known only by its top-k tokens, with the tail as one bucket.

    Shapes: ``student_logits`` ``(..., V)``; ``topk_logprobs`` ``(..., K)`` the teacher's
    log-probabilities of its K most probable tokens (as a teacher-output cache stores them,
    at temperature 1), ``topk_indices`` ``(..., K)`` int64 their token ids. Both sides
    become ``K + 1`` buckets: the K tokens and the rest of the vocabulary, whose mass is
    ``1 - sum_k`` (the teacher's from its top-k, the student's from its own gathered
    columns; a tail bucket's mass is floored at ``e^-100`` so that a tail rounding to 0
    on one side only keeps the value finite). ``topk_tail`` ``(...)``: the teacher's tail
    mass as stored beside its top-k (a cache keeps it, computed before any rounding); when
    given it is used instead of ``1 - sum exp(topk_logprobs)``, which equals it up to
    rounding. The student's log-probabilities are its K gathered logits minus one
    ``logsumexp`` over the vocabulary: no ``(..., V)`` log-softmax is materialised.
    ``divergence`` (one of :data:`TOPK_DIVERGENCES`) is then computed over the buckets,
    with ``beta`` (``jsd``) and ``alpha`` (skew forms) as in the full-vocabulary functions.
    With K = V (every token), the tail is empty and the value equals the full function.

    ``temperature``: the student's logits are divided by it; the teacher's buckets are
    re-tempered as ``p^(1/T)`` renormalised over the K + 1 buckets, which is exact for
    T = 1 and treats the tail as one token otherwise (the tail's own shape is unknown).
    Reduction as :func:`fkl`.
    """
    name = "topk_divergence"
    if topk_logprobs.shape != topk_indices.shape or topk_logprobs.shape[:-1] != student_logits.shape[:-1]:
        raise ValueError(f"{name}: topk_logprobs {tuple(topk_logprobs.shape)} and topk_indices "
                         f"{tuple(topk_indices.shape)} must both be (..., K) with the student's positions "
                         f"{tuple(student_logits.shape[:-1])}")
    if topk_logprobs.shape[-1] > student_logits.shape[-1]:
        raise ValueError(f"{name}: K = {topk_logprobs.shape[-1]} exceeds the vocabulary {student_logits.shape[-1]}")
    if topk_tail is not None and topk_tail.shape != topk_logprobs.shape[:-1]:
        raise ValueError(f"{name}: topk_tail {tuple(topk_tail.shape)} must have the positions "
                         f"{tuple(topk_logprobs.shape[:-1])}")
    _check_temperature(temperature, name)
    _check_probability(beta, "beta", name)
    _check_probability(alpha, "alpha", name)
    z = student_logits.float() / temperature  # (..., V)
    log_q_top = z.gather(-1, topk_indices.long()) - torch.logsumexp(z, dim=-1, keepdim=True)  # (..., K)
    if topk_logprobs.shape[-1] == student_logits.shape[-1]:  # every token: there is no tail
        log_q, log_p = log_q_top, topk_logprobs.float()  # (..., V)
    else:
        log_q = _with_tail(log_q_top)  # (..., K + 1)
        log_p = _with_tail(topk_logprobs.float(), topk_tail)  # (..., K + 1)
    if temperature != 1.0:
        log_p = F.log_softmax(log_p / temperature, dim=-1)
    values = _bucket_values(divergence, log_q, log_p, beta=beta, alpha=alpha)  # (...)
    return _reduced(values, mask, weights, reduction, name)


def _check_probability(value: float, option: str, name: str) -> None:
    if not (isinstance(value, (int, float)) and 0.0 <= float(value) <= 1.0):
        raise ValueError(f"{name}: {option} must be a number in [0, 1], got {value!r}")


#: The full-vocabulary divergences by name (what :func:`chunked_divergence` accepts).
DIVERGENCES = {f.__name__: f for f in (fkl, rkl, tvd, jsd, skew_fkl, skew_rkl, adaptive_kl)}


def chunked_divergence(
    student_hidden: torch.Tensor, head_weight: torch.Tensor, teacher_logits: torch.Tensor, *,
    divergence: str = "fkl", chunk_size: int = 1024, head_bias: torch.Tensor | None = None,
    mask: torch.Tensor | None = None, weights: torch.Tensor | None = None, **options,
) -> torch.Tensor:
    """A divergence computed a chunk of positions at a time, fused with the student's output layer.

    Shapes: ``student_hidden`` ``(..., H)`` the student's last hidden states (before its
    ``lm_head``), ``head_weight`` ``(V, H)`` (and ``head_bias`` ``(V,)``) the ``lm_head``,
    ``teacher_logits`` ``(..., V)``; ``mask``/``weights`` ``(...)`` or a prefix. The
    student's logits exist for ``chunk_size`` positions at a time only: each chunk's
    logits and divergence are recomputed in the backward pass (activation checkpointing),
    so the loss's peak memory grows with ``chunk_size * V``, not with ``positions * V``.
    ``divergence`` names one of :data:`DIVERGENCES`; ``options`` are its options
    (``temperature``, ``beta``, ...). The value and the gradients equal
    ``DIVERGENCES[divergence](F.linear(student_hidden, head_weight, head_bias), teacher_logits, ...)``
    (the masked mean over positions), up to float rounding.
    """
    name = "chunked_divergence"
    if divergence not in DIVERGENCES:
        raise ValueError(f"{name}: divergence must be one of {', '.join(DIVERGENCES)}; got {divergence!r}")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"{name}: chunk_size must be an int >= 1, got {chunk_size!r}")
    positions = tuple(student_hidden.shape[:-1])
    if tuple(teacher_logits.shape[:-1]) != positions or teacher_logits.shape[-1] != head_weight.shape[0]:
        raise ValueError(f"{name}: teacher_logits {tuple(teacher_logits.shape)} must be (..., V) with the student's "
                         f"positions {positions} and V = head_weight.shape[0] = {head_weight.shape[0]}")
    fn = DIVERGENCES[divergence]
    n = math.prod(positions)
    hidden = student_hidden.reshape(n, -1)  # (N, H)
    teacher = teacher_logits.reshape(n, -1)  # (N, V)
    # The one alignment rule of the reduction (a mask/weights of the positions' shape or a
    # prefix of it), checked against the positions' shape alone, then flattened to (N,).
    keep, weigh = (None if t is None else t.expand(positions).reshape(-1).to(hidden.device)
                   for t in _checked(torch.empty(positions, device="meta"), mask, weights, name))

    def chunk_sum(h, w, b, t, m, wt):
        logits = F.linear(h, w, b)  # (n_chunk, V): only this chunk's logits are alive
        return fn(logits, t, mask=m, weights=wt, reduction="none", **options).sum()

    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, n, chunk_size):
        part = slice(start, start + chunk_size)
        total = total + checkpoint(chunk_sum, hidden[part], head_weight, head_bias, teacher[part],
                                   None if keep is None else keep[part], None if weigh is None else weigh[part],
                                   use_reentrant=False)
    count = n if keep is None else keep.sum()
    # The mean over kept positions, as reduce_positions (0 when nothing is kept).
    return total / (count if keep is None else count.clamp(min=1))


def sampled_reverse_kl(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor, *,
    estimator: Literal["k1", "k3"] = "k3", temperature: Temperature = 1.0, mask: torch.Tensor | None = None,
    weights: torch.Tensor | None = None, reduction: Reduction = "mean",
) -> torch.Tensor:
    """Reverse KL ``KL(q || p)`` estimated at tokens sampled from the student, per position.

    For on-policy distillation (MiniLLM; GKD with ``lmbda = 1``): ``target`` ``(...)`` are
    the student's own samples (the ``target`` that the ``on_policy`` transform writes), so
    ``E_{y~q}[log q(y) - log p(y)] = KL(q || p)``. The value per position is the estimate
    ``estimator``: ``"k1"`` = ``log q(y) - log p(y)`` (unbiased), or ``"k3"`` =
    ``(r - 1) - log r`` with ``r = p(y) / q(y)`` (unbiased too, never negative, lower
    variance). The gradient is the score-function (REINFORCE) estimator of the reverse KL's
    gradient, ``stopgrad(log q(y) - log p(y)) * grad log q(y)``, whichever estimate is
    reported: only the student's log-probability of its sampled token carries gradient; the
    teacher's is a per-token reward. Only the sampled tokens' log-probabilities are read
    (one logsumexp per position, no ``(..., V)`` log-softmax is kept). Shapes: logits
    ``(..., V)``, ``target`` ``(...)`` int64 (negative = no token: masked out).

    Papers: Gu et al., MiniLLM, ICLR 2024, https://arxiv.org/abs/2306.08543; Agarwal et al.,
    GKD, ICLR 2024, https://arxiv.org/abs/2306.13649. k1/k3: Schulman, Approximating KL
    Divergence, 2020, http://joschu.net/blog/kl-approx.html
    """
    name = "sampled_reverse_kl"
    _check_pair(student_logits, teacher_logits, name)
    _check_temperature(temperature, name)
    if estimator not in ("k1", "k3"):
        raise ValueError(f"{name}: estimator must be 'k1' or 'k3'; got {estimator!r}")
    if target.shape != student_logits.shape[:-1]:
        raise ValueError(f"{name}: target {tuple(target.shape)} must have the logits' positions "
                         f"{tuple(student_logits.shape[:-1])}")
    has_token = target >= 0
    index = target.clamp(min=0).long().unsqueeze(-1)  # (..., 1)
    z_s = student_logits.float() / temperature
    z_t = teacher_logits.float() / temperature
    log_q = (z_s.gather(-1, index).squeeze(-1) - torch.logsumexp(z_s, dim=-1))  # (...)
    log_p = (z_t.gather(-1, index).squeeze(-1) - torch.logsumexp(z_t, dim=-1)).detach()  # (...)
    k1 = (log_q - log_p).detach()
    value = k1 if estimator == "k1" else torch.expm1(-k1) + k1  # k3 = (r - 1) - log r, r = exp(-k1)
    # Its value is the estimate; its gradient is k1 * grad log q (the surrogate term is 0 in value).
    values = value + k1 * (log_q - log_q.detach())
    full_mask = has_token if mask is None else (mask.bool() & has_token) if mask.shape == has_token.shape else None
    if full_mask is None:  # a per-sample mask: keep it, and zero the positions without a token
        values = torch.where(has_token, values, torch.zeros_like(values))
        return _reduced(values, mask, weights, reduction, name)
    return _reduced(values, full_mask, weights, reduction, name)
