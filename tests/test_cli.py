"""End to end through the command line: run dirs, errors, SIGKILL + resume, DDP."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml
from safetensors.torch import load_file

from transfuse.cli import main

EXPECTED_METHODS = {"kd", "dkd", "dist", "fitnet", "at", "sp", "rkd", "pkt", "crd"}


def _cli(*args, cwd=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "transfuse", *args], capture_output=True, text=True, cwd=cwd, timeout=timeout)


def _config(tmp_path, data, name="c.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data))
    return p


def test_methods_json_lists_the_classic_methods(capsys):
    assert main(["methods", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert EXPECTED_METHODS <= {r["name"] for r in rows}
    for r in rows:
        assert r["paper"] and r["description"] and r["kind"]


def test_help_has_examples(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "transfuse run configs/" in capsys.readouterr().out


def test_run_writes_the_run_directory(base_config, tmp_path, capsys):
    cfg = _config(tmp_path, base_config)
    out = tmp_path / "run"
    assert main(["run", str(cfg), "--out", str(out), "--set", "train.steps=30", "--quiet"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    for key in ("steps", "wall_time_s", "seed", "transfuse_version", "agreement"):
        assert key in summary
    assert summary["steps"] == 30
    assert 0.0 <= summary["student"]["accuracy"] <= 1.0 and 0.0 <= summary["student"]["ece"] <= 1.0
    assert summary["teacher"]["accuracy"] > 0.8, "the 150-step teacher learns digits"
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["train"]["steps"] == 30 and saved["distill"]["method"] == "kd"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [10, 20, 30] and {"loss", "loss/kd", "loss/ce", "lr"} <= set(rows[0])
    assert (out / "checkpoints" / "latest").is_file() and (out / "student.safetensors").is_file()
    # A second run into the same folder is refused rather than overwriting it.
    assert main(["run", str(cfg), "--out", str(out), "--quiet"]) == 2
    assert "already holds a run" in capsys.readouterr().err


@pytest.mark.parametrize(
    "override, message",
    [
        ("distill.method=kdd", "unknown method 'kdd'"),
        ("train.stpes=3", "train.stpes: unknown field"),
        ("teacher.weights=/nonexistent/t.safetensors", "teacher.weights file '/nonexistent/t.safetensors' does not exist"),
    ],
)
def test_user_errors_are_one_paragraph(base_config, tmp_path, capsys, override, message):
    cfg = _config(tmp_path, base_config)
    assert main(["run", str(cfg), "--out", str(tmp_path / "r"), "--set", override, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_resume_missing_checkpoint(base_config, tmp_path, capsys):
    cfg = _config(tmp_path, base_config)
    assert main(["run", str(cfg), "--out", str(tmp_path / "none"), "--resume"]) == 2
    assert "holds no run" in capsys.readouterr().err


@pytest.mark.slow
def test_sigkill_then_resume_equals_uninterrupted_run(base_config, tmp_path):
    base_config["student"]["options"] = {"hidden": [16], "dropout": 0.1}  # dropout: the RNG state matters
    base_config["train"].update(steps=1500, checkpoint_every=25)
    cfg = _config(tmp_path, base_config)
    # Warm the teacher cache so both runs start training at once.
    assert _cli("run", str(cfg), "--out", str(tmp_path / "warm"), "--set", "train.steps=1", "--quiet").returncode == 0

    ref = _cli("run", str(cfg), "--out", str(tmp_path / "ref"), "--quiet")
    assert ref.returncode == 0, ref.stderr

    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "transfuse", "run", str(cfg), "--out", str(out), "--quiet"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = out / "checkpoints" / "latest"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if latest.is_file() and latest.read_text().strip() >= "step-00000100":
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.005)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run must be killed mid-training for this test to mean anything"
    assert not (out / "summary.json").exists()

    resumed = _cli("run", str(cfg), "--out", str(out), "--resume", "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert 100 <= summary["resumed_from"] < 1500
    a, b = load_file(tmp_path / "ref" / "student.safetensors"), load_file(out / "student.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] == b[k]).all(), f"{k} differs after resume"


@pytest.mark.slow
def test_ddp_two_cpu_processes_match_single_process(base_config, tmp_path):
    # No batch norm, no dropout: the only difference DDP may make is the float order of the
    # gradient all-reduce.
    base_config["train"].update(steps=20, batch_size=32, checkpoint_every=20)
    base_config["optim"] = {"name": "sgd", "lr": 0.1, "momentum": 0.0}
    cfg = _config(tmp_path, base_config)
    single = _cli("run", str(cfg), "--out", str(tmp_path / "single"), "--quiet")
    assert single.returncode == 0, single.stderr
    ddp = _cli("run", str(cfg), "--out", str(tmp_path / "ddp"), "--quiet",
               "--set", "fabric.strategy=ddp", "--set", "fabric.devices=2", "--set", "fabric.accelerator=cpu")
    assert ddp.returncode == 0, ddp.stderr
    a, b = load_file(tmp_path / "single" / "student.safetensors"), load_file(tmp_path / "ddp" / "student.safetensors")
    for k in a:
        assert (a[k] - b[k]).abs().max() < 1e-5, k
    assert json.loads((tmp_path / "ddp" / "summary.json").read_text())["steps"] == 20


def test_teacher_is_trained_once_and_reused(base_config, tmp_path):
    base_config["teacher"]["cache_dir"] = str(tmp_path / "cache")
    cfg = _config(tmp_path, base_config)
    assert main(["run", str(cfg), "--out", str(tmp_path / "a"), "--set", "train.steps=5", "--quiet"]) == 0
    cached = list((tmp_path / "cache").glob("*.safetensors"))
    assert len(cached) == 1 and not list((tmp_path / "cache").glob(".work-*"))
    stamp = cached[0].stat().st_mtime_ns
    # Another student seed reuses it; another teacher recipe gets its own entry.
    assert main(["run", str(cfg), "--out", str(tmp_path / "b"), "--set", "seed=1", "--set", "train.steps=5", "--quiet"]) == 0
    assert cached[0].stat().st_mtime_ns == stamp and len(list((tmp_path / "cache").glob("*.safetensors"))) == 1
    assert main(["run", str(cfg), "--out", str(tmp_path / "c"), "--set", "teacher.train.steps=20", "--set", "train.steps=5", "--quiet"]) == 0
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 2
