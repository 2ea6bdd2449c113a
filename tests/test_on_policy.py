"""On-policy generation (GKD): the student continues a fraction of the rows itself; prompts
are kept, the generated tokens become the targets, and a run trains on them."""

from __future__ import annotations

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")

from transfuse.config import config_from_dict  # noqa: E402
from transfuse.data import TokenRows  # noqa: E402
from transfuse.distiller import Distiller, Term  # noqa: E402
from transfuse.losses import LOSSES  # noqa: E402
from transfuse.models import build_model  # noqa: E402
from transfuse.on_policy import OnPolicy, sample_continuations, sample_mixed_continuations  # noqa: E402
from transfuse.participants import Participant  # noqa: E402
from transfuse.run import run  # noqa: E402

VOCAB, T = 20, 10


class _Always(nn.Module):
    """A 'language model' that always predicts token 7."""

    def forward(self, x):
        ids = x["input_ids"] if isinstance(x, dict) else x
        logits = torch.full((*ids.shape, VOCAB), -30.0)
        logits[..., 7] = 30.0
        return logits


def _distiller(student: nn.Module) -> Distiller:
    return Distiller([Participant("student", student)],
                     [Term(name="ce", loss=LOSSES.get("ce").build(), input="student.logits", target=None)])


def test_generated_tokens_follow_the_student_and_prompts_are_kept():
    ids = torch.randint(VOCAB, (3, T))
    out = sample_continuations(_Always(), ids, torch.tensor([2, 4, 9]))
    assert torch.equal(out[0, :2], ids[0, :2]) and (out[0, 2:] == 7).all()
    assert torch.equal(out[1, :4], ids[1, :4]) and (out[1, 4:] == 7).all()
    assert torch.equal(out[2, :9], ids[2, :9]) and out[2, 9] == 7


def test_the_generated_tokens_are_the_targets_and_the_step_counts_only_them():
    rows = TokenRows(torch.randint(VOCAB, (4, T)))
    batch = rows.__getitems__([0, 1, 2, 3])
    student = _Always().train()
    out = OnPolicy(lmbda=1.0, prompt_tokens=3)(batch, step=0, distiller=_distiller(student))
    assert torch.equal(out["input_ids"][:, :3], batch["input_ids"][:, :3])
    assert (out["input_ids"][:, 3:] == 7).all()
    assert (out["labels"][:, :3] == -100).all() and (out["labels"][:, 3:] == 7).all()
    # Position t predicts token t + 1: positions 2..T-2 carry loss, T - 3 per row.
    assert out["predicted"].sum(1).tolist() == [T - 3] * 4
    assert student.training  # modes restored
    unchanged = OnPolicy(lmbda=0.0, prompt_tokens=3)(batch, step=0, distiller=_distiller(student))
    assert unchanged is batch


def test_which_rows_are_generated_and_what_is_drawn_depend_only_on_the_seed():
    torch.manual_seed(0)
    model = build_model("causal_lm", input_shape=(T,), num_classes=VOCAB, layers=1, width=16, heads=2)
    batch = TokenRows(torch.randint(VOCAB, (6, T))).__getitems__(list(range(6)))
    runs = []
    for _ in range(2):
        torch.manual_seed(5)
        runs.append(OnPolicy(lmbda=0.5, prompt_tokens=2)(batch, step=0, distiller=_distiller(model))["input_ids"])
    assert torch.equal(runs[0], runs[1])
    assert all(p.grad is None for p in model.parameters())


def test_bad_options_and_data_without_tokens_are_refused():
    with pytest.raises(ValueError, match="lmbda"):
        OnPolicy(lmbda=1.5)
    with pytest.raises(ValueError, match="needs token rows"):
        OnPolicy()({"input": torch.zeros(2, 3)}, step=0, distiller=_distiller(_Always()))


