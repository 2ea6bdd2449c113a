"""Peers trained together, and transfer into a pretrained student, on low-label Fashion-MNIST.

    python benchmarks/online.py                       # both tables, seeds 0 1 2
    python benchmarks/online.py --seeds 0 --jobs 2 --tables online

Table ``online``: the MLP student of ``benchmarks/fashion_mnist.py``'s low-label setting
(2,000 labelled images, 1,500 steps) trained alone (``none``), with offline KD from the
frozen cached CNN teacher (``kd``), and together with a partner trained at the same time
from scratch: ``dml`` (a peer of the same shape), ``bdkd`` (a CNN teacher of the cached
teacher's shape, trainable), ``collaborative`` (a CNN peer; each sample distilled only
from the more reliable peer) and, where the ``vit`` model exists, ``collaborative_vit``
(the CNN peer and a small ViT peer, the paper's CNN + transformer pair, the ViT as the
reported participant; its baseline ``vit_alone`` is that ViT from labels only). Student
accuracy, its ECE, and the partner's accuracy.

Table ``transfer``: the student trained alone above (``none``, the same seed) is the
pretrained model; it then trains 500 more steps (SGD, lr 0.01) by labels only
(``continue``), by KD from the frozen CNN teacher (``kd``), or by ``kl_dp``. Accuracy
change and the positive / negative prediction flips on the test set against the
pretrained student.

Results go to ``<out>/results.json`` and ``<out>/results.md``; finished runs are kept.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fashion_mnist as fm  # noqa: E402  (its low-label setting, cached teacher, and run loop)

PARTNER_CNN = {"name": "cnn", "options": {"channels": [16, 32], "hidden": 64, "global_pool": False}}
PARTNER_VIT = {"name": "vit", "options": {}}
ONLINE = ["none", "kd", "dml", "bdkd", "collaborative", "vit_alone", "collaborative_vit"]
TRANSFER = ["continue", "kd", "kl_dp"]
TRANSFER_STEPS = 500


def online_config(method: str, seed: int, *, steps: int, root: str | None, cache: str | None) -> dict:
    """The low-label run with ``method``'s participants; the reported model is ``student``."""
    cfg = fm.run_config("lowlabel", "none" if method == "none" else "kd", seed, steps=steps, root=root, cache=cache)
    cfg["name"] = f"online-{method}-s{seed}"
    if method in ("none", "kd"):
        cfg["distill"] = {"method": method}
        return cfg
    if method == "vit_alone":  # the baseline of collaborative_vit: the same ViT from labels only
        cfg.pop("teacher")
        cfg["student"] = {**PARTNER_VIT, "trainable": True}
        cfg["distill"] = {"method": "none"}
        return cfg
    student, teacher = cfg.pop("student"), cfg.pop("teacher")
    del teacher  # the partner is trained here, from scratch, not loaded
    if method == "dml":
        cfg["participants"] = {"student": student, "peer": {**copy.deepcopy(student), "trainable": True}}
    elif method == "bdkd":
        cfg["participants"] = {"student": student, "teacher": {**PARTNER_CNN, "trainable": True}}
    elif method == "collaborative":
        cfg["participants"] = {"student": student, "peer": {**PARTNER_CNN, "trainable": True}}
    elif method == "collaborative_vit":
        # The paper's pair: a CNN and a transformer; the ViT is the reported "student".
        cfg["participants"] = {"student": {**PARTNER_VIT, "trainable": True}, "peer": {**PARTNER_CNN, "trainable": True}}
    else:
        raise ValueError(f"unknown online method {method!r}")
    cfg["distill"] = {"method": "collaborative" if method.startswith("collaborative") else method}
    return cfg


def transfer_config(method: str, seed: int, pretrained: Path, *, root: str | None, cache: str | None) -> dict:
    """``TRANSFER_STEPS`` more steps of the pretrained student, by ``method``."""
    cfg = fm.run_config("lowlabel", "kd", seed, steps=TRANSFER_STEPS, root=root, cache=cache)
    cfg["name"] = f"transfer-{method}-s{seed}"
    cfg["student"] = {**cfg["student"], "weights": str(pretrained)}
    cfg["optim"] = {"name": "sgd", "lr": 0.01, "momentum": 0.9}
    cfg["train"] = {**cfg["train"], "checkpoint_every": TRANSFER_STEPS}
    cfg["distill"] = {"method": {"continue": "none"}.get(method, method)}
    if method == "continue":
        del cfg["teacher"]
    return cfg


def _partner(summary: dict) -> float | None:
    others = [v for k, v in summary.get("participants", {}).items() if k != "student" and v.get("trainable")]
    return 100 * others[0]["accuracy"] if others else None


def _ms(values: list[float]) -> str:
    return fm.mean_std(values) if values else "-"


