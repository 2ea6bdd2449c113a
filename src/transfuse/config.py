"""The run configuration: typed, validated at load time, YAML in and out.

``load_config(path, overrides)`` reads YAML with ``yaml.safe_load`` (no tags, no code),
applies ``--set a.b=c`` overrides, and validates everything -- field names, types, and
every name and option that points into a registry (methods, models, data sets,
schedules) -- so a typo fails before any training starts, naming the field path and
what was expected.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from .errors import UserError

NO_DISTILLATION = "none"


class ConfigError(UserError, ValueError):
    """A config that does not validate; the message names the file, the field and what was expected."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_booleans_as_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        # pydantic's lax mode reads YAML's `true` as 1 for an int field, so
        # `--set train.steps=true` would silently train one step.
        if isinstance(value, bool) and info.field_name is not None:
            kinds = _leaf_types(cls.model_fields[info.field_name].annotation)
            if bool not in kinds and kinds & {int, float}:
                raise ValueError("expected a number, not a boolean")
        return value


def _leaf_types(annotation: Any) -> set[Any]:
    """The plain types inside an annotation (``int | str`` -> ``{int, str}``)."""
    args = get_args(annotation)
    if not args:
        return {annotation}
    if getattr(annotation, "__metadata__", None) is not None:  # Annotated[int, ...]
        return _leaf_types(args[0])
    out: set[Any] = set()
    for arg in args:
        out |= _leaf_types(arg)
    return out


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
        reserved = sorted({"input_shape", "num_classes"} & set(self.options))
        if reserved:
            raise ValueError(
                f"options: {', '.join(reserved)} come from the data set and cannot be set here "
                "(every participant is built for the data's input shape and classes)"
            )
        return self


class TeacherTrainConfig(_Strict):
    """How a frozen participant without ``weights`` is trained first, from labels (cached by content hash).

    ``steps: 0`` uses the participant as loaded, which only a model that loads pretrained
    weights itself (``options.path``) can be; it is the default for those."""

    steps: int = Field(1000, ge=0)
    batch_size: int = Field(128, ge=1)
    seed: int = 0
    optim: OptimConfig = Field(default_factory=OptimConfig)
    classes: list[Annotated[int, Field(ge=0)]] | None = Field(
        None, min_length=1, description="train only on the training samples of these classes (a specialist, or a "
        "model of the known classes); its head keeps every class")
    domains: list[Annotated[int, Field(ge=0)]] | None = Field(
        None, min_length=1, description="train only on the training samples of these domains (a data set with domains)")

    @field_validator("classes", "domains")
    @classmethod
    def _distinct(cls, values: list[int] | None) -> list[int] | None:
        if values is not None and len(set(values)) != len(values):
            raise ValueError(f"each value may appear once; got {values}")
        return values


class ParticipantConfig(ModelConfig):
    """A named model of the run.

    ``trainable: true`` (a student, a peer): optimised with ``optim`` (default: the run's
    top-level ``optim``) and checkpointed. ``trainable: false`` (a teacher): frozen; loaded
    from ``weights``, or trained first on the full training split (``train``) and cached in
    ``cache_dir`` by content hash; with ``cache`` it is not loaded or run at all, and its
    outputs are read from a teacher-output cache folder (``transfuse cache-teacher``).
    A frozen model that loads its own pretrained weights (``options.path``, e.g. a
    ``save_pretrained`` folder) is used as loaded unless ``train`` is given: its default
    ``train.steps`` is 0.
    """

    trainable: bool = True
    optim: OptimConfig | None = None
    train: TeacherTrainConfig = Field(default_factory=TeacherTrainConfig)
    cache_dir: str | None = Field(
        None, description="folder of trained teachers (default: the per-user cache, see transfuse.paths.teacher_cache_dir)")
    cache: str | None = None

    @model_validator(mode="after")
    def _roles(self) -> "ParticipantConfig":
        if self.trainable and self.cache:
            raise ValueError("cache: only a frozen participant (trainable: false) can be answered from a teacher-output cache")
        if not self.trainable and self.optim is not None:
            raise ValueError("optim: a frozen participant (trainable: false) is never optimised")
        if not self.trainable and self.loads_pretrained and "train" not in self.model_fields_set:
            # A pretrained teacher is the point of distilling it: trained again from labels
            # by default, it would be replaced by a model of the run's own data.
            self.train = TeacherTrainConfig(steps=0)
        if self.train.steps == 0 and not self.loads_pretrained and not self.weights:
            raise ValueError("train.steps: 0 (use the participant as loaded) needs a model that loads pretrained "
                             "weights (options.path) or a weights file; this one would stay randomly initialised")
        return self

    @property
    def loads_pretrained(self) -> bool:
        """Whether the model loads pretrained weights itself (``options.path``, a local folder)."""
        return bool(self.options.get("path"))


