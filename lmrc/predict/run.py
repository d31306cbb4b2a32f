"""The one prediction driver (`lmrc predict`, and `lmrc stage2 predict` through it): stage 1 then stage 2 over a
corpus, streamed batch by batch, resumable and shardable.

The input is cut into fixed batches of `docs_per_batch` documents (by document order). For each batch, the pairs to
ask about come from their source (stage 1 run on the batch, a candidates file, the documents' gold pairs, or all
pairs for a direct adapter), stage 2 classifies them, and the batch's records (one per document: candidates,
predictions, counts, raw answers) are appended to `<output>.progress.jsonl` as one line. Nothing else is held
across batches, so memory stays flat in the number of documents.

Exactness: a batch's results depend only on the batch (its documents are encoded and generated together, in a
fixed order), so a run that was killed and resumed (`resume`: finished batches are skipped, a torn last line is
dropped and its batch redone) and a run split into shards (`Shard`: whole batches, contiguous) produce the same
bytes as one uninterrupted run. The final files are written from the progress file, atomically
(`lmrc.predict.outputs`):

- `<output>`: the official result file (a JSON list of {title, h_idx, t_idx, r});
- `<output stem>.strict.json`: strict relation names, when stage 2 maps names with SBERT;
- `<output stem>.summary.json`: models and settings (the run's fingerprint), counts, timing, peak memory, and
  the official scores when the input is labelled.

`debug_out` appends, per document, the LLM's raw answers, parsed triples, alignment and drop reasons (JSON lines).
"""

from __future__ import annotations

import json
import logging
import os
import resource
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmrc.data.candidates import CandidatePair, DocumentCandidates
from lmrc.data.docred import Document
from lmrc.errors import LmrcError
from lmrc.eval.metrics import PackedPredictions
from lmrc.io import append_jsonl, atomic_write_json, open_progress, sidecar
from lmrc.machine.hardware import gpu_memory
from lmrc.predict.build import Pipeline, build_pipeline
from lmrc.predict.config import PredictConfig
from lmrc.predict.outputs import prediction_count, summarize, train_path, write_outputs
from lmrc.progress import Progress

log = logging.getLogger(__name__)

PROGRESS_FORMAT = "lmrc-predict-progress"


# ---------------------------------------------------------------------------------------------------- shards


