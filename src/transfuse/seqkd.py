"""Sequence-level knowledge distillation for causal language models.

Kim & Rush, Sequence-Level Knowledge Distillation, EMNLP 2016
(https://arxiv.org/abs/1606.07947): instead of matching the teacher's distribution at
every position of the real data (word-level KD), the student is trained with plain
cross-entropy on the teacher's own outputs -- sequences the teacher generated once, from
the prompts of the training data. Word-level KD can be added on top (the paper's
"Seq-KD + Word-KD"): the live teacher scores the generated rows like any other rows.

Here the generations are written once, to a folder, by ``transfuse generate`` (or
:func:`generate`), and a run trains on them with ``data.generations: DIR``::

    DIR/
      rows.safetensors   input_ids, attention_mask, labels (N, T) int64; source_ids (N,);
                         field.<name> for each per-row field of the source rows (domain, ...)
      manifest.json      what made them (teacher identity, data fingerprint, prompt_tokens,
                         temperature, seed, ...) -- checked before a run trains on them

Each generated row keeps its source row's prompt (``prompt_tokens`` tokens, or the row's
own unlabelled prefix) and continues it to the row length; its ``labels`` are
:data:`~transfuse.data.text.IGNORE_INDEX` on the prompt, so only generated tokens carry loss.

Deviations from the paper (stated in the docs too): the paper decodes with beam search
(beam 5) and keeps the top beam; here decoding is greedy (``temperature: 0``) or ancestral
sampling at a temperature, through the same sampler as on-policy distillation
(:func:`transfuse.on_policy.sample_continuations`); there is no end-of-sequence stop, a
row is continued to its full length.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
from pathlib import Path
from typing import Any, Callable, ContextManager

import torch
from safetensors.torch import load_file, save_file

from .atomic import give_default_mode, write_atomic
from .cache.hashing import fingerprint
from .cache.layout import abandoned_siblings, temp_sibling
from .cache.npyfile import fsync_path
from .data.text import IGNORE_INDEX, TokenRows, prompt_ends
from .errors import UserError
from .progress import Progress

#: Layout version of a generations folder; a reader refuses any other.
FORMAT_VERSION = 1
#: What ``manifest.json`` says a folder is (a teacher-output cache has another layout).
KIND = "transfuse-generations"
MANIFEST = "manifest.json"
ROWS_FILE = "rows.safetensors"
#: Per-row fields of the source rows (a Markov row's ``domain``) are stored under this prefix.
FIELD_PREFIX = "field."
_TOKEN_TENSORS = ("input_ids", "attention_mask", "labels")
_MANIFEST_KEYS = {
    "format_version", "kind", "count", "source_rows", "samples", "block_size", "vocab_size", "prompt_tokens",
    "temperature", "seed", "batch_size", "participant", "data", "dataset", "teacher", "created_by",
}
#: The teacher's identity in a manifest: the keys of :func:`transfuse.build.teacher_identity`.
TEACHER_KEYS = ("teacher_model", "teacher_weights_sha256", "precision")


class GenerationsError(UserError, ValueError):
    """A generations folder that is missing, damaged, or made for other data or another teacher."""


def rows_fingerprint(*, name: str, options: dict[str, Any], rows: TokenRows) -> str:
    """The fingerprint of a data set's training rows: its name and options, and every
    token, mask, label and sample id (what the generations' prompts came from)."""
    return fingerprint(name=name, options=options,
                       tensors=[rows.input_ids, rows.attention_mask, rows.labels, rows.sample_ids])


def prompt_lengths(rows: TokenRows, prompt_tokens: int | None) -> torch.Tensor:
    """How many leading tokens of each row are its prompt ``(N,)``: ``prompt_tokens`` for
    every row, or (None) each row's unlabelled prefix, as a prompt/completion row has.
    Rows without a prompt of their own (plain text: every token labelled) need
    ``prompt_tokens``; a prompt must leave at least one token to generate."""
    n, length = rows.input_ids.shape
    if prompt_tokens is not None:
        if isinstance(prompt_tokens, bool) or not isinstance(prompt_tokens, int) or not 1 <= prompt_tokens < length:
            raise GenerationsError(f"prompt_tokens must be an integer in [1, {length - 1}] for rows of {length} "
                                   f"tokens (at least one to condition on, one to generate); got {prompt_tokens!r}")
        return torch.full((n,), prompt_tokens, dtype=torch.long)
    first = prompt_ends(rows.labels, rows.attention_mask)  # (N,)
    without = torch.nonzero(first == 0).flatten()
    if len(without):
        raise GenerationsError(
            f"{len(without)} of {n} rows (row {int(without[0])} first) have no prompt of their own: every token is "
            "labelled, as in plain text; give prompt_tokens (--prompt-tokens N) to continue each row after its "
            "first N tokens")
    if bool((first >= length).any()):
        row = int(torch.nonzero(first >= length).flatten()[0])
        raise GenerationsError(f"row {row} has no labelled token, so nothing after its prompt to generate")
    return first


def check_options(*, temperature: float, samples: int, batch_size: int) -> None:
    """Refuse generation options that make no sense, naming the option: a temperature that
    is negative or not finite, ``samples`` or ``batch_size`` below 1, and several samples
    of greedy decoding (the same row each time)."""
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise GenerationsError(f"samples must be an integer >= 1; got {samples!r}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
        raise GenerationsError(f"temperature must be a finite number >= 0 (0: greedy); got {temperature!r}")
    if temperature == 0 and samples > 1:
        raise GenerationsError(f"samples = {samples} with temperature 0: greedy decoding gives the same row each time; "
                               "sample at a temperature > 0, or keep samples at 1")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise GenerationsError(f"batch_size must be an integer >= 1; got {batch_size!r}")


def generate_rows(
    model: torch.nn.Module,
    rows: TokenRows,
    *,
    prompt_tokens: int | None,
    temperature: float,
    seed: int,
    samples: int = 1,
    batch_size: int = 64,
    device: torch.device | str | None = None,
    forward_context: Callable[[], ContextManager] | None = None,
    progress: Progress | None = None,
) -> TokenRows:
    """The teacher's continuations of ``rows``' prompts, as new token rows ``(N * samples, T)``.

    ``model``: a causal LM called as ``model({"input_ids": ...}) -> (B, t, V)`` logits (a
    participant's model); it is put in eval mode for the generation and restored after.
    ``prompt_tokens``/:func:`prompt_lengths`: where each row's prompt ends; its tokens are
    kept and every later position is generated, to the row's length
    (:func:`~transfuse.on_policy.sample_continuations`). ``temperature``: 0 decodes greedily
    (argmax), > 0 samples from ``softmax(logits / temperature)``. ``samples``: generations
    per row (> 1 only when sampling), in row-major order: row ``i``'s ``k``-th generation is
    row ``i * samples + k``.

    The result is fully attended; ``labels`` are :data:`IGNORE_INDEX` on the prompt and the
    generated token elsewhere, so only generated tokens carry loss. Its sample ids are
    ``0..N * samples - 1``; ``fields["source_id"]`` holds each row's source sample id, and
    the source rows' own fields (a Markov row's ``domain``) are repeated alongside.

    Seeded: the draws come from torch's RNG seeded with ``seed`` inside a forked RNG (the
    caller's RNG is left as it was), batch by batch in row order, so the same ``seed``,
    ``batch_size`` and device give the same rows.
    """
    from .on_policy import sample_continuations

    check_options(temperature=temperature, samples=samples, batch_size=batch_size)
    prompts = prompt_lengths(rows, prompt_tokens).repeat_interleave(samples)  # (M,), M = N * samples
    source = torch.arange(len(rows)).repeat_interleave(samples)  # (M,) row of each generation
    input_ids = rows.input_ids[source]  # (M, T): the prompts, and source tokens that generation overwrites
    if device is None:  # where the model is (a model without parameters runs on the CPU)
        device = next((q.device for q in model.parameters()), torch.device("cpu"))
    device = torch.device(device)
    out = torch.empty_like(input_ids)  # (M, T)
    was_training = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            for start in range(0, len(input_ids), batch_size):
                chunk = slice(start, start + batch_size)
                with forward_context() if forward_context is not None else contextlib.nullcontext():
                    generated = sample_continuations(model, input_ids[chunk].to(device), prompts[chunk].to(device),
                                                     temperature=float(temperature))
                out[chunk] = generated.to(out.device)
                if progress is not None:
                    progress.update(min(start + batch_size, len(input_ids)))
    finally:
        for module, training in was_training.items():
            module.train(training)
    positions = torch.arange(out.shape[1])[None, :]  # (1, T)
    labels = torch.where(positions >= prompts[:, None], out, torch.full_like(out, IGNORE_INDEX))  # (M, T)
    fields = {key: values[source] for key, values in rows.fields.items()}
    fields["source_id"] = rows.sample_ids[source]
    return TokenRows(out, torch.ones_like(out), labels, fields=fields, vocab_size=rows.vocab_size,
                     name="generations")


def write_generations(out_dir: str | os.PathLike, rows: TokenRows, manifest: dict[str, Any], *,
                      overwrite: bool = False) -> Path:
    """Write ``rows`` and ``manifest`` (a dict with the keys of a generations manifest,
    see :func:`make_manifest`) to the folder ``out_dir``, atomically.

    Everything is written into a hidden temporary sibling folder and renamed into place
    once complete, so a failure (or a kill) at any point leaves no ``out_dir``, or the
    previous one. An existing ``out_dir`` is refused unless ``overwrite``; then it is
    replaced only once the new folder is complete."""
    out = Path(out_dir)
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise GenerationsError(f"--out {str(out)!r} already exists; pass --overwrite to replace it, or choose another "
                               "folder")
    check_manifest(manifest, source=f"{out / MANIFEST} (about to be written)")
    if manifest["count"] != len(rows) or manifest["block_size"] != rows.block_size:
        raise ValueError(f"write_generations: the manifest declares {manifest['count']} rows of {manifest['block_size']} "
                         f"tokens but {len(rows)} rows of {rows.block_size} are given")
    tensors = {"input_ids": rows.input_ids, "attention_mask": rows.attention_mask, "labels": rows.labels}
    tensors.update({f"{FIELD_PREFIX}{key}": values for key, values in rows.fields.items()})
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in abandoned_siblings(out):  # left by a killed write of this same folder
        shutil.rmtree(stale, ignore_errors=True)
    tmp = temp_sibling(out, "tmp")
    tmp.mkdir()
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / ROWS_FILE))
        give_default_mode(tmp / ROWS_FILE)
        fsync_path(tmp / ROWS_FILE)
        write_atomic(tmp / MANIFEST, json.dumps(manifest, indent=2, allow_nan=False) + "\n")  # last: marks it complete
        fsync_path(tmp)
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _publish(tmp: Path, out: Path) -> None:
    """Rename the finished ``tmp`` to ``out``; an existing ``out`` is moved aside first and
    deleted only after the rename, so it is put back if the rename fails."""
    old = None
    if out.exists() or out.is_symlink():
        old = temp_sibling(out, "old")
        os.rename(out, old)
    try:
        os.rename(tmp, out)
    except OSError as err:
        if old is not None and not out.exists():
            os.rename(old, out)
        raise GenerationsError(f"generations folder {str(out)!r} could not be put in place ({err})") from None
    fsync_path(out.parent)
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink()


