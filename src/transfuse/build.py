"""The one place that turns a :class:`~transfuse.config.RunConfig` into objects.

Every component (models, participants, sources, losses, the Distiller, the engine) takes
typed arguments; only the functions here read config sections and hand those arguments
over. Everything that can be checked from the config and the data's shapes is checked
while these objects are built -- before any teacher is trained and before anything is
written.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from .blackbox import LabelOnlyTeacher
from .checkpoint import CheckpointError, load_into, load_weights
from .config import DataConfig, FabricConfig, OptimConfig, ParticipantConfig, RunConfig, TermConfig, TrainConfig
from .data import DATASETS, ArrayDataset, DataSplits, TransferSet, complement, stratified_subset, with_id_offset
from .data.base import first_batch
from .data.domains import DOMAIN
from .distiller import Distiller, DistillShapeError, Ref, Term, fields_by_source
from .engine import FitSettings
from .errors import DataError, FabricError, ModelError
from .losses import LOSSES
from .models import build_model
from .models.outputs import call_model
from .optim import make_optimizer
from .participants import LOGITS, Participant
from .paths import teacher_cache_dir
from .schedules import SCHEDULES, Constant
from .sources import ByClassGroup, CachedOutputs, Ensemble, LearnedEnsemble, MostConfident, check_topk_readers
from .taps import FeatureTaps


def make_fabric(cfg: FabricConfig):
    """A launched Lightning Fabric for the configured devices, strategy and precision."""
    from lightning_fabric import Fabric

    if cfg.threads:
        # Set before Fabric starts any process work; DDP's spawned processes build their own
        # Fabric through this function and so get the same count.
        torch.set_num_threads(cfg.threads)
    try:
        fabric = Fabric(
            accelerator=cfg.accelerator, devices=cfg.devices, strategy=cfg.strategy, precision=cfg.precision,
            num_nodes=cfg.num_nodes,
        )
    except (RuntimeError, ValueError, TypeError) as err:
        # Lightning's messages are good ("CUDAAccelerator can not run on your system ..."):
        # keep them, but as a one-paragraph error that names the config section.
        raise FabricError(f"fabric: {err}") from None
    fabric.launch()
    return fabric


def load_splits(cfg: DataConfig) -> DataSplits:
    """The configured data set's splits; a loading problem becomes a :class:`DataError` naming it."""
    try:
        return DATASETS.get(cfg.name)(**cfg.options)
    except (ValueError, FileNotFoundError, OSError, TypeError) as err:
        raise DataError(f"data {cfg.name!r}: {err}") from None


def load_data(cfg: DataConfig) -> tuple[DataSplits, torch.utils.data.Dataset]:
    """The data set's splits, and what the trainable participants train on: the training
    split, a stratified label subset of it, or a label subset plus an unlabelled transfer set
    (see :func:`load_student_data`, which also returns the held-out samples)."""
    splits, train_set, _ = load_student_data(cfg)
    return splits, train_set


def load_student_data(cfg: DataConfig) -> tuple[DataSplits, torch.utils.data.Dataset, Any]:
    """``(splits, train_set, holdout)``: the data set's splits; what the trainable
    participants train on; and the labelled samples held out for a recipe (None unless
    ``holdout_fraction``).

    In order: ``novel_classes`` sets those classes' samples apart (they become the
    unlabelled part); ``label_subset`` draws a class-stratified subset of the rest;
    ``holdout_fraction`` takes a class-stratified share of that away from training;
    ``transfer`` (or the novel samples) is added without labels. With ``generations``
    (sequence-level KD) the training set is the generated rows instead, once checked
    against the data (:func:`load_generations`).
    """
    splits = load_splits(cfg)
    if cfg.generations is not None:
        return splits, load_generations(cfg, splits), None
    labelled, novel = splits.train, None
    if cfg.novel_classes is not None:
        labelled, novel = _split_novel(cfg, splits)
    if cfg.label_subset is not None:
        if cfg.label_subset > len(labelled):
            raise DataError(f"data.label_subset is {cfg.label_subset} but {cfg.name} has only {len(labelled)} "
                            f"{'known-class ' if novel is not None else ''}training samples")
        labelled = stratified_subset(labelled, cfg.label_subset, seed=cfg.subset_seed)
    holdout = None
    if cfg.holdout_fraction is not None:
        n = round(cfg.holdout_fraction * len(labelled))
        if not 1 <= n < len(labelled):
            raise DataError(f"data.holdout_fraction = {cfg.holdout_fraction} of {len(labelled)} labelled training samples "
                            f"holds out {n}; it must leave at least one sample on each side")
        # Seeded apart from the label subset, so the held-out samples do not depend on its draw order.
        holdout = stratified_subset(labelled, n, seed=cfg.subset_seed + 7919, by=_holdout_groups(labelled))
        labelled = complement(labelled, holdout)
    if novel is not None:
        return splits, TransferSet(labelled, novel), holdout
    if cfg.transfer is None:
        return splits, labelled, holdout
    unlabelled = complement(splits.train, labelled) if cfg.transfer == "rest" else external_transfer(cfg, splits)
    if holdout is not None and cfg.transfer == "rest":
        unlabelled = complement(unlabelled, holdout)  # held-out samples never reach training, not even unlabelled
    return splits, TransferSet(labelled, unlabelled), holdout


