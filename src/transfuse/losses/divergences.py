"""The token divergences (:mod:`transfuse.functional.divergences`) as registered losses.

Each compares the student's logits with the teacher's, per position (a classifier's row
or a language model's token), with the temperature inside the loss and no ``T^2``
factor. The short form adds no label loss beside them (``ce_weight`` 0: the
distillation-only objective of the language-model papers); ``distill.ce_weight`` adds one.

``fkl``, ``rkl``, ``tvd``, ``jsd``, ``skew_fkl`` and ``skew_rkl`` also take a teacher given
by its top-k tokens (a :class:`~transfuse.functional.divergences.TopKLogits`, what a top-k
teacher-output cache serves) and then compute
:func:`~transfuse.functional.divergences.topk_divergence` with the same options;
:func:`accepts_topk` tells which registered losses do, and :func:`topk_losses` lists them.
"""

from __future__ import annotations

from ..functional import divergences as D
from .base import LOSSES, LossSpec, register_loss

#: The pure functions that accept a :class:`~transfuse.functional.divergences.TopKLogits`
#: teacher (each routes it to ``topk_divergence`` with its own options).
TOPK_FUNCTIONS = tuple(D.DIVERGENCES[name] for name in D.TOPK_DIVERGENCES)


def accepts_topk(spec: LossSpec) -> bool:
    """Whether the registered loss ``spec`` can compare with a teacher known only by its top-k
    tokens: its function is one of :data:`TOPK_FUNCTIONS` (a named setting of one counts too)."""
    return spec.fn is not None and any(spec.fn is fn for fn in TOPK_FUNCTIONS)


def topk_losses() -> list[str]:
    """The registered loss names that accept a top-k teacher, sorted."""
    return sorted(entry.obj.name for entry in LOSSES.entries() if accepts_topk(entry.obj))

_LOSSES = [
    (D.fkl, "forward KL(p || q) per position (mode-covering), temperature inside, no T^2",
     "Hinton et al., Distilling the Knowledge in a Neural Network, 2015, https://arxiv.org/abs/1503.02531"),
    (D.rkl, "reverse KL(q || p) per position (mode-seeking)",
     "Gu et al., MiniLLM: Knowledge Distillation of Large Language Models, ICLR 2024, https://arxiv.org/abs/2306.08543"),
    (D.tvd, "total variation distance 0.5 * sum |p - q| per position",
     "Wen et al., f-Divergence Minimization for Sequence-Level Knowledge Distillation, ACL 2023, "
     "https://arxiv.org/abs/2307.15190"),
    (D.jsd, "generalised Jensen-Shannon divergence with mixture weight beta (GKD)",
     "Agarwal et al., On-Policy Distillation of Language Models: Learning from Self-Generated Mistakes, ICLR 2024, "
     "https://arxiv.org/abs/2306.13649"),
    (D.skew_fkl, "skew forward KL(p || alpha p + (1 - alpha) q) (DistiLLM)",
     "Ko et al., DistiLLM: Towards Streamlined Distillation for Large Language Models, ICML 2024, "
     "https://arxiv.org/abs/2402.03898"),
    (D.skew_rkl, "skew reverse KL(q || (1 - alpha) p + alpha q) (DistiLLM)",
     "Ko et al., DistiLLM: Towards Streamlined Distillation for Large Language Models, ICML 2024, "
     "https://arxiv.org/abs/2402.03898"),
    (D.adaptive_kl, "FKL and RKL weighted by the student's gaps on the teacher's head and tail tokens",
     "Wu et al., Rethinking Kullback-Leibler Divergence in Knowledge Distillation for Large Language Models, 2024, "
     "https://arxiv.org/abs/2404.02657"),
]

for _fn, _summary, _paper in _LOSSES:
    register_loss(_fn, name=_fn.__name__, kind="logits", summary=_summary, paper=_paper, weight=1.0, ce_weight=0.0)

register_loss(D.sampled_reverse_kl, name="sampled_rkl", kind="logits",
              summary="reverse KL estimated at the student's own sampled tokens (k1 or k3), score-function gradient; "
                      "use with the on_policy transform",
              paper="Gu et al., MiniLLM: Knowledge Distillation of Large Language Models, ICLR 2024, "
                    "https://arxiv.org/abs/2306.08543",
              weight=1.0, ce_weight=0.0, needs=("target",))
