"""The ``transfuse`` command line: a thin layer over the Python API."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

EXAMPLES = """\
examples:
  transfuse demo                                  # teacher -> student on digits, scratch vs KD vs DKD
  transfuse run configs/digits/kd.yaml            # one run from a YAML config
  transfuse run configs/digits/kd.yaml --set train.steps=200 --set distill.options.temperature=2
  transfuse run configs/digits/kd.yaml --out runs/kd1 --resume   # continue after an interruption
  transfuse methods --json                        # every registered method with its paper
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="transfuse", description="Knowledge distillation: move what a teacher model knows into a student.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="store_true", help="print the version and exit")
    p.add_argument("--debug", action="store_true", help="show full tracebacks instead of one-paragraph errors")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    r = sub.add_parser("run", help="train a student from a YAML config", epilog=EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("config", help="path to a YAML run config")
    r.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set train.steps=200 (repeatable; the value is parsed as YAML)")
    r.add_argument("--out", help="run directory (default: runs/<name>)")
    r.add_argument("--resume", action="store_true", help="continue the run in --out from its newest checkpoint")
    r.add_argument("--quiet", action="store_true", help="no progress bars")

    d = sub.add_parser("demo", help="the embedded demo: scratch vs KD vs DKD on digits (under 3 minutes on 2 cores)")
    d.add_argument("--out", default="runs/demo", help="demo folder (replaced on each run; default: runs/demo)")
    d.add_argument("--cache-dir", help="where the trained teacher is cached (default: .cache/transfuse/teachers)")
    d.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field of the demo config")
    d.add_argument("--quiet", action="store_true", help="no progress bars")

    m = sub.add_parser("methods", help="list the registered distillation methods")
    m.add_argument("--json", action="store_true", help="machine-readable output")
    return p


def methods_table() -> list[dict[str, object]]:
    """Every registered method: name, kind, paper, one-line description, default weights."""
    from .losses import LOSSES

    return [
        {"name": e.name, "kind": e.meta["kind"], "paper": e.meta["paper"], "description": e.summary,
         "inputs": e.meta["inputs"], "weight": e.meta["weight"], "ce_weight": e.meta["ce_weight"]}
        for e in LOSSES.entries()
    ]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    args = _parser().parse_args(argv)
    if args.version:
        from . import __version__

        print(f"transfuse {__version__}")
        return 0
    if args.command is None:
        _parser().print_help()
        return 2
    try:
        return _dispatch(args)
    except KeyboardInterrupt:
        print("transfuse: interrupted; `transfuse run ... --resume` continues from the last checkpoint", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - turned into one paragraph unless --debug
        if args.debug or not _is_user_error(err):
            raise
        print(f"transfuse: error: {err}", file=sys.stderr)
        return 2


def _is_user_error(err: Exception) -> bool:
    from .checkpoint import CheckpointError
    from .config import ConfigError
    from .distiller import DistillShapeError, MissingBatchKeyError
    from .engine import NonFiniteLossError
    from .registry import UnknownNameError
    from .run import RunDirError
    from .taps import TapError

    return isinstance(err, (ConfigError, CheckpointError, UnknownNameError, RunDirError, NonFiniteLossError, DistillShapeError,
                            MissingBatchKeyError, TapError, FileNotFoundError, FileExistsError, ImportError, ValueError))


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "methods":
        rows = methods_table()
        if args.json:
            print(json.dumps(rows, indent=2))
        else:
            width = max(len(r["name"]) for r in rows)
            for r in rows:
                print(f"{r['name']:<{width}}  {r['kind']:<9} {r['description']}\n{'':<{width}}  {'':<9} {r['paper']}")
        return 0
    if args.command == "run":
        from .config import load_config
        from .run import run

        cfg = load_config(args.config, args.overrides)
        summary = run(cfg, out_dir=args.out, resume=args.resume, quiet=args.quiet)
        if summary:
            print(json.dumps({k: summary[k] for k in ("name", "student", "teacher", "agreement", "steps", "wall_time_s")}, indent=2))
        return 0
    if args.command == "demo":
        from .demo import format_table, run_demo

        summaries = run_demo(out_dir=args.out, cache_dir=args.cache_dir, overrides=args.overrides, quiet=args.quiet)
        print(format_table(summaries))
        print(f"\nrun folders and results.md are in {args.out}/")
        return 0
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
