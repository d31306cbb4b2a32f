"""The candidates file: stage 1's scored entity pairs, read by stage 2 and the pipeline.

Schema (JSON object, version 1)::

    {
      "format": "lmrc-candidates", "version": 1,
      "header": {
        "model": "<checkpoint dir or name>", "head": "atl", "threshold": 0.0,
        "calibration": {"method": "default" | "recall_target" | "max_per_doc" | "manual", ...},
        "source": "<input documents path>"
      },
      "documents": [
        {"title": "...", "n_entities": 12,
         "pairs": [{"h": 0, "t": 3, "score": 2.7, "relations": {"P17": 3.1}}, ...]}
      ]
    }

`pairs` lists the candidates only (pairs that passed the threshold), best score first. `score` is the
candidate score of the head (sigmoid probability for `bce`, the margin max_r logit_r - threshold for the
multi-label heads); `relations` (optional) holds the relations a multi-label head predicted, with their margins;
`top` (optional) the head's best relations by margin whether predicted or not (stage-2 hints).
"""

from __future__ import annotations

import math
import os
from collections.abc import Collection, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from lmrc.data.docred import Document
from lmrc.errors import LmrcError
from lmrc.io import atomic_write_json, read_json

FORMAT = "lmrc-candidates"
VERSION = 1


@dataclass(frozen=True)
class CandidatePair:
    h: int
    t: int
    score: float
    relations: dict[str, float] | None = None
    top: dict[str, float] | None = None  # multi-label heads: the best relations by margin, predicted or not


@dataclass(frozen=True)
class DocumentCandidates:
    title: str
    pairs: tuple[CandidatePair, ...]
    n_entities: int | None = None


@dataclass
class CandidatesHeader:
    model: str
    head: str
    threshold: float | None
    calibration: dict[str, Any] = field(default_factory=lambda: {"method": "default"})
    source: str | None = None


@dataclass
class Candidates:
    header: CandidatesHeader
    documents: list[DocumentCandidates]

    def by_title(self) -> dict[str, DocumentCandidates]:
        return {d.title: d for d in self.documents}


def _num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _error(source: str | os.PathLike, where: str, msg: str) -> LmrcError:
    return LmrcError(f"{source}: {where}: {msg}")


