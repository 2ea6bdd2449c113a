"""Language-model distillation on Shakespeare: every divergence and scheme, several seeds.

    python benchmarks/shakespeare.py                           # all methods, seeds 0 1 2, 2 jobs
    python benchmarks/shakespeare.py --methods scratch,fkl,taid --seeds 0 --jobs 1

A byte-level BPE tokenizer (``--vocab`` tokens) is trained on the training plays and saved
beside the runs; a GPT-2-shaped teacher is trained once from the data (cached, every
cell reuses it), its top-k outputs are cached (k = 16 and 64) and its generations are
stored once for sequence-level KD. Then, per method and seed, the same student (about
1/6 of the teacher's non-embedding parameters) is trained for the same number of steps
from the same initialisation; ``scratch`` learns the next token from the text alone (the
baseline, measured in the same command). The held-out plays (Macbeth, Twelfth Night)
give perplexity. Results: ``<out>/results.json`` and the markdown table
``<out>/results.md``, mean ± std over seeds, Δ paired by seed. Interrupted? Run the same
command again: finished cells are kept.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fashion_mnist import _one, mean_std  # noqa: E402  (one cell runner for every benchmark)

TEACHER = {"name": "causal_lm", "options": {"layers": 4, "width": 192, "heads": 4},
           "train": {"steps": 1000, "batch_size": 32, "seed": 0, "optim": {"name": "adamw", "lr": 0.002}}}
STUDENT = {"name": "causal_lm", "options": {"layers": 2, "width": 96, "heads": 2}}

#: method -> (distill section, extra config). Each divergence at its registry defaults
#: (temperature 1, no T^2, no cross-entropy on the text), so the rows differ in the loss alone.
METHODS: dict[str, tuple[dict | None, dict]] = {
    "scratch": ({"method": "none"}, {}),
    "fkl": ({"method": "fkl"}, {}),
    "rkl": ({"method": "rkl"}, {}),
    "jsd": ({"method": "jsd", "options": {"beta": 0.5}}, {}),
    "skew_fkl": ({"method": "skew_fkl", "options": {"alpha": 0.1}}, {}),
    "skew_rkl": ({"method": "skew_rkl", "options": {"alpha": 0.1}}, {}),
    "tvd": ({"method": "tvd"}, {}),
    "adaptive_kl": ({"method": "adaptive_kl"}, {}),
    "taid": ({"method": "taid"}, {}),
    # GKD's mixed setting: half the rows continued by the student, generalised JSD (beta 0.5).
    "gkd": ({"method": "jsd", "options": {"beta": 0.5}},
            {"transforms": [{"name": "on_policy", "options": {"lmbda": 0.5, "prompt_tokens": 16}}]}),
    # On-policy reverse KL at the student's own sampled tokens (k3 estimate).
    "onpolicy_rkl": ({"method": "sampled_rkl"},
                     {"transforms": [{"name": "on_policy", "options": {"lmbda": 1.0, "prompt_tokens": 16}}]}),
    # Sequence-level KD: cross-entropy on the teacher's stored generations (prompt: 16 tokens of real text).
    "seqkd": ({"method": "none"}, {"generations": True}),
    "topk16": ({"method": "fkl"}, {"topk": 16}),
    "topk64": ({"method": "fkl"}, {"topk": 64}),
    # With the cross-entropy on the text beside the divergence: the tail of a top-k teacher
    # says nothing about which tail token comes next; the text does.
    "fkl_ce": ({"method": "fkl", "ce_weight": 1.0}, {}),
    "topk16_ce": ({"method": "fkl", "ce_weight": 1.0}, {"topk": 16}),
    # Warm start: on-policy methods sample from the student, which from random weights writes
    # noise; these rows start from the `scratch` student of the same seed (trained on the
    # text) and train half as many steps more. `warm_scratch` continues it on the text alone.
    "warm_scratch": ({"method": "none"}, {"warm": True}),
    "warm_fkl": ({"method": "fkl"}, {"warm": True}),
    "warm_gkd": ({"method": "jsd", "options": {"beta": 0.5}},
                 {"warm": True, "transforms": [{"name": "on_policy", "options": {"lmbda": 0.5, "prompt_tokens": 16}}]}),
    "warm_onpolicy_rkl": ({"method": "sampled_rkl"},
                          {"warm": True, "transforms": [{"name": "on_policy", "options": {"lmbda": 1.0, "prompt_tokens": 16}}]}),
    "warm_minillm": ({"method": "minillm"},
                     {"warm": True, "transforms": [{"name": "on_policy", "options": {"lmbda": 1.0, "prompt_tokens": 16,
                                                                                     "teacher_mix": 0.2}}]}),
}
WARM = [m for m in METHODS if METHODS[m][1].get("warm")]
PROMPT_TOKENS = 16


def data_section(block: int, tokenizer: str) -> dict:
    """The data set every cell trains on."""
    return {"name": "shakespeare", "options": {"block_size": block, "tokenizer": tokenizer}}


def base_config(name: str, seed: int, *, block: int, tokenizer: str, cache: str, steps: int, teacher_steps: int) -> dict:
    """A run config with the teacher and no distillation settings yet."""
    teacher = {**TEACHER, "train": {**TEACHER["train"], "steps": teacher_steps}, "cache_dir": cache}
    return {
        "name": name, "seed": seed,
        "data": data_section(block, tokenizer),
        "student": STUDENT, "teacher": teacher,
        "optim": {"name": "adamw", "lr": 0.002, "schedule": "cosine", "warmup_steps": steps // 20},
        "train": {"steps": steps, "batch_size": 32, "log_every": 50, "checkpoint_every": steps, "progress": False,
                  "eval_batch_size": 64},
    }


def run_config(method: str, seed: int, *, out: Path, block: int, steps: int, teacher_steps: int) -> dict:
    """The run config of one (method, seed) cell."""
    distill, extra = METHODS[method]
    cfg = base_config(f"{method}-s{seed}", seed, block=block, tokenizer=str(out / "tokenizer"),
                      cache=str(out / "teachers"), steps=steps // 2 if extra.get("warm") else steps,
                      teacher_steps=teacher_steps)
    cfg["distill"] = distill
    if extra.get("warm"):
        cfg["student"] = {**STUDENT, "weights": str(out / f"scratch-s{seed}" / "student.safetensors")}
    if "transforms" in extra:
        cfg["transforms"] = extra["transforms"]
    if extra.get("generations"):
        cfg["data"]["generations"] = str(out / "generations")
    if "topk" in extra:
        cfg["teacher"]["cache"] = str(out / f"topk{extra['topk']}")
    return cfg


def prepare(out: Path, *, vocab: int, block: int, teacher_steps: int, methods: list[str]) -> None:
    """Tokenizer, teacher (trained by the first cache write), top-k caches, generations: once."""
    from transfuse.cli import main as cli
    from transfuse.data.shakespeare import DEFAULT_TEST_PLAYS, read_corpus
    from transfuse.data.tokenizer import save_tokenizer, train_bpe

    out.mkdir(parents=True, exist_ok=True)
    if not (out / "tokenizer" / "tokenizer.json").is_file():
        texts = [text for name, _, text in read_corpus() if name not in DEFAULT_TEST_PLAYS]
        save_tokenizer(train_bpe(texts, vocab_size=vocab), out / "tokenizer")
    cfg_path = out / "teacher-config.json"
    cfg = base_config("prepare", 0, block=block, tokenizer=str(out / "tokenizer"), cache=str(out / "teachers"),
                      steps=1, teacher_steps=teacher_steps)
    cfg["distill"] = {"method": "fkl"}
    cfg_path.write_text(json.dumps(cfg))
    for method in methods:
        extra = METHODS[method][1]
        if "topk" in extra and not (out / f"topk{extra['topk']}").exists():
            _cli(cli, ["cache-teacher", str(cfg_path), "--out", str(out / f"topk{extra['topk']}"),
                       "--topk", str(extra["topk"])])
        if extra.get("generations") and not (out / "generations").exists():
            _cli(cli, ["generate", str(cfg_path), "--out", str(out / "generations"),
                       "--prompt-tokens", str(PROMPT_TOKENS), "--temperature", "1.0"])
    if not any("topk" in METHODS[m][1] or METHODS[m][1].get("generations") for m in methods):
        # No cache or generation step trained the teacher: train it now, once, before the cells run in parallel.
        _one((cfg | {"name": "teacher-only", "train": {**cfg["train"], "steps": 1}}, str(out / "teacher-only")))


def _cli(cli, argv: list[str]) -> None:
    print("$ transfuse " + " ".join(argv), flush=True)
    t0 = time.perf_counter()
    code = cli(argv)
    if code:
        raise SystemExit(f"transfuse {argv[0]} failed ({code})")
    print(f"  done in {time.perf_counter() - t0:.0f} s", flush=True)


def table(results: list[dict], seeds: list[int], *, steps: int) -> str:
    """Markdown: one row per method, perplexity mean ± std over seeds, Δ vs scratch and vs FKL."""
    by = {(r["method"], r["seed"]): r["summary"] for r in results}
    teacher = next((r["summary"]["teacher"] for r in results if r["summary"].get("teacher")), None)
    lines = [
        f"Teacher: causal_lm {TEACHER['options']}, held-out perplexity "
        f"{teacher['perplexity']:.2f}." if teacher else "Teacher: (not evaluated)",
        f"Student: causal_lm {STUDENT['options']}, {steps} steps of 32 rows, seeds {', '.join(map(str, seeds))}.",
        "",
        "| method | perplexity | Δ vs scratch | Δ vs fkl | accuracy % | train s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for method in METHODS:
        cells = [by[(method, s)] for s in seeds if (method, s) in by]
        if not cells:
            continue
        ppl = [c["student"]["perplexity"] for c in cells]
        base, ref = ("warm_scratch", "warm_fkl") if method in WARM else ("scratch", "fkl")
        scratch = [by[(base, s)]["student"]["perplexity"] for s in seeds if (base, s) in by and (method, s) in by]
        fkl = [by[(ref, s)]["student"]["perplexity"] for s in seeds if (ref, s) in by and (method, s) in by]
        d_scratch = [a - b for a, b in zip(ppl, scratch)] if len(scratch) == len(ppl) and method != base else []
        d_fkl = [a - b for a, b in zip(ppl, fkl)] if len(fkl) == len(ppl) and method not in (base, ref) else []
        acc = [100 * c["student"]["accuracy"] for c in cells]
        secs = [c["train_wall_time_s"] for c in cells]
        lines.append(f"| {method} | {mean_std(ppl)} | {mean_std(d_scratch) if d_scratch else '-'} | "
                     f"{mean_std(d_fkl) if d_fkl else '-'} | {mean_std(acc)} | {statistics.mean(secs):.0f} |")
    lines.append("")
    lines.append("Lower perplexity is better; Δ is paired by seed (same initialisation and batches). The `warm_` "
                 f"rows start from the `scratch` student of their seed and train {steps // 2} more steps; their Δ "
                 "columns are against `warm_scratch` and `warm_fkl`.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of: " + ", ".join(METHODS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=300, help="student steps per cell")
    parser.add_argument("--teacher-steps", type=int, default=TEACHER["train"]["steps"])
    parser.add_argument("--block", type=int, default=64, help="tokens per row")
    parser.add_argument("--vocab", type=int, default=1024, help="BPE vocabulary size")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", default="runs/bench-shakespeare")
    args = parser.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"unknown method(s) {', '.join(unknown)}; valid: {', '.join(METHODS)}")
    out = Path(args.out)
    prepare(out, vocab=args.vocab, block=args.block, teacher_steps=args.teacher_steps, methods=methods)
    cells = [((m, s), (run_config(m, s, out=out, block=args.block, steps=args.steps, teacher_steps=args.teacher_steps),
                       str(out / f"{m}-s{s}"))) for s in args.seeds for m in methods]
    results = []
    t0 = time.perf_counter()
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        futures = {pool.submit(_one, job): key for key, job in cells}
        for i, fut in enumerate(as_completed(futures), 1):
            (method, seed), summary = futures[fut], fut.result()
            results.append({"method": method, "seed": seed, "summary": summary})
            print(f"[{i}/{len(cells)}] {method} seed {seed}: perplexity {summary['student']['perplexity']:.2f} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    md = table(results, args.seeds, steps=args.steps)
    (out / "results.md").write_text(md + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
