"""Time of a causal-LM distillation step: transfuse's engine against a hand-written loop, and
the cost of an on-policy step against an off-policy one.

    python benchmarks/lm_step_cost.py                          # 9 interleaved rounds of 30 timed steps
    python benchmarks/lm_step_cost.py --rounds 11 --steps 60 --block 256
    python benchmarks/lm_step_cost.py --mode on-policy         # on-policy steps relative to off-policy ones
    python benchmarks/lm_step_cost.py --allocator default      # glibc's dynamic allocator thresholds

Every run trains the same student (GPT-2 shape, 2 layers, width 64) from the same frozen
teacher (4 layers, width 128) on the same Shakespeare character rows (batch 16), with
AdamW (lr 1e-3, no weight decay) and the generalised JSD (beta 0.5) over the predicted
positions.

``--mode engine`` (default) compares

* ``transfuse``: ``transfuse.fit`` with a ``Distiller`` (teacher frozen, one ``jsd`` term):
  its data order and DataLoader, per-step learning rate, non-finite guard (one host sync),
  metrics and checkpoint;
* ``hand``: a plain PyTorch loop -- teacher forward under ``no_grad``, student forward,
  :func:`transfuse.functional.jsd` with the predicted-position mask, backward, step.

Only steps are timed, at the same point on both sides: each side runs ``--steps + 1``
steps and the clock runs from the moment step 1's batch is ready to the moment step
``--steps + 1``'s batch is ready. Setting up (Fabric, the DataLoader, the metrics file)
and the final checkpoint, which the hand loop does not do, are one-off costs outside the
steps; they are reported separately (``whole call``: ``fit`` from call to return against
the hand loop's whole loop). Each round measures wall-clock time and this process's CPU
time (``time.process_time``, one thread: robust to other processes on a shared machine);
the sides alternate which goes first (ABBA) so that drift cancels. The result is the
median [min-max] over rounds of ``time(transfuse) / time(hand)`` of the same round
(goal: <= 1.05).

The allocator: with glibc's default, dynamic mmap and trim thresholds, how often a step's
activations are returned to the system and faulted back in (zeroed page by page) depends
on the order of earlier allocations, not on the work done; one side can pay thousands of
extra page faults per step for it (measured here: 6,000-15,000 per transfuse step against
1,600-3,500 per hand-written step, about 10 % of a step). By default the script therefore
re-runs itself with both thresholds fixed (``MALLOC_MMAP_THRESHOLD_`` 32 MiB,
``MALLOC_TRIM_THRESHOLD_`` 4 GiB: freed memory stays in the process), as
benchmarks/lm_loss_memory.py fixes its mmap threshold; ``--allocator default`` keeps
glibc's behaviour.

``--mode on-policy`` runs ``fit`` four ways on the same rows, in rotating order each round:
off-policy ``jsd`` (the reference), the ``on_policy`` transform (GKD: the student continues
each row after ``--prompt`` tokens, sampled at temperature 1, with its key/value cache)
with ``lmbda`` 0.5 and 1.0 and ``jsd``, and ``on_policy`` (``lmbda`` 1.0) with
``sampled_rkl`` (MiniLLM-style reverse KL at the sampled tokens). It reports each one's
step time relative to the off-policy step of the same round, and the time of generation
alone (:func:`transfuse.on_policy.sample_continuations`) with and without the cache.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

#: glibc allocator thresholds of ``--allocator steady``: blocks up to 32 MiB come from the
#: heap, and freed memory is not returned to the system below 4 GiB.
STEADY_MMAP, STEADY_TRIM = 32 * 1024 * 1024, 4 * 1024 ** 3


def _setup(block: int, seed: int = 0):
    from transfuse.data import load_dataset
    from transfuse.models import build_model

    splits = load_dataset("shakespeare", block_size=block, max_chars=400_000)
    vocab = splits.num_classes
    torch.manual_seed(seed)
    teacher = build_model("causal_lm", input_shape=(block,), num_classes=vocab, layers=4, width=128, heads=4).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    student = build_model("causal_lm", input_shape=(block,), num_classes=vocab, layers=2, width=64, heads=2)
    return splits.train, teacher, student


class _Clock:
    """Wall-clock and CPU time stamps, taken when a step's batch is ready."""

    def __init__(self) -> None:
        self.wall: list[float] = []
        self.cpu: list[float] = []

    def __call__(self, batch=None, **_):  # also a batch transform: the stamp of a step of fit
        self.wall.append(time.perf_counter())
        self.cpu.append(time.process_time())
        return batch

    def span(self, first: int, last: int) -> tuple[float, float]:
        """Seconds (wall, cpu) from stamp ``first`` to stamp ``last``."""
        return self.wall[last] - self.wall[first], self.cpu[last] - self.cpu[first]


