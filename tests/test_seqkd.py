"""Sequence-level KD: the teacher's generations are made once (prompts kept, only generated
tokens labelled, seeded), stored atomically with a manifest, checked against the run's data
and teacher, and a run trains on them and reports perplexity on the real test text."""

from __future__ import annotations

import json
import os

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")

from transfuse import seqkd  # noqa: E402
from transfuse.cli import main  # noqa: E402
from transfuse.config import ConfigError, config_from_dict  # noqa: E402
from transfuse.data import TokenRows  # noqa: E402
from transfuse.data.text import IGNORE_INDEX, prompt_completion_rows  # noqa: E402
from transfuse.models import build_model  # noqa: E402
from transfuse.run import run  # noqa: E402
from transfuse.seqkd import GenerationsError, generate, generate_rows, read_generations, write_generations  # noqa: E402

VOCAB, T = 20, 10


class _Next(nn.Module):
    """A 'language model' whose next token is always the last token + 1 (mod VOCAB)."""

    def forward(self, x):
        ids = x["input_ids"] if isinstance(x, dict) else x
        return torch.nn.functional.one_hot((ids + 1) % VOCAB, VOCAB).float() * 30.0  # (B, t, V)


def _tiny_lm(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model("causal_lm", input_shape=(T,), num_classes=VOCAB, layers=1, width=16, heads=2)


def test_generated_rows_keep_the_prompt_and_only_generated_tokens_carry_loss():
    rows = TokenRows(torch.randint(VOCAB, (3, T)), ids=torch.tensor([10, 11, 12]))
    out = generate_rows(_Next(), rows, prompt_tokens=4, temperature=1.0, seed=0)
    assert torch.equal(out.input_ids[:, :4], rows.input_ids[:, :4])
    for t in range(4, T):  # each generated token is the previous one + 1, as the model says
        assert torch.equal(out.input_ids[:, t], (out.input_ids[:, t - 1] + 1) % VOCAB)
    assert (out.labels[:, :4] == IGNORE_INDEX).all() and torch.equal(out.labels[:, 4:], out.input_ids[:, 4:])
    assert (out.attention_mask == 1).all()
    # Position t predicts token t + 1: positions 3..T-2 carry loss, T - 4 per row.
    assert out.__getitems__([0, 1, 2])["predicted"].sum(1).tolist() == [T - 4] * 3
    assert out.fields["source_id"].tolist() == [10, 11, 12] and out.sample_ids.tolist() == [0, 1, 2]

    # Prompt/completion rows keep their own prompts (of different lengths); padding is generated over.
    pairs = [([1, 2], [3, 4]), ([5, 6, 7, 8, 9], [1])]
    chat = prompt_completion_rows(pairs, block_size=T, pad_id=0)
    out = generate_rows(_Next(), chat, prompt_tokens=None, temperature=1.0, seed=0)
    assert out.input_ids[0].tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
    assert out.input_ids[1].tolist() == [5, 6, 7, 8, 9, 10, 11, 12, 13, 14]
    assert out.labels[0].tolist() == [IGNORE_INDEX] * 2 + list(range(3, 11))
    assert out.labels[1].tolist() == [IGNORE_INDEX] * 5 + list(range(10, 15))


def test_plain_text_rows_need_prompt_tokens_and_bad_options_are_refused():
    rows = TokenRows(torch.randint(VOCAB, (2, T)))
    with pytest.raises(GenerationsError, match="no prompt of their own.*--prompt-tokens"):
        generate_rows(_Next(), rows, prompt_tokens=None, temperature=1.0, seed=0)
    with pytest.raises(GenerationsError, match=r"prompt_tokens must be an integer in \[1, 9\]"):
        generate_rows(_Next(), rows, prompt_tokens=T, temperature=1.0, seed=0)
    with pytest.raises(GenerationsError, match="greedy decoding gives the same row"):
        generate_rows(_Next(), rows, prompt_tokens=2, temperature=0.0, seed=0, samples=2)
    with pytest.raises(GenerationsError, match="temperature must be a finite number >= 0"):
        generate_rows(_Next(), rows, prompt_tokens=2, temperature=-1.0, seed=0)


def test_generation_is_deterministic_per_seed_and_leaves_the_callers_rng_alone():
    model = _tiny_lm()
    rows = TokenRows(torch.randint(VOCAB, (6, T)))
    torch.manual_seed(123)
    a = generate_rows(model, rows, prompt_tokens=3, temperature=1.0, seed=7, batch_size=4)
    after = torch.rand(3)
    torch.manual_seed(123)
    b = generate_rows(model, rows, prompt_tokens=3, temperature=1.0, seed=7, batch_size=4)
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.labels, b.labels)
    assert torch.equal(torch.rand(3), after)  # the draws came from a forked RNG
    c = generate_rows(model, rows, prompt_tokens=3, temperature=1.0, seed=8, batch_size=4)
    assert not torch.equal(a.input_ids, c.input_ids)
    assert model.training  # the model's mode is restored


