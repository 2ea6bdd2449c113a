"""DDK: distillation data re-weighted by domain, toward where the student trails the teacher most.

Liu et al., "DDK: Distilling Domain Knowledge for Efficient Large Language Models",
NeurIPS 2024 (https://arxiv.org/abs/2407.16154); no official code. The training set is cut
into domains ``1..N``, each with a held-out validation set. Every ``K`` steps the student's
and the teacher's score on each domain's held-out samples, ``l_S[i]`` and ``l_T[i]``, give
the *domain discrepancy factor* and, through *factor smooth updating*, the share of each
domain in the next batches::

    psi[i]    = r_t[i] * exp(l_S[i] / l_T[i] / temperature)
    r_{t+1}[i] = alpha * psi[i] / sum_j psi[j] + (1 - alpha) / N        (alpha = 0.5)

The loss is the paper's ``CE + gamma * KL`` -- the existing terms (e.g. ``distill: {method:
fkl, ce_weight: 1.0}``); DDK only changes which samples a step sees.

Reconstruction, stated as such (the paper's text gives the formulas, not code):

* ``l`` is the **perplexity** per domain (``score: perplexity``, the paper's wording: the
  exponential of the mean next-token NLL over the domain's predicted positions, pooled over
  its held-out rows); ``score: nll`` uses the mean NLL itself.
* ``psi`` multiplies the previous factor by ``exp(l_S / l_T)`` (``psi: multiplicative``, our
  reading of "smooth updating", in the spirit of DoReMi's multiplicative weights); ``psi:
  fresh`` reads ``psi = exp(l_S / l_T)``, the smoothing then being the mix with the uniform
  distribution alone. The first update (step 0) is the same in both: ``r_0`` is uniform.
* A step's samples are drawn with replacement, each sample of domain ``i`` with probability
  ``r[i] / n_i`` (``n_i``: domain ``i``'s training samples), so domain ``i`` makes up a
  share ``r[i]`` of the batches in expectation.

Logged (``metrics.jsonl``, a row at each update, at the step whose batch the new weights
draw): ``ddk/weight/<domain>``, ``ddk/student_<score>/<domain>`` and
``ddk/teacher_<score>/<domain>``. The weights are checkpointed, so a resumed run draws the
same batches as an uninterrupted one.

Under DDP each process scores its share of the held-out rows and the sums are all-reduced,
so every process computes the same weights (and the sampler draws the same global batch).
Not under FSDP: the student is called unwrapped for the measurement.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
import torch.nn.functional as F

from .data.domains import DOMAIN
from .data.text import PREDICTED
from .errors import UserError
from .participants import LOGITS
from .recipes import RECIPES, DefaultRecipe, StepContext, StepResult

#: What ``l`` is per domain (``score``).
SCORES = ("perplexity", "nll")
#: How ``psi`` is formed (``psi``): from the previous factor, or afresh.
PSI_FORMS = ("multiplicative", "fresh")


class DDKError(UserError, ValueError):
    """A DDK run that cannot work as configured: data without domains, a domain without held-out samples, ..."""


def ddk_domain_weights(
    student_score: torch.Tensor,
    teacher_score: torch.Tensor,
    previous: torch.Tensor | None = None,
    *,
    alpha: float = 0.5,
    temperature: float = 1.0,
) -> torch.Tensor:
    """DDK's domain sampling weights ``r_{t+1}`` ``(N,)`` (sum 1), float64.

    ``student_score``, ``teacher_score`` ``(N,)``: each domain's score ``l`` (perplexity or
    mean NLL; positive). ``previous`` ``(N,)``: the factor ``r_t`` that ``psi`` multiplies
    (None: uniform, i.e. ``psi = exp(l_S / l_T / temperature)``)::

        r_{t+1} = alpha * softmax(log r_t + l_S / l_T / temperature) + (1 - alpha) / N

    (``softmax(log r + x)`` is ``psi / sum(psi)`` with ``psi = r * exp(x)``, without overflow.)
    """
    student = torch.as_tensor(student_score, dtype=torch.float64)
    teacher = torch.as_tensor(teacher_score, dtype=torch.float64)
    if student.dim() != 1 or student.shape != teacher.shape or len(student) == 0:
        raise ValueError(f"ddk_domain_weights: student_score and teacher_score must be (N,) with N >= 1; got "
                         f"{tuple(student.shape)} and {tuple(teacher.shape)}")
    if not bool(torch.isfinite(student).all() & torch.isfinite(teacher).all()) or bool((teacher <= 0).any()):
        raise ValueError(f"ddk_domain_weights: scores must be finite and the teacher's > 0; got student "
                         f"{student.tolist()}, teacher {teacher.tolist()}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"ddk_domain_weights: alpha must be in [0, 1]; got {alpha!r}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"ddk_domain_weights: temperature must be a finite number > 0; got {temperature!r}")
    n = len(student)
    logits = student / teacher / temperature  # (N,): log psi before the previous factor
    if previous is not None:
        prev = torch.as_tensor(previous, dtype=torch.float64)
        if prev.shape != student.shape or bool((prev < 0).any()) or not float(prev.sum()) > 0:
            raise ValueError(f"ddk_domain_weights: previous must be ({n},), non-negative, with a positive sum; got "
                             f"{prev.tolist()}")
        logits = logits + prev.log()
    return alpha * torch.softmax(logits, dim=0) + (1.0 - alpha) / n


def domains_of(dataset: Any, *, what: str) -> torch.Tensor:
    """Each sample's domain ``(N,)`` int64: a data set's ``domains`` (``digits_domains``) or its
    ``domain`` field (token rows such as ``markov``); :class:`DDKError` if it has none."""
    domains = getattr(dataset, "domains", None)
    if domains is None:
        domains = getattr(dataset, "fields", {}).get(DOMAIN)
    if domains is None:
        raise DDKError(f"recipe ddk: {what} carries no `{DOMAIN}` per sample, and DDK re-weights domains; use data "
                       f"with domains (markov, digits_domains, fashion_mnist_domains, or TokenRows(fields="
                       f"{{'{DOMAIN}': ...}}))")
    domains = torch.as_tensor(domains)
    if domains.dim() != 1 or len(domains) != len(dataset) or domains.is_floating_point():
        raise DDKError(f"recipe ddk: the `{DOMAIN}` of {what} must be one integer per sample ({len(dataset)}); got "
                       f"shape {tuple(domains.shape)}, {domains.dtype}")
    return domains.long()


def _positive_int(value: Any, name: str, *, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise DDKError(f"recipe.options.{name}: expected an integer >= 1{' or null' if allow_none else ''}; got {value!r}")
    return value


def _choice(value: Any, name: str, valid: tuple[str, ...]) -> str:
    if value not in valid:
        raise DDKError(f"recipe.options.{name}: unknown value {value!r}; valid: {', '.join(valid)}")
    return value


@RECIPES.register("ddk", summary="DDK: batches drawn by domain, re-weighted every K steps toward the domains where "
                                 "the student trails the teacher most")
class DDK:
    """DDK's data re-weighting around the default step (see the module docstring).

    At every step ``s`` with ``s % every == 0`` (step 0 included), before the step's
    micro-batches are drawn: the student and the teacher score every domain's held-out
    samples (eval mode, no autograd), the domain weights are updated, and the engine draws
    this step's and the next steps' samples from :meth:`sample_weights`. Then the default
    step (forward, backward, update) runs unchanged.

    Options: ``every`` (K, default 1000 as in the paper), ``alpha`` (0.5; 0 keeps every domain
    at ``1/N``: the same sampling and held-out split without re-weighting, a baseline), ``psi``
    (``multiplicative``: ``psi = r_t * exp(l_S/l_T)``; ``fresh``: ``exp(l_S/l_T)``), ``score``
    (``perplexity`` or ``nll``), ``temperature`` (1.0, divides ``l_S/l_T``),
    ``max_eval_samples`` (held-out rows scored per domain; null: all), ``eval_batch_size``
    (64), ``student``/``teacher`` (participant or source names; default: the input and the
    target of the terms comparing logits, which must be one pair).

    ``holdout`` (the samples of ``data.holdout_fraction``), ``train`` (the student's training
    set, in the engine's sample order) and ``seed`` (which held-out rows ``max_eval_samples``
    keeps) are given by the run.
    """

    def __init__(
        self,
        *,
        holdout: Any,
        train: Any,
        seed: int = 0,
        every: int = 1000,
        alpha: float = 0.5,
        psi: str = "multiplicative",
        score: str = "perplexity",
        temperature: float = 1.0,
        max_eval_samples: int | None = None,
        eval_batch_size: int = 64,
        student: str | None = None,
        teacher: str | None = None,
    ) -> None:
        if holdout is None or len(holdout) == 0:
            raise DDKError("recipe ddk scores each domain on held-out samples; set data.holdout_fraction "
                           "(0.1, say) to keep that fraction of the training samples out for it")
        if train is None or len(train) == 0:
            raise DDKError("recipe ddk: no training set given (a run passes its own; in Python, pass train=)")
        self.every = _positive_int(every, "every")
        self.max_eval_samples = _positive_int(max_eval_samples, "max_eval_samples", allow_none=True)
        self.eval_batch_size = _positive_int(eval_batch_size, "eval_batch_size")
        for name, value in (("alpha", alpha), ("temperature", temperature)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise DDKError(f"recipe.options.{name}: expected a finite number; got {value!r}")
        if not 0.0 <= alpha <= 1.0:
            raise DDKError(f"recipe.options.alpha: expected a number in [0, 1] (the paper's 0.5; 0 keeps the domains "
                           f"uniform, a baseline); got {alpha!r}")
        if temperature <= 0:
            raise DDKError(f"recipe.options.temperature: expected a number > 0; got {temperature!r}")
        self.alpha, self.temperature = float(alpha), float(temperature)
        self.psi = _choice(psi, "psi", PSI_FORMS)
        self.score = _choice(score, "score", SCORES)
        for name, value in (("student", student), ("teacher", teacher)):
            if value is not None and not isinstance(value, str):
                raise DDKError(f"recipe.options.{name}: expected a participant name or null; got {value!r}")
        self.student, self.teacher = student, teacher
        self.holdout, self.seed = holdout, int(seed)

        train_domains = domains_of(train, what="the training set")  # (n,)
        #: The domain ids, sorted; domain ``i`` of the weights is ``domain_ids[i]``.
        self.domain_ids, self._sample_domain, self._train_counts = torch.unique(
            train_domains, return_inverse=True, return_counts=True)  # (N,), (n,) in 0..N-1, (N,)
        held = domains_of(holdout, what="the held-out set (data.holdout_fraction)")  # (m,)
        missing = [int(d) for d in self.domain_ids if not bool((held == d).any())]
        if missing:
            raise DDKError(f"recipe ddk: domain(s) {missing} have training samples but no held-out sample to score "
                           f"them on ({len(holdout)} held-out samples in all); raise data.holdout_fraction")
        # The held-out rows scored per domain (all, or max_eval_samples of each, drawn by seed);
        # held-out rows of a domain with no training sample are left out: nothing to re-weight.
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + 17)
        rows, row_domain = [], []
        for i, d in enumerate(self.domain_ids.tolist()):
            members = (held == d).nonzero().flatten()
            if self.max_eval_samples is not None and len(members) > self.max_eval_samples:
                members = members[torch.randperm(len(members), generator=gen)[: self.max_eval_samples]].sort().values
            rows.append(members)
            row_domain.append(torch.full((len(members),), i, dtype=torch.long))
        self._eval_rows, self._eval_domain = torch.cat(rows), torch.cat(row_domain)  # (M,), (M,) in 0..N-1
        n = len(self.domain_ids)
        #: The current domain weights ``r`` ``(N,)`` float64 (uniform until the first update).
        self.weights = torch.full((n,), 1.0 / n, dtype=torch.float64)
        self._pending: dict[str, float] = {}
        self._per_sample: tuple[torch.Tensor, torch.Tensor] | None = None
        self._default = DefaultRecipe()

    # -- what the engine asks ---------------------------------------------------------------

    def sample_weights(self, step: int) -> torch.Tensor:
        """Per-sample weights ``(n,)`` of the training set: ``r[i] / n_i`` for a sample of domain ``i``."""
        if self._per_sample is None or self._per_sample[0] is not self.weights:  # rebuilt once per update
            per_domain = self.weights / self._train_counts.double()  # (N,)
            self._per_sample = (self.weights, per_domain[self._sample_domain])
        return self._per_sample[1]

    def state_dict(self) -> dict[str, Any]:
        """The domain weights (as floats, exact for float64) and the domain ids they belong to."""
        return {"weights": self.weights.tolist(), "domains": self.domain_ids.tolist()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; the domains must be the same."""
        if list(state.get("domains", [])) != self.domain_ids.tolist():
            raise DDKError(f"recipe ddk: the checkpoint's domains {state.get('domains')} differ from this run's "
                           f"{self.domain_ids.tolist()}")
        self.weights = torch.tensor(state["weights"], dtype=torch.float64)

    def pop_metrics(self) -> dict[str, float]:
        """The weights and scores of the update made in the last step (empty if none), once."""
        out, self._pending = self._pending, {}
        return out

    # -- the step ---------------------------------------------------------------------------

    def step(self, ctx: StepContext) -> StepResult:
        if ctx.step % self.every == 0:
            self.update(ctx)
        # The engine draws this step's samples only now, as the default step pulls its micro-batches.
        return self._default.step(ctx)

    def update(self, ctx: StepContext) -> torch.Tensor:
        """Score every domain, update :attr:`weights` and queue them for the log; returns the weights."""
        student, teacher = self._roles(ctx.distiller)
        student_score, teacher_score = self.measure(ctx, student, teacher)
        previous = self.weights if self.psi == "multiplicative" else None
        self.weights = ddk_domain_weights(student_score, teacher_score, previous, alpha=self.alpha,
                                          temperature=self.temperature)
        for i, d in enumerate(self.domain_ids.tolist()):
            self._pending[f"ddk/weight/{d}"] = float(self.weights[i])
            self._pending[f"ddk/student_{self.score}/{d}"] = float(student_score[i])
            self._pending[f"ddk/teacher_{self.score}/{d}"] = float(teacher_score[i])
        return self.weights

    def _roles(self, distiller: Any) -> tuple[str, str]:
        if distiller.stateful:
            raise DDKError(f"recipe ddk scores held-out samples with every source, which would spend the query "
                           f"budget of {sorted(distiller.stateful)}; it cannot be combined with a label-only teacher")
        pairs = {(t.input.source, t.target.source) for t in distiller.terms
                 if t.target is not None and t.input.field == LOGITS and t.target.field == LOGITS}
        if not pairs and (self.student is None or self.teacher is None):
            raise DDKError("recipe ddk weighs domains by how far the student trails a teacher, but no term compares "
                           "the student's logits with a teacher's; distil with one, e.g. distill: {method: fkl, "
                           "ce_weight: 1.0} (or name them in recipe.options.student and recipe.options.teacher)")
        student = self.student or _only({s for s, _ in pairs}, "student")
        teacher = self.teacher or _only({t for _, t in pairs}, "teacher")
        if student not in distiller.models:
            raise DDKError(f"recipe.options.student: {student!r} is not a trainable participant; they are "
                           f"{sorted(distiller.models)}")
        if teacher not in distiller.sources or teacher in distiller.models:
            frozen = sorted(n for n in distiller.sources if n not in distiller.models)
            raise DDKError(f"recipe.options.teacher: {teacher!r} is not a frozen participant or source a term reads; "
                           f"those are {frozen}")
        return student, teacher

    @torch.no_grad()
    def measure(self, ctx: StepContext, student: str, teacher: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Each domain's score ``l`` of ``student`` and ``teacher`` ``(N,)`` float64 on the held-out rows."""
        fabric, distiller = ctx.fabric, ctx.distiller
        if "fsdp" in type(getattr(fabric, "strategy", None)).__name__.lower():
            raise DDKError("recipe ddk calls the student unwrapped to score the held-out samples, which FSDP's sharded "
                           "parameters do not allow; use fabric.strategy ddp (or one process)")
        n = len(self.domain_ids)
        rank, world = getattr(fabric, "global_rank", 0), getattr(fabric, "world_size", 1)
        rows, row_domain = self._eval_rows[rank::world], self._eval_domain[rank::world]  # this process's share
        device = getattr(fabric, "device", torch.device("cpu"))
        sums = torch.zeros(3, n, dtype=torch.float64, device=device)  # NLL sums (student, teacher), positions
        modes = {m: m.training for m in distiller.modules()}
        distiller.eval()  # dropout off; losses keep no per-step state in eval mode
        autocast = getattr(fabric, "autocast", None)
        try:
            with autocast() if autocast is not None else contextlib.nullcontext():
                for start in range(0, len(rows), self.eval_batch_size):
                    batch = fabric.to_device(self._holdout_batch(rows[start: start + self.eval_batch_size].tolist()))
                    dom = row_domain[start: start + self.eval_batch_size].to(device)  # (B,)
                    outs = distiller.outputs(batch)
                    for k, name in enumerate((student, teacher)):
                        nll, mask = _nll(outs[name][LOGITS], batch)  # (B, ...) each
                        sums[k].index_add_(0, dom, (nll * mask).reshape(len(dom), -1).sum(1).double())
                    sums[2].index_add_(0, dom, mask.reshape(len(dom), -1).sum(1).double())
        finally:
            for module, mode in modes.items():
                module.train(mode)
        if world > 1:
            sums = fabric.all_reduce(sums, reduce_op="sum")
        sums = sums.cpu()
        empty = [int(d) for d, c in zip(self.domain_ids, sums[2]) if c == 0]
        if empty:
            raise DDKError(f"recipe ddk: the held-out samples of domain(s) {empty} have no predicted position to score")
        mean_nll = sums[:2] / sums[2]  # (2, N)
        scores = mean_nll.exp() if self.score == "perplexity" else mean_nll
        return scores[0], scores[1]

    def _holdout_batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        getitems = getattr(self.holdout, "__getitems__", None)
        if getitems is not None:
            return dict(getitems(indices))
        from .data.base import collate_batch

        return collate_batch([self.holdout[i] for i in indices])


def _only(names: set[str], role: str) -> str:
    if len(names) != 1:
        raise DDKError(f"recipe ddk measures one {role} per domain, but the terms comparing logits have "
                       f"{sorted(names) or 'none'} as {role}; set recipe.options.{role}")
    return next(iter(names))


def _nll(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position NLL of the batch's targets and where it counts, both ``target``'s shape:
    ``(B, T)`` for token rows (``logits`` ``(B, T, V)``), ``(B,)`` for samples (``(B, C)``)."""
    target = batch["target"]
    # Token rows: the predicted positions; samples: the labelled ones (IGNORE_INDEX, IGNORE_TARGET are < 0).
    mask = batch.get(PREDICTED, target >= 0)
    safe = torch.where(mask, target, torch.zeros_like(target))  # an unscored position: any valid class, masked out
    nll = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), safe.reshape(-1), reduction="none")
    return nll.reshape(target.shape), mask.to(nll.dtype)


__all__ = ["DDK", "DDKError", "PSI_FORMS", "SCORES", "ddk_domain_weights", "domains_of"]
