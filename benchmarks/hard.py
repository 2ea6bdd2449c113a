"""HARD's toy claim: a CNN teacher's shift robustness reaches an MLP student through
adversarial shifts, where plain KD (and KD with random shifts) transfers less of it.

    python benchmarks/hard.py                    # 3 seeds, about 8 minutes on one core
    python benchmarks/hard.py --seeds 0 --steps 300

The CNN teacher of ``benchmarks/fashion_mnist.py`` (convolutions and max pooling: more
robust to small shifts than an MLP) is trained once on Fashion-MNIST and cached. An MLP student (784-128-10) learns from the
centred training images, per seed, in four ways: from labels only (``none``), with KD,
with KD on a share of each batch shifted at random (``kd+shift``: ``hard_affine`` with
no ascent steps, the non-adversarial baseline), and with HARD (``hard_affine``: the same
shift bounds, the shifts found by ascent on teacher/student disagreement). Every student
is then evaluated on the test images and on the same test images shifted by up to
``--max-shift`` pixels in x and y (built here, with the background value filling the
vacated border). Both augmentations are translation-only, with the same bounds, so the
comparison isolates the adversarial search. Results go to ``<out>/results.json`` and
``<out>/results.md``; finished runs are kept, so an interrupted benchmark resumes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

# The runner and the CNN teacher of the classic-methods benchmark (trained once, cached, shared).
from fashion_mnist import TEACHER, _one, mean_std, run_cells  # noqa: E402
STUDENT = {"name": "mlp", "options": {"hidden": [128]}}
ROWS = ["none", "kd", "kd+shift", "hard"]


def shift_options(max_shift: int, *, steps: int) -> dict:
    """``hard_affine`` restricted to translations of up to ``max_shift`` pixels of 28."""
    return {"max_rotation": 0.0, "max_scale": 0.0, "max_shear": 0.0, "max_translate": max_shift / 28,
            "steps": steps, "share": 0.5}


def run_config(row: str, seed: int, *, steps: int, batch_size: int, max_shift: int, hard_steps: int,
               root: str | None, cache: str | None) -> dict:
    cfg = {
        "name": f"hard-{row}-s{seed}",
        "seed": seed,
        "data": {"name": "fashion_mnist", "options": {"root": root} if root else {}},
        "student": STUDENT,
        "teacher": {**TEACHER, "cache_dir": cache},
        "distill": {"method": "none" if row == "none" else "kd"},
        "optim": {"name": "adam", "lr": 0.001},
        "train": {"steps": steps, "batch_size": batch_size, "log_every": 100, "checkpoint_every": steps,
                  "progress": False, "eval_batch_size": 2000},
    }
    if row == "kd+shift":
        cfg["transforms"] = [{"name": "hard_affine", "options": shift_options(max_shift, steps=0)}]
    if row == "hard":
        cfg["transforms"] = [{"name": "hard_affine", "options": shift_options(max_shift, steps=hard_steps)}]
    return cfg


def shifted(images, max_shift: int, *, seed: int):
    """Each image moved by its own integer shift in ``[-max_shift, max_shift]`` per axis;
    the vacated border takes the image's background (its smallest value)."""
    import torch
    import torch.nn.functional as F

    n, _, h, w = images.shape
    g = torch.Generator().manual_seed(seed)
    dx = torch.randint(-max_shift, max_shift + 1, (n,), generator=g)
    dy = torch.randint(-max_shift, max_shift + 1, (n,), generator=g)
    background = images.amin(dim=(1, 2, 3), keepdim=True)  # (N, 1, 1, 1)
    k = max_shift
    padded = F.pad(images - background, (k, k, k, k)) + background  # (N, C, H + 2k, W + 2k)
    rows = (k - dy)[:, None] + torch.arange(h)[None, :]  # (N, H) source rows
    cols = (k - dx)[:, None] + torch.arange(w)[None, :]  # (N, W) source columns
    index = torch.arange(n)[:, None, None]
    return padded[:, 0][index, rows[:, :, None], cols[:, None, :]].unsqueeze(1)  # (N, 1, H, W)


def evaluate(cfg_dict: dict, weights: Path, role: str, datasets: dict) -> dict[str, float]:
    """Accuracy (%) of ``role``'s model from ``weights`` on each data set (transfuse.analysis)."""
    from transfuse.analysis import accuracy, predict
    from transfuse.build import load_splits, make_model
    from transfuse.checkpoint import load_into, load_weights
    from transfuse.config import config_from_dict

    cfg = config_from_dict(cfg_dict)
    section = cfg.participants[role].model_copy(update={"weights": None})
    model = make_model(section, load_splits(cfg.data), role=role)
    load_into(model, load_weights(weights), source=str(weights))
    return {name: 100 * accuracy(*predict(model, data, batch_size=2000)) for name, data in datasets.items()}