def run_transfuse(rows, teacher, student, *, steps: int, batch: int, loss: str = "jsd", transforms=(),
                  seed: int = 0) -> dict[str, tuple[float, float]]:
    """``steps + 1`` steps of ``fit``: ``{"steps": (wall, cpu) of ``steps`` steps, "whole": the call's}``."""
    from lightning_fabric import Fabric

    from transfuse import Distiller, FitSettings, Participant, Term, fit
    from transfuse.losses import LOSSES
    from transfuse.optim import make_optimizer

    distiller = Distiller([Participant("student", student), Participant("teacher", teacher, trainable=False)],
                          [Term(name=loss, loss=LOSSES.get(loss).build(), input="student.logits",
                                target="teacher.logits")])
    optimizer = make_optimizer(distiller.parameters(), name="adamw", lr=1e-3)
    total = steps + 1
    settings = FitSettings(steps=total, batch_size=batch, seed=seed, log_every=total, checkpoint_every=total,
                           progress=False)
    clock = _Clock()
    with tempfile.TemporaryDirectory() as folder:
        start = _Clock()
        start()
        # The stamp first: an on-policy step's generation is part of the step.
        fit(Fabric(accelerator="cpu", devices=1), distiller, optimizer, rows, settings, run_dir=Path(folder),
            transforms=[clock, *transforms])
        start()
    return {"steps": clock.span(0, steps), "whole": start.span(0, 1)}


def run_hand(rows, teacher, student, *, steps: int, batch: int) -> dict[str, tuple[float, float]]:
    """The same as :func:`run_transfuse`, written by hand."""
    from transfuse.functional import jsd

    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    clock, start = _Clock(), _Clock()
    start()
    student.train()
    for _ in range(steps + 1):
        idx = torch.randint(len(rows), (batch,), generator=g).tolist()
        b = rows.__getitems__(idx)
        clock()
        inputs = {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}
        with torch.no_grad():
            t = teacher(inputs)
        s = student(inputs)
        loss = jsd(s, t, mask=b["predicted"])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    start()
    return {"steps": clock.span(0, steps), "whole": start.span(0, 1)}


def _summary(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} [{min(values):.3f}-{max(values):.3f}]"


def engine_mode(args) -> None:
    rows, teacher, student = _setup(args.block)
    run_transfuse(rows, teacher, student, steps=3, batch=args.batch)  # warm-up of both paths
    run_hand(rows, teacher, student, steps=3, batch=args.batch)
    ratios: dict[str, list[float]] = {"steps wall": [], "steps cpu": [], "whole wall": [], "whole cpu": []}
    ms: dict[str, list[float]] = {"transfuse wall": [], "hand wall": [], "transfuse cpu": [], "hand cpu": []}
    for r in range(args.rounds):
        order = ["transfuse", "hand"] if r % 2 == 0 else ["hand", "transfuse"]
        got = {}
        for side in order:
            fn = run_transfuse if side == "transfuse" else run_hand
            got[side] = fn(rows, teacher, student, steps=args.steps, batch=args.batch)
        for part in ("steps", "whole"):
            for i, clock in enumerate(("wall", "cpu")):
                ratios[f"{part} {clock}"].append(got["transfuse"][part][i] / got["hand"][part][i])
        for side in ("transfuse", "hand"):
            for i, clock in enumerate(("wall", "cpu")):
                ms[f"{side} {clock}"].append(1000 * got[side]["steps"][i] / args.steps)
        print(f"round {r + 1}/{args.rounds} ({order[0]} first): steps ratio wall {ratios['steps wall'][-1]:.3f} "
              f"cpu {ratios['steps cpu'][-1]:.3f}; transfuse {ms['transfuse wall'][-1]:.1f} ms/step, "
              f"hand {ms['hand wall'][-1]:.1f} ms/step (wall)", flush=True)
    print(f"\ntransfuse / hand over {args.rounds} rounds of {args.steps} timed steps "
          f"(batch {args.batch} x {args.block} tokens, one thread): median [min-max]")
    for key, values in ratios.items():
        print(f"  {key:<11} {_summary(values)}")
    for key, values in ms.items():
        print(f"  ms/step {key:<15} {statistics.median(values):.1f}")


