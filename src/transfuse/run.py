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
import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from .analysis import accuracy, agreement, expected_calibration_error, predict
from ._version import __version__
from .atomic import write_atomic
from .build import (
    fit_settings, load_data, make_distiller, make_fabric, make_model, make_optimizer_from, make_optimizers, teacher_weights_path,
)
from .checkpoint import latest_checkpoint, load_into, load_weights, save_weights
from .config import RunConfig, config_from_dict
from .distiller import Distiller, Term
from .engine import CHECKPOINTS, fit
from .errors import UserError
from .losses import LOSSES
from .participants import Participant
from .recipes import make_recipe
from .transforms import make_transform

SUMMARY = "summary.json"
CONFIG = "config.yaml"
#: Config fields a resumed run may change: what the non-finite-loss advice tells users to change.
RESUME_MAY_CHANGE = ("optim.lr", "participants.*.optim.lr", "train.grad_clip", "train.progress")


class RunDirError(UserError, FileExistsError):
    """A run directory that already holds a different or finished run."""


def run(cfg: RunConfig, *, out_dir: str | Path | None = None, resume: bool = False, quiet: bool = False) -> dict[str, Any]:
    """Train the configured trainable participants (and, if needed, frozen ones first) and
    return the summary.

    ``out_dir`` defaults to ``runs/<name>``. With ``resume=True`` the run continues from
    the newest checkpoint in ``out_dir`` (the config must equal the saved one); a folder
    whose run never reached its first checkpoint is started again from step 0.
    """
    out = Path(out_dir) if out_dir is not None else Path("runs") / cfg.name
    fabric = make_fabric(cfg.fabric)
    t_start = time.perf_counter()

    # Everything knowable from the config and the data is checked here, before any write.
    splits, train_set = load_data(cfg.data)
    distiller = make_distiller(cfg, splits, train_set)
    optimizers = make_optimizers(cfg, distiller)
    settings = fit_settings(cfg.train, cfg.optim, seed=cfg.seed, description=f"{cfg.name}",
                            **({"progress": False} if quiet else {}))

    # Under DDP every process runs this function; only rank 0 touches the folder, and its
    # verdict is shared so that no process is left waiting for one that failed.
    problem = None
    if fabric.global_rank == 0:
        try:
            _prepare_run_dir(out, cfg, resume=resume)
        except RunDirError as err:
            problem = str(err)
    problem = fabric.broadcast(problem, src=0)
    if problem:
        raise RunDirError(problem)

    for participant in distiller.frozen():
        name = participant.name
        if not cfg.participants[name].weights:
            weights = obtain_teacher_weights(cfg, name, splits, fabric, quiet=quiet)
            load_into(participant.model, load_weights(weights, what=f"trained {name}"), source=f"trained {name} {weights}")

    def evaluate() -> dict[str, float]:
        scores = {}
        for name, model in distiller.models.items():
            logits, targets = predict(model, splits.test, batch_size=cfg.train.eval_batch_size, device=fabric.device)
            scores[f"{name}/accuracy"] = accuracy(logits, targets)
            scores[f"{name}/ece"] = expected_calibration_error(logits, targets)
        return scores

    result = fit(fabric, distiller, optimizers, train_set, settings, run_dir=out, resume=resume, evaluate=evaluate,
                 recipe=make_recipe(cfg.recipe.name, **cfg.recipe.options),
                 transforms=[make_transform(t.name, **t.options) for t in cfg.transforms])

    summary: dict[str, Any] = {}
    if fabric.global_rank == 0:
        for name, model in distiller.models.items():
            save_weights(out / f"{name}.safetensors", model.state_dict())
        summary = _summarise(cfg, distiller, splits, fabric.device, len(train_set), _num_labelled(train_set))
        summary.update(steps=result.steps, resumed_from=result.resumed_from, wall_time_s=round(time.perf_counter() - t_start, 3),
                       train_wall_time_s=round(result.wall_time_s, 3))
        write_atomic(out / SUMMARY, json.dumps(summary, indent=2) + "\n")
    fabric.barrier()
    return summary


def obtain_teacher_weights(cfg: RunConfig, name: str, splits, fabric, *, quiet: bool = False) -> Path:
    """The weights file of frozen participant ``name``: trained now (on the full training
    split, from labels) unless an earlier run with the same recipe cached it."""
    weights = teacher_weights_path(cfg, name)
    if not fabric.broadcast(weights.is_file(), src=0):
        _train_teacher(cfg, name, splits, fabric, weights, quiet=quiet)
    return weights


def _train_teacher(cfg: RunConfig, name: str, splits, fabric, weights: Path, *, quiet: bool) -> None:
    pcfg = cfg.participants[name]
    torch.manual_seed(pcfg.train.seed)
    model = make_model(pcfg.model_copy(update={"weights": None}), splits, role=name)
    ce = LOSSES.get("ce").build()
    distiller = Distiller([Participant(name, model)], [Term(name="ce", loss=ce, input=f"{name}.logits", target=None)])
    optimizer = make_optimizer_from(pcfg.train.optim, distiller.parameters())
    settings = fit_settings(cfg.train, pcfg.train.optim, seed=pcfg.train.seed, description=f"train {name} ({pcfg.name})",
                            steps=pcfg.train.steps, batch_size=pcfg.train.batch_size, accumulate=1,
                            checkpoint_every=pcfg.train.steps, eval_every=0, progress=cfg.train.progress and not quiet)
    # A private work folder per process: two runs that need the same teacher at once each
    # train it, and the atomic rename of the weights makes the last one win harmlessly.
    work = weights.with_name(f".work-{weights.stem}-{os.getpid()}")
    fit(fabric, distiller, optimizer, splits.train, settings, run_dir=work)
    if fabric.global_rank == 0:
        save_weights(weights, model.state_dict(), metadata={"transfuse_version": __version__})
        shutil.rmtree(work, ignore_errors=True)
    fabric.barrier()


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
            "accuracy": accuracy(logits[name], targets),
            "ece": expected_calibration_error(logits[name], targets),
        }
    trainable = [n for n in entries if entries[n]["trainable"]]
    frozen = [n for n in entries if not entries[n]["trainable"]]
    student = "student" if "student" in trainable else trainable[0]
    teacher = "teacher" if "teacher" in frozen else (frozen[0] if frozen else None)
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
        "agreement": agreement(logits[student], logits[teacher]) if teacher else None,
        "participants": entries,
        "cached": sorted(n for n, p in cfg.participants.items() if p.cache),
        "learned_weights": {name: dict(zip(src.inputs, src.weights().tolist())) for name, src in distiller.learned.items()},
    }
    summary.update(transfuse_version=__version__, torch_version=torch.__version__, git_commit=_git_commit())
    return summary


def _prepare_run_dir(out: Path, cfg: RunConfig, *, resume: bool) -> None:
    saved = out / CONFIG
    if resume:
        if not saved.is_file():
            raise RunDirError(f"--resume: {str(out)!r} holds no run ({CONFIG} is missing); check --out")
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
        return  # the engine continues from the newest checkpoint, or from step 0 if there is none
    if latest_checkpoint(out / CHECKPOINTS) is not None or (out / SUMMARY).exists():
        raise RunDirError(
            f"{str(out)!r} already holds a run with checkpoints; pass --resume to continue it, or choose another --out"
        )
    # A new folder, or one whose run never reached its first checkpoint (nothing worth keeping).
    out.mkdir(parents=True, exist_ok=True)
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
