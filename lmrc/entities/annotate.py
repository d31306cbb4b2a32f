"""Gold annotations as character spans, and the alignment of character spans with a segmentation's tokens.

DocRED marks mentions as word spans of its own tokenisation; text input is tokenised by spaCy. Both are brought to
character spans of one text (`detok`), so training labels, the oracle of the round trip and the scores do not
depend on either tokeniser.
"""

from __future__ import annotations

from dataclasses import dataclass

from lmrc.data.docred import Document
from lmrc.entities.detok import DetokText, detokenize
from lmrc.entities.segment import Segmented

Span = tuple[int, int]


@dataclass(frozen=True)
class CharMention:
    span: Span
    type: str


@dataclass(frozen=True)
class Gold:
    """A document as text, with its entities as lists of character-span mentions (vertexSet order)."""

    title: str
    text: str
    entities: tuple[tuple[CharMention, ...], ...]
    detok: DetokText


def gold_of(doc: Document) -> Gold:
    d = detokenize(doc)
    ents = tuple(
        tuple(CharMention(d.char_span(m.sent_id, m.pos), m.type) for m in e.mentions) for e in doc.entities
    )
    return Gold(doc.title, d.text, ents, d)


@dataclass(frozen=True)
class TokenMention:
    """A mention as tokens [start, end) of sentence `sent`, with its type."""

    sent: int
    start: int
    end: int
    type: str


def align_span(seg: Segmented, span: Span) -> tuple[int, int, int] | None:
    """(sentence, first token, end token) of the tokens overlapping `span`, kept in the sentence holding its
    first character; None when no token overlaps. Exact when the span starts and ends on token boundaries."""
    a, b = span
    for si, sent in enumerate(seg.sents):
        if not sent or sent[-1].end <= a:
            continue
        idx = [i for i, t in enumerate(sent) if t.start < b and t.end > a]
        if idx:
            return si, idx[0], idx[-1] + 1
        return None
    return None


def token_char_span(seg: Segmented, m: TokenMention) -> Span:
    s = seg.sents[m.sent]
    return s[m.start].start, s[m.end - 1].end


def is_exact(seg: Segmented, span: Span) -> bool:
    al = align_span(seg, span)
    return al is not None and token_char_span(seg, TokenMention(al[0], al[1], al[2], "")) == span
