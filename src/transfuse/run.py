"""``run(config)``: one whole distillation run, from config to run directory.

Order of work: everything that can be checked (data, models, references, shapes, loss
options) is checked first, with nothing written; then the run folder is claimed; then
frozen participants without weights are trained (and cached by content hash); then the
trainable participants are trained; then they are evaluated.

Run directory layout::

    config.yaml           the resolved config (every default written out)
    metrics.jsonl         one row per log interval (and per evaluation)
    checkpoints/          atomic periodic checkpoints (trainable participants + loss state, optimizers, RNG)
    <name>.safetensors    the final weights of each trainable participant (student.safetensors, ...)
    summary.json          accuracies, ECE, agreement, steps, time, seed, versions
"""

from __future__ import annotations

import fnmatch
import inspect
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from .analysis import accuracy, agreement, expected_calibration_error, predict, token_agreement, token_scores
from ._version import __version__
from .atomic import write_atomic
from .build import (
    check_batches, fit_settings, load_student_data, make_distiller, make_fabric, make_model, make_optimizer_from, make_optimizers, teacher_train_set, teacher_weights_path,
)
from .checkpoint import CheckpointError, latest_checkpoint, load_into, load_weights, save_weights
from .config import RunConfig, config_from_dict
from .data.text import IGNORE_INDEX
from .distiller import Distiller, Term
from .engine import CHECKPOINTS, fit
from .losses import LOSSES
from .participants import Participant
from .recipes import RECIPES, make_recipe
from .rundir import FolderLock, RunDirError, disk_errors
from .transforms import make_transform
from . import ddk  # noqa: F401  (registers the ddk recipe)

SUMMARY = "summary.json"
CONFIG = "config.yaml"
#: Config fields a resumed run may change: what the non-finite-loss advice tells users to change.
RESUME_MAY_CHANGE = ("optim.lr", "participants.*.optim.lr", "train.grad_clip", "train.progress")


#: Written at a run's start: the hash of every frozen participant's weights, so that a
#: resumed run notices a teacher file replaced in between.
FROZEN = "frozen.json"


def run(cfg: RunConfig, *, out_dir: str | Path | None = None, resume: bool = False, quiet: bool = False) -> dict[str, Any]:
    """Train the configured trainable participants (and, if needed, frozen ones first) and
    return the summary.

    ``out_dir`` defaults to ``runs/<name>``. With ``resume=True`` the run continues from
    the newest checkpoint in ``out_dir`` (the config must equal the saved one); a folder
    whose run never reached its first checkpoint (or that does not exist) is started from
    step 0. The folder is locked for the run's life: a second process gets a clear error.
    """
    out = Path(out_dir) if out_dir is not None else Path("runs") / cfg.name
    fabric = make_fabric(cfg.fabric)
    t_start = time.perf_counter()
    say = _Say(quiet=quiet or fabric.global_rank != 0)

    # Everything knowable from the config and the data is checked here, before any write.
    splits, train_set, holdout = load_student_data(cfg.data)
    check_batches(cfg, splits, train_set, world_size=fabric.world_size)
    recipe = build_recipe(cfg.recipe.name, cfg.recipe.options, holdout=holdout, seed=cfg.seed, train=train_set)
    distiller = make_distiller(cfg, splits, train_set)
    optimizers = make_optimizers(cfg, distiller)
    settings = fit_settings(cfg.train, cfg.optim, seed=cfg.seed, description=f"{cfg.name}",
                            **({"progress": False} if quiet else {}))

    # Under DDP every process runs this function; only rank 0 touches the folder, and its
    # verdict is shared so that no process is left waiting for one that failed.
    problem, lock = None, None
    if fabric.global_rank == 0:
        try:
            lock = FolderLock(out)
            _prepare_run_dir(out, cfg, resume=resume, say=say)
        except RunDirError as err:
            problem = str(err)
            if lock is not None:
                lock.release()
    problem = fabric.broadcast(problem, src=0)
    if problem:
        raise RunDirError(problem)

    try:
        with disk_errors(out, advice="Free space (or fix the permissions), then rerun the same command with --resume."):
            return _train_and_summarise(cfg, fabric, distiller, optimizers, settings, splits, train_set, out,
                                        recipe=recipe, resume=resume, quiet=quiet, say=say, t_start=t_start)
    finally:
        if lock is not None:
            lock.release()


