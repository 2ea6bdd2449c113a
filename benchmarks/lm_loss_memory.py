"""Peak memory of a token divergence's forward and backward: the plain path against the chunked one.

    python benchmarks/lm_loss_memory.py                      # V = 32,000, 2,048 positions, fkl and jsd
    python benchmarks/lm_loss_memory.py --vocab 50257 --positions 4096 --chunk 512

Each measurement runs in a fresh process (one thread) with synthetic hidden states,
``lm_head`` and teacher logits: the growth of the process's peak resident memory from
just before the loss to just after its backward pass. ``plain`` materialises the
student's ``(positions, V)`` logits and the loss's intermediates;
``chunked`` is :func:`transfuse.functional.chunked_divergence` (the ``lm_head`` fused,
``--chunk`` positions at a time). The teacher's logits exist on both sides (they are an
input). Repetitions are interleaved (plain, chunked, plain, ...); median [min-max] in MiB.
Both sides run with glibc's mmap threshold fixed at 64 KiB (``MALLOC_MMAP_THRESHOLD_``):
with the default, dynamic threshold, freed 30 MB blocks are kept in the heap and the peak
of the chunked path depends on allocation order rather than on what is alive.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys


def measure(kind: str, divergence: str, vocab: int, positions: int, hidden: int, chunk: int) -> float:
    """One measurement, in this process: MiB of peak-RSS growth across the loss's forward and backward."""
    import resource

    import torch

    from transfuse.functional import DIVERGENCES, chunked_divergence

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    h = torch.randn(positions, hidden, generator=g, requires_grad=True)
    head = (torch.randn(vocab, hidden, generator=g) / hidden**0.5).requires_grad_()
    teacher = torch.randn(positions, vocab, generator=g)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    if kind == "plain":
        loss = DIVERGENCES[divergence](torch.nn.functional.linear(h, head), teacher)
    else:
        loss = chunked_divergence(h, head, teacher, divergence=divergence, chunk_size=chunk)
    loss.backward()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (after - before) / 1024


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--positions", type=int, default=2048)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--chunk", type=int, default=256)
    p.add_argument("--divergences", default="fkl,jsd")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--one", nargs=2, metavar=("KIND", "DIVERGENCE"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(measure(args.one[0], args.one[1], args.vocab, args.positions, args.hidden, args.chunk)))
        return 0
    print(f"V = {args.vocab}, {args.positions} positions, hidden {args.hidden}, chunk {args.chunk}; "
          f"{args.repeats} interleaved repetitions, fresh process each")
    print("| divergence | plain MiB | chunked MiB | chunked / plain |\n|---|---:|---:|---:|")
    for divergence in args.divergences.split(","):
        runs: dict[str, list[float]] = {"plain": [], "chunked": []}
        for _ in range(args.repeats):
            for kind in ("plain", "chunked"):
                cmd = [sys.executable, __file__, "--one", kind, divergence, "--vocab", str(args.vocab),
                       "--positions", str(args.positions), "--hidden", str(args.hidden), "--chunk", str(args.chunk)]
                env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
                runs[kind].append(json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True,
                                                            env=env).stdout))

        def fmt(v: list[float]) -> str:
            return f"{statistics.median(v):.0f} [{min(v):.0f}-{max(v):.0f}]"

        ratio = statistics.median(runs["chunked"]) / statistics.median(runs["plain"])
        print(f"| {divergence} | {fmt(runs['plain'])} | {fmt(runs['chunked'])} | {ratio:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
