"""DocRED-format documents: typed objects, loading and validation.

A file is a JSON list of documents `{title, sents, vertexSet, labels?}`. Every problem is reported with the
file, the document (index and title) and the field, so that a user can find it in a multi-megabyte file.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any

from lmrc.data.relations import RelationSet
from lmrc.errors import LmrcError
from lmrc.io import read_json

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Mention:
    name: str
    sent_id: int
    pos: tuple[int, int]  # word span [start, end) within sentence `sent_id`
    type: str


@dataclass(frozen=True)
class Entity:
    index: int  # position in the document's vertexSet
    mentions: tuple[Mention, ...]

    @property
    def name(self) -> str:
        return self.mentions[0].name

    @property
    def type(self) -> str:
        return self.mentions[0].type


@dataclass(frozen=True)
class Fact:
    h: int
    t: int
    r: str
    evidence: tuple[int, ...] = ()


@dataclass(frozen=True)
class Document:
    index: int  # position in its file
    title: str
    sents: tuple[tuple[str, ...], ...]
    entities: tuple[Entity, ...]
    facts: tuple[Fact, ...] | None = None  # None: unlabelled (inference input)
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
    # (head type, tail type) pairs that can hold a relation (CDR: Chemical -> Disease); None: every pair.
    pair_types: frozenset[tuple[str, str]] | None = field(default=None, compare=False, repr=False)

    @property
    def labelled(self) -> bool:
        return self.facts is not None

    @cached_property
    def words(self) -> tuple[str, ...]:
        return tuple(w for s in self.sents for w in s)

    @cached_property
    def sent_offsets(self) -> tuple[int, ...]:
        """Word offset of each sentence's first word in the flattened document."""
        out, n = [], 0
        for s in self.sents:
            out.append(n)
            n += len(s)
        return tuple(out)

    def pairs(self) -> list[tuple[int, int]]:
        """The ordered entity pairs (h != t) that can hold a relation, in the fixed order used everywhere in lmrc:
        all of them, or those whose (head, tail) entity types are allowed (`restrict_pairs`)."""
        n = len(self.entities)
        if self.pair_types is None:
            return [(h, t) for h in range(n) for t in range(n) if h != t]
        types = [e.type for e in self.entities]
        return [
            (h, t) for h in range(n) for t in range(n) if h != t and (types[h], types[t]) in self.pair_types
        ]

    def relations_by_pair(self) -> dict[tuple[int, int], list[str]]:
        out: dict[tuple[int, int], list[str]] = {}
        for f in self.facts or ():
            rels = out.setdefault((f.h, f.t), [])
            if f.r not in rels:
                rels.append(f.r)
        return out

    def text(self) -> str:
        return " ".join(" ".join(s) for s in self.sents)


@dataclass(frozen=True)
class Problem:
    severity: str  # "error" or "warning"
    where: str  # "document 3 (\"Title\"): vertexSet[2][0].sent_id"
    message: str

    def format(self, path: str | os.PathLike) -> str:
        return f"{path}: {self.where}: {self.message}"


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _doc_where(i: int, raw: Any) -> str:
    title = raw.get("title") if isinstance(raw, dict) else None
    return f'document {i} ("{title}")' if isinstance(title, str) else f"document {i}"


def validate_raw(data: Any, relations: RelationSet | None = None) -> list[Problem]:
    """All problems of a parsed DocRED JSON value; duplicate facts are warnings, the rest errors."""
    problems: list[Problem] = []

    def err(where: str, msg: str, severity: str = "error") -> None:
        problems.append(Problem(severity, where, msg))

    if not isinstance(data, list):
        err("top level", f"expected a JSON list of documents, got {type(data).__name__}")
        return problems
    seen_titles: dict[str, int] = {}
    for i, doc in enumerate(data):
        where = _doc_where(i, doc)
        if not isinstance(doc, dict):
            err(where, f"expected an object, got {type(doc).__name__}")
            continue
        for key in ("title", "sents", "vertexSet"):
            if key not in doc:
                err(where, f"missing field '{key}'")
        title = doc.get("title")
        if "title" in doc and not isinstance(title, str):
            err(f"{where}: title", f"expected a string, got {type(title).__name__}")
        elif isinstance(title, str):
            if title in seen_titles:
                err(f"{where}: title", f"duplicate title (also document {seen_titles[title]})")
            else:
                seen_titles[title] = i
        sents = doc.get("sents")
        sent_lens: list[int] | None = None
        if "sents" in doc:
            if not isinstance(sents, list):
                err(f"{where}: sents", f"expected a list of sentences, got {type(sents).__name__}")
            else:
                sent_lens = []
                for si, s in enumerate(sents):
                    if not isinstance(s, list) or not all(isinstance(w, str) for w in s):
                        err(f"{where}: sents[{si}]", "expected a list of word strings")
                        sent_lens = None
                        break
                    sent_lens.append(len(s))
        vs = doc.get("vertexSet")
        n_ent: int | None = None
        if "vertexSet" in doc:
            if not isinstance(vs, list):
                err(f"{where}: vertexSet", f"expected a list of entities, got {type(vs).__name__}")
            elif not vs:
                err(f"{where}: vertexSet", "is empty (a document needs at least one entity)")
            else:
                n_ent = len(vs)
                for ei, ent in enumerate(vs):
                    _check_entity(ent, f"{where}: vertexSet[{ei}]", sent_lens, err)
        if "labels" in doc:
            _check_labels(doc["labels"], where, n_ent, sent_lens, relations, err)
    return problems


