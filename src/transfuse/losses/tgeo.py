"""TGeo-KD: a learned per-sample fusion ratio, trained bilevel on held-out labelled samples.

Paper: Hu, Wu et al., Less or More From Teacher: Exploiting Trilateral Geometry for
Knowledge Distillation, ICLR 2024, https://arxiv.org/abs/2312.15112 (no official code is
public). Two pieces, both registered on import:

* the loss ``tgeo`` (:class:`TGeo`): ``alpha_i * KD_i + (1 - alpha_i) * CE_i`` with
  ``alpha_i = sigmoid(MLP_omega(Delta_i))`` (:func:`transfuse.functional.tgeo.tgeo_relations`
  gives ``Delta_i``). The module holds the fusion network ``omega``, the running class sums
  of the teacher's predictions (for the class means ``tbar_c``) and ``omega``'s Adam state,
  all in its ``state_dict``, so a checkpoint of the Distiller resumes them exactly;
* the step recipe ``tgeo_bilevel`` (:class:`TGeoBilevel`): per step, a virtual SGD step
  of the student with ``alpha(omega)`` kept in the graph, the cross-entropy of that
  virtual student on a held-out batch, an Adam step of ``omega`` on it, then the real
  update of the student with the new (detached) ratios -- the Meta-Weight-Net scheme the
  paper's bilevel optimisation follows.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import nn
from torch.func import functional_call

from ..errors import UserError
from ..functional._types import NonNegative, Positive, PositiveInt, Temperature
from ..functional.logits import _usable_target, cross_entropy
from ..functional.taid import _at_least_float32
from ..functional.tgeo import NUM_RELATIONS, class_prediction_sums, tgeo_fused, tgeo_relations
from ..models.outputs import logits_of, model_input
from ..recipes import RECIPES, StepContext, StepResult, _backward_over, _update
from .base import register_loss
from .module import DistillLoss

PAPER = ("Hu, Wu et al., Less or More From Teacher: Exploiting Trilateral Geometry for Knowledge Distillation, "
         "ICLR 2024, https://arxiv.org/abs/2312.15112")

#: State kept in float32 whatever precision the module is cast to (a bf16 count stops at 256).
_FLOAT_STATE = ("class_sums", "class_counts")


class TGeoUsageError(UserError, ValueError):
    """``tgeo`` used in a way that cannot train its fusion network."""


@register_loss(
    name="tgeo",
    kind="logits",
    summary="per-sample KD/CE fusion ratio from the student-teacher-label geometry, learned bilevel on held-out data",
    paper=PAPER,
    weight=1.0,
    ce_weight=0.0,
    needs=("target",),
)
class TGeo(DistillLoss):
    """TGeo-KD: ``mean_i [alpha_i * KD_i + (1 - alpha_i) * CE_i]``, ``alpha_i = sigmoid(MLP_omega(Delta_i))``.

    ``Delta_i = [s - t, s - g, t - g, t - tbar_y]`` (each ``C`` long): the student's and
    teacher's predicted distributions (softmax at temperature 1, detached), the one-hot
    label and ``tbar_y``, the teacher's mean prediction over the labelled training samples
    of the label's class seen so far (this batch included). ``KD_i`` is
    :func:`~transfuse.functional.kd` at ``temperature`` (``KL(p || q)`` at the default 1),
    ``CE_i`` the label cross-entropy (:func:`~transfuse.functional.tgeo.tgeo_fused`).

    **Who trains omega.** Only the recipe ``tgeo_bilevel`` (:class:`TGeoBilevel`): in its
    virtual pass (:meth:`outer_graph`) ``alpha`` keeps its graph to ``omega``; in every
    other call ``alpha`` is computed without a graph, so the student's own update never
    moves ``omega``, and the features never pass a gradient to the student (they are
    read off detached predictions). ``omega``'s optimizer is Adam(``omega_lr``,
    ``omega_weight_decay``), stepped by :meth:`step_omega`; its moments and step count
    are buffers of this module. Used in training under a Distiller without that recipe,
    the loss refuses to run (``omega`` would stay at its random initialisation).

    **State** (``state_dict``): ``fusion.*`` (``omega``: Linear(4C, hidden), ReLU,
    Linear(hidden, 1)), ``class_sums`` ``(C, C)`` and ``class_counts`` ``(C,)`` (float32
    under any cast), and ``omega_state.*`` (Adam's ``exp_avg``, ``exp_avg_sq``, ``step`` per
    parameter of ``omega``). The class sums grow in training-mode calls outside the
    virtual pass, counting masked-in (labelled) samples only.

    Build with :meth:`from_shapes` (a run does) or :meth:`for_classes`; ``TGeo()`` alone
    has no fusion network yet.
    """

    #: The step recipe this loss needs (checked when a config loads).
    required_recipe = "tgeo_bilevel"

    needs = ("target",)

    def __init__(
        self,
        *,
        hidden: PositiveInt = 100,
        temperature: Temperature = 1.0,
        omega_lr: Positive = 1e-3,
        omega_weight_decay: NonNegative = 1e-4,
    ) -> None:
        super().__init__()
        if int(hidden) < 1:
            raise ValueError(f"tgeo: hidden must be an int >= 1, got {hidden}")
        if not temperature > 0:
            raise ValueError(f"tgeo: temperature must be > 0, got {temperature}")
        if not omega_lr > 0 or not omega_weight_decay >= 0:
            raise ValueError(f"tgeo: need omega_lr > 0 and omega_weight_decay >= 0, got omega_lr={omega_lr}, "
                             f"omega_weight_decay={omega_weight_decay}")
        self.hidden, self.temperature = int(hidden), float(temperature)
        self.omega_lr, self.omega_weight_decay = float(omega_lr), float(omega_weight_decay)
        self.num_classes: int | None = None
        self.fusion: nn.Module | None = None
        self.omega_state = nn.Module()  # Adam's state of omega, as buffers
        self._outer = False  # True inside outer_graph(): alpha keeps its graph, the class sums stay
        self.bilevel = False  # set by the tgeo_bilevel recipe; a Distiller's training call requires it
        self.last_alpha: torch.Tensor | None = None  # mean alpha of the last call (detached), for logs

    # -- building -----------------------------------------------------------------------

    @classmethod
    def from_shapes(cls, *, student_shape: tuple[int, ...], teacher_shape: tuple[int, ...] | None,
                    num_train_samples: int, **options: Any) -> "TGeo":
        if not student_shape or teacher_shape is None or tuple(teacher_shape) != tuple(student_shape):
            raise ValueError(f"tgeo compares the student's and the teacher's logits over the same classes; got per-sample "
                             f"shapes {tuple(student_shape)} and {None if teacher_shape is None else tuple(teacher_shape)}")
        return cls.for_classes(int(student_shape[-1]), **options)

    @classmethod
    def for_classes(cls, num_classes: int, **options: Any) -> "TGeo":
        """The loss for ``num_classes`` classes, its fusion network freshly initialised."""
        loss = cls(**options)
        loss._build(num_classes)
        return loss

    def _build(self, num_classes: int) -> None:
        if num_classes < 2:
            raise ValueError(f"tgeo needs at least 2 classes, got {num_classes}")
        self.num_classes = num_classes
        self.fusion = nn.Sequential(nn.Linear(NUM_RELATIONS * num_classes, self.hidden), nn.ReLU(), nn.Linear(self.hidden, 1))
        self.register_buffer("class_sums", torch.zeros(num_classes, num_classes, dtype=torch.float32))
        self.register_buffer("class_counts", torch.zeros(num_classes, dtype=torch.float32))
        for key, p in self._omega_items():
            self.omega_state.register_buffer(f"{key}_exp_avg", torch.zeros_like(p, memory_format=torch.preserve_format))
            self.omega_state.register_buffer(f"{key}_exp_avg_sq", torch.zeros_like(p, memory_format=torch.preserve_format))
            self.omega_state.register_buffer(f"{key}_step", torch.zeros((), dtype=torch.float32))

    def _omega_items(self) -> list[tuple[str, nn.Parameter]]:
        assert self.fusion is not None
        return [(name.replace(".", "_"), p) for name, p in self.fusion.named_parameters()]

    def omega_parameters(self) -> list[nn.Parameter]:
        """``omega``: the fusion network's parameters (trained only by :meth:`step_omega`)."""
        return [p for _, p in self._omega_items()]

    # -- the loss -----------------------------------------------------------------------

    def begin_step(self, step: int) -> None:
        """Called by the Distiller before each training forward pass: refuse a run that cannot train ``omega``."""
        if not self.bilevel:
            raise TGeoUsageError(
                "tgeo learns its fusion ratio from held-out labelled samples, which only the recipe 'tgeo_bilevel' "
                "provides; set recipe: {name: tgeo_bilevel} and data.holdout_fraction (e.g. 0.2)")

    def forward(
        self,
        student: torch.Tensor,
        teacher: torch.Tensor,
        *,
        target: torch.Tensor,
        mask: torch.Tensor | None = None,
        weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        alpha = self.ratio(student, teacher, target, mask=mask)  # (...), graph to omega only in outer_graph()
        return tgeo_fused(student, teacher, target, alpha, temperature=self.temperature, mask=mask, weights=weights)

    def ratio(self, student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor, *,
              mask: torch.Tensor | None = None) -> torch.Tensor:
        """``alpha`` ``(...)`` in (0, 1) for logits ``(..., C)``; updates the class sums in training (outside the virtual pass)."""
        if self.fusion is None:
            raise TGeoUsageError("tgeo has no fusion network yet: build it with LOSSES.get('tgeo').from_shapes(...) "
                                 "or TGeo.for_classes(num_classes)")
        if student.shape[-1] != self.num_classes:
            raise ValueError(f"tgeo was built for {self.num_classes} classes but got logits of shape {tuple(student.shape)}")
        target = _usable_target(target, mask, "tgeo")  # unlabelled positions: placeholder class 0, masked out below
        with torch.no_grad():
            s = torch.softmax(_at_least_float32(student.detach()), dim=-1)  # (..., C)
            t = torch.softmax(_at_least_float32(teacher.detach()), dim=-1)  # (..., C)
            batch_sums, batch_counts = class_prediction_sums(t, target, mask=mask)  # (C, C), (C,)
            sums, counts = self.class_sums + batch_sums, self.class_counts + batch_counts
            if self.training and not self._outer:
                self.class_sums.copy_(sums)
                self.class_counts.copy_(counts)
            means = sums / counts.clamp_min(1.0)[:, None]  # (C, C): tbar_c; a class with no sample has no row in use
            delta = tgeo_relations(s, t, target, means)  # (..., 4C), no graph to the student
        first = next(self.fusion.parameters())
        with torch.set_grad_enabled(self._outer and torch.is_grad_enabled()):
            alpha = torch.sigmoid(self.fusion(delta.to(first.dtype))).squeeze(-1)  # (...)
        self.last_alpha = alpha.detach().mean()
        return alpha

    @contextlib.contextmanager
    def outer_graph(self) -> Iterator[None]:
        """Inside: ``alpha`` keeps its graph to ``omega`` and the class sums are read, not updated (the virtual pass)."""
        self._outer = True
        try:
            yield
        finally:
            self._outer = False

    # -- omega's optimizer ----------------------------------------------------------------

    def step_omega(self, grads: list[torch.Tensor | None]) -> None:
        """One Adam step of ``omega`` with these gradients (one per :meth:`omega_parameters`, None = unused).

        The optimizer is ``torch.optim.Adam``; its state is bound to this module's buffers
        before each step (Adam updates state in place), so the state follows device moves
        and checkpoint loads of the module, and the gradients are cleared afterwards so no
        other optimizer ever sees them.
        """
        items = self._omega_items()
        if len(grads) != len(items):
            raise ValueError(f"tgeo.step_omega: expected {len(items)} gradients, got {len(grads)}")
        optimizer = torch.optim.Adam([p for _, p in items], lr=self.omega_lr, weight_decay=self.omega_weight_decay)
        for (key, p), g in zip(items, grads):
            optimizer.state[p] = {
                "step": getattr(self.omega_state, f"{key}_step"),
                "exp_avg": getattr(self.omega_state, f"{key}_exp_avg"),
                "exp_avg_sq": getattr(self.omega_state, f"{key}_exp_avg_sq"),
            }
            p.grad = None if g is None else g.detach().to(p.dtype)
        optimizer.step()
        for _, p in items:
            p.grad = None

    # -- state --------------------------------------------------------------------------

    def _apply(self, fn, recurse=True):
        # Keep the class statistics and Adam's step counts in float32 under a cast to bf16/fp16
        # (device moves still apply): a bf16 count cannot pass 256.
        kept = {name: getattr(self, name) for name in _FLOAT_STATE if hasattr(self, name)}
        steps = {name: b for name, b in self.omega_state.named_buffers() if name.endswith("_step")}
        super()._apply(fn, recurse)
        for name, old in kept.items():
            new = getattr(self, name)
            if new.dtype != old.dtype:
                setattr(self, name, old.to(device=new.device))
        for name, old in steps.items():
            new = getattr(self.omega_state, name)
            if new.dtype != old.dtype:
                setattr(self.omega_state, name, old.to(device=new.device))
        return self

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, hidden={self.hidden}, temperature={self.temperature}, "
                f"omega_lr={self.omega_lr}, omega_weight_decay={self.omega_weight_decay}")


