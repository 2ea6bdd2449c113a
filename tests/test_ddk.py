"""DDK: the domain-weight update, the engine's weighted sampling (lazy, per step, checkpointed),
exact resume, a Markov run whose logged weights follow the formula, and clear errors."""

from __future__ import annotations

import math
import shutil

import pytest
import torch
from lightning_fabric import Fabric
from torch import nn

from transfuse.data import TokenRows
from transfuse.data.domains import DomainDataset
from transfuse.ddk import DDK, DDKError, ddk_domain_weights
from transfuse.distiller import Distiller, Term
from transfuse.engine import FitSettings, StepBatchSampler, fit
from transfuse.losses import LOSSES
from transfuse.metrics_log import read_metrics
from transfuse.optim import make_optimizer
from transfuse.participants import Participant
from transfuse.recipes import DefaultRecipe
from transfuse.run import build_recipe

# -- the update ------------------------------------------------------------------------------


def test_the_weights_follow_the_factor_smooth_update_on_hand_computed_scores():
    student, teacher = torch.tensor([2.0, 3.0, 4.0]), torch.tensor([1.0, 3.0, 2.0])  # ratios 2, 1, 2
    e2, e1 = math.exp(2.0), math.exp(1.0)
    first = ddk_domain_weights(student, teacher)  # psi = exp(ratio) from the uniform r_0
    want = [0.5 * e2 / (2 * e2 + e1) + 0.5 / 3, 0.5 * e1 / (2 * e2 + e1) + 0.5 / 3, 0.5 * e2 / (2 * e2 + e1) + 0.5 / 3]
    assert first.tolist() == pytest.approx(want, rel=1e-12)
    assert float(first.sum()) == pytest.approx(1.0, rel=1e-12)
    # The second update multiplies the previous factor by exp(ratio): psi = r_1 * exp(l_S / l_T).
    student2, teacher2 = torch.tensor([3.0, 3.0, 1.0]), torch.tensor([1.0, 1.0, 1.0])  # ratios 3, 3, 1
    psi = [want[0] * math.exp(3.0), want[1] * math.exp(3.0), want[2] * math.exp(1.0)]
    second = ddk_domain_weights(student2, teacher2, first)
    assert second.tolist() == pytest.approx([0.5 * p / sum(psi) + 0.5 / 3 for p in psi], rel=1e-12)
    # Temperature divides the ratio; alpha 0 is uniform; alpha 1 is the pure softmax.
    hot = ddk_domain_weights(student, teacher, temperature=2.0)
    z = [math.exp(1.0), math.exp(0.5), math.exp(1.0)]
    assert hot.tolist() == pytest.approx([0.5 * v / sum(z) + 0.5 / 3 for v in z], rel=1e-12)
    assert ddk_domain_weights(student, teacher, alpha=0.0).tolist() == pytest.approx([1 / 3] * 3)
    assert ddk_domain_weights(student, teacher, alpha=1.0).tolist() == pytest.approx(
        [e2 / (2 * e2 + e1), e1 / (2 * e2 + e1), e2 / (2 * e2 + e1)], rel=1e-12)
    # Large ratios do not overflow.
    assert torch.isfinite(ddk_domain_weights(torch.tensor([1e4, 1.0]), torch.tensor([1.0, 1.0]))).all()


# -- the sampler -----------------------------------------------------------------------------


