"""The run configuration: typed, validated at load time, YAML in and out.

``load_config(path, overrides)`` reads YAML with ``yaml.safe_load`` (no tags, no code),
applies ``--set a.b=c`` overrides, and validates everything -- field names, types, and
every name and option that points into a registry (methods, models, data sets,
schedules) -- so a typo fails before any training starts, naming the field path and
what was expected.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

NO_DISTILLATION = "none"


class ConfigError(ValueError):
    """A config that does not validate; the message names the file, the field and what was expected."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class OptimConfig(_Strict):
    """Optimizer and learning-rate schedule."""

    name: Literal["sgd", "adam", "adamw"] = "adam"
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    schedule: Literal["constant", "cosine"] = "constant"
    warmup_steps: int = Field(0, ge=0)


class ModelConfig(_Strict):
    """A model from the zoo (``transfuse.models``), optionally initialised from a safetensors file."""

    name: str
    options: dict[str, Any] = Field(default_factory=dict)
    weights: str | None = None

    @model_validator(mode="after")
    def _known(self) -> "ModelConfig":
        from .models import MODELS
        MODELS.check_options(self.name, self.options, where="options")
        return self


class TeacherTrainConfig(_Strict):
    """How to train the teacher when no ``weights`` file is given (cached by content hash)."""

    steps: int = Field(1000, ge=1)
    batch_size: int = Field(128, ge=1)
    seed: int = 0
    optim: OptimConfig = Field(default_factory=OptimConfig)


class TeacherConfig(ModelConfig):
    """The teacher: loaded from ``weights``, or trained once on the full training split and cached."""

    train: TeacherTrainConfig = Field(default_factory=TeacherTrainConfig)
    cache_dir: str = ".cache/transfuse/teachers"


class DataConfig(_Strict):
    """A registered data set, and how much of its training split the student sees."""

    name: str = "digits"
    options: dict[str, Any] = Field(default_factory=dict)
    label_subset: int | None = Field(None, ge=1, description="student trains on this many labelled samples (class-stratified); the teacher on all")
    subset_seed: int = 0

    @model_validator(mode="after")
    def _known(self) -> "DataConfig":
        from .data import DATASETS
        DATASETS.check_options(self.name, self.options, where="options")
        return self


class ScheduleConfig(_Strict):
    """A term-weight schedule (``transfuse.schedules``)."""

    kind: str = "constant"
    options: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _known(self) -> "ScheduleConfig":
        from .schedules import SCHEDULES
        SCHEDULES.check_options(self.kind, self.options, where="options")
        return self


class TermConfig(_Strict):
    """One loss term. ``student``/``teacher``: ``"logits"``, ``"feature"`` (the model's
    penultimate embedding), ``"hint"`` (its intermediate map), a module path, or ``"auto"``
    (what the method compares by default)."""

    loss: str
    name: str | None = None
    weight: float | None = None
    options: dict[str, Any] = Field(default_factory=dict)
    student: str = "auto"
    teacher: str = "auto"
    schedule: ScheduleConfig | None = None

    @model_validator(mode="after")
    def _known(self) -> "TermConfig":
        from .losses import LOSSES
        LOSSES.check_options(self.loss, self.options, where="options")
        return self


class DistillConfig(_Strict):
    """What the student learns from.

    Short form: ``method`` (a registered loss, or ``none`` for training from labels only)
    plus its ``options``; a CE term is added with the method's default ``ce_weight``.
    Long form: an explicit list of ``terms`` (then ``method`` must be left out).
    """

    method: str | None = None
    options: dict[str, Any] = Field(default_factory=dict)
    weight: float | None = None
    ce_weight: float | None = None
    warmup_steps: int = Field(0, ge=0, description="linear warm-up of the distillation term (DKD uses it)")
    student_layer: str = "auto"
    teacher_layer: str = "auto"
    terms: list[TermConfig] | None = None

    @model_validator(mode="after")
    def _known(self) -> "DistillConfig":
        from .losses import LOSSES

        if self.terms is not None and self.method is not None:
            raise ValueError("give either `method` (short form) or `terms` (long form), not both")
        if self.terms is None:
            method = self.method or "kd"
            if method != NO_DISTILLATION:
                LOSSES.check_options(method, self.options, where="options")
            elif self.options:
                raise ValueError("method 'none' takes no options")
        return self

    def resolved_terms(self) -> list[TermConfig]:
        """The long form: the explicit terms, or the short form expanded with the registry's defaults."""
        from .losses import LOSSES

        if self.terms is not None:
            return list(self.terms)
        method = self.method or "kd"
        if method == NO_DISTILLATION:
            return [TermConfig(loss="ce", weight=self.ce_weight if self.ce_weight is not None else 1.0)]
        meta = LOSSES.entry(method).meta
        ce_weight = meta["ce_weight"] if self.ce_weight is None else self.ce_weight
        terms = []
        if ce_weight > 0 and method != "ce":
            terms.append(TermConfig(loss="ce", weight=ce_weight))
        schedule = (
            ScheduleConfig(kind="warmup", options={"steps": self.warmup_steps}) if self.warmup_steps else None
        )
        terms.append(
            TermConfig(
                loss=method,
                weight=self.weight,
                options=self.options,
                student=self.student_layer,
                teacher=self.teacher_layer,
                schedule=schedule,
            )
        )
        return terms


