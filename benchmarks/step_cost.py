"""The cost of one training step of each classic method, relative to a KD step.

    python benchmarks/step_cost.py                       # both students, every method, 7 rounds
    python benchmarks/step_cost.py --settings full --methods crd,rkd --rounds 11

A step is what the engine does per batch: the frozen teacher's forward pass, the
student's, every term of the method's short form (its loss plus the CE term beside it),
``backward`` and one Adam step over everything trainable (the student, FitNets'
regressor, CRD's heads). The models, batch size and data-set size are those of
``benchmarks/fashion_mnist.py``: a CNN teacher (channels [16, 32], hidden 64, flattened
map) and an MLP student 784-128-10 trained on all 60,000 images (``full``, so CRD's
memory banks have 60,000 rows) or a small CNN student on 5,000 labelled images
(``cnn``). The inputs are random tensors of Fashion-MNIST's shape: a step's cost does not
depend on the pixel values, so no data set is needed. Labels and dataset indices are
drawn per step from a fixed random labelling of the training set, as a shuffled epoch
would give them.

Each method is timed against KD in interleaved rounds (KD, method, KD, method, ...),
one thread, after warm-up steps; a round times ``--steps`` consecutive steps of each.
The table gives, per method, the median [min-max] over rounds of the ratio
``time(method step) / time(KD step)`` of the same round, and the median time of a step.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from fashion_mnist import SETTINGS, run_config  # noqa: E402  (one definition of the benchmark's models)

METHODS = ["kd", "dkd", "dist", "fitnet", "at", "sp", "rkd", "pkt", "crd"]
SPATIAL_ONLY = {"at"}  # needs (C, H, W) maps on both sides: CNN students only
INPUT_SHAPE, NUM_CLASSES, TRAIN_SIZE = (1, 28, 28), 10, 60_000


class Step:
    """One method's student, frozen teacher, terms and optimizer, and a ``run(batch)`` step."""

    def __init__(self, setting: str, method: str, *, num_train: int, seed: int = 0) -> None:
        from transfuse.build import make_terms
        from transfuse.config import config_from_dict
        from transfuse.distiller import Distiller
        from transfuse.models import build_model
        from transfuse.participants import Participant

        with tempfile.TemporaryDirectory() as cache:
            cfg = config_from_dict(run_config(setting, method, seed, steps=1000, root=None, cache=cache))
        torch.manual_seed(seed)
        models = {
            role: build_model(p.name, input_shape=INPUT_SHAPE, num_classes=NUM_CLASSES, **p.options)
            for role, p in cfg.participants.items()
        }
        sources = {"student": Participant("student", models["student"]),
                   "teacher": Participant("teacher", models["teacher"], trainable=False)}
        probe = random_batch(torch.Generator().manual_seed(seed), torch.zeros(num_train, dtype=torch.long), 8)
        terms = make_terms(cfg.resolved_terms(), sources, probe, num_train_samples=num_train, total_steps=1000)
        self.distiller = Distiller(list(sources.values()), terms)
        self.distiller.train()
        self.optimizer = torch.optim.Adam([p for p in self.distiller.parameters() if p.requires_grad], lr=1e-3)

    def run(self, batch: dict[str, torch.Tensor], step: int) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.distiller(batch, step)["loss"].backward()
        self.optimizer.step()


def random_batch(gen: torch.Generator, labels: torch.Tensor, batch_size: int) -> dict[str, torch.Tensor]:
    """A batch shaped like Fashion-MNIST's: inputs, labels, dataset indices, sample ids."""
    index = torch.randint(len(labels), (batch_size,), generator=gen)
    return {"input": torch.rand(batch_size, *INPUT_SHAPE, generator=gen), "target": labels[index],
            "index": index, "sample_id": index}


def timed(step: Step, batches: list[dict[str, torch.Tensor]], first: int) -> float:
    """Seconds per step over ``batches``."""
    start = time.perf_counter()
    for i, batch in enumerate(batches):
        step.run(batch, first + i)
    return (time.perf_counter() - start) / len(batches)


def measure(setting: str, methods: list[str], *, rounds: int, steps: int, warmup: int) -> list[dict]:
    student, label_subset = SETTINGS[setting][:2]
    num_train = label_subset or TRAIN_SIZE
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(NUM_CLASSES, (num_train,), generator=gen)
    batch_size = run_config(setting, "kd", 0, steps=1, root=None, cache="unused")["train"]["batch_size"]
    kd = Step(setting, "kd", num_train=num_train)
    rows = []
    for method in methods:
        if method in SPATIAL_ONLY and student["name"] == "mlp":
            continue
        other = Step(setting, method, num_train=num_train)
        done = 0
        for side in (kd, other):  # warm-up: allocator, first-batch estimates (CRD's Z), caches
            timed(side, [random_batch(gen, labels, batch_size) for _ in range(warmup)], 0)
        ratios, t_kd, t_m = [], [], []
        for _ in range(rounds):
            batches = [random_batch(gen, labels, batch_size) for _ in range(steps)]
            a = timed(kd, batches, done)
            b = timed(other, batches, done)
            done += steps
            ratios.append(b / a)
            t_kd.append(a)
            t_m.append(b)
        rows.append({"setting": setting, "method": method, "ratio": ratios,
                     "kd_ms": 1e3 * statistics.median(t_kd), "ms": 1e3 * statistics.median(t_m)})
        print(f"  {setting:>5} {method:>6}: {statistics.median(ratios):.2f}x", file=sys.stderr, flush=True)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| setting | method | step / KD step: median [min-max] | step ms (median) | KD step ms |",
             "|---|---|---:|---:|---:|"]
    for r in rows:
        ratio = r["ratio"]
        lines.append(f"| {r['setting']} | {r['method']} | {statistics.median(ratio):.2f} "
                     f"[{min(ratio):.2f}-{max(ratio):.2f}] | {r['ms']:.1f} | {r['kd_ms']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--settings", default="full,cnn", help="comma-separated, from benchmarks/fashion_mnist.py: full, cnn")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated: " + ", ".join(METHODS))
    p.add_argument("--rounds", type=int, default=7, help="interleaved (KD, method) rounds")
    p.add_argument("--steps", type=int, default=10, help="consecutive steps timed per side and round")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps of each side first")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    methods = args.methods.split(",")
    for m in methods:
        if m not in METHODS:
            p.error(f"unknown method {m!r}; valid: {', '.join(METHODS)}")
    rows = []
    for setting in args.settings.split(","):
        if setting not in SETTINGS:
            p.error(f"unknown setting {setting!r}; valid: {', '.join(SETTINGS)}")
        rows += measure(setting, methods, rounds=args.rounds, steps=args.steps, warmup=args.warmup)
    print(f"torch {torch.__version__}, 1 thread, {args.rounds} rounds of {args.steps} steps per side\n")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
