"""The final files of a prediction run, written from its progress file, and the run's summary.

`write_outputs` streams the progress file once (one document record in memory at a time) into the result file,
the strict-names file (SBERT mapping) and the candidates file (when asked), all atomically, and tallies the
records; `summarize` turns the tally into the summary (`lmrc-predict-summary`: counts, LLM prompts and tokens,
drop reasons, timing, peak memory, and the official scores when the input is labelled).
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmrc.config import expand_path
from lmrc.data.candidates import FORMAT as CANDIDATES_FORMAT
from lmrc.data.candidates import VERSION as CANDIDATES_VERSION
from lmrc.data.candidates import CandidatePair, CandidatesHeader, pair_to_raw
from lmrc.data.docred import Document, load_documents
from lmrc.errors import LmrcError
from lmrc.eval.metrics import PackedPredictions, TrainReference, evaluate
from lmrc.io import JsonStreamWriter, sidecar
from lmrc.machine.hardware import describe_line
from lmrc.predict.build import Pipeline

SUMMARY_FORMAT = "lmrc-predict-summary"


@dataclass
class Tally:
    """What the document records of a run add up to."""

    records: int = 0
    predictions: list[dict] = field(default_factory=list)  # LLM modes (and stage-1 records of older runs)
    packed: list[PackedPredictions] = field(default_factory=list)  # stage-1 relations, as arrays
    strict: list[dict] = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)  # LLM counts (prompts, tokens, answers)
    drops: Counter = field(default_factory=Counter)  # dropped triples by reason
    pairs: Counter = field(
        default_factory=Counter
    )  # candidate pairs: candidates, pairs, positive_pairs, correct
    seconds: float = 0.0
    peaks: dict[str, float] = field(default_factory=dict)  # the largest peak of the processes that ran
    with_prompts: int = 0
    truncated: int = 0
    missing_candidates: int = 0

    def add(self, record: dict, doc: Document) -> None:
        self.records += 1
        counts = record.get("counts", {})
        self.counts.update(counts)
        self.drops.update(record.get("drops", {}))
        self.seconds += record.get("seconds", 0.0)
        for k, v in record.get("peak_memory", {}).items():
            self.peaks[k] = max(self.peaks.get(k, 0.0), v)
        self.with_prompts += int(bool(counts.get("prompts")))
        self.truncated += int(bool(record.get("truncated")))
        self.missing_candidates += int(bool(record.get("missing_candidates")))
        if "candidates" in record:
            rows = record["candidates"]
            self.pairs["candidates"] += len(rows)
            self.pairs["pairs"] += len(doc.pairs())
            if doc.labelled:
                positive = set(doc.relations_by_pair())
                self.pairs["positive_pairs"] += len(positive)
                self.pairs["correct"] += sum((h, t) in positive for h, t, *_ in rows)


def write_outputs(
    pipeline: Pipeline,
    docs: Sequence[Document],
    records: Iterator[dict],
    output_path: Path,
    progress_path: Path,
    save_candidates: Path | None = None,
) -> Tally:
    """Write the result files from the document records (in document order); nothing is written unless every
    document has its record."""
    sbert = pipeline.runner is not None and pipeline.runner.cfg.align.relation_mapping == "sbert"
    by_title = {d.title: d for d in docs}
    tally = Tally()
    result = JsonStreamWriter(output_path)
    writers = [result]
    strict = JsonStreamWriter(sidecar(output_path, ".strict.json")) if sbert else None
    if strict is not None:
        writers.append(strict)
    candidates = _candidates_writer(pipeline, save_candidates) if save_candidates is not None else None
    if candidates is not None:
        writers.append(candidates)
    try:
        for record in records:
            doc = by_title[record["title"]]
            tally.add(record, doc)
            if "packed_predictions" in record:
                packed = _packed(record, progress_path)
                for p in packed.records():
                    result.add(p)
                tally.packed.append(packed)
            for p in record.get("predictions", ()):
                result.add(p)
                tally.predictions.append(p)
            if strict is not None:
                for p in record["strict_predictions"]:
                    strict.add(p)
                    tally.strict.append(p)
            if candidates is not None and "candidates" in record:
                candidates.add(_candidate_entry(record["title"], len(doc.entities), record["candidates"]))
        if tally.records != len(docs):
            raise LmrcError(
                f"{progress_path}: {tally.records} of {len(docs)} documents finished (the run stopped early; "
                "rerun with --resume)"
            )
        for w in writers:
            w.commit()
    finally:
        for w in writers:
            w.discard()
    return tally


def prediction_count(record: dict) -> int:
    """The relation triples of a document record: its `predictions` list, or stage 1's packed array (12 bytes
    a triple: `n` rows of h, t, relation index, so 16 base64 characters a triple)."""
    packed = record.get("packed_predictions")
    n = len(packed["triples"]) * 3 // 4 // 12 if packed is not None else 0
    return n + len(record.get("predictions", ()))


def _packed(record: dict, progress_path: Path) -> PackedPredictions:
    where = f"{progress_path}: document {record['title']!r}: packed_predictions"
    return PackedPredictions.from_raw(record["title"], record["packed_predictions"], where)


def summarize(pipeline: Pipeline, docs: Sequence[Document], tally: Tally, train_path: Path | None) -> dict:
    """The run's summary (`SUMMARY_FORMAT`); the driver adds the fingerprint, shard and timing of this call."""
    summary: dict[str, Any] = {
        "format": SUMMARY_FORMAT,
        "mode": pipeline.mode,
        "documents": len(docs),
        "predictions": len(tally.predictions) + sum(len(p) for p in tally.packed),
        "seconds_per_document": round(tally.seconds / len(docs), 3) if docs else None,
        **tally.peaks,
        "machine": describe_line(),
        # the relation names, for `lmrc show` (the run may have taken them from a model folder that moves)
        "relation_names": dict(pipeline.relations.names),
    }
    if tally.pairs:
        summary["candidates"] = _candidate_summary(tally, len(docs), _all_labelled(docs))
    if pipeline.runner is not None:
        summary["llm"] = _llm_summary(pipeline, tally, len(docs))
    if _all_labelled(docs):
        summary.update(_scores(pipeline, docs, tally, train_path))
    return summary