def test_weighted_steps_draw_domains_in_proportion_and_none_keeps_the_permutation_order():
    n, domains = 100, torch.arange(100) % 4  # 25 samples per domain
    r = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    weights = (r / 25)[domains]
    sampler = StepBatchSampler(n, batch_size=50, accumulate=2, seed=0, end_step=200, weights=lambda step: weights)
    drawn = torch.tensor([i for b in sampler for i in b])
    assert len(drawn) == 200 * 100
    share = torch.bincount(domains[drawn], minlength=4).double() / len(drawn)
    # 20,000 draws: one standard deviation of a share is at most 0.0035; the bound is over 5.
    assert torch.allclose(share, r, atol=0.02), share
    # A pure function of (seed, step, weights): a resumed sampler draws the same steps.
    again = list(StepBatchSampler(n, batch_size=50, accumulate=2, seed=0, start_step=150, end_step=200,
                                  weights=lambda step: weights))
    assert again == list(sampler)[300:]
    # None: exactly the old permutation order, epoch by epoch.
    plain = list(StepBatchSampler(n, batch_size=8, seed=1, end_step=30))
    with_none = list(StepBatchSampler(n, batch_size=8, seed=1, end_step=30, weights=lambda step: None))
    assert with_none == plain
    order = torch.randperm(n, generator=torch.Generator().manual_seed(1 * 1_000_003 + 0))
    assert plain[0] == order[:8].tolist() and plain[11] == order[88:96].tolist()
    with pytest.raises(ValueError, match="non-negative"):
        list(StepBatchSampler(n, batch_size=8, end_step=1, weights=lambda step: -torch.ones(n)))


def _data(n: int, seed: int) -> DomainDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    domains = torch.arange(n) % 3
    # Domain 2's labels are a harder function of the inputs than domains 0 and 1.
    y = torch.where(domains == 2, ((x[:, 2] * x[:, 3]) > 0).long() + 2 * (x[:, 4] > 0).long(),
                    (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long())
    return DomainDataset(x, y, domains)


class _Steer(DefaultRecipe):
    """Picks, inside its step, the one sample this step must see (ignoring the step number the
    sampler passes), so the batch proves the weights were read after ``step`` began."""

    def __init__(self, n: int) -> None:
        self.n, self.pick, self.seen = n, 0, []

    def sample_weights(self, step: int) -> torch.Tensor:
        weights = torch.zeros(self.n)
        weights[self.pick] = 1.0
        return weights

    def step(self, ctx):
        self.pick = (7 * ctx.step + 3) % self.n
        batches = list(ctx.micro_batches)
        self.seen.append(sorted({int(i) for b in batches for i in b["index"]}))
        ctx.micro_batches = iter(batches)
        return super().step(ctx)


def _models():
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))
    teacher = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 4))
    return student, teacher


def _distiller(student, teacher):
    return Distiller([Participant("student", student), Participant("teacher", teacher, trainable=False)],
                     [Term("ce", LOSSES.get("ce").build(), 1.0, target=None), Term("kd", LOSSES.get("kd").build(), 1.0)])


def _fit(run_dir, recipe, *, steps=12, resume=False, train=None):
    student, teacher = _models()
    distiller = _distiller(student, teacher)
    opt = make_optimizer(distiller.parameters(), name="adam", lr=0.05)
    settings = FitSettings(steps=steps, batch_size=16, accumulate=2, seed=3, log_every=4, checkpoint_every=5,
                           keep_checkpoints=10, progress=False)
    fit(Fabric(accelerator="cpu", devices=1), distiller, opt, train if train is not None else _data(96, 1), settings,
        run_dir=run_dir, resume=resume, recipe=recipe)
    return student


def test_weights_a_recipe_sets_at_the_start_of_its_step_apply_to_that_step(tmp_path):
    recipe = _Steer(96)
    _fit(tmp_path, recipe, steps=6)
    assert recipe.seen == [[(7 * s + 3) % 96] for s in range(6)]


# -- the recipe on the engine ----------------------------------------------------------------


