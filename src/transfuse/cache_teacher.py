"""``transfuse cache-teacher``: run a frozen participant once over its data and store its outputs.

The cache holds, for every training sample a run may ask about (the whole training
split, plus external transfer data if configured), the outputs the config's terms read
from that participant -- its logits and any tapped features -- keyed by the stable sample
id. ``transfuse run CONFIG --set teacher.cache=DIR`` then trains without loading or
running the teacher; the cache's manifest records the teacher's model, the sha256 of its
weights, the data's fingerprint and the precision, and a run whose values differ is
refused, naming the field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ._version import __version__
from .build import cache_identity, cache_pool, load_splits, make_fabric, make_model
from .cache import CacheWriter, FieldSpec
from .checkpoint import load_into, load_weights
from .config import RunConfig
from .data.base import collate_batch
from .distiller import Ref
from .errors import UserError
from .participants import Participant
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


def cache_teacher(cfg: RunConfig, out_dir: str | Path, *, participant: str = "teacher", dtype: str = "float32",
                  batch_size: int | None = None, overwrite: bool = False, quiet: bool = False) -> dict[str, Any]:
    """Write the teacher-output cache of frozen ``participant`` to ``out_dir``; returns a short report."""
    if participant not in cfg.participants or cfg.participants[participant].trainable:
        frozen = [n for n, p in cfg.participants.items() if not p.trainable]
        raise UserError(f"--participant {participant!r} is not a frozen participant of this config; frozen ones: {frozen or 'none'}")
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    if Path(out_dir).exists() and not overwrite:
        raise UserError(f"--out {str(out_dir)!r} already exists; pass --overwrite to replace it, or choose another folder")
    pcfg = cfg.participants[participant].model_copy(update={"cache": None})
    fabric = make_fabric(cfg.fabric)
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

    if not pcfg.weights:
        weights = obtain_teacher_weights(cfg, participant, splits, fabric, quiet=quiet)
        load_into(model, load_weights(weights, what=f"trained {participant}"), source=f"trained {participant} {weights}")
    identity = cache_identity(cfg, participant, splits)
    teacher.setup(fabric)

    specs = {f: FieldSpec(name=f, shape=shapes[f], encoding={"kind": "dense", "dtype": dtype}) for f in fields}
    loader = DataLoader(pool, batch_size=batch_size or cfg.train.eval_batch_size, collate_fn=collate_batch)
    with CacheWriter(out_dir, num_samples=len(pool), fields=specs, identity=identity,
                     created_by={"transfuse": __version__, "torch": torch.__version__}, overwrite=overwrite) as writer:
        for batch in tqdm(loader, desc=f"cache {participant}", disable=quiet or None, dynamic_ncols=True):
            batch = fabric.to_device(batch)
            writer.write(batch["sample_id"], teacher.provide(batch, fields))
    return {"out": str(out_dir), "participant": participant, "samples": len(pool), "fields": {f: list(shapes[f]) for f in fields},
            "dtype": dtype}

