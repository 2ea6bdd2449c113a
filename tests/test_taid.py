"""TAID: the interpolated-target KL, its adaptive schedule of t, and exact resume of that schedule."""

from __future__ import annotations

import copy
import json
import math
import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file

import transfuse.losses.taid  # noqa: F401  (registers "taid")
from transfuse import functional as TF
from transfuse.checkpoint import MODEL_FILE
from transfuse.cli import main
from transfuse.distiller import Distiller, Term
from transfuse.functional.taid import taid, taid_target
from transfuse.losses import LOSSES
from transfuse.losses.taid import TAID
from transfuse.participants import Participant


def _logits(b=6, c=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, c, generator=g) * 2, torch.randn(b, c, generator=g) * 2


# ---------------------------------------------------------------------------------------
# The function


def test_taid_at_t1_is_kd_at_temperature_1():
    s, t = _logits()
    assert torch.allclose(taid(s, t, t=1.0), TF.kd(s, t, temperature=1.0), atol=1e-7)
    mask, weights = torch.tensor([True, False, True, True, False, True]), torch.rand(6) + 0.5
    assert torch.allclose(taid(s, t, t=1.0, mask=mask, weights=weights),
                          TF.kd(s, t, temperature=1.0, mask=mask, weights=weights), atol=1e-7)
    assert torch.allclose(taid(s, t, t=1.0, reduction="none"), TF.kd(s, t, temperature=1.0, reduction="none"), atol=1e-7)
    # Sequences: (B, T, C) positions are the tokens.
    s3, t3 = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    assert torch.allclose(taid(s3, t3, t=torch.tensor(1.0)), TF.kd(s3, t3, temperature=1.0), atol=1e-7)


def test_taid_at_t0_is_zero_and_the_target_interpolates_logits():
    s, t = _logits()
    assert taid(s, t, t=0.0).abs().item() < 1e-6  # the target is the student itself
    expected = torch.log_softmax(0.7 * s + 0.3 * t, dim=-1)
    assert torch.allclose(taid_target(s, t, t=0.3), expected, atol=1e-6)
    # By hand for one row: p_t = softmax(0.5 * [0, 2] + 0.5 * [2, 0]) = [1/2, 1/2]; q = softmax([0, 2]).
    q = [1 / (1 + math.e**2), math.e**2 / (1 + math.e**2)]
    by_hand = 0.5 * math.log(0.5 / q[0]) + 0.5 * math.log(0.5 / q[1])
    value = taid(torch.tensor([[0.0, 2.0]]), torch.tensor([[2.0, 0.0]]), t=0.5)
    assert value.item() == pytest.approx(by_hand, rel=1e-6)
    with pytest.raises(ValueError, match="t must be in"):
        taid(s, t, t=1.5)


def test_no_gradient_flows_through_the_students_side_of_the_target():
    s, t = _logits()
    s = s.requires_grad_(True)
    taid(s, t, t=0.4).backward()
    # d/dz_s KL(p || softmax(z_s)) with p held fixed is (q - p) / B per row; a gradient through
    # the target's (1 - t) * z_s would add to it.
    p = taid_target(s, t, t=0.4).exp()
    q = torch.softmax(s.detach(), dim=-1)
    assert torch.allclose(s.grad, (q - p) / s.shape[0], atol=1e-6)
    assert not taid_target(s, t, t=0.4).requires_grad


def test_bf16_logits_are_computed_in_float32():
    s, t = _logits()
    value = taid(s.bfloat16(), t.bfloat16(), t=0.5)
    assert value.dtype == torch.float32
    assert torch.allclose(value, taid(s.bfloat16().float(), t.bfloat16().float(), t=0.5))


# ---------------------------------------------------------------------------------------
# The schedule


def _reference_schedule(losses, *, t_start=0.4, t_end=1.0, alpha=5e-4, beta=0.99, total=0, adaptive=True):
    """The official update rule, in plain Python: t after each step's loss."""
    t, m, prev, out = t_start, 0.0, math.inf, []
    for step, j in enumerate(losses):
        if math.isinf(prev):
            prev = j
            out.append(t)
            continue
        delta = (prev - j) / (prev + 1e-15)
        m = beta * m + (1 - beta) * delta
        t_lin = t_start + (t_end - t_start) * step / total if total else t_start
        t = min(t_end, max(t_lin, t + alpha * (1 / (1 + math.exp(-m))) * (1 - t))) if adaptive else min(t_lin, t_end)
        prev = j
        out.append(t)
    return out