def load_generations(cfg: DataConfig, splits: DataSplits):
    """The generated rows of ``cfg.generations`` (:func:`transfuse.seqkd.read_generations`),
    refused unless they were generated from this data: token rows of the same length and
    vocabulary, and the same training rows (:func:`transfuse.seqkd.rows_fingerprint`)."""
    from .data.text import TokenRows
    from .seqkd import check_data, read_generations, rows_fingerprint

    if not isinstance(splits.train, TokenRows):
        raise DataError(f"data.generations: sequence-level KD trains on generated token rows, but data {cfg.name!r} "
                        f"holds {type(splits.train).__name__}, not token rows; use a language-model data set "
                        "(shakespeare, markov)")
    rows, manifest = read_generations(cfg.generations)
    check_data(manifest, path=cfg.generations, data_name=cfg.name, data_options=cfg.options,
               block_size=splits.train.block_size, vocab_size=splits.num_classes,
               dataset=rows_fingerprint(name=cfg.name, options=cfg.options, rows=splits.train))
    return rows


def check_generations_teacher(cfg: RunConfig, splits: DataSplits) -> None:
    """With ``data.generations``: if the run has a frozen participant of the name that
    generated the rows, it must be the same teacher (model and options, precision, and --
    where its weights are known -- their sha256), else a :class:`~transfuse.seqkd.GenerationsError`
    names the field and the difference. A run without that participant (a labels-only
    student) is not checked."""
    from .seqkd import check_teacher, read_manifest

    if cfg.data.generations is None:
        return
    manifest = read_manifest(cfg.data.generations)
    name = manifest["participant"]
    p = cfg.participants.get(name)
    if p is None or p.trainable:
        return
    path = cfg.data.generations
    check_teacher(manifest, teacher_model_identity(cfg, name), path=path, participant=name)
    identity = teacher_identity(cfg, name, missing=f"data.generations: cannot check that {path!r} was generated by "
                                f"participants.{name}", advice="run `transfuse generate` with this config (it "
                                "trains the teacher first, as a run would) and train on what it writes")
    check_teacher(manifest, identity, path=path, participant=name)


def _holdout_groups(labelled: Any) -> torch.Tensor | None:
    """What the held-out samples are balanced over: the classes (None: the dataset's own
    ``targets``); for token rows, which have no class, each row's ``domain`` where they carry
    one (DDK needs every domain held out), else one group (a uniform draw)."""
    if hasattr(labelled, "targets"):
        return None
    domains = getattr(labelled, "fields", {}).get(DOMAIN)
    return domains if domains is not None else torch.zeros(len(labelled), dtype=torch.long)


def _split_novel(cfg: DataConfig, splits: DataSplits):
    targets = torch.as_tensor(splits.train.targets).long()
    bad = [c for c in cfg.novel_classes if c >= splits.num_classes]
    if bad:
        raise DataError(f"data.novel_classes: {bad} are not classes of {cfg.name!r} (0..{splits.num_classes - 1})")
    is_novel = torch.isin(targets, torch.tensor(cfg.novel_classes))
    if bool(is_novel.all()):
        raise DataError("data.novel_classes: every class is novel; leave at least one known class with labels")
    return splits.train.subset(torch.nonzero(~is_novel).flatten()), splits.train.subset(torch.nonzero(is_novel).flatten())


