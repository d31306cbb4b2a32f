"""What annotation tools export -> DocRED documents (`lmrc data import`).

One reader per format (`FORMATS`: name -> `read(path, report) -> [AnnotatedText]`) turns a file into annotated
texts (text, character-offset mentions with entity keys, relations between entity keys); ONE conversion
(`common.to_document`) makes each a DocRED document with lmrc's sentences and tokens plus its `text` and
`token_offsets`. Every problem is one line `FILE: PLACE: PROBLEM` and a count; nothing is dropped silently.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from lmrc.data.importers import brat, doccano, jsonl, labelstudio, pubtator
from lmrc.data.importers.common import AnnotatedText, Report, to_document
from lmrc.data.relations import RelationSet

FORMATS: dict[str, Callable[[Path, Report], list[AnnotatedText]]] = {
    "brat": brat.read,
    "labelstudio": labelstudio.read,
    "doccano": doccano.read,
    "pubtator": pubtator.read,
    "jsonl": jsonl.read,
}


@dataclass
class ImportResult:
    documents: list[dict]  # DocRED JSON documents, with `text`, `token_offsets` and `source`
    relations: dict[str, str]  # relation id -> name of the relations found, sorted by id
    report: Report
    counts: Counter = field(default_factory=Counter)  # documents, entities, mentions, relations converted

    @property
    def problems(self) -> list[str]:
        return self.report.problems


def _unique_titles(docs: list[dict]) -> None:
    seen: Counter = Counter()
    for d in docs:
        seen[d["title"]] += 1
        if seen[d["title"]] > 1:
            d["title"] = f"{d['title']} ({seen[d['title']]})"


def import_file(fmt: str, path: str | os.PathLike, relations: RelationSet | None = None) -> ImportResult:
    """The DocRED documents of an annotation export. `relations`: an inventory; relation types that are neither
    its ids nor its names are reported and skipped. Raises LmrcError for a file that cannot be read at all."""
    report = Report()
    docs = []
    for annotated in FORMATS[fmt](Path(path), report):
        raw = to_document(annotated, report, relations)
        if raw is not None:
            docs.append(raw)
    _unique_titles(docs)
    ids = sorted({lab["r"] for d in docs for lab in d["labels"]})
    names = {r: relations.name(r) if relations is not None and r in relations else r for r in ids}
    counts = Counter(
        documents=len(docs),
        entities=sum(len(d["vertexSet"]) for d in docs),
        mentions=sum(len(e) for d in docs for e in d["vertexSet"]),
        relations=sum(len(d["labels"]) for d in docs),
    )
    return ImportResult(docs, names, report, counts)


def summary_lines(result: ImportResult) -> list[str]:
    """The summary: what was converted, then what was skipped, warned about, ignored and changed, by reason."""
    c = result.counts
    lines = [
        f"converted: {c['documents']} documents, {c['entities']} entities, {c['mentions']} mentions, "
        f"{c['relations']} relations ({len(result.relations)} relation types)"
    ]
    rep = result.report
    for kind in ("documents", "mentions", "relations"):
        if rep.skipped[kind]:
            lines.append(
                f"skipped {kind}: {sum(rep.skipped[kind].values())} ({_by_reason(rep.skipped[kind])})"
            )
    for label, counter in (
        ("kept with a warning", rep.warnings),
        ("ignored", rep.ignored),
        ("notes", rep.notes),
    ):
        if counter:
            lines.append(f"{label}: {_by_reason(counter)}")
    return lines


def _by_reason(counter: Counter) -> str:
    return ", ".join(f"{reason}: {n}" for reason, n in sorted(counter.items()))
