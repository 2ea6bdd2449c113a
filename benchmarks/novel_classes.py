"""Novel class discovery: UNO's discovery loss alone and with Cr-KD, several seeds.

    python benchmarks/novel_classes.py                        # Fashion-MNIST, seeds 0 1 2
    python benchmarks/novel_classes.py --data digits --seeds 0 --jobs 2

Classes 0-4 are known: their training images keep their labels. The training images of
classes 5-9 lose theirs (``data.novel_classes``). A CNN trained on the known classes only
(``train.classes``; trained once and cached) is the supervised model; as in the official
code, the discovery model starts from its weights (``--init scratch`` starts from random
ones). Per seed, two runs through ``transfuse.run``, with the same two augmented views per
sample (``two_views``): ``uno`` (swapped prediction with Sinkhorn pseudo-labels, the
baseline) and ``uno+crkd`` (plus Cr-KD at its official weight 0.1). Each saved student is
then scored on the test split: clustering accuracy of the novel test images over the
novel head (Hungarian-matched), accuracy of the known test images over the known head,
and the task-agnostic clustering accuracy over the whole head. Results go to
``<out>/results.json`` and ``<out>/results.md`` (mean ± std over seeds). Interrupted? Run
the same command again: finished runs are kept.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fashion_mnist import _one, mean_std, run_cells  # noqa: E402  (the benchmarks' shared run loop)

KNOWN, NOVEL = [0, 1, 2, 3, 4], [5, 6, 7, 8, 9]
METHODS = ["uno", "uno+crkd"]
#: Per data set: the model of both the supervised model and the student, its training, and the student's.
SETUPS = {
    "fashion_mnist": {
        "model": {"name": "cnn", "options": {"channels": [16, 32], "hidden": 64, "global_pool": False}},
        "teacher_train": {"steps": 1500, "batch_size": 128, "seed": 0, "classes": KNOWN,
                          "optim": {"name": "adam", "lr": 0.002}},
        "steps": 600, "batch_size": 128, "lr": 0.001, "shift": 2,
    },
    "digits": {
        "model": {"name": "cnn", "options": {"channels": [16, 32], "hidden": 64}},
        "teacher_train": {"steps": 600, "batch_size": 64, "seed": 0, "classes": KNOWN,
                          "optim": {"name": "adam", "lr": 0.002}},
        "steps": 600, "batch_size": 64, "lr": 0.002, "shift": 1,
    },
}


def run_config(data: str, method: str, seed: int, *, steps: int | None, root: str | None, cache: str | None,
               init: str | None = None) -> dict:
    """The run config of one (method, seed) cell; ``init``: the student's starting weights (a file), or None."""
    setup = SETUPS[data]
    terms = [{"loss": "uno", "options": {"known": KNOWN}}]
    if method == "uno+crkd":
        terms.append({"loss": "crkd", "target": "teacher", "options": {"known": KNOWN}})
    student = {**setup["model"], **({"weights": init} if init else {})}
    steps = steps or setup["steps"]
    return {
        "name": f"{data}-{method}-s{seed}",
        "seed": seed,
        "data": {"name": data, "options": {"root": root} if root and data == "fashion_mnist" else {},
                 "novel_classes": NOVEL},
        "participants": {
            "student": student,
            "teacher": {**setup["model"], "trainable": False, "train": setup["teacher_train"], "cache_dir": cache},
        },
        "transforms": [{"name": "two_views", "options": {"shift": setup["shift"], "noise_std": 0.1}}],
        "distill": {"terms": terms},
        "optim": {"name": "adam", "lr": setup["lr"]},
        "train": {"steps": steps, "batch_size": setup["batch_size"], "log_every": 100, "checkpoint_every": steps,
                  "progress": False, "eval_batch_size": 2000},
    }


def score(cfg_dict: dict, weights: str) -> dict[str, float]:
    """The student model of ``cfg_dict`` with ``weights``, scored on the test split (task-aware and task-agnostic)."""
    import torch

    from transfuse.analysis.clustering import novel_class_scores
    from transfuse.analysis.predict import predict
    from transfuse.build import load_splits, make_model
    from transfuse.checkpoint import load_into, load_weights
    from transfuse.config import config_from_dict

    torch.set_num_threads(1)
    cfg = config_from_dict(cfg_dict, source=cfg_dict["name"])
    splits = load_splits(cfg.data)
    model = make_model(cfg.participants["student"].model_copy(update={"weights": None}), splits, role="student")
    load_into(model, load_weights(weights), source=weights)
    logits, targets = predict(model, splits.test, batch_size=2000)
    return novel_class_scores(logits, targets, novel=cfg.data.novel_classes)