def teacher_train_set(cfg: ParticipantConfig, splits: DataSplits, *, role: str):
    """What frozen participant ``role`` trains on when it is trained first: the whole
    training split, or only its samples of ``train.classes`` / ``train.domains``."""
    train = splits.train
    keep = None
    if cfg.train.classes is not None:
        bad = [c for c in cfg.train.classes if c >= splits.num_classes]
        if bad:
            raise DataError(f"participants.{role}.train.classes: {bad} are not classes of the data "
                            f"(0..{splits.num_classes - 1})")
        keep = torch.isin(torch.as_tensor(train.targets).long(), torch.tensor(cfg.train.classes))
    if cfg.train.domains is not None:
        domains = getattr(train, "domains", None)
        if domains is None:
            raise DataError(f"participants.{role}.train.domains: the data set has no domains (a data set with "
                            "domains, such as digits_domains, gives each sample one)")
        in_domains = torch.isin(torch.as_tensor(domains).long(), torch.tensor(cfg.train.domains))
        keep = in_domains if keep is None else keep & in_domains
    if keep is None:
        return train
    if not bool(keep.any()):
        raise DataError(f"participants.{role}.train: no training sample has the given classes/domains")
    return train.subset(torch.nonzero(keep).flatten())


def check_batches(cfg: RunConfig, splits: DataSplits, train_set, *, world_size: int) -> None:
    """Every batch size fits its data and divides across the processes: checked before any
    teacher trains (the engine would only find out when its loop starts)."""
    jobs = [("train", cfg.train.batch_size, cfg.train.accumulate, len(train_set), "the training set")]
    for name, p in cfg.participants.items():
        if not p.trainable and not p.weights and not p.cache and p.train.steps:  # trained first, from labels, on (part of) the split
            subset = p.train.classes is not None or p.train.domains is not None
            jobs.append((f"participants.{name}.train", p.train.batch_size, 1,
                         len(teacher_train_set(p, splits, role=name)),
                         "its part of the training split" if subset else "the training split"))
    for section, batch, accumulate, available, what in jobs:
        if batch * accumulate > available:
            needs = f"{section}.batch_size * train.accumulate = {batch * accumulate}" if accumulate > 1 else \
                f"{section}.batch_size = {batch}"
            raise DataError(f"{needs}, but {what} of {cfg.data.name!r} has only {available} samples; "
                            f"lower {section}.batch_size")
        if batch % world_size:
            raise DataError(f"{section}.batch_size = {batch} must be divisible by the {world_size} processes "
                            f"(fabric.devices * fabric.num_nodes), so every process gets an equal share")


def external_transfer(cfg: DataConfig, splits: DataSplits):
    """Another data set's training split as unlabelled transfer data, its sample ids offset
    past this data set's so that the two never collide (in a teacher-output cache either)."""
    other = load_splits(DataConfig(name=cfg.transfer.name, options=cfg.transfer.options))
    if other.input_shape != splits.input_shape:
        raise DataError(
            f"data.transfer: {cfg.transfer.name} has inputs of shape {other.input_shape}, but {cfg.name} has "
            f"{splits.input_shape}; a transfer set must fit the same models"
        )
    return with_id_offset(other.train, int(splits.train.sample_ids.max()) + 1)


def cache_pool(cfg: DataConfig, splits: DataSplits):
    """Every training sample a teacher may be asked about: the whole training split, plus
    the external transfer data if configured (what ``transfuse cache-teacher`` covers)."""
    if cfg.transfer is None or cfg.transfer == "rest":
        return splits.train
    return _concat(splits.train, external_transfer(cfg, splits))


def _concat(a, b):
    if isinstance(a, ArrayDataset) and isinstance(b, ArrayDataset):
        return ArrayDataset(torch.cat([a.inputs, b.inputs]), torch.cat([a.targets, b.targets]),
                            ids=torch.cat([a.sample_ids, b.sample_ids]))
    return torch.utils.data.ConcatDataset([a, b])


def make_model(cfg: ParticipantConfig, splits: DataSplits, *, role: str) -> nn.Module:
    """Build a zoo model for the data's input shape and classes; load ``weights`` if given."""
    try:
        model = build_model(cfg.name, input_shape=splits.input_shape, num_classes=splits.num_classes, **cfg.options)
    except (ValueError, TypeError, ImportError, OSError) as err:
        raise ModelError(f"participants.{role}: cannot build model {cfg.name!r}: {err}") from None
    if cfg.weights:
        load_into(model, load_weights(cfg.weights, what=f"participants.{role}.weights"),
                  source=f"participants.{role}.weights {cfg.weights!r}")
    return model