def test_defaults_are_the_official_ones():
    loss = LOSSES.get("taid").build()
    assert (loss.t_start, loss.t_end, loss.alpha, loss.beta, loss.adaptive, loss.total_steps) == (0.4, 1.0, 5e-4, 0.99, True, 0)
    assert loss.t.item() == pytest.approx(0.4) and math.isinf(loss.prev_loss.item())
    spec = LOSSES.get("taid")
    assert (spec.weight, spec.ce_weight, spec.needs) == (1.0, 0.0, ())
    with pytest.raises(ValueError, match="t_start"):
        LOSSES.get("taid").build(t_start=0.9, t_end=0.5)
    with pytest.raises(ValueError, match="t_start"):
        LOSSES.check_options("taid", {"t_start": 1.0}, where="distill.options")


def test_update_once_per_step_from_the_mean_of_its_micro_batches():
    # Told the step (as the Distiller does), the values of a step's micro-batches are averaged
    # and t moves once per step, by the official rule; a big alpha makes every move visible.
    loss = TAID(alpha=0.5, total_steps=10)
    means, seen = [], []
    for step in range(6):
        loss.begin_step(step)
        seen.append(loss.t.item())
        values = []
        for micro in range(3):
            s, t = _logits(seed=10 * step + micro)
            values.append(loss(s, t).item())
        means.append(sum(values) / 3)
    loss.begin_step(6)
    seen.append(loss.t.item())
    expected = [0.4] + _reference_schedule(means, alpha=0.5, total=10)
    assert seen == pytest.approx(expected, abs=1e-6)
    assert seen[1] == pytest.approx(0.4), "the first step only records its loss"
    assert len(set(round(x, 6) for x in seen[1:])) > 3, "t must move"


def test_without_the_step_every_training_call_is_a_step_and_eval_changes_nothing():
    loss = TAID(alpha=0.5, total_steps=8)
    values = []
    for i in range(5):
        s, t = _logits(seed=i)
        values.append(loss(s, t).item())
    assert loss.t.item() == pytest.approx(_reference_schedule(values, alpha=0.5, total=8)[-1], abs=1e-6)
    assert loss.step.item() == 5
    state = copy.deepcopy(loss.state_dict())
    loss.eval()
    loss(*_logits(seed=99))
    assert all(torch.equal(state[k], v) for k, v in loss.state_dict().items())


@pytest.mark.parametrize("adaptive", [True, False])
def test_schedule_is_monotone_and_reaches_t_end(adaptive):
    loss = TAID(total_steps=50, adaptive=adaptive)
    ts = []
    g = torch.Generator().manual_seed(0)
    for step in range(60):
        loss.begin_step(step)
        ts.append(loss.t.item())
        s = torch.randn(8, 5, generator=g)
        loss(s, s + torch.randn(8, 5, generator=g) * (1 + (step % 3)))  # a loss that goes up and down
    assert all(b >= a for a, b in zip(ts, ts[1:])), "t never decreases"
    assert ts[0] == pytest.approx(0.4) and ts[-1] == pytest.approx(1.0)
    # The linear floor: after step s's update, t >= t_start + (t_end - t_start) * s / total.
    for step in range(1, 52):
        assert ts[step + 1] >= min(1.0, 0.4 + 0.6 * step / 50) - 1e-6
    assert ts[52] == pytest.approx(1.0) and max(ts) <= 1.0


def test_without_total_steps_only_the_adaptive_rule_moves_t():
    loss = TAID(alpha=0.1)  # total_steps 0: no linear floor
    for step in range(20):
        loss.begin_step(step)
        s, t = _logits(seed=step)
        loss(s, t)
    assert 0.4 < loss.t.item() < 1.0
    frozen = TAID(adaptive=False)
    for step in range(5):
        frozen.begin_step(step)
        frozen(*_logits(seed=step))
    assert frozen.t.item() == pytest.approx(0.4)


def _drive(loss, steps, start=0):
    for step in range(start, steps):
        loss.begin_step(step)
        for micro in range(2):
            loss(*_logits(seed=100 * step + micro))


def test_state_dict_round_trip_resumes_the_schedule_exactly():
    full = TAID(alpha=0.3, total_steps=30)
    _drive(full, 12)
    state = copy.deepcopy(full.state_dict())
    assert set(state) == {"t", "momentum", "prev_loss", "step", "pending_sum", "pending_count"}
    assert state["pending_count"].item() == 2, "the last step's values are pending until the next step begins"
    _drive(full, 25, start=12)

    resumed = TAID(alpha=0.3, total_steps=30)
    resumed.load_state_dict(state)
    _drive(resumed, 25, start=12)
    for k, v in full.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k


def test_the_schedule_state_stays_float32_under_a_bf16_cast():
    loss = TAID().to(torch.bfloat16)
    assert all(getattr(loss, n).dtype == torch.float32 for n in ("t", "momentum", "prev_loss", "pending_sum"))
    assert loss.step.dtype == torch.int64
    loss.begin_step(0)
    s, t = _logits()
    assert torch.isfinite(loss(s.bfloat16(), t.bfloat16()))


# ---------------------------------------------------------------------------------------
# In a Distiller, and end to end


