"""ScaleKD-lite: the DCT, DC removal, the dual-view loss against a re-statement, and the projector."""

from __future__ import annotations

import math

import pytest
import torch

import transfuse.functional as TF
from transfuse.losses import LOSSES
from transfuse.losses.scalekd import CrossAttentionProjector, ScaleKD, auto_heads
from transfuse.models import build_model
from transfuse.taps import FeatureTaps

torch.set_num_threads(1)


def test_dct_matrix_is_the_orthonormal_dct2():
    n = 5
    d = TF.dct_matrix(n, dtype=torch.float64)
    assert torch.allclose(d @ d.t(), torch.eye(n, dtype=torch.float64), atol=1e-12)
    x = torch.randn(n, dtype=torch.float64)
    # The textbook definition, term by term.
    for k in range(n):
        s = math.sqrt((1 if k == 0 else 2) / n)
        expected = s * sum(x[i].item() * math.cos(math.pi * (2 * i + 1) * k / (2 * n)) for i in range(n))
        assert abs((d @ x)[k].item() - expected) < 1e-12
    # The DC coefficient of a constant signal carries all of it.
    assert torch.allclose(d @ torch.ones(n, dtype=torch.float64), torch.tensor([math.sqrt(n), 0, 0, 0, 0.0],
                                                                               dtype=torch.float64), atol=1e-12)


@pytest.mark.parametrize("shape", [(2, 3, 7, 7), (4, 5, 6), (1, 2, 3, 8)])
def test_dct2d_round_trip(shape):
    x = torch.randn(*shape, dtype=torch.float64)
    assert torch.allclose(TF.idct2d(TF.dct2d(x)), x, atol=1e-12)
    assert torch.allclose(TF.dct2d(TF.idct2d(x)), x, atol=1e-12)
    # Orthonormal: energy is kept (Parseval).
    assert torch.allclose(TF.dct2d(x).pow(2).sum(), x.pow(2).sum())


def test_remove_dc_zeroes_the_dc_coefficient_and_subtracts_the_mean():
    x = torch.randn(3, 4, 5, 6, dtype=torch.float64)
    y = TF.remove_dc(x)
    coefficients = TF.dct2d(y)
    assert coefficients[..., 0, 0].abs().max() < 1e-12
    # Every other coefficient is untouched.
    assert torch.allclose(coefficients[..., 1:, :], TF.dct2d(x)[..., 1:, :], atol=1e-12)
    assert torch.allclose(y, x - x.mean(dim=(-2, -1), keepdim=True), atol=1e-12)
    # A constant map has nothing left.
    assert TF.remove_dc(torch.full((1, 1, 3, 3), 7.0)).abs().max() < 1e-5


def _restated(student_sp, teacher, student_fq, a_s, a_f):
    """The official get_spat_loss + get_freq_loss, written out independently: unit vectors over
    channels at each position, squared error summed over everything, divided by the batch."""
    def unit(x):
        return x / x.pow(2).sum(1, keepdim=True).sqrt().clamp_min(1e-12)

    def centred(x):
        return x - x.mean(dim=(2, 3), keepdim=True)

    b = teacher.shape[0]
    spatial = ((unit(student_sp) - unit(teacher)) ** 2).sum() / b
    frequency = ((unit(centred(student_fq)) - unit(centred(teacher))) ** 2).sum() / b
    return a_s * spatial + a_f * frequency


def test_loss_equals_an_independent_restatement():
    torch.manual_seed(0)
    s_sp, s_fq, t = torch.randn(6, 8, 5, 5), torch.randn(6, 8, 5, 5), torch.randn(6, 8, 5, 5)
    value = TF.scalekd_mimic(s_sp, t, s_fq)
    assert torch.allclose(value, _restated(s_sp, t, s_fq, 0.08, 0.06), rtol=1e-5)
    value = TF.scalekd_mimic(s_sp, t, alpha_spatial=1.0, alpha_frequency=0.5)  # one student map for both views
    assert torch.allclose(value, _restated(s_sp, t, s_sp, 1.0, 0.5), rtol=1e-5)
    # Identical maps give 0; a positive rescaling per position changes nothing (normalised).
    assert TF.scalekd_mimic(t, t).item() < 1e-10
    assert TF.scalekd_mimic(t * 3.0, t).item() < 1e-10


def test_mask_weights_and_per_sample_values():
    torch.manual_seed(0)
    s, t = torch.randn(4, 3, 4, 4), torch.randn(4, 3, 4, 4)
    per_sample = TF.scalekd_mimic(s, t, reduction="none")
    assert per_sample.shape == (4,)
    for i in range(4):
        assert torch.allclose(per_sample[i], _restated(s[i:i + 1], t[i:i + 1], s[i:i + 1], 0.08, 0.06), rtol=1e-5)
    mask = torch.tensor([True, False, True, False])
    assert torch.allclose(TF.scalekd_mimic(s, t, mask=mask), per_sample[mask].mean())
    weights = torch.tensor([1.0, 2.0, 0.0, 0.5])
    assert torch.allclose(TF.scalekd_mimic(s, t, weights=weights), (per_sample * weights).mean())


def test_default_options_are_the_official_ones():
    loss = LOSSES.get("scalekd").build()
    assert (loss.alpha_spatial, loss.alpha_frequency, loss.softmax_scale) == (0.08, 0.06, 5.0)
    spec = LOSSES.get("scalekd")
    assert (spec.weight, spec.ce_weight, spec.inputs, spec.positionwise) == (1.0, 1.0, "map", True)
    # Official head counts: 128-wide heads (3 for 384 channels, 6 for 768); small teachers get 1.
    assert (auto_heads(384), auto_heads(768), auto_heads(1536), auto_heads(64), auto_heads(320)) == (3, 6, 12, 1, 2)


