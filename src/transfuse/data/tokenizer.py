"""Tokenizers for the language-model data sets: characters (built in) or a byte-level BPE.

* :class:`CharTokenizer` -- one token per character of a fixed alphabet; needs nothing.
* :func:`train_bpe` -- train a byte-level BPE (GPT-2 style: every byte is in the base
  alphabet, so any text encodes and decodes back exactly) on a corpus, offline, with the
  ``tokenizers`` library (installed with ``transformers``: ``pip install 'transfuse[hf]'``).
* :func:`save_tokenizer` / :func:`load_tokenizer` -- a folder with ``tokenizer.json`` (the
  file ``transformers``' fast tokenizers read too), so it sits beside saved models.
* :func:`check_same_tokenizer` -- teacher and student must share one tokenizer: the
  token-level losses compare distributions over one vocabulary, position by position.
  Cross-tokenizer distillation is not supported; two tokenizers that differ raise.

Every tokenizer here has ``encode(text) -> list[int]``, ``decode(ids) -> str``,
``vocab_size`` and ``fingerprint()`` (a hash of what decides the token ids: the vocabulary
and merges, the normalizer, the pre-tokenizer and the added tokens).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

#: The file a saved tokenizer lives in (inside its folder).
TOKENIZER_FILE = "tokenizer.json"
#: The end-of-text token a trained BPE reserves (id 0).
END_OF_TEXT = "<|endoftext|>"


def _tokenizers() -> Any:
    try:
        import tokenizers
    except ImportError:
        raise ImportError(
            "the BPE tokenizer needs the `tokenizers` library: pip install 'transfuse[hf]' (it comes with "
            "transformers), or use the built-in character tokenizer (tokenizer: char)"
        ) from None
    return tokenizers


class CharTokenizer:
    """One token per character: ``chars[i]`` has id ``i``. A character outside ``chars`` raises."""

    def __init__(self, chars: str) -> None:
        if not isinstance(chars, str) or not chars:
            raise ValueError("CharTokenizer: chars must be a non-empty string (the alphabet)")
        if len(set(chars)) != len(chars):
            raise ValueError("CharTokenizer: chars must not repeat a character")
        self.chars = chars
        points = np.array([ord(c) for c in chars], dtype=np.uint32)
        sort = np.argsort(points, kind="stable")
        self._points, self._order = points[sort], sort.astype(np.int64)  # sorted code points, their ids

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        """The alphabet of ``text``, sorted by code point (so the same text gives the same ids)."""
        return cls("".join(sorted(set(text))))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> list[int]:
        # A lookup over code points with numpy: a few million characters in well under a second.
        points = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)  # (L,)
        pos = np.searchsorted(self._points, points).clip(max=len(self._points) - 1)
        found = self._points[pos] == points
        if not found.all():
            bad = chr(int(points[np.argmin(found)]))
            raise ValueError(f"CharTokenizer: character {bad!r} is not in the alphabet")
        return self._order[pos].tolist()

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self.chars[int(i)] for i in ids)

    def to_json(self) -> dict[str, Any]:
        return {"type": "char", "chars": self.chars}

    def fingerprint(self) -> str:
        return _hash(self.to_json())

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size})"


class BPETokenizer:
    """A ``tokenizers.Tokenizer`` behind the interface above (``.tokenizer`` is the wrapped one)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    @property
    def vocab_size(self) -> int:
        return int(self.tokenizer.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Iterable[int]) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)

    def token_id(self, token: str) -> int | None:
        return self.tokenizer.token_to_id(token)

    def to_json(self) -> dict[str, Any]:
        return json.loads(self.tokenizer.to_str())

    def fingerprint(self) -> str:
        return _hash(self.to_json())

    def __repr__(self) -> str:
        return f"BPETokenizer(vocab_size={self.vocab_size})"


#: The parts of a ``tokenizer.json`` that decide which ids a text gets. Padding, truncation, the
#: decoder and the post-processor (the special tokens put around a sequence, which
#: ``transformers`` fills in with a do-nothing template) are left out of the comparison.
_ID_DECIDING = ("type", "chars", "model", "normalizer", "pre_tokenizer", "added_tokens")


def _hash(spec: dict[str, Any]) -> str:
    kept = {k: v for k, v in spec.items() if k in _ID_DECIDING}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


