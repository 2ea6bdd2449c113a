"""KD from the teacher-output cache against KD with the live teacher (and the student
trained from labels alone): time per run, interleaved.

    python benchmarks/cache_speed.py                   # Fashion-MNIST low-label KD, 300 steps, 3 pairs
    python benchmarks/cache_speed.py --steps 1500 --pairs 5

Both sides train the same student on the same data with the same seed (so their final
weights are bit-identical, which the script checks); they differ only in where the
teacher's logits come from. The labels-only run is the cost of the student alone. Runs
alternate (live, cached, labels only, live, cached, ...), each in a
fresh process with one thread and the same allocator, and the script reports the
training wall time of each side as median [min-max] and the ratio of medians. The
teacher and its cache are made once, before any timed run.

Needs the Debian package ``dataset-fashion-mnist`` (or ``--root``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from fashion_mnist import run_config  # noqa: E402  (one definition of the benchmark's configs)


def _timed_run(cfg: dict, out: Path) -> dict:
    """One run in a fresh single-threaded process; returns its summary."""
    code = (
        "import json, sys, torch; torch.set_num_threads(1);"
        "from transfuse.config import config_from_dict; from transfuse.run import run;"
        "cfg = json.loads(sys.argv[1]); run(config_from_dict(cfg), out_dir=sys.argv[2], quiet=True)"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-c", code, json.dumps(cfg), str(out)], check=True, env=env)
    return json.loads((out / "summary.json").read_text())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--pairs", type=int, default=3, help="rounds of (live, cached, labels only)")
    p.add_argument("--root", default=None, help="folder with the Fashion-MNIST IDX files")
    p.add_argument("--cache", default=".cache/transfuse/teachers", help="trained-teacher cache (shared with fashion_mnist.py)")
    p.add_argument("--out", default=None, help="work folder (default: a temporary one)")
    args = p.parse_args(argv)

    from safetensors.torch import load_file

    from transfuse.cache_teacher import cache_teacher
    from transfuse.config import config_from_dict

    work = Path(args.out or tempfile.mkdtemp(prefix="cache-speed-"))
    outputs = work / "teacher-outputs"
    live_cfg = run_config("lowlabel", "kd", 0, steps=args.steps, root=args.root, cache=args.cache)
    cached_cfg = run_config("lowlabel", "kd_cached", 0, steps=args.steps, root=args.root, cache=args.cache, outputs=str(outputs))
    alone_cfg = run_config("lowlabel", "none", 0, steps=args.steps, root=args.root, cache=args.cache)
    _timed_run({**live_cfg, "train": {**live_cfg["train"], "steps": 1}}, work / "warm")  # trains the teacher if needed
    if not outputs.is_dir():
        import torch

        # Convolutions round differently with another thread count: write the cache with
        # the one thread the timed runs use, so that both sides see the same logits.
        torch.set_num_threads(1)
        cache_teacher(config_from_dict(live_cfg), outputs, quiet=True)

    times: dict[str, list[float]] = {"live": [], "cached": [], "labels": []}
    for i in range(args.pairs):
        for side, cfg in (("live", live_cfg), ("cached", cached_cfg), ("labels", alone_cfg)):
            summary = _timed_run(cfg, work / f"{side}-{i}")
            times[side].append(summary["train_wall_time_s"])
            print(f"pair {i} {side:>6}: {summary['train_wall_time_s']:.2f} s, accuracy {100 * summary['student']['accuracy']:.2f} %",
                  flush=True)
    a, b = load_file(work / "live-0" / "student.safetensors"), load_file(work / "cached-0" / "student.safetensors")
    identical = all((a[k] == b[k]).all() for k in a)

    def fmt(values: list[float]) -> str:
        return f"{statistics.median(values):.2f} s [{min(values):.2f}-{max(values):.2f}]"

    ratio = statistics.median(times["live"]) / statistics.median(times["cached"])
    print(f"\nKD, Fashion-MNIST, 2,000 labels, {args.steps} steps of batch 128, one thread, {args.pairs} interleaved pairs")
    print(f"live teacher:  {fmt(times['live'])}")
    print(f"teacher cache: {fmt(times['cached'])}")
    print(f"labels only:   {fmt(times['labels'])}")
    alone = statistics.median(times["cached"]) / statistics.median(times["labels"])
    print(f"live / cached: {ratio:.1f}x; cached / labels only: {alone:.2f}x; final student weights bit-identical: {identical}")
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