def _student_map_shape(model, input_shape):
    with FeatureTaps(model, [model.map_layer], role="student") as taps:
        model.eval()
        model(torch.randn(2, *input_shape))
        return tuple(taps.collect()[model.map_layer].shape[1:])


@pytest.mark.parametrize(
    "student",
    [
        ("cnn", {"channels": [8, 16], "global_pool": False}),  # (16, 7, 7): same grid
        ("cnn", {"channels": [8, 16, 24]}),  # (24, 3, 3): smaller grid
        ("cnn", {"channels": [8]}),  # (8, 14, 14): larger grid
        ("vit", {"dim": 32, "depth": 2, "heads": 2}),  # (32, 4, 4): ViT patch tokens
    ],
)
def test_projector_output_has_the_teacher_map_shape(student):
    torch.manual_seed(0)
    input_shape = (1, 28, 28)
    teacher = build_model("cnn", input_shape=input_shape, num_classes=10, channels=[16, 32], global_pool=False)
    t_shape = _student_map_shape(teacher, input_shape)
    assert t_shape == (32, 7, 7)
    model = build_model(student[0], input_shape=input_shape, num_classes=10, **student[1])
    s_shape = _student_map_shape(model, input_shape)
    loss = LOSSES.get("scalekd").from_shapes(student_shape=s_shape, teacher_shape=t_shape, num_train_samples=1)
    s = torch.randn(3, *s_shape, requires_grad=True)
    assert loss.projector_spatial(s).shape == loss.projector_frequency(s).shape == (3, *t_shape)
    value = loss(s, torch.randn(3, *t_shape))
    value.backward()
    assert torch.isfinite(value) and s.grad.abs().sum() > 0
    # Every learnable part of both projectors is trained by the loss.
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in loss.parameters())


def test_projector_cross_attention_equals_its_formula():
    torch.manual_seed(0)
    proj = CrossAttentionProjector((6, 3, 3), (8, 2, 2), num_heads=2, softmax_scale=5.0).eval()
    x = torch.randn(2, 6, 3, 3)
    keys_in = (proj.proj_student(x) + proj.pos_embed).flatten(2).transpose(1, 2)  # (2, 9, 6)
    queries = torch.relu(proj.proj_query[0](proj.query.weight))  # (4, 8)
    q, k, v = proj.q(queries), proj.k(keys_in), proj.v(keys_in)  # (4, 8), (2, 9, 8), (2, 9, 8)
    heads = []
    for h in range(2):
        sl = slice(4 * h, 4 * h + 4)
        logits = q[:, sl] @ k[:, :, sl].transpose(1, 2) * (5.0 / math.sqrt(4))  # (2, 4, 9)
        heads.append(logits.softmax(-1) @ v[:, :, sl])  # (2, 4, 4)
    attended = proj.proj(torch.cat(heads, dim=-1))  # (2, 4, 8)
    normed = proj.norm(attended)
    expected = (normed + proj.ffn(normed)).transpose(1, 2).reshape(2, 8, 2, 2)
    assert torch.allclose(proj(x), expected, atol=1e-5)


def test_bad_shapes_and_options_fail_clearly():
    with pytest.raises(ValueError, match=r"\(C, H, W\) maps"):
        LOSSES.get("scalekd").from_shapes(student_shape=(16,), teacher_shape=(8, 4, 4), num_train_samples=1)
    with pytest.raises(ValueError, match="num_heads = 3 must divide"):
        LOSSES.get("scalekd").from_shapes(student_shape=(4, 4, 4), teacher_shape=(8, 4, 4), num_train_samples=1,
                                          num_heads=3)
    with pytest.raises(ValueError, match="teacher_shape is required"):
        ScaleKD.from_shapes(student_shape=(4, 4, 4), teacher_shape=None, num_train_samples=1)
    with pytest.raises(RuntimeError, match="from_shapes"):
        ScaleKD()(torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4))
    with pytest.raises(ValueError, match="alpha_spatial"):
        LOSSES.check_options("scalekd", {"alpha_spatial": -1.0}, where="distill.options")
    with pytest.raises(ValueError, match="softmax_scale"):
        LOSSES.check_options("scalekd", {"softmax_scale": 0}, where="distill.options")
    with pytest.raises(ValueError, match="shape"):
        TF.scalekd_mimic(torch.randn(2, 4, 4, 4), torch.randn(2, 8, 4, 4))


def test_a_run_with_a_vit_student(tmp_path):
    from transfuse.config import config_from_dict
    from transfuse.run import run

    cfg = {
        "name": "scalekd-vit", "seed": 0, "data": {"name": "digits"},
        "student": {"name": "vit", "options": {"dim": 16, "depth": 1, "heads": 2}},
        "teacher": {"name": "cnn", "options": {"channels": [16, 32]},
                    "train": {"steps": 60, "batch_size": 64, "optim": {"name": "adam", "lr": 0.003}}},
        "distill": {"method": "scalekd"},
        "optim": {"name": "adam", "lr": 0.003},
        "train": {"steps": 40, "batch_size": 32, "log_every": 20, "checkpoint_every": 40, "progress": False},
    }
    summary = run(config_from_dict(cfg, source="test"), out_dir=tmp_path / "run", quiet=True)
    assert summary["steps"] == 40 and 0.0 <= summary["student"]["accuracy"] <= 1.0