def test_a_resumed_ddk_run_equals_an_uninterrupted_one(tmp_path):
    train, holdout = _data(96, 1), _data(30, 2)
    full_recipe = DDK(holdout=holdout, train=train, every=3)
    full = _fit(tmp_path / "full", full_recipe, steps=12)
    rows = [r for r in read_metrics(tmp_path / "full" / "metrics.jsonl") if "ddk/weight/0" in r]
    assert [r["step"] for r in rows] == [1, 4, 7, 10]  # updates at the start of steps 0, 3, 6, 9
    assert any(abs(r["ddk/weight/2"] - 1 / 3) > 1e-3 for r in rows), "the weights moved"
    part = tmp_path / "part"
    shutil.copytree(tmp_path / "full", part)
    for ck in (part / "checkpoints").iterdir():
        if ck.name != "step-00000005":  # resumed at step 5: between two updates, the weights come from the checkpoint
            shutil.rmtree(ck) if ck.is_dir() else ck.unlink()
    resumed_recipe = DDK(holdout=holdout, train=train, every=3)
    resumed = _fit(part, resumed_recipe, steps=12, resume=True)
    for p, q in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
    assert torch.equal(full_recipe.weights, resumed_recipe.weights)
    again = [r for r in read_metrics(part / "metrics.jsonl") if "ddk/weight/0" in r]
    assert again == rows, "each update is logged once, with the same values"
    # Without the checkpointed weights the resumed run would have drawn other batches.
    assert not torch.equal(resumed_recipe.weights, torch.full((3,), 1 / 3, dtype=torch.float64))


def test_the_ddk_scores_are_the_mean_nll_per_domain_of_student_and_teacher(tmp_path):
    train, holdout = _data(96, 1), _data(30, 2)
    recipe = DDK(holdout=holdout, train=train, every=100, score="nll")
    _fit(tmp_path, recipe, steps=1)
    row = next(r for r in read_metrics(tmp_path / "metrics.jsonl") if "ddk/weight/0" in r)
    student, teacher = _models()  # the weights at step 0, when the update was made
    for d in range(3):
        keep = holdout.domains == d
        x, y = holdout.inputs[keep], holdout.targets[keep]
        for name, model in (("student", student), ("teacher", teacher)):
            with torch.no_grad():
                want = float(nn.functional.cross_entropy(model(x), y))
            assert row[f"ddk/{name}_nll/{d}"] == pytest.approx(want, rel=1e-5)
    s = torch.tensor([row[f"ddk/student_nll/{d}"] for d in range(3)], dtype=torch.float64)
    t = torch.tensor([row[f"ddk/teacher_nll/{d}"] for d in range(3)], dtype=torch.float64)
    assert [row[f"ddk/weight/{d}"] for d in range(3)] == pytest.approx(ddk_domain_weights(s, t).tolist(), rel=1e-9)


def test_a_markov_run_logs_weights_that_follow_the_formula_and_favour_the_largest_gap(tmp_path):
    from transfuse.config import config_from_dict
    from transfuse.run import run

    cfg = {
        "name": "ddk", "seed": 0,
        "data": {"name": "markov", "holdout_fraction": 0.2, "options": {"block_size": 24, "num_train": 240, "num_test": 40}},
        "student": {"name": "causal_lm", "options": {"layers": 1, "width": 16, "heads": 2}},
        "teacher": {"name": "causal_lm", "options": {"layers": 1, "width": 32, "heads": 2},
                    "train": {"steps": 60, "batch_size": 32, "optim": {"name": "adam", "lr": 0.003}}},
        "distill": {"method": "fkl", "ce_weight": 1.0},
        "recipe": {"name": "ddk", "options": {"every": 4}},
        "optim": {"name": "adam", "lr": 0.003},
        "train": {"steps": 16, "batch_size": 16, "log_every": 8, "checkpoint_every": 16, "progress": False},
    }
    run(config_from_dict(cfg), out_dir=tmp_path / "run", quiet=True)
    rows = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "ddk/weight/0" in r]
    assert [r["step"] for r in rows] == [1, 5, 9, 13]
    domains = range(4)
    previous = None
    ratios = torch.zeros(4, dtype=torch.float64)
    for r in rows:  # every logged update is the formula applied to its logged scores and the previous weights
        s = torch.tensor([r[f"ddk/student_perplexity/{d}"] for d in domains], dtype=torch.float64)
        t = torch.tensor([r[f"ddk/teacher_perplexity/{d}"] for d in domains], dtype=torch.float64)
        weights = torch.tensor([r[f"ddk/weight/{d}"] for d in domains], dtype=torch.float64)
        assert weights.tolist() == pytest.approx(ddk_domain_weights(s, t, previous).tolist(), rel=1e-9)
        previous, ratios = weights, ratios + s / t
    first = torch.tensor([rows[0][f"ddk/weight/{d}"] for d in domains])
    top, bottom = int(ratios.argmax()), int(ratios.argmin())
    assert previous[top] > first[top] > 0.25, "the largest student/teacher gap gains weight update after update"
    assert previous[bottom] < 0.25