def make_manifest(rows: TokenRows, *, source_rows: int, samples: int, vocab_size: int, prompt_tokens: int | None,
                  temperature: float, seed: int, batch_size: int, participant: str, data: dict[str, Any],
                  dataset: str, teacher: dict[str, str], created_by: dict[str, str] | None = None) -> dict[str, Any]:
    """The ``manifest.json`` of generated ``rows``: the format, the count and shape, how they
    were made (``prompt_tokens`` -- None: each row's own prompt --, ``temperature``, ``seed``,
    ``batch_size``, ``samples`` per source row), the data they came from (``data``: name and
    options; ``dataset``: :func:`rows_fingerprint` of its training rows) and the teacher's
    identity (``teacher``: :data:`TEACHER_KEYS`, as a teacher-output cache records them)."""
    return {
        "format_version": FORMAT_VERSION, "kind": KIND, "count": len(rows), "source_rows": source_rows,
        "samples": samples, "block_size": rows.block_size, "vocab_size": vocab_size, "prompt_tokens": prompt_tokens,
        "temperature": float(temperature), "seed": seed, "batch_size": batch_size, "participant": participant,
        "data": data, "dataset": dataset, "teacher": dict(teacher), "created_by": dict(created_by or {}),
    }


def check_manifest(doc: Any, *, source: str) -> dict[str, Any]:
    """``doc`` if it is a well-formed generations manifest; else :class:`GenerationsError`
    naming ``source`` and the first problem."""
    def bad(problem: str) -> GenerationsError:
        return GenerationsError(f"{source}: not a valid generations manifest: {problem}; make the folder again with "
                                "`transfuse generate`")

    if not isinstance(doc, dict):
        raise bad("it must hold a JSON object")
    # The version first: a newer layout may differ in every other key.
    if doc.get("format_version") != FORMAT_VERSION:
        raise bad(f"format_version is {doc.get('format_version')!r}; this transfuse reads version {FORMAT_VERSION}")
    if doc.get("kind") != KIND:
        raise bad(f"kind is {doc.get('kind')!r}, expected {KIND!r} (a teacher-output cache is another kind of folder)")
    missing, extra = sorted(_MANIFEST_KEYS - set(doc)), sorted(set(doc) - _MANIFEST_KEYS)
    if missing or extra:
        raise bad(f"missing key(s) {missing} / unexpected key(s) {extra}")
    for key in ("count", "source_rows", "samples", "block_size", "vocab_size", "batch_size"):
        if not isinstance(doc[key], int) or isinstance(doc[key], bool) or doc[key] < 1:
            raise bad(f"{key} must be a positive integer, got {doc[key]!r}")
    if doc["count"] != doc["source_rows"] * doc["samples"]:
        raise bad(f"count {doc['count']} is not source_rows * samples = {doc['source_rows'] * doc['samples']}")
    prompt = doc["prompt_tokens"]
    if prompt is not None and (not isinstance(prompt, int) or isinstance(prompt, bool) or prompt < 1):
        raise bad(f"prompt_tokens must be a positive integer or null, got {prompt!r}")
    temperature = doc["temperature"]
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not temperature >= 0:
        raise bad(f"temperature must be a number >= 0, got {temperature!r}")
    if not isinstance(doc["seed"], int) or isinstance(doc["seed"], bool):
        raise bad(f"seed must be an integer, got {doc['seed']!r}")
    if not isinstance(doc["participant"], str) or not isinstance(doc["dataset"], str):
        raise bad("participant and dataset must be strings")
    data = doc["data"]
    if not isinstance(data, dict) or set(data) != {"name", "options"} or not isinstance(data["options"], dict):
        raise bad(f"data must be an object with keys name and options, got {data!r}")
    teacher = doc["teacher"]
    if not isinstance(teacher, dict) or set(teacher) != set(TEACHER_KEYS) or \
            not all(isinstance(v, str) for v in teacher.values()):
        raise bad(f"teacher must map {list(TEACHER_KEYS)} to strings, got {teacher!r}")
    if not isinstance(doc["created_by"], dict):
        raise bad("created_by must be an object")
    return doc