def test_several_samples_per_row_come_in_row_major_order():
    rows = TokenRows(torch.randint(VOCAB, (2, T)), ids=torch.tensor([5, 9]))
    out = generate_rows(_tiny_lm(), rows, prompt_tokens=3, temperature=2.0, seed=0, samples=3)
    assert len(out) == 6 and out.fields["source_id"].tolist() == [5, 5, 5, 9, 9, 9]
    assert torch.equal(out.input_ids[:3, :3], rows.input_ids[[0, 0, 0], :3])
    assert torch.equal(out.input_ids[3:, :3], rows.input_ids[[1, 1, 1], :3])
    assert len({tuple(r) for r in out.input_ids[:3, 3:].tolist()}) > 1  # sampled: the three differ


def test_greedy_generation_is_argmax_decoding():
    """temperature 0: each generated token is the argmax of the model's prediction given
    the row so far (restated here by re-reading the whole prefix at every position)."""
    model = _tiny_lm().eval()
    rows = TokenRows(torch.randint(VOCAB, (4, T)))
    out = generate_rows(model, rows, prompt_tokens=3, temperature=0.0, seed=0)
    want = rows.input_ids.clone()
    with torch.no_grad():
        for t in range(3, T):
            want[:, t] = model(want[:, :t])[:, -1, :].argmax(-1)
    assert torch.equal(out.input_ids, want)
    again = generate_rows(model, rows, prompt_tokens=3, temperature=0.0, seed=99)
    assert torch.equal(again.input_ids, want)  # greedy draws nothing: the seed does not matter


def _config(tmp_path, **data) -> dict:
    return {
        "name": "seqkd", "seed": 0,
        "data": {"name": "markov", "options": {"block_size": 12, "num_train": 48, "num_test": 24}, **data},
        "student": {"name": "causal_lm", "options": {"layers": 1, "width": 16, "heads": 2}},
        "teacher": {"name": "causal_lm", "options": {"layers": 1, "width": 32, "heads": 2},
                    "train": {"steps": 15, "batch_size": 16, "optim": {"name": "adam", "lr": 0.003}},
                    "cache_dir": str(tmp_path / "teachers")},
        "distill": {"method": "none"},
        "optim": {"name": "adam", "lr": 0.003},
        "train": {"steps": 6, "batch_size": 16, "log_every": 3, "checkpoint_every": 6, "progress": False},
    }


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    """One generations folder of a tiny trained teacher on Markov rows, shared by the checks."""
    tmp = tmp_path_factory.mktemp("seqkd")
    cfg = _config(tmp)
    report = generate(config_from_dict(cfg), tmp / "gen", prompt_tokens=4, temperature=1.0, quiet=True)
    return tmp, cfg, report