def make_participants(cfg: RunConfig, splits: DataSplits) -> dict[str, Any]:
    """Every participant, by name: trainable ones built from the run's seed, in config
    order; frozen ones built (and loaded from ``weights``) on a forked RNG so they never
    shift the students' initialisation; a frozen one with ``cache`` becomes a
    :class:`~transfuse.sources.CachedOutputs` and is not built at all."""
    from .cache import TeacherCache

    torch.manual_seed(cfg.seed)  # the trainable models' initial weights depend on the run's seed only
    out: dict[str, Any] = {}
    for name, p in cfg.participants.items():
        if p.trainable:
            out[name] = Participant(name, make_model(p, splits, role=name), trainable=True)
        elif p.cache:
            out[name] = CachedOutputs(name, TeacherCache.open(p.cache, expect_identity=cache_identity(cfg, name, splits)))
        else:
            with torch.random.fork_rng(devices=[]):
                out[name] = Participant(name, make_model(p, splits, role=name), trainable=False)
    return out


def make_ensembles(
    sources: Mapping[str, Any], participants: Mapping[str, Any] | None = None, *, num_samples: int | None = None,
    class_groups: Mapping[str, list[int] | None] | None = None,
) -> dict[str, Ensemble | LearnedEnsemble | MostConfident | ByClassGroup | LabelOnlyTeacher]:
    """The ``sources:`` section (plus a scheme's) as :class:`~transfuse.sources.Ensemble`
    (fixed weights), :class:`~transfuse.sources.LearnedEnsemble`,
    :class:`~transfuse.sources.MostConfident` (one member per sample) or
    :class:`~transfuse.blackbox.LabelOnlyTeacher` objects. A label-only teacher wraps its
    member's object from ``participants`` and, with ``remember``, keeps an answer for each
    of the ``num_samples`` training samples. A ``by_class_group`` source (specialists)
    takes each member's classes from ``class_groups``."""
    out: dict[str, Ensemble | LearnedEnsemble | MostConfident | LabelOnlyTeacher] = {}
    for name, s in sources.items():
        if s.combine == "label_only":
            if participants is None or s.members[0] not in participants:
                raise ValueError(f"sources.{name}: its member {s.members[0]!r} must be given as a built participant")
            out[name] = LabelOnlyTeacher(name, participants[s.members[0]], budget=s.budget,
                                         num_samples=num_samples if s.remember else None,
                                         skip_labelled=bool(s.skip_labelled))
        elif s.combine == "learned":
            out[name] = LearnedEnsemble(name, s.members, temperature=s.temperature)
        elif s.combine == "by_class_group":
            groups = [class_groups[m] for m in s.members] if class_groups is not None else None
            if groups is None or any(g is None for g in groups):
                raise ValueError(f"sources.{name}: a by_class_group source needs each member's class group")
            out[name] = ByClassGroup(name, s.members, groups=groups)
        elif s.combine == "most_confident":
            out[name] = MostConfident(name, s.members, criterion=s.criterion or "label", temperature=s.temperature)
        else:
            out[name] = Ensemble(name, s.members, combine=s.combine, temperature=s.temperature, weights=s.weights)
    return out


def probe_shapes(model: nn.Module, paths, batch: Mapping[str, torch.Tensor], *, role: str) -> dict[str, tuple[int, ...]]:
    """Per-sample shapes (batch dim dropped) of ``model``'s logits and of the tapped ``paths``.

    One forward pass in eval mode without autograd, so losses with learnable parts can be
    sized before the optimizer exists; the model's train/eval mode is restored afterwards.
    """
    was_training = model.training
    model.eval()
    taps = FeatureTaps(model, [p for p in paths if p != LOGITS], role=role)
    try:
        with torch.no_grad(), taps:
            try:
                logits = call_model(model, batch)
            except (RuntimeError, TypeError, ValueError, IndexError) as err:
                raise ModelError(_cannot_run(role, batch, err)) from None
        out = {LOGITS: logits, **taps.collect()}
    finally:
        model.train(was_training)
    return {k: tuple(v.shape[1:]) for k, v in out.items()}


