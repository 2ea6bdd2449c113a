"""``run(config)``: one whole distillation run, from config to run directory.

Run directory layout::

    config.yaml        the resolved config (every default written out)
    metrics.jsonl      one row per log interval (and per evaluation)
    checkpoints/       atomic periodic checkpoints (student + loss state, optimizer, RNG)
    student.safetensors  the final student weights
    summary.json       accuracies, ECE, agreement, steps, time, seed, versions
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from . import __version__
from .analysis import accuracy, agreement, expected_calibration_error, predict
from .atomic import write_atomic
from .build import (
    fit_settings, load_data, make_fabric, make_model, make_optimizer_from, make_terms, teacher_cache_key,
)
from .checkpoint import load_into, load_weights, save_weights
from .config import RunConfig, TermConfig, config_from_dict
from .data.base import first_batch
from .distiller import Distiller, Term
from .engine import fit
from .losses import LOSSES
from .teacher import Teacher

SUMMARY = "summary.json"
CONFIG = "config.yaml"


class RunDirError(FileExistsError):
    """A run directory that already holds a different or finished run."""


def run(cfg: RunConfig, *, out_dir: str | Path | None = None, resume: bool = False, quiet: bool = False) -> dict[str, Any]:
    """Train the configured student (and, if needed, the teacher) and return the summary.

    ``out_dir`` defaults to ``runs/<name>``. With ``resume=True`` the run continues from
    the newest checkpoint in ``out_dir``; the config must equal the saved one.
    """
    out = Path(out_dir) if out_dir is not None else Path("runs") / cfg.name
    fabric = make_fabric(cfg.fabric)
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
    t_start = time.perf_counter()

    splits, student_train = load_data(cfg.data)
    needs_teacher = any(LOSSES.get(t.loss).uses_teacher for t in cfg.distill.resolved_terms())
    teacher_model = obtain_teacher(cfg, splits, fabric, quiet=quiet) if needs_teacher else None

    torch.manual_seed(cfg.seed)  # the student's initial weights depend on the run's seed only
    student = make_model(cfg.student, splits, role="student")
    terms = make_terms(cfg.distill, student, teacher_model, first_batch(student_train), num_train_samples=len(student_train))
    teacher = Teacher(teacher_model) if teacher_model is not None else None
    distiller = Distiller(student, teacher, terms)
    optimizer = make_optimizer_from(cfg.optim, distiller.parameters())
    settings = fit_settings(cfg.train, cfg.optim, seed=cfg.seed, description=f"{cfg.name} student")
    if quiet:
        settings = dataclasses.replace(settings, progress=False)

    def evaluate() -> dict[str, float]:
        logits, targets = predict(student, splits.test, batch_size=cfg.train.eval_batch_size, device=fabric.device)
        return {"accuracy": accuracy(logits, targets), "ece": expected_calibration_error(logits, targets)}

    result = fit(fabric, distiller, optimizer, student_train, settings, run_dir=out, resume=resume, evaluate=evaluate)

    summary: dict[str, Any] = {}
    if fabric.global_rank == 0:
        save_weights(out / "student.safetensors", student.state_dict())
        summary = _summarise(cfg, student, teacher_model, splits, fabric.device, terms, len(student_train))
        summary.update(steps=result.steps, resumed_from=result.resumed_from, wall_time_s=round(time.perf_counter() - t_start, 3),
                       train_wall_time_s=round(result.wall_time_s, 3))
        write_atomic(out / SUMMARY, json.dumps(summary, indent=2) + "\n")
    fabric.barrier()
    return summary


def obtain_teacher(cfg: RunConfig, splits, fabric, *, quiet: bool = False) -> torch.nn.Module:
    """The teacher model: from ``teacher.weights``, from the cache, or trained now (on the
    full training split, from labels) and cached by content hash for later runs."""
    assert cfg.teacher is not None
    if cfg.teacher.weights:
        return make_model(cfg.teacher, splits, role="teacher")
    key = teacher_cache_key(cfg)
    cache = Path(cfg.teacher.cache_dir)
    weights = cache / f"{cfg.teacher.name}-{key}.safetensors"
    if not fabric.broadcast(weights.is_file(), src=0):
        _train_teacher(cfg, splits, fabric, weights, quiet=quiet)
    model = make_model(cfg.teacher.model_copy(update={"weights": None}), splits, role="teacher")
    load_into(model, load_weights(weights, what="cached teacher"), source=f"cached teacher {weights}")
    return model


def _train_teacher(cfg: RunConfig, splits, fabric, weights: Path, *, quiet: bool) -> None:
    tcfg = cfg.teacher
    assert tcfg is not None
    torch.manual_seed(tcfg.train.seed)
    model = make_model(tcfg.model_copy(update={"weights": None}), splits, role="teacher")
    ce = LOSSES.get("ce")()
    distiller = Distiller(model, None, [Term(name="ce", loss=ce)])
    optimizer = make_optimizer_from(tcfg.train.optim, distiller.parameters())
    train = cfg.train.model_copy(update={"steps": tcfg.train.steps, "batch_size": tcfg.train.batch_size, "accumulate": 1,
                                         "checkpoint_every": tcfg.train.steps, "eval_every": 0, "progress": cfg.train.progress and not quiet})
    settings = fit_settings(train, tcfg.train.optim, seed=tcfg.train.seed, description=f"teacher {tcfg.name}")
    # A private work folder per process: two runs that need the same teacher at once each
    # train it, and the atomic rename of the weights makes the last one win harmlessly.
    work = weights.with_name(f".work-{weights.stem}-{os.getpid()}")
    fit(fabric, distiller, optimizer, splits.train, settings, run_dir=work)
    if fabric.global_rank == 0:
        save_weights(weights, model.state_dict(), metadata={"transfuse_version": __version__})
        shutil.rmtree(work, ignore_errors=True)
    fabric.barrier()


def _summarise(cfg, student, teacher_model, splits, device, terms, n_train) -> dict[str, Any]:
    s_logits, targets = predict(student, splits.test, batch_size=cfg.train.eval_batch_size, device=device)
    summary: dict[str, Any] = {
        "name": cfg.name,
        "method": "custom" if cfg.distill.terms is not None else (cfg.distill.method or "kd"),
        "terms": {t.name: t.weight for t in terms},
        "seed": cfg.seed,
        "data": cfg.data.name,
        "student_train_samples": n_train,
        "student": {
            "model": cfg.student.name,
            "params": sum(p.numel() for p in student.parameters()),
            "accuracy": accuracy(s_logits, targets),
            "ece": expected_calibration_error(s_logits, targets),
        },
        "teacher": None,
        "agreement": None,
    }
    if teacher_model is not None:
        t_logits, _ = predict(teacher_model, splits.test, batch_size=cfg.train.eval_batch_size, device=device)
        summary["teacher"] = {
            "model": cfg.teacher.name,
            "params": sum(p.numel() for p in teacher_model.parameters()),
            "accuracy": accuracy(t_logits, targets),
            "ece": expected_calibration_error(t_logits, targets),
        }
        summary["agreement"] = agreement(s_logits, t_logits)
    summary.update(transfuse_version=__version__, torch_version=torch.__version__, git_commit=_git_commit())
    return summary


def _prepare_run_dir(out: Path, cfg: RunConfig, *, resume: bool) -> None:
    saved = out / CONFIG
    if resume:
        if not saved.is_file():
            raise RunDirError(f"--resume: {str(out)!r} holds no run ({CONFIG} is missing); check --out")
        old = config_from_dict(yaml.safe_load(saved.read_text()), source=str(saved))
        diff = _diff(old.model_dump(mode="json"), cfg.model_dump(mode="json"))
        diff = [d for d in diff if d.split(":")[0] not in ("train.progress",)]
        if diff:
            raise RunDirError(
                f"--resume: the config differs from the one {str(out)!r} was started with ({'; '.join(diff[:8])}); "
                "a resumed run must use the same config"
            )
        return
    if saved.exists():
        raise RunDirError(
            f"{str(out)!r} already holds a run; pass --resume to continue it, or choose another --out"
        )
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
