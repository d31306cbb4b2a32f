"""Read `(head| relation| tail)` triples back from an LLM's answer, without trusting its shape.

The parser works line by line and splits on `|`; the parentheses around a triple are optional, and a name may
itself contain parentheses (`(Paris (France)| country| France)`): a triple's opening parenthesis is the last
unmatched `(` before its first `|`, its closing one the first unmatched `)` after its last `|`. So numbering,
bullets, quotes and text before or after a triple fall away, and several triples on one line are split at the
`)` that closes each one (or at `;` when the model wrote no parentheses). Nothing is ever evaluated.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

NONE_RELATIONS = frozenset({"none"})  # compared case-insensitively; the answer for "no relation" (LMRC)
EMPTY_FIELDS = frozenset({"", "-"})  # '-' is the input pairs' placeholder echoed back (LMRC, Appendix B)

_PIPES = str.maketrans({"｜": "|", "¦": "|"})
_LEAD = re.compile(r"^\s*(?:[-*•·>]+|\(?\d{1,3}[.):]|\d{1,3}\s*-)\s+")
_QUOTES = "\"'`“”‘’«»*_[]"


@dataclass(frozen=True)
class ParseResult:
    triples: list[tuple[str, str, str]]  # stripped raw strings, deduplicated, first-seen order
    n_lines: int  # non-blank lines that hold any letter or digit
    n_unparsed: int  # such lines on which no triple could be read
    n_none: int  # triples answered with relation None (skipped)
    n_empty: int = 0  # triples with an empty or '-' field (skipped)


def _clean(field: str) -> str:
    s = " ".join(field.split())
    prev = None
    while s != prev:  # peel nested quoting such as "'Paris'" or **Paris**
        prev = s
        s = s.strip().strip(_QUOTES + " ").strip()
    return s


def _first_unmatched_close(s: str) -> int:
    depth = 0
    for i, ch in enumerate(s):
        if ch == "(":
            depth += 1
        elif ch == ")":
            if depth == 0:
                return i
            depth -= 1
    return -1


def _last_unmatched_open(s: str) -> int:
    depth = 0
    for i in range(len(s) - 1, -1, -1):
        ch = s[i]
        if ch == ")":
            depth += 1
        elif ch == "(":
            if depth == 0:
                return i
            depth -= 1
    return -1


def _head(part: str) -> str:
    i = _last_unmatched_open(part)
    return part[i + 1 :] if i >= 0 else _LEAD.sub("", part)


def _tail(part: str) -> str:
    i = _first_unmatched_close(part)
    return part[:i] if i >= 0 else part


def _split_boundary(part: str) -> tuple[str, str] | None:
    """Split the text between two triples into (tail of the first, head of the second)."""
    i = _first_unmatched_close(part)
    if i >= 0:
        return part[:i], _head(part[i + 1 :])
    for j in (part.rfind(";"), _last_unmatched_open(part)):
        if j >= 0:
            return part[:j], _head(part[j + 1 :])
    return None


def _line_triples(line: str) -> list[tuple[str, str, str]]:
    """Raw (head, relation, tail) fields on one line: k triples use 2k pipes; a stray odd pipe is ignored."""
    parts = line.split("|")
    k = (len(parts) - 1) // 2
    out: list[tuple[str, str, str]] = []
    head = _head(parts[0])
    for i in range(k):
        relation, rest = parts[2 * i + 1], parts[2 * i + 2]
        if i == k - 1:
            out.append((head, relation, _tail(rest)))
            break
        split = _split_boundary(rest)
        if split is None:
            break
        out.append((head, relation, split[0]))
        head = split[1]
    return out


def parse_with_stats(text: str) -> ParseResult:
    """Parse every line of `text`; see the module docstring for what is tolerated."""
    triples: list[tuple[str, str, str]] = []
    seen: set[tuple[str, str, str]] = set()
    n_lines = n_unparsed = n_none = n_empty = 0
    for raw_line in (text or "").translate(_PIPES).splitlines():
        if not any(ch.isalnum() for ch in raw_line):
            continue
        n_lines += 1
        found = _line_triples(raw_line)
        useful = False
        for h, r, t in found:
            h, r, t = _clean(h), _clean(r), _clean(t)
            if r.lower() in NONE_RELATIONS:
                n_none += 1
                useful = True
                continue
            if h in EMPTY_FIELDS or r in EMPTY_FIELDS or t in EMPTY_FIELDS:
                n_empty += 1
                useful = True
                continue
            useful = True
            if (h, r, t) not in seen:
                seen.add((h, r, t))
                triples.append((h, r, t))
        if not useful:
            n_unparsed += 1
    return ParseResult(
        triples=triples, n_lines=n_lines, n_unparsed=n_unparsed, n_none=n_none, n_empty=n_empty
    )


def parse_triples(text: str) -> list[tuple[str, str, str]]:
    """`(head, relation, tail)` strings from an LLM answer: stripped, deduplicated, in first-seen order.

    Triples whose relation is None, or with an empty or `-` field, are skipped.
    """
    return parse_with_stats(text).triples