def _check_entity(ent: Any, where: str, sent_lens: list[int] | None, err) -> None:
    if not isinstance(ent, list):
        err(where, f"expected a list of mentions, got {type(ent).__name__}")
        return
    if not ent:
        err(where, "entity has no mentions")
        return
    for mi, m in enumerate(ent):
        mw = f"{where}[{mi}]"
        if not isinstance(m, dict):
            err(mw, f"expected a mention object, got {type(m).__name__}")
            continue
        for key, ok, want in (
            ("name", lambda v: isinstance(v, str), "a string"),
            ("sent_id", _is_int, "an integer"),
            (
                "pos",
                lambda v: isinstance(v, list) and len(v) == 2 and all(_is_int(x) for x in v),
                "[start, end]",
            ),
        ):
            if key not in m:
                err(mw, f"missing field '{key}'")
            elif not ok(m[key]):
                err(f"{mw}.{key}", f"expected {want}, got {m[key]!r}")
        if "type" in m and not isinstance(m["type"], str):
            err(f"{mw}.type", f"expected a string, got {m['type']!r}")
        sid, pos = m.get("sent_id"), m.get("pos")
        if sent_lens is None or not _is_int(sid):
            continue
        if not 0 <= sid < len(sent_lens):
            err(f"{mw}.sent_id", f"{sid} out of range (document has {len(sent_lens)} sentences)")
            continue
        if isinstance(pos, list) and len(pos) == 2 and all(_is_int(x) for x in pos):
            start, end = pos
            if not (0 <= start < end <= sent_lens[sid]):
                err(f"{mw}.pos", f"{pos} out of range for sentence {sid} ({sent_lens[sid]} words)")


def _check_labels(
    labels: Any,
    where: str,
    n_ent: int | None,
    sent_lens: list[int] | None,
    relations: RelationSet | None,
    err,
) -> None:
    if not isinstance(labels, list):
        err(f"{where}: labels", f"expected a list, got {type(labels).__name__}")
        return
    seen: dict[tuple, int] = {}
    for li, lab in enumerate(labels):
        lw = f"{where}: labels[{li}]"
        if not isinstance(lab, dict):
            err(lw, f"expected an object, got {type(lab).__name__}")
            continue
        bad = False
        for key in ("h", "t"):
            v = lab.get(key)
            if key not in lab:
                err(lw, f"missing field '{key}'")
                bad = True
            elif not _is_int(v):
                err(f"{lw}.{key}", f"expected an integer, got {v!r}")
                bad = True
            elif n_ent is not None and not 0 <= v < n_ent:
                err(f"{lw}.{key}", f"{v} out of range (document has {n_ent} entities)")
                bad = True
        if not bad and lab["h"] == lab["t"]:
            err(lw, f"h and t are the same entity ({lab['h']})")
        r = lab.get("r")
        if "r" not in lab:
            err(lw, "missing field 'r'")
        elif not isinstance(r, str):
            err(f"{lw}.r", f"expected a relation id string, got {r!r}")
        elif relations is not None and r not in relations:
            err(f"{lw}.r", f"unknown relation id {r!r} (not in the relation inventory)")
        ev = lab.get("evidence", [])
        if not isinstance(ev, list) or not all(_is_int(x) for x in ev):
            err(f"{lw}.evidence", f"expected a list of sentence ids, got {ev!r}")
        elif sent_lens is not None and any(not 0 <= x < len(sent_lens) for x in ev):
            err(
                f"{lw}.evidence",
                f"{ev} has a sentence id out of range (document has {len(sent_lens)} sentences)",
            )
        key = (lab.get("h"), lab.get("t"), r)
        if all(isinstance(k, (int, str)) for k in key):
            if key in seen:
                err(
                    lw,
                    f"duplicate fact (h={key[0]}, t={key[1]}, r={key[2]}; also labels[{seen[key]}])",
                    "warning",
                )
            else:
                seen[key] = li