def table(results: list[dict], *, data: str, seeds: list[int], init: str, teacher_scores: dict | None) -> str:
    lines = [
        f"### {data}: known classes {KNOWN}, novel {NOVEL}; student init: {init}",
        "",
    ]
    if teacher_scores:
        lines += [f"Supervised (known-class) model: {100 * teacher_scores['known_accuracy']:.2f} % on the known test "
                  "images over the known head.", ""]
    lines += [
        "| method | novel clustering acc % | Δ vs uno | known acc % | all (task-agnostic) % | train s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    base = [r["scores"]["novel_cluster_accuracy"] * 100 for r in results if r["method"] == "uno"]
    for method in METHODS:
        cell = [r for r in results if r["method"] == method]
        if not cell:
            continue
        novel = [r["scores"]["novel_cluster_accuracy"] * 100 for r in cell]
        delta = [a - b for a, b in zip(novel, base)] if method != "uno" and len(base) == len(novel) else []
        known = [r["scores"]["known_accuracy"] * 100 for r in cell]
        agnostic = [r["scores"]["all_cluster_accuracy"] * 100 for r in cell]
        secs = [r["summary"]["train_wall_time_s"] for r in cell]
        lines.append(f"| {method} | {mean_std(novel)} | {mean_std(delta) if delta else '-'} | {mean_std(known)} | "
                     f"{mean_std(agnostic)} | {statistics.mean(secs):.1f} |")
    lines += ["", f"Seeds: {', '.join(map(str, seeds))}. Δ is paired by seed (same initialisation and data order)."]
    return "\n".join(lines)


def _teacher_path(cfg_dict: dict) -> Path:
    """Where the run config's supervised model is cached."""
    from transfuse.build import teacher_weights_path
    from transfuse.config import config_from_dict

    return teacher_weights_path(config_from_dict(cfg_dict, source=cfg_dict["name"]), "teacher")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", choices=sorted(SETUPS), default="fashion_mnist")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=None, help="student optimizer steps (default: per data set)")
    p.add_argument("--init", choices=["teacher", "scratch"], default="teacher",
                   help="the student starts from the supervised model's weights (official) or from random ones")
    p.add_argument("--jobs", type=int, default=2, help="runs in parallel (one thread each)")
    p.add_argument("--out", default="runs/bench-novel-classes")
    p.add_argument("--root", default=None, help="folder with the Fashion-MNIST IDX files")
    p.add_argument("--cache", default=None, help="trained-teacher cache folder (default: the per-user cache)")
    args = p.parse_args(argv)

    t0 = time.perf_counter()
    out = Path(args.out) / f"{args.data}-{args.init}"
    # The supervised model is trained once, in this process, before the pool starts.
    # (uno+crkd: a run without a term that reads the teacher would neither train nor load it.)
    warm = run_config(args.data, "uno+crkd", args.seeds[0], steps=1, root=args.root, cache=args.cache)
    _one((warm, str(out / "_teacher-warmup")))
    init = str(_teacher_path(warm)) if args.init == "teacher" else None
    cells = []
    for seed in args.seeds:
        for method in METHODS:
            cfg = run_config(args.data, method, seed, steps=args.steps, root=args.root, cache=args.cache, init=init)
            cells.append(((method, seed), (cfg, str(out / f"{method}-s{seed}"))))
    results = []
    configs = dict(cells)
    for (method, seed), summary in run_cells(cells, jobs=args.jobs, label=lambda k: f"{k[0]:>9} seed {k[1]}"):
        cfg, run_dir = configs[(method, seed)]
        scores = score(cfg, str(Path(run_dir) / "student.safetensors"))
        print(f"    novel clustering {100 * scores['novel_cluster_accuracy']:.2f} %, known "
              f"{100 * scores['known_accuracy']:.2f} %", flush=True)
        results.append({"method": method, "seed": seed, "scores": scores, "summary": summary})
    results.sort(key=lambda r: (METHODS.index(r["method"]), r["seed"]))
    teacher_weights = init or str(_teacher_path(warm))
    teacher_scores = score(warm, teacher_weights)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    md = table(results, data=args.data, seeds=args.seeds, init=args.init, teacher_scores=teacher_scores)
    md += f"\n\nWall time of the command: {time.perf_counter() - t0:.0f} s."
    (out / "results.md").write_text(md + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
