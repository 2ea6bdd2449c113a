"""``transfuse cache-teacher``: run a frozen participant once over its data and store its outputs.

The cache holds, for every training sample a run may ask about (the whole training
split, plus external transfer data if configured), the outputs the config's terms read
from that participant -- its logits and any tapped features -- keyed by the stable sample
id. ``transfuse run CONFIG --set teacher.cache=DIR`` then trains without loading or
running the teacher; the cache's manifest records the teacher's model, the sha256 of its
weights, the data's fingerprint and the precision, and a run whose values differ is
refused, naming the field.

With ``topk=K`` (``--topk K``) a language model's ``logits`` ``(T, V)`` are stored as
their top K tokens per position -- log-probabilities at temperature 1, token ids, and the
mass of the other tokens -- instead of all V values; the run's divergence losses read
them through :func:`~transfuse.functional.divergences.topk_divergence`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ._version import __version__
from .build import cache_identity, cache_pool, load_splits, make_fabric, make_model
from .cache import CacheWriter, FieldSpec, index_dtype
from .checkpoint import load_into, load_weights
from .config import RunConfig
from .data.base import collate_batch
from .distiller import Ref
from .errors import UserError
from .participants import LOGITS, Participant
from .run import obtain_teacher_weights

DTYPES = ("float32", "float16")


def cached_fields(cfg: RunConfig, name: str) -> list[str]:
    """The fields of participant ``name`` that the config's terms read, as written in the
    references (``logits``, ``feature``, a module path); ``logits`` always."""
    fields = {"logits"}
    for tc in cfg.resolved_terms():
        refs = [Ref.parse(r) for r in tc.refs() if r is not None]
        fields |= {r.field for r in refs if r.source == name}
    for source in cfg.resolved_sources().values():  # an ensemble over it reads its logits
        if name in source.members:
            fields.add("logits")
    return sorted(fields)


def check_topk_readers_of_config(cfg: RunConfig, name: str, topk: int) -> None:
    """Refuse ``--topk`` when a term of ``cfg`` reads participant ``name``'s logits with a loss
    that cannot use a top-k teacher, or an ensemble combines them: the cache would be
    written (the teacher trained and run) only for the run to refuse it."""
    from .losses import LOSSES
    from .losses.divergences import accepts_topk, topk_losses

    for tc in cfg.resolved_terms():
        refs = [Ref.parse(r) for r in tc.refs() if r is not None]
        if any(r.source == name and r.field == LOGITS for r in refs) and not accepts_topk(LOSSES.get(tc.loss)):
            raise UserError(f"--topk {topk}: term {tc.name or tc.loss!r} reads {name}.logits with loss {tc.loss!r}, "
                            f"which needs the full distribution; the losses that accept a top-k teacher are "
                            f"{', '.join(topk_losses())}. Cache without --topk, or change the term")
    for source_name, source in cfg.resolved_sources().items():
        if name in source.members:
            raise UserError(f"--topk {topk}: source {source_name!r} combines {name}'s logits with other members, "
                            "which needs the full distribution; cache without --topk")


def field_encoding(field: str, shape: tuple[int, ...], *, dtype: str, topk: int | None) -> dict:
    """The encoding of one cached field: dense in ``dtype``, or with ``topk`` for ``logits``
    ``(..., V)``: its top ``topk`` tokens (``1 <= topk <= V``). UserError naming the field otherwise."""
    if topk is None or field != LOGITS:
        return {"kind": "dense", "dtype": dtype}
    if not shape:
        raise UserError(f"--topk {topk}: field {field!r} has shape {shape} per sample, not logits (..., V) over a "
                        "vocabulary; cache it without --topk")
    vocab = shape[-1]
    if not 1 <= topk <= vocab:
        raise UserError(f"--topk {topk}: must be between 1 and the vocabulary V = {vocab} of field {field!r} "
                        f"(shape {shape} per sample)")
    return {"kind": "topk", "k": topk, "dtype": dtype, "index_dtype": index_dtype(vocab)}


def cache_teacher(cfg: RunConfig, out_dir: str | Path, *, participant: str = "teacher", dtype: str = "float32",
                  batch_size: int | None = None, overwrite: bool = False, quiet: bool = False,
                  topk: int | None = None) -> dict[str, Any]:
    """Write the teacher-output cache of frozen ``participant`` to ``out_dir``; returns a short report.

    ``dtype``: storage of the values (``float32``, or ``float16`` for half the size).
    ``topk``: store the ``logits`` field ``(..., V)`` as its top ``topk`` tokens per position
    (log-probabilities at temperature 1 in ``dtype``, token ids, and the tail's mass) instead
    of every value; ``1 <= topk <= V``. Other fields (tapped features) stay dense.
    """
    if participant not in cfg.participants or cfg.participants[participant].trainable:
        frozen = [n for n, p in cfg.participants.items() if not p.trainable]
        raise UserError(f"--participant {participant!r} is not a frozen participant of this config; frozen ones: {frozen or 'none'}")
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    if topk is not None and (not isinstance(topk, int) or isinstance(topk, bool) or topk < 1):
        raise UserError(f"--topk {topk!r}: expected an integer >= 1 (the tokens kept per position)")
    if Path(out_dir).exists() and not overwrite:
        raise UserError(f"--out {str(out_dir)!r} already exists; pass --overwrite to replace it, or choose another folder")
    if topk is not None:
        check_topk_readers_of_config(cfg, participant, topk)
    pcfg = cfg.participants[participant].model_copy(update={"cache": None})
    fabric = make_fabric(cfg.fabric)
    if fabric.world_size > 1:
        raise UserError(f"cache-teacher writes one folder from one process; this config runs {fabric.world_size} "
                        "processes: cache with --set fabric.devices=1 (the run that reads the cache may use more)")
    splits = load_splits(cfg.data)
    pool = cache_pool(cfg.data, splits)
    fields = cached_fields(cfg, participant)

    with torch.random.fork_rng(devices=[]):
        model = make_model(pcfg, splits, role=participant)
    teacher = Participant(participant, model, trainable=False)
    teacher.add_taps(teacher.resolve_field(f) for f in fields)
    # Shapes come from one probe batch, before the (possibly long) teacher training.
    probe = next(iter(DataLoader(pool, batch_size=2, collate_fn=collate_batch)))
    shapes = {f: tuple(v.shape[1:]) for f, v in teacher.provide(probe, fields).items()}
    if topk is not None and LOGITS not in shapes:
        raise UserError(f"--topk {topk}: participant {participant!r} has no 'logits' field to keep the top-k of")
    # Checked before the (possibly long) teacher training, like the shapes.
    encodings = {f: field_encoding(f, shapes[f], dtype=dtype, topk=topk) for f in fields}

    if not pcfg.weights:
        weights = obtain_teacher_weights(cfg, participant, splits, fabric, quiet=quiet)
        load_into(model, load_weights(weights, what=f"trained {participant}"), source=f"trained {participant} {weights}")
    identity = cache_identity(cfg, participant, splits)
    teacher.setup(fabric)

    specs = {f: FieldSpec(name=f, shape=shapes[f], encoding=encodings[f]) for f in fields}
    loader = DataLoader(pool, batch_size=batch_size or cfg.train.eval_batch_size, collate_fn=collate_batch)
    with CacheWriter(out_dir, num_samples=len(pool), fields=specs, identity=identity,
                     created_by={"transfuse": __version__, "torch": torch.__version__}, overwrite=overwrite) as writer:
        for batch in tqdm(loader, desc=f"cache {participant}", disable=quiet or None, dynamic_ncols=True):
            batch = fabric.to_device(batch)
            writer.write(batch["sample_id"], teacher.provide(batch, fields))
    return {"out": str(out_dir), "participant": participant, "samples": len(pool), "fields": {f: list(shapes[f]) for f in fields},
            "dtype": dtype, "topk": topk}

