"""What `lmrc show` puts on its page: documents, each method's relations marked against gold, the LLM's answers.

A method is one result file (a `lmrc predict` run, or a row of `lmrc compare`) with what was saved beside it: the
run's summary and its progress file (stage-1 candidates with their scores, the LLM's raw answers and what became of
each answer line). The scores at the top come from `lmrc.eval.metrics.evaluate`, the scorer `lmrc evaluate` and the
summaries use, and each row's right / wrong / missed mark is the same match the scorer counts: a prediction is
right when its (head, tail, relation) is a gold fact of its document. Nothing here is recomputed another way.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmrc.data.docred import Document, load_documents
from lmrc.errors import LmrcError
from lmrc.eval.metrics import Metrics, TrainReference, evaluate, load_predictions, pair_locality
from lmrc.io import read_json, sidecar
from lmrc.predict.run import iter_progress

log = logging.getLogger(__name__)

# A noisy stage 1 predicts thousands of wrong relations per document; the page shows this many per document and
# method (right and missed facts are always shown) and says how many more there were.
MAX_WRONG_ROWS = 1000


@dataclass
class Method:
    """One result file and what was saved beside it."""

    name: str
    mode: str
    predictions: list[dict]  # official result format
    records: dict[str, dict] = field(default_factory=dict)  # title -> the progress file's document record
    summary: dict[str, Any] = field(default_factory=dict)


@dataclass
class Source:
    """What a page shows: documents, methods, and where they came from."""

    docs: list[Document]
    methods: list[Method]
    relation_names: dict[str, str]
    machine: str
    files: list[str]
    train: TrainReference | None = None


# ---------------------------------------------------------------------------------------------- loading


def load_method(result: Path, name: str, mode: str | None = None) -> Method:
    """A result file with its summary and progress file (either may be missing: the page then shows less)."""
    summary_path = sidecar(_unstrict(result), ".summary.json")
    summary = read_json(summary_path) if summary_path.is_file() else {}
    progress = sidecar(_unstrict(result), ".progress.jsonl")
    records = {r["title"]: r for r in iter_progress(progress)} if progress.is_file() else {}
    return Method(name, mode or summary.get("mode", "unknown"), load_predictions(result), records, summary)


def _unstrict(result: Path) -> Path:
    """`x.strict.json` (the strict names of an SBERT-mapped run) shares `x.json`'s summary and progress file."""
    if result.name.endswith(".strict.json"):
        return result.with_name(result.name.removesuffix(".strict.json") + ".json")
    return result


def from_predict_run(
    result: Path, docs_path: Path | None = None, gold_path: Path | None = None, rel_info: Path | None = None
) -> Source:
    """A `lmrc predict` result: its documents (the input it names, or `--text`'s documents beside it), gold when
    the input is labelled or `gold_path` is given."""
    method = load_method(result, result.name.removesuffix(".json"))
    docs_path = docs_path or _docs_of_run(result, method.summary)
    docs = load_documents(docs_path)
    files = [str(result), str(docs_path)]
    if gold_path is not None:
        docs = _with_gold(docs, load_documents(gold_path), gold_path)
        files.append(str(gold_path))
    names = _relation_names(method.summary, rel_info)
    train = _train_reference(method.summary.get("train_reference"))
    machine = method.summary.get("machine", "")
    return Source(docs, [method], names, machine, files, train)


def from_compare_folder(folder: Path, gold_path: Path | None = None, rel_info: Path | None = None) -> Source:
    """Every row of a `lmrc compare` output folder (results.json), side by side, on its evaluation documents."""
    results_path = folder / "results.json"
    if not results_path.is_file():
        raise LmrcError(f"{folder}: no results.json (is this a `lmrc compare` output folder?)")
    results = read_json(results_path)
    docs_path = Path(results["eval"])
    if not docs_path.is_absolute() and not docs_path.is_file():
        docs_path = folder / docs_path
    docs = load_documents(docs_path)
    if gold_path is not None:
        docs = _with_gold(docs, load_documents(gold_path), gold_path)
    methods = []
    for row in results.get("rows", []):
        result = _row_result(folder, row)
        if not result.is_file():
            log.warning("%s: row %r has no result file %s; left out", folder, row["label"], result)
            continue
        methods.append(load_method(result, row["label"], row.get("mode")))
    if not methods:
        raise LmrcError(f"{results_path}: rows: no row with a result file")
    names = _relation_names(methods[0].summary, rel_info)
    train_path = ((results.get("config") or {}).get("eval") or {}).get("train")
    files = [str(results_path), str(docs_path)]
    return Source(docs, methods, names, results.get("machine", ""), files, _train_reference(train_path))


