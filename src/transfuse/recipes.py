"""Step recipes and batch transforms: the inner step of the one training loop.

:func:`transfuse.engine.fit` owns everything that is the same for every method -- data
order, gradient accumulation's batching, learning rates, the non-finite check, logs,
checkpoints, resume -- and hands each optimizer step to a :class:`Recipe` in two phases:

1. ``compute(ctx)``: forward and backward over the step's micro-batches; it must not
   change any parameter. It returns the step's loss and parts as *device* tensors (no
   host synchronisation: the engine reads the loss once per step, for the non-finite
   check, and the parts only every ``log_every`` steps).
2. ``apply(ctx)``: the updates (clip, ``optimizer.step()``, ``zero_grad``). The engine
   calls it only once the loss is known to be finite, so a bad update is never applied.

A recipe with several optimizers (one per trainable participant), alternating updates or
an outer (bilevel) update is another :class:`Recipe` on the same loop, never a fork of it.

**Batch transforms** run after the batch is on the device and before the forward pass:
``transform(batch, *, step, distiller) -> batch``. They may query the models through
``distiller`` (mixup that asks the teacher, adversarial augmentation, generation by the
student); randomness must come from torch's RNG, which checkpoints restore.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Protocol

import torch

from .data.text import PREDICTED
from .registry import Registry

Batch = dict[str, torch.Tensor]
BatchTransform = Callable[..., Batch]

#: Recipes a config can name (``recipe: {name: ...}``).
RECIPES: Registry[type["Recipe"]] = Registry("recipe")


@dataclass
class StepResult:
    """A step's loss (mean over micro-batches) and named parts, as detached device tensors."""

    loss: torch.Tensor
    parts: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class StepContext:
    """What a recipe sees for one optimizer step.

    ``model`` is the Fabric-wrapped Distiller (call it as ``model(batch, step)``),
    ``distiller`` the unwrapped one (its participants and terms), ``optimizers`` one per
    trainable participant by name (or ``{"main": ...}``), ``micro_batches`` the step's
    ``accumulate`` batches (already on the device and transformed, fetched lazily).
    ``guard(result) -> float`` is the engine's non-finite check: call it before applying
    any update (several times for several updates); it returns the loss as a float.
    """

    fabric: Any
    model: Any
    distiller: Any
    optimizers: Mapping[str, torch.optim.Optimizer]
    micro_batches: Iterator[Batch]
    step: int
    accumulate: int
    guard: Callable[[StepResult], float]
    grad_clip: float | None = None


class Recipe(Protocol):
    """The inner step: forward, backward, ``ctx.guard(...)``, then the updates."""

    def step(self, ctx: StepContext) -> StepResult: ...


def _update(ctx: StepContext, optimizer: torch.optim.Optimizer) -> None:
    if ctx.grad_clip is not None:
        ctx.fabric.clip_gradients(ctx.model, optimizer, max_norm=ctx.grad_clip)
    optimizer.step()




def _shares(ctx: StepContext, batches) -> tuple[list, list[torch.Tensor] | list[float]]:
    """The micro-batches, and the factor each one's loss is multiplied by.

    Samples: ``1 / accumulate`` each, so the gradient equals one batch of ``batch_size *
    accumulate``. Token rows (a ``predicted`` entry): each micro-batch's loss is a mean over
    its own predicted positions, so it is weighted by its share of the step's predicted
    positions, over every micro-batch and every process -- the gradient of the mean over all
    the step's predicted positions, whatever the padding and however the step is cut into
    micro-batches (DDP averages gradients over processes, hence the ``world_size`` factor).
    """
    k = ctx.accumulate
    batches = iter(batches)
    first = next(batches, None)
    if first is None:
        return [], []
    if PREDICTED not in first:
        return itertools.chain([first], batches), [1.0 / k] * k
    every = [first, *batches]
    counts = torch.stack([b[PREDICTED].sum() for b in every]).float()  # (k,), on the device
    total = counts.sum()
    world = getattr(ctx.fabric, "world_size", 1)
    if world > 1:
        total = ctx.fabric.all_reduce(total, reduce_op="sum")
    return every, list(counts * world / total.clamp(min=1.0))


