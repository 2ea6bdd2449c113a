"""Causal LMs as zoo models: built from sizes or read from a folder the test saves itself,
logits (B, T, V), labels never reach the model, save_pretrained round trip, vocabulary check."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from transfuse.functional import fkl  # noqa: E402
from transfuse.models import build_model  # noqa: E402


@pytest.mark.parametrize("architecture", ["gpt2", "llama"])
def test_built_from_sizes_gives_token_logits(architecture):
    torch.manual_seed(0)
    model = build_model("causal_lm", input_shape=(16,), num_classes=40, architecture=architecture, layers=1, width=32,
                        heads=2)
    ids = torch.randint(40, (3, 16))
    logits = model({"input_ids": ids, "attention_mask": torch.ones(3, 16, dtype=torch.long),
                    "labels": ids})  # labels are ignored: the terms own the loss
    assert logits.shape == (3, 16, 40)
    # Causal: the logits at position t do not depend on later tokens.
    changed = ids.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % 40
    torch.testing.assert_close(model(changed)[:, :10], model(ids)[:, :10])


def test_save_pretrained_then_load_from_path_gives_the_same_model(tmp_path):
    torch.manual_seed(0)
    teacher = build_model("causal_lm", input_shape=(8,), num_classes=30, layers=1, width=16, heads=2).eval()
    teacher.save_pretrained(tmp_path / "teacher")
    loaded = build_model("causal_lm", input_shape=(8,), num_classes=30, path=str(tmp_path / "teacher")).eval()
    ids = torch.randint(30, (2, 8))
    torch.testing.assert_close(loaded(ids), teacher(ids))
    # And plain transformers reads it.
    import transformers

    plain = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "teacher"), local_files_only=True).eval()
    torch.testing.assert_close(plain(input_ids=ids).logits, teacher(ids))
    assert fkl(loaded(ids), teacher(ids)).item() == pytest.approx(0.0, abs=1e-6)


def test_a_vocabulary_other_than_the_data_s_is_refused(tmp_path):
    model = build_model("causal_lm", input_shape=(8,), num_classes=30, layers=1, width=16, heads=2)
    model.save_pretrained(tmp_path / "m")
    with pytest.raises(ValueError, match="vocabulary has 30 tokens but the data's has 31"):
        build_model("causal_lm", input_shape=(8,), num_classes=31, path=str(tmp_path / "m"))
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        build_model("causal_lm", input_shape=(8,), num_classes=30, path=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="heads"):
        build_model("causal_lm", input_shape=(8,), num_classes=30, width=30, heads=4)