class TrainConfig(_Strict):
    """The training loop. ``batch_size`` is the global micro-batch (split across devices);
    one optimizer step sees ``batch_size * accumulate`` samples."""

    steps: int = Field(1000, ge=1)
    batch_size: int = Field(64, ge=1)
    accumulate: int = Field(1, ge=1)
    grad_clip: float | None = Field(None, gt=0)
    log_every: int = Field(50, ge=1)
    checkpoint_every: int = Field(500, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    eval_every: int = Field(0, ge=0, description="evaluate on the test split every N steps (0: only at the end)")
    eval_batch_size: int = Field(512, ge=1)
    progress: bool = True


class FabricConfig(_Strict):
    """Devices, precision and distribution, handed to Lightning Fabric."""

    accelerator: str = "cpu"
    devices: int | str = 1
    strategy: str = "auto"
    precision: str = "32-true"
    num_nodes: int = Field(1, ge=1)


class RunConfig(_Strict):
    """Everything one ``transfuse run`` needs."""

    name: str = "run"
    seed: int = 0
    data: DataConfig = Field(default_factory=DataConfig)
    student: ModelConfig
    teacher: TeacherConfig | None = None
    distill: DistillConfig = Field(default_factory=DistillConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    fabric: FabricConfig = Field(default_factory=FabricConfig)

    @model_validator(mode="after")
    def _teacher_when_needed(self) -> "RunConfig":
        from .losses import LOSSES

        users = [t.loss for t in self.distill.resolved_terms() if LOSSES.get(t.loss).uses_teacher]
        if users and self.teacher is None:
            raise ValueError(f"distill uses {users}, which learn from a teacher, but no `teacher:` section is given")
        return self

    def to_yaml(self) -> str:
        """The resolved config as YAML (every default written out)."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


# ----------------------------------------------------------------------------- loading


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.steps=200"`` -> ``(["train", "steps"], 200)``; the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. --set train.steps=200")
    key, raw = text.split("=", 1)
    path = [p for p in key.strip().split(".")]
    if not all(path):
        raise ConfigError(f"--set {text!r}: empty part in key {key!r}")
    return path, yaml.safe_load(raw) if raw.strip() else None


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set each ``a.b.c=value`` into the nested dict ``data`` (list items by index)."""
    for text in overrides:
        path, value = parse_override(text)
        node: Any = data
        for i, part in enumerate(path[:-1]):
            where = ".".join(path[: i + 1])
            if isinstance(node, list):
                node = node[_index(part, node, where)]
                continue
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
            if not isinstance(node, (dict, list)):
                raise ConfigError(f"--set {text!r}: {where} is a value, not a section")
        last = path[-1]
        if isinstance(node, list):
            node[_index(last, node, ".".join(path))] = value
        else:
            node[last] = value
    return data


def _index(part: str, node: list, where: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(f"--set: {where}: expected a list index below {len(node)}, got {part!r}")
    return int(part)


def config_from_dict(data: dict[str, Any], *, source: str = "config") -> RunConfig:
    """Validate a plain dict; errors name ``source`` and each failing field path."""
    try:
        return RunConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source)) from None


def load_config(path: str | os.PathLike, overrides: list[str] | None = None) -> RunConfig:
    """Read, override and validate a YAML run config."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML (only plain YAML is accepted, no tags): {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    return config_from_dict(apply_overrides(data, overrides or []), source=str(path))


def format_validation_error(err: ValidationError, source: str) -> str:
    """One line per problem: ``source: a.b.c: what was expected``."""
    lines = [f"{source}: invalid config ({err.error_count()} problem{'s' if err.error_count() > 1 else ''}):"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            msg = f"unknown field{_valid_fields(e['loc'])}"
        else:
            msg = e["msg"].removeprefix("Value error, ")
            if "input" in e and e["type"] not in ("missing",) and not isinstance(e["input"], (dict, list)):
                msg += f" (got {e['input']!r})"
        lines.append(f"  {loc}: {msg}")
    return "\n".join(lines)


def _valid_fields(loc: tuple) -> str:
    model: Any = RunConfig
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return ""
        model = _model_of(field.annotation)
        if model is None:
            return ""
    return f"; valid fields here: {', '.join(model.model_fields)}"


def _model_of(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = _model_of(arg)
        if found is not None:
            return found
    return None