def table(results: list[dict], teacher: dict[str, float], args) -> str:
    lines = [
        f"Fashion-MNIST; teacher {TEACHER['name']} {TEACHER['options']} ({TEACHER['train']['steps']} steps): "
        f"{teacher['test']:.2f} % test, {teacher['shifted']:.2f} % shifted. Student {STUDENT['name']} "
        f"{STUDENT['options']}, {args.steps} steps of batch {args.batch_size}. Shifted: every test image moved by up "
        f"to ±{args.max_shift} px in x and y. HARD: `hard_affine`, translation only (±{args.max_shift}/28 of the side), "
        f"{args.hard_steps} ascent steps, half of each batch augmented; kd+shift: the same with 0 steps (random shifts).",
        "",
        "| student | test % | shifted % | Δ shifted vs kd | Δ shifted vs kd+shift | train s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    kd = {r["seed"]: r["shifted"] for r in results if r["row"] == "kd"}
    random = {r["seed"]: r["shifted"] for r in results if r["row"] == "kd+shift"}
    for row in ROWS:
        cell = [r for r in results if r["row"] == row]
        if not cell:
            continue
        delta = [r["shifted"] - kd[r["seed"]] for r in cell if r["seed"] in kd] if row not in ("none", "kd") else []
        vs_random = [r["shifted"] - random[r["seed"]] for r in cell if r["seed"] in random] if row == "hard" else []
        lines.append(
            f"| {row} | {mean_std([r['test'] for r in cell])} | {mean_std([r['shifted'] for r in cell])} | "
            f"{mean_std(delta) if delta else '-'} | {mean_std(vs_random) if vs_random else '-'} | "
            f"{statistics.mean(r['seconds'] for r in cell):.1f} |"
        )
    lines.append("")
    lines.append(f"Seeds: {', '.join(map(str, args.seeds))}; mean ± std over seeds; Δ paired by seed.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--rows", default=",".join(ROWS), help="comma-separated: " + ", ".join(ROWS))
    p.add_argument("--steps", type=int, default=1000, help="student optimizer steps")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-shift", type=int, default=3, help="largest shift in pixels (test set and augmentations)")
    p.add_argument("--hard-steps", type=int, default=3, help="the augmentor's ascent steps per batch")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel (one thread each)")
    p.add_argument("--out", default="runs/bench-hard")
    p.add_argument("--root", default=None, help="folder with the Fashion-MNIST IDX files")
    p.add_argument("--cache", default=None, help="trained-teacher cache folder (default: the per-user cache)")
    args = p.parse_args(argv)
    rows = args.rows.split(",")
    for row in rows:
        if row not in ROWS:
            p.error(f"unknown row {row!r}; valid: {', '.join(ROWS)}")

    import torch

    torch.set_num_threads(1)
    from transfuse.build import load_splits, teacher_weights_path
    from transfuse.config import config_from_dict
    from transfuse.data.base import ArrayDataset

    t0 = time.perf_counter()
    out = Path(args.out)
    common = dict(steps=args.steps, batch_size=args.batch_size, max_shift=args.max_shift, hard_steps=args.hard_steps,
                  root=args.root, cache=args.cache)
    # The teacher is trained once (and cached), in this process, before any student run.
    warm = run_config("kd", args.seeds[0], **{**common, "steps": 1})
    _one((warm, str(out / "_teacher-warmup")))
    splits = load_splits(config_from_dict(warm).data)
    test = splits.test
    datasets = {"test": test, "shifted": ArrayDataset(shifted(test.inputs, args.max_shift, seed=1234), test.targets)}
    teacher = evaluate(warm, teacher_weights_path(config_from_dict(warm), "teacher"), "teacher", datasets)
    print(f"teacher: {teacher['test']:.2f} % test, {teacher['shifted']:.2f} % shifted", flush=True)

    cells = []
    for seed in args.seeds:
        for row in rows:
            cells.append(((row, seed), (run_config(row, seed, **common), str(out / f"{row}-s{seed}"))))
    configs = {key: job for key, job in cells}
    results = []
    for (row, seed), summary in run_cells(cells, jobs=args.jobs, label=lambda k: f"{k[0]:>8} seed {k[1]}"):
        cfg_dict, run_dir = configs[(row, seed)]
        acc = evaluate(cfg_dict, Path(run_dir) / "student.safetensors", "student", datasets)
        results.append({"row": row, "seed": seed, **acc, "seconds": summary["train_wall_time_s"]})
    results.sort(key=lambda r: (ROWS.index(r["row"]), r["seed"]))
    (out / "results.json").write_text(json.dumps({"teacher": teacher, "rows": results}, indent=1))
    md = table(results, teacher, args)
    (out / "results.md").write_text(md + "\n")
    print(md)
    print(f"wall: {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