def _all_labelled(docs: Sequence[Document]) -> bool:
    return bool(docs) and all(d.labelled for d in docs)


def _candidate_summary(tally: Tally, n_docs: int, labelled: bool) -> dict:
    pairs, kept = tally.pairs["pairs"], tally.pairs["candidates"]
    summary: dict[str, Any] = {
        "pairs": pairs,
        "candidates": kept,
        "reduction": kept / pairs if pairs else 0.0,
        "candidates_per_document": kept / n_docs if n_docs else 0.0,
        "documents_missing_candidates": tally.missing_candidates,
    }
    if labelled:
        pos, correct = tally.pairs["positive_pairs"], tally.pairs["correct"]
        summary.update(
            {
                "positive_pairs": pos,
                "correct": correct,
                "recall": correct / pos if pos else 0.0,
                "precision": correct / kept if kept else 0.0,
            }
        )
    return summary


def _llm_summary(pipeline: Pipeline, tally: Tally, n_docs: int) -> dict:
    counts, n = tally.counts, n_docs or 1
    return {
        "relation_mapping": pipeline.runner.cfg.align.relation_mapping,
        "pairs_from": _pairs_source(pipeline),
        "documents_with_prompts": tally.with_prompts,
        "documents_without_pairs": n_docs - tally.with_prompts,
        "documents_truncated": tally.truncated,
        "prompts": counts["prompts"],
        "pairs_asked": counts["pairs"],
        "prompt_tokens": counts["prompt_tokens"],
        "prefill_tokens": counts["prefill_tokens"],
        "generated_tokens": counts["generated_tokens"],
        "prompts_per_document": counts["prompts"] / n,
        "prompt_tokens_per_document": counts["prompt_tokens"] / n,
        "prefill_tokens_per_document": counts["prefill_tokens"] / n,
        "generated_tokens_per_document": counts["generated_tokens"] / n,
        "outputs_hit_token_limit": counts["hit_token_limit"],
        "pairs_cut": counts["pairs_cut"],
        "pairs_kept_by_stage1": counts["pairs_kept_by_stage1"],
        # refine.additions calibrated: LLM relations dropped by the gate (strict names)
        "additions_gated": counts["gated_strict_predictions"] or counts["gated_predictions"],
        "outputs_stopped_on_repeat": counts["stopped_on_repeat"],
        "empty_outputs": counts["empty_outputs"],
        "triples_parsed": counts["triples"],
        "none_answers": counts["none_answers"],
        "out_of_set_before_mapping": counts["out_of_set_before_mapping"],
        "out_of_set_after_mapping": counts["out_of_set_after_mapping"],
        "drops": dict(sorted(tally.drops.items())),
    }


