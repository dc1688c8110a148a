"""Rebuild ``jargon.txt`` from the Debian package ``jargon-text``.

The shipped file is the output of this script; it is kept so that anyone can
check how the background text was derived. It needs the package's
``jargon.txt.gz`` (``apt-get download jargon-text`` and ``dpkg -x``), reads only
the lexicon entries and writes one paragraph per line, sorted by nothing but
their order in the source, so the result is byte-for-byte reproducible.

    python tasks/background/build_jargon.py /usr/share/doc/jargon-text/jargon.txt.gz
"""

from __future__ import annotations

import gzip
import re
import sys
import unicodedata
from pathlib import Path

FIRST_ENTRY = ":(TM):"
MIN_WORDS, MAX_WORDS = 12, 70

_ASCII_PUNCTUATION = {
    "\u2018": "'",
    "\u2019": "'",
    "\u201c": '"',
    "\u201d": '"',
    "\u2014": " - ",
    "\u2013": "-",
    "\u2026": "...",
    "\u00b7": "",
}


def to_ascii(text: str) -> str:
    for fancy, plain in _ASCII_PUNCTUATION.items():
        text = text.replace(fancy, plain)
    text = unicodedata.normalize("NFKD", text)
    return text.encode("ascii", "ignore").decode("ascii")


def lexicon_paragraphs(lines: list[str]) -> list[str]:
    start = next(i for i, line in enumerate(lines) if line.strip().startswith(FIRST_ENTRY))
    paragraphs, block = [], []
    for line in [*lines[start:], ""]:
        if line.strip():
            block.append(line.strip())
            continue
        if block:
            paragraphs.append(" ".join(block))
            block = []
    return paragraphs


def is_prose(paragraph: str) -> bool:
    # headwords (":term: /pron/, n."), etymology brackets and tables are not prose
    if paragraph.startswith((":", "[", "|")) or "\u2502" in paragraph:
        return False
    words = paragraph.split()
    return MIN_WORDS <= len(words) <= MAX_WORDS and paragraph.endswith((".", '"', "!", "?"))


def clean(paragraph: str) -> str:
    paragraph = re.sub(r"^\d+\.\s+", "", paragraph)  # sense numbers
    paragraph = paragraph.replace("{", "").replace("}", "")  # cross-reference marks
    return re.sub(r"\s+", " ", to_ascii(paragraph)).strip()


def main(source: str) -> None:
    with gzip.open(source, "rt", encoding="utf-8") as file:
        lines = file.read().splitlines()
    paragraphs = [clean(p) for p in lexicon_paragraphs(lines) if is_prose(p)]
    out = Path(__file__).with_name("jargon.txt")
    out.write_text("\n".join(paragraphs) + "\n", encoding="ascii")
    print(f"wrote {len(paragraphs)} paragraphs to {out}")


if __name__ == "__main__":
    main(sys.argv[1])
