"""Data sets as train/test splits of dict samples ``{"input", "target", "index"}``.

Registered names (``DATASETS``): ``digits``, ``fashion_mnist``, ``npz``. Your own data:
:func:`from_tensors` (arrays in memory) or :func:`from_datasets` (torch datasets). See
``docs/models-and-data.md``.
"""

from . import digits, fashion_mnist, tensors  # noqa: F401  (importing registers the data sets)
from .base import DATASETS, ArrayDataset, Batch, DataSplits, collate_batch
from .idx import IDXFormatError, read_idx
from .load import load_dataset
from .subset import stratified_subset
from .tensors import SampleDataset, from_datasets, from_tensors

__all__ = [
    "DATASETS", "ArrayDataset", "Batch", "DataSplits", "IDXFormatError", "SampleDataset", "collate_batch",
    "from_datasets", "from_tensors", "load_dataset", "read_idx", "stratified_subset",
]
