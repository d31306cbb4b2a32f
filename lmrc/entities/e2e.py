"""End-to-end relation scores when the entities were built from text, against the gold documents of that text.

A predicted triple (head, tail, relation) is right when some gold fact has the same relation and a head and tail
that the predicted ones match. Two matchings of a built entity to gold entities (both on character spans of the
same text): strict, its mention set equals the gold entity's (JEREX, Eberts and Ulges, 2021); lenient, it shares
at least one mention span with the gold entity. Precision counts right predicted triples, recall gold facts that
some predicted triple finds; gold documents with no built document count as all missed.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from lmrc.data.docred import Document, load_documents
from lmrc.entities.annotate import gold_of
from lmrc.entities.metrics import PRF
from lmrc.errors import LmrcError
from lmrc.io import read_json

Span = tuple[int, int]


def built_entity_spans(raw: dict, where: str = "document") -> list[frozenset[Span]]:
    """Character spans of each entity's mentions of a built document (it needs its `token_offsets`)."""
    offsets = raw.get("token_offsets")
    if not isinstance(offsets, list):
        raise LmrcError(f"{where}: no token_offsets (not a document built from text by lmrc)")
    out = []
    for ent in raw["vertexSet"]:
        spans = set()
        for m in ent:
            s = offsets[m["sent_id"]]
            a, b = m["pos"]
            spans.add((s[a][0], s[b - 1][1]))
        out.append(frozenset(spans))
    return out


def entity_matches(pred: list[frozenset[Span]], gold: list[frozenset[Span]], strict: bool) -> list[set[int]]:
    """For each predicted entity, the gold entities it stands for."""
    out = []
    for p in pred:
        if strict:
            out.append({g for g, gs in enumerate(gold) if gs == p})
        else:
            out.append({g for g, gs in enumerate(gold) if gs & p})
    return out


def score_triples(
    predictions: Iterable[dict],
    built: dict[str, list[frozenset[Span]]],
    gold: dict[str, tuple[list[frozenset[Span]], set[tuple[int, int, str]]]],
) -> dict[str, dict[str, float]]:
    """Strict and lenient precision / recall / F1 (see the module docstring). `built`: title -> entity spans;
    `gold`: title -> (entity spans, facts (h, t, r))."""
    triples = {(p["title"], p["h_idx"], p["t_idx"], p["r"]) for p in predictions}
    n_gold = sum(len(f) for _, f in gold.values())
    out = {}
    for name, strict in (("strict", True), ("lenient", False)):
        matches = {
            title: entity_matches(spans, gold[title][0], strict)
            for title, spans in built.items()
            if title in gold
        }
        right = 0
        found: set[tuple[str, int, int, str]] = set()
        for title, h, t, r in triples:
            if title not in matches:
                continue
            facts = gold[title][1]
            hit = [
                (gh, gt, r) for gh in matches[title][h] for gt in matches[title][t] if (gh, gt, r) in facts
            ]
            right += bool(hit)
            found.update((title, *f) for f in hit)
        prf = PRF.of(right, len(triples), len(found), n_gold)
        out[name] = {
            **prf.as_dict(),
            "predicted": len(triples),
            "right": right,
            "gold": n_gold,
            "found": len(found),
        }
    return out


def gold_index(docs: list[Document]) -> dict[str, tuple[list[frozenset[Span]], set[tuple[int, int, str]]]]:
    out = {}
    for d in docs:
        g = gold_of(d)
        spans = [frozenset(m.span for m in e) for e in g.entities]
        out[d.title] = (spans, {(f.h, f.t, f.r) for f in d.facts or ()})
    return out


def score_files(result: str | os.PathLike, built: str | os.PathLike, gold: str | os.PathLike) -> dict:
    preds = read_json(result)
    if not isinstance(preds, list):
        raise LmrcError(f"{result}: expected a JSON list of predictions")
    built_raw = read_json(built)
    if not isinstance(built_raw, list):
        raise LmrcError(f"{built}: expected a JSON list of documents")
    b = {r["title"]: built_entity_spans(r, f"{built}: document {i}") for i, r in enumerate(built_raw)}
    g = gold_index(load_documents(gold))
    unknown = sorted({p["title"] for p in preds} - set(b))
    if unknown:
        raise LmrcError(f"{result}: title {unknown[0]!r} is not a document of {built}")
    scores = score_triples(preds, b, g)
    scores["documents"] = {"gold": len(g), "built": len(b), "built_with_gold": len(set(b) & set(g))}
    return scores


def format_scores(scores: dict) -> str:
    lines = []
    for k in ("strict", "lenient"):
        s = scores[k]
        lines.append(
            f"{k:<8} P {100 * s['precision']:.2f}  R {100 * s['recall']:.2f}  F1 {100 * s['f1']:.2f}  "
            f"({s['right']} of {s['predicted']} predicted triples right, {s['found']} of {s['gold']} gold facts found)"
        )
    return "\n".join(lines)
