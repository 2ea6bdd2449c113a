"""Knowledge Concentration on Fashion-MNIST: three specialists -> one small student.

    python benchmarks/concentration.py                      # seeds 0 1 2, one process
    python benchmarks/concentration.py --seeds 0 --steps 500

Three specialists (MLPs 784-128-10), each trained from labels on the training images of
its class group only -- tops {0 T-shirt, 2 pullover, 4 coat, 6 shirt}, footwear {5 sandal,
7 sneaker, 9 ankle boot}, other {1 trouser, 3 dress, 8 bag} -- and one generalist of
their total size (784-384-10) trained on every image; all four once, cached. Then, per
seed, the same student (784-32-10, a stratified subset of labelled images) is trained:

* ``none`` -- labels only (the baseline, measured in the same command);
* ``kd_generalist`` -- Hinton KD from the generalist (0.9 KD + 0.1 CE, T = 4);
* ``multi_teacher`` -- KD from the mean of the three specialists' softened predictions,
  unrouted (the existing ``multi_teacher`` scheme, which cannot route by group);
* ``kd_routed`` -- KD from the specialist of the sample's group (a ``by_class_group``
  source; 0.9 KD + 0.1 CE, T = 4): the routing without Knowledge Concentration's loss;
* ``concentration`` -- the ``knowledge_concentration`` scheme at its defaults (top-K
  sigmoid targets, self-paced scale per group, no CE);
* ``concentration_fixed`` -- the same without the self-paced scale (plain logits).

Reported: test accuracy overall and per group (mean ± std over seeds), the paired gain
over ``none`` and training seconds. Results go to ``<out>/results.json`` and
``<out>/results.md``. Needs the Debian package ``dataset-fashion-mnist``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fashion_mnist import _one, mean_std, run_cells  # noqa: E402  (one loop for every benchmark)

GROUPS = {"tops": [0, 2, 4, 6], "footwear": [5, 7, 9], "other": [1, 3, 8]}
TEACHER_TRAIN = {"steps": 3000, "batch_size": 128, "seed": 0, "optim": {"name": "adam", "lr": 0.001}}
SPECIALIST = {"name": "mlp", "options": {"hidden": [128]}}
GENERALIST = {"name": "mlp", "options": {"hidden": [384]}}  # about the three specialists' parameters together
STUDENT = {"name": "mlp", "options": {"hidden": [32]}}
METHODS = ["none", "kd_generalist", "multi_teacher", "kd_routed", "concentration", "concentration_fixed"]


def run_config(method: str, seed: int, *, steps: int, label_subset: int, teacher_steps: int, cache: str | None) -> dict:
    """The run config of one (method, seed) cell."""
    train = {**TEACHER_TRAIN, "steps": teacher_steps}
    frozen = {"trainable": False, "train": train, **({"cache_dir": cache} if cache else {})}
    participants: dict = {"student": copy.deepcopy(STUDENT)}
    if method == "kd_generalist":
        participants["teacher"] = {**copy.deepcopy(GENERALIST), **copy.deepcopy(frozen)}
    elif method != "none":
        for name, classes in GROUPS.items():
            participants[name] = {**copy.deepcopy(SPECIALIST), **copy.deepcopy(frozen),
                                  "train": {**train, "classes": classes}}
    distill: dict = {
        "none": {"method": "none"},
        "kd_generalist": {"method": "kd", "options": {"temperature": 4.0}},
        "multi_teacher": {"method": "multi_teacher", "options": {"temperature": 4.0}},
        "kd_routed": {"terms": [{"loss": "ce", "weight": 0.1},
                                {"loss": "kd", "weight": 0.9, "target": "specialists.logits",
                                 "options": {"temperature": 4.0}}]},
        "concentration": {"method": "knowledge_concentration"},
        "concentration_fixed": {"method": "knowledge_concentration", "options": {"self_paced": False}},
    }[method]
    cfg = {
        "name": f"concentration-{method}-s{seed}",
        "seed": seed,
        "data": {"name": "fashion_mnist", "label_subset": label_subset, "subset_seed": seed},
        "participants": participants,
        "distill": distill,
        "optim": {"name": "adam", "lr": 0.001},
        "train": {"steps": steps, "batch_size": 128, "log_every": 100, "checkpoint_every": steps, "progress": False,
                  "eval_batch_size": 2000},
    }
    if method == "kd_routed":
        cfg["sources"] = {"specialists": {"members": list(GROUPS), "combine": "by_class_group"}}
    return cfg


def per_group_accuracy(logits, targets) -> dict[str, float]:
    """Accuracy (%) on the test images of each group (a prediction of any class counts)."""
    import torch

    right = logits.argmax(-1) == targets
    return {g: 100 * right[torch.isin(targets, torch.tensor(c))].float().mean().item() for g, c in GROUPS.items()}


def student_groups(cfg_dict: dict, out_dir: str, splits) -> dict[str, float]:
    """The trained student's test accuracy per group (read back from its run folder)."""
    from transfuse.analysis import predict
    from transfuse.build import make_model
    from transfuse.config import config_from_dict

    cfg = config_from_dict(cfg_dict)
    student = cfg.participants["student"].model_copy(update={"weights": str(Path(out_dir) / "student.safetensors")})
    logits, targets = predict(make_model(student, splits, role="student"), splits.test, batch_size=2000)
    return per_group_accuracy(logits, targets)