def _backward_over(ctx: StepContext, batches, owner: str | None = None) -> StepResult:
    """Forward and backward over the micro-batches, each loss weighted by :func:`_shares`
    (``1 / accumulate`` for samples, the share of predicted positions for token rows).
    ``owner``: back-propagate only the terms that train that participant (and report only
    their parts); None: all."""
    fabric, k = ctx.fabric, ctx.accumulate
    loss_sum: torch.Tensor | None = None
    parts: dict[str, torch.Tensor] = {}
    batches, shares = _shares(ctx, batches)
    for micro, (batch, share) in enumerate(zip(batches, shares)):
        with fabric.no_backward_sync(ctx.model, enabled=micro < k - 1):
            out = ctx.model(batch, ctx.step)
            loss = out["loss"] if owner is None else out["by_input"][owner]
            fabric.backward(loss * share)
        loss = loss.detach() * share
        loss_sum = loss if loss_sum is None else loss_sum + loss
        for name, value in out["parts"].items():
            if owner is None or name in out["inputs"][owner]:
                parts[name] = value * share if name not in parts else parts[name] + value * share
    assert loss_sum is not None, "a step needs at least one micro-batch"
    return StepResult(loss=loss_sum, parts=parts)


@RECIPES.register("default", summary="one forward and backward per micro-batch, then every optimizer steps")
class DefaultRecipe:
    """Today's step: for each micro-batch, the Distiller's total loss divided by
    ``accumulate`` is back-propagated (so the gradient equals one batch of
    ``batch_size * accumulate``); then each optimizer clips (if asked) and steps.

    Several trainable participants (deep mutual learning) update simultaneously from
    the same forward pass: each term's target is detached, so each participant's
    gradient comes only from the terms on its input side.
    """

    def step(self, ctx: StepContext) -> StepResult:
        result = _backward_over(ctx, ctx.micro_batches)
        ctx.guard(result)
        for optimizer in ctx.optimizers.values():
            _update(ctx, optimizer)
            optimizer.zero_grad(set_to_none=True)
        return result


@RECIPES.register("alternating", summary="trainable participants updated one after another, each from a fresh forward pass")
class AlternatingRecipe:
    """Deep mutual learning's Algorithm 1: within a step, participant 1 is updated from
    the terms on its input side; then a new forward pass -- which sees participant 1's
    updated weights -- updates participant 2; and so on, in config order.

    Needs one optimizer per trainable participant. Costs one forward pass per
    participant and one host synchronisation per update. Not for DDP (each forward
    pass would leave the other participants' gradients unreduced).
    """

    def step(self, ctx: StepContext) -> StepResult:
        names = ctx.distiller.trainable_names
        missing = [n for n in names if n not in ctx.optimizers]
        if missing:
            raise ValueError(
                f"the alternating recipe updates each trainable participant with its own optimizer, but "
                f"{missing} have none (optimizers: {sorted(ctx.optimizers)})"
            )
        batches = list(ctx.micro_batches)  # every participant's update sees the same samples
        total: torch.Tensor | None = None
        parts: dict[str, torch.Tensor] = {}
        for name in names:
            own = _backward_over(ctx, batches, owner=name)
            ctx.guard(own)
            _update(ctx, ctx.optimizers[name])
            for optimizer in ctx.optimizers.values():  # nothing may carry over to the next participant's update
                optimizer.zero_grad(set_to_none=True)
            total = own.loss if total is None else total + own.loss
            parts.update(own.parts)
        assert total is not None
        return StepResult(loss=total, parts=parts)


def make_recipe(name: str, **options: Any) -> Recipe:
    """The registered recipe ``name`` (an unknown name lists the valid ones)."""
    RECIPES.check_options(name, options, where="recipe.options")
    return RECIPES.get(name)(**options)