def _row_result(folder: Path, row: dict) -> Path:
    """The result file of a compare row (results.json names it; older folders: the row's name, as rows.py
    spells it)."""
    if row.get("result"):
        return folder / row["result"]
    name = row["label"].removesuffix(" + SBERT")
    slug = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)
    result = folder / "runs" / f"{slug}.json"
    strict = sidecar(result, ".strict.json")
    return strict if row.get("variant") == "strict" and strict.is_file() else result


def _docs_of_run(result: Path, summary: dict) -> Path:
    text_docs = sidecar(_unstrict(result), ".text-docs.json")
    if text_docs.is_file():
        return text_docs
    named = (summary.get("fingerprint") or {}).get("input")
    if named and Path(named).is_file():
        return Path(named)
    raise LmrcError(
        f"{result}: cannot find its documents (the summary names {named or 'none'}); give them with --docs"
    )


def _with_gold(docs: list[Document], gold: list[Document], gold_path: Path) -> list[Document]:
    by_title = {d.title: d for d in gold}
    missing = [d.title for d in docs if d.title not in by_title]
    if missing:
        raise LmrcError(
            f"{gold_path}: no document titled {missing[0]!r} ({len(missing)} of the run's missing)"
        )
    return [by_title[d.title] for d in docs]


def _relation_names(summary: dict, rel_info: Path | None) -> dict[str, str]:
    if rel_info is not None:
        raw = read_json(rel_info)
        if not isinstance(raw, dict):
            raise LmrcError(f"{rel_info}: expected a JSON object mapping relation id to name")
        return {str(k): str(v) for k, v in raw.items()}
    return dict(summary.get("relation_names") or {})


def _train_reference(path: str | None) -> TrainReference | None:
    """The training documents for Ign F1; a config's path may hold $VARS (compare's `${LMRC_DATA_DIR}/...`)."""
    path = os.path.expanduser(os.path.expandvars(path)) if path else None
    if not path or not Path(path).is_file():
        return None
    return TrainReference.from_documents(load_documents(path))


# ---------------------------------------------------------------------------------------------- the payload


def payload(source: Source) -> dict[str, Any]:
    """The page's data: plain JSON (the page escapes nothing itself; every string becomes DOM text)."""
    labelled = bool(source.docs) and all(d.labelled for d in source.docs)
    methods = [
        {
            "name": m.name,
            "mode": m.mode,
            "predictions": len(m.predictions),
            "scores": _scores(evaluate(m.predictions, source.docs, source.train)) if labelled else None,
        }
        for m in source.methods
    ]
    by_title = [_by_title(m.predictions) for m in source.methods]
    known = {d.title for d in source.docs}
    for m, preds in zip(methods, by_title):
        m["unknown_titles"] = sum(len(v) for t, v in preds.items() if t not in known)
    return {
        "format": "lmrc-show",
        "version": 1,
        "machine": source.machine,
        "files": source.files,
        "labelled": labelled,
        "relations": source.relation_names,
        "methods": methods,
        "docs": [_document(d, source.methods, by_title, labelled) for d in source.docs],
    }


def _scores(m: Metrics) -> dict[str, Any]:
    def s(score) -> dict[str, float | int]:
        return {
            "p": score.precision,
            "r": score.recall,
            "f1": score.f1,
            "correct": score.correct,
            "predicted": score.predicted,
            "gold": score.gold,
        }

    return {
        "relation": s(m.relation),
        "ign_f1": m.ign.f1,
        "ign_p": m.ign.precision,
        "intra": s(m.intra),
        "inter": s(m.inter),
        "per_relation": {rid: s(sc) for rid, sc in m.per_relation.items()},
        "invalid_pair": m.counts.invalid_pair,
        "unknown_title": m.counts.unknown_title,
        "duplicates": m.counts.duplicates,
        "train_used": m.train_used,
    }


