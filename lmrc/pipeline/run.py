"""`lmrc predict`: stage 1 then stage 2 over a corpus, streamed batch by batch, resumable and shardable.

The input is cut into fixed batches of `docs_per_batch` documents (by document order). For each batch, stage 1
proposes candidates (in memory, or read from a candidates file), stage 2 classifies them, and the batch's records
(one per document: candidates, predictions, counts, raw answers) are appended to `<output>.progress.jsonl` as one
line. Nothing else is held across batches, so memory stays flat in the number of documents.

Exactness: a batch's results depend only on the batch (its documents are encoded and generated together, in a
fixed order), so a run that was killed and resumed (`resume`: finished batches are skipped, a torn last line is
dropped and its batch redone) and a run split into shards (`Shard`: whole batches, contiguous) produce the same
bytes as one uninterrupted run. The final files are written from the progress file, atomically:

- `<output>`: the official result file (a JSON list of {title, h_idx, t_idx, r});
- `<output stem>.strict.json`: strict relation names, when stage 2 maps names with SBERT;
- `<output stem>.summary.json`: models and settings (the run's fingerprint), counts, timing, peak memory, and
  the official scores when the input is labelled.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import resource
import sys
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmrc.config import to_dict
from lmrc.data.candidates import (
    FORMAT as CANDIDATES_FORMAT,
)
from lmrc.data.candidates import (
    VERSION as CANDIDATES_VERSION,
)
from lmrc.data.candidates import (
    CandidatePair,
    CandidatesHeader,
    DocumentCandidates,
    load_candidates,
    match_candidates,
)
from lmrc.data.docred import Document, load_documents, restrict_pairs
from lmrc.data.relations import RelationSet
from lmrc.errors import LmrcError
from lmrc.io import (
    JsonStreamWriter,
    append_jsonl,
    atomic_write_json,
    file_sha256,
    open_progress,
)
from lmrc.pipeline.config import PredictConfig

log = logging.getLogger(__name__)

PROGRESS_FORMAT = "lmrc-predict-progress"
SUMMARY_FORMAT = "lmrc-predict-summary"
# Stage-2 settings that change no answer (the pipeline batches documents itself).
_STAGE2_NEUTRAL = ("docs_per_chunk", "gpu_memory_utilization")


def sidecar(output: Path, suffix: str) -> Path:
    """`result.json` -> `result<suffix>` (e.g. `.progress.jsonl`, `.summary.json`)."""
    stem = output.name[: -len(output.suffix)] if output.suffix else output.name
    return output.with_name(stem + suffix)


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


# ------------------------------------------------------------------------------------------------ the models


@dataclass
class Pipeline:
    """What a run will do, resolved and checked before anything is written."""

    mode: str
    relations: RelationSet
    proposer: Any | None  # lmrc.stage1.predict.Proposer
    candidates: list[DocumentCandidates | None] | None  # from a candidates file, per document
    runner: Any | None  # lmrc.stage2.predict.Stage2Runner
    fingerprint: dict[str, Any]
    upper: float | None = None  # refine: pairs scored above it keep stage 1's relations, no LLM call
    keep_margin: float | None = None  # refine: stage-1 relations kept in the band above this margin


def _infer_mode(cfg: PredictConfig, adapter_mode: str | None, has_stage1: bool) -> str:
    if cfg.mode is not None:
        return cfg.mode
    if adapter_mode == "direct":
        if has_stage1:
            raise LmrcError(
                "a direct-mode adapter asks about all pairs and uses no stage 1: drop --stage1/--candidates, "
                "or give an rc adapter for --mode classifier-llm"
            )
        return "direct"
    if adapter_mode == "rc":
        return "classifier-llm"
    if has_stage1:
        return "stage1-only"
    raise LmrcError(
        "nothing to run: give --stage1 CHECKPOINT and/or --stage2 ADAPTER (see lmrc predict --help)"
    )


def _check_mode(mode: str, cfg: PredictConfig, adapter_mode: str | None, has_stage1: bool) -> None:
    s1, s2 = cfg.stage1, cfg.stage2
    if mode == "classifier-llm":
        if adapter_mode is None:
            raise LmrcError("--mode classifier-llm needs --stage2 ADAPTER (an rc adapter)")
        if adapter_mode != "rc":
            raise LmrcError(
                f"{s2.adapter}: a {adapter_mode}-mode adapter cannot classify stage-1 candidates; "
                "--mode classifier-llm needs an rc adapter (or use --mode direct)"
            )
        if not has_stage1:
            raise LmrcError(
                "--mode classifier-llm needs stage-1 candidates: --stage1 CHECKPOINT or --candidates FILE"
            )
    elif mode == "direct":
        if adapter_mode is None:
            raise LmrcError("--mode direct needs --stage2 ADAPTER (a direct adapter)")
        if adapter_mode != "direct":
            raise LmrcError(
                f"{s2.adapter}: an {adapter_mode}-mode adapter classifies given pairs; --mode direct needs a "
                "direct adapter (or use --mode classifier-llm with --stage1)"
            )
        if has_stage1:
            raise LmrcError("--mode direct asks the LLM about all pairs: drop --stage1/--candidates")
    elif mode == "stage1-only":
        if s1.checkpoint is None:
            raise LmrcError("--mode stage1-only needs --stage1 CHECKPOINT (a multi-label head)")
        if adapter_mode is not None:
            raise LmrcError("--mode stage1-only runs no LLM: drop --stage2")


def _weights_sha(folder: Path, names: Sequence[str]) -> str | None:
    for name in names:
        if (folder / name).is_file():
            return file_sha256(folder / name)
    return None


def build_pipeline(
    cfg: PredictConfig,
    docs_path: Path,
    *,
    generator: Any = None,
    device: Any = None,
) -> tuple[Pipeline, list[Document]]:
    """Load and check the models, the documents and the candidates source; nothing is written."""
    s1, s2 = cfg.stage1, cfg.stage2
    runner = None
    if s2.adapter is not None:
        from lmrc.stage2.predict import Stage2Runner

        runner = Stage2Runner(s2.adapter, s2.override_list(), generator=generator, device=device)
    has_stage1 = s1.checkpoint is not None or s1.candidates is not None
    adapter_mode = runner.mode if runner is not None else None
    mode = _infer_mode(cfg, adapter_mode, has_stage1)
    _check_mode(mode, cfg, adapter_mode, has_stage1)

    if s1.tune is not None and s1.recall_target is None and cfg.fusion != "refine":
        raise LmrcError("--tune (stage1.tune) is used by --recall-target or fusion refine")
    proposer = None
    if s1.checkpoint is not None:
        from lmrc.stage1.predict import Proposer

        proposer = Proposer(
            s1.checkpoint,
            threshold=s1.threshold,
            recall_target=s1.recall_target,
            tune_path=s1.tune if s1.recall_target is not None else None,
            calibration_path=s1.calibration,
            max_per_doc=s1.max_per_doc,
            batch_size=s1.batch_size,
            device=device,
            head_params=s1.head_params or None,
        )
        if mode == "stage1-only" and not proposer.per_relation:
            raise LmrcError(
                f"{s1.checkpoint}: the {proposer.checkpoint.loss_name!r} head predicts no relations, only candidate "
                "pairs; stage1-only needs a multi-label head (atl, atgl, amtl, atsl, mdre)"
            )
    elif s1.candidates is not None and any(
        v is not None for v in (s1.threshold, s1.recall_target, s1.max_per_doc)
    ):
        raise LmrcError(
            "a candidates file is used as it is: the threshold options apply to --stage1 CHECKPOINT"
        )

    upper, refine_cal = None, None
    if cfg.fusion == "refine":
        if mode != "classifier-llm" or proposer is None:
            raise LmrcError(
                "fusion refine needs --mode classifier-llm with --stage1 CHECKPOINT (a multi-label head)"
            )
        if not proposer.per_relation:
            raise LmrcError(
                f"fusion refine keeps stage 1's relations: the {proposer.checkpoint.loss_name!r} head has none"
            )
        if cfg.refine.upper is not None:
            upper, refine_cal = cfg.refine.upper, {"method": "manual", "upper": cfg.refine.upper}
        else:
            if s1.tune is None:
                raise LmrcError(
                    "fusion refine calibrates its upper threshold on a labelled file: set stage1.tune"
                )
            refine_cal = proposer.calibrate_upper(s1.tune, cfg.refine.precision)
            upper = refine_cal["upper"]
            if upper is None:
                log.warning(
                    "refine: no stage-1 threshold reaches precision %.2f: every candidate goes to the LLM",
                    cfg.refine.precision,
                )

    relations = _shared_relations(proposer, runner, s1.checkpoint, s2.adapter)
    docs = restrict_pairs(load_documents(docs_path, relations), _pair_types(proposer, runner), docs_path)

    candidates = None
    if s1.candidates is not None and mode == "classifier-llm":
        candidates = match_candidates(
            load_candidates(s1.candidates), docs, s1.candidates, docs_path, relation_ids=relations.ids
        )

    fingerprint: dict[str, Any] = {
        "input": str(docs_path.resolve()),
        "input_sha256": file_sha256(docs_path),
        "documents": len(docs),
        "mode": mode,
        "docs_per_batch": cfg.docs_per_batch,
        "stage1": None,
        "stage2": None,
    }
    if proposer is not None and mode != "direct":
        ck = proposer.checkpoint
        fingerprint["stage1"] = {
            "checkpoint": str(Path(ck.path).resolve()),
            "weights_sha256": _weights_sha(Path(ck.path), ("model.safetensors",)),
            "head": ck.loss_name,
            "head_params": dict(s1.head_params),
            "threshold": proposer.choice.threshold,
            "max_per_doc": proposer.choice.max_per_doc,
            "threshold_method": proposer.choice.calibration.get("method"),
            "batch_size": s1.batch_size,
        }
    elif candidates is not None:
        assert s1.candidates is not None
        fingerprint["stage1"] = {
            "candidates": str(Path(s1.candidates).resolve()),
            "sha256": file_sha256(s1.candidates),
        }
    if runner is not None:
        c = runner.cfg
        fingerprint["stage2"] = {
            "adapter": str(Path(s2.adapter).resolve()),
            "weights_sha256": _weights_sha(Path(s2.adapter), ("adapter_model.safetensors",)),
            "model": c.model,
            "mode": c.mode,
            "max_seq_len": c.max_seq_len,
            "max_pairs": c.max_pairs,
            "answer_tokens_per_pair": c.answer_tokens_per_pair,
            "dtype": c.dtype,
            "generation": {k: v for k, v in to_dict(c.generation).items() if k not in _STAGE2_NEUTRAL},
            "align": to_dict(c.align),
        }
    if cfg.fusion != "none":
        fingerprint["fusion"] = {
            "mode": cfg.fusion,
            "calibration": refine_cal,
            "keep_margin": cfg.refine.keep_margin,
        }
    pipeline = Pipeline(
        mode, relations, proposer, candidates, runner, fingerprint, upper, cfg.refine.keep_margin
    )
    return pipeline, docs


def _pair_types(proposer, runner) -> list | None:
    """The typed-pair constraint of the models (stage 1's and stage 2's must agree)."""
    found = []
    if proposer is not None:
        found.append(("stage-1 checkpoint", proposer.checkpoint.config.data.pair_types))
    if runner is not None:
        found.append(("adapter", runner.cfg.data.pair_types))
    norm = {name: sorted(map(tuple, v)) if v else None for name, v in found}
    if len(set(map(str, norm.values()))) > 1:
        raise LmrcError(f"the models ask about different entity pairs: pair_types {norm}")
    return found[0][1] if found else None


def _shared_relations(proposer, runner, checkpoint, adapter) -> RelationSet:
    sets = []
    if proposer is not None:
        sets.append((proposer.relations, f"stage-1 checkpoint {checkpoint}"))
    if runner is not None:
        sets.append((runner.relations, f"adapter {adapter}"))
    if not sets:
        raise LmrcError("nothing to run: give --stage1 CHECKPOINT and/or --stage2 ADAPTER")
    (first, where), *rest = sets
    for other, other_where in rest:
        if set(other.ids) != set(first.ids):
            extra = sorted(set(other.ids) - set(first.ids)) or sorted(set(first.ids) - set(other.ids))
            raise LmrcError(
                f"{other_where} and {where} use different relation sets ({len(other)} vs {len(first)} relations; "
                f"e.g. {extra[0]!r} is in only one): train both on the same rel_info.json"
            )
    return first


# ------------------------------------------------------------------------------------------------ one batch


def _candidate_rows(dc: DocumentCandidates | None) -> list[list[Any]]:
    if dc is None:
        return []
    return [[p.h, p.t, p.score, p.relations] for p in dc.pairs]


def run_batch(pipeline: Pipeline, docs: Sequence[Document]) -> list[dict]:
    """The records of one batch: stage 1 (if any), then stage 2 on its candidates (if any)."""
    t0 = time.perf_counter()
    mode = pipeline.mode
    cands: list[DocumentCandidates | None] = [None] * len(docs)
    rel_preds: list[list[dict]] | None = None
    if mode in ("classifier-llm", "stage1-only"):
        if pipeline.proposer is not None:
            proposed, rel_preds = pipeline.proposer.propose(docs)
            cands = list(proposed)
        elif pipeline.candidates is not None:
            cands = [pipeline.candidates[d.index] for d in docs]
    records: list[dict] = []
    if mode == "stage1-only":
        assert rel_preds is not None
        for doc, dc, preds in zip(docs, cands, rel_preds):
            records.append(
                {
                    "title": doc.title,
                    "index": doc.index,
                    "candidates": _candidate_rows(dc),
                    "predictions": preds,
                    "counts": {},
                    "drops": {},
                }
            )
    else:
        runner = pipeline.runner
        refine = pipeline.fingerprint.get("fusion") is not None
        if mode == "direct":
            pairs = [d.pairs() for d in docs]
        else:
            pairs = [
                sorted({(p.h, p.t) for p in dc.pairs if not _confident(p, pipeline)})
                if dc is not None
                else []
                for dc in cands
            ]
        hints = [runner.hints_for(dc) for dc in cands] if mode == "classifier-llm" else None
        for doc, dc, (record, debug) in zip(docs, cands, runner.run(docs, pairs, hints)):
            record.pop("seconds", None)
            if mode == "classifier-llm":
                record["candidates"] = _candidate_rows(dc)
                record["missing_candidates"] = dc is None
                if refine and dc is not None:
                    _fuse(record, doc, dc, pipeline)
            record["raw"] = [{"pairs": p["pairs"], "text": p["raw_output"]} for p in debug["prompts"]]
            records.append(record)
    share = round((time.perf_counter() - t0) / max(1, len(docs)), 3)
    for r in records:
        r["seconds"] = share
    return records


def _confident(p: CandidatePair, pipeline: Pipeline) -> bool:
    return pipeline.upper is not None and p.score > pipeline.upper and bool(p.relations)


def _fuse(record: dict, doc: Document, dc: DocumentCandidates, pipeline: Pipeline) -> None:
    """Refine: stage 1's relations for its confident pairs (no LLM call), and in the band those above keep_margin
    that the LLM did not name, added to the LLM's predictions (strict and mapped alike)."""
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
    out = {"peak_rss_gib": peak_rss_gib()}
    try:
        import torch

        if torch.cuda.is_available():
            out["peak_cuda_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    return out


class _Progress:
    """A tqdm bar over documents on a terminal; elsewhere a log line every `every` seconds."""

    def __init__(self, total: int, initial: int, show: bool | None, every: float = 30.0) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(
            total=total, initial=initial, desc="lmrc predict", unit="doc", disable=show is False or None
        )
        if show is None and not self.bar.disable and not sys.stderr.isatty():
            self.bar.disable = True
        self.total, self.done, self.triples = total, initial, 0
        self.every, self.start, self.last = every, time.perf_counter(), time.perf_counter()
        self.new_docs = 0

    def update(self, docs: int, triples: int) -> None:
        self.done += docs
        self.new_docs += docs
        self.triples += triples
        self.bar.update(docs)
        self.bar.set_postfix(triples=self.triples, refresh=False)
        now = time.perf_counter()
        if self.bar.disable and (now - self.last >= self.every or self.done == self.total):
            self.last = now
            rate = self.new_docs / max(now - self.start, 1e-9)
            log.info(
                "predict: %d / %d documents, %d triples, %.2f documents/s",
                self.done,
                self.total,
                self.triples,
                rate,
            )

    def close(self) -> None:
        self.bar.close()


def predict(
    cfg: PredictConfig,
    input_path: str | os.PathLike,
    output_path: str | os.PathLike,
    *,
    resume: bool = False,
    shard: Shard | None = None,
    save_candidates: str | os.PathLike | None = None,
    generator: Any = None,
    device: Any = None,
    show_progress: bool | None = None,
    stop_after_batches: int | None = None,
) -> dict:
    """Run the pipeline over `input_path` (or its shard) and write the result files; returns the summary.

    `stop_after_batches` pauses after that many batches of this call (tests, time-boxed jobs; then `resume`).
    """
    input_path, output_path = Path(input_path), Path(output_path)
    pipeline, docs = build_pipeline(cfg, input_path, generator=generator, device=device)
    if save_candidates is not None and pipeline.mode == "direct":
        raise LmrcError("--save-candidates: the direct mode has no stage-1 candidates")
    shard = shard or Shard(0, 1)
    batches = batch_ranges(len(docs), cfg.docs_per_batch)
    mine = list(shard.batches(len(batches)))
    fingerprint = {**pipeline.fingerprint, "shard": [shard.index, shard.count]}

    progress_path = sidecar(output_path, ".progress.jsonl")
    done = _load_progress(progress_path, fingerprint, resume)
    todo = [b for b in mine if b not in done]
    n_docs = sum(len(batches[b]) for b in mine)
    if done:
        log.info("%s: %d of %d batches already done", progress_path, len(set(mine) & done), len(mine))
    bar = _Progress(n_docs, n_docs - sum(len(batches[b]) for b in todo), show_progress)
    start = time.perf_counter()
    ran_docs = 0
    try:
        for k, b in enumerate(todo):
            if stop_after_batches is not None and k >= stop_after_batches:
                raise KeyboardInterrupt
            batch_docs = [docs[i] for i in batches[b]]
            records = run_batch(pipeline, batch_docs)
            peak = _peak_memory()
            for r in records:
                r["peak_memory"] = peak
            append_jsonl(progress_path, {"batch": b, "documents": records})
            ran_docs += len(records)
            bar.update(len(records), sum(len(r["predictions"]) for r in records))
    finally:
        bar.close()
    seconds = time.perf_counter() - start

    shard_docs = [docs[i] for b in mine for i in batches[b]]
    summary = finalize(
        pipeline,
        shard_docs,
        progress_path,
        output_path,
        save_candidates=Path(save_candidates) if save_candidates is not None else None,
        train_path=_train_path(cfg, pipeline),
    )
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


def _train_path(cfg: PredictConfig, pipeline: Pipeline) -> Path | None:
    """Training documents for Ign F1: `train`, else the stage-1 or stage-2 training file when it exists."""
    from lmrc.config import expand_path

    if cfg.train is not None:
        return expand_path(cfg.train, "train")
    candidates: list[Any] = []
    if pipeline.proposer is not None:
        candidates.append(lambda: pipeline.proposer.checkpoint.config.data.path("train"))
    if pipeline.runner is not None:
        candidates.append(lambda: pipeline.runner.cfg.data.path("train"))
    for get in candidates:
        try:
            path = get()
        except LmrcError:
            continue
        if path is not None and Path(path).is_file():
            return Path(path)
    return None


def finalize(
    pipeline: Pipeline,
    docs: Sequence[Document],
    progress_path: Path,
    output_path: Path,
    save_candidates: Path | None = None,
    train_path: Path | None = None,
) -> dict:
    """Write the result files from the progress file (one pass, one record in memory at a time) and sum the
    counts; score against the documents' labels when they all have them."""
    sbert = pipeline.runner is not None and pipeline.runner.cfg.align.relation_mapping == "sbert"
    counts: Counter = Counter()
    drops: Counter = Counter()
    cand = Counter()
    predictions: list[dict] = []
    strict: list[dict] = []
    seconds = 0.0
    peaks: dict[str, float] = {}  # the largest peak of the processes that ran the batches
    n_records = with_prompts = truncated = missing = 0
    by_title = {d.title: d for d in docs}
    labelled = bool(docs) and all(d.labelled for d in docs)
    writers = [JsonStreamWriter(output_path)]
    if sbert:
        writers.append(JsonStreamWriter(sidecar(output_path, ".strict.json")))
    cand_writer = None
    if save_candidates is not None:
        header = _candidates_header(pipeline, docs)
        whole = {
            "format": CANDIDATES_FORMAT,
            "version": CANDIDATES_VERSION,
            "header": header,
            "documents": [],
        }
        # The same bytes as save_candidates: the object's JSON with the documents streamed into its last list.
        cand_writer = JsonStreamWriter(
            save_candidates, opening=json.dumps(whole, ensure_ascii=False)[:-2], closing="]}"
        )
        writers.append(cand_writer)
    try:
        for record in iter_progress(progress_path):
            n_records += 1
            doc = by_title[record["title"]]
            for p in record["predictions"]:
                writers[0].add(p)
                predictions.append(p)
            if sbert:
                for p in record["strict_predictions"]:
                    writers[1].add(p)
                    strict.append(p)
            counts.update(record.get("counts", {}))
            drops.update(record.get("drops", {}))
            seconds += record.get("seconds", 0.0)
            for k, v in record.get("peak_memory", {}).items():
                peaks[k] = max(peaks.get(k, 0.0), v)
            with_prompts += int(bool(record.get("counts", {}).get("prompts")))
            truncated += int(bool(record.get("truncated")))
            missing += int(bool(record.get("missing_candidates")))
            if "candidates" in record:
                rows = record["candidates"]
                cand["candidates"] += len(rows)
                cand["pairs"] += len(doc.pairs())
                if doc.labelled:
                    positive = set(doc.relations_by_pair())
                    cand["positive_pairs"] += len(positive)
                    cand["correct"] += sum((h, t) in positive for h, t, *_ in rows)
                if cand_writer is not None:
                    cand_writer.add(_candidate_entry(record["title"], len(doc.entities), rows))
        if n_records != len(docs):
            raise LmrcError(
                f"{progress_path}: {n_records} of {len(docs)} documents finished (the run stopped early; "
                "rerun with --resume)"
            )
        for w in writers:
            w.commit()
    finally:
        for w in writers:
            w.discard()

    summary: dict[str, Any] = {
        "format": SUMMARY_FORMAT,
        "mode": pipeline.mode,
        "documents": len(docs),
        "predictions": len(predictions),
        "seconds_per_document": round(seconds / len(docs), 3) if docs else None,
        **peaks,
    }
    if cand:
        pairs, kept = cand["pairs"], cand["candidates"]
        summary["candidates"] = {
            "pairs": pairs,
            "candidates": kept,
            "reduction": kept / pairs if pairs else 0.0,
            "candidates_per_document": kept / len(docs) if docs else 0.0,
            "documents_missing_candidates": missing,
        }
        if labelled:
            pos = cand["positive_pairs"]
            summary["candidates"].update(
                {
                    "positive_pairs": pos,
                    "correct": cand["correct"],
                    "recall": cand["correct"] / pos if pos else 0.0,
                    "precision": cand["correct"] / kept if kept else 0.0,
                }
            )
    if pipeline.runner is not None:
        n = len(docs) or 1
        summary["llm"] = {
            "relation_mapping": pipeline.runner.cfg.align.relation_mapping,
            "documents_with_prompts": with_prompts,
            "documents_truncated": truncated,
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
            "outputs_stopped_on_repeat": counts["stopped_on_repeat"],
            "triples_parsed": counts["triples"],
            "none_answers": counts["none_answers"],
            "out_of_set_before_mapping": counts["out_of_set_before_mapping"],
            "out_of_set_after_mapping": counts["out_of_set_after_mapping"],
            "drops": dict(sorted(drops.items())),
        }
    if labelled:
        from lmrc.eval.metrics import TrainReference, evaluate

        ref = None
        if train_path is not None:
            ref = TrainReference.from_documents(load_documents(train_path, pipeline.relations))
        summary["train_reference"] = str(train_path) if train_path is not None else None
        summary["scores"] = evaluate(predictions, docs, ref).summary()
        if sbert:
            summary["scores_strict"] = evaluate(strict, docs, ref).summary()
    return summary


def _candidates_header(pipeline: Pipeline, docs: Sequence[Document]) -> dict:
    s1 = pipeline.fingerprint.get("stage1") or {}
    proposer = pipeline.proposer
    header = CandidatesHeader(
        model=s1.get("checkpoint") or s1.get("candidates") or "",
        head=proposer.checkpoint.loss_name if proposer is not None else "unknown",
        threshold=proposer.choice.threshold if proposer is not None else None,
        calibration=dict(proposer.choice.calibration) if proposer is not None else {"method": "default"},
        source=pipeline.fingerprint["input"],
    )
    return dataclasses.asdict(header)


def _candidate_entry(title: str, n_entities: int, rows: list[list[Any]]) -> dict:
    pairs = []
    for h, t, score, rels in rows:
        p = CandidatePair(h, t, score, rels)
        item: dict[str, Any] = {"h": p.h, "t": p.t, "score": p.score}
        if p.relations is not None:
            item["relations"] = p.relations
        pairs.append(item)
    return {"title": title, "n_entities": n_entities, "pairs": pairs}
