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

EXPECTED_METHODS = {"kd", "dkd", "dist", "fitnet", "at", "sp", "rkd", "pkt", "crd", "dml", "multi_teacher", "bdkd", "kl_dp",
                    "dist_t4", "selective_kd", "balanced_kl"}


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
    assert "holds a finished run" in capsys.readouterr().err


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


def test_resume_without_a_run_starts_from_step_0(base_config, tmp_path, capsys):
    """--resume is always safe to pass: where nothing was checkpointed yet it starts the run."""
    cfg = _config(tmp_path, base_config)
    assert main(["run", str(cfg), "--out", str(tmp_path / "none"), "--resume"]) == 0
    assert "holds no run yet; starting from step 0" in capsys.readouterr().err
    assert json.loads((tmp_path / "none" / "summary.json").read_text())["resumed_from"] == 0


def _variant(base_config, tmp_path, variant):
    """A config for a resume test: KD, deep mutual learning (two trainable), or KD from the teacher cache."""
    base_config["student"]["options"] = {"hidden": [16], "dropout": 0.1}  # dropout: the RNG state matters
    base_config["train"].update(steps=1500, checkpoint_every=25)
    extra: list[str] = []
    if variant == "dml":
        del base_config["teacher"]
        base_config["participants"] = {"peer": {"name": "mlp", "options": {"hidden": [12], "dropout": 0.1}, "trainable": True}}
        base_config["distill"] = {"method": "dml"}
    cfg = _config(tmp_path, base_config)
    if variant == "kd_cache":
        # Warm the teacher, then cache its outputs: the run never loads or runs it.
        assert _cli("run", str(cfg), "--out", str(tmp_path / "warm"), "--set", "train.steps=1", "--quiet").returncode == 0
        made = _cli("cache-teacher", str(cfg), "--out", str(tmp_path / "tcache"), "--quiet")
        assert made.returncode == 0, made.stderr
        extra = ["--set", f"teacher.cache={tmp_path / 'tcache'}"]
    return cfg, extra


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["kd", "dml", "kd_cache"])
def test_sigkill_then_resume_equals_uninterrupted_run(base_config, tmp_path, variant):
    cfg, extra = _variant(base_config, tmp_path, variant)
    # Warm the teacher cache so both runs start training at once.
    assert _cli("run", str(cfg), "--out", str(tmp_path / "warm2"), "--set", "train.steps=1", "--quiet", *extra).returncode == 0

    ref = _cli("run", str(cfg), "--out", str(tmp_path / "ref"), "--quiet", *extra)
    assert ref.returncode == 0, ref.stderr

    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "transfuse", "run", str(cfg), "--out", str(out), "--quiet", *extra],
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

    resumed = _cli("run", str(cfg), "--out", str(out), "--resume", "--quiet", *extra)
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert 100 <= summary["resumed_from"] < 1500
    trained = sorted(p.name for p in (tmp_path / "ref").glob("*.safetensors"))
    assert trained == (["peer.safetensors", "student.safetensors"] if variant == "dml" else ["student.safetensors"])
    for name in trained:
        a, b = load_file(tmp_path / "ref" / name), load_file(out / name)
        assert a.keys() == b.keys()
        for k in a:
            assert (a[k] == b[k]).all(), f"{name}: {k} differs after resume"


