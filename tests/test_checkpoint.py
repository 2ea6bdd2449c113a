import pickle

import pytest
import torch

from transfuse.checkpoint import (
    CheckpointError, latest_checkpoint, list_checkpoints, load_checkpoint, load_into, load_weights, rng_state,
    save_checkpoint, save_weights, set_rng_state,
)


def test_save_load_roundtrip_and_pruning(tmp_path):
    state = {"w": torch.randn(3, 2), "b": torch.zeros(2)}
    for step in (10, 20, 30):
        save_checkpoint(tmp_path, step, state, {"step": step, "rng": rng_state()}, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000020", "step-00000030"]
    latest = latest_checkpoint(tmp_path)
    assert latest.name == "step-00000030"
    model_state, train_state = load_checkpoint(latest)
    assert torch.equal(model_state["w"], state["w"]) and train_state["step"] == 30
    assert not list(tmp_path.glob(".tmp-*")), "no temporary folder may be left behind"


def test_half_written_checkpoint_is_ignored(tmp_path):
    save_checkpoint(tmp_path, 5, {"w": torch.ones(1)}, {"step": 5})
    # A run killed mid-write leaves a temp folder and no pointer update.
    (tmp_path / ".tmp-step-00000010-123").mkdir()
    (tmp_path / "step-00000010").mkdir()  # no files in it: incomplete
    assert latest_checkpoint(tmp_path).name == "step-00000005"


def test_rng_state_roundtrip():
    state = rng_state()
    a = (torch.rand(3), __import__("random").random(), __import__("numpy").random.rand())
    set_rng_state(state)
    b = (torch.rand(3), __import__("random").random(), __import__("numpy").random.rand())
    assert torch.equal(a[0], b[0]) and a[1:] == b[1:]


class _Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_pickled_objects_are_refused(tmp_path):
    save_checkpoint(tmp_path, 1, {"w": torch.ones(1)}, {"step": 1})
    ckpt = latest_checkpoint(tmp_path)
    with open(ckpt / "state.pt", "wb") as f:
        pickle.dump({"step": 1, "x": _Evil()}, f)
    with pytest.raises(CheckpointError, match="unreadable or unsafe"):
        load_checkpoint(ckpt)


def test_missing_and_mismatching_weights(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_weights(tmp_path / "nope.safetensors")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "step-00000001")
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load_weights(tmp_path / "bad.safetensors")
    net = torch.nn.Linear(3, 2)
    save_weights(tmp_path / "w.safetensors", torch.nn.Linear(4, 2).state_dict())
    with pytest.raises(CheckpointError, match=r"shape mismatch weight: file \(2, 4\) vs model \(2, 3\)"):
        load_into(net, load_weights(tmp_path / "w.safetensors"), source="test")


def test_written_files_get_the_ordinary_permissions(tmp_path):
    import os
    import stat

    from transfuse.atomic import write_atomic
    from transfuse.checkpoint import save_checkpoint, save_weights

    old = os.umask(0o022)
    try:
        write_atomic(tmp_path / "a.txt", "x")
        save_weights(tmp_path / "w.safetensors", {"a": torch.zeros(2)})
        ck = save_checkpoint(tmp_path / "ck", 1, {"a": torch.zeros(2)}, {"step": 1})
    finally:
        os.umask(old)
    for path in (tmp_path / "a.txt", tmp_path / "w.safetensors", ck / "model.safetensors"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path