def _is_count(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def parse_candidates(raw: Any, source: str | os.PathLike) -> Candidates:
    """A candidates file's JSON, checked field by field; errors name the file and the place."""
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise _error(source, "top level", f'not an lmrc candidates file (expected "format": "{FORMAT}")')
    if raw.get("version") != VERSION:
        raise _error(
            source, "version", f"unsupported version {raw.get('version')!r} (this lmrc reads {VERSION})"
        )
    header = _parse_header(raw.get("header"), source)
    docs_raw = raw.get("documents")
    if not isinstance(docs_raw, list):
        raise _error(source, "documents", "expected a list")
    docs, titles = [], set()
    for di, d in enumerate(docs_raw):
        where = f"documents[{di}]"
        if not isinstance(d, dict) or not isinstance(d.get("title"), str):
            raise _error(source, where, "expected an object with a string 'title'")
        if d["title"] in titles:
            raise _error(source, f"{where}.title", f"duplicate title {d['title']!r}")
        titles.add(d["title"])
        docs.append(_parse_document(d, where, source))
    return Candidates(header=header, documents=docs)


def _parse_header(h: Any, source: str | os.PathLike) -> CandidatesHeader:
    if not isinstance(h, dict) or not isinstance(h.get("model"), str) or not isinstance(h.get("head"), str):
        raise _error(source, "header", "expected an object with string fields 'model' and 'head'")
    thr = h.get("threshold")
    if thr is not None and not _num(thr):
        raise _error(source, "header.threshold", f"expected a number or null, got {thr!r}")
    cal = h.get("calibration")
    if cal is not None and not isinstance(cal, dict):
        raise _error(source, "header.calibration", f"expected an object, got {cal!r}")
    if h.get("source") is not None and not isinstance(h["source"], str):
        raise _error(source, "header.source", f"expected a string or null, got {h['source']!r}")
    return CandidatesHeader(
        model=h["model"],
        head=h["head"],
        threshold=thr,
        calibration=h.get("calibration") or {"method": "default"},
        source=h.get("source"),
    )


def _parse_document(d: dict, where: str, source: str | os.PathLike) -> DocumentCandidates:
    n_ent = d.get("n_entities")
    if n_ent is not None and not _is_count(n_ent):
        raise _error(source, f"{where}.n_entities", f"expected a non-negative integer, got {n_ent!r}")
    pairs_raw = d.get("pairs")
    if not isinstance(pairs_raw, list):
        raise _error(source, f"{where}.pairs", "expected a list")
    seen_pairs: set[tuple[int, int]] = set()
    pairs = [
        _parse_pair(p, f"{where}.pairs[{pi}]", n_ent, seen_pairs, source) for pi, p in enumerate(pairs_raw)
    ]
    return DocumentCandidates(title=d["title"], pairs=tuple(pairs), n_entities=n_ent)


def _parse_pair(
    p: Any, pw: str, n_ent: int | None, seen_pairs: set[tuple[int, int]], source: str | os.PathLike
) -> CandidatePair:
    """One pair, checked; `seen_pairs` (the document's pairs so far) catches a repeat."""
    if not isinstance(p, dict):
        raise _error(source, pw, "expected an object")
    for k in ("h", "t"):
        v = p.get(k)
        if not _is_count(v):
            raise _error(source, f"{pw}.{k}", f"expected a non-negative integer, got {v!r}")
        if n_ent is not None and v >= n_ent:
            raise _error(source, f"{pw}.{k}", f"{v} out of range (document has {n_ent} entities)")
    if p["h"] == p["t"]:
        raise _error(source, pw, f"h and t are the same entity ({p['h']})")
    if (p["h"], p["t"]) in seen_pairs:
        raise _error(source, pw, f"duplicate pair (h={p['h']}, t={p['t']})")
    seen_pairs.add((p["h"], p["t"]))
    if not _num(p.get("score")):
        raise _error(source, f"{pw}.score", f"expected a finite number, got {p.get('score')!r}")
    rels = p.get("relations")
    if rels is not None and not (isinstance(rels, dict) and all(_num(v) for v in rels.values())):
        raise _error(source, f"{pw}.relations", "expected an object mapping relation id to a number")
    top = p.get("top")
    if top is not None and not (isinstance(top, dict) and all(_num(v) for v in top.values())):
        raise _error(source, f"{pw}.top", "expected an object mapping relation id to a number")
    return CandidatePair(h=p["h"], t=p["t"], score=float(p["score"]), relations=rels, top=top)


def load_candidates(path: str | os.PathLike) -> Candidates:
    return parse_candidates(read_json(path), path)


def pair_to_raw(p: CandidatePair) -> dict[str, Any]:
    """A pair as the candidates file writes it (optional fields only when set)."""
    item: dict[str, Any] = {"h": p.h, "t": p.t, "score": p.score}
    if p.relations is not None:
        item["relations"] = p.relations
    if p.top is not None:
        item["top"] = p.top
    return item


def candidates_to_raw(c: Candidates) -> dict:
    docs = []
    for d in c.documents:
        entry: dict[str, Any] = {"title": d.title}
        if d.n_entities is not None:
            entry["n_entities"] = d.n_entities
        entry["pairs"] = [pair_to_raw(p) for p in d.pairs]
        docs.append(entry)
    return {"format": FORMAT, "version": VERSION, "header": asdict(c.header), "documents": docs}


def save_candidates(c: Candidates, path: str | os.PathLike) -> None:
    atomic_write_json(path, candidates_to_raw(c))


def hint_names(dc: DocumentCandidates, names: dict[str, str], k: int) -> dict[tuple[int, int], list[str]]:
    """Stage 1's k best relations of each candidate pair, as relation names (best first): the rc prompt's hints.

    From `top` (the head's best relations, predicted or not), else `relations` (the predicted ones)."""
    out = {}
    for p in dc.pairs:
        ranked = p.top if p.top else p.relations
        if ranked:
            best = sorted(ranked.items(), key=lambda kv: (-kv[1], kv[0]))[:k]
            out[(p.h, p.t)] = [names[rid] for rid, _ in best if rid in names]
    return out


def match_candidates(
    candidates: Candidates,
    docs: Sequence[Document],
    candidates_path: str | os.PathLike,
    input_path: str | os.PathLike,
    relation_ids: Collection[str] | None = None,
) -> list[DocumentCandidates | None]:
    """Each document's candidates (None where the file has no entry), refusing a file made for other documents
    (no title matches, entity counts or indices that do not fit) or another relation set."""
    by_title = {dc.title: (i, dc) for i, dc in enumerate(candidates.documents)}
    out: list[DocumentCandidates | None] = []
    for d in docs:
        hit = by_title.get(d.title)
        if hit is None:
            out.append(None)
            continue
        i, dc = hit
        n = len(d.entities)
        if dc.n_entities is not None and dc.n_entities != n:
            raise LmrcError(
                f'{candidates_path}: documents[{i}] ("{dc.title}"): n_entities={dc.n_entities}, but {input_path} '
                f"has {n} entities for this document (candidates from another file?)"
            )
        for j, p in enumerate(dc.pairs):
            if p.h >= n or p.t >= n:
                raise LmrcError(
                    f"{candidates_path}: documents[{i}].pairs[{j}]: entity {max(p.h, p.t)} out of range "
                    f'(document "{dc.title}" has {n} entities)'
                )
            if relation_ids is not None and (p.relations or p.top):
                unknown = sorted((set(p.relations or ()) | set(p.top or ())) - set(relation_ids))
                if unknown:
                    raise LmrcError(
                        f"{candidates_path}: documents[{i}].pairs[{j}].relations: relation {unknown[0]!r} is not "
                        "in the relation set of the models (candidates for another relation set?)"
                    )
        out.append(dc)
    if docs and all(m is None for m in out):
        raise LmrcError(
            f"{candidates_path}: no document title matches {input_path} (candidates for other documents?)"
        )
    return out
