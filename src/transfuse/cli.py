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
  transfuse cache-teacher configs/digits/kd.yaml --out runs/kd-cache   # teacher outputs to disk, once
  transfuse run configs/digits/kd.yaml --set teacher.cache=runs/kd-cache  # then train without the teacher
  transfuse generate configs/lm/seqkd.yaml --out runs/lm-seqkd-gen --prompt-tokens 16   # seq-KD: teacher rows, once
  transfuse methods --json                        # every registered method with its paper
  transfuse compare configs/digits/kd.yaml runs/a/student.safetensors runs/b/student.safetensors   # accuracy, ECE, flips
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="transfuse", description="Knowledge distillation: move what a teacher model knows into a student.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="store_true", help="print the version and exit")
    p.add_argument("--debug", action="store_true", help="show full tracebacks instead of one-paragraph errors")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    def common(parser: argparse.ArgumentParser, *, threads: bool = True) -> None:
        # SUPPRESS: a subcommand's own --debug must not reset one given before it.
        parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                            help="show full tracebacks instead of one-paragraph errors")
        if threads:
            parser.add_argument("--threads", type=_non_negative_int, metavar="N",
                                help="CPU threads per process (sets fabric.threads; default 1; 0: one per core)")

    r = sub.add_parser("run", help="train a student from a YAML config", epilog=EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("config", help="path to a YAML run config")
    r.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set train.steps=200 (repeatable; the value is parsed as YAML)")
    r.add_argument("--out", help="run directory (default: runs/<name>)")
    r.add_argument("--resume", action="store_true", help="continue the run in --out from its newest checkpoint")
    r.add_argument("--quiet", action="store_true", help="no progress bars")
    common(r)

    d = sub.add_parser("demo", help="the embedded demo: scratch vs KD vs DKD on digits (under 3 minutes on 2 cores)")
    d.add_argument("--out", default="runs/demo", help="demo folder (replaced on each run; default: runs/demo)")
    d.add_argument("--cache-dir", help="where the trained teacher is cached (default: the per-user cache, "
                   "$TRANSFUSE_CACHE_DIR/teachers or ~/.cache/transfuse/teachers)")
    d.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field of the demo config")
    d.add_argument("--quiet", action="store_true", help="no progress bars")
    common(d)

    c = sub.add_parser("cache-teacher", help="run a frozen participant once over the training data and store its outputs",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("config", help="path to a YAML run config (the cache holds what its terms read from the participant)")
    c.add_argument("--out", required=True, help="cache folder to create (written atomically)")
    c.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field (repeatable)")
    c.add_argument("--participant", default="teacher", help="which frozen participant to cache (default: teacher)")
    c.add_argument("--dtype", default="float32", choices=["float32", "float16"], help="storage type (default: float32)")
    c.add_argument("--topk", type=int, metavar="K",
                   help="store a language model's logits (T, V) as their top K tokens per position (log-probabilities, "
                        "token ids and the tail's mass; 1 <= K <= V) instead of all V values; read by fkl, rkl, tvd, "
                        "jsd, skew_fkl and skew_rkl")
    c.add_argument("--batch-size", type=int, help="teacher batch size (default: train.eval_batch_size)")
    c.add_argument("--overwrite", action="store_true", help="replace an existing cache at --out")
    c.add_argument("--quiet", action="store_true", help="no progress bars")
    common(c)

    g = sub.add_parser("generate", help="sequence-level KD: a frozen teacher continues every training row's prompt "
                       "once; the rows are stored for data.generations", epilog=EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    g.add_argument("config", help="path to a YAML run config (its data set and frozen participant)")
    g.add_argument("--out", required=True, help="generations folder to create (written atomically)")
    g.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field (repeatable)")
    g.add_argument("--participant", default="teacher", help="which frozen participant generates (default: teacher)")
    g.add_argument("--prompt-tokens", type=_positive_int, metavar="N",
                   help="continue each row after its first N tokens (default: each row's own prompt, its unlabelled "
                   "prefix; plain text rows have none and need N)")
    g.add_argument("--temperature", type=float, default=1.0, metavar="T",
                   help="sampling temperature; 0 decodes greedily (argmax) (default: 1.0)")
    g.add_argument("--samples", type=_positive_int, default=1, metavar="N",
                   help="generations per training row (default: 1; more only when sampling)")
    g.add_argument("--seed", type=int, help="seed of the draws (default: the config's seed)")
    g.add_argument("--batch-size", type=_positive_int, help="rows generated at once (default: train.eval_batch_size)")
    g.add_argument("--overwrite", action="store_true", help="replace an existing folder at --out")
    g.add_argument("--quiet", action="store_true", help="no progress output")
    common(g)

    k = sub.add_parser("compare", help="compare two weight files of one participant: accuracy, ECE, agreement, flips",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    k.add_argument("config", help="the run config whose participant model and data set to use")
    k.add_argument("a", metavar="A.safetensors", help="weights of the first model (the 'before' of the flips)")
    k.add_argument("b", metavar="B.safetensors", help="weights of the second model (the 'after')")
    k.add_argument("--participant", default="student", help="whose model the files hold (default: student)")
    k.add_argument("--split", default="test", choices=["test", "train"], help="which split to score (default: test)")
    k.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field (repeatable)")
    k.add_argument("--json", action="store_true", help="machine-readable output")
    common(k)

    m = sub.add_parser("methods", help="list the registered distillation methods")
    m.add_argument("--json", action="store_true", help="machine-readable output")
    common(m, threads=False)
    return p


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}")
    return value


def _overrides(args: argparse.Namespace) -> list[str]:
    """The --set overrides, with --threads as the last one (so it wins)."""
    extra = [f"fabric.threads={args.threads}"] if getattr(args, "threads", None) is not None else []
    return [*args.overrides, *extra]


def methods_table() -> list[dict[str, object]]:
    """Every registered method: the losses (name, kind, paper, defaults) and the schemes."""
    from .losses import describe_losses
    from .schemes import SCHEMES

    rows = describe_losses()
    rows += [{"name": e.name, "kind": "scheme", "paper": e.meta.get("paper"), "description": e.summary} for e in SCHEMES.entries()]
    return sorted(rows, key=lambda r: str(r["name"]))


def compare_files(cfg, a: str, b: str, *, participant: str = "student", split: str = "test") -> dict[str, object]:
    """Build ``participant``'s model from ``cfg`` (for the config's data), load the
    safetensors files ``a`` and ``b`` into two copies and compare them on ``split``
    (:func:`transfuse.analysis.compare`; A is "before", B "after" for the flips)."""
    import torch

    from .analysis import compare
    from .build import load_splits, make_model
    from .checkpoint import load_into, load_weights
    from .config import ConfigError

    if participant not in cfg.participants:
        raise ConfigError(f"--participant {participant!r}: the config has no such participant; "
                          f"participants: {', '.join(cfg.participants)}")
    if split not in ("test", "train"):
        raise ConfigError(f"--split {split!r}: expected test or train")
    if cfg.fabric.threads:
        torch.set_num_threads(cfg.fabric.threads)
    section = cfg.participants[participant].model_copy(update={"weights": None})
    splits = load_splits(cfg.data)
    models = []
    for path in (a, b):
        model = make_model(section, splits, role=participant)
        load_into(model, load_weights(path, what=f"compare: {participant}"), source=f"compare: {path!r}")
        models.append(model)
    dataset = splits.test if split == "test" else splits.train
    result = compare(models[0], models[1], dataset, batch_size=cfg.train.eval_batch_size)
    result["a"] = {"weights": str(a), **result["a"]}
    result["b"] = {"weights": str(b), **result["b"]}
    return {"participant": participant, "model": section.name, "data": cfg.data.name, "split": split, **result}


def format_comparison(report: dict) -> str:
    """``transfuse compare``'s table for people."""
    f = report["flips"]
    width = max(len(report["a"]["weights"]), len(report["b"]["weights"]))
    lines = [
        f"{report['participant']} ({report['model']}) on {report['data']} {report['split']}: {report['samples']} samples",
        f"     {'weights':<{width}}  accuracy     ECE",
    ]
    for side in ("a", "b"):
        r = report[side]
        lines.append(f"  {side.upper()}  {r['weights']:<{width}}  {r['accuracy']:8.4f}  {r['ece']:6.4f}")
    lines.append(f"agreement (top-1): {report['agreement']:.4f}")
    lines.append(f"flips A -> B: positive {f['positive']} ({f['positive_rate']:.2%}), negative {f['negative']} "
                 f"({f['negative_rate']:.2%}); top-1 changed on {f['changed']}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    args = _parser().parse_args(argv)
    if args.version:
        from ._version import __version__

        print(f"transfuse {__version__}")
        return 0
    if args.command is None:
        _parser().print_help()
        return 2
    _plain_warnings()
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


def _plain_warnings() -> None:
    """Print transfuse's own warnings (a damaged checkpoint skipped on resume) as one line,
    without Python's file:line and source excerpt; other warnings keep their usual form."""
    import warnings

    from .checkpoint import CheckpointFallbackWarning

    original = warnings.formatwarning
    if getattr(original, "transfuse", False):
        return  # already installed (main() called again in one process)

    def format_warning(message, category, filename, lineno, line=None):
        if issubclass(category, CheckpointFallbackWarning):
            return f"transfuse: warning: {message}\n"
        return original(message, category, filename, lineno, line)

    format_warning.transfuse = True  # type: ignore[attr-defined]
    warnings.formatwarning = format_warning


def _is_user_error(err: Exception) -> bool:
    """The project's own error types (and a registry's unknown name) print as one paragraph;
    anything else is a bug in transfuse and keeps its traceback."""
    from .cache import CacheError
    from .errors import UserError
    from .registry import UnknownNameError

    return isinstance(err, (UserError, CacheError, UnknownNameError))


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "methods":
        rows = methods_table()
        if args.json:
            print(json.dumps(rows, indent=2))
        else:
            width = max(len(r["name"]) for r in rows)
            for r in rows:
                print(f"{r['name']:<{width}}  {r['kind']:<9} {r['description']}\n{'':<{width}}  {'':<9} {r['paper'] or '(in-house)'}")
        return 0
    if args.command == "run":
        from .config import load_config
        from .run import run

        cfg = load_config(args.config, _overrides(args))
        summary = run(cfg, out_dir=args.out, resume=args.resume, quiet=args.quiet)
        if summary:
            keys = ("name", "student", "teacher", "agreement", "participants", "steps", "wall_time_s")
            print(json.dumps({k: summary[k] for k in keys}, indent=2))
        return 0
    if args.command == "cache-teacher":
        from .cache_teacher import cache_teacher
        from .config import load_config

        cfg = load_config(args.config, _overrides(args))
        report = cache_teacher(cfg, args.out, participant=args.participant, dtype=args.dtype, batch_size=args.batch_size,
                               overwrite=args.overwrite, quiet=args.quiet, topk=args.topk)
        print(json.dumps(report, indent=2))
        return 0
    if args.command == "generate":
        from .config import load_config
        from .seqkd import generate

        cfg = load_config(args.config, _overrides(args))
        report = generate(cfg, args.out, participant=args.participant, prompt_tokens=args.prompt_tokens,
                          temperature=args.temperature, samples=args.samples, seed=args.seed,
                          batch_size=args.batch_size, overwrite=args.overwrite, quiet=args.quiet)
        print(json.dumps(report, indent=2))
        return 0
    if args.command == "compare":
        from .config import load_config

        cfg = load_config(args.config, _overrides(args))
        report = compare_files(cfg, args.a, args.b, participant=args.participant, split=args.split)
        print(json.dumps(report, indent=2) if args.json else format_comparison(report))
        return 0
    if args.command == "demo":
        from .demo import format_table, run_demo

        summaries = run_demo(out_dir=args.out, cache_dir=args.cache_dir, overrides=_overrides(args), quiet=args.quiet)
        print(format_table(summaries))
        print(f"\nrun folders and results.md are in {args.out}/")
        return 0
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