def _pairs_source(pipeline: Pipeline) -> str:
    if pipeline.mode == "direct":
        return "all pairs"
    if pipeline.gold_pairs:
        return "gold pairs"
    return "stage 1" if pipeline.proposer is not None else "candidates file"


def _scores(pipeline: Pipeline, docs: Sequence[Document], tally: Tally, train_path: Path | None) -> dict:
    ref = None
    if train_path is not None:
        ref = TrainReference.from_documents(load_documents(train_path, pipeline.relations))
    scores: dict[str, Any] = {
        "train_reference": str(train_path) if train_path is not None else None,
        "scores": evaluate(tally.predictions, docs, ref, packed=tally.packed).summary(),
    }
    if pipeline.runner is not None and pipeline.runner.cfg.align.relation_mapping == "sbert":
        scores["scores_strict"] = evaluate(tally.strict, docs, ref).summary()
    return scores


def train_path(train: str | None, pipeline: Pipeline) -> Path | None:
    """Training documents for Ign F1: `train`, else the stage-1 or stage-2 training file when it exists."""
    if train is not None:
        return expand_path(train, "train")
    getters: list[Any] = []
    if pipeline.proposer is not None:
        getters.append(lambda: pipeline.proposer.checkpoint.config.data.path("train"))
    if pipeline.runner is not None:
        getters.append(lambda: pipeline.runner.cfg.data.path("train"))
    for get in getters:
        try:
            path = get()
        except LmrcError:
            continue
        if path is not None and Path(path).is_file():
            return Path(path)
    return None


# ------------------------------------------------------------------------------------------ candidates file


def _candidates_writer(pipeline: Pipeline, path: Path) -> JsonStreamWriter:
    """A candidates file streamed document by document: the same bytes as `save_candidates` writes (the
    object's JSON with the documents streamed into its last list)."""
    s1 = pipeline.fingerprint.get("stage1") or {}
    proposer = pipeline.proposer
    header = CandidatesHeader(
        model=s1.get("checkpoint") or s1.get("candidates") or "",
        head=proposer.checkpoint.loss_name if proposer is not None else "unknown",
        threshold=proposer.choice.threshold if proposer is not None else None,
        calibration=dict(proposer.choice.calibration) if proposer is not None else {"method": "default"},
        source=pipeline.fingerprint["input"],
    )
    whole = {
        "format": CANDIDATES_FORMAT,
        "version": CANDIDATES_VERSION,
        "header": dataclasses.asdict(header),
        "documents": [],
    }
    return JsonStreamWriter(path, opening=json.dumps(whole, ensure_ascii=False)[:-2], closing="]}")


def _candidate_entry(title: str, n_entities: int, rows: list[list[Any]]) -> dict:
    pairs = []
    for h, t, score, rels, *top in rows:  # progress files written before `top` was kept have four fields
        pairs.append(pair_to_raw(CandidatePair(h, t, score, rels, top[0] if top else None)))
    return {"title": title, "n_entities": n_entities, "pairs": pairs}
