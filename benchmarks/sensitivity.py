"""How sensitive is each classic method to its hyper-parameters? A small grid on the
low-label Fashion-MNIST setting, reported beside the paper default.

    python benchmarks/sensitivity.py                      # the whole grid, seeds 0 1 2
    python benchmarks/sensitivity.py --methods dkd,dist --seeds 0

Every cell is the low-label run of ``benchmarks/fashion_mnist.py`` (the same cached
teacher, student, data subset per seed and 1,500 steps), with one option or the term
weight changed. ``none`` and ``kd`` (paper defaults) are measured in the same command.
Results go to ``<out>/results.json`` and ``<out>/results.md``; finished cells are kept
when the command is run again.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fashion_mnist as fm  # noqa: E402  (the benchmark whose low-label setting this varies)

#: method -> list of (label, changes to the `distill` section); the paper default is marked.
GRID: dict[str, list[tuple[str, dict]]] = {
    "dkd": [(f"beta={b}{' (default)' if b == 8.0 else ''}", {"options": {"beta": b}}) for b in (1.0, 2.0, 4.0, 8.0)],
    "dist": [(f"weight={w}, tau={t}{' (default)' if (w, t) == (2.0, 1.0) else ''}",
              {"weight": w, "options": {"temperature": t}}) for t in (1.0, 4.0) for w in (1.0, 2.0, 4.0)],
    "fitnet": [(f"weight={w}{' (default)' if w == 100.0 else ''}", {"weight": w}) for w in (10.0, 100.0, 1000.0)],
    "sp": [(f"weight={w}{' (default)' if w == 3000.0 else ''}", {"weight": w}) for w in (300.0, 3000.0, 30000.0)],
    "rkd": [(f"weight={w}{' (default)' if w == 1.0 else ''}", {"weight": w}) for w in (0.1, 1.0, 10.0)],
    "pkt": [(f"weight={w}{' (default)' if w == 30000.0 else ''}", {"weight": w}) for w in (3000.0, 30000.0, 300000.0)],
    "crd": [(f"weight={w}{' (default)' if w == 0.8 else ''}", {"weight": w}) for w in (0.2, 0.8, 3.2)],
}


def cell_config(method: str, label: str, change: dict, seed: int, *, steps: int, root: str | None, cache: str | None) -> dict:
    """The low-label run of ``method`` with ``change`` merged into its ``distill`` section."""
    cfg = fm.run_config("lowlabel", method, seed, steps=steps, root=root, cache=cache)
    distill = dict(cfg["distill"])
    for key, value in change.items():
        distill[key] = {**distill.get(key, {}), **value} if isinstance(value, dict) else value
    cfg["distill"] = distill
    cfg["name"] = f"sens-{method}-{_slug(label)}-s{seed}"
    return cfg


def _slug(label: str) -> str:
    return "".join(c if c.isalnum() or c in ".=" else "_" for c in label.replace(" (default)", ""))


def table(results: list[dict], seeds: list[int]) -> str:
    """Markdown: per method, one row per grid value, accuracy and paired Δ vs none and vs KD."""
    base = {r["seed"]: r["acc"] for r in results if r["method"] == "none"}
    kd = {r["seed"]: r["acc"] for r in results if r["method"] == "kd"}
    lines = ["| method | setting | accuracy % | Δ vs none | Δ vs kd |", "|---|---|---:|---:|---:|"]
    for name in ["none", "kd", *GRID]:
        labels = [lab for lab, _ in GRID.get(name, [("paper default", {})])]
        for label in labels:
            cell = [r for r in results if r["method"] == name and r["label"] == label]
            if not cell:
                continue
            acc = [r["acc"] for r in cell]
            d_none = [r["acc"] - base[r["seed"]] for r in cell if r["seed"] in base] if name != "none" else []
            d_kd = [r["acc"] - kd[r["seed"]] for r in cell if r["seed"] in kd] if name not in ("none", "kd") else []
            lines.append(f"| {name} | {label} | {fm.mean_std(acc)} | {fm.mean_std(d_none) if d_none else '-'} | "
                         f"{fm.mean_std(d_kd) if d_kd else '-'} |")
    lines.append(f"\nSeeds: {', '.join(map(str, seeds))}; Δ paired by seed.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default=",".join(GRID), help="comma-separated: " + ", ".join(GRID))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--out", default="runs/bench-sensitivity")
    p.add_argument("--root", default=None)
    p.add_argument("--cache", default=None, help="trained-teacher cache folder (default: the per-user cache)")
    args = p.parse_args(argv)
    methods = args.methods.split(",")
    unknown = sorted(set(methods) - set(GRID))
    if unknown:
        p.error(f"unknown method(s) {unknown}; valid: {', '.join(GRID)}")
    out = Path(args.out)
    cells = []
    for seed in args.seeds:
        for name in ("none", "kd"):
            cfg = fm.run_config("lowlabel", name, seed, steps=args.steps, root=args.root, cache=args.cache)
            cells.append(((name, "paper default", seed), (cfg, str(out / name / f"s{seed}"))))
        for method in methods:
            for label, change in GRID[method]:
                cfg = cell_config(method, label, change, seed, steps=args.steps, root=args.root, cache=args.cache)
                cells.append(((method, label, seed), (cfg, str(out / method / f"{_slug(label)}-s{seed}"))))
    warm = fm.run_config("lowlabel", "kd", args.seeds[0], steps=1, root=args.root, cache=args.cache)
    fm._one((warm, str(out / "_teacher-warmup")))  # the teacher trains once, before the pool

    results = []
    for (method, label, seed), summary in fm.run_cells(cells, jobs=args.jobs, label=lambda k: f"{k[0]} {k[1]} seed {k[2]}"):
        results.append({"method": method, "label": label, "seed": seed, "acc": 100 * summary["student"]["accuracy"]})
    (out / "results.json").write_text(json.dumps(sorted(results, key=lambda r: (r["method"], r["label"], r["seed"])), indent=1))
    md = table(results, args.seeds)
    (out / "results.md").write_text(md + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