def test_a_gkd_run_trains_on_its_own_generations(tmp_path):
    cfg = {
        "name": "gkd", "seed": 0,
        "data": {"name": "markov", "options": {"block_size": 16, "num_train": 200, "num_test": 40}},
        "student": {"name": "causal_lm", "options": {"layers": 1, "width": 32, "heads": 2}},
        "teacher": {"name": "causal_lm", "options": {"layers": 1, "width": 48, "heads": 2},
                    "train": {"steps": 60, "batch_size": 32, "optim": {"name": "adam", "lr": 0.003}},
                    "cache_dir": str(tmp_path / "cache")},
        "distill": {"method": "jsd"},
        "transforms": [{"name": "on_policy", "options": {"lmbda": 0.5, "prompt_tokens": 4}}],
        "optim": {"name": "adam", "lr": 0.003},
        "train": {"steps": 20, "batch_size": 8, "log_every": 10, "checkpoint_every": 20, "progress": False},
    }
    summary = run(config_from_dict(cfg), out_dir=tmp_path / "run", quiet=True)
    assert summary["steps"] == 20 and summary["student"]["kl_to_truth"] > 0


@pytest.mark.parametrize("architecture", ["gpt2", "llama"])
@pytest.mark.parametrize("temperature", [1.0, 0.7, 0.0])
def test_the_key_value_cache_draws_the_same_tokens_as_rereading_the_prefix(architecture, temperature):
    torch.manual_seed(0)
    model = build_model("causal_lm", input_shape=(24,), num_classes=VOCAB, layers=2, width=16, heads=2,
                        architecture=architecture).eval()
    ids = torch.randint(VOCAB, (5, 24))
    prompts = torch.tensor([3, 1, 7, 3, 23])  # different lengths: longer prompts are fed through the cached steps
    drawn = {}
    for use_cache in (False, True):
        torch.manual_seed(11)
        drawn[use_cache] = sample_continuations(model, ids, prompts, temperature=temperature, use_cache=use_cache)
        drawn[use_cache, "rng"] = torch.rand(1)  # both paths consume the RNG alike
    assert torch.equal(drawn[True], drawn[False])
    assert torch.equal(drawn[True, "rng"], drawn[False, "rng"])
    for row, p in enumerate(prompts.tolist()):
        assert torch.equal(drawn[True][row, :p], ids[row, :p])
    # The cache really is used: the prompt is read once, then one token per call.
    seen = []
    hook = model.model.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs["input_ids"].shape[1]),
                                                 with_kwargs=True)
    sample_continuations(model, ids, prompts, temperature=temperature)
    hook.remove()
    assert seen == [1] + [1] * (24 - 1 - 1)


def test_temperature_zero_is_greedy_decoding_and_draws_nothing_from_the_rng():
    torch.manual_seed(0)
    model = build_model("causal_lm", input_shape=(12,), num_classes=VOCAB, layers=1, width=16, heads=2).eval()
    ids = torch.randint(VOCAB, (3, 12))
    torch.manual_seed(4)
    out = sample_continuations(model, ids, torch.tensor([4, 4, 6]), temperature=0.0)
    after = torch.rand(1)
    torch.manual_seed(4)
    assert torch.equal(after, torch.rand(1))  # the RNG was not advanced
    # By hand: each token is the argmax of the model's prediction from the tokens before it.
    with torch.no_grad():
        for row, p in enumerate([4, 4, 6]):
            for t in range(p, 12):
                assert out[row, t] == model(out[row : row + 1, :t])[0, -1].argmax()
    OnPolicy(temperature=0.0)  # a valid option
    with pytest.raises(ValueError, match="temperature"):
        OnPolicy(temperature=-1.0)


@pytest.mark.parametrize("teacher_mix", [0.2, 1.0])
def test_teacher_mixed_sampling_draws_the_same_with_and_without_the_key_value_caches(teacher_mix):
    torch.manual_seed(0)
    student = build_model("causal_lm", input_shape=(16,), num_classes=VOCAB, layers=1, width=16, heads=2).eval()
    teacher = build_model("causal_lm", input_shape=(16,), num_classes=VOCAB, layers=2, width=16, heads=2,
                          architecture="llama").eval()
    ids, prompts = torch.randint(VOCAB, (4, 16)), torch.tensor([3, 1, 6, 15])
    drawn = {}
    for use_cache in (False, True):
        torch.manual_seed(2)
        drawn[use_cache] = sample_mixed_continuations(student, teacher, ids, prompts, teacher_mix=teacher_mix,
                                                      use_cache=use_cache)
    assert torch.equal(drawn[True][0], drawn[False][0])
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(drawn[True][1:], drawn[False][1:]))
    for row, p in enumerate(prompts.tolist()):
        assert torch.equal(drawn[True][0][row, :p], ids[row, :p])
        assert (drawn[True][1][row, :p] == 0).all() and (drawn[True][1][row, p:] <= 0).all()