class EnsembleConfig(_Strict):
    """A source that combines other sources: ``mean_probs`` (weighted mean of the members'
    probabilities at ``temperature``), ``mean_logits``, ``learned`` (``mean_probs`` with
    weights ``softmax(theta)`` trained by the terms that take the ensemble as their input,
    with ``optim`` or the run's top-level one), or ``most_confident`` (per sample, the
    logits of the member whose probabilities at ``temperature`` are most confident by
    ``criterion``: ``label``, the probability of the sample's label, or ``confidence``,
    the top-1 probability; ties and unlabelled samples go to the first member), or
    ``by_class_group`` (specialists: per sample, the logits of the member whose
    ``train.classes`` contain the sample's label, and ``group``, that member's position;
    unlabelled samples and labels no member covers go to the member with the highest
    top-1 probability), or
    ``label_only`` (one frozen member behind a black-box interface: it answers only its
    top-1 class, ``labels``, and ``answered``, from a budget of ``budget`` queries;
    ``remember``: a sample once answered is answered again for free; ``skip_labelled``:
    no query is spent on a transfer set's labelled samples)."""

    members: list[str] = Field(min_length=1)
    combine: Literal["mean_probs", "mean_logits", "learned", "most_confident", "label_only", "by_class_group"] = "mean_probs"
    temperature: float = Field(1.0, gt=0, allow_inf_nan=False)
    weights: list[Annotated[float, Field(ge=0, allow_inf_nan=False)]] | None = None
    optim: OptimConfig | None = None
    criterion: Literal["label", "confidence"] | None = Field(
        None, description="most_confident only: how a member's confidence is judged (default: label)")
    budget: int | None = Field(None, ge=0, description="label_only only: how many answers (queries) the teacher gives in all")
    remember: bool | None = Field(
        None, description="label_only only: answer a sample already asked about again from memory, for free (default: true)")
    skip_labelled: bool | None = Field(
        None, description="label_only only: spend no query on samples that have labels of their own (default: false)")

    @model_validator(mode="before")
    @classmethod
    def _default_criterion(cls, data: Any) -> Any:
        # Written out in the resolved config, like every other default.
        if isinstance(data, dict) and data.get("combine") == "most_confident" and data.get("criterion") is None:
            data = {**data, "criterion": "label"}
        if isinstance(data, dict) and data.get("combine") == "label_only":
            data = {**data, "remember": True if data.get("remember") is None else data["remember"],
                    "skip_labelled": False if data.get("skip_labelled") is None else data["skip_labelled"]}
        return data

    @model_validator(mode="after")
    def _weights(self) -> "EnsembleConfig":
        if self.combine == "label_only":
            if self.budget is None:
                raise ValueError("budget: a label_only source needs its query budget (budget: 2000, say)")
            if len(self.members) != 1:
                raise ValueError(f"members: a label_only source wraps one frozen teacher; got {len(self.members)}")
            if self.weights is not None or self.temperature != 1.0:
                raise ValueError("weights/temperature: a label_only source answers hard labels; it has neither")
        else:
            given = [k for k in ("budget", "remember", "skip_labelled") if getattr(self, k) is not None]
            if given:
                raise ValueError(f"{', '.join(given)}: only a label_only source (combine: label_only) has them; "
                                 f"combine is {self.combine!r}")
        if self.combine == "most_confident":
            if self.weights is not None:
                raise ValueError("weights: a most_confident source picks one member per sample; it has no weights")
            if len(self.members) < 2:
                raise ValueError("members: a most_confident source chooses between members; give at least two")
        elif self.criterion is not None:
            raise ValueError(f"criterion: only a most_confident source (combine: most_confident) has one; "
                             f"combine is {self.combine!r}")
        if self.combine == "by_class_group" and (self.weights is not None or self.temperature != 1.0):
            raise ValueError("weights/temperature: a by_class_group source picks one member per sample by its label; "
                             "it has neither")
        if self.combine == "learned":
            if self.weights is not None:
                raise ValueError("weights: a learned ensemble learns its weights (they start equal); leave weights out")
        elif self.optim is not None:
            raise ValueError("optim: only a learned ensemble (combine: learned) has parameters to optimise")
        if self.weights is not None and (len(self.weights) != len(self.members) or sum(self.weights) <= 0):
            raise ValueError(f"weights: expected {len(self.members)} non-negative numbers with a positive sum, one per member")
        return self