def test_generate_writes_rows_and_a_manifest_that_records_how(generated):
    tmp, cfg, report = generated
    rows, manifest = read_generations(tmp / "gen")
    assert report["rows"] == len(rows) == manifest["count"] == 48
    assert report["generated_tokens"] == int((rows.labels != IGNORE_INDEX).sum()) == 48 * (12 - 4)
    assert (manifest["prompt_tokens"], manifest["temperature"], manifest["seed"]) == (4, 1.0, 0)
    assert manifest["data"] == {"name": "markov", "options": cfg["data"]["options"]}
    assert set(manifest["teacher"]) == {"teacher_model", "teacher_weights_sha256", "precision"}
    assert "domain" in rows.fields  # the Markov rows' domains travel with their generations
    # The prompts are the training rows' own first 4 tokens.
    from transfuse.build import load_splits

    train = load_splits(config_from_dict(cfg).data).train
    assert torch.equal(rows.input_ids[:, :4], train.input_ids[:, :4])
    # The same command gives the same rows.
    generate(config_from_dict(cfg), tmp / "again", prompt_tokens=4, temperature=1.0, quiet=True)
    assert torch.equal(read_generations(tmp / "again")[0].input_ids, rows.input_ids)


@pytest.mark.parametrize("change, message", [
    ({"data": {"options": {"block_size": 12, "num_train": 49, "num_test": 24}}}, "other training rows.*fingerprint"),
    ({"data": {"options": {"block_size": 11, "num_train": 48, "num_test": 24}}}, "rows of 12 tokens.*rows of 11"),
    ({"data": {"options": {"block_size": 12, "num_train": 48, "num_test": 24, "vocab": 15}}}, "vocabulary of 16.*has 15"),
    ({"teacher": {"options": {"layers": 1, "width": 16, "heads": 2}}}, "another 'teacher'.*teacher_model"),
])
def test_a_run_refuses_generations_of_other_data_or_another_teacher(generated, change, message):
    tmp, cfg, _ = generated
    bad = {**cfg, **{k: {**cfg[k], **v} for k, v in change.items()}}
    bad["data"]["generations"] = str(tmp / "gen")
    with pytest.raises(GenerationsError, match=f"data.generations: .*{message}"):
        run(config_from_dict(bad), out_dir=tmp / "refused", quiet=True)
    assert not (tmp / "refused").exists()  # refused before anything was written


def test_a_teacher_with_other_weights_is_refused(generated, tmp_path):
    tmp, cfg, _ = generated
    from transfuse.build import teacher_weights_path
    from transfuse.checkpoint import load_weights, save_weights

    state = load_weights(teacher_weights_path(config_from_dict(cfg), "teacher"))
    save_weights(tmp_path / "other.safetensors", {k: v + 0.01 if v.is_floating_point() else v for k, v in state.items()})
    bad = {**cfg, "data": {**cfg["data"], "generations": str(tmp / "gen")},
           "teacher": {**cfg["teacher"], "weights": str(tmp_path / "other.safetensors")}}
    with pytest.raises(GenerationsError, match="teacher_weights_sha256"):
        run(config_from_dict(bad), out_dir=tmp_path / "run", quiet=True)


def test_a_damaged_or_missing_folder_is_refused_naming_the_field(generated, tmp_path):
    tmp, cfg, _ = generated
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tmp / "gen", broken)
    doc = json.loads((broken / "manifest.json").read_text())
    (broken / "manifest.json").write_text(json.dumps({**doc, "format_version": 99}))
    with pytest.raises(GenerationsError, match="data.generations: .*format_version is 99"):
        read_generations(broken)
    (broken / "manifest.json").write_text(json.dumps({**doc, "count": 47, "source_rows": 47}))
    with pytest.raises(GenerationsError, match=r"input_ids in rows.safetensors is torch.int64 \(48, 12\).*\(47, 12\)"):
        read_generations(broken)
    for folder, message in ((tmp_path / "nowhere", "is not there"), (tmp_path, "has no manifest.json")):
        bad = {**cfg, "data": {**cfg["data"], "generations": str(folder)}}
        with pytest.raises(GenerationsError, match=f"data.generations: .*{message}"):
            run(config_from_dict(bad), out_dir=tmp_path / "run", quiet=True)


