"""brat standoff: `NAME.txt` (the text) beside `NAME.ann` (the annotations), a folder of such pairs (searched
recursively) or one of the pair.

`.ann` lines: `T` text-bound annotations (`T1<TAB>Type 0 5<TAB>text`) are the mentions; a discontinuous one
(`0 5;10 15`) is reported and skipped, DocRED mentions being contiguous. `R` relations (`R1<TAB>Rel Arg1:T1
Arg2:T2`) relate the entities of their two arguments. Coreference: `*` lines (`*<TAB>Coref T1 T2 T3`, brat's
Equiv) and `R` relations labelled Coref/Coreference/Equiv/same_as join their mentions into one entity; a `T`
that nothing joins is an entity of its own. `E`, `A`, `M`, `N` and `#` lines are counted and ignored.
"""

from __future__ import annotations

import re
from pathlib import Path

from lmrc.data.importers.common import COREF_LABELS, AnnotatedText, Link, Report, Span, read_text
from lmrc.errors import LmrcError

IGNORED = {"E": "events (E lines)", "A": "attributes (A/M lines)", "M": "attributes (A/M lines)",
           "N": "normalizations (N lines)", "#": "notes (# lines)"}  # fmt: skip
_OFFSETS = re.compile(r"^\d+ \d+(;\d+ \d+)*$")


def read(path: Path, report: Report) -> list[AnnotatedText]:
    out = []
    for title, txt, ann in _pairs(path, report):
        out.append(_read_pair(title, txt, ann, report))
    return out


def _pairs(path: Path, report: Report) -> list[tuple[str, Path, Path]]:
    """(title, .txt, .ann) of every pair; a file without its partner is reported and left out."""
    if not path.exists():
        raise LmrcError(f"{path}: file not found")
    if not path.is_dir():
        if path.suffix not in (".ann", ".txt"):
            raise LmrcError(f"{path}: expected a folder of .txt + .ann files, or one .ann or .txt file")
        txt, ann = path.with_suffix(".txt"), path.with_suffix(".ann")
        for p in (txt, ann):
            if not p.is_file():
                raise LmrcError(f"{p}: file not found (brat needs {txt.name} beside {ann.name})")
        return [(path.stem, txt, ann)]
    stems = sorted(
        {p.relative_to(path).with_suffix("") for p in path.rglob("*") if p.suffix in (".ann", ".txt")}
    )
    if not stems:
        raise LmrcError(f"{path}: no .txt or .ann files in this folder")
    out = []
    for stem in stems:
        txt, ann = path / stem.with_suffix(".txt"), path / stem.with_suffix(".ann")
        if not txt.is_file() or not ann.is_file():
            have, lack = (txt, ann) if txt.is_file() else (ann, txt)
            msg = f"no {lack.name} beside it; document left out"
            report.skip("documents", f"no {lack.suffix} file", str(have), msg)
            continue
        out.append((stem.as_posix(), txt, ann))
    return out


def _read_pair(title: str, txt: Path, ann: Path, report: Report) -> AnnotatedText:
    doc = AnnotatedText(title=title, text=read_text(txt), source=str(ann))
    known: set[str] = set()  # every T id, also those skipped (their relations are reported by the conversion)
    relations: list[tuple[int, str, str]] = []
    for no, line in enumerate(read_text(ann).splitlines(), start=1):
        if not line.strip():
            continue
        ident, _, rest = line.partition("\t")
        kind = ident[:1]
        if kind == "T":
            known.add(ident)
            _text_bound(doc, no, ident, rest, report)
        elif kind in ("R", "*"):
            relations.append((no, ident, rest))
        elif kind in IGNORED:
            report.ignored[IGNORED[kind]] += 1
        else:
            msg = f"line {no}: not a brat annotation line ({line[:40]!r}); ignored"
            report.warn("unknown line", str(ann), msg)
    for no, ident, rest in relations:
        _relation(doc, no, ident, rest, known, report)
    return doc


def _text_bound(doc: AnnotatedText, no: int, ident: str, rest: str, report: Report) -> None:
    where = f"{doc.source}: line {no} ({ident})"
    head, _, text = rest.partition("\t")
    typ, _, offsets = head.partition(" ")
    if not typ or not _OFFSETS.match(offsets):
        msg = f"malformed text-bound annotation {rest[:60]!r} (expected TYPE START END)"
        report.skip("mentions", "malformed line", where, msg)
        return
    pieces = [tuple(int(x) for x in p.split()) for p in offsets.split(";")]
    if len(pieces) > 1:
        spans = ";".join(f"{a}-{b}" for a, b in pieces)
        msg = f"discontinuous span {spans} (DocRED mentions are contiguous); mention skipped"
        report.skip("mentions", "discontinuous span", where, msg)
        return
    (start, end) = pieces[0]
    doc.mentions.append(Span(start, end, typ, ident, f"line {no} ({ident})", text))


def _relation(doc: AnnotatedText, no: int, ident: str, rest: str, known: set[str], report: Report) -> None:
    place = f"line {no} ({ident})"
    where = f"{doc.source}: {place}"
    typ, *args = rest.split() or [""]
    ids = [a.split(":", 1)[1] if ":" in a else a for a in args] if ident.startswith("R") else args
    missing = [i for i in ids if i not in known]
    if missing or (ident.startswith("R") and len(ids) != 2) or len(ids) < 2:
        why = (
            f"names {missing[0]}, not a text-bound annotation of this file"
            if missing
            else "needs two arguments"
        )
        reason = "names a missing entity" if missing else "malformed line"
        report.skip("relations", reason, where, f"relation {typ} {why}; skipped")
        return
    if ident.startswith("*") or typ.casefold() in COREF_LABELS:
        doc.same.extend(zip(ids, ids[1:]))
        report.notes["coreference links"] += len(ids) - 1
        return
    doc.relations.append(Link(ids[0], ids[1], typ, place))