def _train_and_summarise(cfg, fabric, distiller, optimizers, settings, splits, train_set, out: Path, *, recipe, resume: bool,
                         quiet: bool, say, t_start: float) -> dict[str, Any]:
    for participant in distiller.frozen():
        name = participant.name
        if not cfg.participants[name].weights:
            weights = obtain_teacher_weights(cfg, name, splits, fabric, quiet=quiet)
            try:
                state = load_weights(weights, what=f"trained {name}")
            except CheckpointError as err:
                raise CheckpointError(f"{err}. It is the cached {name} this run trained earlier: delete the file and "
                                      f"the next run trains {name} again") from None
            load_into(participant.model, state, source=f"trained {name} {weights}")
    if fabric.global_rank == 0:
        _check_frozen_weights(out, cfg, [p.name for p in distiller.frozen()], resume=resume)

    def evaluate() -> dict[str, float]:
        scores = {}
        for name, model in distiller.models.items():
            logits, targets = predict(model, splits.test, batch_size=cfg.train.eval_batch_size, device=fabric.device)
            scores.update({f"{name}/{k}": v for k, v in test_scores(logits, targets, splits.test).items()})
        return scores

    trained = ", ".join(distiller.trainable_names)
    say(f"training {trained} for {settings.steps} steps ({cfg.method_name}) in {out}")
    result = fit(fabric, distiller, optimizers, train_set, settings, run_dir=out, resume=resume, evaluate=evaluate,
                 recipe=recipe,
                 transforms=[make_transform(t.name, **t.options) for t in cfg.transforms])

    summary: dict[str, Any] = {}
    if fabric.global_rank == 0:
        for name, model in distiller.models.items():
            save_weights(out / f"{name}.safetensors", model.state_dict())
            if hasattr(model, "save_pretrained"):  # a Hugging Face model: also the folder plain transformers loads
                _save_pretrained(model, out / f"{name}-hf")
        summary = _summarise(cfg, distiller, splits, fabric.device, len(train_set), _num_labelled(train_set))
        summary.update(steps=result.steps, resumed_from=result.resumed_from, wall_time_s=round(time.perf_counter() - t_start, 3),
                       train_wall_time_s=round(result.wall_time_s, 3), threads=torch.get_num_threads())
        summary = finite_or_none(summary)
        write_atomic(out / SUMMARY, json.dumps(summary, indent=2, allow_nan=False) + "\n")
    fabric.barrier()
    return summary


def build_recipe(name: str, options: dict[str, Any], *, holdout: Any = None, seed: int = 0, train: Any = None):
    """The configured recipe; one whose ``__init__`` takes ``holdout`` (and ``seed``, and
    ``train``) gets the held-out labelled samples of ``data.holdout_fraction`` (and the
    run's seed, to draw its batches from as a function of the step, so a resumed run draws
    the same ones; and the student's training set, in the engine's sample order, for a
    recipe that weights its samples, such as DDK by their domain)."""
    params = inspect.signature(RECIPES.get(name).__init__).parameters
    if "train" in params and "train" in options:
        raise ValueError(f"recipe.options.train: recipe {name!r} is given the run's training set; leave train out")
    extras = {}
    if "holdout" in params and holdout is not None:
        extras["holdout"] = holdout
    if "seed" in params and "seed" not in options:
        extras["seed"] = seed
    if "train" in params and train is not None:
        extras["train"] = train
    return make_recipe(name, **options, **extras)


