"""A DocRED document back to plain text as a person would write it, with the character span of every token.

Used to measure the entity step on annotated data (the gold mentions become character spans of the text) and for
the round trip (document -> text -> entities -> the same document). The rules are the usual English ones: no space
before closing punctuation and clitics, none after opening brackets, straight double quotes alternate between
opening and closing.
"""

from __future__ import annotations

from dataclasses import dataclass

from lmrc.data.docred import Document

_NO_SPACE_BEFORE = {",", ".", ";", ":", "!", "?", ")", "]", "}", "%", "'s", "'S", "n't", "'re", "'ve", "'ll",
                    "'d", "'m", "''", "...", "-RRB-", "-RSB-"}  # fmt: skip
_NO_SPACE_AFTER = {"(", "[", "{", "``", "$", "-LRB-", "-LSB-"}


@dataclass(frozen=True)
class DetokText:
    """`text` and, for every sentence, the [start, end) character span of each of its tokens."""

    text: str
    spans: tuple[tuple[tuple[int, int], ...], ...]

    def char_span(self, sent_id: int, pos: tuple[int, int]) -> tuple[int, int]:
        """Character span of the word span `pos` [start, end) of sentence `sent_id`."""
        s = self.spans[sent_id]
        return s[pos[0]][0], s[pos[1] - 1][1]


def detokenize(doc: Document) -> DetokText:
    parts: list[str] = []
    spans: list[tuple[tuple[int, int], ...]] = []
    n = 0
    prev: str | None = None
    quote_open = False
    for sent in doc.sents:
        out: list[tuple[int, int]] = []
        for tok in sent:
            space = prev is not None
            if tok in _NO_SPACE_BEFORE or (tok == '"' and quote_open):
                space = False
            if prev is not None and (prev in _NO_SPACE_AFTER or (prev == '"' and quote_open)):
                space = False
            if tok == '"':
                quote_open = not quote_open
            if space:
                parts.append(" ")
                n += 1
            out.append((n, n + len(tok)))
            parts.append(tok)
            n += len(tok)
            prev = tok
        spans.append(tuple(out))
    return DetokText("".join(parts), tuple(spans))
