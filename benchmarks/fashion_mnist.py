"""Classic distillation methods on Fashion-MNIST, three settings, several seeds.

    python benchmarks/fashion_mnist.py                       # all settings, seeds 0 1 2
    python benchmarks/fashion_mnist.py --settings lowlabel --seeds 0 --jobs 2

One CNN teacher is trained on all 60k labelled images once and cached (every run of
every setting reuses it). Then, per setting and seed, the same student is trained from
labels only ("none", the baseline measured in the same command) and with each method at
its paper's default weights; the hyper-parameters are the same for every seed. Results
go to ``<out>/results.json`` and a markdown table ``<out>/results.md`` with
mean ± std over seeds. Interrupted? Run the same command again: finished runs are kept.

Needs the Debian package ``dataset-fashion-mnist`` (or ``--root`` pointing at the four
IDX files).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Iterator

TEACHER = {
    "name": "cnn",
    "options": {"channels": [16, 32], "hidden": 64, "global_pool": False},
    "train": {"steps": 5000, "batch_size": 128, "seed": 0, "optim": {"name": "adam", "lr": 0.002}},
}

# name -> (student model, label_subset, methods). AT needs a spatial map on both sides, so
# it runs only where the student is a CNN.
SETTINGS = {
    "full": ({"name": "mlp", "options": {"hidden": [128]}}, None),
    "lowlabel": ({"name": "mlp", "options": {"hidden": [128]}}, 2000),
    "cnn": ({"name": "cnn", "options": {"channels": [8, 16], "global_pool": False}}, 5000),
}
METHODS = ["none", "kd", "dkd", "dist", "dist_t4", "fitnet", "at", "sp", "rkd", "pkt", "crd", "taid", "ctkd", "mixkd",
           "tgeo", "trg", "scalekd", "kd_cached", "kd_transfer"]
#: What each method's paper claims over classic KD (the comparison this benchmark can make),
#: and the column that says whether this run confirms it at this scale.
CLAIMS = {
    "dkd": "beats KD (CIFAR-100, ImageNet)",
    "dist": "beats KD, more so with stronger teachers",
    "dist_t4": "beats KD (CIFAR-100 setting)",
    "fitnet": "hints help a thinner student (with KD)",
    "at": "beats KD-free training; adds to KD",
    "sp": "beats KD-free training; complements KD",
    "rkd": "beats KD-free training; complements KD",
    "pkt": "beats KD-free training",
    "crd": "beats KD and every feature method (CIFAR-100)",
    "taid": "beats KD (LLM instruction tuning)",
    "ctkd": "improves KD by learning the temperature",
    "mixkd": "std-temperature + partial mixup beats KD",
    "tgeo": "a learned per-sample KD/CE fusion beats KD",
    "trg": "token-graph relations beat KD (CIFAR-100, ImageNet)",
    "scalekd": "cross-attention projector + dual-view mimicking beat the student alone",
}
#: The claims above that are made against training without a teacher, not against KD.
CLAIMS_VS_NONE = {"at", "sp", "rkd", "pkt", "scalekd"}
SPATIAL_ONLY = {"at", "trg", "scalekd"}
# Variants of KD that only make sense where labels are scarce, or that need the teacher-output cache:
# `kd_cached` is KD with the teacher answered from disk (the same numbers as `kd`, at the cost of the
# student alone); `kd_transfer` adds the other 58,000 training images without labels (Hinton's transfer set).
LOWLABEL_ONLY = {"kd_cached", "kd_transfer"}


def run_config(setting: str, method: str, seed: int, *, steps: int, root: str | None, cache: str,
               teacher_steps: int = TEACHER["train"]["steps"], outputs: str | None = None) -> dict:
    """The run config of one (setting, method, seed) cell."""
    student, label_subset = SETTINGS[setting]
    teacher = {**TEACHER, "train": {**TEACHER["train"], "steps": teacher_steps}, "cache_dir": cache}
    cfg = {
        "name": f"{setting}-{method}-s{seed}",
        "seed": seed,
        "data": {"name": "fashion_mnist", "options": {"root": root} if root else {}, "label_subset": label_subset,
                 "subset_seed": seed},
        "student": student,
        "teacher": teacher,
        "distill": {"method": "kd" if method in LOWLABEL_ONLY else method},
        "optim": {"name": "adam", "lr": 0.001},
        "train": {"steps": steps, "batch_size": 128, "log_every": 100, "checkpoint_every": steps, "progress": False,
                  "eval_batch_size": 2000},
    }
    if method == "kd_transfer":
        cfg["data"]["transfer"] = "rest"
    if method == "kd_cached":
        cfg["teacher"]["cache"] = outputs
    if method == "mixkd":  # MIX-KD is its loss plus partial mixup of the batch (the teacher sees the mixed inputs)
        cfg["transforms"] = [{"name": "partial_mixup", "options": {}}]
    if method == "tgeo":  # TGeo-KD learns its fusion ratio bilevel on 20% of the labelled images, held out from training
        cfg["recipe"] = {"name": "tgeo_bilevel"}
        cfg["data"]["holdout_fraction"] = 0.2
    if method == "trg":  # TRG's total loss is L_logit (CE + KD at KD's default weights) + its relation terms
        cfg["distill"] = {"terms": [{"loss": "ce", "weight": 0.1}, {"loss": "kd", "weight": 0.9},
                                    {"loss": "trg", "input": "student.map", "target": "teacher.map"}]}
    if method == "fitnet" and student["name"] == "mlp":
        # An MLP has no (C, H, W) map to regress onto the CNN teacher's hint map: its first
        # hidden layer regresses onto the teacher's penultimate embedding instead.
        cfg["distill"]["teacher_layer"] = "feature"
    return cfg


def _one(args: tuple) -> dict:
    cfg_dict, out_dir = args
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    from transfuse.config import config_from_dict
    from transfuse.run import run

    summary_path = Path(out_dir) / "summary.json"
    if summary_path.is_file():
        return json.loads(summary_path.read_text())
    if Path(out_dir).exists():  # an interrupted cell: start it again from scratch
        import shutil

        shutil.rmtree(out_dir)
    return run(config_from_dict(cfg_dict, source=cfg_dict["name"]), out_dir=out_dir, quiet=True)


def run_cells(cells: list[tuple], *, jobs: int, label) -> Iterator[tuple]:
    """Run ``(key, (config, out_dir))`` cells in ``jobs`` processes (one thread each), yielding
    ``(key, summary)`` as they finish and printing a progress line ``label(key)``."""
    t0 = time.perf_counter()
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        futures = {pool.submit(_one, job): key for key, job in cells}
        for i, fut in enumerate(as_completed(futures), 1):
            key, summary = futures[fut], fut.result()
            print(f"[{i}/{len(cells)}] {label(key)}: {100 * summary['student']['accuracy']:.2f} % "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
            yield key, summary


def mean_std(values: list[float]) -> str:
    """``mean ± std`` (sample std; ± 0 for one value)."""
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def verdict(method: str, vs_kd: list[float], vs_none: list[float] | None = None) -> str:
    """Whether this run supports the method's claim: the paired mean gain over the claim's
    baseline (KD, or training without a teacher for the claims in CLAIMS_VS_NONE) must
    exceed its standard deviation over seeds (with one seed: be positive)."""
    gains = vs_none if method in CLAIMS_VS_NONE else vs_kd
    if method not in CLAIMS or not gains:
        return "-"
    gain = statistics.mean(gains)
    spread = statistics.stdev(gains) if len(gains) > 1 else 0.0
    baseline = "no teacher" if method in CLAIMS_VS_NONE else "KD"
    if gain > spread:
        return "yes"
    return "no (within noise)" if gain > -spread else f"no (worse than {baseline})"


def table(results: list[dict], seeds: list[int]) -> str:
    """Markdown: one block per setting, one row per method, mean ± std over seeds."""
    lines = []
    for setting in SETTINGS:
        rows = [r for r in results if r["setting"] == setting]
        if not rows:
            continue
        student, subset = SETTINGS[setting]
        teacher = rows[0]["summary"].get("teacher") or next((r["summary"]["teacher"] for r in rows if r["summary"]["teacher"]), None)
        lines += [
            f"### {setting}: student {student['name']} {student['options']}, "
            f"{'all 60,000' if subset is None else f'{subset:,}'} labelled training images",
            "",
            f"Teacher: {TEACHER['name']} {TEACHER['options']}, {100 * teacher['accuracy']:.2f} % test accuracy." if teacher else "",
            "",
            "| method | accuracy % | Δ vs none | Δ vs kd | agreement % | ECE | train s | paper's claim | here |",
            "|---|---:|---:|---:|---:|---:|---:|---|---|",
        ]
        base = [r["summary"]["student"]["accuracy"] * 100 for r in rows if r["method"] == "none"]
        kd = [r["summary"]["student"]["accuracy"] * 100 for r in rows if r["method"] == "kd"]
        for method in METHODS:
            cell = [r for r in rows if r["method"] == method]
            if not cell:
                continue
            acc = [r["summary"]["student"]["accuracy"] * 100 for r in cell]
            delta = [a - b for a, b in zip(acc, base)] if len(base) == len(acc) else []
            vs_kd = [a - b for a, b in zip(acc, kd)] if len(kd) == len(acc) and method not in ("none", "kd") else []
            agree = [r["summary"]["agreement"] * 100 for r in cell if r["summary"]["agreement"] is not None]
            ece = [r["summary"]["student"]["ece"] for r in cell]
            secs = [r["summary"]["train_wall_time_s"] for r in cell]
            lines.append(
                f"| {method} | {mean_std(acc)} | {mean_std(delta) if delta and method != 'none' else '-'} | "
                f"{mean_std(vs_kd) if vs_kd else '-'} | "
                f"{mean_std(agree) if agree else '-'} | {statistics.mean(ece):.3f} | {statistics.mean(secs):.1f} | "
                f"{CLAIMS.get(method, '-')} | {verdict(method, vs_kd, delta)} |"
            )
        lines.append("")
    lines.append(f"Seeds: {', '.join(map(str, seeds))}. Δ is paired by seed (same data subset and initialisation).")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated: " + ", ".join(SETTINGS))
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated: " + ", ".join(METHODS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=1500, help="student optimizer steps (batch 128)")
    p.add_argument("--teacher-steps", type=int, default=TEACHER["train"]["steps"], help="teacher optimizer steps (batch 128)")
    p.add_argument("--jobs", type=int, default=2, help="runs in parallel (one thread each)")
    p.add_argument("--out", default="runs/bench-fashion-mnist")
    p.add_argument("--root", default=None, help="folder with the Fashion-MNIST IDX files")
    p.add_argument("--cache", default=None, help="trained-teacher cache folder (default: the per-user cache)")
    args = p.parse_args(argv)

    settings = args.settings.split(",")
    methods = args.methods.split(",")
    for s in settings:
        if s not in SETTINGS:
            p.error(f"unknown setting {s!r}; valid: {', '.join(SETTINGS)}")
    out = Path(args.out)
    cells = []
    for setting in settings:
        spatial = SETTINGS[setting][0]["name"] != "mlp"
        for seed in args.seeds:
            for method in methods:
                if (method in SPATIAL_ONLY and not spatial) or (method in LOWLABEL_ONLY and setting != "lowlabel"):
                    continue
                cfg = run_config(setting, method, seed, steps=args.steps, root=args.root, cache=args.cache,
                                 teacher_steps=args.teacher_steps, outputs=str(out / "_teacher-outputs"))
                cells.append(((setting, method, seed), (cfg, str(out / setting / f"{method}-s{seed}"))))

    # The teacher is trained once, in this process, before the pool starts.
    warm = run_config(settings[0], "kd", args.seeds[0], steps=1, root=args.root, cache=args.cache, teacher_steps=args.teacher_steps)
    _one((warm, str(out / "_teacher-warmup")))
    if "kd_cached" in methods and not (out / "_teacher-outputs").is_dir():
        from transfuse.cache_teacher import cache_teacher
        from transfuse.config import config_from_dict

        cache_teacher(config_from_dict(warm), out / "_teacher-outputs", quiet=True)

    results = []
    for (setting, method, seed), summary in run_cells(cells, jobs=args.jobs, label=lambda k: f"{k[0]:>8} {k[1]:>6} seed {k[2]}"):
        results.append({"setting": setting, "method": method, "seed": seed, "summary": summary})
    results.sort(key=lambda r: (list(SETTINGS).index(r["setting"]), METHODS.index(r["method"]), r["seed"]))
    (out / "results.json").write_text(json.dumps(results, indent=1))
    md = table(results, args.seeds)
    (out / "results.md").write_text(md + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
