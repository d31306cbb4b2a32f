"""The triple parser on a table of malformed LLM outputs, its counts, and a render -> parse round trip."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmrc.stage2.parse import parse_triples, parse_with_stats
from lmrc.stage2.prompts import triple_line

NASTY = [
    ("plain", "(A| country| B)", [("A", "country", "B")]),
    ("extra spaces", "  (  New   York |  located in   |  USA  )  ", [("New York", "located in", "USA")]),
    ("no spaces", "(A|country|B)", [("A", "country", "B")]),
    ("missing both parentheses", "A | country | B", [("A", "country", "B")]),
    ("missing opening parenthesis", "A| country| B)", [("A", "country", "B")]),
    ("missing closing parenthesis", "(A| country| B", [("A", "country", "B")]),
    ("numbering", "1. (A| country| B)\n2) (C| capital| D)", [("A", "country", "B"), ("C", "capital", "D")]),
    ("numbering without parentheses", "1. A| country| B\n(2) C| capital| D", [("A", "country", "B"), ("C", "capital", "D")]),
    ("bullets", "- (A| country| B)\n* C| capital| D\n• (E| father| F)", [("A", "country", "B"), ("C", "capital", "D"), ("E", "father", "F")]),
    ("quotes", "('A'| \"country\"| “B”)", [("A", "country", "B")]),
    ("markdown bold", "**(A| country| B)**", [("A", "country", "B")]),
    ("text before and after", "Sure! Here it is: (A| country| B) Hope this helps.", [("A", "country", "B")]),
    ("several on one line", "(A| r1| B), (C| r2| D) (E| r3| F); and (G| r4| H).", [("A", "r1", "B"), ("C", "r2", "D"), ("E", "r3", "F"), ("G", "r4", "H")]),
    ("several bare on one line", "A| r1| B; C| r2| D", [("A", "r1", "B"), ("C", "r2", "D")]),
    ("head with parentheses", "(Paris (France)| country| France)", [("Paris (France)", "country", "France")]),
    ("tail with parentheses", "(Gus| named after| Conrad S. (Gus) Shinn)", [("Gus", "named after", "Conrad S. (Gus) Shinn")]),
    ("parentheses on both sides, two triples", "(A (x)| r| B (y)) (C| r| D (z))", [("A (x)", "r", "B (y)"), ("C", "r", "D (z)")]),
    ("doubled parentheses", "((A| country| B))", [("A", "country", "B")]),
    ("None answers are skipped", "(A| None| B)\n(C| none| D)\n(E| country| F)", [("E", "country", "F")]),
    ("echoed placeholder is skipped", "(A| -| B)\n(C| country| D)", [("C", "country", "D")]),
    ("empty fields are skipped", "(| country| B)\n(A| | B)\n(A| country| )", []),
    ("duplicates keep first-seen order", "(A| r| B)\n(C| r| D)\n(A| r| B)\n(A|  r |B)", [("A", "r", "B"), ("C", "r", "D")]),
    ("repetition without newlines", "(A| r| B)(A| r| B)(A| r| B)(A| r|", [("A", "r", "B")]),
    ("fullwidth pipes", "(A｜country｜B)", [("A", "country", "B")]),
    ("prose and code fences only", "I cannot answer that.\n```\n---\n", []),
    ("empty output", "", []),
    ("one pipe only", "(A| country)", []),
    ("response header echoed", "### Response:\n(A| country| B)\n### Response:", [("A", "country", "B")]),
    ("windows newlines", "(A| r| B)\r\n(C| r| D)\r\n", [("A", "r", "B"), ("C", "r", "D")]),
    ("name with colon and comma", "(Star Wars: Episode I| publication date| May 19, 1999)", [("Star Wars: Episode I", "publication date", "May 19, 1999")]),
]  # fmt: skip


@pytest.mark.parametrize(("case", "text", "expected"), NASTY, ids=[c[0] for c in NASTY])
def test_parser_reads_nasty_outputs(case, text, expected):
    assert parse_triples(text) == expected


def test_counts_lines_unparsed_none_and_empty():
    text = "Here are the relations:\n\n(A| None| B)\n(A| -| B)\n(C| country| D)\n```\nno triple here\n"
    result = parse_with_stats(text)
    assert result.triples == [("C", "country", "D")]
    # Counted lines: the 3 triple lines and 2 prose lines; the blank line and the fence hold no letters.
    assert (result.n_lines, result.n_unparsed, result.n_none, result.n_empty) == (5, 2, 1, 1)


def test_endless_output_is_parsed_in_linear_time():
    text = "(A| r| B) " * 20_000 + "(A| r"
    assert parse_triples(text) == [("A", "r", "B")]


_word = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGH0123456789.,'&-", min_size=1, max_size=8).filter(
    lambda w: (
        any(c.isalnum() for c in w)
        and w not in ("-",)
        and not w.startswith(("-", "'"))
        and not w.endswith("'")
    )
)
_name = st.lists(st.one_of(_word, _word.map(lambda w: f"({w})")), min_size=1, max_size=4).map(" ".join)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(_name, _word, _name), min_size=1, max_size=5))
def test_rendered_triples_parse_back(triples):
    triples = [(h, r, t) for h, r, t in triples if r.lower() != "none"]
    text = "\n".join(triple_line(*t) for t in triples)
    assert parse_triples(text) == list(dict.fromkeys(triples))