def read_manifest(path: str | os.PathLike, *, where: str = "data.generations") -> dict[str, Any]:
    """The checked ``manifest.json`` of the generations folder ``path`` (see
    :func:`check_manifest`); ``where`` names the config field in errors."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise GenerationsError(f"{where}: {str(folder)!r} is {'not a folder' if folder.exists() else 'not there'}; "
                               "make it with `transfuse generate CONFIG --out DIR`, or fix the path")
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise GenerationsError(f"{where}: {str(folder)!r} has no {MANIFEST}, so it is not a generations folder "
                               "written by `transfuse generate`")
    try:
        doc = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise GenerationsError(f"{where}: {str(manifest_path)!r} cannot be read as JSON ({err})") from None
    return check_manifest(doc, source=f"{where}: {manifest_path}")


def read_generations(path: str | os.PathLike, *, where: str = "data.generations") -> tuple[TokenRows, dict[str, Any]]:
    """``(rows, manifest)`` of a generations folder, both checked: the manifest's form, and
    rows that match it (count, shape, integer tokens inside the vocabulary, labels only
    where attended). ``where`` names the config field in errors."""
    folder = Path(path).expanduser()
    manifest = read_manifest(folder, where=where)
    try:
        tensors = load_file(str(folder / ROWS_FILE))
    except Exception as err:  # safetensors raises several error types for a missing or bad file
        raise GenerationsError(f"{where}: {str(folder / ROWS_FILE)!r} is not a readable safetensors file ({err}); "
                               "make the folder again with `transfuse generate`") from None
    lacking = [k for k in _TOKEN_TENSORS if k not in tensors]
    unknown = sorted(k for k in tensors if k not in _TOKEN_TENSORS and not k.startswith(FIELD_PREFIX))
    if lacking or unknown:
        raise GenerationsError(f"{where}: {ROWS_FILE} lacks {lacking} / has unexpected tensors {unknown}")
    expected = (manifest["count"], manifest["block_size"])
    for key in _TOKEN_TENSORS:
        if tuple(tensors[key].shape) != expected or tensors[key].dtype != torch.int64:
            raise GenerationsError(f"{where}: {key} in {ROWS_FILE} is {tensors[key].dtype} {tuple(tensors[key].shape)}; "
                                   f"the manifest declares int64 {expected}")
    fields = {k[len(FIELD_PREFIX):]: v for k, v in tensors.items() if k.startswith(FIELD_PREFIX)}
    try:
        rows = TokenRows(tensors["input_ids"], tensors["attention_mask"], tensors["labels"], fields=fields,
                         vocab_size=manifest["vocab_size"], name=f"generations {folder}")
    except ValueError as err:
        raise GenerationsError(f"{where}: {err}") from None
    return rows, manifest


def check_data(manifest: dict[str, Any], *, path: str, data_name: str, data_options: dict[str, Any], block_size: int,
               vocab_size: int, dataset: str, where: str = "data.generations") -> None:
    """Refuse generations made from other data than the run's: another row length, another
    vocabulary, or other training rows (:func:`rows_fingerprint`); the error names
    ``where`` and the first mismatch."""
    made = f"{where}: {path!r} was generated from"
    if manifest["block_size"] != block_size:
        raise GenerationsError(f"{made} rows of {manifest['block_size']} tokens, but this run's data "
                               f"({data_name}) has rows of {block_size}; generate again with this config")
    if manifest["vocab_size"] != vocab_size:
        raise GenerationsError(f"{made} a vocabulary of {manifest['vocab_size']} tokens, but this run's data "
                               f"({data_name}) has {vocab_size}; generate again with this config")
    if manifest["dataset"] != dataset:
        then = manifest["data"]
        detail = (f"{then['name']} with options {then['options']}"
                  if (then["name"], then["options"]) != (data_name, data_options) else "the same data set and options, "
                  "but its training rows differ now")
        raise GenerationsError(f"{made} other training rows ({detail}) than this run's ({data_name} with options "
                               f"{data_options}): the data set fingerprint differs; generate again with this config")


def check_teacher(manifest: dict[str, Any], run_identity: dict[str, str], *, path: str, participant: str) -> None:
    """Refuse generations made by another teacher than the run's participant of the same
    name: each key of :data:`TEACHER_KEYS` in ``run_identity`` must equal the manifest's."""
    diffs = [(k, manifest["teacher"][k], run_identity[k]) for k in TEACHER_KEYS
             if k in run_identity and manifest["teacher"][k] != run_identity[k]]
    if diffs:
        lines = "; ".join(f"{k} is {got!r} there but {want!r} in this run" for k, got, want in diffs)
        raise GenerationsError(
            f"data.generations: {path!r} was generated by another {participant!r} than this run's "
            f"participants.{participant} ({lines}). Generate again with this config, or give the run's teacher "
            f"another participant name if it is meant to differ")