def _build(i: int, raw: dict) -> Document:
    entities = tuple(
        Entity(
            index=ei,
            mentions=tuple(
                Mention(
                    name=m["name"],
                    sent_id=m["sent_id"],
                    pos=(m["pos"][0], m["pos"][1]),
                    type=m.get("type", ""),
                )
                for m in ent
            ),
        )
        for ei, ent in enumerate(raw["vertexSet"])
    )
    facts = None
    if "labels" in raw:
        uniq: dict[tuple[int, int, str], Fact] = {}
        for lab in raw["labels"]:
            key = (lab["h"], lab["t"], lab["r"])
            if key not in uniq:
                uniq[key] = Fact(h=lab["h"], t=lab["t"], r=lab["r"], evidence=tuple(lab.get("evidence", [])))
        facts = tuple(uniq.values())
    extra = {k: v for k, v in raw.items() if k not in ("title", "sents", "vertexSet", "labels")}
    return Document(
        index=i,
        title=raw["title"],
        sents=tuple(tuple(s) for s in raw["sents"]),
        entities=entities,
        facts=facts,
        extra=extra,
    )


def parse_documents(
    data: Any,
    source: str | os.PathLike,
    relations: RelationSet | None = None,
    allow_duplicate_facts: bool = True,
) -> list[Document]:
    """Validate then build documents; refuse bad data with the validator's first message."""
    problems = validate_raw(data, relations)
    errors = [p for p in problems if p.severity == "error" or not allow_duplicate_facts]
    if errors:
        more = (
            f" (and {len(errors) - 1} more problems; run `lmrc data validate {source}`)"
            if len(errors) > 1
            else ""
        )
        raise LmrcError(errors[0].format(source) + more)
    for p in problems:
        log.warning("%s", p.format(source))
    return [_build(i, raw) for i, raw in enumerate(data)]


def load_documents(
    path: str | os.PathLike, relations: RelationSet | None = None, allow_duplicate_facts: bool = True
) -> list[Document]:
    return parse_documents(read_json(path), Path(path), relations, allow_duplicate_facts)


def document_to_raw(doc: Document) -> dict:
    """Back to DocRED JSON; keeps document-level extra fields.

    Mention-level extras (Re-DocRED's `global_pos`, `index`) are not modelled and are lost here, which is why
    `lmrc data split` works on the raw JSON instead.
    """
    raw: dict[str, Any] = {
        "title": doc.title,
        "sents": [list(s) for s in doc.sents],
        "vertexSet": [
            [{"name": m.name, "sent_id": m.sent_id, "pos": list(m.pos), "type": m.type} for m in e.mentions]
            for e in doc.entities
        ],
    }
    if doc.facts is not None:
        raw["labels"] = [{"h": f.h, "t": f.t, "r": f.r, "evidence": list(f.evidence)} for f in doc.facts]
    raw.update(doc.extra)
    return raw


def require_labels(docs: Sequence[Document], path: str | os.PathLike, needed_by: str) -> None:
    """Refuse documents without `labels` where they are needed (training, tuning, scoring, gold pairs), naming
    the first such document."""
    for doc in docs:
        if not doc.labelled:
            raise LmrcError(
                f"{path}: document {doc.index} (\"{doc.title}\"): missing field 'labels' ({needed_by})"
            )


def load_labelled(
    path: str | os.PathLike, relations: RelationSet | None = None, role: str = "gold"
) -> list[Document]:
    """A DocRED file whose documents all carry `labels` (a gold, training or tuning file), and at least one."""
    docs = load_documents(path, relations)
    if not docs:
        raise LmrcError(f"{path}: no documents (a {role} file needs at least one)")
    require_labels(docs, path, f"a {role} file must be labelled")
    return docs


def restrict_pairs(
    docs: Sequence[Document],
    pair_types: Sequence[Sequence[str]] | None,
    source: str | os.PathLike = "documents",
) -> list[Document]:
    """Documents whose candidate pairs are only those of the given (head type, tail type) pairs (typed datasets
    such as CDR: Chemical -> Disease, or GDA: Gene -> Disease). Facts of other pairs cannot be predicted; they are
    dropped with a warning. `pair_types` None or empty: the documents unchanged."""
    if not pair_types:
        return list(docs)
    allowed = frozenset((str(h), str(t)) for h, t in pair_types)
    out, dropped = [], 0
    for d in docs:
        facts = d.facts
        if facts is not None:
            types = [e.type for e in d.entities]
            kept = tuple(f for f in facts if (types[f.h], types[f.t]) in allowed)
            dropped += len(facts) - len(kept)
            facts = kept
        out.append(replace(d, facts=facts, pair_types=allowed))
    if dropped:
        log.warning("%s: %d facts between entity types outside pair_types %s are dropped", source, dropped,
                    sorted(allowed))  # fmt: skip
    return out
