"""What every importer shares: the annotated text a reader produces (`AnnotatedText`), the ONE conversion of it
into a DocRED document, and the bookkeeping of problems and counts (`Report`).

The conversion cuts the text into sentences and tokens as lmrc's plain-text path does (lmrc.entities.segment:
spaCy's blank English tokenizer and sentencizer), then makes every mention land on token boundaries: a token that
an annotated span starts or ends inside is split there, and sentences that a span crosses are joined. The document
carries `text` and per-token `token_offsets`, the fields of the documents lmrc builds from text, so every mention
points back into the text.
"""

from __future__ import annotations

import bisect
import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from lmrc.data.docred import validate_raw
from lmrc.data.relations import RelationSet
from lmrc.entities.segment import segment
from lmrc.errors import LmrcError

# Relation labels that mean "the same entity" (coreference) in every format that has labelled links.
COREF_LABELS = frozenset({"coref", "coreference", "equiv", "same_as", "same-as", "sameas"})


@dataclass(frozen=True)
class Span:
    """An annotated mention: characters [start, end) of the text, of one entity (mentions with one `entity` key
    are one entity, before the `same` links of the text join keys)."""

    start: int
    end: int
    type: str
    entity: str
    place: str  # for messages: "line 7 (T3)", "task 4: result m7"
    text: str | None = None  # the annotated text, when the format repeats it (checked against the offsets)


@dataclass(frozen=True)
class Link:
    """A relation between two entity keys."""

    head: str
    tail: str
    type: str
    place: str


@dataclass
class AnnotatedText:
    title: str
    text: str
    source: str  # the file (and the place in it) the document comes from: "data/x.ann", "export.json: task 4"
    mentions: list[Span] = field(default_factory=list)
    relations: list[Link] = field(default_factory=list)
    same: list[tuple[str, str]] = field(default_factory=list)  # entity keys that are one entity (coreference)


KINDS = ("documents", "mentions", "relations")


@dataclass
class Report:
    """Every problem as one line `FILE: PLACE: PROBLEM`, and the counts of the summary."""

    problems: list[str] = field(default_factory=list)
    skipped: dict[str, Counter] = field(default_factory=lambda: {k: Counter() for k in KINDS})
    warnings: Counter = field(default_factory=Counter)  # problems whose item was kept
    ignored: Counter = field(default_factory=Counter)  # annotations a format has and lmrc does not use
    notes: Counter = field(default_factory=Counter)  # tokens split, sentences joined

    def skip(self, kind: str, reason: str, where: str, message: str) -> None:
        """A `kind` item ("documents", "mentions", "relations") left out for `reason`."""
        self.problems.append(f"{where}: {message}")
        self.skipped[kind][reason] += 1

    def warn(self, reason: str, where: str, message: str) -> None:
        """A problem whose item was kept (changed as the message says)."""
        self.problems.append(f"{where}: {message}")
        self.warnings[reason] += 1


def _same_text(a: str, b: str) -> bool:
    return " ".join(a.split()) == " ".join(b.split())


def _roots(a: AnnotatedText) -> dict[str, str]:
    """Entity key -> the key standing for its entity (the first-seen key of each group joined by `same`)."""
    order = {
        k: i
        for i, k in enumerate(dict.fromkeys([m.entity for m in a.mentions] + [x for p in a.same for x in p]))
    }
    parent = {k: k for k in order}

    def find(k: str) -> str:
        while parent[k] != k:
            parent[k] = parent[parent[k]]
            k = parent[k]
        return k

    for x, y in a.same:
        rx, ry = find(x), find(y)
        if rx != ry:
            keep, drop = sorted((rx, ry), key=order.__getitem__)
            parent[drop] = keep
    return {k: find(k) for k in parent}


def _check_span(a: AnnotatedText, m: Span, report: Report) -> tuple[int, int] | None:
    """The mention's span with surrounding whitespace trimmed, or None (reported) when it cannot be used."""
    where = f"{a.source}: {m.place}"
    n = len(a.text)
    if not (0 <= m.start < m.end <= n):
        report.skip(
            "mentions", "offsets outside the text or empty", where,
            f"offset {m.start}-{m.end} outside the text ({n} characters) or empty; mention skipped",
        )  # fmt: skip
        return None
    got = a.text[m.start : m.end]
    if m.text is not None and not _same_text(got, m.text):
        report.skip(
            "mentions", "text does not match the offsets", where,
            f"annotated text {m.text!r} does not match the text at {m.start}-{m.end} ({got!r}); mention skipped",
        )  # fmt: skip
        return None
    start = m.start + (len(got) - len(got.lstrip()))
    end = m.end - (len(got) - len(got.rstrip()))
    if start >= end:
        report.skip(
            "mentions", "blank span", where, f"span {m.start}-{m.end} holds only whitespace; mention skipped"
        )
        return None
    return start, end