def teacher_rows(cache: str | None, teacher_steps: int) -> list[str]:
    """The teachers' own test accuracy: the generalist, and the specialists routed by the
    true label (an oracle no deployed model has) or by their own top-1 confidence."""
    import torch

    from transfuse.analysis import predict
    from transfuse.build import load_splits, make_model, teacher_weights_path
    from transfuse.config import config_from_dict
    from transfuse.sources import by_class_group

    rows = []
    for method, names in (("kd_generalist", ["teacher"]), ("concentration", list(GROUPS))):
        cfg = config_from_dict(run_config(method, 0, steps=1, label_subset=100, teacher_steps=teacher_steps, cache=cache))
        splits = load_splits(cfg.data)
        outs = []
        for name in names:
            p = cfg.participants[name].model_copy(update={"weights": str(teacher_weights_path(cfg, name))})
            outs.append(predict(make_model(p, splits, role=name), splits.test, batch_size=2000))
        targets = outs[0][1]
        params = sum(p.numel() for p in make_model(cfg.participants[names[0]], splits, role=names[0]).parameters())
        if len(outs) == 1:
            rows.append(("generalist 784-384-10", params, outs[0][0], targets))
            continue
        table = torch.full((10,), -1, dtype=torch.long)
        for v, classes in enumerate(GROUPS.values()):
            table[classes] = v
        logits = [o[0] for o in outs]
        oracle, _ = by_class_group(logits, targets, table)
        confident, _ = by_class_group(logits, None, table)
        rows.append(("3 specialists 784-128-10, routed by the label (oracle)", 3 * params, oracle, targets))
        rows.append(("3 specialists 784-128-10, routed by confidence", 3 * params, confident, targets))
    lines = ["| teacher | params | accuracy % | " + " | ".join(f"{g} %" for g in GROUPS) + " |",
             "|---|---:|---:|" + "---:|" * len(GROUPS)]
    for label, params, logits, targets in rows:
        acc = 100 * (logits.argmax(-1) == targets).float().mean().item()
        groups = per_group_accuracy(logits, targets)
        lines.append(f"| {label} | {params:,} | {acc:.2f} | " + " | ".join(f"{groups[g]:.2f}" for g in GROUPS) + " |")
    return lines


def table(results: list[dict], seeds: list[int]) -> str:
    """Markdown: one row per method, mean ± std over seeds."""
    lines = ["| method | accuracy % | Δ vs none | " + " | ".join(f"{g} %" for g in GROUPS) + " | train s |",
             "|---|---:|---:|" + "---:|" * len(GROUPS) + "---:|"]
    base = {r["seed"]: r["summary"]["student"]["accuracy"] * 100 for r in results if r["method"] == "none"}
    for method in METHODS:
        cell = [r for r in results if r["method"] == method]
        if not cell:
            continue
        acc = [r["summary"]["student"]["accuracy"] * 100 for r in cell]
        delta = [a - base[r["seed"]] for a, r in zip(acc, cell) if r["seed"] in base]
        groups = [mean_std([r["summary"]["per_group"][g] for r in cell]) for g in GROUPS]
        secs = statistics.mean(r["summary"]["train_wall_time_s"] for r in cell)
        lines.append(f"| {method} | {mean_std(acc)} | {mean_std(delta) if delta and method != 'none' else '-'} | "
                     + " | ".join(groups) + f" | {secs:.1f} |")
    lines.append("")
    lines.append(f"Seeds: {', '.join(map(str, seeds))}. Δ is paired by seed (same label subset and initialisation).")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated: " + ", ".join(METHODS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=2000, help="student optimizer steps (batch 128)")
    p.add_argument("--label-subset", type=int, default=5000, help="labelled training images the student sees")
    p.add_argument("--teacher-steps", type=int, default=TEACHER_TRAIN["steps"], help="steps of each teacher (batch 128)")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel (one thread each)")
    p.add_argument("--out", default="runs/bench-concentration")
    p.add_argument("--cache", default=None, help="trained-teacher cache folder (default: the per-user cache)")
    args = p.parse_args(argv)
    from transfuse.config import config_from_dict

    methods = args.methods.split(",")
    for m in methods:
        if m not in METHODS:
            p.error(f"unknown method {m!r}; valid: {', '.join(METHODS)}")
    t0 = time.perf_counter()
    out = Path(args.out)

    def config(method: str, seed: int, steps: int) -> dict:
        return run_config(method, seed, steps=steps, label_subset=args.label_subset, teacher_steps=args.teacher_steps,
                          cache=args.cache)

    # The four teachers are trained once, in this process, before any student runs.
    for method in ("kd_generalist", "concentration"):
        _one((config(method, args.seeds[0], 1), str(out / f"_teachers-{method}")))
    cells = [((method, seed), (config(method, seed, args.steps), str(out / f"{method}-s{seed}")))
             for seed in args.seeds for method in methods]
    import torch

    from transfuse.build import load_splits

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    splits = load_splits(config_from_dict(cells[0][1][0]).data)
    jobs = dict(cells)
    results = []
    for (method, seed), summary in run_cells(cells, jobs=args.jobs, label=lambda k: f"{k[0]:>20} seed {k[1]}"):
        summary = {**summary, "per_group": student_groups(*jobs[(method, seed)], splits)}
        results.append({"method": method, "seed": seed, "summary": summary})
    results.sort(key=lambda r: (METHODS.index(r["method"]), r["seed"]))
    (out / "results.json").write_text(json.dumps(results, indent=1))
    md = "\n".join([
        f"Student {STUDENT['name']} 784-32-10 on {args.label_subset:,} labelled training images, {args.steps} steps "
        f"(batch 128, Adam 1e-3); teachers {args.teacher_steps} steps each.",
        "",
        *teacher_rows(args.cache, args.teacher_steps),
        "",
        table(results, args.seeds),
        "",
        f"Wall time of the whole command: {time.perf_counter() - t0:.0f} s.",
    ])
    (out / "results.md").write_text(md + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
