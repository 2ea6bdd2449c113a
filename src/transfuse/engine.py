"""The one training loop, on Lightning Fabric.

``fit(fabric, distiller, optimizers, train_set, settings, run_dir=...)`` trains any
:class:`~transfuse.distiller.Distiller` (a student learning from a teacher, two peers
learning from each other, a model learning from labels alone) for ``settings.steps``
optimizer steps, handing the inner step to a :class:`~transfuse.recipes.Recipe`:

* devices, precision and DDP come from the ``Fabric`` it is given;
* the data order is a pure function of ``(seed, step)`` (:class:`StepBatchSampler`), so a
  run resumed from step ``k`` sees exactly the batches an uninterrupted run sees after
  ``k``; with RNG and optimizer state restored, CPU resumes are bit-identical;
* ``accumulate`` micro-batches make one optimizer step, each scaled by ``1/accumulate``,
  so the gradient equals the one of a single batch of ``batch_size * accumulate``;
* a non-finite loss stops training before the bad update, keeping the last good
  checkpoint, and says at which step and in which term it happened;
* the host synchronises once per optimizer step (the loss, for that check); the loss
  parts stay on the device and are read only every ``log_every`` steps.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm

from .checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, load_into, rng_state, save_checkpoint, set_rng_state
from .data.base import collate_batch
from .distiller import Distiller
from .errors import UserError
from .metrics_log import MetricsLog
from .optim import lr_at
from .recipes import BatchTransform, DefaultRecipe, Recipe, StepContext

CHECKPOINTS = "checkpoints"


class NonFiniteLossError(UserError, FloatingPointError):
    """Training hit a NaN/inf loss; ``step`` and ``last_checkpoint`` say where it stopped."""

    def __init__(self, message: str, *, step: int, last_checkpoint: Path | None) -> None:
        super().__init__(message)
        self.step = step
        self.last_checkpoint = last_checkpoint


@dataclass(frozen=True)
class FitSettings:
    """Typed knobs of :func:`fit`. Each optimizer's learning rate follows ``lr_schedule``
    (with ``warmup_steps``) from the rate it was created with."""

    steps: int
    batch_size: int
    seed: int = 0
    accumulate: int = 1
    grad_clip: float | None = None
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    log_every: int = 50
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    eval_every: int = 0
    progress: bool = True
    description: str = "train"


@dataclass
class FitResult:
    """What :func:`fit` reports: final step, wall time of this process's share, the last checkpoint."""

    steps: int
    wall_time_s: float
    resumed_from: int
    last_checkpoint: Path | None


class StepBatchSampler(Sampler[list[int]]):
    """Index lists of micro-batches for optimizer steps ``[start_step, end_step)``.

    Epoch ``e`` is the permutation ``randperm(n, seed=hash(seed, e))``; step ``s`` takes
    the ``s``-th slice of ``batch_size * accumulate`` indices of its epoch (samples left
    over at an epoch's end are skipped, so every step is full-sized), cut into
    ``accumulate`` micro-batches; under DDP each micro-batch is split into equal
    contiguous shards, one per rank, so the global batch is the same at any world size.
    """

    def __init__(
        self, n: int, *, batch_size: int, accumulate: int = 1, seed: int = 0, start_step: int = 0,
        end_step: int, rank: int = 0, world_size: int = 1,
    ) -> None:
        if batch_size % world_size:
            raise ValueError(f"train.batch_size ({batch_size}) must be divisible by the number of processes ({world_size})")
        per_step = batch_size * accumulate
        if n < per_step:
            raise ValueError(
                f"the training set has {n} samples, fewer than one step needs (batch_size * accumulate = {per_step}); "
                "lower train.batch_size"
            )
        self.n, self.batch_size, self.accumulate, self.seed = n, batch_size, accumulate, seed
        self.start_step, self.end_step, self.rank, self.world_size = start_step, end_step, rank, world_size
        self.steps_per_epoch = n // per_step

    def epoch_order(self, epoch: int) -> torch.Tensor:
        """The permutation of sample indices for ``epoch``."""
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.n, generator=gen)

    def __len__(self) -> int:
        return (self.end_step - self.start_step) * self.accumulate

    def __iter__(self) -> Iterator[list[int]]:
        per_step = self.batch_size * self.accumulate
        shard = self.batch_size // self.world_size
        epoch, order = -1, torch.empty(0, dtype=torch.long)
        for step in range(self.start_step, self.end_step):
            e, j = divmod(step, self.steps_per_epoch)
            if e != epoch:
                epoch, order = e, self.epoch_order(e)
            chunk = order[j * per_step : (j + 1) * per_step]
            for a in range(self.accumulate):
                micro = chunk[a * self.batch_size : (a + 1) * self.batch_size]
                yield micro[self.rank * shard : (self.rank + 1) * shard].tolist()


