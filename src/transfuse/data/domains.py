"""Data sets with synthetic domains: each sample of a base data set is assigned to one domain,
and each domain changes its images in its own way (rotated, noisy, low-contrast, ...).

This is the shape of the domain-generalisation benchmarks (Rotated MNIST, WILDS): training
samples carry the ``domain`` they come from, experts can be trained per source domain, and
one domain can be held out entirely as the target -- absent from the training split, and
the whole test split. Registered names: ``digits_domains``, ``fashion_mnist_domains``.

A domain is named by a spec ``"<transform>"`` or ``"<transform>:<strength>"``:

* ``identity`` -- the images as they are;
* ``rotate[:degrees]`` -- rotated counter-clockwise by ``degrees`` (default 45), bilinear, black fill;
* ``noise[:std]`` -- plus Gaussian pixel noise of standard deviation ``std`` (default 0.3), clipped to [0, 1];
* ``contrast[:factor]`` -- contrast scaled by ``factor`` (default 0.4) around each image's mean;
* ``invert`` -- ``1 - pixel``;
* ``blur[:radius]`` -- a ``(2r+1)x(2r+1)`` box blur (default radius 1).

Transforms act on pixels in [0, 1] (a normalised base data set is de-normalised first and
normalised again afterwards). Which sample belongs to which domain, and every noise draw,
is a function of ``seed`` only: the same seed gives the same data on every machine.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from .base import DATASETS, ArrayDataset, Batch, DataSplits

#: The batch and sample entry holding a sample's domain (int64).
DOMAIN = "domain"
#: The domains of the registered data sets when none are given.
DEFAULT_DOMAINS = ("identity", "rotate:45", "noise:0.3", "contrast:0.4")

Transform = Callable[[torch.Tensor, float, torch.Generator], torch.Tensor]


def _identity(x: torch.Tensor, strength: float, gen: torch.Generator) -> torch.Tensor:
    return x


def _rotate(x: torch.Tensor, degrees: float, gen: torch.Generator) -> torch.Tensor:
    # An affine grid: exact for any angle (a 90-degree rotation is a transpose and flip).
    theta = math.radians(degrees)
    cos, sin = math.cos(theta), math.sin(theta)
    matrix = torch.tensor([[cos, -sin, 0.0], [sin, cos, 0.0]], dtype=x.dtype).expand(len(x), 2, 3)
    grid = F.affine_grid(matrix, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _noise(x: torch.Tensor, std: float, gen: torch.Generator) -> torch.Tensor:
    return (x + std * torch.randn(x.shape, generator=gen, dtype=x.dtype)).clamp(0.0, 1.0)


def _contrast(x: torch.Tensor, factor: float, gen: torch.Generator) -> torch.Tensor:
    mean = x.mean(dim=(1, 2, 3), keepdim=True)  # (N, 1, 1, 1): each image around its own mean
    return (mean + factor * (x - mean)).clamp(0.0, 1.0)


def _invert(x: torch.Tensor, strength: float, gen: torch.Generator) -> torch.Tensor:
    return 1.0 - x


def _blur(x: torch.Tensor, radius: float, gen: torch.Generator) -> torch.Tensor:
    r = int(radius)
    size = 2 * r + 1
    channels = x.shape[1]
    kernel = torch.full((channels, 1, size, size), 1.0 / size**2, dtype=x.dtype)
    padded = F.pad(x, (r, r, r, r), mode="replicate")  # edges keep their level instead of darkening
    return F.conv2d(padded, kernel, groups=channels)


#: name -> (transform, default strength, whether a strength may be given, check of the strength)
TRANSFORMS: dict[str, tuple[Transform, float, bool, Callable[[float], str | None]]] = {
    "identity": (_identity, 0.0, False, lambda s: None),
    "rotate": (_rotate, 45.0, True, lambda s: None if math.isfinite(s) else "a finite angle in degrees"),
    "noise": (_noise, 0.3, True, lambda s: None if math.isfinite(s) and s > 0 else "a standard deviation > 0"),
    "contrast": (_contrast, 0.4, True, lambda s: None if math.isfinite(s) and s >= 0 else "a factor >= 0"),
    "invert": (_invert, 0.0, False, lambda s: None),
    "blur": (_blur, 1.0, True, lambda s: None if s >= 1 and float(s).is_integer() else "a whole radius >= 1"),
}


def parse_domain(spec: str) -> tuple[str, float]:
    """``"rotate:30"`` -> ``("rotate", 30.0)``; ``"noise"`` -> ``("noise", 0.3)`` (the default strength).

    An unknown transform, a strength that is not a number, or a strength out of range raises
    ``ValueError`` naming the spec and what was expected.
    """
    if not isinstance(spec, str):
        raise ValueError(f"domain {spec!r}: expected a string such as 'rotate:30'")
    name, sep, value = spec.partition(":")
    name = name.strip()
    if name not in TRANSFORMS:
        raise ValueError(f"domain {spec!r}: unknown transform {name!r}; valid: {', '.join(TRANSFORMS)} "
                         "(optionally with a strength, e.g. 'rotate:30')")
    fn, default, takes_strength, check = TRANSFORMS[name]
    if not sep:
        return name, default
    if not takes_strength:
        raise ValueError(f"domain {spec!r}: {name!r} takes no strength; write {name!r}")
    try:
        strength = float(value)
    except ValueError:
        raise ValueError(f"domain {spec!r}: the strength {value!r} is not a number") from None
    problem = check(strength)
    if problem:
        raise ValueError(f"domain {spec!r}: the strength of {name!r} must be {problem}; got {value!r}")
    return name, strength


def assign_domains(n: int, num_domains: int, *, seed: int) -> torch.Tensor:
    """Each of ``n`` samples' domain ``(n,)`` int64 in ``0..num_domains-1``: as equal-sized as
    possible (sizes differ by at most one), the members of each drawn at random from ``seed``."""
    if num_domains < 1:
        raise ValueError(f"assign_domains: num_domains must be >= 1; got {num_domains}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))
    domains = torch.empty(n, dtype=torch.long)
    domains[order] = torch.arange(n) % num_domains
    return domains


def apply_domains(images: torch.Tensor, domains: torch.Tensor, specs: Sequence[str], *, seed: int) -> torch.Tensor:
    """``images`` ``(N, C, H, W)`` in [0, 1] with domain ``d``'s transform applied to the
    samples of domain ``d`` (``domains`` ``(N,)``); a new tensor. Noise draws come from a
    generator seeded by ``(seed, d)``, so they are the same on every call."""
    if images.dim() != 4:
        raise ValueError(f"apply_domains: expected images (N, C, H, W); got shape {tuple(images.shape)}")
    out = images.clone()
    for d, spec in enumerate(specs):
        name, strength = parse_domain(spec)
        rows = (domains == d).nonzero().flatten()
        if len(rows):
            gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + d)
            out[rows] = TRANSFORMS[name][0](images[rows], strength, gen)
    return out


class DomainDataset(ArrayDataset):
    """In-memory samples with a domain each: an :class:`~transfuse.data.base.ArrayDataset`
    whose samples and batches carry ``"domain"`` (int64) beside ``input``, ``target``,
    ``index`` and ``sample_id``.

    ``domains`` ``(N,)`` int64 holds every sample's domain; :meth:`subset` and
    :meth:`with_ids` keep it (so a label subset or an expert's domain subset still knows
    its samples' domains).
    """

    def __init__(self, inputs: torch.Tensor, targets: torch.Tensor, domains: Any, *, ids: Any = None) -> None:
        super().__init__(inputs, targets, ids=ids)
        domains = torch.as_tensor(domains)
        if domains.dim() != 1 or len(domains) != len(self.targets):
            raise ValueError(f"DomainDataset: domains must be a 1-d tensor of {len(self.targets)} values (one per "
                             f"sample); got shape {tuple(domains.shape)}")
        if domains.is_floating_point() or domains.dtype == torch.bool:
            raise ValueError(f"DomainDataset: domains must be integers; got {domains.dtype}")
        if len(domains) and int(domains.min()) < 0:
            raise ValueError(f"DomainDataset: domains must be >= 0; found {int(domains.min())}")
        self.domains = domains.long()

    def __getitem__(self, i: int) -> Batch:
        return {**super().__getitem__(i), DOMAIN: self.domains[i]}

    def __getitems__(self, indices: Sequence[int]) -> Batch:
        batch = super().__getitems__(indices)
        batch[DOMAIN] = self.domains[batch["index"]]  # (B,)
        return batch

    def subset(self, indices: torch.Tensor) -> "DomainDataset":
        """A new dataset of the given rows: ``index`` renumbered from 0, ``sample_id`` and ``domain`` kept."""
        indices = torch.as_tensor(indices).long()
        return DomainDataset(self.inputs[indices], self.targets[indices], self.domains[indices], ids=self.sample_ids[indices])

    def with_ids(self, ids: Any) -> "DomainDataset":
        """The same samples (tensors shared) with new sample ids ``(N,)``."""
        return DomainDataset(self.inputs, self.targets, self.domains, ids=ids)

    def of_domains(self, domains: Sequence[int]) -> "DomainDataset":
        """The samples whose domain is in ``domains``, in dataset order."""
        keep = torch.isin(self.domains, torch.as_tensor(list(domains), dtype=torch.long))
        return self.subset(keep.nonzero().flatten())


def _checked_specs(domains: Sequence[str], target_domain: int | None, where: str) -> tuple[str, ...]:
    if isinstance(domains, str) or not isinstance(domains, Sequence) or len(domains) < 2:
        raise ValueError(f"{where}: domains must be a list of at least two domain specs, e.g. "
                         f"{list(DEFAULT_DOMAINS)}; got {domains!r}")
    for spec in domains:
        parse_domain(spec)
    if target_domain is not None and (isinstance(target_domain, bool) or not isinstance(target_domain, int)
                                      or not 0 <= target_domain < len(domains)):
        raise ValueError(f"{where}: target_domain must be a domain index in 0..{len(domains) - 1} (one of "
                         f"{list(domains)}) or null; got {target_domain!r}")
    return tuple(domains)


def _domain_split(images: torch.Tensor, targets: torch.Tensor, specs: tuple[str, ...], seed: int, *,
                  mean: float, std: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One split's transformed images (normalised as the base data set was) and domains."""
    domains = assign_domains(len(targets), len(specs), seed=seed)
    pixels = images * std + mean  # back to [0, 1] (mean 0, std 1: already there)
    out = apply_domains(pixels.clamp(0.0, 1.0), domains, specs, seed=seed)
    return (out - mean) / std, domains


def domain_splits(
    name: str, train: ArrayDataset, test: ArrayDataset, *, domains: Sequence[str], seed: int,
    target_domain: int | None, num_classes: int, input_shape: tuple[int, ...], mean: float = 0.0, std: float = 1.0,
) -> DataSplits:
    """Splits of ``train``/``test`` with synthetic domains (see the module docstring).

    Every sample of each split is assigned a domain (balanced; the two splits are drawn
    independently from ``seed``) and transformed by it. ``target_domain``: that domain's
    samples are removed from the training split and the test split holds only that
    domain's test samples (leave-one-domain-out); None keeps every domain in both.
    ``mean``/``std``: the base data's normalisation, undone for the transforms and redone after.
    """
    specs = _checked_specs(domains, target_domain, name)
    x_train, d_train = _domain_split(train.inputs, train.targets, specs, seed * 2, mean=mean, std=std)
    x_test, d_test = _domain_split(test.inputs, test.targets, specs, seed * 2 + 1, mean=mean, std=std)
    train_set = DomainDataset(x_train, train.targets, d_train, ids=train.sample_ids)
    test_set = DomainDataset(x_test, test.targets, d_test, ids=test.sample_ids)
    if target_domain is not None:
        train_set = train_set.of_domains([d for d in range(len(specs)) if d != target_domain])
        test_set = test_set.of_domains([target_domain])
    return DataSplits(name=name, train=train_set, test=test_set, num_classes=num_classes, input_shape=input_shape)


@DATASETS.register("digits_domains", summary="sklearn digits with synthetic domains (rotation, noise, contrast, ...)")
def digits_domains(
    *, domains: Sequence[str] = DEFAULT_DOMAINS, seed: int = 0, target_domain: int | None = None,
    test_fraction: float = 0.25, split_seed: int = 0,
) -> DataSplits:
    """The ``digits`` splits with each sample in one of ``domains`` (see the module docstring).

    ``target_domain``: hold that domain out (absent from training, the whole test split).
    ``test_fraction``/``split_seed`` as for ``digits``.
    """
    from .digits import digits

    base = digits(test_fraction=test_fraction, split_seed=split_seed)
    return domain_splits("digits_domains", base.train, base.test, domains=domains, seed=seed,
                         target_domain=target_domain, num_classes=base.num_classes, input_shape=base.input_shape)


@functools.lru_cache(maxsize=2)
def _fashion_base(root: str, specs: tuple[str, ...], seed: int) -> DataSplits:
    # Transforming 70,000 images takes a second or two; a benchmark builds the same data
    # for many runs in one process. Callers must not modify the cached tensors in place.
    from .fashion_mnist import MEAN, STD, fashion_mnist

    base = fashion_mnist(root=root)
    return domain_splits("fashion_mnist_domains", base.train, base.test, domains=specs, seed=seed,
                         target_domain=None, num_classes=base.num_classes, input_shape=base.input_shape,
                         mean=MEAN, std=STD)


@DATASETS.register("fashion_mnist_domains", summary="Fashion-MNIST with synthetic domains (rotation, noise, contrast, ...)")
def fashion_mnist_domains(
    *, domains: Sequence[str] = DEFAULT_DOMAINS, seed: int = 0, target_domain: int | None = None, root: str | None = None,
) -> DataSplits:
    """The ``fashion_mnist`` splits with each sample in one of ``domains`` (see the module docstring).

    ``target_domain``: hold that domain out (absent from training, the whole test split).
    ``root``: the folder of the IDX files (default: ``fashion_mnist``'s).
    """
    from .fashion_mnist import DEFAULT_ROOT

    specs = _checked_specs(domains, target_domain, "fashion_mnist_domains")
    full = _fashion_base(str(root or DEFAULT_ROOT), specs, int(seed))
    if target_domain is None:
        return full
    train, test = full.train, full.test
    return DataSplits(name=full.name, train=train.of_domains([d for d in range(len(specs)) if d != target_domain]),
                      test=test.of_domains([target_domain]), num_classes=full.num_classes, input_shape=full.input_shape)


__all__ = ["DEFAULT_DOMAINS", "DOMAIN", "TRANSFORMS", "DomainDataset", "apply_domains", "assign_domains",
           "domain_splits", "parse_domain"]