@dataclass(frozen=True)
class Shard:
    """Shard `index` of `count` (0-based): a contiguous run of whole batches, so shards merge exactly."""

    index: int
    count: int

    @classmethod
    def parse(cls, spec: str) -> Shard:
        index, sep, count = spec.partition("/")
        try:
            i, n = int(index), int(count)
        except ValueError:
            raise LmrcError(
                f"--shard {spec}: expected i/n, e.g. 0/4 (shard i of n, i from 0 to n-1)"
            ) from None
        if not sep or n < 1:
            raise LmrcError(f"--shard {spec}: expected i/n with n >= 1, e.g. 0/4")
        if not 0 <= i < n:
            raise LmrcError(
                f"--shard {spec}: shard index must be between 0 and {n - 1} (shards count from 0)"
            )
        return cls(i, n)

    def batches(self, n_batches: int) -> range:
        return range(self.index * n_batches // self.count, (self.index + 1) * n_batches // self.count)

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def batch_ranges(n_docs: int, docs_per_batch: int) -> list[range]:
    return [range(s, min(s + docs_per_batch, n_docs)) for s in range(0, n_docs, docs_per_batch)]


# ------------------------------------------------------------------------------------------------ one batch


def _candidate_rows(dc: DocumentCandidates | None) -> list[list[Any]]:
    if dc is None:
        return []
    # [h, t, score, relations] and, when stage 1 gave it, the pair's best relations (`top`: hints, choices)
    return [[p.h, p.t, p.score, p.relations, *([p.top] if p.top is not None else [])] for p in dc.pairs]


def run_batch(pipeline: Pipeline, docs: Sequence[Document]) -> tuple[list[dict], list[dict]]:
    """The records of one batch (stage 1 if any, then stage 2 on its pairs if any) and, when the LLM ran, one
    debug record per document (raw answers, parsed triples, alignment, drops)."""
    t0 = time.perf_counter()
    found: list[DocumentCandidates | None] = [None] * len(docs)
    rel_preds: list[PackedPredictions] | None = None
    if pipeline.proposer is not None and pipeline.mode != "direct":
        proposed, rel_preds = pipeline.proposer.propose(docs)
        found = list(proposed)
    elif pipeline.candidates is not None:
        found = [pipeline.candidates[d.index] for d in docs]
    debug: list[dict] = []
    if pipeline.mode == "stage1-only":
        assert rel_preds is not None
        # the relations as arrays (PackedPredictions), not dicts: a noisy head predicts hundreds of thousands
        records = [
            {
                "title": doc.title,
                "index": doc.index,
                "candidates": _candidate_rows(dc),
                "packed_predictions": preds.to_raw(),
                "counts": {},
                "drops": {},
            }
            for doc, dc, preds in zip(docs, found, rel_preds)
        ]
    else:
        records, debug = _llm_records(pipeline, docs, found)
    share = round((time.perf_counter() - t0) / max(1, len(docs)), 3)
    for r in records:
        r["seconds"] = share
    return records, debug


def _pairs_to_ask(pipeline: Pipeline, doc: Document, dc: DocumentCandidates | None) -> list[tuple[int, int]]:
    """The pairs the LLM is asked about, in canonical order: all (direct), the gold relation pairs, or the
    candidates that refine does not settle from stage 1 alone."""
    if pipeline.mode == "direct":
        return doc.pairs()
    if pipeline.gold_pairs:
        return sorted(doc.relations_by_pair())
    if dc is None:
        return []
    return sorted({(p.h, p.t) for p in dc.pairs if not _confident(p, pipeline)})


def _llm_records(
    pipeline: Pipeline, docs: Sequence[Document], found: Sequence[DocumentCandidates | None]
) -> tuple[list[dict], list[dict]]:
    runner = pipeline.runner
    from_candidates = pipeline.mode == "classifier-llm" and not pipeline.gold_pairs
    pairs = [_pairs_to_ask(pipeline, doc, dc) for doc, dc in zip(docs, found)]
    hints = [runner.hints_for(dc) for dc in found] if from_candidates else None
    choices = [runner.choices_for(dc) for dc in found] if from_candidates else None
    records, debug = [], []
    for doc, dc, (record, doc_debug) in zip(docs, found, runner.run(docs, pairs, hints, choices)):
        record.pop("seconds", None)
        if from_candidates:
            record["candidates"] = _candidate_rows(dc)
            record["missing_candidates"] = dc is None
            if pipeline.refine and dc is not None:
                _fuse(record, doc, dc, pipeline)
        record["raw"] = [_answer_record(p) for p in doc_debug["prompts"]]
        records.append(record)
        debug.append(doc_debug)
    return records, debug


def _answer_record(prompt: dict) -> dict:
    """A prompt's raw answer as the progress file keeps it: its pairs, the text, and what became of each parsed
    line ([head, relation, tail, h_idx, t_idx, relation id, status]: kept or why it was dropped), which `lmrc
    show` puts beside the answer and the theta curve re-aligns from."""
    lines = [
        [d["head"], d["relation"], d["tail"], d["h_idx"], d["t_idx"], d["r"], d["status"]]
        for d in prompt["alignment"]
    ]
    return {
        "pairs": prompt["pairs"],
        "text": prompt["raw_output"],
        "lines": lines,
        "hit_limit": prompt["hit_token_limit"],
    }


def _confident(p: CandidatePair, pipeline: Pipeline) -> bool:
    return pipeline.upper is not None and p.score > pipeline.upper and bool(p.relations)


def _fuse(record: dict, doc: Document, dc: DocumentCandidates, pipeline: Pipeline) -> None:
    """Refine: stage 1's relations for its confident pairs (no LLM call), and in the band those above keep_margin
    that the LLM did not name, added to the LLM's predictions (strict and mapped alike). With a calibrated gate
    (`add_margin`) an LLM relation that stage 1 does not predict stays only if stage 1 ranks it among the pair's
    best at that margin or above."""
    if pipeline.add_margin is not None:
        _gate_additions(record, dc, pipeline.add_margin)
    extra, kept = [], 0
    for p in dc.pairs:
        confident = _confident(p, pipeline)
        kept += confident
        for rid, margin in (p.relations or {}).items():
            if confident or (pipeline.keep_margin is not None and margin > pipeline.keep_margin):
                extra.append({"title": doc.title, "h_idx": p.h, "t_idx": p.t, "r": rid})
    for key in ("predictions", "strict_predictions"):
        if key in record:
            seen = {(x["h_idx"], x["t_idx"], x["r"]) for x in record[key]}
            record[key] = record[key] + [x for x in extra if (x["h_idx"], x["t_idx"], x["r"]) not in seen]
    record["counts"]["pairs_kept_by_stage1"] = kept


def _gate_additions(record: dict, dc: DocumentCandidates, add_margin: float) -> None:
    by_pair = {(p.h, p.t): p for p in dc.pairs}

    def allowed(x: dict) -> bool:
        p = by_pair.get((x["h_idx"], x["t_idx"]))
        if p is None or x["r"] in (p.relations or {}):
            return True
        margin = (p.top or {}).get(x["r"])
        return margin is not None and margin >= add_margin

    for key in ("predictions", "strict_predictions"):
        if key in record:
            kept = [x for x in record[key] if allowed(x)]
            record["counts"][f"gated_{key}"] = len(record[key]) - len(kept)
            record[key] = kept


# ---------------------------------------------------------------------------------------------- the run


def _load_progress(path: Path, fingerprint: dict, resume: bool) -> set[int]:
    """The finished batches; a fresh progress file (header only) when not resuming."""
    return set(open_progress(path, PROGRESS_FORMAT, fingerprint, resume, lambda r: int(r["batch"])))


def iter_progress(path: Path) -> Iterator[dict]:
    """The document records of a progress file in batch order, reading one line at a time."""
    by_batch: dict[int, int] = {}
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh):
            if n == 0 or not line.strip():
                continue
            entry = json.loads(line)
            by_batch[int(entry["batch"])] = n
    order = sorted(by_batch)
    if order != sorted(set(order)):
        raise LmrcError(f"{path}: a batch appears twice")
    # Batches are appended in order, so this is the file order; read again to keep only one line in memory.
    wanted = {by_batch[b] for b in order}
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh):
            if n in wanted:
                yield from json.loads(line)["documents"]