def generate(cfg: Any, out_dir: str | os.PathLike, *, participant: str = "teacher", prompt_tokens: int | None = None,
             temperature: float = 1.0, samples: int = 1, seed: int | None = None, batch_size: int | None = None,
             overwrite: bool = False, quiet: bool = False) -> dict[str, Any]:
    """``transfuse generate``: the frozen ``participant`` of run config ``cfg`` continues every
    training row's prompt once (``samples`` times), and the rows are written to ``out_dir``
    with their manifest (:func:`write_generations`); returns a short report.

    The teacher is obtained exactly as ``transfuse run`` obtains it: loaded from
    ``weights``, or trained first from labels (and cached by content hash, so the run that
    trains on the generations finds the same weights). ``seed`` defaults to the config's,
    ``batch_size`` to ``train.eval_batch_size``. Everything that can be checked (the
    participant, ``--out``, the options, the data's rows and prompts) is checked before the
    teacher is trained or run."""
    from ._version import __version__
    from .build import load_splits, make_fabric, make_model, teacher_identity
    from .checkpoint import load_into, load_weights
    from .errors import DataError
    from .participants import Participant
    from .run import obtain_teacher_weights

    p = cfg.participants.get(participant)
    if p is None or p.trainable:
        frozen = [n for n, q in cfg.participants.items() if not q.trainable]
        raise GenerationsError(f"--participant {participant!r} is not a frozen participant of this config; frozen "
                               f"ones: {frozen or 'none'} (the teacher that generates must be one)")
    out = Path(out_dir)
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise GenerationsError(f"--out {str(out)!r} already exists; pass --overwrite to replace it, or choose another "
                               "folder")
    seed = cfg.seed if seed is None else seed
    batch_size = cfg.train.eval_batch_size if batch_size is None else batch_size
    splits = load_splits(cfg.data)
    rows = splits.train
    if not isinstance(rows, TokenRows):
        raise DataError(f"data {cfg.data.name!r}: generation continues token rows (input_ids, labels), as a causal "
                        f"language model's data set has (shakespeare, markov); this one holds {type(rows).__name__}")
    # Bad options and prompts fail now, not after the (possibly long) teacher training.
    check_options(temperature=temperature, samples=samples, batch_size=batch_size)
    prompt_lengths(rows, prompt_tokens)

    fabric = make_fabric(cfg.fabric)
    if fabric.world_size > 1:
        raise GenerationsError(f"generate runs in one process, but fabric.devices * fabric.num_nodes = "
                               f"{fabric.world_size}; generate with --set fabric.devices=1 (a run may still use more)")
    pcfg = p.model_copy(update={"cache": None})
    with torch.random.fork_rng(devices=[]):  # building it must not shift any later draw
        model = make_model(pcfg, splits, role=participant)
    if not pcfg.weights:
        weights = obtain_teacher_weights(cfg, participant, splits, fabric, quiet=quiet)
        load_into(model, load_weights(weights, what=f"trained {participant}"), source=f"trained {participant} {weights}")
    identity = teacher_identity(cfg, participant, missing=f"participants.{participant}: cannot record which teacher "
                                "generated the rows")
    teacher = Participant(participant, model, trainable=False)
    teacher.setup(fabric)
    total = len(rows) * samples
    with Progress(total=total, description=f"generate {participant} (rows)", enabled=not quiet and cfg.train.progress,
                  interval_s=10.0) as progress:
        generated = generate_rows(teacher.model, rows, prompt_tokens=prompt_tokens, temperature=temperature, seed=seed,
                                  samples=samples, batch_size=batch_size, device=fabric.device,
                                  forward_context=fabric.strategy.precision.forward_context, progress=progress)
    manifest = make_manifest(
        generated, source_rows=len(rows), samples=samples, vocab_size=splits.num_classes, prompt_tokens=prompt_tokens,
        temperature=temperature, seed=seed, batch_size=batch_size, participant=participant,
        data={"name": cfg.data.name, "options": cfg.data.options},
        dataset=rows_fingerprint(name=cfg.data.name, options=cfg.data.options, rows=rows),
        teacher=identity, created_by={"transfuse": __version__, "torch": torch.__version__})
    write_generations(out, generated, manifest, overwrite=overwrite)
    return {"out": str(out), "participant": participant, "rows": total, "block_size": generated.block_size,
            "generated_tokens": int((generated.labels != IGNORE_INDEX).sum()),
            "prompt_tokens": prompt_tokens, "temperature": float(temperature), "samples": samples, "seed": seed}


__all__ = [
    "FORMAT_VERSION", "GenerationsError", "KIND", "MANIFEST", "ROWS_FILE", "TEACHER_KEYS", "check_data", "check_options",
    "check_manifest", "check_teacher", "generate", "generate_rows", "make_manifest", "prompt_lengths", "read_generations", "read_manifest",
    "rows_fingerprint", "write_generations",
]