def on_policy_mode(args) -> None:
    from transfuse.on_policy import OnPolicy, sample_continuations

    rows, teacher, student = _setup(args.block)
    variants = {
        "off-policy jsd": ("jsd", []),
        "on_policy lmbda 0.5 + jsd": ("jsd", [OnPolicy(lmbda=0.5, prompt_tokens=args.prompt)]),
        "on_policy lmbda 1.0 + jsd": ("jsd", [OnPolicy(lmbda=1.0, prompt_tokens=args.prompt)]),
        "on_policy lmbda 1.0 + sampled_rkl": ("sampled_rkl", [OnPolicy(lmbda=1.0, prompt_tokens=args.prompt)]),
    }
    names = list(variants)
    for name in names:  # warm-up
        loss, transforms = variants[name]
        run_transfuse(rows, teacher, student, steps=2, batch=args.batch, loss=loss, transforms=transforms)
    times: dict[str, list[float]] = {n: [] for n in names}
    ratios: dict[str, list[float]] = {n: [] for n in names[1:]}
    batch = rows.__getitems__(list(range(args.batch)))
    prompts = torch.full((args.batch,), args.prompt)
    generation: dict[str, list[float]] = {"with cache": [], "without cache": []}
    for r in range(args.rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        got = {}
        for name in order:
            loss, transforms = variants[name]
            got[name] = run_transfuse(rows, teacher, student, steps=args.steps, batch=args.batch, loss=loss,
                                      transforms=transforms, seed=r)["steps"][args.clock == "cpu"]
            times[name].append(1000 * got[name] / args.steps)
        for name in names[1:]:
            ratios[name].append(got[name] / got[names[0]])
        for label, use_cache in (("with cache", True), ("without cache", False)) if r % 2 == 0 else (
                ("without cache", False), ("with cache", True)):
            clock = _Clock()
            clock()
            sample_continuations(student.eval(), batch["input_ids"], prompts, temperature=1.0, use_cache=use_cache)
            clock()
            generation[label].append(1000 * clock.span(0, 1)[args.clock == "cpu"])
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{n} {ratios[n][-1]:.2f}x" for n in names[1:]), flush=True)
    print(f"\nstep time relative to an off-policy jsd step, {args.rounds} rounds of {args.steps} timed steps "
          f"(batch {args.batch} x {args.block} tokens, prompts of {args.prompt}, {args.clock} time, one thread): "
          "median [min-max]")
    print(f"  {'off-policy jsd':<34} 1.000 ({statistics.median(times[names[0]]):.0f} ms/step)")
    for name in names[1:]:
        print(f"  {name:<34} {_summary(ratios[name])} ({statistics.median(times[name]):.0f} ms/step)")
    g = {k: statistics.median(v) for k, v in generation.items()}
    print(f"generation alone ({args.batch} rows, {args.block - args.prompt} new tokens each): with the key/value "
          f"cache {g['with cache']:.0f} ms, without {g['without cache']:.0f} ms "
          f"({g['without cache'] / g['with cache']:.1f}x)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=("engine", "on-policy"), default="engine")
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--steps", type=int, default=30, help="timed steps per run (on-policy mode: 6 to 8 are plenty)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--block", type=int, default=128)
    p.add_argument("--prompt", type=int, default=32, help="on-policy mode: tokens of each row kept as the prompt")
    p.add_argument("--clock", choices=("wall", "cpu"), default="cpu", help="on-policy mode: which time to compare")
    p.add_argument("--allocator", choices=("steady", "default"), default="steady",
                   help="steady: glibc's mmap/trim thresholds fixed (see above); default: glibc's dynamic ones")
    args = p.parse_args(argv)
    if args.allocator == "steady" and argv is None and os.environ.get("MALLOC_TRIM_THRESHOLD_") is None:
        # The thresholds are read once, when the process starts: run again with them set.
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(STEADY_MMAP), "MALLOC_TRIM_THRESHOLD_": str(STEADY_TRIM)}
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    torch.set_num_threads(1)
    if args.mode == "engine":
        engine_mode(args)
    else:
        on_policy_mode(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