def peak_rss_gib() -> float:
    """This process's peak resident memory. Linux: VmHWM, which starts afresh at exec (ru_maxrss would count the
    parent's memory in a child that compare started); elsewhere ru_maxrss."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 2**20, 3)  # kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / 2**20 if sys.platform != "darwin" else peak / 2**30, 3)  # Linux KiB, macOS bytes


def _peak_memory() -> dict[str, float]:
    """Peak memory after a batch: this process's RSS; with CUDA, what torch allocated over every local device,
    and the memory in use on those devices by every process, which is where a vLLM engine's shows (it
    pre-allocates its share at start, so in-use after a batch is its peak)."""
    peaks = {"peak_rss_gib": peak_rss_gib()}
    gpus = gpu_memory()
    if gpus:
        peaks["peak_cuda_gib"] = round(sum(g["peak_allocated_gib"] for g in gpus), 3)
        used = [g["device_used_gib"] for g in gpus if "device_used_gib" in g]
        if used:
            peaks["gpu_in_use_gib"] = round(sum(used), 3)
    return peaks


@dataclass
class _Batches:
    """The batches of this shard, and which of them are left to run."""

    ranges: list[range]
    mine: list[int]
    todo: list[int]

    def documents(self, batches: Sequence[int]) -> int:
        return sum(len(self.ranges[b]) for b in batches)


def run_pipeline(
    cfg: PredictConfig,
    input_path: str | os.PathLike,
    output_path: str | os.PathLike,
    *,
    resume: bool = False,
    shard: Shard | None = None,
    save_candidates: str | os.PathLike | None = None,
    debug_out: str | os.PathLike | None = None,
    generator: Any = None,
    show_progress: bool | None = None,
    stop_after_batches: int | None = None,
) -> dict:
    """Run the pipeline over `input_path` (or its shard) and write the result files; returns the summary.

    `stop_after_batches` pauses after that many batches of this call (tests, time-boxed jobs; then `resume`).
    """
    input_path, output_path = Path(input_path), Path(output_path)
    pipeline, docs = build_pipeline(cfg, input_path, generator=generator)
    if save_candidates is not None and pipeline.mode == "direct":
        raise LmrcError("--save-candidates: the direct mode has no stage-1 candidates")
    shard = shard or Shard(0, 1)
    ranges = batch_ranges(len(docs), cfg.docs_per_batch)
    mine = list(shard.batches(len(ranges)))
    fingerprint = {**pipeline.fingerprint, "shard": [shard.index, shard.count]}

    progress_path = sidecar(output_path, ".progress.jsonl")
    done = _load_progress(progress_path, fingerprint, resume)
    if done:
        log.info("%s: %d of %d batches already done", progress_path, len(set(mine) & done), len(mine))
    debug_path = Path(debug_out) if debug_out is not None else None
    if debug_path is not None and not resume and debug_path.exists():
        debug_path.unlink()
    batches = _Batches(ranges, mine, [b for b in mine if b not in done])
    start = time.perf_counter()
    ran_docs = _run_batches(
        pipeline, docs, batches, progress_path, debug_path, show_progress, stop_after_batches
    )
    seconds = time.perf_counter() - start

    shard_docs = [docs[i] for b in mine for i in ranges[b]]
    records = iter_progress(progress_path)
    save = Path(save_candidates) if save_candidates is not None else None
    tally = write_outputs(pipeline, shard_docs, records, output_path, progress_path, save)
    summary = summarize(pipeline, shard_docs, tally, train_path(cfg.train, pipeline))
    summary.update(
        {
            "fingerprint": fingerprint,
            "shard": str(shard),
            "batches": len(mine),
            "seconds_this_run": round(seconds, 2),
            "documents_this_run": ran_docs,
            "seconds_per_document_this_run": round(seconds / ran_docs, 3) if ran_docs else None,
        }
    )
    atomic_write_json(sidecar(output_path, ".summary.json"), summary, indent=2)
    return summary


def _run_batches(
    pipeline: Pipeline,
    docs: Sequence[Document],
    batches: _Batches,
    progress_path: Path,
    debug_path: Path | None,
    show_progress: bool | None,
    stop_after_batches: int | None,
) -> int:
    """Run the batches left, appending each to the progress file; returns the documents run."""
    n_docs = batches.documents(batches.mine)
    initial = n_docs - batches.documents(batches.todo)
    ran_docs = triples = 0
    with Progress(n_docs, "lmrc predict", "doc", initial=initial, show=show_progress, logger=log) as bar:
        for k, b in enumerate(batches.todo):
            if stop_after_batches is not None and k >= stop_after_batches:
                raise KeyboardInterrupt
            records, debug = run_batch(pipeline, [docs[i] for i in batches.ranges[b]])
            peak = _peak_memory()
            for r in records:
                r["peak_memory"] = peak
            append_jsonl(progress_path, {"batch": b, "documents": records})
            if debug_path is not None:
                for d in debug:
                    append_jsonl(debug_path, d)
            ran_docs += len(records)
            triples += sum(prediction_count(r) for r in records)
            bar.update(len(records), triples=triples)
    return ran_docs
