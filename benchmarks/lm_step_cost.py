"""Time of off-policy JSD distillation of a causal LM: transfuse's engine against a hand-written loop.

    python benchmarks/lm_step_cost.py                     # 7 interleaved rounds of 40 steps
    python benchmarks/lm_step_cost.py --rounds 11 --steps 60 --block 256

Both sides train the same student (GPT-2 shape, 2 layers, width 64) from the same frozen
teacher (4 layers, width 128) on the same Shakespeare character rows (batch 16), with
AdamW and the generalised JSD (beta 0.5) over the predicted positions:

* ``transfuse``: ``transfuse.fit`` with a ``Distiller`` (teacher frozen, one ``jsd`` term),
  its data order, non-finite guard, logging and final checkpoint included;
* ``hand``: a plain PyTorch loop -- teacher forward under ``no_grad``, student forward,
  :func:`transfuse.functional.jsd` with the predicted-position mask, backward, step.

Rounds are interleaved (transfuse, hand, transfuse, ...), one thread, after a warm-up
round; each times ``--steps`` whole steps. The result is the median [min-max] over rounds
of ``time(transfuse) / time(hand)`` of the same round (goal: <= 1.05).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


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


def run_transfuse(rows, teacher, student, *, steps: int, batch: int) -> float:
    from lightning_fabric import Fabric

    from transfuse import Distiller, FitSettings, Participant, Term, fit
    from transfuse.losses import LOSSES
    from transfuse.optim import make_optimizer

    distiller = Distiller([Participant("student", student), Participant("teacher", teacher, trainable=False)],
                          [Term(name="jsd", loss=LOSSES.get("jsd").build(), input="student.logits",
                                target="teacher.logits")])
    optimizer = make_optimizer(distiller.parameters(), name="adamw", lr=1e-3)
    settings = FitSettings(steps=steps, batch_size=batch, seed=0, log_every=steps, checkpoint_every=steps, progress=False)
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        fit(Fabric(accelerator="cpu", devices=1), distiller, optimizer, rows, settings, run_dir=Path(folder))
        return time.perf_counter() - start


def run_hand(rows, teacher, student, *, steps: int, batch: int) -> float:
    from transfuse.functional import jsd

    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    student.train()
    for _ in range(steps):
        idx = torch.randint(len(rows), (batch,), generator=g).tolist()
        b = rows.__getitems__(idx)
        inputs = {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}
        with torch.no_grad():
            t = teacher(inputs)
        s = student(inputs)
        loss = jsd(s, t, mask=b["predicted"])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--block", type=int, default=128)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rows, teacher, student = _setup(args.block)
    run_transfuse(rows, teacher, student, steps=5, batch=args.batch)  # warm-up of both paths
    run_hand(rows, teacher, student, steps=5, batch=args.batch)
    ratios, ours, hands = [], [], []
    for r in range(args.rounds):
        a = run_transfuse(rows, teacher, student, steps=args.steps, batch=args.batch)
        b = run_hand(rows, teacher, student, steps=args.steps, batch=args.batch)
        ours.append(a / args.steps)
        hands.append(b / args.steps)
        ratios.append(a / b)
        print(f"round {r + 1}/{args.rounds}: transfuse {1000 * a / args.steps:.1f} ms/step, "
              f"hand {1000 * b / args.steps:.1f} ms/step, ratio {a / b:.3f}", flush=True)
    print(f"\nratio transfuse / hand: {statistics.median(ratios):.3f} [{min(ratios):.3f}-{max(ratios):.3f}] "
          f"over {args.rounds} rounds of {args.steps} steps; medians {1000 * statistics.median(ours):.1f} and "
          f"{1000 * statistics.median(hands):.1f} ms/step (batch {args.batch} x {args.block} tokens, one thread)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