class TransferDataConfig(_Strict):
    """Another registered data set whose training split serves as unlabelled transfer data."""

    name: str
    options: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _known(self) -> "TransferDataConfig":
        from .data import DATASETS
        DATASETS.check_options(self.name, self.options, where="options")
        return self


class DataConfig(_Strict):
    """A registered data set, how much of its training split the student sees with labels,
    and the unlabelled transfer set.

    ``transfer: rest`` adds the rest of the training split (after ``label_subset``) without
    labels; a ``{name, options}`` section adds another data set's training split. The
    label loss counts only labelled samples; the teacher terms count all.

    ``generations`` (sequence-level KD): a folder written by ``transfuse generate``; its
    rows replace the training split (the test split stays the data set's own). It is
    checked against the data (fingerprint, row length, vocabulary) and the teacher of the
    same name before training.
    """

    name: str = "digits"
    options: dict[str, Any] = Field(default_factory=dict)
    label_subset: int | None = Field(None, ge=1, description="student trains on this many labelled samples (class-stratified); the teacher on all")
    subset_seed: int = 0
    transfer: Literal["rest"] | TransferDataConfig | None = None
    novel_classes: list[Annotated[int, Field(ge=0)]] | None = Field(
        None, min_length=1, description="novel-class discovery: the student's training samples of these classes lose "
        "their labels (they become unlabelled transfer samples); the test split keeps every label")
    holdout_fraction: float | None = Field(
        None, gt=0, lt=1, allow_inf_nan=False, description="this fraction of the labelled training samples "
        "(class-stratified) is kept out of the student's training set and given to a recipe that asks for it (holdout)")
    generations: str | None = Field(
        None, min_length=1, description="sequence-level KD: a folder written by `transfuse generate` from this data "
        "set; its rows (the teacher's continuations of the training rows' prompts) replace the training split the "
        "trainable participants see; the test split stays the data set's own")

    @model_validator(mode="after")
    def _known(self) -> "DataConfig":
        from .data import DATASETS
        DATASETS.check_options(self.name, self.options, where="options")
        if self.generations is not None:
            # The generated rows are the whole training set: a part of the real split (or
            # extra unlabelled data) has no meaning for them.
            given = [k for k in ("label_subset", "transfer", "novel_classes", "holdout_fraction")
                     if getattr(self, k) is not None]
            if given:
                raise ValueError(f"generations: the generated rows replace the whole training split, so {given[0]} "
                                 "(a part of the real training split, or extra data) cannot be combined with them; "
                                 f"leave {given[0]} out")
        if self.transfer == "rest" and self.label_subset is None:
            raise ValueError("transfer: 'rest' means the training samples outside label_subset, so label_subset must be set")
        if self.novel_classes is not None:
            if len(set(self.novel_classes)) != len(self.novel_classes):
                raise ValueError(f"novel_classes: each class may appear once; got {self.novel_classes}")
            if self.transfer is not None:
                raise ValueError("novel_classes: the novel classes' samples already are the unlabelled transfer set; "
                                 "leave transfer out")
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
    """One loss term between two references ``<participant or source>[.<field>]``.

    ``input`` is a trainable participant's output (default ``student``); ``target`` what it
    learns from (default ``teacher`` for losses that read a target). A bare name means the
    loss's default field (``logits``, ``feature`` = penultimate embedding, ``hint`` =
    intermediate map); otherwise name the field: ``teacher.logits``, ``peer.feature``,
    ``student.layers.act1`` (a module path). The target is detached unless
    ``detach_target: false``. ``mask``/``sample_weights`` name batch entries.
    """

    loss: str
    name: str | None = None
    weight: float | None = Field(None, allow_inf_nan=False)
    options: dict[str, Any] = Field(default_factory=dict)
    input: str = "student"
    target: str | None = None
    schedule: ScheduleConfig | None = None
    detach_target: bool = True
    mask: str | None = None
    sample_weights: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _migrate(cls, data: Any) -> Any:
        # Before v2 a term named the side's field only (`student: hint`, `teacher: auto`).
        if isinstance(data, dict) and ("student" in data or "teacher" in data):
            data = dict(data)
            for old, new in (("student", "input"), ("teacher", "target")):
                if old in data:
                    if new in data:
                        raise ValueError(f"give `{new}` (a reference such as {old}.logits), not both `{old}` and `{new}`")
                    value = data.pop(old)
                    data[new] = old if value in (None, "auto") else f"{old}.{value}"
        return data

    @model_validator(mode="after")
    def _known(self) -> "TermConfig":
        from .losses import LOSSES
        LOSSES.check_options(self.loss, self.options, where="options")
        return self

    def refs(self) -> tuple[str, str | None]:
        """``(input, target)`` as full references: a bare name gets the loss's default field
        (``student`` -> ``student.logits``), and a loss that reads a target learns from
        ``teacher`` unless told otherwise; ``target`` is None for a loss without one (``ce``)."""
        from .losses import LOSSES

        spec = LOSSES.get(self.loss)

        def complete(text: str, field: str = spec.inputs) -> str:
            return text if "." in text else f"{text}.{field}"

        # A loss whose target is another field than its input (label_only: the teacher's `labels`).
        target_field = getattr(spec.module, "target_field", spec.inputs)
        return complete(self.input), complete(self.target or "teacher", target_field) if spec.uses_teacher else None


