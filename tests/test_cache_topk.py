"""The top-k teacher-output cache for language models: what it stores, how it reads back,
which losses accept it, and that a run from it is the run from the live teacher's top-k."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import transfuse.cache.manifest as manifest_module
from transfuse.cache import (
    CacheError, CacheMismatchError, CacheWriter, FieldSpec, Manifest, TeacherCache, TOPK_FORMAT_VERSION,
)
from transfuse.functional import TopKLogits, topk_divergence
from transfuse.losses import LOSSES

T, V, K = 5, 11, 4


def _topk_spec(k: int = K, dtype: str = "float32", shape=(T, V)) -> FieldSpec:
    return FieldSpec("logits", shape, {"kind": "topk", "k": k, "dtype": dtype, "index_dtype": "int32"})


def _logits(n: int = 9, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randperm(100, generator=g)[:n] + 1000  # ids unlike row numbers
    return ids, 3 * torch.randn(n, T, V, generator=g)  # (N,), (N, T, V)


def _write(out: Path, ids: torch.Tensor, logits: torch.Tensor, spec: FieldSpec) -> None:
    with CacheWriter(out, num_samples=len(ids), fields={"logits": spec}, identity={"teacher": "t"}) as writer:
        for part in (slice(0, 4), slice(4, None)):  # two batches
            writer.write(ids[part], {"logits": logits[part]})


def test_round_trip_is_the_top_k_of_the_log_softmax_with_its_tail(tmp_path):
    ids, logits = _logits()
    _write(tmp_path / "c", ids, logits, _topk_spec())
    cache = TeacherCache.open(tmp_path / "c", require_fields=["logits"])
    order = torch.tensor([5, 0, 8, 3])
    got = cache.lookup(ids[order])["logits"]
    assert isinstance(got, TopKLogits)
    want_lp, want_idx = F.log_softmax(logits[order], dim=-1).topk(K, dim=-1)
    assert torch.equal(got.logprobs, want_lp) and got.logprobs.dtype == torch.float32
    assert torch.equal(got.indices, want_idx) and got.indices.dtype == torch.int64
    assert got.tail.shape == (4, T) and got.shape == (4, T, V) and got.k == K
    torch.testing.assert_close(got.tail, 1 - want_lp.exp().sum(-1), rtol=0, atol=1e-6)
    # The tail is the other tokens' mass, by hand: every probability outside the top k.
    probs = logits[order].softmax(-1)
    outside = probs.sum(-1) - probs.gather(-1, want_idx).sum(-1)
    torch.testing.assert_close(got.tail, outside, rtol=1e-5, atol=1e-7)
    # On disk: indices as int32, the tail as float32, k and the version in the manifest.
    stored = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert stored["format_version"] == TOPK_FORMAT_VERSION == 2
    assert stored["fields"]["logits"]["encoding"] == {"kind": "topk", "k": K, "dtype": "float32", "index_dtype": "int32"}
    assert stored["fields"]["logits"]["shape"] == [T, V]
    assert np.load(tmp_path / "c" / "field-000.indices.npy", mmap_mode="r").dtype == np.int32
    assert np.load(tmp_path / "c" / "field-000.tail.npy", mmap_mode="r").shape == (9, T)


def test_float16_top_k_keeps_the_float32_tail_and_halves_the_log_probs(tmp_path):
    ids, logits = _logits()
    _write(tmp_path / "f32", ids, logits, _topk_spec())
    _write(tmp_path / "f16", ids, logits, _topk_spec(dtype="float16"))
    a = TeacherCache.open(tmp_path / "f32").lookup(ids)["logits"]
    b = TeacherCache.open(tmp_path / "f16").lookup(ids)["logits"]
    assert b.logprobs.dtype == torch.float32  # read back upcast
    torch.testing.assert_close(b.logprobs, a.logprobs.half().float(), rtol=0, atol=0)
    assert not torch.equal(b.logprobs, a.logprobs)  # it was rounded
    assert torch.equal(b.indices, a.indices)
    assert torch.equal(b.tail, a.tail)  # stored in float32 from the unrounded distribution
    size = lambda d: (tmp_path / d / "field-000.logprobs.npy").stat().st_size  # noqa: E731
    assert size("f16") - 128 == (size("f32") - 128) // 2  # 128-byte .npy header


def test_a_dense_cache_is_written_as_version_1_and_an_old_reader_refuses_a_top_k_one(tmp_path, monkeypatch):
    ids, logits = _logits()
    _write(tmp_path / "dense", ids, logits, FieldSpec("logits", (T, V), {"kind": "dense", "dtype": "float32"}))
    _write(tmp_path / "topk", ids, logits, _topk_spec())
    assert json.loads((tmp_path / "dense" / "manifest.json").read_text())["format_version"] == 1
    assert torch.equal(TeacherCache.open(tmp_path / "dense").lookup(ids)["logits"], logits)
    # A transfuse from before top-k reads version 1 only: it refuses the top-k cache at open, naming the version.
    monkeypatch.setattr(manifest_module, "READ_VERSIONS", {1: ("dense",)})
    with pytest.raises(CacheError, match=r"manifest\.json.*format_version 2, but this transfuse reads versions \[1\]"):
        TeacherCache.open(tmp_path / "topk")
    assert TeacherCache.open(tmp_path / "dense").manifest.format_version == 1
    monkeypatch.undo()
    # A version-1 manifest cannot hold a top-k field; a newer version asks for a newer transfuse.
    path = tmp_path / "topk" / "manifest.json"
    text = path.read_text()
    path.write_text(text.replace('"format_version": 2', '"format_version": 1'))
    with pytest.raises(CacheError, match="encoding kind 'topk', which format_version 1 does not hold"):
        TeacherCache.open(tmp_path / "topk")
    path.write_text(text.replace('"format_version": 2', '"format_version": 3'))
    with pytest.raises(CacheError, match="format_version 3.*upgrade transfuse"):
        TeacherCache.open(tmp_path / "topk")


def test_top_k_field_validation():
    with pytest.raises(ValueError, match="'logits'.*'k' is 12, more than the vocabulary V = 11"):
        _topk_spec(k=12)
    with pytest.raises(ValueError, match="'logits'.*'k' is 0"):
        _topk_spec(k=0)
    with pytest.raises(ValueError, match="'logits'.*missing key.*index_dtype"):
        FieldSpec("logits", (T, V), {"kind": "topk", "k": 2, "dtype": "float32"})
    with pytest.raises(ValueError, match="'dtype' is 'int8'"):
        _topk_spec(dtype="int8")
    with pytest.raises(ValueError, match="'kind' is 'quantized'; expected one of \\['dense', 'topk'\\]"):
        FieldSpec("logits", (V,), {"kind": "quantized"})


def test_cache_teacher_validates_k_and_the_field():
    from transfuse.cache_teacher import field_encoding
    from transfuse.errors import UserError

    assert field_encoding("logits", (T, V), dtype="float16", topk=V) == {
        "kind": "topk", "k": V, "dtype": "float16", "index_dtype": "int32"}
    assert field_encoding("layer.0", (T, 8), dtype="float32", topk=3) == {"kind": "dense", "dtype": "float32"}
    with pytest.raises(UserError, match=r"--topk 12: must be between 1 and the vocabulary V = 11 of field 'logits'"):
        field_encoding("logits", (T, V), dtype="float32", topk=12)
    with pytest.raises(UserError, match=r"field 'logits' has shape \(\) per sample, not logits"):
        field_encoding("logits", (), dtype="float32", topk=1)


def test_the_stored_tail_gives_the_recomputed_value_and_k_equal_v_the_full_divergence():
    g = torch.Generator().manual_seed(1)
    student, teacher = torch.randn(3, T, V, generator=g), 2 * torch.randn(3, T, V, generator=g)
    top = TopKLogits.from_logits(teacher, K)
    for divergence in ("fkl", "rkl", "tvd", "jsd", "skew_fkl", "skew_rkl"):
        stored = topk_divergence(student, top.logprobs, top.indices, topk_tail=top.tail, divergence=divergence)
        recomputed = topk_divergence(student, top.logprobs, top.indices, divergence=divergence)
        torch.testing.assert_close(stored, recomputed, rtol=1e-5, atol=1e-6)
    every = TopKLogits.from_logits(teacher, V)
    assert torch.equal(every.tail, torch.zeros(3, T))
    for name in ("fkl", "rkl", "tvd", "jsd", "skew_fkl", "skew_rkl"):
        loss = LOSSES.get(name).build()
        torch.testing.assert_close(loss(student, every), loss(student, teacher), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name,options", [("fkl", {"temperature": 2.0}), ("rkl", {}), ("tvd", {}),
                                          ("jsd", {"beta": 0.3}), ("skew_fkl", {"alpha": 0.2}),
                                          ("skew_rkl", {"alpha": 0.4, "temperature": 0.5})])
def test_divergence_losses_route_a_top_k_teacher_to_topk_divergence_with_their_options(name, options):
    g = torch.Generator().manual_seed(2)
    student = torch.randn(2, T, V, generator=g, requires_grad=True)
    top = TopKLogits.from_logits(3 * torch.randn(2, T, V, generator=g), K)
    mask = torch.rand(2, T, generator=g) > 0.3
    got = LOSSES.get(name).build(**options)(student, top, mask=mask)
    want = topk_divergence(student, top.logprobs, top.indices, topk_tail=top.tail, divergence=name, mask=mask,
                           **options)
    assert torch.equal(got, want)
    got.backward()
    assert student.grad is not None and student.grad[~mask].abs().sum() == 0  # masked-out positions get nothing


def test_adaptive_kl_does_not_take_a_top_k_teacher():
    from transfuse.losses.divergences import accepts_topk, topk_losses

    assert topk_losses() == ["fkl", "jsd", "rkl", "skew_fkl", "skew_rkl", "tvd"]
    assert not accepts_topk(LOSSES.get("adaptive_kl")) and not accepts_topk(LOSSES.get("taid"))


# -- runs -----------------------------------------------------------------------------------------

VOCAB = 32


def _lm_config(tmp_path: Path, *, method: str = "fkl", steps: int = 6, cache: str | None = None) -> dict:
    return {
        "name": "lm-topk", "seed": 0,
        "data": {"name": "markov", "options": {"vocab": VOCAB, "block_size": 12, "num_train": 48, "num_test": 16}},
        "student": {"name": "causal_lm", "options": {"layers": 1, "width": 16, "heads": 2}},
        "teacher": {"name": "causal_lm", "options": {"layers": 1, "width": 32, "heads": 2},
                    "train": {"steps": 10, "batch_size": 16, "optim": {"name": "adam", "lr": 0.01}},
                    "cache_dir": str(tmp_path / "teachers"), "cache": cache},
        "distill": {"method": method},
        "optim": {"name": "adam", "lr": 0.01},
        "train": {"steps": steps, "batch_size": 8, "log_every": 1, "checkpoint_every": steps, "progress": False},
        "fabric": {"accelerator": "cpu"},
    }


def _losses(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r["loss"] for r in rows if "loss" in r]


@pytest.fixture(scope="module")
def lm_caches(tmp_path_factory):
    """One trained teacher, cached dense, as top-V, and as top-16 (float32)."""
    from transfuse.cache_teacher import cache_teacher
    from transfuse.config import config_from_dict

    root = tmp_path_factory.mktemp("lm")
    cfg = config_from_dict(_lm_config(root))
    out = {"root": root}
    for name, topk in (("dense", None), ("full", VOCAB), ("top16", 16)):
        report = cache_teacher(cfg, root / name, topk=topk, quiet=True)
        assert report["topk"] == topk
        out[name] = root / name
    return out


def test_a_top_v_cache_runs_exactly_as_the_dense_cache(lm_caches):
    from transfuse.config import config_from_dict
    from transfuse.run import run

    root = lm_caches["root"]
    run(config_from_dict(_lm_config(root, cache=str(lm_caches["dense"]))), out_dir=root / "run-dense", quiet=True)
    run(config_from_dict(_lm_config(root, cache=str(lm_caches["full"]))), out_dir=root / "run-full", quiet=True)
    dense, full = _losses(root / "run-dense"), _losses(root / "run-full")
    assert len(dense) == 6
    np.testing.assert_allclose(full, dense, rtol=1e-4, atol=1e-6)


def test_a_top_16_cache_trains_and_its_loss_is_topk_divergence_on_the_live_teachers_top_16(lm_caches):
    from transfuse.build import load_student_data, make_distiller, teacher_weights_path
    from transfuse.checkpoint import load_into, load_weights
    from transfuse.config import config_from_dict
    from transfuse.data.base import collate_batch
    from transfuse.run import run

    root = lm_caches["root"]
    cached_cfg = config_from_dict(_lm_config(root, cache=str(lm_caches["top16"])))
    live_cfg = config_from_dict(_lm_config(root))
    splits, train_set, _ = load_student_data(cached_cfg.data)
    cached, live = make_distiller(cached_cfg, splits, train_set), make_distiller(live_cfg, splits, train_set)
    teacher_model = live.participants["teacher"].model
    load_into(teacher_model, load_weights(teacher_weights_path(live_cfg, "teacher"), what="teacher"), source="teacher")
    cached.eval(), live.eval(), teacher_model.eval()
    batch = collate_batch([train_set[i] for i in range(8)])
    with torch.no_grad():
        got = cached(batch, 0)["parts"]["fkl"]
        student = live.participants["student"].model(batch)  # the same initial student (same seed)
        teacher = teacher_model(batch)  # (8, 12, V) the live teacher
        top = TopKLogits.from_logits(teacher, 16)
        want = topk_divergence(student, top.logprobs, top.indices, mask=batch["predicted"])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got, F.kl_div(student.log_softmax(-1), teacher.log_softmax(-1), log_target=True,
                                            reduction="none").sum(-1)[batch["predicted"]].mean())
    # It trains: the divergence falls over a short run.
    cfg = config_from_dict(_lm_config(root, steps=20, cache=str(lm_caches["top16"])))
    run(cfg, out_dir=root / "run-top16", quiet=True)
    losses = _losses(root / "run-top16")
    assert all(np.isfinite(losses)) and np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5])


def test_taid_with_a_top_k_cache_is_refused_before_training(lm_caches):
    from transfuse.config import config_from_dict
    from transfuse.run import run

    root = lm_caches["root"]
    cfg = config_from_dict(_lm_config(root, method="taid", cache=str(lm_caches["top16"])))
    with pytest.raises(CacheMismatchError) as err:
        run(cfg, out_dir=root / "run-taid", quiet=True)
    message = str(err.value)
    assert "term 'taid'" in message and "participant 'teacher'" in message
    assert str(lm_caches["top16"]) in message and "top-16" in message
    assert "fkl, jsd, rkl, skew_fkl, skew_rkl, tvd" in message
    assert not (root / "run-taid" / "metrics.jsonl").exists()  # nothing trained


def test_an_ensemble_over_a_top_k_cache_is_refused_and_a_dense_reader_of_another_field_is_not(tmp_path):
    from transfuse.distiller import Ref
    from transfuse.sources import CachedOutputs, Ensemble, check_topk_readers

    ids, logits = _logits()
    with CacheWriter(tmp_path / "c", num_samples=len(ids), identity={"teacher": "t"},
                     fields={"logits": _topk_spec(), "hint": FieldSpec("hint", (3,), {"kind": "dense", "dtype": "float32"})}) as w:
        w.write(ids, {"logits": logits, "hint": torch.randn(len(ids), 3)})
    teacher = CachedOutputs("teacher", TeacherCache.open(tmp_path / "c"))
    assert teacher.topk_fields == {"logits": K}
    sources = {"teacher": teacher, "teachers": Ensemble("teachers", ["teacher"])}
    fkl, fitnet = LOSSES.get("fkl"), LOSSES.get("fitnet")
    check_topk_readers(sources, [("fkl", fkl, Ref("student"), Ref("teacher")),  # fkl reads top-k: fine
                                 ("hint", fitnet, Ref("student", "hint"), Ref("teacher", "hint"))])  # a dense field
    with pytest.raises(CacheMismatchError, match=r"source 'teachers' \(Ensemble\) combines its members' dense outputs, "
                                                 r"but participant 'teacher'.*top-4 tokens only"):
        check_topk_readers(sources, [("kd", fkl, Ref("student"), Ref("teachers"))])
    with pytest.raises(CacheMismatchError, match=r"term 'hint' \(fitnet: student.logits -> teacher.logits\)"):
        check_topk_readers(sources, [("hint", fitnet, Ref("student"), Ref("teacher"))])


def test_cache_teacher_refuses_top_k_for_a_config_whose_terms_need_the_full_distribution(tmp_path, monkeypatch):
    """Refused before the teacher is trained or run: nothing is written."""
    from types import SimpleNamespace

    import transfuse.cache_teacher as cache_teacher_module
    from transfuse.cache_teacher import cache_teacher
    from transfuse.config import config_from_dict
    from transfuse.errors import UserError

    cfg = config_from_dict(_lm_config(tmp_path, method="taid"))
    with pytest.raises(UserError, match="term 'taid' reads teacher.logits with loss 'taid'.*fkl"):
        cache_teacher(cfg, tmp_path / "c", topk=4, quiet=True)
    assert not (tmp_path / "c").exists() and not (tmp_path / "teachers").exists()
    # Several processes: a stand-in for the Fabric (a real DDP Fabric would set process-wide
    # distributed state that later tests' subprocesses would inherit).
    monkeypatch.setattr(cache_teacher_module, "make_fabric", lambda _cfg: SimpleNamespace(world_size=2))
    with pytest.raises(UserError, match="one process; this config runs 2 processes"):
        cache_teacher(config_from_dict(_lm_config(tmp_path)), tmp_path / "c", quiet=True)
