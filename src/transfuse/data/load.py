"""``load_dataset``: a registered data set by name, its options checked against its signature first."""

from __future__ import annotations

from typing import Any

from .base import DATASETS, DataSplits


def load_dataset(name: str, **options: Any) -> DataSplits:
    """The registered data set ``name`` with ``options``.

    An unknown name raises :class:`~transfuse.registry.UnknownNameError` listing the valid
    ones; an option the data set does not take raises ``ValueError`` naming it.
    """
    DATASETS.check_options(name, options, where="load_dataset")
    return DATASETS.get(name)(**options)