Kept = tuple[int, int, str, str, str]  # a usable mention: start, end, type, entity root, place


def _kept_mentions(a: AnnotatedText, roots: dict[str, str], report: Report) -> list[Kept]:
    """The usable mentions, by position; exact duplicates (same span, same entity) reported and dropped."""
    out: dict[tuple[int, int, str], Kept] = {}
    for m in a.mentions:
        span = _check_span(a, m, report)
        if span is None:
            continue
        root = roots[m.entity]
        key = (span[0], span[1], root)
        if key in out:
            report.skip(
                "mentions", "duplicate mention", f"{a.source}: {m.place}",
                f"duplicate mention {a.text[span[0]:span[1]]!r} at {span[0]}-{span[1]} (same span, same entity); dropped",
            )  # fmt: skip
            continue
        out[key] = (span[0], span[1], m.type, root, m.place)
    return sorted(out.values(), key=lambda x: (x[0], x[1]))


def _split_tokens(text: str, cuts: list[int], report: Report) -> list[list[tuple[int, int]]]:
    """lmrc's sentences of (start, end) tokens, each token split at the `cuts` (sorted) that fall inside it."""
    sents = []
    for sent in segment(text).sents:
        toks: list[tuple[int, int]] = []
        for t in sent:
            inner = cuts[bisect.bisect_right(cuts, t.start) : bisect.bisect_left(cuts, t.end)]
            edges = [t.start, *inner, t.end]
            toks.extend((x, y) for x, y in zip(edges, edges[1:]) if text[x:y].strip())
            if inner:
                report.notes["tokens split at a mention boundary"] += len(inner)
        sents.append(toks)
    return sents


def _join_sentences(
    sents: list[list[tuple[int, int]]], spans: list[tuple[int, int]], report: Report
) -> list[list[tuple[int, int]]]:
    """Join the sentences that a span crosses (DocRED mentions lie in one sentence)."""
    if not sents:
        return sents
    starts = [s[0][0] for s in sents]
    joined = [False] * len(sents)  # joined[k]: sentence k + 1 continues sentence k
    for start, end in spans:
        i, j = bisect.bisect_right(starts, start) - 1, bisect.bisect_right(starts, end - 1) - 1
        for k in range(max(i, 0), j):
            joined[k] = True
    out = [list(sents[0])]
    for k in range(1, len(sents)):
        if joined[k - 1]:
            out[-1].extend(sents[k])
            report.notes["sentences joined (a mention crossed them)"] += 1
        else:
            out.append(list(sents[k]))
    return out


def _vertex_set(
    a: AnnotatedText, mentions: list[Kept], sents: list[list[tuple[int, int]]], report: Report
) -> tuple[list[list[dict]], dict[str, int]]:
    """The entities (in order of their first mention) and entity root -> index."""
    starts, ends = {}, {}
    for si, s in enumerate(sents):
        for ti, (x, y) in enumerate(s):
            starts[x], ends[y] = (si, ti), (si, ti)
    entities: dict[str, list[dict]] = {}
    for start, end, typ, root, place in mentions:
        if start not in starts or end not in ends or starts[start][0] != ends[end][0]:
            msg = f"span {start}-{end} cannot be placed on lmrc's tokens; mention skipped"
            report.skip("mentions", "not on tokens", f"{a.source}: {place}", msg)
            continue
        (si, ti), (_, tj) = starts[start], ends[end]
        mention = {"name": a.text[start:end], "sent_id": si, "pos": [ti, tj + 1], "type": typ}
        entities.setdefault(root, []).append(mention)
    index = {root: i for i, root in enumerate(entities)}
    return list(entities.values()), index


def _relation_id(typ: str, relations: RelationSet | None) -> str | None:
    """The relation id of a label: the label itself, or (with an inventory) the id whose name it is."""
    if relations is None or typ in relations:
        return typ
    by_name = {relations.name(r).casefold(): r for r in relations.ids}
    return by_name.get(typ.casefold())


