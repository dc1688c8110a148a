"""The real, human-written background text that tasks plant data into."""

from __future__ import annotations

import functools
import random
from pathlib import Path

from harness.tokenizer import split_words

BACKGROUND_DIR = Path(__file__).with_name("background")
JARGON_FILE = BACKGROUND_DIR / "jargon.txt"

# paragraphs are kept short enough that a planted sentence still fits a 96-token context
MAX_PARAGRAPH_TOKENS = 64


@functools.cache
def background_paragraphs() -> tuple[str, ...]:
    """Jargon File 4.4.7 (public domain) paragraphs of at most 64 tokens, in source order."""
    lines = JARGON_FILE.read_text(encoding="ascii").splitlines()
    # the file repeats a few paragraphs; once each, so no text is both trained on and held out
    unique = dict.fromkeys(lines)
    return tuple(line for line in unique if 0 < len(split_words(line)) <= MAX_PARAGRAPH_TOKENS)


@functools.cache
def background_words() -> frozenset[str]:
    """Every word of the background text: invented names must avoid them."""
    return frozenset(word for text in background_paragraphs() for word in split_words(text))


def shuffled_parts(rng: random.Random, *sizes: int) -> list[list[str]]:
    """The paragraphs in a seeded random order, cut into parts of ``sizes``, then the rest."""
    paragraphs = list(background_paragraphs())
    rng.shuffle(paragraphs)
    parts, start = [], 0
    for size in sizes:
        parts.append(paragraphs[start : start + size])
        start += size
    return [*parts, paragraphs[start:]]
