"""The one place that turns a :class:`~transfuse.config.RunConfig` into objects.

Every component (models, losses, the Distiller, the engine) takes typed arguments; only
the functions here read config sections and hand those arguments over.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch
from torch import nn

from .checkpoint import load_into, load_weights
from .config import DataConfig, DistillConfig, FabricConfig, ModelConfig, OptimConfig, RunConfig, TrainConfig
from .data import DATASETS, DataSplits, stratified_subset
from .distiller import LOGITS, Term, probe_shapes
from .engine import FitSettings
from .losses import LOSSES
from .models import build_model
from .optim import make_optimizer
from .schedules import SCHEDULES, Constant

#: Term input names that stand for a model's declared tap points.
TAP_ROLES = {"feature": "feature_layer", "hint": "hint_layer"}


def make_fabric(cfg: FabricConfig):
    """A launched Lightning Fabric for the configured devices, strategy and precision."""
    from lightning_fabric import Fabric

    strategy: Any = cfg.strategy
    if cfg.strategy == "ddp":
        from lightning_fabric.strategies import DDPStrategy

        # Losses with learnable parts that a step does not touch would otherwise hang DDP.
        strategy = DDPStrategy(find_unused_parameters=False)
    fabric = Fabric(
        accelerator=cfg.accelerator, devices=cfg.devices, strategy=strategy, precision=cfg.precision, num_nodes=cfg.num_nodes
    )
    fabric.launch()
    return fabric


def load_data(cfg: DataConfig) -> tuple[DataSplits, torch.utils.data.Dataset]:
    """The data set's splits, and the student's training set (a stratified label subset if asked)."""
    splits = DATASETS.get(cfg.name)(**cfg.options)
    student_train = splits.train
    if cfg.label_subset is not None:
        if cfg.label_subset > len(splits.train):
            raise ValueError(f"data.label_subset is {cfg.label_subset} but {cfg.name} has only {len(splits.train)} training samples")
        student_train = stratified_subset(splits.train, cfg.label_subset, seed=cfg.subset_seed)
    return splits, student_train


def make_model(cfg: ModelConfig, splits: DataSplits, *, role: str) -> nn.Module:
    """Build a zoo model for the data's input shape and classes; load ``weights`` if given."""
    model = build_model(cfg.name, input_shape=splits.input_shape, num_classes=splits.num_classes, **cfg.options)
    if cfg.weights:
        load_into(model, load_weights(cfg.weights, what=f"{role}.weights"), source=f"{role}.weights {cfg.weights!r}")
    return model


def resolve_tap(key: str, model: nn.Module, *, role: str, default: str) -> str:
    """``auto`` -> the method's default input; ``feature``/``hint`` -> the model's declared module path."""
    if key == "auto":
        key = default
    if key == LOGITS:
        return LOGITS
    if key in TAP_ROLES:
        path = getattr(model, TAP_ROLES[key], None)
        if not path:
            raise ValueError(
                f"the {role} model ({type(model).__name__}) declares no default {key!r} tap; set "
                f"distill.{role}_layer (or the term's `{role}:`) to a module path"
            )
        return path
    return key


def make_terms(
    cfg: DistillConfig,
    student: nn.Module,
    teacher_model: nn.Module | None,
    probe_batch: dict[str, torch.Tensor],
    *,
    num_train_samples: int,
) -> list[Term]:
    """The Distiller's terms, each loss sized by one probe forward pass of both models."""
    specs = []
    for tc in cfg.resolved_terms():
        entry = LOSSES.entry(tc.loss)
        default = entry.meta["inputs"]
        s_key = resolve_tap(tc.student, student, role="student", default=default)
        t_key = None
        if entry.obj.uses_teacher:
            t_key = resolve_tap(tc.teacher, teacher_model, role="teacher", default=default)
        specs.append((tc, entry, s_key, t_key))

    s_shapes = probe_shapes(student, [s for _, _, s, _ in specs if s != LOGITS], probe_batch, role="student")
    t_shapes = {}
    if teacher_model is not None and any(t for *_, t in specs):
        t_shapes = probe_shapes(teacher_model, [t for *_, t in specs if t and t != LOGITS], probe_batch, role="teacher")

    terms, used = [], set()
    for tc, entry, s_key, t_key in specs:
        name = tc.name or tc.loss
        if name in used:
            name = f"{name}_{len(used)}"
        used.add(name)
        loss = entry.obj.from_shapes(
            student_shape=s_shapes[s_key],
            teacher_shape=t_shapes.get(t_key) if t_key else None,
            num_train_samples=num_train_samples,
            **tc.options,
        )
        schedule = SCHEDULES.get(tc.schedule.kind)(**tc.schedule.options) if tc.schedule else Constant()
        weight = entry.meta["weight"] if tc.weight is None else tc.weight
        terms.append(Term(name=name, loss=loss, weight=weight, student_key=s_key, teacher_key=t_key or LOGITS, schedule=schedule))
    return terms


def make_optimizer_from(cfg: OptimConfig, params) -> torch.optim.Optimizer:
    """The configured optimizer over ``params``."""
    return make_optimizer(params, name=cfg.name, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum)


def fit_settings(train: TrainConfig, optim: OptimConfig, *, seed: int, description: str) -> FitSettings:
    """Engine settings from the train and optim sections."""
    return FitSettings(
        steps=train.steps, batch_size=train.batch_size, seed=seed, accumulate=train.accumulate, grad_clip=train.grad_clip,
        base_lr=optim.lr, lr_schedule=optim.schedule, warmup_steps=optim.warmup_steps, log_every=train.log_every,
        checkpoint_every=train.checkpoint_every, keep_checkpoints=train.keep_checkpoints, eval_every=train.eval_every,
        progress=train.progress, description=description,
    )


def teacher_cache_key(cfg: RunConfig) -> str:
    """Content hash of everything that determines a trained teacher (model, its training, the data)."""
    assert cfg.teacher is not None
    what = {
        "model": {"name": cfg.teacher.name, "options": cfg.teacher.options},
        "train": cfg.teacher.train.model_dump(mode="json"),
        "data": {"name": cfg.data.name, "options": cfg.data.options},
        "precision": cfg.fabric.precision,
    }
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]
