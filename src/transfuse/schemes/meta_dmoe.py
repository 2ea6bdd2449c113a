"""Meta-DMoE: a student meta-learns to adapt to a new domain by one distillation step from
an aggregation of domain experts.

Zhong et al., Meta-DMoE: Adapting to Domain Shift by Meta-Distillation from Mixture-of-Experts,
NeurIPS 2022, https://arxiv.org/abs/2210.03885. Followed: the official code
(``n3il666/Meta-DMoE``: ``src/transformer.py``, ``src/camelyon/camelyon_utils.py``
``fa_selector``/``mask_feat``/``l2_loss``, ``src/camelyon/camelyon_train.py`` ``train_epoch``/``eval``,
``src/configs.py``); the deviations are listed in ``docs/methods.md``.

The pieces:

* experts ``E_1..K`` are frozen participants, each trained on its source domain(s)
  (``participants.<name>.train.domains``);
* the aggregator ``A`` (:class:`ExpertAggregator`) is a small transformer over the experts'
  feature tokens; it is held by the loss module ``meta_dmoe_inner`` (:class:`MetaDMoEInner`),
  so it is optimised with the student and checkpointed with it;
* the recipe ``meta_dmoe`` (:class:`MetaDMoERecipe`) is the bilevel step. Per single-domain
  task ``d`` of a batch, with support ``x_s`` and query ``(x_q, y_q)``:
  ``t = A(E_{-d}(x_s))`` (the experts trained on ``d`` masked out),
  ``theta' = theta - eta * grad_theta mean ||f_theta(x_s) - t||^2`` (no labels), then
  ``CE(h(f_theta'(x_q)), y_q)`` updates ``f``, ``h`` and ``A`` (second order through ``theta'``);
* :func:`test_time_adapt` is the same inner step on unlabelled target data with every expert.

``distill: {method: meta_dmoe}`` expands into the one term and the experts' source;
``recipe: {name: meta_dmoe}`` must be set beside it.
"""

from __future__ import annotations

import copy
import math
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Iterator, Literal, Mapping, Sequence

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torch.func import functional_call

from ..data.domains import DOMAIN
from ..distiller import Distiller
from ..errors import UserError
from ..functional._types import Positive, PositiveInt, Probability
from ..functional.logits import cross_entropy
from ..functional.meta_dmoe import expert_keep_mask, feature_mse, inner_step, masked_token_mean
from ..losses import register_loss
from ..losses.module import DistillLoss
from ..models.outputs import call_model, model_input
from ..participants import LOGITS, Participant
from ..recipes import RECIPES, StepContext, StepResult, _update
from ..taps import FeatureTaps
from . import SCHEMES
from .base import Expansion, Scheme

PAPER = ("Zhong et al., Meta-DMoE: Adapting to Domain Shift by Meta-Distillation from Mixture-of-Experts, "
         "NeurIPS 2022, https://arxiv.org/abs/2210.03885")
#: The source the scheme adds: the experts' mean output (the term reads its members' features).
EXPERTS = "experts"
STUDENT = "student"
LOSS_NAME = "meta_dmoe_inner"

#: A fraction strictly between 0 and 1.
OpenFraction = Annotated[float, Field(gt=0, lt=1, allow_inf_nan=False)]


