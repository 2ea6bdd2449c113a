"""Leave-one-domain-out on Fashion-MNIST with synthetic domains: Meta-DMoE against ERM and KD
from the experts' mean.

    python benchmarks/domains.py                         # Fashion-MNIST, target domain 3 (contrast), seeds 0 1 2
    python benchmarks/domains.py --data digits --seeds 0
    python benchmarks/domains.py --target 3 --meta-steps 600

Four domains (``identity``, ``rotate:30``, ``noise:0.4``, ``contrast:0.3``); the target domain
is absent from training and is the whole test split. Three experts (MLPs), each trained from
labels on ONE source domain (``train.domains``; cached by content hash, so every seed and
method shares them). Rows, per seed, all in this command:

* **ERM** -- the student on all source domains, labels only (``distill.method: none``);
* **KD, experts' mean** -- the ``multi_teacher`` scheme over the three experts;
* **Meta-DMoE** -- the ERM student (its weights, as the official pipeline pretrains the
  student) meta-trained with the ``meta_dmoe`` scheme and recipe, evaluated as it is;
* **Meta-DMoE + TTA** -- the same student adapted per target domain by one unlabelled
  distillation step (:func:`transfuse.schemes.meta_dmoe.adapted_predictions`).

Accuracy on the held-out target domain, mean ± std over seeds, and seconds per run.
Results go to ``<out>/results.json`` and ``<out>/results.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

DOMAINS = ["identity", "rotate:30", "noise:0.4", "contrast:0.3"]
STUDENT = {"name": "mlp", "options": {"hidden": [64]}}


def _config(name: str, *, data: str, target: int, seed: int, method: dict, steps: int, lr: float,
            weights: str | None = None, recipe: str = "default", experts: bool = True) -> dict:
    sources = [d for d in range(len(DOMAINS)) if d != target]
    cfg = {
        "name": name, "seed": seed,
        "data": {"name": f"{data}_domains", "options": {"domains": DOMAINS, "seed": 0, "target_domain": target}},
        "participants": {"student": {**STUDENT, **({"weights": weights} if weights else {})}},
        "distill": method, "recipe": {"name": recipe},
        "optim": {"name": "adam", "lr": lr},
        "train": {"steps": steps, "batch_size": 96, "log_every": 100, "checkpoint_every": steps, "progress": False},
    }
    if experts:
        for i, d in enumerate(sources):
            cfg["participants"][f"expert_{i}"] = {
                **STUDENT, "trainable": False,
                "train": {"steps": 800, "batch_size": 128, "domains": [d], "optim": {"name": "adam", "lr": 0.002}},
            }
    return cfg


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", choices=["fashion_mnist", "digits"], default="fashion_mnist")
    parser.add_argument("--target", type=int, default=3, help="the held-out domain (index into the four domains)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=1500, help="ERM and KD steps")
    parser.add_argument("--meta-steps", type=int, default=300)
    parser.add_argument("--inner-lr", type=float, default=0.01)
    parser.add_argument("--out", default="runs/benchmarks/domains")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    from transfuse.analysis import accuracy
    from transfuse.build import load_data
    from transfuse.config import config_from_dict
    from transfuse.run import run
    from transfuse.schemes.meta_dmoe import adapted_predictions, restore

    out = Path(args.out) / f"{args.data}-target{args.target}"
    out.mkdir(parents=True, exist_ok=True)
    rows: dict[str, list[tuple[float, float]]] = {}
    experts_acc: dict[str, float] = {}
    t_all = time.perf_counter()

    def one(label: str, cfg: dict, seed: int) -> dict:
        folder = out / f"{cfg['name']}-s{seed}"
        if (folder / "summary.json").exists():
            summary = json.loads((folder / "summary.json").read_text())
        else:
            t0 = time.perf_counter()
            summary = run(config_from_dict(cfg), out_dir=folder, quiet=True)
            summary["bench_seconds"] = time.perf_counter() - t0
            (folder / "summary.json").write_text(json.dumps(summary, indent=2))
        rows.setdefault(label, []).append((summary["student"]["accuracy"], summary.get("bench_seconds", float("nan"))))
        for name, entry in summary["participants"].items():
            if not entry["trainable"]:
                experts_acc[name] = entry["accuracy"]
        return summary

    for seed in args.seeds:
        common = dict(data=args.data, target=args.target, seed=seed)
        one("ERM (all source domains)", _config("erm", **common, method={"method": "none"}, steps=args.steps, lr=0.002,
                                                experts=False), seed)
        one("KD from the experts' mean (multi_teacher)", _config(
            "multi-teacher", **common, method={"method": "multi_teacher"}, steps=args.steps, lr=0.002), seed)
        erm_weights = str(out / f"erm-s{seed}" / "student.safetensors")
        meta = _config("meta-dmoe", **common, weights=erm_weights, recipe="meta_dmoe", steps=args.meta_steps, lr=0.001,
                       method={"method": "meta_dmoe", "options": {"heads": 16, "inner_lr": args.inner_lr}})
        t0 = time.perf_counter()
        one("Meta-DMoE, no adaptation", meta, seed)
        cfg = config_from_dict(meta)
        distiller = restore(cfg, out / f"meta-dmoe-s{seed}")
        splits, _ = load_data(cfg.data)
        t1 = time.perf_counter()
        logits, targets = adapted_predictions(distiller, splits.test, support_size=64)
        rows.setdefault("Meta-DMoE + test-time adaptation", []).append(
            (accuracy(logits, targets), rows["Meta-DMoE, no adaptation"][-1][1] + time.perf_counter() - t1))
        print(f"seed {seed} done ({time.perf_counter() - t0:.0f} s for Meta-DMoE)", file=sys.stderr, flush=True)

    lines = [f"| method | target-domain accuracy (mean ± std, {len(args.seeds)} seeds) | seconds per run |",
             "|---|---|---|"]
    results = {}
    for label, values in rows.items():
        accs = [a for a, _ in values]
        secs = [s for _, s in values]
        mean, std = statistics.mean(accs), statistics.stdev(accs) if len(accs) > 1 else 0.0
        results[label] = {"accuracy": accs, "seconds": secs}
        lines.append(f"| {label} | {100 * mean:.2f} ± {100 * std:.2f} | {statistics.mean(secs):.1f} |")
    experts_line = ", ".join(f"{n} {100 * a:.1f}" for n, a in sorted(experts_acc.items()))
    text = "\n".join(lines) + f"\n\nExperts on the target domain (one source domain each): {experts_line}. " \
        f"Total wall time {time.perf_counter() - t_all:.0f} s.\n"
    (out / "results.md").write_text(text)
    (out / "results.json").write_text(json.dumps({"args": vars(args), "rows": results, "experts": experts_acc}, indent=2))
    print(text)


if __name__ == "__main__":
    main()
