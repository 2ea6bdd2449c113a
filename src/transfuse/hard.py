"""HARD (Hard Augmentations for Robust Distillation): batch transforms that move a share of
each batch to where the teacher and the student disagree, while the teacher still says
about each moved sample what it said about the original.

Two augmentors, both registered in :data:`transfuse.transforms.TRANSFORMS`:

* ``hard_affine`` -- the paper's spatial-transformer augmentor (HARD-Affine): a bounded
  affine transformation per sample (rotation, zoom, shear, translation);
* ``hard_pixel`` -- a simpler input-space variant: a per-pixel perturbation inside an
  L-infinity ball of radius ``eps``.

Per micro-batch both pick ``round(share * B)`` samples, draw a random start for their
parameters and take ``steps`` signed-gradient ascent steps on
:func:`transfuse.functional.hard_objective` (the teacher/student KL on the augmented
input minus ``lam`` times the teacher's KL between original and augmented input),
projecting back into the parameter box after each step. The chosen samples are then
replaced by their augmented versions: the batch keeps its size and every per-sample entry
(``target``, ``index``, ``sample_id``, ``labelled``), and the Distiller's forward pass
runs every participant on the mixed batch, so the teacher labels what the student sees.
A bool ``augmented`` ``(B,)`` entry records which samples were replaced.

Paper: Nix, Burg, Sinz, HARD: Hard Augmentations for Robust Distillation, 2023,
https://arxiv.org/abs/2305.14890. The per-batch inner maximisation is this library's
reading of the paper's adversarial augmentor; docs/methods.md lists every deviation.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator

import torch
from torch import nn

from .functional._types import NonNegative, Positive, Probability, Temperature
from .functional.hard import AFFINE_PARAMS, _check_bounds, affine_warp, hard_objective
from .models.outputs import call_model
from .participants import Participant
from .transforms import TRANSFORMS, refuse_cached_sources

__all__ = ["HardAffine", "HardPixel", "eval_mode"]


@contextlib.contextmanager
def eval_mode(*models: nn.Module) -> Iterator[None]:
    """Every module of ``models`` in eval mode inside the block; afterwards each submodule
    gets back its own previous mode (a frozen part kept in eval stays in eval)."""
    modes = {m: m.training for model in models for m in model.modules()}
    try:
        for model in models:
            model.eval()
        yield
    finally:
        for module, training in modes.items():
            module.train(training)


def _logits(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """``model``'s float32 logits for ``inputs``, cast to the model's own dtype first (a
    teacher kept in bf16 takes bf16 inputs)."""
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), inputs.dtype)
    return call_model(model, {"input": inputs.to(dtype)}).float()


class _HardAugment:
    """The shared inner loop; a subclass says how ``params`` ``(k, ...)`` in ``[-1, 1]``
    augment the chosen inputs (:meth:`augment`) and what shape they have (:meth:`param_shape`)."""

    name = "hard"

    def __init__(
        self, *, steps: int, step_size: Positive, lam: NonNegative, temperature: Temperature, share: Probability,
        random_start: bool, teacher: str, student: str,
    ) -> None:
        n = self.name
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"{n}: steps (the augmentor's ascent steps per batch) must be an integer >= 0, got {steps!r}")
        for option, value, ok, what in (
            ("step_size", step_size, lambda v: v > 0, "> 0"),
            ("lam", lam, lambda v: v >= 0, ">= 0"),
            ("temperature", temperature, lambda v: v > 0, "> 0"),
            ("share", share, lambda v: 0 <= v <= 1, "in [0, 1]"),
        ):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not ok(value):
                raise ValueError(f"{n}: {option} must be a finite number {what}, got {value!r}")
        if not isinstance(random_start, bool):
            raise ValueError(f"{n}: random_start must be true or false, got {random_start!r}")
        if steps == 0 and not random_start:
            raise ValueError(f"{n}: steps 0 without random_start leaves every sample as it is; "
                             "set steps >= 1 or random_start: true (a random augmentation)")
        for option, value in (("teacher", teacher), ("student", student)):
            if not isinstance(value, str) or not value.isidentifier():
                raise ValueError(f"{n}: {option} must name a participant (an identifier), got {value!r}")
        if teacher == student:
            raise ValueError(f"{n}: teacher and student must be two participants, both are {teacher!r}")
        self.steps, self.step_size, self.lam = steps, float(step_size), float(lam)
        self.temperature, self.share, self.random_start = float(temperature), float(share), random_start
        self.teacher, self.student = teacher, student

    # --- what a subclass defines -------------------------------------------------------
    def param_shape(self, inputs: torch.Tensor) -> tuple[int, ...]:
        raise NotImplementedError

    def augment(self, inputs: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def check_input(self, inputs: torch.Tensor) -> None:
        if not inputs.is_floating_point():
            raise ValueError(f"{self.name} needs a float 'input' in the batch (image or feature data), got {inputs.dtype}")

    # --- the transform -----------------------------------------------------------------
    def models(self, distiller: Any) -> tuple[nn.Module, nn.Module]:
        """The teacher's and the student's models, after refusing what cannot be augmented."""
        if distiller is None or not hasattr(distiller, "sources"):
            raise ValueError(f"{self.name} asks the teacher and the student about each batch: call it with "
                             "distiller=<the run's Distiller> (the engine's fit does)")
        sources = distiller.sources
        refuse_cached_sources(distiller, transform=self.name)
        found = []
        for role in ("teacher", "student"):
            name = getattr(self, role)
            source = sources.get(name)
            if not isinstance(source, Participant):
                models = sorted(n for n, s in sources.items() if isinstance(s, Participant))
                what = "is not a source of this run" if source is None else f"is a {type(source).__name__}, not a model"
                raise ValueError(f"{self.name}: {role} {name!r} {what}; the augmentor needs the models' gradients "
                                 f"with respect to the input; participants: {', '.join(models) or '(none)'}")
            found.append(source.model)
        return found[0], found[1]

    def start(self, inputs: torch.Tensor) -> torch.Tensor:
        """The parameters the ascent starts from: uniform in the box, or the identity (0)."""
        shape = self.param_shape(inputs)
        if self.random_start:
            return torch.rand(shape, device=inputs.device) * 2 - 1
        return torch.zeros(shape, device=inputs.device)

    def search(self, inputs: torch.Tensor, teacher: nn.Module, student: nn.Module) -> torch.Tensor:
        """``steps`` signed-gradient ascent steps on the HARD objective; per sample, the best
        iterate (the start included).

        Both models run in eval mode (batch norm uses its running statistics and is not
        updated; no dropout), so each sample's parameters see only that sample; the
        gradient is taken with respect to the parameters alone, so no model parameter
        gets a ``.grad``.
        """
        params = self.start(inputs)  # (k, ...) in [-1, 1]
        if self.steps == 0:
            return params
        with eval_mode(teacher, student), torch.enable_grad():
            with torch.no_grad():
                teacher_clean = _logits(teacher, inputs)  # (k, C)
            best, best_value = params, None
            for i in range(self.steps + 1):
                last = i == self.steps  # the final iterate is only scored, not stepped from
                params.requires_grad_(not last)
                with torch.set_grad_enabled(not last):
                    moved = self.augment(inputs, params)  # (k, ...)
                    value = hard_objective(
                        _logits(student, moved), _logits(teacher, moved), teacher_clean, lam=self.lam,
                        temperature=self.temperature, reduction="none",
                    )  # (k,)
                # Each sample keeps its best iterate: a fixed signed step can overshoot.
                detached = value.detach()
                if best_value is None:
                    best, best_value = params.detach(), detached
                else:
                    better = detached > best_value  # (k,)
                    best = torch.where(better.reshape(-1, *([1] * (params.dim() - 1))), params.detach(), best)
                    best_value = torch.where(better, detached, best_value)
                if not last:
                    # A sum: each sample's parameters ascend their own objective.
                    (grad,) = torch.autograd.grad(value.sum(), [params])
                    params = (params.detach() + self.step_size * grad.sign()).clamp_(-1.0, 1.0)
        return best

    def __call__(self, batch: dict[str, torch.Tensor], *, step: int, distiller: Any = None) -> dict[str, torch.Tensor]:
        x = batch.get("input")
        if x is None:
            raise ValueError(f"{self.name} needs an 'input' tensor in the batch; keys: {sorted(batch)}")
        self.check_input(x)
        teacher, student = self.models(distiller)
        size, device = x.shape[0], x.device
        count = int(round(self.share * size))
        chosen = torch.randperm(size, device=device)[:count]  # (k,)
        augmented = torch.zeros(size, dtype=torch.bool, device=device)  # (B,)
        if count == 0:
            return {**batch, "augmented": augmented}
        params = self.search(x[chosen].detach(), teacher, student)
        with torch.no_grad():
            moved = self.augment(x[chosen], params).to(x.dtype)  # (k, ...)
        out = x.detach().clone()
        out[chosen] = moved
        augmented[chosen] = True
        return {**batch, "input": out, "augmented": augmented}


@TRANSFORMS.register(
    "hard_affine",
    summary="HARD-Affine: per-sample bounded affine warps that maximise teacher/student KL, teacher kept valid",
)
class HardAffine(_HardAugment):
    """HARD with the spatial-transformer augmentor: ``g(x)`` is ``x`` warped by its own
    affine transformation, parameters in ``[-1, 1]^5`` (:data:`~transfuse.functional.hard.AFFINE_PARAMS`)
    scaled by the bounds below (:func:`~transfuse.functional.affine_warp`).

    Options: ``steps=5`` ascent steps of ``step_size=0.25`` (in the unit box) from a
    uniform ``random_start``; ``lam=1.0`` weighs the teacher's own change; ``temperature=1.0``
    of both KLs; ``share=0.5`` of each batch is augmented, the rest stays original;
    ``max_rotation=15`` degrees, ``max_scale=0.15`` (zoom in ``[0.85, 1.15]``),
    ``max_shear=0.15``, ``max_translate=0.15`` (of the image side); ``padding_mode="border"``;
    ``teacher="teacher"``, ``student="student"`` name the participants. ``steps=0`` with
    ``random_start`` is a random affine augmentation inside the same bounds (the
    non-adversarial baseline). Inputs must be images ``(B, C, H, W)``.
    """

    name = "hard_affine"

    def __init__(
        self, *, steps: int = 5, step_size: Positive = 0.25, lam: NonNegative = 1.0, temperature: Temperature = 1.0,
        share: Probability = 0.5, random_start: bool = True, max_rotation: NonNegative = 15.0,
        max_scale: NonNegative = 0.15, max_shear: NonNegative = 0.15, max_translate: NonNegative = 0.15,
        padding_mode: str = "border", teacher: str = "teacher", student: str = "student",
    ) -> None:
        super().__init__(steps=steps, step_size=step_size, lam=lam, temperature=temperature, share=share,
                         random_start=random_start, teacher=teacher, student=student)
        _check_bounds(max_rotation, max_scale, max_shear, max_translate, self.name)
        if max(max_rotation, max_scale, max_shear, max_translate) == 0:
            raise ValueError(f"{self.name}: every bound (max_rotation, max_scale, max_shear, max_translate) is 0, "
                             "so the warp is the identity; allow at least one")
        if padding_mode not in ("border", "zeros"):
            raise ValueError(f"{self.name}: padding_mode must be 'border' or 'zeros', got {padding_mode!r}")
        self.bounds = {"max_rotation": float(max_rotation), "max_scale": float(max_scale),
                       "max_shear": float(max_shear), "max_translate": float(max_translate)}
        self.padding_mode = padding_mode

    def check_input(self, inputs: torch.Tensor) -> None:
        super().check_input(inputs)
        if inputs.dim() != 4:
            raise ValueError(f"{self.name} warps images: 'input' must be (B, C, H, W), got shape {tuple(inputs.shape)}")

    def param_shape(self, inputs: torch.Tensor) -> tuple[int, ...]:
        return (inputs.shape[0], len(AFFINE_PARAMS))

    def augment(self, inputs: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        return affine_warp(inputs, params, padding_mode=self.padding_mode, **self.bounds)


@TRANSFORMS.register(
    "hard_pixel",
    summary="HARD, input-pixel variant: L-inf perturbations that maximise teacher/student KL, teacher kept valid",
)
class HardPixel(_HardAugment):
    """HARD with a pixel-space augmentor: ``g(x) = x + eps * u``, ``u`` in ``[-1, 1]`` per
    input element (an L-infinity ball of radius ``eps`` in the input's units, after the
    data set's normalisation), found by the same signed ascent as ``hard_affine``.

    Options: ``eps=0.1``; ``steps=5``, ``step_size=0.25`` (a fraction of ``eps`` per
    step), ``lam=1.0``, ``temperature=1.0``, ``share=0.5``, ``random_start=True``,
    ``teacher``, ``student`` as in ``hard_affine``. Works for any float input shape.
    """

    name = "hard_pixel"

    def __init__(
        self, *, eps: Positive = 0.1, steps: int = 5, step_size: Positive = 0.25, lam: NonNegative = 1.0,
        temperature: Temperature = 1.0, share: Probability = 0.5, random_start: bool = True,
        teacher: str = "teacher", student: str = "student",
    ) -> None:
        super().__init__(steps=steps, step_size=step_size, lam=lam, temperature=temperature, share=share,
                         random_start=random_start, teacher=teacher, student=student)
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (eps > 0 and math.isfinite(eps)):
            raise ValueError(f"{self.name}: eps (the L-inf radius in input units) must be a finite number > 0, got {eps!r}")
        self.eps = float(eps)

    def param_shape(self, inputs: torch.Tensor) -> tuple[int, ...]:
        return tuple(inputs.shape)

    def augment(self, inputs: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        return inputs + self.eps * params.clamp(-1.0, 1.0).to(inputs.dtype)