def _cannot_run(role: str, batch: Mapping[str, torch.Tensor], err: Exception) -> str:
    """Why a participant's first forward pass failed, in the data's terms (the probe runs
    before anything trains, so this is where ill-fitting inputs are caught)."""
    inputs = batch.get("input")
    seen = f"inputs {inputs.dtype} {tuple(inputs.shape[1:])} per sample" if isinstance(inputs, torch.Tensor) else "the batch"
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    advice = ""
    if isinstance(inputs, torch.Tensor) and not inputs.is_floating_point() and "dtype" in str(err).lower() + first.lower():
        advice = ("; this model takes floating-point inputs: store them as float32 (uint8 images are scaled "
                  "to [0, 1] when loaded; signed integers stay integers, as token ids would)")
    return f"participants.{role}: the model cannot run on {seen}: {first}{advice}"


def _source_shapes(sources: Mapping[str, Any], wanted: Mapping[str, set[str]], batch) -> dict[str, dict[str, tuple[int, ...]]]:
    """Per-sample shapes of every field a term reads, by source (ensembles from their first member)."""
    shapes: dict[str, dict[str, tuple[int, ...]]] = {}
    order, wanted = fields_by_source(sources, wanted)
    for name in order:
        source, fields = sources[name], wanted[name]
        if not fields:
            continue
        fields = {source.resolve_field(f) for f in fields}
        if isinstance(source, Participant):
            shapes[name] = probe_shapes(source.model, fields, batch, role=name)
        elif isinstance(source, CachedOutputs):
            stored = source.cache.manifest.fields
            missing = sorted(fields - set(stored))
            if missing:
                raise CheckpointError(
                    f"participant {name!r} is answered from a teacher-output cache that holds fields "
                    f"{sorted(stored)} but not {missing}; rebuild it with `transfuse cache-teacher` for this config"
                )
            shapes[name] = {f: tuple(stored[f].shape) for f in stored}
        elif isinstance(source, LabelOnlyTeacher):  # one class id and one flag per sample
            shapes[name] = {f: () for f in fields}
        else:  # an ensemble: each field has its first member's shape for that field (computed before it)
            first = source.inputs[0]
            own = getattr(source, "own_field_shapes", {})  # fields the ensemble makes itself (by_class_group's group)
            shapes[name] = {f: own[f] if f in own else shapes[first][sources[first].resolve_field(f)] for f in fields}
    return shapes


def make_terms(
    terms: list[TermConfig], sources: Mapping[str, Any], probe_batch: Mapping[str, torch.Tensor], *,
    num_train_samples: int, total_steps: int,
) -> list[Term]:
    """The Distiller's terms, resolved once: references completed with each loss's default
    field, every loss sized by one probe forward pass of the models it compares."""
    resolved = []
    for tc in terms:
        inp, tgt = tc.refs()
        resolved.append((tc, LOSSES.get(tc.loss), Ref.parse(inp), Ref.parse(tgt) if tgt else None))

    wanted: dict[str, set[str]] = {}
    for _, _, inp, tgt in resolved:
        for ref in (inp, tgt):
            if ref is not None:
                wanted.setdefault(ref.source, set()).add(ref.field)
    shapes = _source_shapes(sources, wanted, probe_batch)
    # A top-k cached teacher only for the losses that accept one: refused here, before training.
    check_topk_readers(sources, [(tc.name or tc.loss, spec, inp, tgt) for tc, spec, inp, tgt in resolved])

    out, used = [], set()
    for tc, spec, inp, tgt in resolved:
        name = tc.name or tc.loss
        if name in used:
            name = f"{name}_{len(used)}"
        used.add(name)
        s_shape = shapes[inp.source][sources[inp.source].resolve_field(inp.field)]
        t_shape = shapes[tgt.source][sources[tgt.source].resolve_field(tgt.field)] if tgt is not None else None
        options = dict(tc.options)
        if "total_steps" in spec.option_names():  # a loss with a schedule over the run (TAID, CTKD)
            options.setdefault("total_steps", total_steps)
        try:
            loss = spec.from_shapes(student_shape=s_shape, teacher_shape=t_shape, num_train_samples=num_train_samples,
                                    **options)
        except (ValueError, TypeError) as err:
            # A loss sized from shapes it cannot join (FitNets from a conv map to a flat
            # feature): known before anything trains, and the user's to fix in the config.
            raise DistillShapeError(f"term {name!r} ({tc.loss}: {inp} -> {tgt}): {err}") from None
        out.append(
            Term(name=name, loss=loss, weight=spec.weight if tc.weight is None else tc.weight, input=inp, target=tgt,
                 schedule=_schedule(tc, spec, total_steps), detach_target=tc.detach_target, mask=tc.mask,
                 sample_weights=tc.sample_weights)
        )
    return out


