"""Teacher-output cache for a causal LM: size on disk and step time, dense against top-k, against a live teacher.

    OMP_NUM_THREADS=1 python benchmarks/lm_topk_cache.py                    # 400k characters, 3 seeds, 60 steps
    OMP_NUM_THREADS=1 python benchmarks/lm_topk_cache.py --max-chars 0      # the whole training split

Shakespeare rows (character tokenizer, its default: V = 82), block 128. The teacher is a
GPT-2-shaped ``causal_lm`` (4 layers, width 128), trained first from the labels for
``--teacher-steps`` steps (cached in the per-run folder, like any run's teacher); the
student has 2 layers, width 64. The teacher is cached four ways with
``transfuse.cache_teacher``: dense float32, and top-k with k = 16 and 64 (float32 and
float16 log-probabilities). Then ``transfuse.run`` trains the student with ``fkl`` for
``--steps`` steps (batch 16, AdamW) from the live teacher and from each cache, over
``--seeds`` seeds. Reported: the cache's bytes on disk (and per row), the time to write
it, the steady-state step time (the ``time_s`` of the last logged row minus that of the
first, over the steps between them), the final logged training loss (for a top-k cache:
the divergence over the K + 1 buckets, smaller than the full one by construction), and
the student's test perplexity, the comparable measure of what each run learned.
Everything runs in ``runs/lm_topk_cache/`` (deleted first).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

import torch


def _config(root: Path, *, args, seed: int, cache: str | None = None) -> dict:
    data = {"block_size": 128}
    if args.max_chars:
        data["max_chars"] = args.max_chars
    return {
        "name": "lm-topk-cache", "seed": seed,
        "data": {"name": "shakespeare", "options": data},
        "student": {"name": "causal_lm", "options": {"layers": 2, "width": 64, "heads": 2}},
        "teacher": {"name": "causal_lm", "options": {"layers": 4, "width": 128, "heads": 4},
                    "train": {"steps": args.teacher_steps, "batch_size": 16, "optim": {"name": "adamw", "lr": 0.003}},
                    "cache_dir": str(root / "teachers"), "cache": cache},
        "distill": {"method": "fkl"},
        "optim": {"name": "adamw", "lr": 0.001},
        "train": {"steps": args.steps, "batch_size": 16, "eval_batch_size": 64, "log_every": 10,
                  "checkpoint_every": args.steps, "progress": False},
        "fabric": {"accelerator": "cpu"},
    }


def _bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-chars", type=int, default=400_000, help="characters per split (0: all)")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--teacher-steps", type=int, default=150)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", default="runs/lm_topk_cache")
    args = parser.parse_args()
    torch.set_num_threads(1)

    from transfuse.build import load_splits, make_fabric
    from transfuse.cache_teacher import cache_teacher
    from transfuse.config import config_from_dict
    from transfuse.run import obtain_teacher_weights, run

    root = Path(args.out)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    base = config_from_dict(_config(root, args=args, seed=0))
    start = time.perf_counter()
    obtain_teacher_weights(base, "teacher", load_splits(base.data), make_fabric(base.fabric), quiet=True)
    print(f"teacher trained in {time.perf_counter() - start:.1f} s", flush=True)
    caches: dict[str, dict] = {}
    for name, topk, dtype in (("dense fp32", None, "float32"), ("top-16 fp32", 16, "float32"),
                              ("top-64 fp32", 64, "float32"), ("top-16 fp16", 16, "float16"),
                              ("top-64 fp16", 64, "float16")):
        folder = root / "cache" / name.replace(" ", "-")
        start = time.perf_counter()
        report = cache_teacher(base, folder, topk=topk, dtype=dtype, quiet=True)
        seconds = time.perf_counter() - start
        caches[name] = {"folder": folder, "bytes": _bytes(folder), "rows": report["samples"], "write_s": seconds}
        print(f"{name}: {caches[name]['bytes'] / 1e6:.2f} MB for {report['samples']} rows ({seconds:.1f} s)", flush=True)

    results: dict[str, dict[str, list[float]]] = {}
    settings = [("live teacher", None), *((name, str(c["folder"])) for name, c in caches.items())]
    for seed in range(args.seeds):
        for name, cache in settings:  # interleaved, so load drift hits every setting alike
            out = root / "runs" / f"{name.replace(' ', '-')}-s{seed}"
            summary = run(config_from_dict(_config(root, args=args, seed=seed, cache=cache)), out_dir=out, quiet=True)
            rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
            rows = [r for r in rows if "loss" in r]
            step_s = (rows[-1]["time_s"] - rows[0]["time_s"]) / (rows[-1]["step"] - rows[0]["step"])
            entry = results.setdefault(name, {"step_ms": [], "loss": [], "ppl": []})
            entry["step_ms"].append(1000 * step_s)
            entry["loss"].append(rows[-1]["loss"])
            entry["ppl"].append(summary["student"]["perplexity"])
            print(f"seed {seed} {name}: {1000 * step_s:.1f} ms/step, final loss {rows[-1]['loss']:.4f}, "
                  f"student test perplexity {entry['ppl'][-1]:.3f}", flush=True)

    def ms(values):
        return f"{statistics.mean(values):.4g} ± {statistics.stdev(values) if len(values) > 1 else 0.0:.2g}"

    live = statistics.mean(results["live teacher"]["step_ms"])
    lines = ["| teacher | cache on disk (MB) | bytes per row | write (s) | step (ms) | vs live | final train loss | "
             "student test ppl |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, _ in settings:
        r, c = results[name], caches.get(name)
        size = "-" if c is None else f"{c['bytes'] / 1e6:.2f}"
        per_row = "-" if c is None else f"{c['bytes'] / c['rows']:.0f}"
        write = "-" if c is None else f"{c['write_s']:.1f}"
        lines.append(f"| {name} | {size} | {per_row} | {write} | {ms(r['step_ms'])} | "
                     f"{statistics.mean(r['step_ms']) / live:.2f} | {ms(r['loss'])} | {ms(r['ppl'])} |")
    table = "\n".join(lines)
    print(table)
    (root / "results.md").write_text(table + "\n")
    (root / "results.json").write_text(json.dumps({"caches": {k: {**v, "folder": str(v["folder"])} for k, v in caches.items()},
                                                   "runs": results, "args": vars(args)}, indent=2))


if __name__ == "__main__":
    main()
