"""Federated knowledge distillation on Dirichlet non-IID splits: local training, FedMD-style averaging, KnFu.

    python benchmarks/federated.py                      # Fashion-MNIST, alpha 0.1 and 1.0, seeds 0 1 2
    python benchmarks/federated.py --data digits --seeds 0 --rounds 2
    python benchmarks/federated.py --jobs 2             # cells in parallel (one thread each)

A slice of the training split (``--transfer-size`` samples) is held out as the shared,
unlabelled transfer set; ``--pool-size`` of the rest are dealt to ``--clients`` clients by a
Dirichlet(alpha) label split (the same split for every row of a seed). Every client is a
small MLP. Rows, all in this one command, with the same split, initialisations and local
steps:

* **local** -- each client trains on its own data only (the baseline);
* **uniform** -- FedMD-style: every client distils the plain average of all clients'
  predictions on the transfer set;
* **knfu** -- KnFu: every client distils the ``exp(-beta D)``-weighted mean of its
  semantic neighbours' predictions (beta = 10, neighbours: divergence at most the mean);
* **knfu+self** -- the same with the client's own predictions among its neighbours (an
  ablation: the paper's text as available does not settle whether a client fuses its own).

Metrics after the last round, mean ± std over seeds: ALMA (the mean over clients of the
accuracy on the client's own test distribution: per-class test accuracies weighted by its
training label mix) and the mean accuracy on the global test set; seconds (wall and CPU)
per simulation. Results go to ``<out>/results.json`` and ``<out>/results.md``.
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

ROWS = {
    "local": {"scheme": "local"},
    "uniform": {"scheme": "uniform"},
    "knfu": {"scheme": "knfu"},
    "knfu+self": {"scheme": "knfu", "include_self": True},
}


def pick_data(requested: str | None) -> str:
    """``fashion_mnist`` where its files are at the default root, else ``digits`` (or as requested)."""
    from transfuse.data import load_dataset

    if requested:
        return requested
    try:
        load_dataset("fashion_mnist")
        return "fashion_mnist"
    except (FileNotFoundError, OSError, ValueError):
        return "digits"


def _one(job: tuple[str, dict]) -> dict:
    data, options = job
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    from transfuse.data import load_dataset
    from transfuse.federated import FederatedOptions, simulate

    splits = load_dataset(data)
    cpu0 = time.process_time()
    result = simulate(splits, FederatedOptions(**options))
    out = result.to_dict()
    out["cpu_seconds"] = time.process_time() - cpu0
    return out


def mean_std(values: list[float], scale: float = 1.0) -> str:
    vals = [scale * v for v in values]
    if len(vals) == 1:
        return f"{vals[0]:.2f}"
    return f"{statistics.mean(vals):.2f} ± {statistics.stdev(vals):.2f}"


def table(results: list[dict], alphas: list[float], rows: list[str]) -> str:
    lines = []
    for alpha in alphas:
        lines += [f"**alpha = {alpha}**", "",
                  "| row | ALMA (own test distribution, %) | global test accuracy (%) | vs local: ALMA | s / run (wall) | s / run (CPU) |",
                  "|---|---|---|---|---|---|"]
        base = {r["seed"]: r for r in results if r["alpha"] == alpha and r["row"] == "local"}
        for row in rows:
            cell = sorted((r for r in results if r["alpha"] == alpha and r["row"] == row), key=lambda r: r["seed"])
            if not cell:
                continue
            alma = [r["rounds"][-1]["alma"] for r in cell]
            glob = [r["rounds"][-1]["global_accuracy"] for r in cell]
            gain = [100 * (r["rounds"][-1]["alma"] - base[r["seed"]]["rounds"][-1]["alma"]) for r in cell if r["seed"] in base]
            vs = "-" if row == "local" or not gain else (f"{statistics.mean(gain):+.2f}" if len(gain) == 1 else
                                                         f"{statistics.mean(gain):+.2f} ± {statistics.stdev(gain):.2f}")
            lines.append(f"| {row} | {mean_std(alma, 100)} | {mean_std(glob, 100)} | {vs} | "
                         f"{statistics.mean(r['seconds'] for r in cell):.1f} | {statistics.mean(r['cpu_seconds'] for r in cell):.1f} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=None, help="fashion_mnist (default where present) or digits")
    ap.add_argument("--alphas", type=float, nargs="+", default=[0.1, 1.0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--transfer-size", type=int, default=None, help="default 2000 (Fashion-MNIST) / 300 (digits)")
    ap.add_argument("--pool-size", type=int, default=None, help="default 10000 (Fashion-MNIST) / all (digits)")
    ap.add_argument("--local-steps", type=int, default=100)
    ap.add_argument("--fine-tune-steps", type=int, default=50)
    ap.add_argument("--hidden", type=int, nargs="*", default=[64])
    ap.add_argument("--beta", type=float, default=10.0)
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--out", default="runs/federated")
    args = ap.parse_args(argv)

    data = pick_data(args.data)
    fashion = data == "fashion_mnist"
    transfer = args.transfer_size or (2000 if fashion else 300)
    pool = args.pool_size or (10000 if fashion else None)
    common = dict(num_clients=args.clients, rounds=args.rounds, transfer_size=transfer, pool_size=pool,
                  local_steps=args.local_steps, fine_tune_steps=args.fine_tune_steps, hidden=tuple(args.hidden),
                  beta=args.beta)
    cells = [((alpha, row, seed), (data, {**common, **ROWS[row], "alpha": alpha, "seed": seed}))
             for alpha in args.alphas for seed in args.seeds for row in args.rows]
    print(f"{data}: {len(cells)} simulations ({args.clients} clients, {args.rounds} rounds, transfer {transfer}, "
          f"pool {pool or 'all'})", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    results = []
    with ProcessPoolExecutor(max_workers=args.jobs) as pool_ex:
        futures = {pool_ex.submit(_one, job): key for key, job in cells}
        for i, fut in enumerate(as_completed(futures), 1):
            (alpha, row, seed), res = futures[fut], fut.result()
            results.append({"alpha": alpha, "row": row, "seed": seed, **res})
            last = res["rounds"][-1]
            print(f"[{i}/{len(cells)}] alpha={alpha} {row} seed={seed}: ALMA {100 * last['alma']:.2f} %, global "
                  f"{100 * last['global_accuracy']:.2f} % ({time.perf_counter() - t0:.0f} s)", flush=True)
    total = time.perf_counter() - t0
    md = table(results, args.alphas, args.rows)
    md += f"\n{data}, {len(args.seeds)} seeds; total {total:.0f} s wall, {sum(r['cpu_seconds'] for r in results):.0f} s CPU.\n"
    (out / "results.json").write_text(json.dumps({"data": data, "args": vars(args), "results": results}, indent=1))
    (out / "results.md").write_text(md)
    print(md)


if __name__ == "__main__":
    sys.exit(main())
