"""The teacher-output cache: exact round trips, strict checks on open, and no half cache after a crash."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import transfuse.cache
from transfuse.cache import (
    FORMAT_VERSION, CacheError, CacheMismatchError, CacheWriter, FieldSpec, Manifest, TeacherCache, file_sha256,
    fingerprint,
)

F32 = {"kind": "dense", "dtype": "float32"}
F16 = {"kind": "dense", "dtype": "float16"}
IDENTITY = {"teacher_weights_sha256": "abc123", "teacher_model": "mlp", "dataset": "digits-train"}
TAP = "layer2.0.conv"  # a tap path: dots must not leak into file names


def _fields(dtype: dict = F32) -> dict[str, FieldSpec]:
    return {"logits": FieldSpec("logits", (10,), dtype), TAP: FieldSpec(TAP, (4, 2, 2), dtype)}


def _data(n: int = 23, seed: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Sparse, shuffled, partly negative ids (not 0..N-1) and random outputs (N, *shape)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randperm(1000, generator=g)[:n] * 7 - 500  # (N,)
    return ids, {"logits": torch.randn(n, 10, generator=g) * 5, TAP: torch.randn(n, 4, 2, 2, generator=g)}


def _write(out: Path, ids, outs, *, fields=None, sizes=(5, 1, 9, 8), **kw) -> None:
    """Write in batches of uneven sizes."""
    fields = fields or _fields()
    with CacheWriter(out, num_samples=len(ids), fields=fields, identity=kw.pop("identity", IDENTITY), **kw) as w:
        start = 0
        for size in sizes:
            sl = slice(start, start + size)
            w.write(ids[sl], {k: v[sl] for k, v in outs.items()})
            start += size
        assert start == len(ids)


def _leftovers(parent: Path) -> list[Path]:
    return [p for p in parent.iterdir() if p.name.startswith(".")]


def test_fp32_round_trip_is_bit_identical(tmp_path):
    ids, outs = _data()
    outs["logits"] = outs["logits"].double()  # any float dtype in; stored as float32
    _write(tmp_path / "c", ids, outs)
    cache = TeacherCache.open(tmp_path / "c", expect_identity=IDENTITY, require_fields=["logits", TAP])
    assert len(cache) == 23 and torch.equal(cache.sample_ids(), ids.sort().values)
    query = ids[torch.tensor([3, 0, 22, 3, 17])]  # out of order, with a repeat
    got = cache.lookup(query)
    assert got["logits"].dtype == torch.float32 and got[TAP].shape == (5, 4, 2, 2)
    pick = torch.tensor([3, 0, 22, 3, 17])
    assert torch.equal(got["logits"], outs["logits"][pick].float())
    assert torch.equal(got[TAP], outs[TAP][pick])
    only = cache.lookup(query[:2], fields=[TAP])
    assert list(only) == [TAP]
    assert cache.lookup(ids[:0])["logits"].shape == (0, 10)
    # No field name became a file name; no temp folder left behind.
    names = sorted(p.name for p in (tmp_path / "c").iterdir())
    assert "manifest.json" in names and "sample_ids.npy" in names and not any(TAP in n for n in names)
    assert _leftovers(tmp_path) == []
    # A pickled cache (DataLoader worker) reopens its files.
    again = pickle.loads(pickle.dumps(cache))
    assert torch.equal(again.lookup(query)["logits"], got["logits"])


def test_fp16_round_trip_within_precision(tmp_path):
    ids, outs = _data()
    _write(tmp_path / "c", ids, outs, fields=_fields(F16))
    got = TeacherCache.open(tmp_path / "c").lookup(ids)
    for name in outs:
        assert got[name].dtype == torch.float32
        assert ((got[name] - outs[name]).abs() <= 1e-3 * outs[name].abs() + 1e-4).all()  # fp16: 11-bit mantissa
        assert torch.equal(got[name], outs[name].half().float())


def test_fp16_overflow_is_refused(tmp_path):
    with pytest.raises(CacheError, match="float16 range"):
        with CacheWriter(tmp_path / "c", num_samples=1, fields={"logits": FieldSpec("logits", (2,), F16)},
                         identity={}) as w:
            w.write(torch.tensor([0]), {"logits": torch.tensor([[1e6, 0.0]])})
    assert not (tmp_path / "c").exists() and _leftovers(tmp_path) == []


def test_identity_mismatch_names_field_and_both_values(tmp_path):
    ids, outs = _data()
    _write(tmp_path / "c", ids, outs)
    want = {**IDENTITY, "teacher_weights_sha256": "fff999", "dataset": "other"}
    with pytest.raises(CacheMismatchError) as info:
        TeacherCache.open(tmp_path / "c", expect_identity=want)
    err = info.value
    assert (err.field, err.cached, err.expected) == ("teacher_weights_sha256", "abc123", "fff999")
    assert {d[0] for d in err.differences} == {"teacher_weights_sha256", "dataset"}
    for text in ("teacher_weights_sha256", "abc123", "fff999", "'dataset'", "digits-train", "other"):
        assert text in str(err)
    with pytest.raises(CacheMismatchError, match="'seed' is absent in the cache"):
        TeacherCache.open(tmp_path / "c", expect_identity={"seed": "1"})


def test_missing_required_field_and_unknown_id(tmp_path):
    ids, outs = _data()
    _write(tmp_path / "c", ids, outs)
    with pytest.raises(CacheMismatchError, match=r"no field 'layer3'.*'logits'.*'layer2\.0\.conv'"):
        TeacherCache.open(tmp_path / "c", require_fields=["logits", "layer3"])
    cache = TeacherCache.open(tmp_path / "c")
    missing = int(ids.max()) + 1
    with pytest.raises(CacheError, match=rf"no sample id\(s\) \[{missing}\]"):
        cache.lookup(torch.tensor([int(ids[0]), missing]))


def test_wrong_format_version_and_malformed_manifest(tmp_path):
    ids, outs = _data()
    _write(tmp_path / "c", ids, outs)
    manifest = tmp_path / "c" / "manifest.json"
    text = manifest.read_text()
    assert Manifest.from_json(text, source=manifest).format_version == FORMAT_VERSION
    manifest.write_text(text.replace(f'"format_version": {FORMAT_VERSION}', '"format_version": 99'))
    with pytest.raises(CacheError, match=r"manifest\.json.*format_version 99"):
        TeacherCache.open(tmp_path / "c")
    manifest.write_text(text.replace('"file": "field-000"', '"file": "../evil"'))
    with pytest.raises(CacheError, match="file stem"):
        TeacherCache.open(tmp_path / "c")
    manifest.write_text(text[: len(text) // 2])
    with pytest.raises(CacheError, match="not valid JSON"):
        TeacherCache.open(tmp_path / "c")


def test_truncated_data_file_says_delete_and_rebuild(tmp_path):
    ids, outs = _data()
    _write(tmp_path / "c", ids, outs)
    data = tmp_path / "c" / "field-001.values.npy"
    os.truncate(data, data.stat().st_size - 4)
    with pytest.raises(CacheError, match=r"field-001\.values\.npy.*truncated.*Delete the folder and re-run "
                                         r"`transfuse cache-teacher`"):
        TeacherCache.open(tmp_path / "c")


def test_exception_in_block_leaves_nothing(tmp_path):
    ids, outs = _data()
    with pytest.raises(RuntimeError, match="teacher crashed"):
        with CacheWriter(tmp_path / "c", num_samples=23, fields=_fields(), identity=IDENTITY) as w:
            w.write(ids[:5], {k: v[:5] for k, v in outs.items()})
            raise RuntimeError("teacher crashed")
    assert not (tmp_path / "c").exists() and _leftovers(tmp_path) == []


def test_a_killed_writers_folder_is_removed_by_the_next_writer(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that no longer runs
    (tmp_path / f".c.tmp-{dead.pid}-0badf00d").mkdir()
    (tmp_path / f".c.tmp-{os.getpid()}-00000001").mkdir()  # a live writer's (this process): kept
    (tmp_path / f".other.tmp-{dead.pid}-0badf00d").mkdir()  # another cache's: not ours to judge
    ids, outs = _data()
    _write(tmp_path / "c", ids, outs)
    assert sorted(p.name for p in _leftovers(tmp_path)) == [f".c.tmp-{os.getpid()}-00000001", f".other.tmp-{dead.pid}-0badf00d"]


def test_missing_or_duplicate_samples_at_exit(tmp_path):
    ids, outs = _data()
    with pytest.raises(CacheError, match="3 of 23 declared samples are missing"):
        with CacheWriter(tmp_path / "c", num_samples=23, fields=_fields(), identity=IDENTITY) as w:
            w.write(ids[:20], {k: v[:20] for k, v in outs.items()})
    assert not (tmp_path / "c").exists() and _leftovers(tmp_path) == []
    with pytest.raises(CacheError, match=r"sample id\(s\) \[.*\] were written more than once"):
        with CacheWriter(tmp_path / "c", num_samples=4, fields=_fields(), identity=IDENTITY) as w:
            w.write(ids[:2], {k: v[:2] for k, v in outs.items()})
            w.write(ids[1:3], {k: v[1:3] for k, v in outs.items()})
    assert not (tmp_path / "c").exists() and _leftovers(tmp_path) == []


def test_write_checks_shapes_and_fields(tmp_path):
    ids, outs = _data()
    with CacheWriter(tmp_path / "c", num_samples=23, fields=_fields(), identity=IDENTITY) as w:
        with pytest.raises(CacheError, match=r"'layer2\.0\.conv' has shape \(2, 4, 4\); expected \(2, 4, 2, 2\)"):
            w.write(ids[:2], {"logits": outs["logits"][:2], TAP: torch.zeros(2, 4, 4)})
        with pytest.raises(CacheError, match=r"miss field\(s\) \['layer2\.0\.conv'\]"):
            w.write(ids[:2], {"logits": outs["logits"][:2]})
        w.write(ids, outs)  # the failed writes stored nothing
    assert torch.equal(TeacherCache.open(tmp_path / "c").lookup(ids)["logits"], outs["logits"])


def test_overwrite(tmp_path):
    ids, outs = _data()
    _write(tmp_path / "c", ids, outs)
    with pytest.raises(CacheError, match="already exists; pass overwrite=True"):
        _write(tmp_path / "c", ids, outs)
    assert TeacherCache.open(tmp_path / "c", expect_identity=IDENTITY)  # untouched
    ids2, outs2 = _data(n=7, seed=1)
    _write(tmp_path / "c", ids2, outs2, sizes=(7,), identity={"dataset": "new"}, overwrite=True)
    cache = TeacherCache.open(tmp_path / "c", expect_identity={"dataset": "new"})
    assert len(cache) == 7 and torch.equal(cache.lookup(ids2)[TAP], outs2[TAP])
    assert _leftovers(tmp_path) == []


# A supervisor process imports torch once, then forks one real writer per scenario; the test
# SIGKILLs each writer by pid at the chosen point and the supervisor reports how it ended.
_SUPERVISOR = textwrap.dedent("""
    import json, os, sys, time, types
    # Load only transfuse.cache (and transfuse.atomic), not the whole toolkit: a fast, focused child.
    package = types.ModuleType("transfuse")
    package.__path__ = [sys.argv[1]]
    sys.modules["transfuse"] = package
    import torch
    from transfuse.cache import CacheWriter, FieldSpec

    def say(text):
        print(f"{os.getpid()} {text}", flush=True)

    def hold(supervisor):  # wait for the SIGKILL; give up if the supervisor is gone (a failed test)
        for _ in range(1200):
            if os.getppid() != supervisor:
                break
            time.sleep(0.05)

    def write(out, pause_at, supervisor):
        def reached(label):
            say(label)
            if label == pause_at:
                hold(supervisor)

        rename = os.rename
        def slow_rename(src, dst):  # manifest written and flushed, folder not yet published
            reached("rename")
            rename(src, dst)
        os.rename = slow_rename

        fields = {"logits": FieldSpec("logits", (10,), {"kind": "dense", "dtype": "float32"}),
                  "layer2.0": FieldSpec("layer2.0", (4, 2, 2), {"kind": "dense", "dtype": "float16"})}
        with CacheWriter(out, num_samples=160, fields=fields, identity={"dataset": "kill"}) as w:
            reached("open")
            for b in range(20):
                ids = torch.arange(b * 8, b * 8 + 8)
                w.write(ids, {"logits": ids[:, None].float().expand(8, 10), "layer2.0": torch.ones(8, 4, 2, 2)})
                reached(f"batch {b}")
                time.sleep(0.02)
        say("done")
        hold(supervisor)

    for out, pause_at in json.loads(sys.argv[2]):
        pid = os.fork()
        if pid == 0:
            try:
                write(out, pause_at, os.getppid())
            finally:
                os._exit(0)
        _, status = os.waitpid(pid, 0)
        print(f"{pid} exited {status}", flush=True)