def train_bpe(
    texts: Iterable[str] | str,
    *,
    vocab_size: int = 1024,
    min_frequency: int = 2,
    special_tokens: Sequence[str] = (END_OF_TEXT,),
) -> BPETokenizer:
    """A byte-level BPE trained on ``texts`` (a string or an iterable of strings).

    ``vocab_size`` counts the 256 byte tokens, the ``special_tokens`` (ids ``0..``) and the
    merges, so it must exceed ``256 + len(special_tokens)``; training stops early when no
    pair occurs ``min_frequency`` times. Pre-tokenization is GPT-2's (words, numbers and
    punctuation split; a leading space joins the next word). Deterministic for the same
    texts and options. No normalizer: decoding gives the text back byte for byte.
    """
    tk = _tokenizers()
    floor = 256 + len(special_tokens)
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size <= floor:
        raise ValueError(f"train_bpe: vocab_size must be an integer > {floor} (256 bytes + {len(special_tokens)} "
                         f"special token(s)); got {vocab_size!r}")
    if isinstance(min_frequency, bool) or not isinstance(min_frequency, int) or min_frequency < 1:
        raise ValueError(f"train_bpe: min_frequency must be an integer >= 1; got {min_frequency!r}")
    tokenizer = tk.Tokenizer(tk.models.BPE())
    tokenizer.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(special_tokens),
        initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tokenizer.train_from_iterator([texts] if isinstance(texts, str) else texts, trainer=trainer)
    return BPETokenizer(tokenizer)


def save_tokenizer(tokenizer: CharTokenizer | BPETokenizer, folder: str | Path) -> Path:
    """Write ``tokenizer`` to ``folder/tokenizer.json`` (the folder is created); returns the file."""
    path = Path(folder).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    file = path / TOKENIZER_FILE
    if isinstance(tokenizer, BPETokenizer):
        tokenizer.tokenizer.save(str(file))
    elif isinstance(tokenizer, CharTokenizer):
        file.write_text(json.dumps(tokenizer.to_json(), ensure_ascii=False), encoding="utf-8")
    else:
        raise TypeError(f"save_tokenizer: expected a CharTokenizer or BPETokenizer; got {type(tokenizer).__name__}")
    return file


def load_tokenizer(path: str | Path) -> CharTokenizer | BPETokenizer:
    """A tokenizer saved by :func:`save_tokenizer` (or any ``tokenizers`` ``tokenizer.json``):
    ``path`` is the folder or the file itself."""
    file = Path(path).expanduser()
    if file.is_dir():
        file = file / TOKENIZER_FILE
    if not file.is_file():
        raise FileNotFoundError(f"no tokenizer at {path}: expected a folder with {TOKENIZER_FILE} or the file itself")
    text = file.read_text(encoding="utf-8")
    try:
        spec = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{file}: not a tokenizer file (invalid JSON: {err})") from None
    if isinstance(spec, dict) and spec.get("type") == "char":
        return CharTokenizer(spec.get("chars", ""))
    try:
        return BPETokenizer(_tokenizers().Tokenizer.from_str(text))
    except Exception as err:  # the library raises its own exception type for a malformed file
        if isinstance(err, ImportError):
            raise
        raise ValueError(f"{file}: not a tokenizers tokenizer.json ({err})") from None


def fingerprint(tokenizer: Any) -> str:
    """A hash of what decides ``tokenizer``'s token ids: a tokenizer of this module, a
    ``tokenizers.Tokenizer``, or a ``transformers`` fast tokenizer (its backend tokenizer)."""
    if isinstance(tokenizer, (CharTokenizer, BPETokenizer)):
        return tokenizer.fingerprint()
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)  # transformers' PreTrainedTokenizerFast
    to_str = getattr(backend, "to_str", None)
    if not callable(to_str):
        raise TypeError(f"cannot compare tokenizers of type {type(tokenizer).__name__}: expected a CharTokenizer, "
                        "a BPETokenizer, a tokenizers.Tokenizer or a transformers fast tokenizer")
    return _hash(json.loads(to_str()))


def check_same_tokenizer(teacher: Any, student: Any) -> None:
    """Raise ``ValueError`` unless ``teacher`` and ``student`` tokenize identically.

    Token-level distillation compares the two models' distributions over one vocabulary at
    each position: with two tokenizers neither the vocabulary nor the positions line up.
    """
    if fingerprint(teacher) == fingerprint(student):
        return
    sizes = [getattr(t, "vocab_size", None) for t in (teacher, student)]
    detail = f" (vocabulary sizes {sizes[0]} and {sizes[1]})" if sizes[0] != sizes[1] else " (same vocabulary size)"
    raise ValueError(
        f"the teacher's and the student's tokenizers differ{detail}: cross-tokenizer distillation is not supported. "
        "Train the student with the teacher's tokenizer (load_tokenizer on the teacher's folder)"
    )


__all__ = [
    "END_OF_TEXT", "TOKENIZER_FILE", "BPETokenizer", "CharTokenizer", "check_same_tokenizer", "fingerprint",
    "load_tokenizer", "save_tokenizer", "train_bpe",
]
