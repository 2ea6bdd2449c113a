"""The tiny ViT: shapes, taps that look like a CNN's, option checks, and that it learns digits."""

from __future__ import annotations

import pytest
import torch

from transfuse.models import MODELS, build_model
from transfuse.models.vit import TinyViT, map_to_tokens
from transfuse.taps import FeatureTaps

torch.set_num_threads(1)


def test_registered_and_default_grid_is_four_by_four():
    assert "vit" in MODELS.names()
    for size, patch in ((28, 7), (8, 2), (32, 8)):
        model = build_model("vit", input_shape=(1, size, size), num_classes=10)
        assert isinstance(model, TinyViT) and model.grid == (4, 4)
        assert model.patch_embed.kernel_size == (patch, patch)
        assert model(torch.randn(3, 1, size, size)).shape == (3, 10)


def test_taps_are_maps_like_a_cnn():
    torch.manual_seed(0)
    model = build_model("vit", input_shape=(1, 28, 28), num_classes=10, dim=32, depth=3, heads=4)
    assert model.hint_layer == "hint_map" and model.map_layer == "map" and model.feature_layer == "embedding"
    x = torch.randn(5, 1, 28, 28)
    with FeatureTaps(model, [model.feature_layer, model.hint_layer, model.map_layer], role="student") as taps:
        logits = model(x)
        out = taps.collect()
    assert out["map"].shape == (5, 32, 4, 4) and out["hint_map"].shape == (5, 32, 4, 4)
    assert out["embedding"].shape == (5, 32) == (5, model.classifier.in_features)
    # The map is the normalised last tokens in row-major patch order, and the classifier reads its mean.
    tokens = map_to_tokens(out["map"])  # (B, 16, D)
    assert torch.allclose(out["embedding"], tokens.mean(1), atol=1e-6)
    assert torch.allclose(logits, model.classifier(out["embedding"]), atol=1e-6)
    # The hint is the middle block's (block 2 of 3) output.
    h = map_to_tokens(model.patch_embed(x)) + model.pos_embed
    for block in list(model.blocks)[:2]:
        h = block(h)
    assert torch.allclose(map_to_tokens(out["hint_map"]), h, atol=1e-5)


def test_map_positions_follow_the_image():
    # Patch (row 0, col 1) of the grid is the token at index 1: changing only that patch of the
    # image changes the patch embedding at map position (0, 1) and nowhere else.
    torch.manual_seed(0)
    model = build_model("vit", input_shape=(1, 28, 28), num_classes=10, dim=16, depth=1, heads=2)
    x = torch.zeros(1, 1, 28, 28)
    y = x.clone()
    y[:, :, 0:7, 7:14] = 1.0
    diff = (model.patch_embed(y) - model.patch_embed(x)).abs().sum(1)[0]  # (4, 4)
    assert diff[0, 1] > 0 and diff.sum() == diff[0, 1]


@pytest.mark.parametrize(
    "options, match",
    [
        ({"patch_size": 5}, "patch_size"),
        ({"dim": 30, "heads": 4}, "heads"),
        ({"depth": 0}, "depth"),
        ({"mlp_ratio": 0}, "mlp_ratio"),
    ],
)
def test_bad_options_fail_clearly(options, match):
    with pytest.raises(ValueError, match=match):
        build_model("vit", input_shape=(1, 28, 28), num_classes=10, **options)


def test_default_patch_needs_a_divisible_image_and_flat_inputs_are_refused():
    with pytest.raises(ValueError, match="patch_size"):
        build_model("vit", input_shape=(1, 10, 10), num_classes=10)
    assert build_model("vit", input_shape=(1, 10, 10), num_classes=10, patch_size=5).grid == (2, 2)
    with pytest.raises(ValueError, match="image input_shape"):
        build_model("vit", input_shape=(64,), num_classes=10)


def test_learns_digits():
    from transfuse.data import load_dataset

    torch.manual_seed(0)
    splits = load_dataset("digits", split_seed=0)
    x = torch.stack([splits.train[i]["input"] for i in range(len(splits.train))])
    y = torch.stack([splits.train[i]["target"] for i in range(len(splits.train))])
    xt = torch.stack([splits.test[i]["input"] for i in range(len(splits.test))])
    yt = torch.stack([splits.test[i]["target"] for i in range(len(splits.test))])
    model = build_model("vit", input_shape=splits.input_shape, num_classes=10, dim=32, depth=2, heads=2)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(300):
        idx = torch.randint(len(x), (64,))
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        acc = (model(xt).argmax(1) == yt).float().mean().item()
    assert acc > 0.8  # chance is 0.1
