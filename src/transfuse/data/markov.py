"""Synthetic text with a known next-token distribution: random Markov chains over a small vocabulary.

Each *domain* is one random chain of order 1 or 2 (the next token depends on the last one
or two tokens), of its own difficulty: ``temperature`` scales the randomness of each
state's successor distribution (low: peaked, easy; high: flat, hard), ``sparsity`` is the
share of tokens a state can never be followed by, and ``bimodal`` is the share of states
that have exactly two equally likely successors -- where a mode-covering student (forward
KL) spreads over both and a mode-seeking one (reverse KL) may settle on one.

Because the chain is known, a model's next-token distribution can be scored against the
truth itself, not only against a teacher: :meth:`MarkovChains.kl_to_truth`. Registered
as data set ``markov``; its splits carry the chains as ``dataset.chains`` and every sample
its ``domain``.

A row's first ``order`` tokens are drawn uniformly (so the truth for predicting them is
uniform); every later token from the chain of the row's domain.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F

from ..functional.divergences import fkl
from .base import DATASETS, DataSplits
from .domains import DOMAIN, assign_domains
from .text import TokenRows

#: The keys of a domain spec and their defaults.
DOMAIN_KEYS = {"temperature": 1.0, "sparsity": 0.0, "bimodal": 0.0}
#: Easy (peaked, sparse), medium, hard (flat, dense) and bimodal (two equally likely successors per state).
DEFAULT_DOMAINS: tuple[dict[str, float], ...] = (
    {"temperature": 0.5, "sparsity": 0.75},
    {"temperature": 1.0, "sparsity": 0.5},
    {"temperature": 2.0, "sparsity": 0.0},
    {"bimodal": 1.0},
)


def _checked_domain(spec: Any, d: int, where: str) -> dict[str, float]:
    if not isinstance(spec, Mapping):
        raise ValueError(f"{where}: domains[{d}] must be a mapping with keys {', '.join(DOMAIN_KEYS)}; got {spec!r}")
    unknown = sorted(set(spec) - set(DOMAIN_KEYS))
    if unknown:
        raise ValueError(f"{where}: domains[{d}] has unknown key(s) {', '.join(map(repr, unknown))}; valid: "
                         f"{', '.join(DOMAIN_KEYS)}")
    out = {**DOMAIN_KEYS, **spec}
    for key, value in out.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{where}: domains[{d}].{key} must be a number; got {value!r}")
    if out["temperature"] <= 0:
        raise ValueError(f"{where}: domains[{d}].temperature must be > 0; got {out['temperature']!r}")
    if not 0.0 <= out["sparsity"] < 1.0:
        raise ValueError(f"{where}: domains[{d}].sparsity must be in [0, 1); got {out['sparsity']!r}")
    if not 0.0 <= out["bimodal"] <= 1.0:
        raise ValueError(f"{where}: domains[{d}].bimodal must be in [0, 1]; got {out['bimodal']!r}")
    return {k: float(v) for k, v in out.items()}


class MarkovChains:
    """One random Markov chain per domain over tokens ``0..vocab-1``, of order 1 or 2.

    ``transitions`` ``(D, vocab**order, vocab)`` float64: row ``s`` of domain ``d`` is the
    distribution of the next token after context ``s``, the last ``order`` tokens read as a
    base-``vocab`` number, oldest first. A function of ``(vocab, order, domains, seed)`` only.
    """

    def __init__(self, *, vocab: int = 16, order: int = 1, domains: Sequence[Mapping[str, float]] = DEFAULT_DOMAINS,
                 seed: int = 0, where: str = "MarkovChains") -> None:
        if isinstance(vocab, bool) or not isinstance(vocab, int) or not 2 <= vocab <= 256:
            raise ValueError(f"{where}: vocab must be an integer in [2, 256]; got {vocab!r}")
        if order not in (1, 2) or isinstance(order, bool):
            raise ValueError(f"{where}: order must be 1 or 2; got {order!r}")
        if isinstance(domains, (str, Mapping)) or not isinstance(domains, Sequence) or not domains:
            raise ValueError(f"{where}: domains must be a non-empty list of mappings with keys "
                             f"{', '.join(DOMAIN_KEYS)}; got {domains!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"{where}: seed must be an integer; got {seed!r}")
        self.vocab, self.order, self.seed = vocab, order, seed
        self.domains = tuple(_checked_domain(spec, d, where) for d, spec in enumerate(domains))
        self.num_states = vocab**order
        self.transitions = torch.stack([self._chain(d, spec) for d, spec in enumerate(self.domains)])  # (D, S, V)

    def _chain(self, d: int, spec: dict[str, float]) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + d)
        states, vocab = self.num_states, self.vocab
        logits = torch.randn(states, vocab, generator=gen, dtype=torch.float64) / spec["temperature"]  # (S, V)
        keep = max(1, round((1.0 - spec["sparsity"]) * vocab))  # successors each state may have
        order = torch.rand(states, vocab, generator=gen).argsort(dim=1)  # a random ranking of tokens per state
        logits = logits.masked_fill(order >= keep, -math.inf)  # drops vocab - keep tokens per state
        probs = logits.softmax(dim=1)
        num_bimodal = round(spec["bimodal"] * states)
        if num_bimodal:
            rows = torch.randperm(states, generator=gen)[:num_bimodal]
            pair = torch.rand(num_bimodal, vocab, generator=gen).argsort(dim=1)[:, :2]  # two distinct successors
            probs[rows] = 0.0
            probs[rows[:, None], pair] = 0.5
        return probs

    @property
    def num_domains(self) -> int:
        return len(self.domains)

    def _domain_of(self, domain: Any, leading: tuple[int, ...]) -> torch.Tensor:
        dom = torch.as_tensor(domain, dtype=torch.long)
        if dom.dim() and tuple(dom.shape) != leading:
            raise ValueError(f"domain must be an int or have the rows' shape {leading}; got {tuple(dom.shape)}")
        if dom.numel() and (int(dom.min()) < 0 or int(dom.max()) >= self.num_domains):
            raise ValueError(f"domain ids must lie in [0, {self.num_domains}); got {dom.unique().tolist()}")
        return dom.expand(leading)

    def sample(self, domains: torch.Tensor, length: int, *, generator: torch.Generator) -> torch.Tensor:
        """Rows ``(N, length)`` int64, row ``i`` drawn from the chain of ``domains[i]``."""
        n = len(domains)
        rows = torch.empty(n, length, dtype=torch.long)
        rows[:, : self.order] = torch.randint(self.vocab, (n, min(self.order, length)), generator=generator)
        for t in range(self.order, length):
            state = self._states(rows[:, t - self.order: t])  # (N,)
            probs = self.transitions[domains, state]  # (N, V)
            rows[:, t] = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        return rows

    def _states(self, context: torch.Tensor) -> torch.Tensor:
        """The state index ``(...)`` of contexts ``(..., order)`` (oldest token first)."""
        weights = self.vocab ** torch.arange(self.order - 1, -1, -1)  # (order,)
        return (context * weights).sum(-1)

    def true_next_token_probs(self, input_ids: torch.Tensor, domain: Any) -> torch.Tensor:
        """The true distribution ``(..., T, V)`` float32 of token ``t + 1`` given tokens ``0..t``.

        ``input_ids`` ``(..., T)``; ``domain`` an int or ``(...)``, each row's domain. Aligned
        with a causal LM's logits ``(..., T, V)``: position ``t`` is what the model predicts
        after reading token ``t``. Positions whose next token is one of the first ``order``
        (uniformly drawn) tokens of a row get the uniform distribution.
        """
        input_ids = torch.as_tensor(input_ids).long()
        if input_ids.dim() < 1:
            raise ValueError(f"input_ids must be (..., T); got shape {tuple(input_ids.shape)}")
        if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= self.vocab):
            raise ValueError(f"input_ids must lie in [0, {self.vocab})")
        leading, length = tuple(input_ids.shape[:-1]), input_ids.shape[-1]
        dom = self._domain_of(domain, leading).to(input_ids.device)
        padded = F.pad(input_ids, (self.order - 1, 0))  # (..., T + order - 1): a context for every position
        context = padded.unfold(-1, self.order, 1)  # (..., T, order), the tokens up to and including t
        state = self._states(context)  # (..., T)
        table = self.transitions.to(device=input_ids.device, dtype=torch.float32)
        probs = table[dom.unsqueeze(-1).expand(*leading, length), state]  # (..., T, V)
        if self.order > 1:
            # Position t predicts token t + 1; tokens 1..order-1 were drawn uniformly, not from the chain.
            probs[..., : self.order - 1, :] = 1.0 / self.vocab
        return probs

    def kl_to_truth(self, model_logits: torch.Tensor, input_ids: torch.Tensor, domain: Any,
                    mask: torch.Tensor | None = None) -> torch.Tensor:
        """Mean ``KL(truth || model)`` over the predicted positions, a scalar (nats).

        ``model_logits`` ``(..., T, V)`` of the rows ``input_ids`` ``(..., T)``; position ``t``
        predicts token ``t + 1``, so the ``T - 1`` positions ``0..T-2`` are scored. ``mask``
        ``(..., T)`` bool, in the labels' (unshifted) convention -- True where token ``t`` is a
        target, e.g. ``labels != IGNORE_INDEX`` -- selects the positions predicting those
        tokens. 0 exactly when the model gives the true distribution everywhere scored.
        """
        truth = self.true_next_token_probs(input_ids, domain).to(model_logits.device)  # (..., T, V)
        if model_logits.shape != truth.shape:
            raise ValueError(f"kl_to_truth: model_logits must be (..., T, V) = {tuple(truth.shape)}; got "
                             f"{tuple(model_logits.shape)}")
        if mask is not None and (mask.dtype != torch.bool or tuple(mask.shape) != tuple(input_ids.shape)):
            raise ValueError(f"kl_to_truth: mask must be a bool tensor shaped like input_ids {tuple(input_ids.shape)}")
        target_mask = None if mask is None else mask[..., 1:].to(model_logits.device)
        return fkl(model_logits[..., :-1, :], truth[..., :-1, :].log(), mask=target_mask)

    def mean_entropy(self, input_ids: torch.Tensor, domain: Any) -> torch.Tensor:
        """Mean entropy (nats) of the true next-token distribution over the ``T - 1`` predicted
        positions: the lowest cross-entropy any model can reach on these rows, in expectation."""
        probs = self.true_next_token_probs(input_ids, domain)[..., :-1, :]
        return -torch.special.xlogy(probs, probs).sum(-1).mean()


def true_next_token_probs(chains: MarkovChains, input_ids: torch.Tensor, domain: Any) -> torch.Tensor:
    """:meth:`MarkovChains.true_next_token_probs` as a function."""
    return chains.true_next_token_probs(input_ids, domain)


def kl_to_truth(chains: MarkovChains, model_logits: torch.Tensor, input_ids: torch.Tensor, domain: Any,
                mask: torch.Tensor | None = None) -> torch.Tensor:
    """:meth:`MarkovChains.kl_to_truth` as a function."""
    return chains.kl_to_truth(model_logits, input_ids, domain, mask)


def _count(value: Any, label: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"markov: {label} must be a positive integer; got {value!r}")
    return value


@DATASETS.register("markov", summary="synthetic text from random Markov chains with a known next-token distribution")
def markov(
    *,
    vocab: int = 16,
    order: int = 1,
    domains: Sequence[Mapping[str, float]] = DEFAULT_DOMAINS,
    block_size: int = 64,
    num_train: int = 2000,
    num_test: int = 500,
    seed: int = 0,
) -> DataSplits:
    """Rows ``(N, block_size)`` drawn from random Markov chains, one chain per domain.

    ``domains``: a list of mappings with ``temperature`` (default 1.0), ``sparsity``
    (default 0.0) and ``bimodal`` (default 0.0), see the module docstring. Rows are spread
    over the domains evenly, at random; the test rows are drawn independently of the
    training rows from the same chains. Everything is a function of ``seed``.
    ``num_classes`` is ``vocab``; samples carry ``domain``; ``dataset.chains`` is the
    :class:`MarkovChains` (for :meth:`~MarkovChains.kl_to_truth`).
    """
    chains = MarkovChains(vocab=vocab, order=order, domains=domains, seed=seed, where="markov")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < order + 1:
        raise ValueError(f"markov: block_size must be an integer > order ({order}); got {block_size!r}")
    splits = []
    for label, n, stream in (("train", _count(num_train, "num_train"), 0), ("test", _count(num_test, "num_test"), 1)):
        doms = assign_domains(n, chains.num_domains, seed=seed * 2 + stream)  # (N,)
        gen = torch.Generator().manual_seed(seed * 2 + stream + 7_919)
        rows = TokenRows(chains.sample(doms, block_size, generator=gen), fields={DOMAIN: doms},
                         vocab_size=vocab, name=f"markov {label}")
        rows.chains = chains
        splits.append(rows)
    return DataSplits(name="markov", train=splits[0], test=splits[1], num_classes=vocab, input_shape=(block_size,))


__all__ = ["DEFAULT_DOMAINS", "DOMAIN_KEYS", "MarkovChains", "kl_to_truth", "markov", "true_next_token_probs"]
