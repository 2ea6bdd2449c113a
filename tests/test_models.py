"""The model zoo: every registered model builds, predicts and exposes its declared taps."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

from transfuse.models import MODELS, build_model
from transfuse.registry import UnknownNameError

EXTERNAL = {"hf", "timm", "torchvision", "causal_lm"}  # need outside packages or files, or take tokens: tested on their own
ZOO = [name for name in MODELS.names() if name not in EXTERNAL]
SHAPES = [(1, 8, 8), (1, 28, 28)]
HINT_RANK = {"mlp": 2}  # every other built-in model's hint is a (B, C, H, W) map


def _small(name: str) -> dict:
    # Small widths keep the parametrised tests fast; defaults are tested for size below.
    return {"resnet": {"depth": 8, "width": 4}, "wrn": {"depth": 10, "widen_factor": 1}, "cnn": {"channels": [4, 8]},
            "mlp": {"hidden": [8, 6]}}.get(name, {})


def _tapped(model: nn.Module, path: str, x: torch.Tensor) -> torch.Tensor:
    seen = []
    handle = model.get_submodule(path).register_forward_hook(lambda _m, _i, out: seen.append(out))
    try:
        model(x)
    finally:
        handle.remove()
    assert len(seen) == 1, f"{path} ran {len(seen)} times in one forward pass"
    return seen[0]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name", ZOO)
def test_zoo_model_predicts_and_exposes_taps(name, shape):
    model = build_model(name, input_shape=shape, num_classes=7, **_small(name))
    x = torch.randn(3, *shape)
    assert model(x).shape == (3, 7)
    feature = _tapped(model, model.feature_layer, x)
    hint = _tapped(model, model.hint_layer, x)
    last_map = _tapped(model, model.map_layer, x)
    assert feature.shape == (3, model.classifier.in_features)  # the classifier's input, (B, D)
    assert hint.dim() == HINT_RANK.get(name, 4) and hint.shape[0] == 3
    assert last_map.dim() == HINT_RANK.get(name, 4) and last_map.shape[0] == 3


@pytest.mark.parametrize("name", ZOO)
def test_zoo_model_builds_with_default_options(name):
    model = build_model(name, input_shape=(1, 8, 8), num_classes=10)
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 10)


@pytest.mark.parametrize("name", ZOO)
def test_option_typo_names_the_option(name):
    with pytest.raises(ValueError, match="'hiddden'"):
        build_model(name, input_shape=(1, 8, 8), num_classes=10, hiddden=3)


def test_unknown_model_lists_valid_names():
    with pytest.raises(UnknownNameError, match="resnet.*wrn|mlp"):
        build_model("resnt", input_shape=(1, 8, 8), num_classes=10)


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name, options, millions", [
    ("resnet", {"depth": 56}, 0.86),
    ("resnet", {"depth": 32, "width": 64, "stem_width": 32}, 7.43),
    ("resnet", {"depth": 8, "width": 64, "stem_width": 32}, 1.23),
    ("wrn", {"depth": 40, "widen_factor": 2}, 2.25),
    ("wrn", {"depth": 16, "widen_factor": 2}, 0.70),
])
def test_parameter_counts_match_the_papers(name, options, millions):
    # Counts in CRD (Tian et al., 2020), table 1, for CIFAR-100.
    model = build_model(name, input_shape=(3, 32, 32), num_classes=100, **options)
    assert _params(model) / 1e6 == pytest.approx(millions, abs=0.01)


@pytest.mark.parametrize("name, options, match", [
    ("resnet", {"depth": 21}, "6n\\+2"),
    ("wrn", {"depth": 20}, "6n\\+4"),
    ("mlp", {"activation": "tanh"}, "activation"),
    ("mlp", {"hidden": [0]}, "hidden"),
    ("cnn", {"channels": []}, "channels"),
])
def test_bad_option_values_are_explained(name, options, match):
    with pytest.raises(ValueError, match=match):
        build_model(name, input_shape=(1, 8, 8), num_classes=10, **options)


def test_conv_models_need_image_shapes():
    with pytest.raises(ValueError, match="channels, height, width"):
        build_model("cnn", input_shape=(64,), num_classes=10)


def test_mlp_layers_and_taps():
    model = build_model("mlp", input_shape=(1, 8, 8), num_classes=10, hidden=[32, 16], dropout=0.1)
    x = torch.randn(4, 1, 8, 8)
    assert _tapped(model, model.hint_layer, x).shape == (4, 32)
    assert _tapped(model, model.feature_layer, x).shape == (4, 16)
    linear = build_model("mlp", input_shape=(1, 8, 8), num_classes=10, hidden=[])
    assert _tapped(linear, linear.feature_layer, x).shape == (4, 64)


def test_cnn_stops_pooling_at_2x2_and_can_drop_batch_norm():
    model = build_model("cnn", input_shape=(1, 8, 8), num_classes=10, channels=[4, 4, 4, 4], hidden=12, batch_norm=False)
    x = torch.randn(2, 1, 8, 8)
    assert _tapped(model, model.hint_layer, x).shape == (2, 4, 2, 2)
    assert _tapped(model, model.feature_layer, x).shape == (2, 12)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def test_resnet_hint_is_the_middle_stage_and_map_the_last():
    # RepDistiller's and mdistiller's FitNets tap feats[2] (layer2); SP taps the last stage.
    model = build_model("resnet", input_shape=(3, 28, 28), num_classes=10, depth=8, width=4)
    assert (model.hint_layer, model.map_layer) == ("layer2", "layer3")
    assert _tapped(model, model.hint_layer, torch.randn(2, 3, 28, 28)).shape == (2, 8, 14, 14)
    assert _tapped(model, model.map_layer, torch.randn(2, 3, 28, 28)).shape == (2, 16, 7, 7)


def test_vision_models_say_how_to_install(monkeypatch):
    for package in ("timm", "torchvision"):
        monkeypatch.setitem(sys.modules, package, None)  # makes `import package` fail
        with pytest.raises(ImportError, match=r"pip install 'transfuse\[vision\]'"):
            build_model(package, input_shape=(3, 32, 32), num_classes=10, arch="resnet18")


# --- Hugging Face ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=16, num_labels=3)
    path = tmp_path_factory.mktemp("tiny-bert")
    transformers.BertForSequenceClassification(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_vit(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(image_size=8, patch_size=4, num_channels=1, hidden_size=16, num_hidden_layers=1,
                                    num_attention_heads=2, intermediate_size=32, num_labels=10)
    path = tmp_path_factory.mktemp("tiny-vit")
    transformers.ViTForImageClassification(config).save_pretrained(path)
    return path


def test_hf_sequence_classifier_takes_ids_or_a_dict(tiny_bert):
    model = build_model("hf", input_shape=(8,), num_classes=3, path=str(tiny_bert)).eval()
    assert model.task == "sequence-classification"
    ids = torch.randint(0, 50, (2, 8))
    from_ids = model(ids)
    from_dict = model({"input_ids": ids, "attention_mask": torch.ones(2, 8, dtype=torch.long)})
    assert from_ids.shape == (2, 3)
    torch.testing.assert_close(from_ids, from_dict)


def test_hf_image_classifier(tiny_vit):
    model = build_model("hf", input_shape=(1, 8, 8), num_classes=10, path=str(tiny_vit), task="image-classification")
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 10)


def test_hf_label_count_must_match(tiny_bert):
    with pytest.raises(ValueError, match="3 labels.*10 classes"):
        build_model("hf", input_shape=(8,), num_classes=10, path=str(tiny_bert))


def test_hf_missing_folder_is_named(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        build_model("hf", input_shape=(8,), num_classes=3, path=str(missing))


def test_hf_without_transformers_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ImportError, match=r"pip install 'transfuse\[hf\]'"):
        build_model("hf", input_shape=(8,), num_classes=3, path=str(tmp_path))


def test_hf_auto_task_needs_a_known_architecture(tmp_path):
    pytest.importorskip("transformers")
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(ValueError, match="set options.task"):
        build_model("hf", input_shape=(8,), num_classes=3, path=str(tmp_path))


def test_cnn_without_global_pool_flattens_the_last_map():
    model = build_model("cnn", input_shape=(1, 28, 28), num_classes=10, channels=[4, 8], hidden=0, global_pool=False)
    seen = {}
    model.get_submodule(model.feature_layer).register_forward_hook(lambda m, i, o: seen.setdefault("f", o))
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    assert seen["f"].shape == (2, 8 * 7 * 7)