def fit(
    fabric,
    distiller: Distiller,
    optimizers: torch.optim.Optimizer | Mapping[str, torch.optim.Optimizer],
    train_set: Dataset,
    settings: FitSettings,
    *,
    run_dir: str | Path,
    resume: bool = False,
    evaluate: Callable[[], dict[str, float]] | None = None,
    recipe: Recipe | None = None,
    transforms: Sequence[BatchTransform] = (),
) -> FitResult:
    """Train ``distiller`` for ``settings.steps`` optimizer steps; see the module docstring.

    ``optimizers``: one optimizer, or one per trainable group by name (e.g. per
    participant). ``recipe`` defaults to :class:`~transfuse.recipes.DefaultRecipe`;
    ``transforms`` run on each micro-batch between device transfer and the forward pass.
    ``evaluate`` (optional) is called every ``settings.eval_every`` steps on rank 0 and its
    numbers are logged. Checkpoints go to ``run_dir/checkpoints``, metrics to
    ``run_dir/metrics.jsonl``. ``resume=True`` continues from the newest checkpoint there,
    or starts from step 0 if the run never wrote one.
    """
    run_dir = Path(run_dir)
    ckpt_dir = run_dir / CHECKPOINTS
    recipe = recipe or DefaultRecipe()
    if not isinstance(optimizers, Mapping):
        optimizers = {"main": optimizers}
    names = list(optimizers)
    # The learning rate of step s is a function of s and the rate each group was created
    # with; read those before a checkpoint's optimizer state overwrites them.
    base_lrs = {n: [g["lr"] for g in optimizers[n].param_groups] for n in names}
    start_step = 0
    train_state = None
    found = latest_checkpoint(ckpt_dir) if resume else None
    if found is not None:
        model_state, train_state = load_checkpoint(found)
        load_into(distiller, model_state, source=f"checkpoint {found}")
        start_step = int(train_state["step"])
    else:
        # Seeds every RNG a step may use (dropout, CRD's negative sampling) the same way on each run.
        torch.manual_seed(settings.seed)

    model, *wrapped = fabric.setup(distiller, *(optimizers[n] for n in names))
    opts = dict(zip(names, wrapped))
    for participant in distiller.frozen():
        participant.setup(fabric)
    if train_state is not None:
        saved = train_state["optimizers"]
        if sorted(saved) != sorted(names):
            raise CheckpointError(f"checkpoint {found} holds optimizers {sorted(saved)} but this run has {sorted(names)}")
        for n in names:
            opts[n].load_state_dict(saved[n])
        set_rng_state(train_state["rng"])

    sampler = StepBatchSampler(
        len(train_set), batch_size=settings.batch_size, accumulate=settings.accumulate, seed=settings.seed,
        start_step=start_step, end_step=settings.steps, rank=fabric.global_rank, world_size=fabric.world_size,
    )
    # A private generator: a DataLoader iterator otherwise draws its base seed from the
    # global RNG, which would shift the RNG stream of a resumed run by one draw.
    loader = DataLoader(train_set, batch_sampler=sampler, collate_fn=collate_batch, generator=torch.Generator())
    is_main = fabric.global_rank == 0
    log = MetricsLog(run_dir / "metrics.jsonl", tensorboard_dir=run_dir / "tensorboard") if is_main else None
    if log is not None:
        log.truncate_after(start_step)

    last_ckpt = found

    def checkpoint(step: int) -> None:
        nonlocal last_ckpt
        if is_main:
            state = {"step": step, "optimizers": {n: opts[n].state_dict() for n in names}, "rng": rng_state(),
                     "seed": settings.seed}
            last_ckpt = save_checkpoint(ckpt_dir, step, distiller.state_dict(), state, keep=settings.keep_checkpoints)
        fabric.barrier()

    batches = iter(loader)

    def micro_batches(step: int) -> Iterator[dict]:
        for _ in range(settings.accumulate):
            batch = fabric.to_device(next(batches))
            for transform in transforms:
                batch = transform(batch, step=step, distiller=distiller)
            yield batch

    model.train()
    sums: dict[str, torch.Tensor | float] = {}
    count = 0
    t0 = time.perf_counter()
    bar = tqdm(
        total=settings.steps, initial=start_step, desc=settings.description, dynamic_ncols=True,
        disable=None if (settings.progress and is_main) else True, mininterval=0.5,
    )
    try:
        for step in range(start_step, settings.steps):
            for n in names:
                for group, base in zip(opts[n].param_groups, base_lrs[n]):
                    group["lr"] = lr_at(step, base_lr=base, total_steps=settings.steps, schedule=settings.lr_schedule,
                                        warmup_steps=settings.warmup_steps)
            checked: list[float] = []

            def guard(result, step=step) -> float:
                checked.append(_checked_loss(fabric, result, step, last_ckpt))  # a host sync: once per update
                return checked[-1]

            ctx = StepContext(fabric=fabric, model=model, distiller=distiller, optimizers=opts,
                              micro_batches=micro_batches(step), step=step, accumulate=settings.accumulate,
                              guard=guard, grad_clip=settings.grad_clip)
            result = recipe.step(ctx)
            if not checked:
                raise RuntimeError(f"recipe {type(recipe).__name__} returned without calling ctx.guard(...) before its updates")
            sums["loss"] = sums.get("loss", 0.0) + sum(checked)
            for name, value in result.parts.items():
                key = f"loss/{name}"
                sums[key] = value if key not in sums else sums[key] + value
            count += 1
            done = step + 1
            bar.update(1)
            if done % settings.log_every == 0 or done == settings.steps:
                row = {"step": done, **{k: float(v) / count for k, v in sums.items()}, "lr": opts[names[0]].param_groups[0]["lr"],
                       "time_s": round(time.perf_counter() - t0, 3)}
                bar.set_postfix(loss=f"{row['loss']:.4f}")
                if log is not None:
                    log.log(row)
                sums, count = {}, 0
            if evaluate is not None and settings.eval_every and done % settings.eval_every == 0 and is_main:
                model.eval()
                scores = evaluate()
                model.train()
                if log is not None:
                    log.log({"step": done, **{f"eval/{k}": v for k, v in scores.items()}})
            if done % settings.checkpoint_every == 0 or done == settings.steps:
                checkpoint(done)
    finally:
        bar.close()
        if log is not None:
            log.close()
    return FitResult(steps=settings.steps, wall_time_s=time.perf_counter() - t0, resumed_from=start_step, last_checkpoint=last_ckpt)


def _checked_loss(fabric, result, step: int, last_ckpt: Path | None) -> float:
    """The step's loss as a float; stops training (before any update) if it is not finite on any rank."""
    loss_value = float(result.loss)
    bad = not math.isfinite(loss_value)
    if fabric.world_size > 1:
        # Every rank must stop together, or the others would wait forever in all-reduce.
        bad = fabric.all_reduce(torch.tensor(float(bad), device=fabric.device), reduce_op="sum").item() > 0
    if not bad:
        return loss_value
    culprits = [f"{name}={float(v):.4g}" for name, v in result.parts.items() if not torch.isfinite(v).all()]
    where = f"in term(s) {', '.join(culprits)}" if culprits else "in the weighted sum of terms"
    keep = (
        f"The last good checkpoint is {last_ckpt}; `--resume` continues from it (lower optim.lr or set "
        "train.grad_clip first)."
        if last_ckpt is not None
        else "No checkpoint was written before this step."
    )
    raise NonFiniteLossError(
        f"the loss became non-finite ({loss_value:.4g}) at step {step + 1} {where}, on process "
        f"{fabric.global_rank}. Training stopped before applying that update. {keep}",
        step=step + 1,
        last_checkpoint=last_ckpt,
    )
