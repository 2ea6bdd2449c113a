"""Token divergences and DDK on synthetic Markov text, scored against the true distribution.

    python benchmarks/markov.py                                  # every method, seeds 0 1 2
    python benchmarks/markov.py --seeds 0 --jobs 2 --methods fkl,rkl,ddk

Data ``markov`` with its four default domains (vocabulary 16, order 1, rows of 64 tokens,
2,000 training rows): ``easy`` (peaked, sparse), ``medium``, ``hard`` (flat, dense) and
``bimodal`` (every state has exactly two equally likely successors). A teacher
``causal_lm`` (2 layers, width 64) is trained from labels once and cached; then, per seed,
a student 7x smaller (1 layer, width 32) is trained for ``--steps`` steps:

* ``scratch`` -- labels only (``distill.method: none``);
* ``fkl rkl jsd skew_fkl skew_rkl tvd adaptive_kl taid`` -- each token divergence alone,
  at its defaults (no label term: the language-model papers' objective);
* ``fkl_ce`` -- CE + forward KL, the DDK paper's loss, every training row, uniform order;
* ``ddk_uniform`` -- the same loss with the ``ddk`` recipe at ``alpha: 0`` (10 % of the rows
  held out, batches drawn with replacement, every domain at 1/4): DDK's own baseline;
* ``ddk`` -- the same with ``alpha: 0.5``: domain weights updated every ``--every`` steps.

Per method, mean ± std over seeds: KL(truth || student) on the test rows, overall and per
domain; the student's next-token entropy per domain (the truth's and the teacher's for
reference); on the bimodal domain the *both-modes score* ``2 min(p1, p2)`` of the student's
probabilities of the two true successors (1: both at 0.5; 0: one mode dropped); held-out
perplexity; training seconds. Then DDK against its uniform baseline, paired by seed, on
every domain and on the hardest one (the largest student-teacher KL gap under uniform
sampling), with the final DDK domain weights.

Results go to ``<out>/results.json`` and ``<out>/results.md``; finished runs are kept, so an
interrupted command continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

DOMAIN_NAMES = ["easy", "medium", "hard", "bimodal"]
DATA = {"name": "markov", "options": {"vocab": 16, "order": 1, "block_size": 64, "num_train": 2000, "num_test": 400,
                                      "seed": 0}}
TEACHER = {"name": "causal_lm", "options": {"layers": 2, "width": 64, "heads": 2},
           "train": {"steps": 1500, "batch_size": 32, "seed": 0, "optim": {"name": "adam", "lr": 0.003}}}
STUDENT = {"name": "causal_lm", "options": {"layers": 1, "width": 32, "heads": 2}}
DIVERGENCES = ["fkl", "rkl", "jsd", "skew_fkl", "skew_rkl", "tvd", "adaptive_kl", "taid"]
METHODS = ["scratch", *DIVERGENCES, "fkl_ce", "ddk_uniform", "ddk"]
HOLDOUT = 0.1  # of the training rows, for DDK's per-domain scores


def run_config(method: str, seed: int, *, steps: int, every: int, cache: str | None) -> dict:
    """The run config of one (method, seed) cell."""
    cfg = {
        "name": f"markov-{method}-s{seed}", "seed": seed,
        "data": json.loads(json.dumps(DATA)),
        "student": STUDENT,
        "teacher": {**TEACHER, **({"cache_dir": cache} if cache else {})},
        "optim": {"name": "adam", "lr": 0.003},
        "train": {"steps": steps, "batch_size": 32, "log_every": 50, "checkpoint_every": steps, "progress": False,
                  "eval_batch_size": 200},
    }
    if method == "scratch":
        cfg["distill"] = {"method": "none"}
    elif method in DIVERGENCES:
        cfg["distill"] = {"method": method}
    else:  # the DDK paper's loss: CE + gamma * KL, gamma = 1
        cfg["distill"] = {"method": "fkl", "ce_weight": 1.0}
    if method in ("ddk", "ddk_uniform"):
        cfg["data"]["holdout_fraction"] = HOLDOUT
        cfg["recipe"] = {"name": "ddk", "options": {"every": every, "alpha": 0.5 if method == "ddk" else 0.0}}
    return cfg


def model_stats(model, chains, test) -> dict:
    """Per domain of the test rows: KL(truth || model), the model's mean next-token entropy and,
    where the truth has exactly two successors (the bimodal domain), the both-modes score
    ``2 min(p1, p2)``, the mass on the two modes ``p1 + p2`` and their balance
    ``2 min(p1, p2) / (p1 + p2)`` (1: equal; 0: all of it on one mode, a collapse)."""
    import torch

    from transfuse.data.text import IGNORE_INDEX

    rows = test.__getitems__(list(range(len(test))))
    ids, domain = rows["input_ids"], rows["domain"]
    with torch.no_grad():
        logits = torch.cat([model.eval()(ids[i: i + 200]) for i in range(0, len(ids), 200)]).float()  # (N, T, V)
    out = {}
    for d, name in enumerate(DOMAIN_NAMES):
        keep = domain == d
        lg, x = logits[keep], ids[keep]
        probs = lg[:, :-1].softmax(-1)  # (n, T-1, V): the predicted positions of full rows
        truth = chains.true_next_token_probs(x, d)[:, :-1]  # (n, T-1, V)
        entry = {"kl": float(chains.kl_to_truth(lg, x, d, rows["labels"][keep] != IGNORE_INDEX)),
                 "entropy": float(-torch.special.xlogy(probs, probs).sum(-1).mean()),
                 "true_entropy": float(chains.mean_entropy(x, d))}
        two = (truth > 0).sum(-1) == 2  # (n, T-1): positions with exactly two true successors
        if bool(two.any()):
            modes = truth[two].topk(2, dim=-1).indices  # (m, 2)
            p = probs[two].gather(-1, modes)  # (m, 2)
            entry["both_modes"] = float((2 * p.min(-1).values).mean())
            entry["mode_mass"] = float(p.sum(-1).mean())
            entry["mode_balance"] = float((2 * p.min(-1).values / p.sum(-1)).mean())
        out[name] = entry
    return out


def _stats_of(weights: Path, options: dict) -> dict:
    import torch
    from safetensors.torch import load_file

    from transfuse.data.markov import markov
    from transfuse.models import build_model

    splits = markov(**DATA["options"])
    model = build_model("causal_lm", input_shape=splits.input_shape, num_classes=splits.num_classes, **options)
    model.load_state_dict(load_file(str(weights)))
    torch.manual_seed(0)
    return model_stats(model, splits.test.chains, splits.test)


def _one(job: tuple) -> dict:
    cfg_dict, out_dir = job
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    from transfuse.config import config_from_dict
    from transfuse.metrics_log import read_metrics
    from transfuse.run import run

    out = Path(out_dir)
    result_path = out / "bench.json"
    if result_path.is_file():
        result = json.loads(result_path.read_text())
        if "mode_balance" in result["domains"]["bimodal"]:
            return result
    if not (out / "summary.json").is_file():
        if out.exists():  # an interrupted cell: start it again from scratch
            shutil.rmtree(out)
        run(config_from_dict(cfg_dict, source=cfg_dict["name"]), out_dir=out, quiet=True)
    summary = json.loads((out / "summary.json").read_text())
    result = {"summary": summary, "domains": _stats_of(out / "student.safetensors", STUDENT["options"])}
    weights = [r for r in read_metrics(out / "metrics.jsonl") if any(k.startswith("ddk/weight/") for k in r)]
    if weights:
        result["ddk_weights"] = [{"step": r["step"], **{DOMAIN_NAMES[int(k.rsplit("/", 1)[1])]: v for k, v in r.items()
                                                        if k.startswith("ddk/weight/")}} for r in weights]
    tmp = result_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(result_path)
    return result


def mean_std(values: list[float], scale: float = 1.0, digits: int = 3) -> str:
    """``mean ± std`` (sample std; the value alone for one)."""
    values = [v * scale for v in values]
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def tables(results: dict, teacher: dict, seeds: list[int], methods: list[str]) -> str:
    """The markdown report."""
    def cells(method):
        return [results[(method, s)] for s in seeds if (method, s) in results]

    t_sum = teacher["summary"]
    lines = [f"Teacher: causal_lm {TEACHER['options']} ({t_sum['params']:,} parameters), "
             f"{TEACHER['train']['steps']} steps; student causal_lm {STUDENT['options']} "
             f"({next(iter(results.values()))['summary']['student']['params']:,} parameters). "
             f"Seeds {' '.join(map(str, seeds))}; mean ± std.", "",
             "### KL(truth || model) on the test rows (nats per token; lower is better)", "",
             "| method | overall | " + " | ".join(DOMAIN_NAMES) + " | test perplexity | train s |",
             "|---|---:|" + "---:|" * len(DOMAIN_NAMES) + "---:|---:|",
             f"| teacher | {t_sum['kl_to_truth']:.3f} | " + " | ".join(f"{teacher['domains'][d]['kl']:.3f}" for d in DOMAIN_NAMES)
             + f" | {t_sum['perplexity']:.3f} | - |"]
    for m in methods:
        rs = cells(m)
        if not rs:
            continue
        lines.append(f"| {m} | {mean_std([r['summary']['student']['kl_to_truth'] for r in rs])} | "
                     + " | ".join(mean_std([r['domains'][d]['kl'] for r in rs]) for d in DOMAIN_NAMES)
                     + f" | {mean_std([r['summary']['student']['perplexity'] for r in rs])} | "
                     + f"{statistics.mean(r['summary']['train_wall_time_s'] for r in rs):.0f} |")
    lines += ["", "### Next-token entropy per domain (nats) and the bimodal domain's both-modes score", "",
              "On the bimodal domain, with `p1`, `p2` the probabilities of a state's two true successors, averaged "
              "over its positions: both-modes score `2 min(p1, p2)` (1: both at 0.5; 0: one dropped), mass on the "
              "modes `p1 + p2` (1: nothing leaks elsewhere) and balance `2 min(p1, p2) / (p1 + p2)` (1: the mass "
              "split evenly; 0: a collapse onto one mode).", "",
              "| method | " + " | ".join(f"H {d}" for d in DOMAIN_NAMES) + " | both-modes score | mass on modes | balance |",
              "|---|" + "---:|" * (len(DOMAIN_NAMES) + 3),
              "| truth | " + " | ".join(f"{teacher['domains'][d]['true_entropy']:.3f}" for d in DOMAIN_NAMES)
              + " | 1.000 | 1.000 | 1.000 |",
              "| teacher | " + " | ".join(f"{teacher['domains'][d]['entropy']:.3f}" for d in DOMAIN_NAMES)
              + "".join(f" | {teacher['domains']['bimodal'][k]:.3f}" for k in ("both_modes", "mode_mass", "mode_balance"))
              + " |"]
    for m in methods:
        rs = cells(m)
        if rs:
            lines.append(f"| {m} | " + " | ".join(mean_std([r['domains'][d]['entropy'] for r in rs]) for d in DOMAIN_NAMES)
                         + "".join(f" | {mean_std([r['domains']['bimodal'][k] for r in rs])}"
                                   for k in ("both_modes", "mode_mass", "mode_balance")) + " |")
    if cells("ddk") and cells("ddk_uniform"):
        pairs = [(results[("ddk", s)], results[("ddk_uniform", s)]) for s in seeds
                 if ("ddk", s) in results and ("ddk_uniform", s) in results]
        gap = {d: statistics.mean(u["domains"][d]["kl"] - teacher["domains"][d]["kl"] for _, u in pairs) for d in DOMAIN_NAMES}
        hardest = max(gap, key=gap.get)
        lines += ["", "### DDK against its uniform baseline (same loss CE + fkl, same held-out split), paired by seed", "",
                  "KL(truth || student) of `ddk` minus that of `ddk_uniform` (negative: DDK better); the gap is the "
                  "uniform student's KL minus the teacher's; the weights are DDK's last domain weights.", "",
                  "| domain | gap under uniform | Δ KL, ddk − uniform | Δ KL, ddk − fkl_ce | last DDK weight |",
                  "|---|---:|---:|---:|---:|"]
        for d in [*DOMAIN_NAMES, "overall"]:
            def kl(r, d=d):
                return r["summary"]["student"]["kl_to_truth"] if d == "overall" else r["domains"][d]["kl"]
            diffs = [kl(a) - kl(b) for a, b in pairs]
            vs_ce = [kl(results[("ddk", s)]) - kl(results[("fkl_ce", s)]) for s in seeds
                     if ("ddk", s) in results and ("fkl_ce", s) in results]
            w = [a["ddk_weights"][-1][d] for a, _ in pairs] if d != "overall" else []
            label = f"**{d}** (hardest)" if d == hardest else d
            lines.append(f"| {label} | {gap[d]:.3f} | {mean_std(diffs)} | " + (mean_std(vs_ce) if vs_ce else "-")
                         + f" | {mean_std(w) if w else '-'} |" if d != "overall" else
                         f"| {label} | {statistics.mean(gap.values()):.3f} (mean) | {mean_std(diffs)} | "
                         + (mean_std(vs_ce) if vs_ce else "-") + " | - |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated: " + ", ".join(METHODS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=300, help="student optimizer steps (batch 32)")
    p.add_argument("--every", type=int, default=25, help="DDK: steps between domain-weight updates (K)")
    p.add_argument("--jobs", type=int, default=2, help="runs in parallel (one thread each)")
    p.add_argument("--out", default="runs/bench-markov")
    p.add_argument("--cache", default=None, help="trained-teacher cache folder (default: the per-user cache)")
    args = p.parse_args(argv)
    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        p.error(f"unknown method(s) {unknown}; valid: {', '.join(METHODS)}")
    out = Path(args.out)
    t0 = time.perf_counter()

    # The teacher is trained (or found in the cache) once, in this process, before the pool starts.
    warm = run_config("fkl", args.seeds[0], steps=1, every=args.every, cache=args.cache)
    warm_dir = out / "_teacher-warmup"
    if not (warm_dir / "summary.json").is_file():
        shutil.rmtree(warm_dir, ignore_errors=True)
        _one((warm, str(warm_dir)))
    from transfuse.build import teacher_weights_path
    from transfuse.config import config_from_dict

    teacher = {"summary": json.loads((warm_dir / "summary.json").read_text())["teacher"],
               "domains": _stats_of(teacher_weights_path(config_from_dict(warm), "teacher"), TEACHER["options"])}

    cells = [((m, s), (run_config(m, s, steps=args.steps, every=args.every, cache=args.cache), str(out / f"{m}-s{s}")))
             for s in args.seeds for m in methods]
    results = {}
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        futures = {pool.submit(_one, job): key for key, job in cells}
        for i, fut in enumerate(as_completed(futures), 1):
            key, result = futures[fut], fut.result()
            results[key] = result
            print(f"[{i}/{len(cells)}] {key[0]:>11} seed {key[1]}: KL to truth "
                  f"{result['summary']['student']['kl_to_truth']:.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    (out / "results.json").write_text(json.dumps({"args": vars(args), "teacher": teacher,
                                                  "runs": [{"method": m, "seed": s, **r} for (m, s), r in sorted(results.items())]},
                                                 indent=1))
    md = tables(results, teacher, args.seeds, methods) + f"\n\nTotal wall time {time.perf_counter() - t0:.0f} s.\n"
    (out / "results.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
