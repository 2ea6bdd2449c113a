"""``transfuse demo``: the embedded example, a teacher distilled three ways on digits.

It trains (or reuses from the cache) a teacher MLP on sklearn's digits, then trains the
same small student three times -- from labels only, with KD, with DKD -- and prints
accuracy, teacher agreement, ECE and time for each. Seeded: the table is reproducible.
"""

from __future__ import annotations

import json
import shutil
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from .atomic import write_atomic
from .config import apply_overrides, config_from_dict
from .run import run
from .rundir import RunDirError

DEMO_METHODS = ("none", "kd", "dkd")
MARKER = "demo.json"


def demo_config_dict() -> dict[str, Any]:
    """The embedded demo config as a plain dict."""
    text = resources.files("transfuse").joinpath("configs/demo.yaml").read_text()
    return yaml.safe_load(text)


def run_demo(*, out_dir: str | Path = "runs/demo", cache_dir: str | None = None, overrides: list[str] | None = None,
             quiet: bool = False) -> list[dict[str, Any]]:
    """Run the demo; returns one summary per method and writes ``out_dir/results.md``."""
    out = Path(out_dir)
    if out.exists():
        if not (out / MARKER).is_file():
            raise RunDirError(f"{str(out)!r} exists and is not a demo folder (no {MARKER}); choose another --out")
        shutil.rmtree(out)  # the demo owns its folder: a rerun replaces it
    out.mkdir(parents=True)
    write_atomic(out / MARKER, json.dumps({"methods": list(DEMO_METHODS)}) + "\n")
    summaries = []
    for method in DEMO_METHODS:
        data = apply_overrides(demo_config_dict(), list(overrides or []))
        data["name"] = f"demo-{method}"
        data.setdefault("distill", {})["method"] = method
        if method == "dkd":
            # DKD's loss is warmed up (the paper: 20 of 240 epochs); here over the first tenth of training.
            data["distill"]["warmup_steps"] = max(1, data.get("train", {}).get("steps", 600) // 10)
        if cache_dir is not None:
            data["teacher"]["cache_dir"] = cache_dir
        cfg = config_from_dict(data, source=f"demo ({method})")
        summaries.append(run(cfg, out_dir=out / method, quiet=quiet))
    table = format_table(summaries)
    write_atomic(out / "results.md", table + "\n")
    return summaries


def format_table(summaries: list[dict[str, Any]]) -> str:
    """A markdown table: method, student accuracy, agreement with the teacher, ECE, seconds."""
    teacher = next((s["teacher"] for s in summaries if s.get("teacher")), None)
    lines = [
        "| method | student acc % | agreement % | ECE | train s |",
        "|---|---:|---:|---:|---:|",
    ]
    for s in summaries:
        agree = "-" if s.get("agreement") is None else f"{100 * s['agreement']:.1f}"
        lines.append(
            f"| {s['method']} | {100 * s['student']['accuracy']:.1f} | {agree} | {s['student']['ece']:.3f} | {s['train_wall_time_s']:.1f} |"
        )
    if teacher:
        lines.append(f"\nteacher ({teacher['model']}, {teacher['params']:,} params): {100 * teacher['accuracy']:.1f} % accuracy, "
                     f"ECE {teacher['ece']:.3f}; student {summaries[0]['student']['params']:,} params, "
                     f"{summaries[0]['student_train_samples']} labelled training images, seed {summaries[0]['seed']}.")
    return "\n".join(lines)