@pytest.mark.slow
@pytest.mark.parametrize("method", ["kd", "dml"])
def test_ddp_two_cpu_processes_match_single_process(base_config, tmp_path, method):
    # No batch norm, no dropout: the only difference DDP may make is the float order of the
    # gradient all-reduce. With dml, two trainable participants share the DDP-wrapped Distiller.
    base_config["train"].update(steps=20, batch_size=32, checkpoint_every=20)
    base_config["optim"] = {"name": "sgd", "lr": 0.1, "momentum": 0.0}
    if method == "dml":
        del base_config["teacher"]
        base_config["participants"] = {"peer": {"name": "mlp", "options": {"hidden": [12]}, "trainable": True}}
        base_config["distill"] = {"method": "dml"}
    cfg = _config(tmp_path, base_config)
    single = _cli("run", str(cfg), "--out", str(tmp_path / "single"), "--quiet")
    assert single.returncode == 0, single.stderr
    ddp = _cli("run", str(cfg), "--out", str(tmp_path / "ddp"), "--quiet",
               "--set", "fabric.strategy=ddp", "--set", "fabric.devices=2", "--set", "fabric.accelerator=cpu")
    assert ddp.returncode == 0, ddp.stderr
    for name in ["student", "peer"] if method == "dml" else ["student"]:
        a, b = load_file(tmp_path / "single" / f"{name}.safetensors"), load_file(tmp_path / "ddp" / f"{name}.safetensors")
        for k in a:
            assert (a[k] - b[k]).abs().max() < 1e-5, (name, k)
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


def test_checks_fail_before_anything_is_written(base_config, tmp_path, capsys):
    cache = tmp_path / "teachers"
    base_config["teacher"]["cache_dir"] = str(cache)
    cfg = _config(tmp_path, base_config)
    out = tmp_path / "r"
    # An option value: refused at load, naming the field.
    assert main(["run", str(cfg), "--out", str(out), "--set", "distill.options.temperature=0", "--quiet"]) == 2
    assert "temperature" in capsys.readouterr().err
    # Shapes no loss can compare (FitNets from a CNN's map to an MLP's hint): refused before the teacher trains.
    bad = ["--set", "teacher.name=cnn", "--set", "teacher.options={channels: [4, 8]}", "--set", "distill.method=at"]
    assert main(["run", str(cfg), "--out", str(out), *bad, "--quiet"]) == 2
    assert "attention" in capsys.readouterr().err.lower()
    assert not out.exists() and not cache.exists(), "nothing may be written before the checks pass"