""")


def test_sigkill_mid_write_leaves_no_cache(tmp_path):
    """Kill real writers at chosen points and at arbitrary moments: out_dir is absent or complete, never half."""
    # (pause_at, delay): the writer freezes at pause_at until killed; "never": killed `delay` s after "open".
    cases = [("batch 3", 0.0), ("rename", 0.0), ("done", 0.0), ("never", 0.1), ("never", 0.3)]
    outs = [tmp_path / f"run{i}" / "cache" for i in range(len(cases))]
    for out in outs:
        out.parent.mkdir()
    package_dir = str(Path(transfuse.cache.__file__).parents[1])  # the transfuse under test
    plan = json.dumps([[str(out), pause_at] for out, (pause_at, _) in zip(outs, cases)])
    proc = subprocess.Popen([sys.executable, "-c", _SUPERVISOR, package_dir, plan], stdout=subprocess.PIPE, text=True)
    watchdog = threading.Timer(60, proc.kill)  # never hang the suite on a stuck child
    watchdog.start()
    statuses = []
    try:
        for pause_at, delay in cases:
            for line in proc.stdout:
                pid, label = line.split(maxsplit=1)
                label = label.strip()
                if label == pause_at or (pause_at == "never" and label == "open"):
                    time.sleep(delay)  # a timed kill: the writer keeps going meanwhile
                    os.kill(int(pid), signal.SIGKILL)
                elif label.startswith("exited"):
                    statuses.append(int(label.split()[1]))
                    break
    finally:
        watchdog.cancel()
        proc.kill()
        proc.wait(timeout=30)
        proc.stdout.close()
    assert len(statuses) == len(cases), f"the supervisor stopped early: {statuses}"
    for (pause_at, _), out, status in zip(cases, outs, statuses):
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, (pause_at, status)
        leftovers = _leftovers(out.parent)
        if pause_at in ("batch 3", "rename"):  # killed before publishing: nothing at out
            assert not out.exists() and len(leftovers) == 1, (pause_at, leftovers)
        if pause_at == "rename":  # data and manifest complete, yet a temp folder is never a cache
            assert (leftovers[0] / "manifest.json").is_file()
        if pause_at == "done":
            assert out.exists() and leftovers == []
        if out.exists():
            cache = TeacherCache.open(out, expect_identity={"dataset": "kill"})
            got = cache.lookup(torch.arange(160))
            assert torch.equal(got["logits"][:, 0], torch.arange(160).float())
        for temp in leftovers:
            with pytest.raises(CacheError, match="temporary folder left by a cache write"):
                TeacherCache.open(temp)


def test_file_sha256_and_fingerprint(tmp_path):
    path = tmp_path / "w.bin"
    path.write_bytes(b"x" * 3_000_001)
    assert file_sha256(path, chunk_bytes=4096) == hashlib.sha256(b"x" * 3_000_001).hexdigest()
    ids = torch.arange(10)
    a = fingerprint(name="digits", split="train", ids=ids, labels=np.arange(10) % 3)
    assert a == fingerprint(labels=np.arange(10) % 3, ids=ids.clone(), split="train", name="digits")
    assert a != fingerprint(name="digits", split="train", ids=ids.to(torch.int32), labels=np.arange(10) % 3)
    assert a != fingerprint(name="digits", split="test", ids=ids, labels=np.arange(10) % 3)
    assert fingerprint(x=torch.tensor([1.0])) != fingerprint(x=torch.tensor([1.0 + 1e-7]))
    assert fingerprint(x=torch.ones(2, dtype=torch.bfloat16)) == fingerprint(x=torch.ones(2, dtype=torch.bfloat16))
    assert len(a) == 64
    with pytest.raises(TypeError, match=r"root.*PosixPath|root.*Path"):
        fingerprint(root=tmp_path)


def test_field_spec_validation():
    with pytest.raises(ValueError, match="'logits'.*'dtype' is 'int8'"):
        FieldSpec("logits", (10,), {"kind": "dense", "dtype": "int8"})
    with pytest.raises(ValueError, match="'kind' is 'quantized'"):
        FieldSpec("logits", (10,), {"kind": "quantized", "bits": 4})
    with pytest.raises(ValueError, match="topk encoding .*missing key"):  # top-k exists now (tests/test_cache_topk.py)
        FieldSpec("logits", (10,), {"kind": "topk", "k": 4})
    with pytest.raises(ValueError, match="positive ints"):
        FieldSpec("logits", (0,), F32)
    assert FieldSpec("logits", [10], F32).shape == (10,)