def test_the_distiller_tells_the_loss_the_step():
    torch.manual_seed(0)
    student, teacher = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    loss = TAID(alpha=0.5)
    d = Distiller([Participant("student", student), Participant("teacher", teacher, trainable=False)], [Term("taid", loss)])
    d.train()
    batch = {"input": torch.randn(8, 4), "target": torch.randint(3, (8,))}
    d(batch, 0)
    if not loss._told_step:
        pytest.skip("this Distiller does not call a loss's begin_step(step) yet: TAID updates after every call")
    d(batch, 0)
    assert loss.pending_count.item() == 2 and loss.t.item() == pytest.approx(0.4)
    d(batch, 1)  # step 1 begins: step 0's two values are applied (the first update only records the loss)
    assert loss.pending_count.item() == 1 and loss.step.item() == 1 and math.isfinite(loss.prev_loss.item())


def test_with_gradient_accumulation_t_moves_once_per_optimizer_step(tmp_path):
    from lightning_fabric import Fabric

    from transfuse.data.base import ArrayDataset
    from transfuse.engine import FitSettings, fit

    torch.manual_seed(0)
    x = torch.randn(128, 4)
    data = ArrayDataset(x, (x[:, 0] > 0).long())
    student, teacher = torch.nn.Linear(4, 2), torch.nn.Linear(4, 2)
    loss = TAID(alpha=0.5, total_steps=6)
    d = Distiller([Participant("student", student), Participant("teacher", teacher, trainable=False)], [Term("taid", loss)])
    settings = FitSettings(steps=6, batch_size=8, accumulate=3, checkpoint_every=6, progress=False)
    fit(Fabric(accelerator="cpu", devices=1), d, torch.optim.SGD(student.parameters(), lr=0.1), data, settings,
        run_dir=tmp_path / "run")
    if not loss._told_step:
        pytest.skip("this Distiller does not call a loss's begin_step(step) yet: TAID updates after every micro-batch")
    # Six steps of three micro-batches: steps 0-4 applied (once each), step 5's three values pending.
    assert loss.step.item() == 5 and loss.pending_count.item() == 3


def _config(tmp_path, cfg, name="c.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(cfg))
    return p


def _final_state(run_dir):
    return load_file(run_dir / "checkpoints" / "step-00000040" / MODEL_FILE)


def test_a_tiny_run_and_its_resume_match_an_uninterrupted_run(base_config, tmp_path):
    base_config["distill"] = {"method": "taid", "options": {"alpha": 0.05}}  # a big alpha: t moves every step
    base_config["train"].update(steps=40, checkpoint_every=20, keep_checkpoints=5)
    cfg = _config(tmp_path, base_config)
    full = tmp_path / "full"
    assert main(["run", str(cfg), "--out", str(full), "--quiet"]) == 0
    summary = json.loads((full / "summary.json").read_text())
    assert summary["steps"] == 40
    final = _final_state(full)
    assert final["losses.taid.t"].item() > 0.4, "t moved"

    part = tmp_path / "part"
    shutil.copytree(full, part)
    for entry in (part / "checkpoints").iterdir():
        if entry.name != "step-00000020":
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    (part / "summary.json").unlink()
    assert _final_state(full)["losses.taid.t"].item() != load_file(
        part / "checkpoints" / "step-00000020" / MODEL_FILE)["losses.taid.t"].item()
    assert main(["run", str(cfg), "--out", str(part), "--resume", "--quiet"]) == 0
    assert json.loads((part / "summary.json").read_text())["resumed_from"] == 20
    resumed = _final_state(part)
    assert final.keys() == resumed.keys()
    for k in final:
        assert torch.equal(final[k], resumed[k]), f"{k} differs after resume"


def test_a_run_gives_the_loss_train_steps_as_total_steps(base_config):
    from transfuse.build import load_splits, make_participants, make_terms
    from transfuse.config import config_from_dict
    from transfuse.data.base import first_batch

    base_config["distill"] = {"method": "taid"}
    cfg = config_from_dict(base_config)
    splits = load_splits(cfg.data)
    sources = make_participants(cfg, splits)
    terms = make_terms(cfg.resolved_terms(), sources, first_batch(splits.train), num_train_samples=len(splits.train),
                       total_steps=cfg.train.steps)
    taid_term = next(t for t in terms if t.name == "taid")
    if taid_term.loss.total_steps == 0:
        pytest.skip("build.make_terms does not pass total_steps to losses that take it yet")
    assert taid_term.loss.total_steps == cfg.train.steps


def test_a_teacher_that_requires_grad_still_backpropagates_after_the_update():
    loss = TAID(alpha=0.5)
    s, t = _logits()
    s, t = s.requires_grad_(True), t.requires_grad_(True)
    for _ in range(2):  # the second call updates t in place after building its graph
        value = loss(s, t)
    value.backward()
    assert torch.isfinite(s.grad).all() and torch.isfinite(t.grad).all()