def test_a_run_that_never_checkpointed_can_be_rerun_into_its_folder(base_config, tmp_path):
    cfg = _config(tmp_path, base_config)
    out = tmp_path / "r"
    out.mkdir()
    # What a run killed before its first checkpoint leaves: its config and a partial log.
    (out / "config.yaml").write_text("name: other\n")
    (out / "metrics.jsonl").write_text('{"step": 10, "loss": 1.0}\n')
    assert main(["run", str(cfg), "--out", str(out), "--set", "train.steps=20", "--quiet"]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [10, 20] and rows[0]["loss"] != 1.0


def test_cache_teacher_refuses_a_cache_of_another_teacher(base_config, tmp_path, capsys):
    cfg = _config(tmp_path, base_config)
    assert main(["cache-teacher", str(cfg), "--out", str(tmp_path / "c"), "--quiet"]) == 0
    capsys.readouterr()
    # Another teacher recipe means other weights: the manifest's hash no longer matches.
    other = ["--set", "teacher.train.steps=20", "--set", "train.steps=5", "--quiet"]
    assert main(["run", str(cfg), "--out", str(tmp_path / "other"), *other]) == 0  # trains that teacher
    capsys.readouterr()
    code = main(["run", str(cfg), "--out", str(tmp_path / "r"), "--set", f"teacher.cache={tmp_path / 'c'}", *other])
    assert code == 2
    err = capsys.readouterr().err
    assert "teacher_weights_sha256" in err and "Traceback" not in err


def test_internal_errors_keep_their_traceback(monkeypatch, base_config, tmp_path):
    run_module = sys.modules["transfuse.run"]  # the package's `run` attribute is the function

    def broken(*args, **kwargs):
        raise ValueError("an internal bug")

    monkeypatch.setattr(run_module, "make_distiller", broken)
    cfg = _config(tmp_path, base_config)
    with pytest.raises(ValueError, match="an internal bug"):
        main(["run", str(cfg), "--out", str(tmp_path / "r"), "--quiet"])


def test_resume_may_lower_the_learning_rate_or_clip_gradients(base_config, tmp_path, capsys):
    # What the non-finite-loss error advises: lower optim.lr or set train.grad_clip, then --resume.
    base_config["train"].update(steps=20, checkpoint_every=10)
    cfg = _config(tmp_path, base_config)
    out = tmp_path / "r"
    assert main(["run", str(cfg), "--out", str(out), "--quiet"]) == 0
    assert main(["run", str(cfg), "--out", str(out), "--resume", "--set", "train.steps=31", "--quiet"]) == 2
    assert "train.steps" in capsys.readouterr().err
    assert main(["run", str(cfg), "--out", str(out), "--resume", "--set", "optim.lr=0.001", "--set", "train.grad_clip=1.0",
                 "--quiet"]) == 0
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["optim"]["lr"] == 0.001 and saved["train"]["grad_clip"] == 1.0


def _same_weights(a, b) -> bool:
    x, y = load_file(a), load_file(b)
    return x.keys() == y.keys() and all((x[k] == y[k]).all() for k in x)


@pytest.mark.slow
def test_kill_loop_then_resume_is_bit_identical_and_leaves_nothing_behind(base_config, tmp_path):
    """SIGKILL while the teacher trains, then at random moments of the student's training
    (checkpoints are written every few steps, so some kills land inside a write), each
    time restarting with --resume: the teacher and the student end bit-identical to an
    uninterrupted run's, and no temporary folder or surplus checkpoint is left."""
    import random

    base_config["student"]["options"] = {"hidden": [16], "dropout": 0.1}
    base_config["teacher"]["train"]["steps"] = 1500
    base_config["train"].update(steps=1500, checkpoint_every=3, keep_checkpoints=2)
    cfg = _config(tmp_path, base_config)
    ref_cache, cache = tmp_path / "ref-cache", tmp_path / "cache"
    ref = _cli("run", str(cfg), "--out", str(tmp_path / "ref"), "--quiet", "--set", f"teacher.cache_dir={ref_cache}")
    assert ref.returncode == 0, ref.stderr

    out = tmp_path / "killed"
    command = [sys.executable, "-m", "transfuse", "run", str(cfg), "--out", str(out), "--resume",
               "--set", f"teacher.cache_dir={cache}"]
    logs: list[str] = []
    rng = random.Random(0)
    kills = 0

    def start_and_kill(ready) -> bool:
        log = tmp_path / f"attempt-{len(logs)}.log"
        logs.append(str(log))
        with open(log, "w") as stream:
            proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stream)
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None and not ready():
            time.sleep(0.002)
        if proc.poll() is None:
            time.sleep(rng.uniform(0.0, 0.3))
            proc.send_signal(signal.SIGKILL)
        proc.wait()
        return proc.returncode == -signal.SIGKILL

    # 1: killed while the teacher trains (after its first checkpoint).
    kills += start_and_kill(lambda: any(cache.glob(".work-*/checkpoints/latest")))
    assert kills == 1 and not list(cache.glob("*.safetensors")), "the teacher must be killed mid-training"
    # 2-4: killed at random moments of the student's training.
    for _ in range(3):
        kills += start_and_kill(lambda: (out / "checkpoints" / "latest").is_file())
    assert kills >= 3
    final = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert final.returncode == 0, final.stderr
    said = final.stderr + "".join(open(log).read() for log in logs)
    assert "from labels for 1500 steps, resuming from step-" in said, "the teacher's training was not resumed"

    [ref_teacher], [teacher] = list(ref_cache.glob("*.safetensors")), list(cache.glob("*.safetensors"))
    assert _same_weights(ref_teacher, teacher), "the resumed teacher differs from the uninterrupted one"
    assert _same_weights(tmp_path / "ref" / "student.safetensors", out / "student.safetensors")
    assert json.loads((out / "summary.json").read_text())["resumed_from"] > 0
    leftovers = sorted(p.name for p in (out / "checkpoints").iterdir() if p.name != "latest")
    assert len(leftovers) <= 2 and all(p.startswith("step-") for p in leftovers), leftovers
    assert not list(cache.glob(".work-*")) and not [p for p in out.rglob("*") if ".tmp" in p.name]
    rows = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows == sorted(set(rows)), "metrics rows repeated after a resume"