def online_table(rows: list[dict], seeds: list[int]) -> str:
    base = {r["seed"]: r["acc"] for r in rows if r["method"] == "none"}
    vit = {r["seed"]: r["acc"] for r in rows if r["method"] == "vit_alone"}
    lines = [f"Seeds {seeds}; student = MLP [128] unless the method says otherwise; Δ of collaborative_vit is "
             "against vit_alone.", "",
             "| method | student accuracy % | Δ vs alone | student ECE | partner accuracy % | seconds |",
             "|---|---:|---:|---:|---:|---:|"]
    for method in ONLINE:
        cell = [r for r in rows if r["method"] == method]
        if not cell:
            continue
        acc = [r["acc"] for r in cell]
        # A ViT student is paired with the ViT trained alone, every other one with the MLP of `none`.
        ref = vit if method == "collaborative_vit" else base
        delta = [r["acc"] - ref[r["seed"]] for r in cell if r["seed"] in ref and method not in ("none", "vit_alone")]
        partner = [r["partner"] for r in cell if r["partner"] is not None]
        lines.append(f"| {method} | {_ms(acc)} | {_ms(delta) if delta else '-'} | {_ms([r['ece'] for r in cell])} | "
                     f"{_ms(partner)} | {statistics.mean(r['seconds'] for r in cell):.0f} |")
    return "\n".join(lines)


def transfer_table(rows: list[dict], seeds: list[int]) -> str:
    lines = [f"Seeds {seeds}; {TRANSFER_STEPS} steps from the pretrained student (the `none` run of the same seed).", "",
             "| method | accuracy % | Δ vs pretrained | positive flips % | negative flips % | seconds |",
             "|---|---:|---:|---:|---:|---:|"]
    for method in TRANSFER:
        cell = [r for r in rows if r["method"] == method]
        if not cell:
            continue
        lines.append(f"| {method} | {_ms([r['acc'] for r in cell])} | {_ms([r['delta'] for r in cell])} | "
                     f"{_ms([r['pos'] for r in cell])} | {_ms([r['neg'] for r in cell])} | "
                     f"{statistics.mean(r['seconds'] for r in cell):.0f} |")
    return "\n".join(lines)


def _flips(pretrained: Path, after: Path, *, root: str | None) -> dict:
    """Prediction flips on the test set from the pretrained student to the transferred one."""
    import torch

    from transfuse.analysis import compare
    from transfuse.checkpoint import load_weights
    from transfuse.config import config_from_dict
    from transfuse.build import load_splits, make_model

    cfg = config_from_dict(online_config("none", 0, steps=1, root=root, cache=None))
    splits = load_splits(cfg.data)
    models = []
    for path in (pretrained, after):
        model = make_model(cfg.participants["student"], splits, role="student")
        model.load_state_dict(load_weights(path, what="student"))
        models.append(model)
    torch.set_num_threads(1)
    return compare(models[0], models[1], splits.test, batch_size=2000)["flips"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tables", default="online,transfer")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--transfer-steps", type=int, default=500)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--out", default="runs/bench-online")
    p.add_argument("--root", default=None)
    p.add_argument("--cache", default=None)
    args = p.parse_args(argv)
    global TRANSFER_STEPS
    TRANSFER_STEPS = args.transfer_steps
    tables = args.tables.split(",")
    out = Path(args.out)
    from transfuse.models import MODELS

    online = [m for m in ONLINE if m not in ("collaborative_vit", "vit_alone") or "vit" in MODELS]
    # The cached teacher is trained (once) before the pool starts.
    fm._one((fm.run_config("lowlabel", "kd", args.seeds[0], steps=1, root=args.root, cache=args.cache),
             str(out / "_teacher-warmup")))
    wanted = online if "online" in tables else ["none"]
    cells = [((m, s), (online_config(m, s, steps=args.steps, root=args.root, cache=args.cache),
                       str(out / "online" / f"{m}-s{s}"))) for s in args.seeds for m in wanted]
    rows = []
    for (method, seed), summary in fm.run_cells(cells, jobs=args.jobs, label=lambda k: f"online {k[0]} seed {k[1]}"):
        rows.append({"method": method, "seed": seed, "acc": 100 * summary["student"]["accuracy"],
                     "ece": summary["student"]["ece"], "partner": _partner(summary),
                     "seconds": summary["train_wall_time_s"]})
    md = ["## online", "", online_table(rows, args.seeds)] if "online" in tables else []
    results = {"online": rows}
    if "transfer" in tables:
        pre = {s: out / "online" / f"none-s{s}" / "student.safetensors" for s in args.seeds}
        cells = [((m, s), (transfer_config(m, s, pre[s], root=args.root, cache=args.cache),
                           str(out / "transfer" / f"{m}-s{s}"))) for s in args.seeds for m in TRANSFER]
        base = {r["seed"]: r["acc"] for r in rows if r["method"] == "none"}
        trows = []
        for (method, seed), summary in fm.run_cells(cells, jobs=args.jobs, label=lambda k: f"transfer {k[0]} seed {k[1]}"):
            flips = _flips(pre[seed], out / "transfer" / f"{method}-s{seed}" / "student.safetensors", root=args.root)
            acc = 100 * summary["student"]["accuracy"]
            trows.append({"method": method, "seed": seed, "acc": acc, "delta": acc - base[seed],
                          "pos": 100 * flips["positive_rate"], "neg": 100 * flips["negative_rate"],
                          "seconds": summary["train_wall_time_s"]})
        results["transfer"] = trows
        md += ["", "## transfer", "", transfer_table(trows, args.seeds)]
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