def finite_or_none(value: Any) -> Any:
    """``value`` with every NaN/inf float replaced by None, so that it is strict JSON (an
    accuracy over an empty split or an ECE of non-finite logits has no value)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return value


class _Say:
    """Phase lines on stderr (stdout carries the CLI's JSON result), unless quiet."""

    def __init__(self, *, quiet: bool) -> None:
        self.quiet = quiet

    def __call__(self, message: str) -> None:
        if not self.quiet:
            print(f"transfuse: {message}", file=sys.stderr, flush=True)


def obtain_teacher_weights(cfg: RunConfig, name: str, splits, fabric, *, quiet: bool = False) -> Path:
    """The weights file of frozen participant ``name``: trained now (on the full training
    split, from labels) unless an earlier run with the same recipe cached it. Training is
    checkpointed in a work folder beside the weights, so a killed run resumes it."""
    weights = teacher_weights_path(cfg, name)
    if not fabric.broadcast(weights.is_file(), src=0):
        say = _Say(quiet=quiet or fabric.global_rank != 0)
        with disk_errors(weights.parent, advice="Free space (or fix the permissions, or set the participant's cache_dir), "
                         "then rerun; the teacher's training resumes from its last checkpoint."):
            _train_teacher(cfg, name, splits, fabric, weights, quiet=quiet, say=say)
    return weights


def _train_teacher(cfg: RunConfig, name: str, splits, fabric, weights: Path, *, quiet: bool, say) -> None:
    pcfg = cfg.participants[name]
    # One work folder per teacher recipe (the weights' name holds its content hash), locked:
    # a second run needing the same teacher waits for the first and then uses its weights;
    # a killed run leaves checkpoints there that the next run resumes from.
    work = weights.with_name(f".work-{weights.stem}")
    lock = None
    if fabric.global_rank == 0:
        lock = FolderLock(work, what=f"work folder of {name}", wait=True,
                          on_wait=lambda pid: say(f"waiting for process {pid or '?'}, which is training the same {name}"))
    try:
        if fabric.broadcast(weights.is_file(), src=0):
            return  # trained by the process we waited for
        torch.manual_seed(pcfg.train.seed)
        model = make_model(pcfg.model_copy(update={"weights": None}), splits, role=name)
        if pcfg.train.steps == 0:  # a pretrained model used as loaded: its weights in transfuse's naming, once
            say(f"using {name} ({pcfg.name}) as loaded from {pcfg.options['path']}; its weights are cached as {weights}")
            if fabric.global_rank == 0:
                save_weights(weights, model.state_dict(), metadata={"transfuse_version": __version__})
            fabric.barrier()
            return
        ce = LOSSES.get("ce").build()
        distiller = Distiller([Participant(name, model)], [Term(name="ce", loss=ce, input=f"{name}.logits", target=None)])
        optimizer = make_optimizer_from(pcfg.train.optim, distiller.parameters())
        settings = fit_settings(cfg.train, pcfg.train.optim, seed=pcfg.train.seed, description=f"train {name} ({pcfg.name})",
                                steps=pcfg.train.steps, batch_size=pcfg.train.batch_size, accumulate=1,
                                checkpoint_every=min(cfg.train.checkpoint_every, pcfg.train.steps), eval_every=0,
                                progress=cfg.train.progress and not quiet)
        found = latest_checkpoint(work / CHECKPOINTS)
        again = f", resuming from {found.name} of a run that stopped" if found is not None else ""
        say(f"training {name} ({pcfg.name}) from labels for {pcfg.train.steps} steps{again}; it is cached as {weights}")
        fit(fabric, distiller, optimizer, teacher_train_set(pcfg, splits, role=name), settings, run_dir=work, resume=True)
        if fabric.global_rank == 0:
            save_weights(weights, model.state_dict(), metadata={"transfuse_version": __version__})
            shutil.rmtree(work, ignore_errors=True)
        fabric.barrier()
    finally:
        if lock is not None:
            lock.release()


def _check_frozen_weights(out: Path, cfg: RunConfig, names: list[str], *, resume: bool) -> None:
    """Record the hash of each frozen participant's weights when a run starts; on resume,
    refuse weights that changed since (a resumed run would silently learn from another teacher)."""
    from .cache import file_sha256

    now = {name: {"weights": str(teacher_weights_path(cfg, name)), "sha256": file_sha256(teacher_weights_path(cfg, name))}
           for name in names}
    record = out / FROZEN
    if resume and record.is_file():
        before = json.loads(record.read_text())
        changed = [n for n in now if n in before and before[n]["sha256"] != now[n]["sha256"]]
        if changed:
            detail = "; ".join(f"{n}: {now[n]['weights']}" for n in changed)
            raise RunDirError(
                f"--resume: the weights of frozen participant(s) {', '.join(changed)} changed since this run started "
                f"({detail}; sha256 {before[changed[0]]['sha256'][:12]}... then, {now[changed[0]]['sha256'][:12]}... now). "
                f"Restore the original file, or start a new run with another --out"
            )
        return
    write_atomic(record, json.dumps(now, indent=2) + "\n")


def _num_labelled(train_set) -> int:
    return int(getattr(train_set, "num_labelled", len(train_set)))


def _summarise(cfg: RunConfig, distiller: Distiller, splits, device, n_train: int, n_labelled: int) -> dict[str, Any]:
    logits: dict[str, torch.Tensor] = {}
    entries: dict[str, dict[str, Any]] = {}
    targets = None
    for name, participant in distiller.participants.items():
        model = participant.model
        logits[name], targets = predict(model, splits.test, batch_size=cfg.train.eval_batch_size, device=device)
        entries[name] = {
            "model": cfg.participants[name].name,
            "trainable": participant.trainable,
            "params": sum(p.numel() for p in model.parameters()),
            **test_scores(logits[name], targets, splits.test),
        }
    trainable = [n for n in entries if entries[n]["trainable"]]
    frozen = [n for n in entries if not entries[n]["trainable"]]
    student = "student" if "student" in trainable else trainable[0]
    # The participant named `teacher` even when it trains too (online KD: bdkd), else the first frozen one.
    teacher = "teacher" if "teacher" in entries and student != "teacher" else (frozen[0] if frozen else None)
    summary: dict[str, Any] = {
        "name": cfg.name,
        "method": cfg.method_name,
        "terms": {t.name: t.weight for t in distiller.terms},
        "seed": cfg.seed,
        "data": cfg.data.name,
        "student_train_samples": n_train,
        "student_labelled_samples": n_labelled,
        "student": entries[student],
        "teacher": entries.get(teacher) if teacher else None,
        "agreement": (token_agreement(logits[student], logits[teacher], targets) if targets.dim() > 1 else
                      agreement(logits[student], logits[teacher])) if teacher else None,
        "participants": entries,
        "cached": sorted(n for n, p in cfg.participants.items() if p.cache),
        "learned_weights": {name: dict(zip(src.inputs, src.weights().tolist())) for name, src in distiller.learned.items()},
        # Label-only teachers: the queries spent of each budget.
        "queries": {name: {"spent": src.spent, "budget": src.budget} for name, src in distiller.stateful.items()
                    if hasattr(src, "budget")},
    }
    summary.update(transfuse_version=__version__, torch_version=torch.__version__, git_commit=_git_commit())
    return summary


def _save_pretrained(model: Any, folder: Path) -> None:
    """``model.save_pretrained`` into ``folder``, written beside it first and then renamed,
    so a killed run never leaves a half-written model folder."""
    tmp = folder.with_name(f".tmp-{folder.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


def test_scores(logits: torch.Tensor, targets: torch.Tensor, test_set: Any) -> dict[str, float]:
    """A model's scores on the test split: ``accuracy`` and ``ece`` of a classifier; for a
    language model (logits ``(N, T, V)``) the same over the predicted tokens plus ``nll``
    and ``perplexity``, and ``kl_to_truth`` where the data know their true next-token
    distribution (``markov``)."""
    if logits.dim() == 2:
        return {"accuracy": accuracy(logits, targets), "ece": expected_calibration_error(logits, targets)}
    scores = token_scores(logits, targets)
    chains = getattr(test_set, "chains", None)
    if chains is not None:
        rows = test_set.__getitems__(list(range(len(test_set))))
        scores["kl_to_truth"] = float(chains.kl_to_truth(logits, rows["input_ids"], rows.get("domain"),
                                                         rows["labels"] != IGNORE_INDEX))
    return scores


def _prepare_run_dir(out: Path, cfg: RunConfig, *, resume: bool, say) -> None:
    saved = out / CONFIG
    found = latest_checkpoint(out / CHECKPOINTS)
    if resume and saved.is_file():
        old = config_from_dict(yaml.safe_load(saved.read_text()), source=str(saved))
        diff = _diff(old.model_dump(mode="json"), cfg.model_dump(mode="json"))
        fixed = [d for d in diff if not any(fnmatch.fnmatchcase(d.split(":")[0], p) for p in RESUME_MAY_CHANGE)]
        if fixed:
            raise RunDirError(
                f"--resume: the config differs from the one {str(out)!r} was started with ({'; '.join(fixed[:8])}); "
                f"a resumed run must use the same config (only {', '.join(RESUME_MAY_CHANGE)} may change)"
            )
        if diff:  # a lower learning rate or a gradient clip after a non-finite loss: recorded
            write_atomic(saved, cfg.to_yaml())
        if found is None:
            say(f"--resume: {out} holds no checkpoint yet; starting from step 0")
        return  # the engine continues from the newest checkpoint, or from step 0 if there is none
    if (out / SUMMARY).exists() and not resume:
        raise RunDirError(
            f"{str(out)!r} holds a finished run ({SUMMARY} is there); choose another --out, or delete the folder to "
            "run it again"
        )
    if found is not None:
        if resume:  # checkpoints but no config.yaml: not a folder this version of transfuse wrote
            raise RunDirError(f"--resume: {str(out)!r} holds checkpoints but no {CONFIG}; it cannot be resumed. "
                              "Choose another --out")
        raise RunDirError(
            f"{str(out)!r} holds a run interrupted at {found.name}; pass --resume to continue it, or choose another --out"
        )
    # A new folder, or one whose run never reached its first checkpoint (nothing worth keeping).
    if resume:
        say(f"--resume: {out} holds no run yet; starting from step 0")
    for leftover in (out / FROZEN, out / "metrics.jsonl"):
        leftover.unlink(missing_ok=True)
    write_atomic(saved, cfg.to_yaml())


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k), b.get(k), f"{prefix}.{k}" if prefix else k)
        return out
    return [] if a == b else [f"{prefix}: {a!r} -> {b!r}"]


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None