# -- errors ----------------------------------------------------------------------------------


def test_clear_errors_for_data_without_domains_no_holdout_and_an_unscored_domain():
    from transfuse.config import config_from_dict

    rows = TokenRows(torch.randint(8, (12, 6)))
    with pytest.raises(DDKError, match="carries no `domain`"):
        DDK(holdout=rows.subset(list(range(4))), train=rows)
    with_domains = TokenRows(torch.randint(8, (12, 6)), fields={"domain": torch.arange(12) % 3})
    with pytest.raises(DDKError, match=r"domain\(s\) \[2\] have training samples but no held-out sample"):
        DDK(holdout=with_domains.subset([0, 1, 3, 4]), train=with_domains)
    with pytest.raises(DDKError, match="data.holdout_fraction"):
        DDK(holdout=None, train=with_domains)
    base = {"name": "x", "data": {"name": "markov", "options": {"block_size": 12, "num_train": 40, "num_test": 8}},
            "student": {"name": "causal_lm", "options": {"layers": 1, "width": 8, "heads": 2}},
            "teacher": {"name": "causal_lm", "options": {"layers": 1, "width": 8, "heads": 2}},
            "distill": {"method": "fkl"}, "recipe": {"name": "ddk"}}
    with pytest.raises(ValueError, match="data.holdout_fraction"):
        config_from_dict(base)
    with pytest.raises(DDKError, match="recipe.options.psi: unknown value 'cumulative'; valid: multiplicative, fresh"):
        DDK(holdout=with_domains, train=with_domains, psi="cumulative")
    with pytest.raises(DDKError, match="recipe.options.every"):
        DDK(holdout=with_domains, train=with_domains, every=0)
    with pytest.raises(DDKError, match="recipe.options.alpha"):
        DDK(holdout=with_domains, train=with_domains, alpha=1.5)
    with pytest.raises(ValueError, match="recipe.options.train"):
        build_recipe("ddk", {"train": 1}, holdout=with_domains, train=with_domains)
    # The run hands the recipe its training set, held-out set and seed.
    recipe = build_recipe("ddk", {"every": 7}, holdout=with_domains, train=with_domains, seed=5)
    assert recipe.every == 7 and recipe.seed == 5 and recipe.domain_ids.tolist() == [0, 1, 2]


def test_the_terms_must_name_one_student_and_one_teacher():
    train = _data(30, 1)
    recipe = DDK(holdout=train, train=train)
    student, teacher = _models()
    labels_only = Distiller([Participant("student", student)], [Term("ce", LOSSES.get("ce").build(), 1.0, target=None)])
    with pytest.raises(DDKError, match="no term compares the student's logits with a teacher's"):
        recipe._roles(labels_only)
    peer = nn.Linear(6, 4)
    two = Distiller([Participant("student", student), Participant("teacher", teacher, trainable=False),
                     Participant("other", peer, trainable=False)],
                    [Term("kd", LOSSES.get("kd").build(), 1.0), Term("kd2", LOSSES.get("kd").build(), 1.0,
                                                                      target="other.logits")])
    with pytest.raises(DDKError, match=r"\['other', 'teacher'\] as teacher; set recipe.options.teacher"):
        recipe._roles(two)
    assert DDK(holdout=train, train=train, teacher="other")._roles(two) == ("student", "other")
    assert recipe._roles(_distiller(student, teacher)) == ("student", "teacher")
