"""Causal-LM distillation on the one engine: predicted positions are the default mask, the
loss divides by the predicted positions only (T - 1 per full row, prompts and padding out),
and a run reports perplexity and, on Markov text, the KL to the true distribution."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from transfuse.config import config_from_dict  # noqa: E402
from transfuse.data import TokenRows  # noqa: E402
from transfuse.distiller import Distiller, Term  # noqa: E402
from transfuse.functional import fkl  # noqa: E402
from transfuse.losses import LOSSES  # noqa: E402
from transfuse.models import build_model  # noqa: E402
from transfuse.participants import Participant  # noqa: E402
from transfuse.run import run  # noqa: E402

VOCAB, T = 24, 12


def _distiller(term_loss: str = "fkl") -> Distiller:
    torch.manual_seed(0)
    # A context longer than the rows, so padded rows fit.
    student = build_model("causal_lm", input_shape=(T,), num_classes=VOCAB, layers=1, width=16, heads=2, context=32)
    teacher = build_model("causal_lm", input_shape=(T,), num_classes=VOCAB, layers=1, width=32, heads=2, context=32)
    terms = [Term(name=term_loss, loss=LOSSES.get(term_loss).build(), input="student.logits", target="teacher.logits")]
    return Distiller([Participant("student", student), Participant("teacher", teacher, trainable=False)], terms)


def test_a_full_row_predicts_t_minus_1_positions_and_the_loss_divides_by_them():
    """16 x 128 rows, every token labelled: 16 * 127 = 2,032 positions carry loss, not 2,048."""
    rows = TokenRows(torch.randint(VOCAB, (16, 128)))
    batch = rows.__getitems__(list(range(16)))
    assert int(batch["predicted"].sum()) == 16 * 127
    assert not batch["predicted"][:, -1].any()
    assert torch.equal(batch["target"][:, :-1], batch["labels"][:, 1:])


def test_the_default_mask_is_the_predicted_positions_so_padding_and_prompts_change_nothing():
    distiller = _distiller().eval()
    ids = torch.randint(VOCAB, (2, T))
    labels = ids.clone()
    labels[0, :4] = -100  # a prompt: its tokens are not targets
    full = TokenRows(ids, labels=labels).__getitems__([0, 1])
    with torch.no_grad():
        out = distiller(full, 0)
        s = distiller.participants["student"].model(full)  # (2, T, V)
        t = distiller.participants["teacher"].model(full)
    # By hand: position t predicts token t + 1; the prompt's tokens 1..3 and the last position are out.
    keep = torch.ones(2, T, dtype=torch.bool)
    keep[0, :3] = False
    keep[:, -1] = False
    want = fkl(s[keep], t[keep])
    torch.testing.assert_close(out["parts"]["fkl"], want)
    # Right-padding the rows with 5 masked tokens leaves the loss as it was.
    pad = 5
    padded_ids = torch.cat([ids, torch.zeros(2, pad, dtype=torch.long)], dim=1)
    padded_mask = torch.cat([torch.ones(2, T, dtype=torch.long), torch.zeros(2, pad, dtype=torch.long)], dim=1)
    padded_labels = torch.cat([labels, torch.full((2, pad), -100)], dim=1)
    padded = TokenRows(padded_ids, padded_mask, padded_labels).__getitems__([0, 1])
    with torch.no_grad():
        torch.testing.assert_close(distiller(padded, 0)["parts"]["fkl"], out["parts"]["fkl"], rtol=1e-5, atol=1e-6)


def test_a_markov_run_reports_perplexity_and_kl_to_truth_and_distillation_moves_toward_the_teacher(tmp_path):
    cfg = {
        "name": "lm", "seed": 0,
        "data": {"name": "markov", "options": {"block_size": 24, "num_train": 300, "num_test": 60}},
        "student": {"name": "causal_lm", "options": {"layers": 1, "width": 32, "heads": 2}},
        "teacher": {"name": "causal_lm", "options": {"layers": 2, "width": 64, "heads": 2},
                    "train": {"steps": 120, "batch_size": 32, "optim": {"name": "adam", "lr": 0.003}},
                    "cache_dir": str(tmp_path / "cache")},
        "distill": {"method": "fkl"},
        "optim": {"name": "adam", "lr": 0.003},
        "train": {"steps": 60, "batch_size": 16, "log_every": 20, "checkpoint_every": 60, "progress": False},
    }
    summary = run(config_from_dict(cfg), out_dir=tmp_path / "fkl", quiet=True)
    student, teacher = summary["student"], summary["teacher"]
    for entry in (student, teacher):
        assert entry["perplexity"] == pytest.approx(math.exp(entry["nll"]))
        assert entry["kl_to_truth"] > 0
    # The student is also written for plain transformers, the same model.
    import transformers

    plain = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "fkl" / "student-hf"), local_files_only=True)
    ids = torch.randint(16, (2, 24))
    ours = build_model("causal_lm", input_shape=(24,), num_classes=plain.config.vocab_size, layers=1, width=32, heads=2)
    from safetensors.torch import load_file

    ours.load_state_dict(load_file(tmp_path / "fkl" / "student.safetensors"))
    torch.testing.assert_close(plain.eval()(input_ids=ids).logits, ours.eval()(ids))
    # The trained teacher is closer to the truth than a student trained for 60 steps, and
    # distillation brings the student closer to the truth than where it started.
    assert teacher["kl_to_truth"] < student["kl_to_truth"]
    start = run(config_from_dict({**cfg, "train": {**cfg["train"], "steps": 1, "checkpoint_every": 1}}),
                out_dir=tmp_path / "start", quiet=True)["student"]
    assert student["kl_to_truth"] < start["kl_to_truth"] - 0.1


def _padded_rows(n: int = 32) -> TokenRows:
    """Rows of very different lengths (right-padded) and prompts, so micro-batches hold
    very different numbers of predicted positions."""
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(VOCAB, (n, T), generator=g)
    lengths = torch.randint(3, T + 1, (n,), generator=g)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).long()
    labels = torch.where(mask.bool(), ids, torch.full((), -100))
    labels[: n // 2, :2] = -100  # prompts on half the rows
    return TokenRows(ids * mask, mask, labels)


def _fit_lm(tmp_path, *, batch_size: int, accumulate: int):
    from lightning_fabric import Fabric

    from transfuse.engine import FitSettings, fit
    from transfuse.optim import make_optimizer

    torch.manual_seed(0)
    student = build_model("causal_lm", input_shape=(T,), num_classes=VOCAB, layers=1, width=16, heads=2)
    distiller = Distiller([Participant("student", student)],
                          [Term(name="ce", loss=LOSSES.get("ce").build(), input="student.logits", target=None)])
    optimizer = make_optimizer(distiller.parameters(), name="sgd", lr=0.5, momentum=0.0)
    settings = FitSettings(steps=4, batch_size=batch_size, accumulate=accumulate, seed=1, log_every=2,
                           checkpoint_every=4, progress=False)
    fit(Fabric(accelerator="cpu", devices=1), distiller, optimizer, _padded_rows(), settings,
        run_dir=tmp_path / f"b{batch_size}a{accumulate}")
    return student


def test_gradient_accumulation_gives_the_step_of_one_big_batch_whatever_the_padding(tmp_path):
    """The loss of a step is the mean over all its predicted positions: cutting the step into
    micro-batches with different numbers of predicted positions changes nothing."""
    big = _fit_lm(tmp_path, batch_size=16, accumulate=1)
    cut = _fit_lm(tmp_path, batch_size=4, accumulate=4)
    for p, q in zip(big.parameters(), cut.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5)
    # A plain mean of the micro-batches' means (each scaled by 1/accumulate) would not be.
    rows = _padded_rows().__getitems__(list(range(16)))
    counts = rows["predicted"].reshape(4, 4, T).sum(dim=(1, 2))
    assert len(set(counts.tolist())) > 1


def _markov_cfg(tmp_path, teacher: dict) -> dict:
    return {
        "name": "pretrained", "seed": 0,
        "data": {"name": "markov", "options": {"block_size": 16, "num_train": 64, "num_test": 32}},
        "student": {"name": "causal_lm", "options": {"layers": 1, "width": 16, "heads": 2}},
        "teacher": {**teacher, "cache_dir": str(tmp_path / "teachers")},
        "distill": {"method": "fkl"},
        "train": {"steps": 2, "batch_size": 8, "checkpoint_every": 2, "progress": False},
    }


def test_a_teacher_from_a_pretrained_folder_is_used_as_loaded_unless_train_is_given(tmp_path):
    """`options.path` without `train`: the teacher's outputs are the saved model's (no training
    from labels first); an explicit `train` fine-tunes it; a changed folder is a new teacher."""
    from transfuse.build import teacher_weights_path

    torch.manual_seed(3)
    saved = build_model("causal_lm", input_shape=(16,), num_classes=16, layers=1, width=16, heads=2)
    saved.save_pretrained(tmp_path / "teacher")
    teacher = {"name": "causal_lm", "options": {"path": str(tmp_path / "teacher")}}
    cfg = config_from_dict(_markov_cfg(tmp_path, teacher))
    assert cfg.participants["teacher"].train.steps == 0
    summary = run(cfg, out_dir=tmp_path / "as-loaded", quiet=True)
    from safetensors.torch import load_file

    cached = load_file(teacher_weights_path(cfg, "teacher"))
    for key, value in saved.state_dict().items():
        torch.testing.assert_close(cached[key], value)
    tuned_cfg = config_from_dict(_markov_cfg(tmp_path, {**teacher, "train": {"steps": 5, "batch_size": 8}}))
    tuned = run(tuned_cfg, out_dir=tmp_path / "tuned", quiet=True)
    assert tuned["teacher"]["nll"] != pytest.approx(summary["teacher"]["nll"])
    # Other weights in the same folder: another cache slot, so the old copy is never reused.
    before = teacher_weights_path(cfg, "teacher")
    with torch.no_grad():
        next(saved.parameters()).add_(1.0)
    saved.save_pretrained(tmp_path / "teacher")
    assert teacher_weights_path(config_from_dict(_markov_cfg(tmp_path, teacher)), "teacher") != before


def test_train_steps_0_needs_a_pretrained_model():
    from transfuse.config import ConfigError

    with pytest.raises(ConfigError, match="train.steps: 0 .*options.path"):
        config_from_dict(_markov_cfg(Path("/nonexistent"), {"name": "causal_lm", "options": {"layers": 1, "width": 16,
                                                                                          "heads": 2},
                                                             "train": {"steps": 0}}))


def test_a_teacher_folder_with_another_tokenizer_than_the_data_s_is_refused_before_training(tmp_path):
    from transfuse.data.tokenizer import save_tokenizer, train_bpe
    from transfuse.errors import DataError

    text = "To be, or not to be, that is the question. " * 40
    data_tok, other_tok = train_bpe(text, vocab_size=300), train_bpe(text[::-1], vocab_size=300)
    save_tokenizer(data_tok, tmp_path / "tok")
    teacher = build_model("causal_lm", input_shape=(16,), num_classes=data_tok.vocab_size, layers=1, width=16, heads=2)
    teacher.save_pretrained(tmp_path / "teacher")
    save_tokenizer(other_tok, tmp_path / "teacher")
    cfg = {
        "name": "tok", "seed": 0,
        "data": {"name": "shakespeare", "options": {"block_size": 16, "max_chars": 3000, "tokenizer": str(tmp_path / "tok")}},
        "student": {"name": "causal_lm", "options": {"layers": 1, "width": 16, "heads": 2}},
        "teacher": {"name": "causal_lm", "options": {"path": str(tmp_path / "teacher")}},
        "distill": {"method": "fkl"},
        "train": {"steps": 1, "batch_size": 4, "checkpoint_every": 1, "progress": False},
    }
    with pytest.raises(DataError, match="participants.teacher.options.path .* another tokenizer than data.options.tokenizer"):
        run(config_from_dict(cfg), out_dir=tmp_path / "run", quiet=True)
    assert not (tmp_path / "run").exists()
    save_tokenizer(data_tok, tmp_path / "teacher")  # the same tokenizer: the run goes ahead
    summary = run(config_from_dict(cfg), out_dir=tmp_path / "run", quiet=True)
    assert summary["steps"] == 1