class DistillConfig(_Strict):
    """What the trainable participants learn from.

    Short form: ``method`` -- a registered loss (``kd``, ``dkd``, ...: the student learns
    from the teacher, plus a label CE term with the method's default ``ce_weight``), a
    scheme (``dml``, ``multi_teacher``, ``bdkd``, ``kl_dp``: participants and terms set up
    together), or
    ``none`` (labels only) -- plus its ``options``. Long form: an explicit list of
    ``terms`` (then ``method`` must be left out).
    """

    method: str | None = None
    options: dict[str, Any] = Field(default_factory=dict)
    weight: float | None = Field(None, allow_inf_nan=False)
    ce_weight: float | None = Field(None, ge=0, allow_inf_nan=False)
    warmup_steps: int | None = Field(
        None, ge=0,
        description="linear warm-up of the distillation term over this many steps; null = the method's default "
        "(DKD: the first 1/12 of train.steps, as its official code), 0 = none",
    )
    student_layer: str = "auto"
    teacher_layer: str = "auto"
    terms: list[TermConfig] | None = None

    @model_validator(mode="after")
    def _known(self) -> "DistillConfig":
        from .losses import LOSSES
        from .schemes import SCHEMES

        if self.terms is not None and self.method is not None:
            raise ValueError("give either `method` (short form) or `terms` (long form), not both")
        if self.terms is not None and not self.terms:
            raise ValueError("terms: the list is empty; give at least one term (or use `method:`)")
        if self.terms is None:
            method = self.method or "kd"
            if method == NO_DISTILLATION:
                if self.options:
                    raise ValueError("method 'none' takes no options")
            elif method in SCHEMES:
                SCHEMES.get(method).check(self.options)
            elif method not in LOSSES:
                valid = sorted({*LOSSES.names(), *SCHEMES.names(), NO_DISTILLATION})
                close = difflib.get_close_matches(method, valid, n=1)
                hint = f" Did you mean {close[0]!r}?" if close else ""
                raise ValueError(f"unknown method {method!r}.{hint} Valid methods: {', '.join(valid)}.")
            else:
                LOSSES.check_options(method, self.options, where="options")
        return self


class RecipeConfig(_Strict):
    """The inner training step (``transfuse.recipes``): ``default`` unless a method needs another."""

    name: str = "default"
    options: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _known(self) -> "RecipeConfig":
        from .recipes import RECIPES
        RECIPES.check_options(self.name, self.options, where="options")
        return self


class TransformConfig(_Strict):
    """A batch transform (``transfuse.transforms``), applied before every forward pass."""

    name: str
    options: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _known(self) -> "TransformConfig":
        from .transforms import make_transform

        make_transform(self.name, **self.options)  # a bad option value fails here, at load
        return self


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
    threads: int = Field(
        1, ge=0,
        description="CPU threads per process for PyTorch's own ops (0: PyTorch's default, one per core). One thread "
        "is fastest for small models and never oversubscribes a shared machine; raise it for large convolutions.",
    )


