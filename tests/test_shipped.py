"""What we ship works: every YAML config validates, the demo runs, the example runs."""

import runpy
import sys
from pathlib import Path

import pytest

from transfuse.config import config_from_dict, load_config
from transfuse.demo import MARKER, demo_config_dict, format_table, run_demo

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))


def test_configs_exist():
    assert len(CONFIGS) >= 5


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_shipped_config_validates(path):
    cfg = load_config(path)
    assert cfg.name and cfg.resolved_terms()


def test_embedded_demo_config_validates():
    assert config_from_dict(demo_config_dict()).data.name == "digits"


def test_demo_runs_and_reruns(tmp_path, teacher_cache, capsys):
    out = tmp_path / "demo"
    fast = ["train.steps=20", "teacher.train.steps=40", "train.progress=false"]
    summaries = run_demo(out_dir=out, cache_dir=str(teacher_cache), overrides=fast, quiet=True)
    assert [s["method"] for s in summaries] == ["none", "kd", "dkd"]
    assert summaries[0]["teacher"] is None and summaries[1]["agreement"] is not None
    table = (out / "results.md").read_text()
    assert table.startswith("| method |") and "| kd |" in table and "teacher (mlp" in table
    assert format_table(summaries) in table
    # A rerun replaces the demo folder; a folder that is not a demo's is refused.
    run_demo(out_dir=out, cache_dir=str(teacher_cache), overrides=fast, quiet=True)
    assert (out / MARKER).is_file()
    other = tmp_path / "mine"
    other.mkdir()
    with pytest.raises(FileExistsError, match="not a demo folder"):
        run_demo(out_dir=other, overrides=fast)


def test_plain_pytorch_example_runs(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["minimal_kd.py"])
    runpy.run_path(str(ROOT / "examples" / "minimal_kd.py"), run_name="__main__")
    out = capsys.readouterr().out
    teacher = float(out.split("teacher: ")[1].split(" %")[0])
    student = float(out.split("student: ")[1].split(" %")[0])
    assert teacher > 90 and student > 85, out


def test_benchmark_table_states_each_claim_and_whether_this_run_confirms_it():
    bench = runpy.run_path(str(ROOT / "benchmarks" / "fashion_mnist.py"), run_name="not_main")

    def cell(method, seed, acc):
        summary = {"student": {"accuracy": acc, "ece": 0.1}, "teacher": {"accuracy": 0.9}, "agreement": 0.8,
                   "train_wall_time_s": 1.0}
        return {"setting": "lowlabel", "method": method, "seed": seed, "summary": summary}

    results = [cell("none", s, 0.80) for s in (0, 1)] + [cell("kd", s, 0.82) for s in (0, 1)]
    results += [cell("dkd", 0, 0.84), cell("dkd", 1, 0.85)]       # +2.0, +3.0 over KD: confirmed
    results += [cell("dist", 0, 0.821), cell("dist", 1, 0.818)]   # +0.1, -0.2: within noise
    results += [cell("crd", 0, 0.79), cell("crd", 1, 0.791)]      # about -3: worse
    rows = {line.split(" | ")[0].strip("| "): line for line in bench["table"](results, [0, 1]).splitlines() if line.startswith("| ")}
    assert rows["dkd"].endswith("| yes |") and "2.50 ± 0.71" in rows["dkd"]
    assert rows["dist"].endswith("| no (within noise) |")
    assert rows["crd"].endswith("| no (worse than KD) |")
    assert rows["kd"].endswith("| - | - |") and bench["CLAIMS"]["dkd"] in rows["dkd"]
    # a claim against training without a teacher is judged against `none`, not KD
    results += [cell("sp", 0, 0.815), cell("sp", 1, 0.816)]       # below KD, +1.5 over none
    rows = {line.split(" | ")[0].strip("| "): line for line in bench["table"](results, [0, 1]).splitlines() if line.startswith("| ")}
    assert rows["sp"].endswith("| yes |")