def _by_title(predictions: Sequence[dict]) -> dict[str, dict[tuple[int, int, str], dict]]:
    """Unique predictions per document, as the scorer de-duplicates them (first one kept)."""
    out: dict[str, dict[tuple[int, int, str], dict]] = {}
    for p in predictions:
        out.setdefault(p["title"], {}).setdefault((p["h_idx"], p["t_idx"], p["r"]), p)
    return out


def _document(
    doc: Document, methods: Sequence[Method], by_title: Sequence[dict], labelled: bool
) -> dict[str, Any]:
    gold = {(f.h, f.t, f.r): f for f in doc.facts or ()}
    facts: dict[tuple[int, int, str], dict[str, Any]] = {}
    for key, f in gold.items():
        facts[key] = {"h": f.h, "t": f.t, "r": f.r, "gold": True, "ev": list(f.evidence), "m": {}}
    hidden: dict[str, int] = {}
    for i, (method, preds) in enumerate(zip(methods, by_title)):
        record = method.records.get(doc.title, {})
        candidates = {(row[0], row[1]): row for row in record.get("candidates", [])}
        found = preds.get(doc.title, {})
        kept = _llm_kept(record)
        not_shown = set([k for k in found if k not in gold][MAX_WRONG_ROWS:])
        if not_shown:
            hidden[str(i)] = len(not_shown)
        for key, p in found.items():
            if key in not_shown:
                continue
            entry = facts.setdefault(
                key, {"h": key[0], "t": key[1], "r": key[2], "gold": False, "ev": [], "m": {}}
            )
            entry["m"][str(i)] = _found(method.mode, key, p, candidates.get(key[:2]), kept)
    rows = sorted(facts.values(), key=lambda f: (not f["gold"], f["h"], f["t"], f["r"]))
    for f in rows:
        f["loc"] = pair_locality(doc, f["h"], f["t"]) if _valid(doc, f["h"], f["t"]) else None
    return {
        "title": doc.title,
        "sents": [list(s) for s in doc.sents],
        "entities": [
            {"type": e.type, "mentions": [[m.sent_id, m.pos[0], m.pos[1], m.name] for m in e.mentions]}
            for e in doc.entities
        ],
        "facts": rows,
        "hidden_wrong": hidden,
        "llm": {str(i): m.records[doc.title]["raw"] for i, m in enumerate(methods) if _raw(m, doc.title)},
        "candidates": {
            str(i): [row[:3] for row in m.records[doc.title].get("candidates", [])]
            for i, m in enumerate(methods)
            if m.records.get(doc.title, {}).get("candidates")
        },
    }


def _raw(method: Method, title: str) -> bool:
    return bool(method.records.get(title, {}).get("raw"))


def _valid(doc: Document, h: int, t: int) -> bool:
    n = len(doc.entities)
    return isinstance(h, int) and isinstance(t, int) and 0 <= h < n and 0 <= t < n and h != t


def _llm_kept(record: dict) -> set[tuple[int, int, str]] | None:
    """The (head, tail, relation) triples the LLM's answer lines gave and alignment kept; None when the run did
    not save what became of its answer lines (runs before lmrc show)."""
    prompts = record.get("raw", [])
    if any("lines" not in prompt for prompt in prompts):
        return None
    return {
        (h, t, r) for prompt in prompts for _, _, _, h, t, r, status in prompt["lines"] if status == "kept"
    }


def _found(
    mode: str, key: tuple, p: dict, candidate: list | None, kept: set[tuple[int, int, str]] | None
) -> dict[str, Any]:
    """How a method found the fact `key`: who named it (stage 1, the LLM, both), stage 1's score, evidence.

    Stage 1 names a relation when its head predicts it for the pair (the candidate's relations); the LLM when an
    answer line aligned to it was kept."""
    stage1_said = mode == "stage1-only" or bool(candidate and key[2] in (candidate[3] or {}))
    if mode == "stage1-only":
        source = "stage 1"
    elif mode == "direct":
        source = "LLM"
    else:
        if kept is None:
            source = "LLM or stage 1" if stage1_said else "LLM"
        else:
            llm_said = key in kept
            source = "both" if stage1_said and llm_said else "stage 1" if stage1_said else "LLM"
    out: dict[str, Any] = {"src": source}
    if candidate is not None:
        margin = (candidate[3] or {}).get(key[2])
        out["score"] = round(float(margin if margin is not None else candidate[2]), 4)
    if p.get("evidence"):
        out["ev"] = list(p["evidence"])
    return out
