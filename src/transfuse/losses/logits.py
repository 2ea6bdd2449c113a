"""Registered logit losses: cross-entropy with labels, KD, DKD, DIST (pure functions, registered)."""

from __future__ import annotations

from .. import functional as TF
from .base import ScheduleDefault, register_loss

register_loss(
    TF.cross_entropy,
    name="ce",
    kind="logits",
    summary="cross-entropy with the labels (no teacher)",
    paper=(
        "Szegedy et al., Rethinking the Inception Architecture for Computer Vision, CVPR 2016, "
        "https://arxiv.org/abs/1512.00567 (label smoothing; plain cross-entropy otherwise)"
    ),
    weight=1.0,
    ce_weight=0.0,
    needs=("target",),
    uses_teacher=False,
)

register_loss(
    TF.kd,
    name="kd",
    kind="logits",
    summary="soft-target KL at a temperature (classic KD)",
    paper="Hinton et al., Distilling the Knowledge in a Neural Network, arXiv 2015, https://arxiv.org/abs/1503.02531",
    weight=0.9,
    ce_weight=0.1,
)

# The official code always warms the DKD term up linearly, over 20 of 240 epochs (every
# config: CIFAR-100 and ImageNet): the first 1/12 of training. That is the term's default
# weight schedule here (`distill.warmup_steps` or a term's `schedule` overrides it).
register_loss(
    TF.dkd,
    name="dkd",
    kind="logits",
    summary="decoupled KD: target-class (TCKD) and non-target-class (NCKD) terms weighted separately",
    paper="Zhao et al., Decoupled Knowledge Distillation, CVPR 2022, https://arxiv.org/abs/2203.08679",
    weight=1.0,
    ce_weight=1.0,
    needs=("target",),
    schedule=ScheduleDefault("warmup", fraction=1 / 12),
)

# DIST's official code (the authors' classification code base) weights the DIST term by 2
# beside a CE term of weight 1 in every config, with two settings: ImageNet `dist`
# (tau=1, beta=gamma=1) and CIFAR-100 `dist_t4` (tau=4). Both are registered, by the
# official names.
_DIST_PAPER = "Huang et al., Knowledge Distillation from A Stronger Teacher, NeurIPS 2022, https://arxiv.org/abs/2205.10536"

register_loss(
    TF.dist,
    name="dist",
    kind="logits",
    summary="match predictions by Pearson correlation, across classes and across the batch (ImageNet setting, tau=1)",
    paper=_DIST_PAPER,
    weight=2.0,
    ce_weight=1.0,
    positionwise=False,
)

register_loss(
    TF.dist,
    name="dist_t4",
    kind="logits",
    summary="DIST with the official CIFAR-100 setting: tau=4",
    paper=_DIST_PAPER,
    weight=2.0,
    ce_weight=1.0,
    positionwise=False,
    defaults={"temperature": 4.0},
)
