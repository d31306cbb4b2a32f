"""Prompt templates: golden renderings on a real document, name disambiguation, chunking and truncation."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from lmrc.data.docred import Document, Entity, Mention
from lmrc.data.relations import RelationSet
from lmrc.errors import LmrcError
from lmrc.stage2.prompts import (
    Prompt,
    entity_names,
    plan_prompts,
    render_answer,
    render_prefix,
    render_suffix,
)
from lmrc.stage2.templates import PromptTemplate, default_prompts_dir, load_template, parse_template

REPO = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).resolve().parent / "golden"
GOLDEN_TITLE = "Quokka"  # a short real dev_50 document: 7 entities, 8 facts


def words(s: str) -> int:
    return len(s.split())


def _doc(names_types: list[tuple[str, str]], text: str = "w", facts=()) -> Document:
    sent = tuple(text.split())
    return Document(
        index=0,
        title="T",
        sents=(sent,),
        entities=tuple(Entity(i, (Mention(n, 0, (0, 1), ty),)) for i, (n, ty) in enumerate(names_types)),
        facts=tuple(facts),
    )


TINY_RELS = RelationSet(ids=("P1", "P2"), names={"P1": "country", "P2": "capital"})


def _golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("LMRC_UPDATE_GOLDEN") == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    assert path.is_file(), f"{path} missing; run with LMRC_UPDATE_GOLDEN=1 to create it"
    assert text == path.read_text(encoding="utf-8"), f"{name} differs from the golden file"


@pytest.fixture(scope="module")
def quokka(dev_docs):
    return next(d for d in dev_docs if d.title == GOLDEN_TITLE)


@pytest.mark.parametrize(
    ("mode", "allow_none", "golden"),
    [
        ("rc", False, "rc_quokka.txt"),
        ("rc", True, "rc_none_quokka.txt"),
        ("direct", True, "direct_quokka.txt"),
    ],
)
def test_rendered_prompt_and_answer_match_golden_file(quokka, rel_info, mode, allow_none, golden):
    template = load_template(mode, allow_none=allow_none)
    gold = quokka.relations_by_pair()
    if mode == "direct":
        pairs = quokka.pairs()
    else:
        pairs = list(gold) + ([p for p in quokka.pairs() if p not in gold][:2] if allow_none else [])
    prompts = plan_prompts(quokka, rel_info, pairs, template, words, max_context=100_000)
    names = entity_names(quokka)
    answer = render_answer(prompts[0].pairs, names, gold, rel_info, template)
    _golden(golden, prompts[0].text + answer + "\n")


def test_shipped_templates_follow_the_alpaca_frame_of_the_paper():
    for mode, allow_none in (("rc", False), ("rc", True), ("direct", True)):
        text = load_template(mode, allow_none=allow_none).text
        heads = [line for line in text.splitlines() if line.startswith("### ")]
        assert heads == [
            "### Instruction:",
            "### Relation set:",
            "### Text:",
            "### {n_pairs} Entity pairs:",
            "### Response:",
        ]
        assert "(head entity| -| tail entity)" in text
        assert ("None" in text) == allow_none
        assert text.endswith("### Response:\n")


def test_prefix_is_shared_and_suffix_holds_the_pairs(quokka, rel_info):
    template = load_template("rc")
    prefix, truncated = render_prefix(template, quokka, rel_info)
    assert not truncated
    assert prefix.endswith(quokka.text() + "\n\n")
    assert all(rel_info.name(r) + "\n" in prefix for r in rel_info.ids)
    names = entity_names(quokka)
    suffix = render_suffix(template, [(0, 1), (2, 0)], names)
    assert suffix == (
        f"### 2 Entity pairs:\n({names[0]}| -| {names[1]})\n({names[2]}| -| {names[0]})\n\n### Response:\n"
    )


def test_document_text_with_braces_is_not_expanded():
    doc = _doc([("A", "X"), ("B", "X")], text="{pairs} {{ }} {text} {n_pairs}")
    template = load_template("rc")
    prefix, _ = render_prefix(template, doc, TINY_RELS)
    assert "{pairs} {{ }} {text} {n_pairs}\n" in prefix


def test_conditional_lines_follow_allow_none():
    assert "None" not in load_template("rc").text
    assert "answer None" in load_template("rc", allow_none=True).text
    assert "{if" not in load_template("rc", allow_none=True).text
    assert load_template("direct").allow_none


def test_direct_mode_without_none_is_refused():
    with pytest.raises(LmrcError, match="direct mode always answers None"):
        load_template("direct", allow_none=False)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("### Text:\n{text}\n{pairz}\n", r"line 3: unknown slot \{pairz\}"),
        ("{text}\n{pairs}\n{relations}\n", r"line 3: \{relations\} must come before"),
        ("{text}\n{title}: {n_pairs} pairs\n{pairs}\n", r"line 2: \{title\} must come before"),
        ("{text}\nnote {x\n{pairs}\n", "line 2: stray brace"),
        ("{pairs}\n", r"no \{text\} slot"),
    ],
)
def test_bad_template_is_refused_with_file_and_line(tmp_path, text, message):
    path = tmp_path / "bad.txt"
    path.write_text(text)
    with pytest.raises(LmrcError, match=message) as err:
        load_template("rc", path=path)
    assert str(path) in str(err.value)


def test_literal_braces_are_escaped_by_doubling():
    t = PromptTemplate("rc", "{{json}} {text}\n{pairs}\n", allow_none=False)
    assert render_prefix(t, _doc([("A", "X")], text="hi"), TINY_RELS)[0] == "{json} hi\n"


def test_names_shared_by_entities_get_type_then_number():
    doc = _doc(
        [
            ("Paris", "LOC"),
            ("Paris", "ORG"),
            ("Paris", "LOC"),
            ("Paris (ORG)", "ORG"),
            ("Berlin", "LOC"),
            ("A|B", "X"),
        ]
    )
    # "Paris (ORG)" is another entity's own name, so the ORG Paris needs a number too.
    assert entity_names(doc) == [
        "Paris (LOC 1)",
        "Paris (ORG 2)",
        "Paris (LOC 2)",
        "Paris (ORG)",
        "Berlin",
        "A/B",
    ]


def test_real_document_with_shared_name_keeps_every_pair(dev_docs):
    doc = next(d for d in dev_docs if d.title == "Souvlaki")
    names = entity_names(doc)
    assert len(set(names)) == len(names)
    greek = [i for i, e in enumerate(doc.entities) if e.name == "Greek"]
    assert sorted(names[i] for i in greek) == ["Greek (LOC)", "Greek (MISC)"]


def test_pairs_are_chunked_by_max_pairs_in_order():
    doc = _doc([(c, "X") for c in "ABCDE"])
    pairs = doc.pairs()[:10]
    prompts = plan_prompts(
        doc, TINY_RELS, pairs, load_template("direct"), words, max_context=10_000, max_pairs=4
    )
    assert [len(p.pairs) for p in prompts] == [4, 4, 2]
    assert [pair for p in prompts for pair in p.pairs] == pairs
    assert len({p.prefix for p in prompts}) == 1
    assert all(p.text.startswith(p.prefix) and p.text.endswith("### Response:\n") for p in prompts)


def test_tiny_context_splits_pairs_over_more_prompts():
    doc = _doc([(c, "X") for c in "ABCDE"])
    template = load_template("direct")
    prefix, _ = render_prefix(template, doc, TINY_RELS)
    # Whitespace tokens: suffix = "###", n, "Entity", "pairs:" + 3 per "(A| -| B)" line + "###", "Response:".
    # With 2 answer tokens per pair a prompt of k pairs costs words(prefix) + 6 + 5k; allow k = 3.
    budget = words(prefix) + 6 + 5 * 3
    pairs = doc.pairs()[:10]
    prompts = plan_prompts(
        doc, TINY_RELS, pairs, template, words, budget, max_pairs=18, answer_tokens_per_pair=2
    )
    assert [len(p.pairs) for p in prompts] == [3, 3, 3, 1]
    assert all(words(p.text) + 2 * len(p.pairs) <= budget for p in prompts)
    assert not any(p.truncated_doc for p in prompts)


def test_a_known_answer_length_is_reserved_per_chunk_and_kept_within_the_cap():
    """Constrained answers: the planner reserves the grammar's bound for each chunk (here 7 tokens per pair + 1),
    so a chunk holds fewer pairs than with the 2-token estimate, and never more than the cap on new tokens lets
    the bound grow to."""
    doc = _doc([(c, "X") for c in "ABCDE"])
    template = load_template("direct")
    prefix, _ = render_prefix(template, doc, TINY_RELS)
    pairs = doc.pairs()[:10]

    def bound(chunk):
        return 7 * len(chunk) + 1

    budget = words(prefix) + 6 + 5 * 3
    estimate = plan_prompts(doc, TINY_RELS, pairs, template, words, budget, answer_tokens_per_pair=2)
    sized = plan_prompts(doc, TINY_RELS, pairs, template, words, budget, answer_tokens=bound)
    assert [len(p.pairs) for p in estimate] == [3, 3, 3, 1]
    # a prompt of k pairs costs words(prefix) + 6 + 3k + 7k + 1 <= words(prefix) + 21: k = 1
    assert [len(p.pairs) for p in sized] == [1] * 10
    assert all(words(p.text) + bound(p.pairs) <= budget for p in sized)
    capped = plan_prompts(doc, TINY_RELS, pairs, template, words, 10_000, answer_tokens=bound, answer_cap=22)
    assert [len(p.pairs) for p in capped] == [3, 3, 3, 1]  # 7 * 3 + 1 = 22 <= cap < 7 * 4 + 1
    assert [pair for p in capped for pair in p.pairs] == pairs


def test_document_that_does_not_fit_is_truncated_and_flagged(caplog):
    text = " ".join(f"w{i}" for i in range(500))
    doc = _doc([("A", "X"), ("B", "X"), ("C", "X")], text=text)
    template = load_template("rc")
    fixed = words(render_prefix(template, _doc([("A", "X")], text=""), TINY_RELS)[0])
    budget = fixed + 100 + 6 + 3 + 2  # room for 100 document words and one pair with a 2-token answer
    with caplog.at_level(logging.WARNING, logger="lmrc.stage2.prompts"):
        prompts = plan_prompts(doc, TINY_RELS, doc.pairs(), template, words, budget, answer_tokens_per_pair=2)
    assert len(prompts) == 6 and all(p.truncated_doc for p in prompts)
    assert prompts[0].prefix.endswith(" w98 w99\n\n") and "w100" not in prompts[0].prefix
    assert all(words(p.text) + 2 * len(p.pairs) <= budget for p in prompts)
    assert "truncated from 500 to 100 words" in caplog.text


def test_context_too_small_for_the_template_is_a_clear_error():
    doc = _doc([("A", "X"), ("B", "X")])
    with pytest.raises(LmrcError, match="max_context=50 tokens is too small"):
        plan_prompts(doc, TINY_RELS, doc.pairs(), load_template("rc"), words, max_context=50)


def test_no_pairs_means_no_prompts():
    doc = _doc([("A", "X")])
    assert plan_prompts(doc, TINY_RELS, [], load_template("rc"), words, max_context=4096) == []


def test_answer_lists_every_relation_in_asked_order_and_none_only_when_allowed():
    doc = _doc([("A", "X"), ("B", "X"), ("C", "X")])
    names = entity_names(doc)
    gold = {(1, 0): ["P2", "P1"], (0, 2): ["P1"]}
    pairs = [(1, 0), (2, 1), (0, 2)]
    rc = render_answer(pairs, names, gold, TINY_RELS, load_template("rc"))
    assert rc == "(B| capital| A)\n(B| country| A)\n(A| country| C)"
    direct = render_answer(pairs, names, gold, TINY_RELS, load_template("direct"))
    assert direct == "(B| capital| A)\n(B| country| A)\n(C| None| B)\n(A| country| C)"


def test_prompt_text_is_prefix_plus_suffix():
    p = Prompt(title="T", prefix="a\n", suffix="b\n", pairs=((0, 1),))
    assert p.text == "a\nb\n" and not p.truncated_doc


def test_templates_are_found_and_shipped_in_wheels():
    assert default_prompts_dir() == REPO / "prompts"
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert setuptools["package-dir"]["lmrc.prompts"] == "prompts"
    listed = set(setuptools["packages"])
    on_disk = {
        ".".join(p.parent.relative_to(REPO).parts)
        for p in (REPO / "lmrc").rglob("*.py")
        if "__pycache__" not in p.parts
    }
    assert on_disk <= listed, (
        f"add {sorted(on_disk - listed)} to [tool.setuptools] packages in pyproject.toml"
    )


def test_template_from_saved_text_renders_like_the_file(tmp_path):
    raw = (default_prompts_dir() / "rc.txt").read_text()
    assert parse_template("rc", raw, allow_none=True) == load_template("rc", allow_none=True)


def test_rc_prompts_are_not_capped_at_18_pairs_but_direct_prompts_are(dev_docs, rel_info):
    """LMRC Sec. 3.2: rc asks one prompt per document; the 18-pair cap is the direct baseline's k."""
    from lmrc.stage2.config import Stage2Config

    assert Stage2Config(mode="rc").max_pairs is None
    assert Stage2Config(mode="direct").max_pairs == 18
    doc = max(dev_docs, key=lambda d: len(d.entities))
    pairs = doc.pairs()[:40]
    template = load_template("rc")
    words = lambda text: len(text.split())  # noqa: E731
    uncapped = plan_prompts(doc, rel_info, pairs, template, words, max_context=100_000, max_pairs=None)
    capped = plan_prompts(doc, rel_info, pairs, template, words, max_context=100_000, max_pairs=18)
    assert [len(p.pairs) for p in uncapped] == [40]
    assert [len(p.pairs) for p in capped] == [18, 18, 4]


