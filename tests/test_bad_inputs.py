"""The bad-input catalogue: what a new user or a hostile tester may type, and what they get.

Each case is (arguments or a setup that breaks something) -> exit code, a phrase of the
one-paragraph message, and, where promised, "nothing written": no run folder and no new
file in the teacher cache. The count of cases is quoted in the release notes; add a case
here for every bad input a user reports.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
import yaml

from transfuse.cli import main
from transfuse.rundir import FolderLock


@dataclass
class Case:
    """One bad input: ``sets`` are --set overrides; ``setup(tmp, cfg_dict, argv)`` may change
    files, the config or the command line before the run."""

    id: str
    phrase: str
    sets: list[str] = field(default_factory=list)
    setup: Callable | None = None
    code: int = 2
    nothing_written: bool = True
    command: str = "run"


def _npz(name: str, make: Callable[[np.ndarray, np.ndarray], dict]) -> Callable:
    def setup(tmp: Path, cfg: dict, argv: list[str]) -> None:
        rng = np.random.default_rng(0)
        x, y = rng.normal(size=(120, 8)), rng.integers(0, 3, 120)
        arrays = {"x_train": x, "y_train": y, "x_test": x[:40].copy(), "y_test": y[:40].copy()}
        arrays.update(make(x, y))
        np.savez(tmp / f"{name}.npz", **arrays)
        cfg["data"] = {"name": "npz", "options": {"path": str(tmp / f"{name}.npz")}}
    return setup


def _with_nan(x, y):
    x = x.copy()
    x[5, 2] = np.nan
    return {"x_train": x}


def _with_inf_test(x, y):
    t = x[:40].copy()
    t[3, 1] = np.inf
    return {"x_test": t}


def _negative_label(x, y):
    y = y.copy()
    y[3] = -1
    return {"y_train": y}


def _garbage_npz(tmp: Path, cfg: dict, argv: list[str]) -> None:
    (tmp / "garbage.npz").write_bytes(b"definitely not a zip archive " * 8)
    cfg["data"] = {"name": "npz", "options": {"path": str(tmp / "garbage.npz")}}


def _yaml_tag_in_file(tmp: Path, cfg: dict, argv: list[str]) -> None:
    (tmp / "run.yaml").write_text("name: !!python/object/apply:os.system ['echo pwned']\n")
    argv[1] = str(tmp / "run.yaml")


def _missing_config(tmp: Path, cfg: dict, argv: list[str]) -> None:
    argv[1] = str(tmp / "no-such.yaml")


def _pickled_weights(tmp: Path, cfg: dict, argv: list[str]) -> None:
    with open(tmp / "evil.safetensors", "wb") as f:
        pickle.dump({"w": 1}, f)
    cfg["teacher"]["weights"] = str(tmp / "evil.safetensors")


def _out_under_a_file(tmp: Path, cfg: dict, argv: list[str]) -> None:
    (tmp / "a-file").write_text("x")
    argv[argv.index("--out") + 1] = str(tmp / "a-file" / "run")


def _demo_into_foreign_folder(tmp: Path, cfg: dict, argv: list[str]) -> None:
    (tmp / "out").mkdir()
    (tmp / "out" / "precious.txt").write_text("keep me")
    argv[:] = ["demo", "--out", str(tmp / "out"), "--quiet"]


CASES = [
    # config: names, fields, values
    Case("unknown field", "unknown field", ["train.stepz=5"]),
    Case("unknown method", "valid", ["distill.method=kdd"]),
    Case("unknown model", "valid", ["student.name=mpl"]),
    Case("unknown data set", "valid", ["data.name=digitz"]),
    Case("override without =", "expected KEY=VALUE", ["train.steps"]),
    Case("YAML error in --set", "not plain YAML", ["train.steps=[1"]),
    Case("YAML tag in --set", "not plain YAML", ["name=!!python/object/apply:os.system ['echo pwned']"]),
    Case("YAML tag in the config file", "not valid YAML", setup=_yaml_tag_in_file),
    Case("missing config file", "does not exist", setup=_missing_config),
    Case("absolute run name", "not a valid run name", ["name=/tmp/elsewhere"]),
    Case("run name with ..", "not a valid run name", ["name=../../x"]),
    Case("boolean as a step count", "not a boolean", ["train.steps=true"]),
    Case("temperature 0", "greater than 0", ["distill.options.temperature=0"]),
    Case("temperature inf", "finite", ["distill.options.temperature=.inf"]),
    Case("non-finite distill.weight", "distill.weight", ["distill.weight=.nan"]),
    Case("num_classes in model options", "come from the data set", ["teacher.options.num_classes=5"]),
    Case("accelerator that is not here", "fabric:", ["fabric.accelerator=cuda"]),
    Case("negative thread count", "greater than or equal to 0", ["fabric.threads=-1"]),
    # shapes and sizes known before training
    Case("batch larger than the data", "has only", ["train.batch_size=5000"]),
    Case("teacher batch larger than the data", "participants.teacher.train.batch_size", ["teacher.train.batch_size=5000"]),
    Case("FitNets from a flat student to a conv map", "no regressor",
         ["distill.method=fitnet", "teacher.name=cnn", "teacher.options={channels: [8, 16]}"]),
    # files
    Case("missing weights file", "does not exist", ["teacher.weights=/no/such/teacher.safetensors"]),
    Case("pickle posing as safetensors", "not a readable safetensors", setup=_pickled_weights),
    Case("--out under a file", "in the way", setup=_out_under_a_file),
    Case("demo into a folder it did not make", "not a demo folder", setup=_demo_into_foreign_folder, command="demo"),
    # data
    Case("int8 inputs", "floating-point inputs", setup=_npz("int8", lambda x, y: {
        "x_train": (x * 10).astype(np.int8), "x_test": (x[:40] * 10).astype(np.int8)})),
    Case("string inputs", "numeric", setup=_npz("str", lambda x, y: {
        "x_train": np.array(["a"] * len(x)), "x_test": np.array(["a"] * 40)})),
    Case("NaN in the training inputs", "non-finite", setup=_npz("nan", _with_nan)),
    Case("inf in the test inputs", "non-finite", setup=_npz("inf", _with_inf_test)),
    Case("negative label", "-1", setup=_npz("neg", _negative_label)),
    Case("garbage npz", "not an .npz archive", setup=_garbage_npz),
    Case("npz without y_test", "missing array", setup=_npz("short", lambda x, y: {"y_test": None})),
    Case("npz path missing", "no such file", ["data.name=npz", "data.options.path=/no/such.npz"]),
    # inputs that must work (and so must write a run)
    Case("float16 inputs", "", setup=_npz("f16", lambda x, y: {
        "x_train": x.astype(np.float16), "x_test": x[:40].astype(np.float16)}), code=0, nothing_written=False),
    Case("uint8 images", "", setup=_npz("u8", lambda x, y: {
        "x_train": (np.abs(x) * 50).astype(np.uint8), "x_test": (np.abs(x[:40]) * 50).astype(np.uint8)}),
        code=0, nothing_written=False),
]


def _files(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*")} if folder.exists() else set()


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, base_config, teacher_cache, tmp_path, capsys):
    base_config["train"]["steps"] = 5
    argv = [case.command, str(tmp_path / "run.yaml"), "--out", str(tmp_path / "out"), "--quiet"]
    for s in case.sets:
        argv += ["--set", s]
    if case.setup is not None:
        case.setup(tmp_path, base_config, argv)
    # npz cases drop arrays by setting them to None
    npz = base_config.get("data", {}).get("options", {}).get("path", "")
    if npz.endswith("short.npz"):
        with np.load(npz) as a:
            np.savez(npz, **{k: a[k] for k in a.files if k != "y_test"})
    if case.setup is not _yaml_tag_in_file:
        (tmp_path / "run.yaml").write_text(yaml.safe_dump(base_config))
    cache_before = _files(teacher_cache)
    code = main(argv)
    err = capsys.readouterr().err
    assert code == case.code, err
    assert case.phrase in err, err
    if case.code == 2:
        assert "Traceback" not in err and err.count("transfuse: error:") == 1
    if case.nothing_written:
        out = Path(argv[argv.index("--out") + 1])
        if case.command == "demo":
            assert sorted(p.name for p in out.iterdir()) == ["precious.txt"]
        else:
            assert not out.exists(), f"{out} was written: {sorted(_files(out))}"
        assert _files(teacher_cache) == cache_before, "the teacher cache changed"


def _config(tmp_path: Path, cfg: dict) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_a_batch_must_divide_across_processes(base_config):
    # Checked through the function (a DDP run inside pytest would relaunch pytest itself).
    from transfuse.build import check_batches, load_data
    from transfuse.config import config_from_dict
    from transfuse.errors import DataError

    base_config["train"]["batch_size"] = 33
    cfg = config_from_dict(base_config)
    splits, train_set = load_data(cfg.data)
    check_batches(cfg, splits, train_set, world_size=1)
    with pytest.raises(DataError, match="train.batch_size = 33 must be divisible by the 2 processes"):
        check_batches(cfg, splits, train_set, world_size=2)


def test_malicious_pickle_in_a_checkpoint_never_runs(base_config, tmp_path, capsys):
    cfg = _config(tmp_path, {**base_config, "train": {**base_config["train"], "steps": 20, "checkpoint_every": 10}})
    out = tmp_path / "out"
    assert main(["run", str(cfg), "--out", str(out), "--quiet", "--set", "train.steps=10"]) == 0
    (out / "summary.json").unlink()
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    step = out / "checkpoints" / "step-00000010"
    with open(step / "state.pt", "wb") as f:
        pickle.dump({"step": 10, "x": Evil()}, f)
    assert main(["run", str(cfg), "--out", str(out), "--quiet", "--resume"]) == 2
    err = capsys.readouterr().err
    assert not marker.exists() and "weights_only=False" not in err and "Traceback" not in err


def test_a_folder_in_use_is_refused(base_config, tmp_path, capsys):
    cfg = _config(tmp_path, base_config)
    with FolderLock(tmp_path / "out"):  # another process's run, as far as the lock can tell
        assert main(["run", str(cfg), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    assert "in use by another transfuse process" in capsys.readouterr().err
    assert main(["run", str(cfg), "--out", str(tmp_path / "out"), "--quiet"]) == 0  # free once it is released


def test_finished_and_interrupted_folders_say_what_to_do(base_config, tmp_path, capsys):
    cfg = _config(tmp_path, base_config)
    out = tmp_path / "out"
    assert main(["run", str(cfg), "--out", str(out), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["run", str(cfg), "--out", str(out), "--quiet"]) == 2
    assert "holds a finished run" in capsys.readouterr().err
    (out / "summary.json").unlink()  # as if killed after the last checkpoint
    assert main(["run", str(cfg), "--out", str(out), "--quiet"]) == 2
    assert "pass --resume" in capsys.readouterr().err
    assert main(["run", str(cfg), "--out", str(out), "--quiet", "--resume", "--set", "train.steps=50"]) == 2
    assert "config differs" in capsys.readouterr().err


def test_a_failed_run_leaves_a_reusable_folder(base_config, tmp_path, capsys, monkeypatch):
    """A run that stops before its first checkpoint leaves nothing that blocks the next one."""
    cfg = _config(tmp_path, base_config)
    out = tmp_path / "out"
    import transfuse.engine as engine

    def broken(*args, **kwargs):
        raise KeyboardInterrupt  # the user pressed ^C before the first checkpoint

    monkeypatch.setattr(engine, "save_checkpoint", broken)
    assert main(["run", str(cfg), "--out", str(out), "--quiet"]) == 130
    monkeypatch.undo()
    assert (out / "config.yaml").is_file()
    assert main(["run", str(cfg), "--out", str(out), "--quiet"]) == 0
    assert main(["run", str(cfg), "--out", str(tmp_path / "other"), "--quiet", "--resume"]) == 0


def test_replaced_teacher_weights_are_refused_on_resume(base_config, tmp_path, capsys):
    from transfuse.checkpoint import save_weights
    from transfuse.config import config_from_dict
    from transfuse.data import load_dataset
    from transfuse.models import build_model

    digits = load_dataset("digits")
    teacher = build_model("mlp", input_shape=digits.input_shape, num_classes=digits.num_classes, hidden=[64])
    save_weights(tmp_path / "teacher.safetensors", teacher.state_dict())
    base_config["teacher"]["weights"] = str(tmp_path / "teacher.safetensors")
    config_from_dict(base_config)  # the config is valid
    cfg = _config(tmp_path, base_config)
    out = tmp_path / "out"
    assert main(["run", str(cfg), "--out", str(out), "--quiet"]) == 0
    assert json.loads((out / "frozen.json").read_text())["teacher"]["sha256"]
    (out / "summary.json").unlink()
    torch.nn.init.zeros_(teacher.net[0].weight) if hasattr(teacher, "net") else [p.data.zero_() for p in teacher.parameters()]
    save_weights(tmp_path / "teacher.safetensors", teacher.state_dict())
    assert main(["run", str(cfg), "--out", str(out), "--quiet", "--resume"]) == 2
    assert "changed since this run started" in capsys.readouterr().err


def test_a_full_disk_is_a_clear_error_that_can_be_resumed(base_config, tmp_path, capsys, monkeypatch):
    import errno

    import transfuse.engine as engine

    cfg = _config(tmp_path, base_config)
    out = tmp_path / "out"
    real = engine.save_checkpoint

    def full(directory, step, *args, **kwargs):
        if step > 20:
            raise OSError(errno.ENOSPC, "No space left on device", str(Path(directory) / f"step-{step:08d}"))
        return real(directory, step, *args, **kwargs)

    monkeypatch.setattr(engine, "save_checkpoint", full)
    assert main(["run", str(cfg), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "the disk is full" in err and "--resume" in err and "Traceback" not in err
    monkeypatch.undo()
    assert main(["run", str(cfg), "--out", str(out), "--quiet", "--resume"]) == 0
    assert json.loads((out / "summary.json").read_text())["resumed_from"] == 20


def test_debug_after_the_subcommand_shows_the_traceback(base_config, tmp_path):
    cfg = _config(tmp_path, base_config)
    from transfuse.config import ConfigError

    with pytest.raises(ConfigError):
        main(["run", str(cfg), "--set", "train.steps=0", "--debug"])
    with pytest.raises(ConfigError):
        main(["--debug", "run", str(cfg), "--set", "train.steps=0"])


def test_threads_are_chosen_and_recorded(base_config, tmp_path):
    cfg = _config(tmp_path, base_config)
    before = torch.get_num_threads()
    try:
        assert main(["run", str(cfg), "--out", str(tmp_path / "out"), "--quiet", "--threads", "1"]) == 0
        summary = json.loads((tmp_path / "out" / "summary.json").read_text())
        assert summary["threads"] == 1
        assert yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())["fabric"]["threads"] == 1
    finally:
        torch.set_num_threads(before)


def test_summary_is_strict_json_when_a_metric_has_no_value():
    from transfuse.run import finite_or_none

    assert finite_or_none({"a": float("nan"), "b": [1.0, float("inf")], "c": {"d": 2}}) == {"a": None, "b": [1.0, None], "c": {"d": 2}}


def test_the_default_teacher_cache_is_per_user_not_per_directory(base_config, tmp_path, monkeypatch):
    from transfuse.build import teacher_weights_path
    from transfuse.config import config_from_dict
    from transfuse.paths import CACHE_ENV

    del base_config["teacher"]["cache_dir"]
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "user-cache"))
    monkeypatch.chdir(tmp_path)
    path = teacher_weights_path(config_from_dict(base_config), "teacher")
    assert path.parent == tmp_path / "user-cache" / "teachers"
    monkeypatch.delenv(CACHE_ENV)
    assert ".cache" in str(teacher_weights_path(config_from_dict(base_config), "teacher")) or os.name != "posix"
    shutil.rmtree(tmp_path / "user-cache", ignore_errors=True)