def _schedule(tc: TermConfig, spec, total_steps: int):
    if tc.schedule is not None:
        return SCHEDULES.get(tc.schedule.kind)(**tc.schedule.options)
    default = getattr(spec, "schedule", None)
    if default is None:
        return Constant()
    options = dict(default.options)
    if default.fraction is not None:
        options["steps"] = max(1, round(default.fraction * total_steps))
    return SCHEDULES.get(default.kind)(**options)


def make_distiller(cfg: RunConfig, splits: DataSplits, train_set) -> Distiller:
    """Participants, sources and terms assembled; every shape and reference checked (and,
    with ``data.generations``, that the run's teacher is the one that generated them)."""
    check_generations_teacher(cfg, splits)
    check_tokenizers(cfg)
    participants = make_participants(cfg, splits)
    groups = {name: p.train.classes for name, p in cfg.participants.items()}
    sources = {**participants, **make_ensembles(cfg.resolved_sources(), participants, num_samples=len(train_set),
                                                class_groups=groups)}
    probe = first_batch(train_set)
    terms = make_terms(cfg.resolved_terms(), sources, probe, num_train_samples=len(train_set), total_steps=cfg.train.steps)
    distiller = Distiller(list(sources.values()), terms)
    distiller.check(probe)
    return distiller


def check_tokenizers(cfg: RunConfig) -> None:
    """Every tokenizer the run can see tokenizes alike: the data's (``data.options.tokenizer``,
    a folder or file) and those saved in the participants' pretrained folders
    (``options.path``). Token-level terms compare distributions over one vocabulary at each
    position, which two tokenizers do not share; an equal vocabulary size alone would hide it."""
    from .data.tokenizer import TOKENIZER_FILE, fingerprint, load_tokenizer

    found: list[tuple[str, Any]] = []
    data_tok = cfg.data.options.get("tokenizer")
    if isinstance(data_tok, str) and Path(data_tok).expanduser().exists():
        found.append(("data.options.tokenizer", data_tok))
    for name, p in cfg.participants.items():
        if p.loads_pretrained and (Path(p.options["path"]).expanduser() / TOKENIZER_FILE).is_file():
            found.append((f"participants.{name}.options.path", p.options["path"]))
    if len(found) < 2:
        return
    (first_field, first_path), prints = found[0], {}
    for field, path in found:
        try:
            prints[field] = fingerprint(load_tokenizer(path))
        except (OSError, ValueError) as err:
            raise DataError(f"{field}: cannot read the tokenizer in {path!r} ({err})") from None
    for field, path in found[1:]:
        if prints[field] != prints[first_field]:
            raise DataError(
                f"{field} ({path!r}) holds another tokenizer than {first_field} ({first_path!r}): token-level "
                "distillation needs one tokenizer for the data, the teacher and the student (cross-tokenizer "
                "distillation is not supported): tokenize the data with the teacher's tokenizer and give the "
                "student that tokenizer too")


def make_optimizers(cfg: RunConfig, distiller: Distiller) -> dict[str, torch.optim.Optimizer]:
    """One optimizer per trainable participant (and learned source), over its parameters and
    the learnable parts of the terms that train it (FitNets' regressor belongs to the
    student's optimizer)."""
    optimizers = {}
    sources = cfg.resolved_sources()
    for name in distiller.trainable_names:
        own = distiller.models[name] if name in distiller.models else distiller.learned[name]
        params = list(own.parameters())
        for term in distiller.terms:
            if term.input.source == name:
                params += list(term.loss.parameters())
        section = cfg.participants[name].optim if name in cfg.participants else sources[name].optim
        optimizers[name] = make_optimizer_from(section or cfg.optim, params)
    return optimizers


def make_optimizer_from(cfg: OptimConfig, params) -> torch.optim.Optimizer:
    """The configured optimizer over ``params``."""
    return make_optimizer(params, name=cfg.name, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum)


def fit_settings(train: TrainConfig, optim: OptimConfig, *, seed: int, description: str, **changes: Any) -> FitSettings:
    """Engine settings: every field the train section shares with :class:`FitSettings`,
    plus the learning-rate schedule from ``optim``, then ``changes``."""
    names = {f.name for f in dataclasses.fields(FitSettings)}
    shared = {k: v for k, v in train.model_dump().items() if k in names}
    values = {**shared, "lr_schedule": optim.schedule, "warmup_steps": optim.warmup_steps, "seed": seed,
              "description": description, **changes}
    return FitSettings(**values)