def _labels(
    a: AnnotatedText,
    roots: dict[str, str],
    index: dict[str, int],
    relations: RelationSet | None,
    report: Report,
) -> list[dict]:
    labels: list[dict] = []
    seen: set[tuple[int, int, str]] = set()
    for rel in a.relations:
        where = f"{a.source}: {rel.place}"
        h, t = index.get(roots.get(rel.head, "")), index.get(roots.get(rel.tail, ""))
        rid = _relation_id(rel.type, relations)
        if h is None or t is None:
            gone = rel.head if h is None else rel.tail
            msg = f"relation {rel.type} names entity {gone}, which has no kept mention; skipped"
            report.skip("relations", "entity without a kept mention", where, msg)
        elif h == t:
            msg = f"relation {rel.type} links an entity to itself ({rel.head} -> {rel.tail}); skipped"
            report.skip("relations", "entity related to itself", where, msg)
        elif rid is None:
            msg = f"relation type {rel.type!r} is not in the relation inventory (--relations); skipped"
            report.skip("relations", "relation type not in the inventory", where, msg)
        elif (h, t, rid) in seen:
            report.skip(
                "relations",
                "duplicate relation",
                where,
                f"duplicate relation {rel.type} ({rel.head} -> {rel.tail}); dropped",
            )
        else:
            seen.add((h, t, rid))
            labels.append({"h": h, "t": t, "r": rid, "evidence": []})
    return labels


def to_document(a: AnnotatedText, report: Report, relations: RelationSet | None = None) -> dict | None:
    """The DocRED document of an annotated text (with `text`, `token_offsets` and `source`), or None when lmrc
    cannot express it (no usable entity, or a problem `validate_raw` finds): reported, never dropped silently."""
    roots = _roots(a)
    mentions = _kept_mentions(a, roots, report)
    cuts = sorted({x for m in mentions for x in m[:2]})
    sents = _join_sentences(_split_tokens(a.text, cuts, report), [m[:2] for m in mentions], report)
    vertex_set, index = _vertex_set(a, mentions, sents, report)
    labels = _labels(a, roots, index, relations, report)
    if not vertex_set:
        msg = "no usable entity mention (a DocRED document needs at least one entity); document left out"
        report.skip("documents", "no entity", a.source, msg)
        return None
    raw = {
        "title": a.title,
        "sents": [[a.text[x:y] for x, y in s] for s in sents],
        "vertexSet": vertex_set,
        "labels": labels,
        "text": a.text,
        "token_offsets": [[[x, y] for x, y in s] for s in sents],
        "source": a.source,
    }
    errors = [p for p in validate_raw([raw]) if p.severity == "error"]
    if errors:
        msg = f"lmrc cannot express this document ({errors[0].where}: {errors[0].message}); left out"
        report.skip("documents", "not expressible in DocRED", a.source, msg)
        return None
    return raw


def read_text(path: Path) -> str:
    """A UTF-8 text file exactly as it is (no newline translation: annotation offsets count every character)."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise LmrcError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise LmrcError(f"{path}: is a folder, expected a file") from None
    except OSError as exc:
        raise LmrcError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise LmrcError(f"{path}: byte {exc.start}: not UTF-8 text (re-save it as UTF-8)") from None


def parse_json_line(line: str, where: str, report: Report) -> dict | None:
    """One JSON-lines record (an object), or None (reported: the document is left out)."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        report.skip(
            "documents", "malformed JSON line", where, f"malformed JSON: {exc.msg}; document left out"
        )
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
        report.skip(
            "documents", "no text", where, 'expected an object with a "text" string; document left out'
        )
        return None
    return obj


def json_line_records(path: Path, report: Report) -> Iterator[tuple[int, dict]]:
    """The records of a JSON-lines export with their line numbers: blank lines skipped, a bad line reported (and
    its document left out) by parse_json_line."""
    for no, line in enumerate(read_text(path).splitlines(), start=1):
        if line.strip():
            obj = parse_json_line(line, f"{path}: line {no}", report)
            if obj is not None:
                yield no, obj


def as_offset(value: object) -> int | None:
    """A character offset given as an integer (JSON formats); None for anything else."""
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def same_text_key(text: str, start: int, end: int, typ: str) -> str:
    """The entity key of formats without coreference: mentions with identical text and type are one entity."""
    return f'{typ} "{" ".join(text[max(start, 0) : max(end, 0)].split())}"'