def test_rc_prompt_with_stage1_hints_matches_golden_file(quokka, rel_info):
    """Each asked pair carries stage 1's best relations from the candidates file's `top` scores."""
    from lmrc.data.candidates import CandidatePair, DocumentCandidates, hint_names

    gold = sorted(quokka.relations_by_pair())
    ids = list(rel_info.ids)
    pairs = tuple(
        CandidatePair(h, t, 1.0 - i / 10, top={ids[i % 7]: 2.0, ids[(i + 3) % 7]: 2.5, ids[9]: -1.0})
        for i, (h, t) in enumerate(gold)
    )
    other = next(p for p in quokka.pairs() if p not in gold)
    dc = DocumentCandidates(quokka.title, pairs + (CandidatePair(*other, 0.1),), len(quokka.entities))
    hints = hint_names(dc, rel_info.names, 2)
    assert all(len(v) == 2 for v in hints.values()) and other not in hints  # no scores, no hint
    (h, t) = gold[0]
    assert hints[(h, t)] == [rel_info.name(ids[3]), rel_info.name(ids[0])]  # best first
    template = load_template("rc", hints=True)
    assert "hints: relation; relation" in template.text and "hints" not in load_template("rc").text
    prompts = plan_prompts(
        quokka, rel_info, sorted(gold + [other]), template, words, max_context=100_000, hints=hints
    )
    _golden("rc_hints_quokka.txt", prompts[0].text)
