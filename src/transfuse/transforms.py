"""Batch transforms a config can name: run on each micro-batch after it reaches the device
and before the forward pass, so every participant sees the transformed batch.

A transform is ``transform(batch, *, step, distiller) -> batch``; it may query any
participant through ``distiller.sources`` (mixup labelled by the teacher, adversarial
samples, generation by the student). Randomness must come from torch's global RNG, which
checkpoints save and restore, so a resumed run draws exactly what an uninterrupted one does.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .registry import Registry

#: Transforms a config can name (``transforms: [{name: ..., options: {...}}]``).
TRANSFORMS: Registry[type] = Registry("transform")


@TRANSFORMS.register("gaussian_noise", summary="add N(0, std^2) noise to the float input, a fresh draw per step")
class GaussianNoise:
    """``input + std * N(0, 1)`` on the batch's ``input`` (float inputs only): the same noisy
    images go to the student and the teacher, so the teacher labels what the student sees."""

    def __init__(self, *, std: float = 0.1) -> None:
        if not (std >= 0 and math.isfinite(std)):
            raise ValueError(f"gaussian_noise: std must be a finite number >= 0, got {std}")
        self.std = float(std)

    def __call__(self, batch: dict[str, torch.Tensor], *, step: int, distiller: Any = None) -> dict[str, torch.Tensor]:
        x = batch.get("input")
        if x is None or not x.is_floating_point():
            raise ValueError("gaussian_noise needs a float 'input' in the batch (image or feature data)")
        return {**batch, "input": x + self.std * torch.randn_like(x)}


@TRANSFORMS.register(
    "partial_mixup",
    summary="MIX-KD's partial mixup: mix a share of the batch with a shuffled copy, record target_b and lam",
)
class PartialMixup:
    """Partial mixup (MIX-KD's PMU): ``x_i <- lam_i * x_i + (1 - lam_i) * x_pi(i)`` for some samples.

    Per micro-batch of ``B`` samples: a random permutation ``pi``, ``lam_i ~ Beta(alpha,
    alpha)`` per sample, then ``int(B * partmixup)`` samples are left unmixed (``lam_i =
    1``). The mixed ``input`` goes to every participant, so the teacher labels what the
    student sees. Batch entries written beside it:

    * ``lam`` (float ``(B,)``): each sample's share of its own label, 1 where unmixed;
    * ``target_b`` (``target[pi]``): the partner's label, where the batch has ``target``;
    * ``labelled`` (where the batch has it): a mixed sample counts as labelled only if its
      partner is labelled too.

    The ``mixkd`` loss reads ``target_b`` and ``lam`` for its CE with the soft label
    ``lam * onehot(target) + (1 - lam) * onehot(target_b)``. ``index`` and ``sample_id``
    stay those of the sample in place, so a teacher answered from an output cache (by
    sample id) would label the unmixed samples: this transform refuses such a run.

    Options (official ``train_student_MIXSTD.py``): ``alpha=1.0`` (``--beta_a``; 0.2 and
    0.4 are the paper's other settings), ``partmixup=0.9`` (``--partmixup``: the share of
    samples NOT mixed, "0.9 = 10%" mixup), ``replacement=False``.

    Written after the authors' ``PMU`` (``helper/loops_mixstd.py``, hchoi71/MIX-KD), with
    two differences. (1) The official code mixes two independent shuffles of the batch,
    ``x[pi1(i)]`` with ``x[pi2(i)]``; keeping the first operand in place is the same
    distribution of pairs, reordered, and keeps every per-sample entry aligned. (2) The
    official code picks the unmixed samples with ``torch.randint`` -- with replacement --
    so repeats leave fewer of them than ``partmixup`` says (about ``1 - exp(-0.9)`` = 59%
    instead of 90% for large batches); here they are ``int(B * partmixup)`` distinct
    samples, as the option is described. ``replacement=True`` draws them as the official
    code does. Randomness comes from torch's RNG on the input's device (checkpointed), not
    numpy's. With ``partmixup=1`` nothing is mixed and ``input`` is returned unchanged.
    """

    def __init__(self, *, alpha: float = 1.0, partmixup: float = 0.9, replacement: bool = False) -> None:
        if isinstance(alpha, bool) or not (alpha > 0 and math.isfinite(alpha)):
            raise ValueError(f"partial_mixup: alpha (the Beta(alpha, alpha) parameter) must be finite and > 0, got {alpha}")
        if isinstance(partmixup, bool) or not 0.0 <= partmixup <= 1.0:
            raise ValueError(f"partial_mixup: partmixup (the share of samples left unmixed) must be in [0, 1], got {partmixup}")
        if not isinstance(replacement, bool):
            raise ValueError(f"partial_mixup: replacement must be true or false, got {replacement!r}")
        self.alpha, self.partmixup, self.replacement = float(alpha), float(partmixup), replacement
        self._checked_sources = False

    def __call__(self, batch: dict[str, torch.Tensor], *, step: int, distiller: Any = None) -> dict[str, torch.Tensor]:
        x = batch.get("input")
        if x is None or not x.is_floating_point():
            raise ValueError("partial_mixup needs a float 'input' in the batch (image or feature data)")
        if not self._checked_sources and distiller is not None:
            refuse_cached_sources(distiller, transform="partial_mixup")
            self._checked_sources = True
        size, device = x.shape[0], x.device
        perm = torch.randperm(size, device=device)  # (B,)
        concentration = torch.full((size,), self.alpha, dtype=torch.float32, device=device)
        lam = torch.distributions.Beta(concentration, concentration).sample()  # (B,)
        keep = int(size * self.partmixup)
        if self.replacement:
            unmixed = torch.randint(0, size, (keep,), device=device)
        else:
            unmixed = torch.randperm(size, device=device)[:keep]
        lam[unmixed] = 1.0
        mixed = lam < 1.0  # (B,)
        per_sample = (size,) + (1,) * (x.dim() - 1)
        share = lam.to(x.dtype).reshape(per_sample)
        blended = share * x + (1 - share) * x[perm]
        out = {**batch, "input": torch.where(mixed.reshape(per_sample), blended, x), "lam": lam}
        if "target" in batch:
            out["target_b"] = batch["target"][perm]
        if "labelled" in batch:
            labelled = batch["labelled"]
            out["labelled"] = labelled & (labelled[perm] | ~mixed)
        return out


def refuse_cached_sources(distiller: Any, *, transform: str) -> None:
    """A transform that changes the inputs cannot be answered by a teacher read from disk:
    the cache holds outputs for the unchanged samples. ``transform`` names it in the error."""
    from .sources import CachedOutputs

    cached = sorted(name for name, source in getattr(distiller, "sources", {}).items() if isinstance(source, CachedOutputs))
    if cached:
        raise ValueError(
            f"{transform} changes the inputs, but {', '.join(cached)} answer(s) from a teacher-output cache, which "
            "holds outputs for the unchanged samples; run the teacher itself (leave out its `cache`)"
        )


def make_transform(name: str, **options: Any):
    """The registered transform ``name`` built with ``options`` (an unknown name lists the valid ones)."""
    TRANSFORMS.check_options(name, options, where="transforms.options")
    return TRANSFORMS.get(name)(**options)


from . import hard, on_policy  # noqa: E402,F401  (register HARD's and on-policy generation's transforms)
