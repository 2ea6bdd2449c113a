"""Label-only (black-box) distillation: student accuracy against the number of teacher queries.

    python benchmarks/label_only.py                                  # Fashion-MNIST, seeds 0 1 2
    python benchmarks/label_only.py --budgets 500 2000 --seeds 0 --jobs 2
    python benchmarks/label_only.py --data digits --budgets 50 200 800 --steps 600

A teacher is trained once from all training labels (and kept in ``<out>/teacher-*.safetensors``,
so a rerun reuses it). Then, for every budget ``Q`` and seed, ``Q`` training images are
drawn at random (seeded) and the student is trained on them twice, with the same
initialisation, data order and steps:

* **label-only** -- the images carry no labels; a ``LabelOnlyTeacher`` (budget ``Q``, with
  memory) answers each image's class once, and the ``label_only`` loss trains the student
  on those answers: the black-box setting, where every answer is a paid query;
* **true labels** -- the baseline measured in the same command: the same ``Q`` images with
  their true labels and plain cross-entropy (what ``Q`` human labels would buy).

The table reports the student's test accuracy (mean ± std over seeds), the queries the
source actually spent, and how often the teacher's answers on those images were right.
A last row trains the student on every training label (the ceiling). Results go to
``<out>/results.json`` and ``<out>/results.md``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

DEFAULT_BUDGETS = [500, 2000, 8000, 32000]
TEACHER = {"name": "mlp", "options": {"hidden": [512, 256]}, "steps": 4000, "batch_size": 128, "lr": 0.001, "seed": 0}
STUDENT = {"name": "mlp", "options": {"hidden": [64]}}


def _threads() -> None:
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))


def _data(name: str):
    from transfuse.data import load_dataset

    return load_dataset(name)


def pick_data(requested: str | None) -> str:
    """``fashion_mnist`` where its files are at the default root, else ``digits`` (or as requested)."""
    if requested:
        return requested
    try:
        _data("fashion_mnist")
        return "fashion_mnist"
    except (FileNotFoundError, OSError, ValueError):
        return "digits"


def _fabric():
    from lightning_fabric import Fabric

    return Fabric(accelerator="cpu", devices=1)


def _fit(distiller, train_set, *, steps: int, batch_size: int, lr: float, seed: int, run_dir: str) -> None:
    from transfuse.engine import FitSettings, fit

    import torch

    optimizer = torch.optim.Adam(distiller.parameters(), lr=lr)
    settings = FitSettings(steps=steps, batch_size=min(batch_size, len(train_set)), seed=seed, log_every=max(steps, 1),
                           checkpoint_every=steps, keep_checkpoints=1, progress=False)
    fit(_fabric(), distiller, optimizer, train_set, settings, run_dir=run_dir)


def teacher_path(out: Path, data: str) -> Path:
    key = hashlib.sha256(json.dumps({"data": data, **TEACHER}, sort_keys=True).encode()).hexdigest()[:12]
    return out / f"teacher-{data}-{key}.safetensors"


def train_teacher(data: str, path: Path) -> float:
    """Train the teacher from every training label (once; reused from ``path``); its test accuracy."""
    import torch
    from safetensors.torch import load_file, save_file

    from transfuse.distiller import Distiller, Term
    from transfuse.losses import LOSSES
    from transfuse.models import build_model
    from transfuse.participants import Participant

    _threads()
    splits = _data(data)
    torch.manual_seed(TEACHER["seed"])
    net = build_model(TEACHER["name"], input_shape=splits.input_shape, num_classes=splits.num_classes, **TEACHER["options"])
    if path.is_file():
        net.load_state_dict(load_file(str(path)))
    else:
        distiller = Distiller([Participant("teacher", net)], [Term("ce", LOSSES.get("ce").build(), input="teacher.logits",
                                                                    target=None)])
        with tempfile.TemporaryDirectory() as work:
            _fit(distiller, splits.train, steps=TEACHER["steps"], batch_size=TEACHER["batch_size"], lr=TEACHER["lr"],
                 seed=TEACHER["seed"], run_dir=work)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return _accuracy(net, splits.test)


def _accuracy(model, dataset) -> float:
    from transfuse.analysis import accuracy, predict

    logits, targets = predict(model, dataset, batch_size=2000)
    return accuracy(logits, targets)


def pool_of(n: int, budget: int, seed: int):
    """The ``budget`` training images (positions) a run may query: a seeded random draw."""
    import torch

    gen = torch.Generator().manual_seed(10_007 * seed + budget)
    return torch.randperm(n, generator=gen)[: min(budget, n)]


def run_cell(job: dict) -> dict:
    """One (mode, budget, seed) student: ``label_only`` (teacher answers) or ``true_labels`` (the baseline)."""
    import torch
    from torch import nn

    import transfuse.losses.hard_labels  # noqa: F401  (registers `label_only`)
    from transfuse.blackbox import LabelOnlyTeacher
    from transfuse.data import ArrayDataset
    from transfuse.distiller import Distiller, Term
    from transfuse.losses import LOSSES
    from transfuse.models import build_model
    from transfuse.participants import Participant
    from safetensors.torch import load_file

    _threads()
    t0 = time.perf_counter()
    splits = _data(job["data"])
    train = splits.train
    budget, seed, mode = job["budget"], job["seed"], job["mode"]
    rows = torch.arange(len(train)) if budget is None else pool_of(len(train), budget, seed)
    inputs, truth, ids = train.inputs[rows], train.targets[rows], train.sample_ids[rows]
    torch.manual_seed(seed)  # the same student initialisation for both modes
    student = build_model(STUDENT["name"], input_shape=splits.input_shape, num_classes=splits.num_classes,
                          **STUDENT["options"])
    result = {**job, "images": len(rows)}
    with tempfile.TemporaryDirectory() as work:
        if mode == "label_only":
            teacher_net = build_model(TEACHER["name"], input_shape=splits.input_shape, num_classes=splits.num_classes,
                                      **TEACHER["options"])
            teacher_net.load_state_dict(load_file(job["teacher"]))
            data = ArrayDataset(inputs, torch.full_like(truth, -1), ids=ids)  # no labels: only the teacher's answers
            source = LabelOnlyTeacher("blackbox", Participant("teacher", teacher_net, trainable=False), budget=budget,
                                      num_samples=len(data))
            distiller = Distiller([Participant("student", student), source],
                                  [Term("label_only", LOSSES.get("label_only").build(), target="blackbox.labels")])
            if "stateful" not in dict(distiller.named_children()):
                distiller.stateful = nn.ModuleDict({"blackbox": source})  # checkpointed with the run
            _fit(distiller, data, steps=job["steps"], batch_size=job["batch_size"], lr=job["lr"], seed=seed, run_dir=work)
            answered = source.answers >= 0
            result["queries"] = source.spent
            result["teacher_label_accuracy"] = (source.answers[answered] == truth[answered]).float().mean().item()
        else:
            data = ArrayDataset(inputs, truth, ids=ids)
            distiller = Distiller([Participant("student", student)],
                                  [Term("ce", LOSSES.get("ce").build(), target=None)])
            _fit(distiller, data, steps=job["steps"], batch_size=job["batch_size"], lr=job["lr"], seed=seed, run_dir=work)
            result["queries"] = 0
    result["accuracy"] = _accuracy(student, splits.test)
    result["seconds"] = time.perf_counter() - t0
    return result


def mean_std(values: list[float]) -> str:
    """``mean ± std`` (sample std; a single value alone)."""
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def table(results: list[dict], *, data: str, teacher_accuracy: float, seeds: list[int], steps: int) -> str:
    lines = [
        f"Data: {data}; teacher {TEACHER['name']} {TEACHER['options']} ({TEACHER['steps']} steps on every training label): "
        f"{100 * teacher_accuracy:.2f} % test accuracy. Student {STUDENT['name']} {STUDENT['options']}, "
        f"{steps} steps of batch {results[0]['batch_size']}, Adam {results[0]['lr']}; seeds {', '.join(map(str, seeds))}.",
        "",
        "| budget (queries) | queries used | teacher answers right % | label-only student % "
        "| true-labels student % | Δ (label-only − true) |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    budgets = sorted({r["budget"] for r in results if r["budget"] is not None})
    for budget in budgets:
        lo = sorted((r for r in results if r["budget"] == budget and r["mode"] == "label_only"), key=lambda r: r["seed"])
        tl = sorted((r for r in results if r["budget"] == budget and r["mode"] == "true_labels"), key=lambda r: r["seed"])
        acc_lo = [100 * r["accuracy"] for r in lo]
        acc_tl = [100 * r["accuracy"] for r in tl]
        delta = [a - b for a, b in zip(acc_lo, acc_tl)] if len(acc_lo) == len(acc_tl) else []
        used = sorted({r["queries"] for r in lo})
        right = [100 * r["teacher_label_accuracy"] for r in lo]
        lines.append(
            f"| {budget:,} | {', '.join(f'{u:,}' for u in used)} | {mean_std(right) if right else '-'} | "
            f"{mean_std(acc_lo) if acc_lo else '-'} | {mean_std(acc_tl) if acc_tl else '-'} | "
            f"{mean_std(delta) if delta else '-'} |"
        )
    full = [100 * r["accuracy"] for r in results if r["budget"] is None]
    if full:
        n = results[[r["budget"] for r in results].index(None)]["images"]
        lines.append(f"| all {n:,} true labels | 0 | - | - | {mean_std(full)} | - |")
    lines += ["", "Δ is paired by seed: the same images, initialisation and data order."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="fashion_mnist (default, if present) or digits")
    p.add_argument("--budgets", type=int, nargs="+", default=DEFAULT_BUDGETS)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=1500, help="student optimizer steps")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.001)
    p.add_argument("--no-full", action="store_true", help="skip the all-labels ceiling row")
    p.add_argument("--jobs", type=int, default=2, help="student runs in parallel (one thread each)")
    p.add_argument("--out", default="runs/bench-label-only")
    args = p.parse_args(argv)

    data = pick_data(args.data)
    out = Path(args.out)
    t0 = time.perf_counter()
    path = teacher_path(out, data)
    teacher_accuracy = train_teacher(data, path)
    print(f"teacher: {100 * teacher_accuracy:.2f} % ({time.perf_counter() - t0:.0f} s)", flush=True)

    common = {"data": data, "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "teacher": str(path)}
    jobs = [{**common, "mode": mode, "budget": b, "seed": s}
            for b in args.budgets for s in args.seeds for mode in ("label_only", "true_labels")]
    if not args.no_full:
        jobs += [{**common, "mode": "true_labels", "budget": None, "seed": s} for s in args.seeds]
    results = []
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        for i, r in enumerate(pool.map(run_cell, jobs), 1):
            results.append(r)
            budget = "all" if r["budget"] is None else r["budget"]
            print(f"[{i}/{len(jobs)}] {r['mode']:>11} budget {budget} seed {r['seed']}: {100 * r['accuracy']:.2f} % "
                  f"(queries {r['queries']}, {r['seconds']:.0f} s; {time.perf_counter() - t0:.0f} s total)", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    md = table(results, data=data, teacher_accuracy=teacher_accuracy, seeds=args.seeds, steps=args.steps)
    (out / "results.md").write_text(md + "\n")
    print(md)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
