"""PubTator text format: blocks separated by blank lines, each `PMID|t|title`, `PMID|a|abstract`, then mention
lines `PMID<TAB>start<TAB>end<TAB>text<TAB>type<TAB>concept id` and relation lines `PMID<TAB>REL<TAB>ID1<TAB>ID2`
(BioCreative CDR: `CID`, chemical-induced disease).

The text is title + " " + abstract, over which PubTator counts its offsets; the title of the document is the PMID.
Mentions of one concept id are one entity; a mention whose id is `-1` or empty is an entity of its own; a
composite id (`D001|D002`, a mention naming two concepts) keeps its first concept, reported. A relation names
two concept ids; its type is its relation id (and name, in the --rel-info inventory).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from lmrc.data.importers.common import AnnotatedText, Link, Report, Span, read_text


@dataclass
class _Block:
    pmid: str
    first_line: int
    title: str = ""
    abstract: str | None = None
    annotations: list[tuple[int, list[str]]] = field(default_factory=list)


def read(path: Path, report: Report) -> list[AnnotatedText]:
    return [_document(path, b, report) for b in _blocks(path, report)]


def _blocks(path: Path, report: Report) -> list[_Block]:
    blocks: list[_Block] = []
    current: _Block | None = None
    for no, line in enumerate(read_text(path).splitlines(), start=1):
        if not line.strip():
            current = None
            continue
        head = line.split("|", 2)
        if len(head) == 3 and head[1] in ("t", "a") and "\t" not in head[0]:
            if current is None or current.pmid != head[0] or (head[1] == "t" and current.title):
                current = _Block(head[0], no)
                blocks.append(current)
            if head[1] == "t":
                current.title = head[2]
            else:
                current.abstract = head[2]
        elif current is not None:
            current.annotations.append((no, line.split("\t")))
        else:
            msg = f"line {no}: not part of a document (expected PMID|t|title first); ignored"
            report.warn("line outside a document", str(path), msg)
    return blocks


def _document(path: Path, block: _Block, report: Report) -> AnnotatedText:
    text = block.title if block.abstract is None else f"{block.title} {block.abstract}"
    doc = AnnotatedText(title=block.pmid, text=text, source=f"{path}: PMID {block.pmid}")
    known: set[str] = set()
    relations = []
    for no, fields in block.annotations:
        where = f"{doc.source}: line {no}"
        if fields[0] != block.pmid:
            msg = f"PMID {fields[0]} inside the block of PMID {block.pmid}; annotation skipped"
            report.skip("mentions", "PMID of another document", where, msg)
        elif len(fields) >= 5 and fields[1].isdigit() and fields[2].isdigit():
            _mention(doc, no, fields, known, report)
        elif len(fields) >= 4:
            relations.append((no, fields))
        else:
            report.skip(
                "mentions", "malformed line", where, f"not a mention or relation line ({fields!r}); skipped"
            )
    for no, fields in relations:
        typ, ids = fields[1], [fields[2], fields[3]]
        missing = [i for i in ids if i not in known]
        if missing:
            msg = (
                f"relation {typ} names missing entity {missing[0]} (no mention has that concept id); skipped"
            )
            report.skip("relations", "names a missing entity", f"{doc.source}: line {no}", msg)
        else:
            doc.relations.append(Link(ids[0], ids[1], typ, f"line {no}"))
    return doc


def _mention(doc: AnnotatedText, no: int, fields: list[str], known: set[str], report: Report) -> None:
    start, end, text, typ = int(fields[1]), int(fields[2]), fields[3], fields[4]
    concept = fields[5].strip() if len(fields) > 5 else ""
    if "|" in concept or ";" in concept:
        first = concept.replace(";", "|").split("|")[0]
        msg = f"composite concept id {concept!r}; the mention is kept as {first!r}"
        report.warn("composite concept id", f"{doc.source}: line {no}", msg)
        known.add(concept)
        concept = first
    if concept in ("", "-1", "-"):
        concept = f"-1 (line {no})"  # an entity of its own
    known.add(concept)
    doc.mentions.append(Span(start, end, typ, concept, f"line {no}", text))
