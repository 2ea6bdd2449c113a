"""TRG: each relation term against a hand re-statement, the sampling, the schedule, masks and shapes."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import transfuse.functional as TF
from transfuse.losses import LOSSES
from transfuse.losses.trg import TRG

torch.set_num_threads(1)


def test_inner_is_the_mse_of_context_matrices():
    torch.manual_seed(0)
    s, t = torch.randn(2, 3, 4), torch.randn(2, 3, 6)
    total = 0.0
    for b in range(2):
        for i in range(3):
            cs_s = [math.exp(s[b, i] @ s[b, j] / 2.0) for j in range(3)]  # sqrt(4) = 2
            cs_t = [math.exp(t[b, i] @ t[b, j] / math.sqrt(6)) for j in range(3)]
            for j in range(3):
                total += (cs_s[j] / sum(cs_s) - cs_t[j] / sum(cs_t)) ** 2
    assert abs(TF.trg_inner(s, t).item() - total / 18) < 1e-6
    assert TF.trg_inner(t, t).item() == 0.0


def _local_by_hand(s, t, k, sigma):
    """Neighbours from the teacher by sorting, kernels and softmaxes written out, KL(P_s || P_t)."""
    su, tu = F.normalize(s, dim=1), F.normalize(t, dim=1)
    m = s.shape[0]
    total = 0.0
    for i in range(m):
        others = sorted((j for j in range(m) if j != i), key=lambda j: ((tu[i] - tu[j]) ** 2).sum().item())[:k]
        a_s = [math.exp(-((su[i] - su[j]) ** 2).sum().item() / (2 * sigma)) for j in others]
        a_t = [math.exp(-((tu[i] - tu[j]) ** 2).sum().item() / (2 * sigma)) for j in others]
        p_s = [math.exp(a) / sum(math.exp(x) for x in a_s) for a in a_s]
        p_t = [math.exp(a) / sum(math.exp(x) for x in a_t) for a in a_t]
        total += sum(ps * math.log(ps / pt) for ps, pt in zip(p_s, p_t))
    return total / m


@pytest.mark.parametrize("k, sigma", [(2, 1.0), (3, 0.25), (50, 2.0)])
def test_local_equals_a_hand_restatement(k, sigma):
    torch.manual_seed(1)
    s, t = torch.randn(7, 3), torch.randn(7, 5)
    assert abs(TF.trg_local(s, t, k=k, sigma=sigma).item() - _local_by_hand(s, t, min(k, 6), sigma)) < 1e-6
    assert TF.trg_local(t, t, k=k, sigma=sigma).abs().item() < 1e-7
    # The kernel reads directions: scaling the student's tokens changes nothing.
    assert torch.allclose(TF.trg_local(3 * s, t, k=k, sigma=sigma), TF.trg_local(s, t, k=k, sigma=sigma))


def test_global_is_infonce_against_the_other_teacher_tokens():
    torch.manual_seed(2)
    s, t = torch.randn(5, 4), torch.randn(5, 4)
    tau = 0.3
    total = 0.0
    for i in range(5):
        sims = [F.cosine_similarity(s[i], t[j], dim=0).item() / tau for j in range(5)]
        total += -sims[i] + math.log(sum(math.exp(x) for x in sims))
    assert abs(TF.trg_global(s, t, temperature=tau).item() - total / 5) < 1e-5
    # Aligned tokens are easier to tell apart at a low temperature.
    assert TF.trg_global(t, t, temperature=0.05) < TF.trg_global(t, t, temperature=1.0)
    with pytest.raises(ValueError, match="must match"):
        TF.trg_global(torch.randn(5, 3), t)


def test_trg_is_the_weighted_sum_of_its_parts_on_the_drawn_tokens():
    torch.manual_seed(3)
    s, t = torch.randn(4, 6, 3, 3), torch.randn(4, 6, 3, 3)  # equal widths: identity projection
    opts = dict(alpha=0.5, beta=2.0, gamma=0.3, tokens_per_image=4, k=3, sigma=0.5, temperature=0.2)
    torch.manual_seed(9)
    value = TF.trg(s, t, **opts)
    torch.manual_seed(9)
    picks = TF.sample_token_indices(4, 9, 4)  # the same draw
    st, tt = TF.as_tokens(s), TF.as_tokens(t)  # (4, 9, 6)
    sn = torch.stack([st[b, picks[b]] for b in range(4)]).reshape(16, 6)
    tn = torch.stack([tt[b, picks[b]] for b in range(4)]).reshape(16, 6)
    expected = (0.5 * TF.trg_inner(st, tt) + 2.0 * TF.trg_local(sn, tn, k=3, sigma=0.5)
                + 0.3 * TF.trg_global(sn, tn, temperature=0.2))
    assert torch.allclose(value, expected)


def test_sampling_draws_distinct_positions_per_image():
    torch.manual_seed(0)
    picks = TF.sample_token_indices(6, 9, 4)
    assert picks.shape == (6, 4)
    assert all(len(set(row.tolist())) == 4 for row in picks) and picks.max() < 9
    assert TF.sample_token_indices(2, 3, 8).shape == (2, 3)  # never more than the image has
    assert not torch.equal(TF.sample_token_indices(6, 9, 4), picks)  # random, not fixed


def test_grids_are_aligned_by_pooling_the_larger_map():
    s, t = torch.randn(2, 4, 4, 4), torch.randn(2, 8, 8, 8)
    st, tt = TF.align_token_grids(s, t)
    assert st.shape == (2, 16, 4) and tt.shape == (2, 16, 8)
    assert torch.allclose(tt, TF.as_tokens(F.avg_pool2d(t, 2)))
    with pytest.raises(ValueError, match="number of tokens"):
        TF.align_token_grids(torch.randn(2, 5, 4), torch.randn(2, 6, 4))
    with pytest.raises(ValueError, match="token features"):
        TF.trg(torch.randn(4, 8), torch.randn(4, 8))


def test_module_projection_temperature_schedule_and_state():
    loss = LOSSES.get("trg").from_shapes(student_shape=(16, 4, 4), teacher_shape=(32, 7, 7), num_train_samples=1,
                                         total_steps=101)
    assert isinstance(loss.projection, torch.nn.Linear)
    assert (loss.projection.in_features, loss.projection.out_features) == (16, 32)
    temps = []
    for step in (0, 25, 50, 100, 200):
        loss.begin_step(step)
        temps.append(loss.temperature)
    assert temps[0] == pytest.approx(1.0) and temps[2] == pytest.approx(0.55) and temps[3] == pytest.approx(0.1)
    assert temps[4] == pytest.approx(0.1) and temps == sorted(temps, reverse=True)
    # The step is checkpointed: a fresh module loaded from the state continues the schedule.
    loss.begin_step(25)
    fresh = LOSSES.get("trg").from_shapes(student_shape=(16, 4, 4), teacher_shape=(32, 7, 7), num_train_samples=1,
                                          total_steps=101)
    fresh.load_state_dict(loss.state_dict())
    assert fresh.temperature == pytest.approx(temps[1])
    # Without a run length: the final (low) temperature.
    assert TRG().temperature == pytest.approx(0.1)


def test_gradients_reach_student_and_projection_not_teacher():
    torch.manual_seed(0)
    loss = LOSSES.get("trg").from_shapes(student_shape=(4, 4, 4), teacher_shape=(8, 4, 4), num_train_samples=1)
    s = torch.randn(6, 4, 4, 4, requires_grad=True)
    t = torch.randn(6, 8, 4, 4)
    loss(s, t).backward()
    assert s.grad.abs().sum() > 0 and t.grad is None
    assert loss.projection.weight.grad.abs().sum() > 0


def test_mask_selects_images_and_weights_are_refused():
    loss = LOSSES.get("trg").from_shapes(student_shape=(4, 4, 4), teacher_shape=(8, 4, 4), num_train_samples=1)
    s, t = torch.randn(6, 4, 4, 4), torch.randn(6, 8, 4, 4)
    mask = torch.tensor([True, True, False, True, False, True])
    torch.manual_seed(5)
    masked = loss(s, t, mask=mask)
    torch.manual_seed(5)
    assert torch.allclose(masked, loss(s[mask], t[mask]))
    with pytest.raises(ValueError, match="batch-relation"):
        loss(s, t, weights=torch.ones(6))
    one = torch.zeros(6, dtype=torch.bool)
    one[0] = True
    assert loss(s, t, mask=one).item() == 0.0


def test_bad_shapes_and_options_fail_clearly():
    with pytest.raises(ValueError, match="relates tokens"):
        LOSSES.get("trg").from_shapes(student_shape=(16,), teacher_shape=(8, 4, 4), num_train_samples=1)
    with pytest.raises(ValueError, match="teacher_shape is required"):
        TRG.from_shapes(student_shape=(4, 4, 4), teacher_shape=None, num_train_samples=1)
    for options, bad in (({"k": 0}, "k"), ({"sigma": 0.0}, "sigma"), ({"gamma": -1.0}, "gamma"),
                         ({"temperature_end": 0}, "temperature_end")):
        with pytest.raises(ValueError, match=bad):
            LOSSES.check_options("trg", options, where="distill.options")


def test_a_run_with_a_vit_student(tmp_path):
    from transfuse.config import config_from_dict
    from transfuse.run import run

    cfg = {
        "name": "trg-vit", "seed": 0, "data": {"name": "digits"},
        "student": {"name": "vit", "options": {"dim": 16, "depth": 1, "heads": 2}},
        "teacher": {"name": "cnn", "options": {"channels": [16, 32]},
                    "train": {"steps": 60, "batch_size": 64, "optim": {"name": "adam", "lr": 0.003}}},
        "distill": {"terms": [{"loss": "ce", "weight": 0.1}, {"loss": "kd", "weight": 0.9},
                              {"loss": "trg", "input": "student.map", "target": "teacher.map"}]},
        "optim": {"name": "adam", "lr": 0.003},
        "train": {"steps": 40, "batch_size": 32, "log_every": 20, "checkpoint_every": 40, "progress": False},
    }
    summary = run(config_from_dict(cfg, source="test"), out_dir=tmp_path / "run", quiet=True)
    assert summary["steps"] == 40 and 0.0 <= summary["student"]["accuracy"] <= 1.0
