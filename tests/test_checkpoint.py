import pickle

import pytest
import torch

from transfuse.checkpoint import (
    CheckpointError, CheckpointFallbackWarning, latest_checkpoint, list_checkpoints, load_checkpoint, load_into,
    load_latest_checkpoint, load_weights, remove_leftovers, rng_state, save_checkpoint, save_weights, set_rng_state,
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
    with pytest.raises(CheckpointError, match="not a transfuse checkpoint state: it holds Python objects") as err:
        load_checkpoint(ckpt)
    assert "weights_only" not in str(err.value), "torch's advice to load with weights_only=False must not be relayed"


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


def _listing(folder):
    return sorted(p.name for p in folder.iterdir())


def _cut(path, fraction):
    """Keep the first ``fraction`` of a file's bytes, as a crash of the disk may."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])


def test_leftovers_of_killed_processes_are_removed_on_save(tmp_path):
    state = {"w": torch.ones(2)}
    for step in (10, 20):
        save_checkpoint(tmp_path, step, state, {"step": step}, keep=2)
    # Killed mid-write (any process id, ours included: ids are reused), mid-delete, and
    # mid-update of the pointer.
    for name in (".tmp-step-00000030-999999", f".tmp-step-00000030-{__import__('os').getpid()}", ".tmp-del-step-00000005-42"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(b"partial")
    (tmp_path / ".latest.abc123.tmp").write_text("step-00000030")
    (tmp_path / "step-00000005").mkdir()  # pruning removed state.pt, then the process died
    (tmp_path / "step-00000005" / "model.safetensors").write_bytes(b"x")
    (tmp_path / "step-00000007").mkdir()  # nothing left in it at all
    save_checkpoint(tmp_path, 30, state, {"step": 30}, keep=2)
    assert _listing(tmp_path) == ["latest", "step-00000020", "step-00000030"]
    assert (tmp_path / "latest").read_text().strip() == "step-00000030"


def test_remove_leftovers_keeps_complete_checkpoints(tmp_path):
    save_checkpoint(tmp_path, 1, {"w": torch.ones(1)}, {"step": 1})
    (tmp_path / ".tmp-step-00000002-1").mkdir()
    (tmp_path / "step-00000002").mkdir()
    removed = remove_leftovers(tmp_path)
    assert sorted(p.name for p in removed) == [".tmp-step-00000002-1", "step-00000002"]
    assert _listing(tmp_path) == ["latest", "step-00000001"]
    assert remove_leftovers(tmp_path / "missing") == []


def test_pruning_keeps_the_new_checkpoint_and_drops_a_rewritten_future(tmp_path):
    # A run resumed from step 10 (step 20 was damaged) saves step 15: step 20 belongs to
    # the abandoned future and goes; with keep=1 the one just written must survive.
    state = {"w": torch.ones(1)}
    for step in (10, 20):
        save_checkpoint(tmp_path, step, state, {"step": step}, keep=2)
    final = save_checkpoint(tmp_path, 15, state, {"step": 15}, keep=1)
    assert _listing(tmp_path) == ["latest", "step-00000015"]
    assert latest_checkpoint(tmp_path) == final
    with pytest.raises(ValueError, match="keep_checkpoints"):
        save_checkpoint(tmp_path, 16, state, {"step": 16}, keep=0)


def test_rewriting_a_step_replaces_it(tmp_path):
    save_checkpoint(tmp_path, 10, {"w": torch.zeros(1)}, {"step": 10})
    save_checkpoint(tmp_path, 10, {"w": torch.ones(1)}, {"step": 10})
    assert _listing(tmp_path) == ["latest", "step-00000010"]
    assert torch.equal(load_checkpoint(tmp_path / "step-00000010")[0]["w"], torch.ones(1))


def test_steps_past_eight_digits_still_count(tmp_path):
    for step in (99_999_999, 100_000_000):
        save_checkpoint(tmp_path, step, {"w": torch.ones(1)}, {"step": step}, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-99999999", "step-100000000"]


@pytest.mark.parametrize("file", ["model.safetensors", "state.pt"])
@pytest.mark.parametrize("fraction", [0.5, 0.0])
def test_truncated_files_are_called_truncated(tmp_path, file, fraction):
    ck = save_checkpoint(tmp_path, 1, {"w": torch.randn(64, 64)}, {"step": 1, "rng": rng_state()})
    _cut(ck / file, fraction)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(ck)
    message = str(err.value).replace(str(tmp_path), "<tmp>")  # the test's folder name holds "truncated" too
    assert "truncated" in message and file in message, message
    assert "weights_only" not in message and len(message) < 200, message


def test_a_state_that_is_not_a_transfuse_state_says_so(tmp_path):
    ck = save_checkpoint(tmp_path, 1, {"w": torch.ones(1)}, {"step": 1})
    torch.save([1, 2, 3], ck / "state.pt")
    with pytest.raises(CheckpointError, match="not a transfuse checkpoint state"):
        load_checkpoint(ck)
    (ck / "state.pt").unlink()
    with pytest.raises(CheckpointError, match="has no state.pt"):
        load_checkpoint(ck)


def test_a_safetensors_message_is_a_diagnosis_not_the_parser_error(tmp_path):
    save_weights(tmp_path / "w.safetensors", {"w": torch.randn(32, 32)})
    _cut(tmp_path / "w.safetensors", 0.5)
    with pytest.raises(CheckpointError, match=r"is truncated \(\d+ of at least \d+ bytes\)") as err:
        load_weights(tmp_path / "w.safetensors")
    assert "deserializing" not in str(err.value)


def test_load_latest_falls_back_past_a_damaged_checkpoint(tmp_path):
    for step in (10, 20):
        save_checkpoint(tmp_path, step, {"w": torch.full((1,), float(step))}, {"step": step}, keep=2)
    _cut(tmp_path / "step-00000020" / "state.pt", 0.5)
    with pytest.warns(CheckpointFallbackWarning, match=r"step-00000020.*truncated.*step-00000010") as record:
        loaded = load_latest_checkpoint(tmp_path)
    assert len(record) == 1
    assert loaded.path.name == "step-00000010" and loaded.train_state["step"] == 10
    assert torch.equal(loaded.model_state["w"], torch.full((1,), 10.0))
    assert [p.name for p, _ in loaded.skipped] == ["step-00000020"]


def test_load_latest_lists_every_problem_when_nothing_loads(tmp_path):
    assert load_latest_checkpoint(tmp_path) is None
    for step in (10, 20):
        save_checkpoint(tmp_path, step, {"w": torch.ones(1)}, {"step": step}, keep=2)
    _cut(tmp_path / "step-00000020" / "state.pt", 0.0)
    _cut(tmp_path / "step-00000010" / "model.safetensors", 0.5)
    with pytest.raises(CheckpointError, match=r"step-00000020: .*empty.*; step-00000010: .*truncated") as err:
        load_latest_checkpoint(tmp_path)
    assert "weights_only" not in str(err.value)
