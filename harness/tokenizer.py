"""A word-level tokenizer: lowercase words and single punctuation marks.

Word tokens suit small models on a few hundred thousand words of text: a byte
tokenizer needs about five times the tokens for the same text, and every
planted entity or value becomes one token, so a fact is one prediction.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

_TOKEN = re.compile(r"[a-z0-9]+(?:'[a-z]+)?|[^\sa-z0-9]")

PAD, UNK, BOS = "<pad>", "<unk>", "<bos>"
SPECIALS = (PAD, UNK, BOS)


def split_words(text: str) -> list[str]:
    return _TOKEN.findall(text.lower())


class WordTokenizer:
    """Maps words to ids; words outside the vocabulary become ``<unk>``."""

    def __init__(self, vocabulary: list[str]) -> None:
        if list(vocabulary[: len(SPECIALS)]) != list(SPECIALS):
            raise ValueError(f"vocabulary must start with {SPECIALS}, got {vocabulary[:3]}")
        self.vocabulary = list(vocabulary)
        self._ids = {word: i for i, word in enumerate(self.vocabulary)}
        if len(self._ids) != len(self.vocabulary):
            raise ValueError("vocabulary holds duplicate words")

    @classmethod
    def fit(
        cls, texts: Iterable[str], *, min_count: int, reserved: Iterable[str] = ()
    ) -> WordTokenizer:
        """Keep words seen at least ``min_count`` times, plus every reserved word."""
        counts = Counter(word for text in texts for word in split_words(text))
        frequent = {word for word, count in counts.items() if count >= min_count}
        kept = frequent | {word for text in reserved for word in split_words(text)}
        # sorted by count then word, so the ids do not depend on set order
        ordered = sorted(kept, key=lambda word: (-counts[word], word))
        return cls([*SPECIALS, *ordered])

    @property
    def pad_id(self) -> int:
        return self._ids[PAD]

    @property
    def bos_id(self) -> int:
        return self._ids[BOS]

    def __len__(self) -> int:
        return len(self.vocabulary)

    def encode(self, text: str) -> list[int]:
        unk = self._ids[UNK]
        return [self._ids.get(word, unk) for word in split_words(text)]

    def decode(self, ids: Iterable[int]) -> str:
        return " ".join(self.vocabulary[i] for i in ids)

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.vocabulary), encoding="utf-8")

    @classmethod
    def load(cls, path: Path) -> WordTokenizer:
        return cls(json.loads(path.read_text(encoding="utf-8")))