@RECIPES.register("tgeo_bilevel", summary="TGeo-KD: a virtual student step, omega updated on held-out CE, then the real step")
class TGeoBilevel:
    """TGeo-KD's bilevel step (the one-step approximation of Meta-Weight-Net), per optimizer step:

    1. **virtual step**: the Distiller's loss of the ``tgeo`` term's student on the step's
       micro-batches, with ``alpha(omega)`` in the graph (:meth:`TGeo.outer_graph`);
       ``theta' = theta - lr * grad_theta`` with ``create_graph=True``, so ``theta'`` is a
       function of ``omega``. ``lr`` is ``virtual_lr``, or the student optimizer's current
       learning rate. The pass leaves no trace: the student's buffers (BatchNorm statistics)
       are restored and the class sums are not updated;
    2. **outer step**: the cross-entropy of the virtual student (``torch.func.functional_call``
       with ``theta'``) on a held-out batch, ``holdout_batch_size`` samples drawn without
       replacement as a function of ``(seed, step)``; its gradient w.r.t. ``omega`` only
       makes one Adam step of ``omega`` (:meth:`TGeo.step_omega`);
    3. **real step**: forward and backward of every term with the new ``omega`` (``alpha``
       detached), the engine's non-finite check, then every optimizer steps.

    The check in 3 covers the held-out loss too (it is part of the checked value with weight
    0, so a non-finite one stops training before the student's update and before any
    checkpoint). Logged parts: the terms', ``<term>_outer`` (held-out CE of the virtual
    student) and ``<term>_alpha`` (the mean ratio of the real step).

    Cost: about twice a plain step plus a double backward through the student. Needs one
    process (no DDP: the virtual gradient is taken with ``torch.autograd.grad``), and no
    other term or source with per-forward state (CRD's bank, TAID's schedule, a label-only
    teacher's budget), since step 1 runs the Distiller's forward pass a second time.
    """

    def __init__(
        self,
        *,
        holdout: Any,
        seed: int = 0,
        holdout_batch_size: int | None = None,
        virtual_lr: float | None = None,
    ) -> None:
        if holdout is None or not hasattr(holdout, "__len__") or len(holdout) == 0:
            raise ValueError("recipe tgeo_bilevel: holdout must be a non-empty data set of labelled samples "
                             "(set data.holdout_fraction, e.g. 0.2)")
        if holdout_batch_size is not None and (isinstance(holdout_batch_size, bool) or not isinstance(holdout_batch_size, int)
                                               or holdout_batch_size < 1):
            raise ValueError(f"recipe.options.holdout_batch_size: expected an int >= 1 (or null for the training "
                             f"batch size), got {holdout_batch_size!r}")
        if virtual_lr is not None and not (isinstance(virtual_lr, (int, float)) and not isinstance(virtual_lr, bool)
                                           and 0 < virtual_lr < float("inf")):
            raise ValueError(f"recipe.options.virtual_lr: expected a finite float > 0 (or null for the student's "
                             f"learning rate), got {virtual_lr!r}")
        self.holdout = holdout
        self.seed = int(seed)
        self.holdout_batch_size = holdout_batch_size
        self.virtual_lr = None if virtual_lr is None else float(virtual_lr)

    # -- helpers ------------------------------------------------------------------------

    @staticmethod
    def _tgeo_term(distiller) -> Any:
        terms = [t for t in distiller.terms if isinstance(t.loss, TGeo)]
        if len(terms) != 1:
            raise TGeoUsageError(f"recipe tgeo_bilevel needs exactly one term whose loss is 'tgeo'; the terms are "
                                 f"{[f'{t.name} ({type(t.loss).__name__})' for t in distiller.terms]}")
        stateful = [t.name for t in distiller.terms if t is not terms[0]
                    and (any(True for _ in t.loss.buffers()) or hasattr(t.loss, "begin_step"))]
        stateful += [f"source {name}" for name in getattr(distiller, "stateful", {})]
        if stateful:
            raise TGeoUsageError(f"recipe tgeo_bilevel runs each step's forward pass twice (virtual and real), so it "
                                 f"cannot be combined with {stateful}, which keep state per forward pass")
        return terms[0]

    def holdout_batch(self, step: int, size: int) -> dict[str, torch.Tensor]:
        """The held-out batch of ``step``: ``size`` samples without replacement, a function of ``(seed, step)``."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        order = torch.randperm(len(self.holdout), generator=generator)[: min(size, len(self.holdout))].tolist()
        getitems = getattr(self.holdout, "__getitems__", None)
        if getitems is not None:
            return dict(getitems(order))
        from ..data.base import collate_batch

        return collate_batch([self.holdout[i] for i in order])

    # -- the step -----------------------------------------------------------------------

    def step(self, ctx: StepContext) -> StepResult:
        if ctx.fabric.world_size > 1:
            raise TGeoUsageError("recipe tgeo_bilevel runs on one process only (its virtual step takes gradients "
                                 "with torch.autograd.grad, which DDP does not synchronise)")
        term = self._tgeo_term(ctx.distiller)
        loss: TGeo = term.loss
        loss.bilevel = True
        owner = term.input.source
        student = ctx.distiller.models[owner]
        optimizer = ctx.optimizers.get(owner) or (next(iter(ctx.optimizers.values())) if len(ctx.optimizers) == 1 else None)
        if optimizer is None:
            raise TGeoUsageError(f"recipe tgeo_bilevel: no optimizer for {owner!r} (optimizers: {sorted(ctx.optimizers)})")
        batches = list(ctx.micro_batches)  # the virtual and the real step see the same samples

        # 1. The virtual step: theta' = theta - lr * grad(L(theta, omega)), a function of omega.
        params = {n: p for n, p in student.named_parameters() if p.requires_grad}
        saved = {n: b.detach().clone() for n, b in student.named_buffers()}
        virtual_loss: torch.Tensor | None = None
        with loss.outer_graph():
            for batch in batches:
                value = ctx.model(batch, ctx.step)["by_input"][owner] / ctx.accumulate
                virtual_loss = value if virtual_loss is None else virtual_loss + value
        assert virtual_loss is not None, "a step needs at least one micro-batch"
        grads = torch.autograd.grad(virtual_loss, list(params.values()), create_graph=True, allow_unused=True)
        lr = self.virtual_lr if self.virtual_lr is not None else optimizer.param_groups[0]["lr"]
        virtual = {n: p if g is None else p - lr * g for (n, p), g in zip(params.items(), grads)}

        # 2. The outer step: omega <- Adam step on the held-out CE of the virtual student.
        size = self.holdout_batch_size or int(batches[0]["target"].shape[0])
        held = ctx.fabric.to_device(self.holdout_batch(ctx.step, size))
        buffers = {n: b.clone() for n, b in saved.items()}  # the statistics before the virtual pass; updates go to copies
        precision = ctx.fabric.strategy.precision  # as the Fabric-wrapped model's own calls: dtype of inputs and context
        with precision.forward_context():
            output = functional_call(student, {**virtual, **buffers}, (model_input(precision.convert_input(held)),))
        logits = logits_of(precision.convert_output(output))  # (B, C)
        outer = cross_entropy(_at_least_float32(logits), held["target"])
        omega_grads = torch.autograd.grad(outer, loss.omega_parameters(), allow_unused=True)
        with torch.no_grad():  # the virtual pass leaves no trace in BatchNorm statistics (restored only now: the graph read them)
            for n, b in student.named_buffers():
                b.copy_(saved[n])
        loss.step_omega(list(omega_grads))
        del grads, virtual, logits, virtual_loss

        # 3. The real step with the new omega; omega takes no gradient from it.
        result = _backward_over(ctx, batches)
        outer = outer.detach()
        result.parts[f"{term.name}_outer"] = outer
        if loss.last_alpha is not None:
            result.parts[f"{term.name}_alpha"] = loss.last_alpha
        # The held-out CE joins the checked value with weight 0: a non-finite one (so a broken
        # omega) stops training before the student's update.
        ctx.guard(StepResult(loss=result.loss + 0.0 * outer, parts=result.parts))
        for opt in ctx.optimizers.values():
            _update(ctx, opt)
            opt.zero_grad(set_to_none=True)
        return result


__all__ = ["TGeo", "TGeoBilevel", "TGeoUsageError"]
