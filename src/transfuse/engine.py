"""The one training loop, on Lightning Fabric.

``fit(fabric, distiller, optimizers, train_set, settings, run_dir=...)`` trains any
:class:`~transfuse.distiller.Distiller` (a student learning from a teacher, two peers
learning from each other, a model learning from labels alone) for ``settings.steps``
optimizer steps, handing the inner step to a :class:`~transfuse.recipes.Recipe`:

* devices, precision and DDP come from the ``Fabric`` it is given;
* the data order is a pure function of ``(seed, step)`` (:class:`StepBatchSampler`), so a
  run resumed from step ``k`` sees exactly the batches an uninterrupted run sees after
  ``k``; with RNG and optimizer state restored, CPU resumes are bit-identical. A recipe
  with ``sample_weights(step)`` draws each step's samples by those weights instead (DDK's
  domain re-weighting), still a pure function of ``(seed, step, weights)``;
* a recipe with ``state_dict()``/``load_state_dict()`` is checkpointed with the run and
  restored on resume; one with ``pop_metrics()`` has what it returns logged as its own row;
* ``accumulate`` micro-batches make one optimizer step, each scaled by ``1/accumulate``
  (token rows: by its share of the step's predicted positions), so the gradient equals the
  one of a single batch of ``batch_size * accumulate``;
* a non-finite loss stops training before the bad update, keeping the last good
  checkpoint, and says at which step, in which term and -- when the batch itself holds
  NaN/inf values -- in which samples it happened;
* ``resume=True`` continues from the newest checkpoint that loads, warning about newer
  damaged ones it skips; leftovers of killed processes are removed at start;
* progress goes to stderr: a bar on a terminal, a plain line every
  ``progress_every_s`` seconds elsewhere (CI logs, ``| tee``);
* the host synchronises once per optimizer step (the loss, for that check); the loss
  parts stay on the device and are read only every ``log_every`` steps.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence, TextIO

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .checkpoint import (
    CheckpointError, load_into, load_latest_checkpoint, remove_leftovers, rng_state, save_checkpoint, set_rng_state,
)
from .data.base import collate_batch
from .distiller import Distiller
from .errors import UserError
from .metrics_log import MetricsLog
from .optim import lr_at
from .progress import Progress
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
    (with ``warmup_steps``) from the rate it was created with. ``progress``: report on
    stderr (``description`` names the phase); where stderr is not a terminal, as a line
    every ``progress_every_s`` seconds."""

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
    progress_every_s: float = 10.0


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

    ``weights``: optional ``weights(step) -> Tensor (n,) | None``, non-negative per-sample
    weights. Where it returns a tensor, step ``s`` instead draws its ``batch_size *
    accumulate`` indices with replacement in proportion to them, from a generator seeded by
    ``(seed, s)`` alone; where it returns None, the step is the permutation slice above.
    It is called when step ``s``'s first micro-batch is requested: a ``DataLoader`` with
    ``num_workers=0`` asks lazily, so weights a recipe changes at the start of its step
    (before it pulls that step's micro-batches) apply to that very step.
    """

    def __init__(
        self, n: int, *, batch_size: int, accumulate: int = 1, seed: int = 0, start_step: int = 0,
        end_step: int, rank: int = 0, world_size: int = 1, weights: Callable[[int], torch.Tensor | None] | None = None,
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
        self.weights = weights

    def epoch_order(self, epoch: int) -> torch.Tensor:
        """The permutation of sample indices for ``epoch``."""
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.n, generator=gen)

    def weighted_draw(self, step: int, weights: torch.Tensor) -> torch.Tensor:
        """Step ``step``'s ``batch_size * accumulate`` indices, drawn with replacement in
        proportion to ``weights`` ``(n,)``: a function of ``(seed, step, weights)`` only."""
        weights = torch.as_tensor(weights).detach().to("cpu", torch.float64)
        if weights.shape != (self.n,) or not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()) \
                or not float(weights.sum()) > 0:
            raise ValueError(f"sample weights of step {step}: expected {self.n} finite non-negative values with a "
                             f"positive sum; got shape {tuple(weights.shape)}")
        # Its own stream (odd seeds), apart from the epochs' permutations (seed * 1_000_003 + epoch).
        gen = torch.Generator().manual_seed(2 * (self.seed * 1_000_003 + step) + 1)
        per_step = self.batch_size * self.accumulate
        if self.n <= 2**24:
            return torch.multinomial(weights, per_step, replacement=True, generator=gen)
        # torch.multinomial takes at most 2**24 categories; past that, the inverse of the cumulative weights.
        cumulative = weights.cumsum(0)
        return torch.searchsorted(cumulative, torch.rand(per_step, generator=gen, dtype=torch.float64) * cumulative[-1],
                                  right=True).clamp(max=self.n - 1)

    def __len__(self) -> int:
        return (self.end_step - self.start_step) * self.accumulate

    def __iter__(self) -> Iterator[list[int]]:
        per_step = self.batch_size * self.accumulate
        shard = self.batch_size // self.world_size
        epoch, order = -1, torch.empty(0, dtype=torch.long)
        for step in range(self.start_step, self.end_step):
            # Asked here, when the step's first micro-batch is requested, not before (see the class docstring).
            weights = self.weights(step) if self.weights is not None else None
            if weights is not None:
                chunk = self.weighted_draw(step, weights)
            else:
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
    progress_stream: TextIO | None = None,
) -> FitResult:
    """Train ``distiller`` for ``settings.steps`` optimizer steps; see the module docstring.

    ``optimizers``: one optimizer, or one per trainable group by name (e.g. per
    participant). ``recipe`` defaults to :class:`~transfuse.recipes.DefaultRecipe`;
    ``transforms`` run on each micro-batch between device transfer and the forward pass.
    ``evaluate`` (optional) is called every ``settings.eval_every`` steps on rank 0 and its
    numbers are logged. Checkpoints go to ``run_dir/checkpoints``, metrics to
    ``run_dir/metrics.jsonl``. ``resume=True`` continues from the newest checkpoint there
    that loads (a damaged newer one is skipped with a
    :class:`~transfuse.checkpoint.CheckpointFallbackWarning`), or starts from step 0 if
    the run never wrote one. ``progress_stream`` replaces stderr for the progress report.
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
    is_main = fabric.global_rank == 0
    start_step = 0
    train_state = None
    found = None
    # Every process loads the checkpoint; one warning about skipped ones is enough.
    loaded = load_latest_checkpoint(ckpt_dir, warn=is_main) if resume else None
    if loaded is not None:
        found, train_state = loaded.path, loaded.train_state
        load_into(distiller, loaded.model_state, source=f"checkpoint {found}")
        start_step = train_state["step"]
        missing = [k for k in ("optimizers", "rng") if k not in train_state]
        if missing:
            raise CheckpointError(
                f"checkpoint state {str(found / 'state.pt')!r} lacks {missing}, so it was not written by transfuse's "
                f"training loop; move {str(found)!r} out of {str(ckpt_dir)!r} to resume from an older checkpoint"
            )
    else:
        # Seeds every RNG a step may use (dropout, CRD's negative sampling) the same way on each run.
        torch.manual_seed(settings.seed)
    if is_main:
        # After loading, so that a damaged checkpoint is reported before anything is removed.
        remove_leftovers(ckpt_dir)

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
        if hasattr(recipe, "load_state_dict"):
            if "recipe" not in train_state:
                raise CheckpointError(f"checkpoint {found} holds no state of recipe {type(recipe).__name__}, which "
                                      "keeps state across steps; it was written by a run with another recipe")
            recipe.load_state_dict(train_state["recipe"])
        set_rng_state(train_state["rng"])

    sampler = StepBatchSampler(
        len(train_set), batch_size=settings.batch_size, accumulate=settings.accumulate, seed=settings.seed,
        start_step=start_step, end_step=settings.steps, rank=fabric.global_rank, world_size=fabric.world_size,
        weights=getattr(recipe, "sample_weights", None),
    )
    # A private generator: a DataLoader iterator otherwise draws its base seed from the
    # global RNG, which would shift the RNG stream of a resumed run by one draw.
    loader = DataLoader(train_set, batch_sampler=sampler, collate_fn=collate_batch, generator=torch.Generator())
    log = MetricsLog(run_dir / "metrics.jsonl", tensorboard_dir=run_dir / "tensorboard") if is_main else None
    if log is not None:
        log.truncate_after(start_step)

    last_ckpt = found

    def checkpoint(step: int) -> None:
        nonlocal last_ckpt
        if is_main:
            state = {"step": step, "optimizers": {n: opts[n].state_dict() for n in names}, "rng": rng_state(),
                     "seed": settings.seed}
            if hasattr(recipe, "state_dict"):  # tensors, lists, numbers: what weights_only loading accepts
                state["recipe"] = recipe.state_dict()
            last_ckpt = save_checkpoint(ckpt_dir, step, distiller.state_dict(), state, keep=settings.keep_checkpoints)
        fabric.barrier()

    batches = iter(loader)

    def micro_batches(step: int, seen: list[tuple[dict, dict]]) -> Iterator[dict]:
        for _ in range(settings.accumulate):
            raw = next(batches)
            batch = fabric.to_device(raw)
            for transform in transforms:
                batch = transform(batch, step=step, distiller=distiller)
            # Kept (until the step ends) for the non-finite check, which inspects them only
            # when the loss is bad; holding them costs the step's inputs, not activations.
            seen.append((raw, batch))
            yield batch

    model.train()
    sums: dict[str, torch.Tensor | float] = {}
    count = 0
    t0 = time.perf_counter()
    progress = Progress(total=settings.steps, initial=start_step, description=settings.description,
                        enabled=settings.progress and is_main, stream=progress_stream, interval_s=settings.progress_every_s)
    try:
        for step in range(start_step, settings.steps):
            for n in names:
                for group, base in zip(opts[n].param_groups, base_lrs[n]):
                    group["lr"] = lr_at(step, base_lr=base, total_steps=settings.steps, schedule=settings.lr_schedule,
                                        warmup_steps=settings.warmup_steps)
            checked: list[float] = []
            seen: list[tuple[dict, dict]] = []

            def guard(result, step=step, seen=seen) -> float:
                # A host sync: once per update.
                checked.append(_checked_loss(fabric, result, step, last_ckpt, batches=seen, distiller=distiller))
                return checked[-1]

            ctx = StepContext(fabric=fabric, model=model, distiller=distiller, optimizers=opts,
                              micro_batches=micro_batches(step, seen), step=step, accumulate=settings.accumulate,
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
            progress.update(done, sum(checked))
            # What the recipe measured during this step (DDK's domain weights): a row of its own, at
            # this step, so that an update is logged once whatever log_every is (and not twice on resume).
            extra = recipe.pop_metrics() if hasattr(recipe, "pop_metrics") else {}
            if extra and log is not None:
                log.log({"step": done, **extra})
            if done % settings.log_every == 0 or done == settings.steps:
                row = {"step": done, **{k: float(v) / count for k, v in sums.items()}, "lr": opts[names[0]].param_groups[0]["lr"],
                       "time_s": round(time.perf_counter() - t0, 3)}
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
        progress.close()
        if log is not None:
            log.close()
    return FitResult(steps=settings.steps, wall_time_s=time.perf_counter() - t0, resumed_from=start_step, last_checkpoint=last_ckpt)


def _checked_loss(
    fabric, result, step: int, last_ckpt: Path | None, *, batches: Sequence[tuple[Mapping, Mapping]] = (),
    distiller: Distiller | None = None,
) -> float:
    """The step's loss as a float; stops training (before any update) if it is not finite on any rank.

    ``batches``: the step's micro-batches as ``(as loaded, as fed to the model)`` pairs and
    ``distiller`` (for the terms' weights) are read only on the bad path, to name the
    likeliest cause: NaN/inf in the data, a non-finite term weight, or training diverging.
    """
    loss_value = float(result.loss)
    bad = not math.isfinite(loss_value)
    if fabric.world_size > 1:
        # Every rank must stop together, or the others would wait forever in all-reduce.
        bad = fabric.all_reduce(torch.tensor(float(bad), device=fabric.device), reduce_op="sum").item() > 0
    if not bad:
        return loss_value
    culprits = [f"{name}={float(v):.4g}" for name, v in result.parts.items() if not torch.isfinite(v).all()]
    if math.isfinite(loss_value):  # only under DDP: the bad loss is another process's
        where = "on another process"
        cause = "This process's loss is finite; the other process's message names the cause."
    else:
        where = f"in term(s) {', '.join(culprits)}" if culprits else "in the weighted sum of terms"
        cause = _non_finite_cause(result, step, batches, distiller, culprits=bool(culprits))
    keep = (
        f"The last good checkpoint is {last_ckpt}; `--resume` continues from it once the cause is fixed."
        if last_ckpt is not None
        else "No checkpoint was written before this step."
    )
    raise NonFiniteLossError(
        f"the loss became non-finite ({loss_value:.4g}) at step {step + 1} {where}, on process "
        f"{fabric.global_rank}. {cause} Training stopped before applying that update. {keep}",
        step=step + 1,
        last_checkpoint=last_ckpt,
    )


def _non_finite_cause(result, step: int, batches, distiller: Distiller | None, *, culprits: bool) -> str:
    """The likeliest reason for a non-finite loss, as advice; evidence in the data first,
    since no learning-rate change can fix a NaN in the inputs."""
    in_fed = _non_finite_entries([fed for _, fed in batches])
    if in_fed:
        in_raw = _non_finite_entries([raw for raw, _ in batches])
        if in_raw:
            return (f"The step's batch holds non-finite values: {in_raw}. Fix or filter those samples in the data; "
                    "a lower learning rate will not help.")
        return (f"The batch transforms produced non-finite values: {in_fed} (the data itself is finite). "
                "Check the transforms' options.")
    if not culprits:
        weights = _term_weights(distiller, step, result.parts)
        odd = {n: w for n, w in weights.items() if not math.isfinite(w)}
        check = "check distill.weight, distill.ce_weight and each term's weight and schedule"
        if odd:
            shown = ", ".join(f"{n}={w:.4g}" for n, w in odd.items())
            return f"Every term is finite but the weight of {shown} at this step is not; {check}."
        if not weights:
            return f"Every term is finite, so a term's weight may be non-finite; {check}."
        shown = ", ".join(f"{n}={w:.4g}" for n, w in weights.items())
        return (f"Every term and weight ({shown}) is finite, so their weighted sum overflowed: the loss grew too "
                "large, usually because training diverged; lower optim.lr or set train.grad_clip, or train in "
                "higher precision.")
    return ("The batch is finite, so training most likely diverged: lower optim.lr or set train.grad_clip "
            "(a loss that cannot handle some input, e.g. an empty mask, is another possibility).")


def _term_weights(distiller: Distiller | None, step: int, parts: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Each reported term's effective weight at ``step`` (weight times schedule), as the Distiller computes it."""
    if distiller is None:
        return {}
    weights = {}
    for term in distiller.terms:
        if term.name in parts:
            try:
                weights[term.name] = float(term.weight * term.schedule.factor(step))
            except Exception:  # a diagnosis must not hide the error it diagnoses
                weights[term.name] = float("nan")
    return weights


def _non_finite_entries(batches: Sequence[Mapping]) -> str:
    """``"`input` in 3 sample(s) (sample ids [4, 9, 17])"`` for every floating-point batch
    entry holding NaN/inf, or ``""`` when all are finite. Samples are named by their
    ``sample_id``, else their ``index``, else their row in the micro-batch."""
    found: dict[str, tuple[str, list[int]]] = {}
    for batch in batches:
        if not isinstance(batch, Mapping):
            continue
        label, ids = "micro-batch rows", None
        for key, name in (("index", "dataset indices"), ("sample_id", "sample ids")):  # the last found wins
            if isinstance(batch.get(key), torch.Tensor) and batch[key].dim() == 1:
                label, ids = name, batch[key]
        for key, value in batch.items():
            if not (isinstance(value, torch.Tensor) and value.is_floating_point() and value.dim() > 0):
                continue
            bad = ~torch.isfinite(value.detach()).reshape(value.shape[0], -1).all(dim=1)
            if not bad.any():
                continue
            rows = bad.nonzero().flatten()
            use_ids = ids is not None and len(ids) == len(bad)
            named = ids[rows.to(ids.device)].tolist() if use_ids else rows.tolist()
            found.setdefault(key, (label if use_ids else "micro-batch rows", []))[1].extend(named)
    described = []
    for key, (label, rows) in found.items():
        shown = ", ".join(str(r) for r in rows[:8]) + (", ..." if len(rows) > 8 else "")
        described.append(f"`{key}` in {len(rows)} sample(s) ({label} [{shown}])")
    return "; ".join(described)