def teacher_cache_key(cfg: RunConfig, name: str = "teacher") -> str:
    """Content hash of everything that determines a trained frozen participant (model, its training, the data)."""
    p = cfg.participants[name]
    what = {
        "model": {"name": p.name, "options": p.options},
        # A pretrained folder's path says nothing of what is in it: its files are hashed too.
        **({"pretrained": folder_digest(p.options["path"])} if p.loads_pretrained else {}),
        # A subset that is not set is left out, so teachers cached before subsets existed keep their key.
        "train": {k: v for k, v in p.train.model_dump(mode="json").items()
                  if not (k in ("classes", "domains") and v is None)},
        "data": {"name": cfg.data.name, "options": cfg.data.options},
        "precision": cfg.fabric.precision,
    }
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


@functools.lru_cache(maxsize=8)
def _digest(root: str, stamp: tuple) -> str:
    # ``stamp``: (file, size, mtime) of every file, sorted; its sizes and times make a changed folder a cache miss.
    from .cache import file_sha256

    return hashlib.sha256(json.dumps([[str(Path(f).relative_to(root)), file_sha256(f)] for f, _, _ in stamp])
                          .encode()).hexdigest()


def folder_digest(path: str) -> str:
    """SHA-256 over the names and contents of every file under ``path`` (a pretrained model
    folder); a missing folder digests as empty (the model's own loading reports it).
    Computed once per process for an unchanged folder."""
    root = Path(path).expanduser()
    files = sorted(root.rglob("*")) if root.is_dir() else []
    stamp = tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.is_file())
    return _digest(str(root), stamp)


def teacher_weights_path(cfg: RunConfig, name: str):
    """Where a frozen participant's weights are: ``weights``, or its slot in the trained-teacher cache."""
    from pathlib import Path

    p = cfg.participants[name]
    if p.weights:
        return Path(p.weights)
    return teacher_cache_dir(p.cache_dir) / f"{p.name}-{teacher_cache_key(cfg, name)}.safetensors"


def teacher_model_identity(cfg: RunConfig, name: str) -> dict[str, str]:
    """The parts of frozen participant ``name``'s identity that need no weights file: its
    model (name and options) and the forward precision."""
    p = cfg.participants[name]
    return {"teacher_model": json.dumps({"name": p.name, "options": p.options}, sort_keys=True),
            "precision": cfg.fabric.precision}


def teacher_identity(cfg: RunConfig, name: str, *, missing: str,
                     advice: str = "run once without it so that the teacher is trained") -> dict[str, str]:
    """What identifies frozen participant ``name``'s outputs: :func:`teacher_model_identity`
    plus ``teacher_weights_sha256``, the hash of its weights file (``weights``, or the
    trained teacher in its cache folder). ``missing`` starts the error when that file is
    not there (the config field and what was being checked); ``advice`` ends it."""
    from .cache import file_sha256

    weights = teacher_weights_path(cfg, name)
    if not weights.is_file():
        raise CheckpointError(
            f"{missing}, because its weights {str(weights)!r} are not here; give participants.{name}.weights, or "
            f"{advice}"
        )
    return {**teacher_model_identity(cfg, name), "teacher_weights_sha256": file_sha256(weights)}


def cache_identity(cfg: RunConfig, name: str, splits: DataSplits) -> dict[str, str]:
    """What a teacher-output cache must match to stand in for frozen participant ``name``:
    its model, the hash of its weights file, the data it covers and the forward precision."""
    from .cache import fingerprint

    identity = teacher_identity(cfg, name, missing=f"participants.{name}.cache: cannot check the cache against the "
                                "teacher")
    pool = cache_pool(cfg.data, splits)
    inputs = getattr(pool, "inputs", None)
    transfer = cfg.data.transfer.model_dump(mode="json") if cfg.data.transfer not in (None, "rest") else None
    return {
        "teacher_model": identity["teacher_model"],
        "teacher_weights_sha256": identity["teacher_weights_sha256"],
        "dataset": fingerprint(name=cfg.data.name, options=cfg.data.options, transfer=transfer, num_samples=len(pool),
                               tensors=[pool.sample_ids] + ([inputs] if isinstance(inputs, torch.Tensor) else [])),
        "precision": identity["precision"],
    }