@pytest.mark.parametrize("extra, field", [
    ({"label_subset": 10}, "label_subset"), ({"holdout_fraction": 0.2}, "holdout_fraction"),
    ({"transfer": {"name": "markov"}}, "transfer"), ({"novel_classes": [1]}, "novel_classes"),
])
def test_parts_of_the_real_split_cannot_be_combined_with_generations(tmp_path, extra, field):
    with pytest.raises(ConfigError, match=f"generations: .*so {field} .*leave {field} out"):
        config_from_dict(_config(tmp_path, generations="gen", **extra))


def test_a_teacher_output_cache_is_refused_with_generations(tmp_path):
    cfg = _config(tmp_path, generations="gen")
    cfg["teacher"]["cache"] = "cache"
    with pytest.raises(ConfigError, match="participants.teacher.cache: .*not on the generated rows"):
        config_from_dict(cfg)


def test_cli_generate_then_run_trains_on_the_generations_and_reports_perplexity(tmp_path, capsys):
    path = tmp_path / "seqkd.yaml"
    import yaml

    path.write_text(yaml.safe_dump(_config(tmp_path)))
    assert main(["generate", str(path), "--out", str(tmp_path / "gen"), "--prompt-tokens", "3", "--temperature", "0",
                 "--quiet"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["rows"] == 48 and report["temperature"] == 0.0
    assert main(["generate", str(path), "--out", str(tmp_path / "gen"), "--prompt-tokens", "3"]) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert main(["run", str(path), "--set", f"data.generations={tmp_path / 'gen'}", "--out", str(tmp_path / "run"),
                 "--quiet"]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["student"]["perplexity"] > 1 and summary["student_train_samples"] == 48
    # Its training set is the generated rows; its test split the data set's own.
    from transfuse.build import load_splits, load_student_data

    cfg = config_from_dict({**_config(tmp_path, generations=str(tmp_path / "gen"))})
    splits, train_set, _ = load_student_data(cfg.data)
    assert torch.equal(train_set.input_ids, read_generations(tmp_path / "gen")[0].input_ids)
    assert torch.equal(splits.test.input_ids, load_splits(config_from_dict(_config(tmp_path)).data).test.input_ids)
    # Seq-KD + Word-KD: the live teacher (the one that generated, found by its content hash) adds a forward KL.
    both = cfg.model_copy(update={"distill": cfg.distill.model_copy(update={"method": "fkl", "ce_weight": 1.0})})
    summary = run(config_from_dict(both.model_dump()), out_dir=tmp_path / "both", quiet=True)
    assert set(summary["terms"]) == {"ce", "fkl"} and summary["teacher"]["perplexity"] > 1


def test_a_failed_write_leaves_no_folder_and_keeps_the_old_one(tmp_path, monkeypatch):
    rows = generate_rows(_Next(), TokenRows(torch.randint(VOCAB, (3, T))), prompt_tokens=2, temperature=1.0, seed=0)
    manifest = seqkd.make_manifest(rows, source_rows=3, samples=1, vocab_size=VOCAB, prompt_tokens=2, temperature=1.0,
                                   seed=0, batch_size=64, participant="teacher", data={"name": "x", "options": {}},
                                   dataset="d", teacher={k: "t" for k in seqkd.TEACHER_KEYS})

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(seqkd, "save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        write_generations(tmp_path / "gen", rows, manifest)
    assert os.listdir(tmp_path) == []  # neither the folder nor its temporary sibling
    monkeypatch.undo()
    (tmp_path / ".gen.tmp-999999999-0badf00d").mkdir()  # left by a killed write: cleared by the next one
    write_generations(tmp_path / "gen", rows, manifest)
    monkeypatch.setattr(seqkd, "save_file", broken_save)
    with pytest.raises(OSError):
        write_generations(tmp_path / "gen", rows, manifest, overwrite=True)
    assert os.listdir(tmp_path) == ["gen"] and torch.equal(read_generations(tmp_path / "gen")[0].input_ids, rows.input_ids)
    with pytest.raises(GenerationsError, match="already exists; pass --overwrite"):
        write_generations(tmp_path / "gen", rows, manifest)
