"""Sentences and tokens with character offsets: spaCy's rule-based English tokenizer and sentencizer.

Neither needs model weights (`spacy.blank("en")` plus the `sentencizer` pipe), so the step is the same on every
machine. Whitespace tokens (spaCy keeps runs of spaces and newlines as tokens) are dropped: DocRED documents have
none. A blank line always ends a sentence (paragraphs and headings do not run into the next sentence).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

from lmrc.errors import LmrcError

SPACY_HINT = "pip install 'lmrc[text]' (spaCy 3.8)"


@dataclass(frozen=True)
class Token:
    text: str
    start: int
    end: int


@dataclass(frozen=True)
class Segmented:
    """A text cut into sentences of tokens; every token's `text` equals `text[start:end]`."""

    text: str
    sents: tuple[tuple[Token, ...], ...]

    def words(self) -> list[list[str]]:
        return [[t.text for t in s] for s in self.sents]


def require_spacy():
    try:
        import spacy
    except ImportError:
        raise LmrcError(f"text input needs spaCy: {SPACY_HINT}") from None
    return spacy


@lru_cache(maxsize=1)
def _blank_english():
    spacy = require_spacy()
    nlp = spacy.blank("en")
    nlp.add_pipe("sentencizer")
    nlp.max_length = 10**8  # the sentencizer and tokenizer are linear; huge inputs are capped by the reader
    return nlp


_PARAGRAPH = re.compile(r"\n\s*\n")


def segment(text: str, nlp=None) -> Segmented:
    """Sentences and tokens of `text` (one call of the blank English pipeline, or of `nlp` when given)."""
    nlp = nlp or _blank_english()
    sents: list[tuple[Token, ...]] = []
    for para_start, para_end in _paragraphs(text):
        doc = nlp(text[para_start:para_end])
        for sent in doc.sents:
            toks = tuple(
                Token(t.text, para_start + t.idx, para_start + t.idx + len(t.text))
                for t in sent
                if not t.is_space and t.text.strip()
            )
            if toks:
                sents.append(toks)
    return Segmented(text, tuple(sents))


def _paragraphs(text: str) -> list[tuple[int, int]]:
    out, start = [], 0
    for m in _PARAGRAPH.finditer(text):
        out.append((start, m.start()))
        start = m.end()
    out.append((start, len(text)))
    return [(a, b) for a, b in out if text[a:b].strip()]