class RunConfig(_Strict):
    """Everything one ``transfuse run`` needs.

    ``participants`` names the run's models (``student``, ``teacher``, ``peer``, ...);
    the pre-v2 top-level ``student:``/``teacher:`` sections are still accepted and become
    ``participants.student`` (trainable) and ``participants.teacher`` (frozen).
    ``sources`` adds ensembles over participants.
    """

    name: str = "run"
    seed: int = 0
    data: DataConfig = Field(default_factory=DataConfig)
    participants: dict[str, ParticipantConfig]
    sources: dict[str, EnsembleConfig] = Field(default_factory=dict)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    fabric: FabricConfig = Field(default_factory=FabricConfig)
    recipe: RecipeConfig = Field(default_factory=RecipeConfig)
    transforms: list[TransformConfig] = Field(default_factory=list)

    @field_validator("name")
    @classmethod
    def _one_path_component(cls, name: str) -> str:
        # The default run folder is runs/<name>: a name with a separator or `..` would
        # write a whole run somewhere else.
        if not name or name in (".", "..") or any(c in name for c in "/\\\0") or name != name.strip():
            raise ValueError(
                f"{name!r} is not a valid run name: it names the folder runs/<name>, so it must be one path "
                "component (no '/', '\\', '..' or surrounding spaces); use --out to choose another place"
            )
        return name

    @model_validator(mode="before")
    @classmethod
    def _migrate(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        participants = dict(data.get("participants") or {})
        for role, trainable in (("student", True), ("teacher", False)):
            if role not in data:
                continue
            section = data.pop(role)
            if section is None:
                continue
            if not isinstance(section, dict):
                raise ValueError(f"{role}: expected a section (name, options, ...), got {section!r}")
            merged = _deep_merge(participants.get(role) or {}, section)
            merged.setdefault("trainable", trainable)
            participants[role] = merged
        if "participants" in data or participants:
            data["participants"] = participants
        _add_original_copy(data, participants)
        return data

    @model_validator(mode="after")
    def _wiring(self) -> "RunConfig":
        for name in [*self.participants, *self.sources]:
            if not name.isidentifier():
                raise ValueError(f"participants/sources: name {name!r} must be an identifier (letters, digits, underscores)")
        clash = sorted(set(self.participants) & set(self.sources))
        if clash:
            raise ValueError(f"sources: {clash} are already participant names")
        if not any(p.trainable for p in self.participants.values()):
            raise ValueError("participants: at least one must be trainable (a student)")
        known = {**self.participants, **self.sources}
        for name, source in self.sources.items():
            for member in source.members:
                if member not in known or member == name:
                    raise ValueError(f"sources.{name}.members: {member!r} is not a participant or another source; "
                                     f"defined: {', '.join(sorted(known))}")
                if source.combine == "label_only" and (member not in self.participants or self.participants[member].trainable):
                    raise ValueError(f"sources.{name}.members: {member!r} is not a frozen participant; a label_only source "
                                     "wraps one teacher (trainable: false)")
                if member in self.sources and self.sources[member].combine == "label_only":
                    raise ValueError(f"sources.{name}.members: {member!r} is a label_only source; it answers hard labels "
                                     "only, for a label_only term's target, not for other sources")
        if self.recipe.name == "alternating" and self.fabric.strategy != "auto" and self.fabric.strategy.startswith(("ddp", "fsdp")):
            raise ValueError("recipe: 'alternating' updates one participant per forward pass, which DDP/FSDP cannot "
                             "synchronise; use recipe 'default' with fabric.strategy " + repr(self.fabric.strategy))
        if self.data.generations is not None:
            cached = [n for n, p in self.participants.items() if p.cache]
            if cached:
                raise ValueError(f"participants.{cached[0]}.cache: a teacher-output cache holds the teacher's outputs on "
                                 "the real training rows, not on the generated rows of data.generations; leave the "
                                 "cache out (the live teacher scores the generated rows)")
        for name, p in self.participants.items():
            subset = [k for k in ("classes", "domains") if getattr(p.train, k) is not None]
            if subset and (p.trainable or p.weights or p.cache):
                raise ValueError(f"participants.{name}.train.{subset[0]}: only a frozen participant that is trained first "
                                 "(trainable: false, no weights, no cache) trains on a subset of the data")
        sources = self.resolved_sources()
        for name, source in sources.items():
            if source.combine == "by_class_group":
                _check_class_groups(name, source.members, self.participants)
        _check_recipe_holdout(self.recipe.name, self.data.holdout_fraction)
        if "holdout" in self.recipe.options:
            raise ValueError("recipe.options.holdout: the held-out samples come from data.holdout_fraction, "
                             "not from an option")
        if "train" in self.recipe.options:
            raise ValueError("recipe.options.train: the run gives the recipe its training set; leave train out")
        for i, term in enumerate(self.resolved_terms()):
            where = f"distill.terms.{i} ({term.name or term.loss})" if self.distill.terms is not None else f"distill.method {self.method_name!r}"
            _check_required_recipe(term.loss, self.recipe.name, where)
            _check_ref(term.input, where, "input", self.participants, sources, trainable=True)
            # Checked as the user wrote it (errors quote it); refs() adds the default field.
            target = (term.target or "teacher") if term.refs()[1] is not None else None
            if target is not None:
                _check_ref(target, where, "target", self.participants, sources, trainable=False)
                source = sources.get(target.split(".", 1)[0])
                field = term.refs()[1].split(".", 1)[1]
                if source is not None and source.combine == "most_confident" and field != "logits":
                    raise ValueError(f"{where}: target {target!r} reads {field!r} of a most_confident source, which "
                                     "answers only 'logits' (it picks each sample's logits from one member)")
                _check_label_only(term, target, field, source, where, sources)
            elif term.loss == "label_only":
                _check_label_only(term, "", "", None, where, sources)
        return self

    @property
    def method_name(self) -> str:
        """``custom`` for the long form, else the short form's method."""
        return "custom" if self.distill.terms is not None else (self.distill.method or "kd")

    def resolved_terms(self) -> list[TermConfig]:
        """The long form: the explicit terms, or the short form expanded by its scheme."""
        from .schemes import expand

        return expand(self.distill, self.participants)[0]

    def resolved_sources(self) -> dict[str, EnsembleConfig]:
        """``sources`` plus any the short form's scheme adds (``multi_teacher``'s ensemble)."""
        from .schemes import expand

        return {**self.sources, **expand(self.distill, self.participants)[1]}

    def to_yaml(self) -> str:
        """The resolved config as YAML (every default written out)."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _check_class_groups(name: str, members: list[str], participants: dict[str, ParticipantConfig]) -> None:
    """A by_class_group source's members: frozen specialists with disjoint ``train.classes``."""
    seen: dict[int, str] = {}
    for member in members:
        p = participants.get(member)
        if p is None or p.trainable or p.train.classes is None:
            raise ValueError(f"sources.{name}.members: {member!r} must be a frozen participant with train.classes (the "
                             "class group it is a specialist for); a by_class_group source routes each sample to the "
                             "member whose classes hold its label")
        for cls in p.train.classes:
            if cls in seen:
                raise ValueError(f"sources.{name}: class {cls} is in the train.classes of both {seen[cls]!r} and "
                                 f"{member!r}; the groups must be disjoint")
            seen[cls] = member


def _check_required_recipe(loss: str, recipe: str, where: str) -> None:
    """A loss that only works inside its own step recipe (``required_recipe`` on its module) names it."""
    from .losses import LOSSES

    if loss not in LOSSES:
        return  # an unknown loss is reported by the term's own check
    required = getattr(LOSSES.get(loss).module, "required_recipe", None)
    if required is not None and recipe != required:
        raise ValueError(f"{where}: loss {loss!r} is trained by its own step; set recipe: {{name: {required}}} "
                         f"(the config has recipe {recipe!r})")


def _check_recipe_holdout(recipe: str, holdout_fraction: float | None) -> None:
    """A recipe that needs held-out data (an ``__init__`` parameter ``holdout`` without a
    default) needs ``data.holdout_fraction``; one that takes none must not be given it."""
    import inspect

    from .recipes import RECIPES

    params = inspect.signature(RECIPES.get(recipe).__init__).parameters
    takes = "holdout" in params
    if takes and params["holdout"].default is inspect.Parameter.empty and holdout_fraction is None:
        raise ValueError(f"data.holdout_fraction: recipe {recipe!r} learns from held-out labelled samples; set "
                         "data.holdout_fraction (0.2, say) to keep that fraction of the training samples out for it")
    if not takes and holdout_fraction is not None:
        raise ValueError(f"data.holdout_fraction: recipe {recipe!r} reads no held-out data, so the held-out samples "
                         "would just be lost to training; leave holdout_fraction out")


#: The frozen copy of the student that ``kl_dp`` keeps learning from where the teacher is not more confident.
ORIGINAL = "original"


def _add_original_copy(data: dict, participants: dict) -> None:
    """``distill.method: kl_dp`` without a participant ``original``: add it as a frozen copy
    of ``student``'s section (same model, options and ``weights``), so that the resolved
    config lists it. A config that gives ``original`` itself keeps it (the scheme then
    checks that it is the same model with the same weights)."""
    distill = data.get("distill")
    if not isinstance(distill, dict) or distill.get("method") != "kl_dp" or ORIGINAL in participants:
        return
    student = participants.get("student")
    if not isinstance(student, dict):
        return  # the scheme reports the missing student
    copy = {k: v for k, v in student.items() if k in ("name", "options", "weights")}
    copy["trainable"] = False
    participants[ORIGINAL] = copy
    data["participants"] = participants


def _check_label_only(term: "TermConfig", target: str, field: str, source: "EnsembleConfig | None", where: str,
                      sources: dict) -> None:
    """A label_only source is read only by the label_only loss, and only its ``labels``; the
    label_only loss reads nothing else."""
    reads_black_box = source is not None and source.combine == "label_only"
    if reads_black_box and field != "labels":
        raise ValueError(f"{where}: target {target!r} reads {field!r} of a label_only source, a black-box teacher "
                         "that answers only 'labels' (its top-1 class) and 'answered'; it never exposes logits or "
                         "features")
    if reads_black_box and term.loss != "label_only":
        raise ValueError(f"{where}: loss {term.loss!r} cannot learn from {target!r}, the hard labels of a label_only "
                         "source; use loss: label_only")
    if term.loss == "label_only" and not reads_black_box:
        black_boxes = sorted(n for n, s in sources.items() if s.combine == "label_only")
        hint = (f"target one of: {', '.join(f'{n}.labels' for n in black_boxes)}" if black_boxes else
                "add one, e.g. sources: {blackbox: {combine: label_only, members: [teacher], budget: 2000}}, and "
                "give the term target: blackbox")
        raise ValueError(f"{where}: loss 'label_only' learns from a label_only source's hard labels, but its target "
                         f"{target!r} is not one; {hint}")


def _check_ref(ref: str, where: str, role: str, participants: dict, sources: dict, *, trainable: bool) -> None:
    name = ref.split(".", 1)[0]
    if name in participants:
        if trainable and not participants[name].trainable:
            raise ValueError(f"{where}: {role} {ref!r} is a frozen participant; a term trains its input, so the input "
                             "must be a trainable participant")
        return
    if name in sources and (not trainable or sources[name].combine == "learned"):
        return
    if name in sources:
        what = "a label-only teacher" if sources[name].combine == "label_only" else "a source with fixed weights"
        raise ValueError(f"{where}: {role} {ref!r} is {what}; a term trains its input, so the input "
                         "must be a trainable participant (or a source with combine: learned)")
    defined = ", ".join(sorted([*participants, *sources]))
    hint = " (add a `teacher:` section, or a participant of that name)" if name == "teacher" else ""
    raise ValueError(f"{where}: {role} {ref!r} names no {'trainable participant' if trainable else 'participant or source'}"
                     f"{hint}; defined: {defined}")


def _deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


# ----------------------------------------------------------------------------- loading


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.steps=200"`` -> ``(["train", "steps"], 200)``; the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. --set train.steps=200")
    key, raw = text.split("=", 1)
    path = [p for p in key.strip().split(".")]
    if not all(path):
        raise ConfigError(f"--set {text!r}: empty part in key {key!r}")
    try:
        return path, yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as err:
        problem = str(err).splitlines()[0]
        raise ConfigError(
            f"--set {text!r}: the value is not plain YAML ({problem}); a text value with YAML syntax in it "
            "needs quotes inside the shell's, e.g. --set 'name=\"[a\"' (tags such as !!python/... are refused)"
        ) from None


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
            if "input" in e and e["type"] not in ("missing",) and not isinstance(e["input"], (dict, list)) \
                    and repr(e["input"]) not in msg and not isinstance(e["input"], bool):
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