class ExpertAggregator(nn.Module):
    """The knowledge aggregator: a pre-norm transformer over the experts' feature tokens,
    mean-pooled over the kept tokens (official ``fa_selector.get_feat``).

    ``forward(tokens (B, K, D), keep (B, K) bool or None) -> (B, out_dim)``. Each layer is
    ``x = x + MHA(LN(x))``, ``x = x + FF(LN(x))`` with ``FF = Linear(D, mlp_dim) -> GELU ->
    Dropout -> Linear(mlp_dim, D) -> Dropout`` (the official ``src/transformer.py``). A
    token with ``keep`` False is hidden from attention (key padding) and left out of the
    mean, which equals removing it (the official ``mask_feat(exclude=True)``). ``out_dim``
    other than ``D`` adds a linear projection (a student whose features differ in size
    from the experts'; the official models share one size, and no projection).
    """

    def __init__(self, dim: int, *, heads: int = 16, depth: int = 1, mlp_dim: int | None = None, dropout: float = 0.1,
                 out_dim: int | None = None) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"the aggregator's {heads} heads must divide the experts' feature size {dim}; "
                             f"choose heads among {[h for h in range(1, min(dim, 64) + 1) if dim % h == 0]}")
        mlp_dim = mlp_dim or 2 * dim
        self.dim, self.heads = dim, heads
        self.layers = nn.ModuleList()
        for _ in range(depth):
            self.layers.append(nn.ModuleDict({
                "attn_norm": nn.LayerNorm(dim),
                "attn": nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True),
                "ff_norm": nn.LayerNorm(dim),
                "ff": nn.Sequential(nn.Linear(dim, mlp_dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(mlp_dim, dim),
                                    nn.Dropout(dropout)),
            }))
        self.project = nn.Identity() if out_dim in (None, dim) else nn.Linear(dim, out_dim)

    def forward(self, tokens: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        if tokens.dim() != 3 or tokens.shape[-1] != self.dim:
            raise ValueError(f"aggregator: expected expert tokens (B, K, {self.dim}); got {tuple(tokens.shape)}")
        if keep is None:
            keep = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        x = tokens
        for layer in self.layers:
            h = layer["attn_norm"](x)
            attended, _ = layer["attn"](h, h, h, key_padding_mask=~keep, need_weights=False)  # (B, K, D)
            x = x + attended
            x = x + layer["ff"](layer["ff_norm"](x))
        return self.project(masked_token_mean(x, keep))  # (B, out_dim)


@register_loss(name=LOSS_NAME, kind="feature", inputs="feature", weight=1.0, ce_weight=0.0, paper=PAPER,
               summary="Meta-DMoE's inner loss: MSE between the student's features and a transformer aggregation of "
                       "the experts' (trained by recipe meta_dmoe)")
class MetaDMoEInner(DistillLoss):
    """``feature_mse(student_feature, A(expert tokens, keep))``, with the aggregator ``A`` and
    the settings of Meta-DMoE's bilevel step (read by the recipe ``meta_dmoe``).

    As a term (``input: student.feature``, ``target``: the experts' features), ``teacher``
    is ``(B, D_e)`` (one token per sample) or ``(B, K, D_e)`` (the recipe passes every
    expert's token and ``keep``). Options, with the official Camelyon17 defaults
    (``src/configs.py``): ``heads=16``, ``depth=1``, ``mlp_ratio=2`` (``mlp_dim = 2 D``),
    ``dropout=0.1``; ``inner_lr=1e-3`` (``ilr``), ``first_order=False`` (learn2learn's
    ``MAML`` default: second order); ``support_fraction=2/3`` (64 of a batch of 96);
    ``aggregator_lr_scale=0.01`` (``tlr / slr = 1e-6 / 1e-4``); ``tasks``: ``per_domain``
    (every domain group of a batch is one task) or ``largest`` (only the largest group);
    ``student_mode``: ``eval`` (the official meta-training runs the student, and the
    aggregator, in eval mode) or ``train``; ``experts`` and ``expert_domains`` (which
    domains each expert was trained on) are filled in by the scheme.
    """

    #: The step recipe this loss needs (checked when a config loads).
    required_recipe = "meta_dmoe"

    def __init__(
        self,
        *,
        heads: PositiveInt = 16,
        depth: PositiveInt = 1,
        mlp_ratio: Positive = 2.0,
        dropout: Probability = 0.1,
        inner_lr: Positive = 1e-3,
        first_order: bool = False,
        support_fraction: OpenFraction = 2 / 3,
        aggregator_lr_scale: Positive = 0.01,
        tasks: Literal["per_domain", "largest"] = "per_domain",
        student_mode: Literal["eval", "train"] = "eval",
        experts: tuple[str, ...] = (),
        expert_domains: tuple[tuple[int, ...], ...] = (),
    ) -> None:
        super().__init__()
        if experts and expert_domains and len(experts) != len(expert_domains):
            raise ValueError(f"{LOSS_NAME}: experts ({len(experts)}) and expert_domains ({len(expert_domains)}) "
                             "must have one entry per expert")
        self.inner_lr, self.first_order = float(inner_lr), bool(first_order)
        self.support_fraction, self.aggregator_lr_scale = float(support_fraction), float(aggregator_lr_scale)
        self.tasks, self.student_mode = tasks, student_mode
        self.experts = tuple(experts)
        self.expert_domains = tuple(tuple(int(d) for d in ds) for ds in expert_domains)
        self.heads, self.depth, self.mlp_ratio, self.dropout = int(heads), int(depth), float(mlp_ratio), float(dropout)
        self.aggregator: ExpertAggregator | None = None  # sized by from_shapes (build_aggregator)

    def build_aggregator(self, *, expert_dim: int, student_dim: int) -> None:
        """Create the aggregator for ``expert_dim``-sized expert tokens and ``student_dim``-sized student features."""
        self.aggregator = ExpertAggregator(expert_dim, heads=self.heads, depth=self.depth,
                                           mlp_dim=max(1, round(self.mlp_ratio * expert_dim)), dropout=self.dropout,
                                           out_dim=student_dim)

    @classmethod
    def from_shapes(cls, *, student_shape, teacher_shape, num_train_samples, **options) -> "MetaDMoEInner":
        if len(student_shape) != 1 or teacher_shape is None or len(teacher_shape) != 1:
            raise ValueError(f"{LOSS_NAME} compares flat features (D,): the student's {tuple(student_shape)} and the "
                             f"experts' {None if teacher_shape is None else tuple(teacher_shape)}; use the 'feature' "
                             "fields (the penultimate embeddings)")
        loss = cls(**options)
        loss.build_aggregator(expert_dim=teacher_shape[0], student_dim=student_shape[0])
        return loss

    def begin_step(self, step: int) -> None:
        # The Distiller calls this only when some recipe runs its ordinary forward pass in
        # training mode: Meta-DMoE's bilevel step is the meta_dmoe recipe's, never that.
        raise UserError(f"loss {LOSS_NAME!r} (method meta_dmoe) is trained by its own bilevel step: set "
                        "recipe: {name: meta_dmoe} in the config")

    def target(self, teacher: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """The aggregated teacher feature ``t`` ``(B, D_s)`` from expert tokens ``(B, K, D_e)`` (or one ``(B, D_e)``)."""
        if self.aggregator is None:
            raise RuntimeError(f"{LOSS_NAME}: built without shapes; use from_shapes(...)")
        tokens = teacher.unsqueeze(1) if teacher.dim() == 2 else teacher
        return self.aggregator(tokens.float(), keep)

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, *, mask: torch.Tensor | None = None,
                weights: torch.Tensor | None = None, keep: torch.Tensor | None = None) -> torch.Tensor:
        return feature_mse(student, self.target(teacher, keep), mask=mask, weights=weights)

    def extra_repr(self) -> str:
        return (f"inner_lr={self.inner_lr}, first_order={self.first_order}, support_fraction={self.support_fraction:.4g}, "
                f"aggregator_lr_scale={self.aggregator_lr_scale}, tasks={self.tasks!r}, experts={list(self.experts)}")


# ----------------------------------------------------------------------------- the scheme


class MetaDMoEOptions(BaseModel):
    """``distill.options`` of ``meta_dmoe`` (defaults: the official Camelyon17 settings)."""

    model_config = ConfigDict(extra="forbid")

    heads: int = Field(16, ge=1, description="attention heads of the aggregator (official 16)")
    depth: int = Field(1, ge=1, description="transformer layers of the aggregator (official 1)")
    mlp_ratio: float = Field(2.0, gt=0, allow_inf_nan=False, description="feed-forward width / feature size (official 2)")
    dropout: float = Field(0.1, ge=0, le=1, description="aggregator dropout (official 0.1)")
    inner_lr: float = Field(1e-3, gt=0, allow_inf_nan=False, description="the inner step's learning rate (official ilr)")
    first_order: bool = Field(False, description="drop the second-order term (official: second order)")
    support_fraction: float = Field(2 / 3, gt=0, lt=1, description="share of each task that is its support set "
                                    "(official 64 of 96)")
    aggregator_lr_scale: float = Field(0.01, gt=0, allow_inf_nan=False, description="the aggregator's learning rate "
                                       "as a multiple of the student's (official tlr / slr = 1e-6 / 1e-4)")
    tasks: Literal["per_domain", "largest"] = Field("per_domain", description="per_domain: every domain group of a "
                                                    "batch is a task; largest: only the largest group")
    student_mode: Literal["eval", "train"] = Field("eval", description="the student's mode in the meta step "
                                                   "(official: eval)")
    expert_domains: list[list[int]] | None = Field(None, description="the domains each expert was trained on, in "
                                                   "config order (default: each expert's train.domains)")


def build(distill, participants, options: MetaDMoEOptions) -> Expansion:
    """The term ``meta_dmoe`` (loss ``meta_dmoe_inner``: input ``student.feature``, target
    the first expert's ``feature``, which sizes the aggregator), the source ``experts``
    (every frozen participant) and a zero-weight term reading it, so that every expert is
    part of the run. The recipe ``meta_dmoe`` runs the bilevel step with the first term's
    aggregator and settings; it never evaluates the terms themselves."""
    from ..config import EnsembleConfig, TermConfig

    student = participants.get(STUDENT)
    if student is None or not student.trainable:
        raise ValueError("method 'meta_dmoe' trains a participant 'student' (trainable: true); there is none")
    experts = [n for n, p in participants.items() if not p.trainable]
    if len(experts) < 2:
        raise ValueError(f"method 'meta_dmoe' needs at least two experts (frozen participants, one per source domain, "
                         f"each with train.domains); got {experts}")
    if EXPERTS in participants:
        raise ValueError(f"method 'meta_dmoe' adds a source named {EXPERTS!r}; rename the participant of that name")
    if options.expert_domains is not None:
        if len(options.expert_domains) != len(experts):
            raise ValueError(f"options.expert_domains: expected {len(experts)} lists, one per expert ({', '.join(experts)}); "
                             f"got {len(options.expert_domains)}")
        domains = [list(ds) for ds in options.expert_domains]
    else:
        missing = [n for n in experts if participants[n].train.domains is None]
        if missing:
            raise ValueError(f"method 'meta_dmoe': expert(s) {', '.join(missing)} have no train.domains, so the domain "
                             "whose expert must be masked out is unknown; give each expert "
                             "participants.<name>.train.domains (or distill.options.expert_domains)")
        domains = [list(participants[n].train.domains) for n in experts]
    covered = sorted({d for ds in domains for d in ds})
    for d in covered:
        if all(d in ds for ds in domains):
            raise ValueError(f"method 'meta_dmoe': every expert covers domain {d}, so a task of that domain would have "
                             "no expert left after masking its own; give the experts distinct domains")
    values = options.model_dump(exclude={"expert_domains"})
    # The aggregator is sized by the first expert's feature (every expert must share its size).
    term = TermConfig(loss=LOSS_NAME, name="meta_dmoe", weight=1.0 if distill.weight is None else distill.weight,
                      input=f"{STUDENT}.feature", target=f"{experts[0]}.feature",
                      options={**values, "experts": experts, "expert_domains": domains})
    # A zero-weight term on the experts' source keeps every expert in the run (trained from
    # its domains, set up on the device); the recipe reads their features itself and never
    # evaluates this term. (A target ``experts.feature`` would do both at once, but the
    # shape probe cannot yet resolve a field alias through an ensemble.)
    keep = TermConfig(loss="kd", name="meta_dmoe_experts", weight=0.0, input=f"{STUDENT}.logits", target=f"{EXPERTS}.logits")
    return [term, keep], {EXPERTS: EnsembleConfig(members=experts, combine="mean_logits")}


SCHEMES.register("meta_dmoe", summary="the student meta-learns to adapt by one unlabelled distillation step from a "
                 "transformer aggregation of domain experts (with recipe meta_dmoe)", kind="scheme",
                 paper=PAPER)(Scheme("meta_dmoe", MetaDMoEOptions, build, PAPER))


# ----------------------------------------------------------------------------- the step


def domain_tasks(domains: torch.Tensor, *, support_fraction: float, mode: str = "per_domain"
                 ) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
    """A batch cut into single-domain tasks: ``[(domain, support rows, query rows), ...]``.

    ``domains`` ``(B,)``. Each domain group (in batch order) is one task; its first
    ``max(1, floor(support_fraction * n))`` rows are the support set, the rest the query
    set (the official code cuts its single-domain batch the same way: support first). A
    group of fewer than two samples has no query and is skipped. ``mode="largest"`` keeps
    only the largest group (ties: the smallest domain id). Reads the domains on the host.
    """
    values, counts = torch.unique(domains, return_counts=True)
    groups = list(zip(values.tolist(), counts.tolist()))
    if mode == "largest":
        groups = [max(groups, key=lambda g: (g[1], -g[0]))] if groups else []
    elif mode != "per_domain":
        raise ValueError(f"domain_tasks: mode must be 'per_domain' or 'largest'; got {mode!r}")
    tasks = []
    for d, n in groups:
        if n < 2:
            continue
        rows = (domains == d).nonzero().flatten()
        n_support = min(max(1, math.floor(support_fraction * n)), n - 1)
        tasks.append((d, rows[:n_support], rows[n_support:]))
    return tasks


def _rows(batch: Mapping[str, torch.Tensor], rows: torch.Tensor) -> dict[str, torch.Tensor]:
    return {k: v[rows] if isinstance(v, torch.Tensor) and v.dim() > 0 else v for k, v in batch.items()}


def functional_outputs(model: nn.Module, params: Mapping[str, torch.Tensor], batch: Mapping[str, torch.Tensor],
                       taps: FeatureTaps) -> dict[str, torch.Tensor]:
    """``model`` run with ``params`` in place of its parameters (``torch.func.functional_call``;
    buffers are its own): ``{"logits": ..., <tapped path>: ...}``."""
    from ..models.outputs import logits_of

    with taps:
        logits = logits_of(functional_call(model, dict(params), (model_input(dict(batch)),)))
    return {LOGITS: logits, **taps.collect()}


def expert_tokens(experts: Sequence[Participant], batch: Mapping[str, torch.Tensor], field: str = "feature") -> torch.Tensor:
    """The experts' features as tokens ``(B, K, D)`` (frozen: no gradient). Each expert's
    ``field`` is tapped here if no term asked for it."""
    tokens = []
    for expert in experts:
        path = expert.resolve_field(field)
        if path not in expert.taps.paths:
            expert.add_taps([path])
        tokens.append(expert.provide(batch, [field], {})[field].flatten(1).float())
    shapes = {t.shape[1] for t in tokens}
    if len(shapes) != 1:
        raise UserError(f"method meta_dmoe: the experts' features differ in size ({[t.shape[1] for t in tokens]}); "
                        "the aggregator takes one token size, so give every expert the same feature width")
    return torch.stack(tokens, dim=1)


@contextmanager
def _modes(modules: Mapping[nn.Module, bool]) -> Iterator[None]:
    """Put each module in training (True) or eval (False) mode; every submodule's mode is restored after."""
    saved = {m: m.training for root in modules for m in root.modules()}
    try:
        for module, training in modules.items():
            module.train(training)
        yield
    finally:
        for module, training in saved.items():
            module.training = training


def meta_dmoe_term(distiller: Distiller):
    """The Distiller's one term whose loss is :class:`MetaDMoEInner` (a clear error otherwise)."""
    found = [t for t in distiller.terms if isinstance(t.loss, MetaDMoEInner)]
    if len(found) != 1:
        raise UserError(f"recipe 'meta_dmoe' needs exactly one term with loss {LOSS_NAME!r} (distill: {{method: "
                        f"meta_dmoe}} makes it); found {len(found)} among {[t.name for t in distiller.terms]}")
    return found[0]


def meta_losses(student: Participant, experts: Sequence[Participant], loss: MetaDMoEInner,
                batch: Mapping[str, torch.Tensor], *, feature_path: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Meta-DMoE's outer loss on one batch and its parts ``{inner, query_ce}`` (device tensors).

    For each task of :func:`domain_tasks`: the aggregated target on the support set with
    the task's own-domain experts masked out, one :func:`inner_step` on the feature MSE
    (no labels), and the cross-entropy of the adapted student on the query set. The
    outer loss is the mean over tasks; its gradient reaches the student's parameters and
    the aggregator (through the inner step, unless ``first_order``).
    """
    if DOMAIN not in batch:
        raise UserError(f"method meta_dmoe learns from single-domain tasks, but the batch has no {DOMAIN!r} entry "
                        f"(keys: {sorted(batch)}); use a data set with domains, e.g. digits_domains")
    domains = batch[DOMAIN]
    tasks = domain_tasks(domains, support_fraction=loss.support_fraction, mode=loss.tasks)
    if not tasks:
        raise UserError("method meta_dmoe: no domain has two samples in this batch (a support and a query sample); "
                        "raise train.batch_size")
    model = student.model
    params = dict(model.named_parameters())
    taps = FeatureTaps(model, [feature_path], role=student.name)
    outer, inner_sum = [], []
    for _, support, query in tasks:
        s_batch, q_batch = _rows(batch, support), _rows(batch, query)
        tokens = expert_tokens(experts, s_batch)  # (S, K, D_e)
        keep = expert_keep_mask(s_batch[DOMAIN], loss.expert_domains)  # (S, K): the task's own experts hidden
        feature = functional_outputs(model, params, s_batch, taps)[feature_path]  # (S, D_s)
        inner = loss(feature.flatten(1), tokens, keep=keep)
        adapted = inner_step(params, inner, lr=loss.inner_lr, first_order=loss.first_order)
        logits = functional_outputs(model, adapted, q_batch, taps)[LOGITS]  # (Q, C)
        outer.append(cross_entropy(logits, q_batch["target"]))
        inner_sum.append(inner.detach())
    total = torch.stack(outer).mean()
    return total, {"meta_dmoe_inner": torch.stack(inner_sum).mean(), "meta_dmoe_query_ce": total.detach()}


@RECIPES.register("meta_dmoe", summary="Meta-DMoE's bilevel step: per single-domain task, one unlabelled distillation "
                  "step from the masked expert aggregation, then the query CE updates student and aggregator")
class MetaDMoERecipe:
    """Meta-DMoE's meta-training step (official ``train_epoch``), on the one engine.

    Each micro-batch is cut into single-domain tasks by its ``domain`` entry
    (:func:`domain_tasks`: every domain group of the batch is a task, or only the largest,
    per the loss's ``tasks``), and :func:`meta_losses` gives the mean outer loss, whose
    gradient (divided by ``accumulate``) is accumulated; after ``ctx.guard``, the student's
    optimizer steps once. The aggregator is in that optimizer (it belongs to a term that
    trains the student); its update is then scaled by ``aggregator_lr_scale``, which for
    SGD, Adam and AdamW equals a parameter group of its own at that multiple of the
    learning rate (their updates are proportional to the rate; the optimizer state is
    unchanged). The student runs in ``student_mode`` (official: eval) and the aggregator
    in eval mode (official ``selector.eval()``); both get their modes back afterwards.
    One process only: the student is called outside the DDP wrapper.
    """

    def step(self, ctx: StepContext) -> StepResult:
        if ctx.fabric.world_size > 1:
            raise UserError("recipe 'meta_dmoe' runs on one process (its functional student calls bypass DDP's gradient "
                            "synchronisation); set fabric.devices: 1")
        term = meta_dmoe_term(ctx.distiller)
        loss: MetaDMoEInner = term.loss
        student = ctx.distiller.sources[term.input.source]
        experts = [ctx.distiller.sources[n] for n in loss.experts]
        optimizer = ctx.optimizers[student.name]
        feature_path = student.resolve_field(term.input.field)
        total: torch.Tensor | None = None
        parts: dict[str, torch.Tensor] = {}
        with _modes({student.model: loss.student_mode == "train", loss: False}):
            for batch in ctx.micro_batches:
                with ctx.fabric.autocast():
                    outer, own = meta_losses(student, experts, loss, batch, feature_path=feature_path)
                ctx.fabric.backward(outer / ctx.accumulate)
                total = outer.detach() / ctx.accumulate if total is None else total + outer.detach() / ctx.accumulate
                for name, value in own.items():
                    parts[name] = parts.get(name, 0.0) + value / ctx.accumulate
        assert total is not None, "a step needs at least one micro-batch"
        result = StepResult(loss=total, parts=parts)
        ctx.guard(result)
        before = [p.detach().clone() for p in loss.parameters()]
        _update(ctx, optimizer)
        with torch.no_grad():
            for p, old in zip(loss.parameters(), before):
                p.copy_(old + loss.aggregator_lr_scale * (p - old))
        for opt in ctx.optimizers.values():
            opt.zero_grad(set_to_none=True)
        return result


# ----------------------------------------------------------------------------- test time


def test_time_adapt(student: nn.Module, experts: Sequence[nn.Module], loss: MetaDMoEInner, inputs: torch.Tensor, *,
                    student_layer: str = "feature", expert_layer: str = "feature", steps: int = 1) -> nn.Module:
    """A copy of ``student`` adapted to one target domain from its unlabelled ``inputs``
    (official ``eval``): ``steps`` inner steps (official 1) of ``loss.inner_lr`` on the MSE
    between the student's features and the aggregation of EVERY expert's features (no
    expert is masked: none was trained on the target domain). No label is read; the
    student itself is not changed.

    ``student_layer``/``expert_layer``: module paths of the features, or ``"feature"``
    (each model's ``feature_layer``). Everything runs in eval mode (official), the student
    in ``loss.student_mode``'s counterpart at test time: eval.
    """
    if steps < 1:
        raise ValueError(f"test_time_adapt: steps must be >= 1; got {steps}")
    adapted = copy.deepcopy(student)
    student_path = _layer(adapted, student_layer, "student")
    expert_paths = [_layer(e, expert_layer, f"expert {i}") for i, e in enumerate(experts)]
    batch = {"input": inputs}
    with _modes({adapted: False, loss: False, **{e: False for e in experts}}):
        with torch.no_grad():
            tokens = []
            for expert, path in zip(experts, expert_paths):
                with FeatureTaps(expert, [path], role="expert") as taps:
                    call_model(expert, batch)
                tokens.append(taps.collect()[path].flatten(1).float())
            target = loss.target(torch.stack(tokens, dim=1))  # (N, D_s), every expert kept
        taps = FeatureTaps(adapted, [student_path], role="student")
        params = {n: p.detach().requires_grad_(True) for n, p in adapted.named_parameters()}
        for _ in range(steps):
            feature = functional_outputs(adapted, params, batch, taps)[student_path].flatten(1)
            inner = feature_mse(feature, target)
            params = {n: p.detach().requires_grad_(True)
                      for n, p in inner_step(params, inner, lr=loss.inner_lr, first_order=True).items()}
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            p.copy_(params[name])
    return adapted


def _layer(model: nn.Module, layer: str, role: str) -> str:
    if layer != "feature":
        return layer
    path = getattr(model, "feature_layer", None)
    if not path:
        raise ValueError(f"test_time_adapt: the {role} ({type(model).__name__}) declares no feature_layer; "
                         "give the module path of its features")
    return path


def adapted_predictions(distiller: Distiller, dataset, *, support_size: int = 64, batch_size: int = 512,
                        device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Logits ``(N, C)`` and targets ``(N,)`` of a trained Meta-DMoE student on ``dataset``,
    adapted per domain: for each domain of ``dataset.domains`` (one domain if it has
    none), :func:`test_time_adapt` on the inputs of its first ``support_size`` samples
    (official: the first evaluation batch, of 64), then predictions for all its samples."""
    from ..analysis import predict

    term = meta_dmoe_term(distiller)
    student = distiller.sources[term.input.source].model
    experts = [distiller.sources[n].model for n in term.loss.experts]
    domains = getattr(dataset, "domains", None)
    domains = torch.zeros(len(dataset), dtype=torch.long) if domains is None else torch.as_tensor(domains)
    logits = targets = None
    for d in torch.unique(domains).tolist():
        rows = (domains == d).nonzero().flatten()
        part = dataset.subset(rows)
        support = part.__getitems__(list(range(min(support_size, len(part)))))["input"].to(device)
        model = test_time_adapt(student, experts, term.loss, support, student_layer=distiller.sources[term.input.source]
                                .resolve_field(term.input.field))
        out, tgt = predict(model, part, batch_size=batch_size, device=device)
        if logits is None:
            logits = torch.empty(len(dataset), out.shape[1])
            targets = torch.empty(len(dataset), dtype=tgt.dtype)
        logits[rows], targets[rows] = out, tgt
    return logits, targets


def restore(cfg, run_dir: str | Path) -> Distiller:
    """The Distiller of a finished (or checkpointed) Meta-DMoE run: built from ``cfg``, the
    trainable parts (student, aggregator) from the run's newest checkpoint, every expert
    from its weights (``weights`` or the trained-teacher cache)."""
    from ..build import load_data, make_distiller, teacher_weights_path
    from ..checkpoint import CheckpointError, load_into, load_latest_checkpoint, load_weights

    splits, train_set = load_data(cfg.data)
    distiller = make_distiller(cfg, splits, train_set)
    loaded = load_latest_checkpoint(Path(run_dir) / "checkpoints", warn=False)
    if loaded is None:
        raise CheckpointError(f"{str(run_dir)!r} holds no checkpoint of a Meta-DMoE run")
    load_into(distiller, loaded.model_state, source=f"checkpoint {loaded.path}")
    for participant in distiller.frozen():
        path = teacher_weights_path(cfg, participant.name)
        load_into(participant.model, load_weights(path, what=f"{participant.name} weights"), source=str(path))
    return distiller


__all__ = ["ExpertAggregator", "MetaDMoEInner", "MetaDMoEOptions", "MetaDMoERecipe", "adapted_predictions", "domain_tasks",
           "expert_tokens", "functional_outputs", "meta_dmoe_term", "meta_losses", "restore", "test_time_adapt"]
