"""Data sets as train/test splits of dict samples ``{"input", "target", "index", "sample_id"}``.

``index`` is the position in the current dataset (renumbered by subsets); ``sample_id`` the
position in the original split (kept by subsets). Registered names (``DATASETS``): ``digits``,
``fashion_mnist``, ``npz``, the domain-shifted ``digits_domains`` and ``fashion_mnist_domains``,
and, for causal language models (token rows ``{"input_ids", "attention_mask", "labels"}``),
``shakespeare`` and ``markov``. Your own data: :func:`from_tensors` (arrays in memory) or
:func:`from_datasets` (torch datasets). Unlabelled data: :class:`TransferSet`. See
``docs/models-and-data.md``.
"""

from . import digits, domains, fashion_mnist, markov, shakespeare, tensors  # noqa: F401  (importing registers the data sets)
from .base import DATASETS, ArrayDataset, Batch, DataSplits, collate_batch
from .ids import with_id_offset
from .idx import IDXFormatError, read_idx
from .load import load_dataset
from .subset import stratified_subset
from .tensors import SampleDataset, from_datasets, from_tensors
from .text import IGNORE_INDEX, TokenRows, pack_stream, prompt_completion_rows, shift_labels
from .tokenizer import CharTokenizer, check_same_tokenizer, load_tokenizer, save_tokenizer, train_bpe
from .transfer import IGNORE_TARGET, TransferSet, complement

__all__ = [
    "DATASETS", "IGNORE_TARGET", "ArrayDataset", "Batch", "DataSplits", "IDXFormatError", "SampleDataset",
    "TransferSet", "collate_batch", "complement", "from_datasets", "from_tensors", "load_dataset", "read_idx",
    "stratified_subset", "with_id_offset",
    "IGNORE_INDEX", "TokenRows", "pack_stream", "prompt_completion_rows", "shift_labels",
    "CharTokenizer", "check_same_tokenizer", "load_tokenizer", "save_tokenizer", "train_bpe",
]
