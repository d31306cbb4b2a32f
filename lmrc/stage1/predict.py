"""Stage-1 candidate proposal (`lmrc stage1 predict`, `lmrc stage1 crossfit`).

Every ordered entity pair of a document is scored with the head's `score()` (bce: P(has relation); multi-label
heads: max_r logit_r minus the threshold that applies to r) and becomes a candidate when its score is above the
threshold. Thresholds:

- the head's own rule (default): 0.5 for bce (LMRC), 0 for the margins of the multi-label heads;
- an explicit value;
- a recall target, calibrated on a labelled tuning file (our addition, not in the papers): the highest
  threshold whose pair recall on that file reaches the target, kept in the candidates header and, on request,
  in a calibration file (`--save-calibration`, reused with `--calibration`); checkpoints are never written;
- the K best pairs of every document (no threshold).

A pair counts as positive for the candidate metrics when it holds at least one relation. Multi-label heads also
give relation predictions (the official result format), which make stage 1 a complete DocRE model.

Cross-fitting: K models, each trained without one fold of the training file, propose the candidates of the fold
they did not see, so that stage 2 trains on realistic candidates without leakage.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lmrc.data.candidates import (
    CandidatePair,
    Candidates,
    CandidatesHeader,
    DocumentCandidates,
    save_candidates,
)
from lmrc.data.docred import Document, load_documents
from lmrc.data.relations import RelationSet
from lmrc.errors import LmrcError
from lmrc.io import atomic_write_json, file_sha256

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------- scoring


@torch.no_grad()
def infer_logits(
    model: torch.nn.Module, features: Sequence, batch_size: int, device: str | torch.device
) -> list[Tensor]:
    """Logits [pairs, num_logits] (float32, CPU) of every document, pairs in `doc.pairs()` order.

    Documents are batched by length; those without pairs (one entity) are not run through the encoder.
    """
    from lmrc.stage1.features import collate, length_grouped_batches

    model.eval()
    out: list[Tensor | None] = [None] * len(features)
    runnable = [i for i, f in enumerate(features) if f.hts]
    width = getattr(model, "num_logits", None)
    for i, f in enumerate(features):
        if not f.hts:
            out[i] = torch.zeros((0, width or 1))
    subset = [features[i] for i in runnable]
    for batch in length_grouped_batches(subset, batch_size, seed=0, shuffle=False):
        inputs = collate([subset[j] for j in batch])
        logits = model(
            inputs["input_ids"].to(device),
            inputs["attention_mask"].to(device),
            inputs["entity_pos"],
            inputs["hts"],
        )
        logits = logits.float().cpu()
        start = 0
        for j in batch:
            n = len(subset[j].hts)
            out[runnable[j]] = logits[start : start + n]
            start += n
    return out  # type: ignore[return-value]


def pair_scores(loss, logits: Sequence[Tensor]) -> list[list[float]]:
    """The head's candidate score of every pair, as Python floats (exact float32 values)."""
    return [loss.score(lg).double().tolist() if len(lg) else [] for lg in logits]


def gold_pair_flags(doc: Document) -> list[bool]:
    """True for every pair (in `doc.pairs()` order) that holds at least one relation."""
    positive = set(doc.relations_by_pair())
    return [p in positive for p in doc.pairs()]


def relation_predictions(
    docs: Sequence[Document], logits: Sequence[Tensor], loss, relations: RelationSet
) -> list[dict[str, Any]]:
    """The head's relation decisions in the official result format: [{title, h_idx, t_idx, r}]."""
    if not loss.per_relation:
        raise LmrcError(f"the {loss.name!r} head predicts no relations (only whether a pair has one)")
    out = []
    for doc, lg in zip(docs, logits):
        if not len(lg):
            continue
        pairs = doc.pairs()
        decided = loss.predict(lg)[:, 1:]
        for row, col in decided.nonzero().tolist():
            h, t = pairs[row]
            out.append({"title": doc.title, "h_idx": h, "t_idx": t, "r": relations.ids[col]})
    return out


# ------------------------------------------------------------------------------------------------- metrics


@dataclass(frozen=True)
class CandidateReport:
    """Pair-level quality of a candidate set: a gold pair is positive when it holds >= 1 relation."""

    documents: int
    pairs: int
    positive_pairs: int
    candidates: int
    correct: int
    precision: float
    recall: float
    f1: float
    reduction: float  # candidates / all pairs

    @classmethod
    def from_counts(
        cls, documents: int, pairs: int, positive: int, candidates: int, correct: int
    ) -> CandidateReport:
        p = correct / candidates if candidates else 0.0
        r = correct / positive if positive else 0.0
        f1 = 2 * p * r / (p + r) if p + r else 0.0
        return cls(
            documents, pairs, positive, candidates, correct, p, r, f1, candidates / pairs if pairs else 0.0
        )

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def candidate_report(candidates: Sequence[DocumentCandidates], gold: Sequence[Document]) -> CandidateReport:
    by_title = {d.title: d for d in gold}
    n_pairs = n_pos = n_cand = n_correct = 0
    for dc in candidates:
        doc = by_title.get(dc.title)
        if doc is None:
            raise LmrcError(
                f"gold documents: no document titled {dc.title!r} (needed for the candidate report)"
            )
        positive = set(doc.relations_by_pair())
        n_pairs += len(doc.pairs())
        n_pos += len(positive)
        n_cand += len(dc.pairs)
        n_correct += sum((p.h, p.t) in positive for p in dc.pairs)
    return CandidateReport.from_counts(len(candidates), n_pairs, n_pos, n_cand, n_correct)


def tune_metrics(
    loss,
    logits: Sequence[Tensor],
    docs: Sequence[Document],
    features: Sequence,
    relations: RelationSet,
    train_ref,
) -> dict[str, float]:
    """Selection metrics on a labelled tuning set: loss, pair P/R/F1 at the head's own rule, and (multi-label
    heads) relation P/R/F1/Ign F1 by the official scorer."""
    from lmrc.eval.metrics import evaluate

    labels = [
        torch.tensor(f.labels, dtype=torch.float) if f.labels else torch.zeros((0, f.n_label_columns))
        for f in features
    ]
    all_logits = torch.cat(list(logits))
    all_labels = torch.cat(labels)
    predicted = (
        loss.score(all_logits) > loss.score_threshold if len(all_logits) else torch.zeros(0, dtype=torch.bool)
    )
    gold = all_labels[:, 1:].gt(0).any(dim=-1)
    correct = int((predicted & gold).sum())
    pair = CandidateReport.from_counts(len(docs), len(gold), int(gold.sum()), int(predicted.sum()), correct)
    out = {
        "loss": float(loss(all_logits, all_labels)) if len(all_logits) else 0.0,
        "pair_precision": pair.precision,
        "pair_recall": pair.recall,
        "pair_f1": pair.f1,
        "reduction": pair.reduction,
    }
    if loss.per_relation:
        summary = evaluate(relation_predictions(docs, logits, loss, relations), docs, train_ref).summary()
        for key in ("precision", "recall", "f1", "ign_f1"):
            out[key] = summary[key]
    return out


# ---------------------------------------------------------------------------------------------- thresholds


def calibrate_recall(
    scores: Sequence[Sequence[float]], gold: Sequence[Sequence[bool]], target: float
) -> dict:
    """The highest threshold t with pair recall (share of positive pairs with score > t) >= `target`.

    With s_k the k-th highest positive score, k = ceil(target * #positives), every t in [s', s_k) gives the same
    candidates on these documents, s' being the next lower score of any pair; the midpoint is taken, so that
    tiny numerical differences (another batch composition, another machine) do not flip the boundary pair.
    """
    if not 0.0 < target <= 1.0:
        raise LmrcError(f"recall target must be in (0, 1], got {target}")
    flat = [s for doc in scores for s in doc]
    positives = sorted(
        (s for doc_s, doc_g in zip(scores, gold) for s, g in zip(doc_s, doc_g) if g), reverse=True
    )
    if not positives:
        raise LmrcError("recall calibration: the tuning documents have no positive pair (no relation facts)")
    k = max(1, math.ceil(round(target * len(positives), 9)))
    s_k = positives[k - 1]
    lower = [s for s in flat if s < s_k]
    if lower:
        below = max(lower)
        threshold = (s_k + below) / 2
        if not below <= threshold < s_k:  # adjacent floats
            threshold = below
    else:
        threshold = s_k - 1e-6 * max(1.0, abs(s_k))
    n_cand = sum(s > threshold for s in flat)
    n_hit = sum(s > threshold for s in positives)
    report = CandidateReport.from_counts(len(scores), len(flat), len(positives), n_cand, n_hit)
    return {
        "method": "recall_target",
        "target": target,
        "threshold": threshold,
        "recall": report.recall,
        "precision": report.precision,
        "reduction": report.reduction,
        "pairs": report.pairs,
        "positive_pairs": report.positive_pairs,
        "candidates": report.candidates,
    }


@dataclass
class ThresholdChoice:
    threshold: float | None  # None: no threshold (max_per_doc)
    max_per_doc: int | None
    calibration: dict[str, Any]


def choose_threshold(
    checkpoint,
    *,
    threshold: float | None = None,
    recall_target: float | None = None,
    tune_path: str | os.PathLike | None = None,
    calibration_path: str | os.PathLike | None = None,
    max_per_doc: int | None = None,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
) -> ThresholdChoice:
    """Resolve the threshold options (at most one of threshold / recall_target / max_per_doc).

    A recall target is calibrated on `tune_path`, or read from `calibration_path` (a file saved by an earlier
    calibration); the checkpoint folder is never written.
    """
    given = [
        name
        for name, v in (
            ("threshold", threshold),
            ("recall target", recall_target),
            ("max per doc", max_per_doc),
        )
        if v is not None
    ]
    if len(given) > 1:
        raise LmrcError(
            f"choose one of --threshold, --recall-target, --max-per-doc (got {' and '.join(given)})"
        )
    if tune_path is not None and recall_target is None:
        raise LmrcError("--tune is only used with --recall-target")
    if calibration_path is not None and recall_target is None:
        raise LmrcError("--calibration is only used with --recall-target")
    if calibration_path is not None and tune_path is not None:
        raise LmrcError("choose one of --tune (calibrate now) and --calibration (a saved calibration)")
    loss = checkpoint.loss
    if threshold is not None:
        if not math.isfinite(threshold):
            raise LmrcError(f"--threshold must be a finite number, got {threshold}")
        return ThresholdChoice(float(threshold), None, {"method": "manual"})
    if max_per_doc is not None:
        if max_per_doc < 1:
            raise LmrcError(f"--max-per-doc must be at least 1, got {max_per_doc}")
        return ThresholdChoice(None, max_per_doc, {"method": "max_per_doc", "k": max_per_doc})
    if recall_target is not None:
        if calibration_path is not None:
            cal = load_calibration(calibration_path, checkpoint, recall_target)
            return ThresholdChoice(float(cal["threshold"]), None, cal)
        if tune_path is None:
            cal = checkpoint.calibration  # calibration.json written into checkpoints by lmrc 0.1
            if cal and cal.get("method") == "recall_target" and cal.get("target") == recall_target:
                log.info(
                    "using the calibration stored in %s (recall target %s)", checkpoint.path, recall_target
                )
                return ThresholdChoice(float(cal["threshold"]), None, cal)
            raise LmrcError(
                f"recall target {recall_target}: pass --tune FILE (a labelled tuning file) to calibrate, or "
                "--calibration FILE (saved earlier with --save-calibration)"
            )
        cal = calibrate_on_file(checkpoint, tune_path, recall_target, batch_size=batch_size, device=device)
        return ThresholdChoice(float(cal["threshold"]), None, cal)
    return ThresholdChoice(float(loss.score_threshold), None, {"method": "default"})


def calibrate_on_file(
    checkpoint,
    tune_path: str | os.PathLike,
    target: float,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
) -> dict:
    """Calibrate the recall-target threshold on a labelled file (the checkpoint is left as it is)."""
    from lmrc.stage1.train import load_labelled_docs

    tune_path = Path(tune_path)
    docs = load_labelled_docs(tune_path, checkpoint.relations, "tuning")
    features = _features(checkpoint, docs, tune_path)
    logits = infer_logits(checkpoint.model, features, batch_size, device)
    cal = calibrate_recall(pair_scores(checkpoint.loss, logits), [gold_pair_flags(d) for d in docs], target)
    cal.update(
        {
            "head": checkpoint.loss_name,
            "tune": str(tune_path),
            "tune_sha256": file_sha256(tune_path),
            "documents": len(docs),
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
    )
    log.info(
        "calibrated recall target %.3f on %s: threshold %.6g (recall %.4f, %d of %d pairs kept)",
        target,
        tune_path,
        cal["threshold"],
        cal["recall"],
        cal["candidates"],
        cal["pairs"],
    )
    return cal


def calibrate_upper(
    scores: Sequence[Sequence[float]],
    predicted: Sequence[Sequence[set[str]]],
    gold: Sequence[Sequence[set[str]]],
    precision: float,
) -> dict:
    """The refine mode's upper threshold: the lowest score u >= 0 such that the head's relations of the pairs
    scored above u reach `precision` (relation level) on labelled documents; those pairs skip the LLM.

    Candidate values are the pairs' own scores (midpoints to the next lower score, as calibrate_recall); None
    when no u reaches the target (every candidate goes to the LLM).
    """
    if not 0.0 < precision <= 1.0:
        raise LmrcError(f"refine precision target must be in (0, 1], got {precision}")
    rows = sorted(
        (
            (s, len(p), len(p & g))
            for ds, dp, dg in zip(scores, predicted, gold)
            for s, p, g in zip(ds, dp, dg)
            if p
        ),
        key=lambda r: -r[0],
    )
    best = None
    n_pred = n_hit = 0
    for k, (s, n_p, n_h) in enumerate(rows):
        n_pred += n_p
        n_hit += n_h
        nxt = rows[k + 1][0] if k + 1 < len(rows) else None
        if nxt is not None and nxt == s:
            continue  # a threshold cannot separate equal scores
        if s <= 0:
            break
        if n_hit / n_pred >= precision:
            cut = max(0.0, (s + nxt) / 2) if nxt is not None else 0.0
            best = {"upper": cut, "precision": n_hit / n_pred, "relations_kept": n_pred}
    return {"method": "relation_precision", "target": precision, **(best or {"upper": None})}


CALIBRATION_FORMAT = "lmrc-calibration"


def save_calibration(calibration: dict[str, Any], path: str | os.PathLike, checkpoint) -> None:
    """A recall-target calibration as its own file, tied to the checkpoint's weights (reused with --calibration)."""
    weights = Path(checkpoint.path) / "model.safetensors"
    record = {
        "format": CALIBRATION_FORMAT,
        "checkpoint": str(checkpoint.path),
        "weights_sha256": file_sha256(weights) if weights.is_file() else None,
        **calibration,
    }
    atomic_write_json(path, record, indent=1)


def load_calibration(path: str | os.PathLike, checkpoint, target: float) -> dict[str, Any]:
    """A saved calibration, refused when it belongs to other weights, another head or another target."""
    from lmrc.io import read_json

    cal = read_json(path)
    if not isinstance(cal, dict) or cal.get("format") != CALIBRATION_FORMAT:
        raise LmrcError(f'{path}: not an lmrc calibration file (expected "format": "{CALIBRATION_FORMAT}")')
    if not isinstance(cal.get("threshold"), (int, float)):
        raise LmrcError(f"{path}: threshold: expected a number, got {cal.get('threshold')!r}")
    weights = Path(checkpoint.path) / "model.safetensors"
    if cal.get("weights_sha256") and weights.is_file() and cal["weights_sha256"] != file_sha256(weights):
        raise LmrcError(
            f"{path}: calibrated for other weights ({cal.get('checkpoint')}), not {checkpoint.path}"
        )
    if cal.get("target") != target:
        raise LmrcError(f"{path}: calibrated for recall target {cal.get('target')}, not {target}")
    return {k: v for k, v in cal.items() if k not in ("format", "weights_sha256")}


# ---------------------------------------------------------------------------------------------- candidates


def select_candidates(
    docs: Sequence[Document],
    logits: Sequence[Tensor],
    loss,
    relations: RelationSet,
    threshold: float | None,
    max_per_doc: int | None = None,
    top_k: int = 3,
) -> list[DocumentCandidates]:
    """The candidate pairs of every document, best score first; multi-label heads add their predicted
    relations with their margins, and their `top_k` best relations whether predicted or not (stage-2 hints)."""
    out = []
    for doc, lg, scores in zip(docs, logits, pair_scores(loss, logits)):
        pairs = doc.pairs()
        keep = [i for i, s in enumerate(scores) if threshold is None or s > threshold]
        keep.sort(key=lambda i: (-scores[i], i))
        if max_per_doc is not None:
            keep = keep[:max_per_doc]
        rel_of: dict[int, dict[str, float]] = {}
        top_of: dict[int, dict[str, float]] = {}
        if loss.per_relation and keep:
            margins = loss.margins(lg).double()
            decided = loss.predict(lg)[:, 1:]
            k = min(top_k, margins.shape[1])
            for i in keep:
                cols = decided[i].nonzero().flatten().tolist()
                rel_of[i] = {relations.ids[c]: float(margins[i, c]) for c in cols}
                if k > 0:
                    best = torch.topk(margins[i], k)
                    top_of[i] = {
                        relations.ids[c]: float(v)
                        for v, c in zip(best.values.tolist(), best.indices.tolist())
                    }
        cands = tuple(
            CandidatePair(
                h=pairs[i][0], t=pairs[i][1], score=scores[i], relations=rel_of.get(i), top=top_of.get(i)
            )
            for i in keep
        )
        out.append(DocumentCandidates(title=doc.title, pairs=cands, n_entities=len(doc.entities)))
    return out


@dataclass
class PredictResult:
    candidates: Candidates
    threshold: float | None
    report: CandidateReport | None  # with gold documents
    relation_metrics: Any  # lmrc.eval.metrics.Metrics, for multi-label heads with gold documents
    relation_predictions: list[dict] | None


def predict(
    checkpoint_dir: str | os.PathLike,
    input_path: str | os.PathLike,
    output_path: str | os.PathLike,
    *,
    relations_output: str | os.PathLike | None = None,
    threshold: float | None = None,
    recall_target: float | None = None,
    tune_path: str | os.PathLike | None = None,
    calibration_path: str | os.PathLike | None = None,
    save_calibration_path: str | os.PathLike | None = None,
    max_per_doc: int | None = None,
    gold_path: str | os.PathLike | None = None,
    train_path: str | os.PathLike | None = None,
    batch_size: int = 8,
    device: str | torch.device | None = None,
    head_params: dict[str, Any] | None = None,
) -> PredictResult:
    """Score `input_path`'s documents with a checkpoint and write the candidates file (and the relation result).

    The candidate report needs gold labels: `gold_path`, or the input itself when it is labelled. Ign F1 needs
    the training documents: `train_path`, else the checkpoint config's `data.train` when that file exists.
    """
    from lmrc.stage1.checkpoint import load_checkpoint

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    ck = load_checkpoint(checkpoint_dir, device=device, head_params=head_params)
    if relations_output is not None and not ck.loss.per_relation:
        raise LmrcError(
            f"--relations: the {ck.loss_name!r} head predicts no relations (only candidate pairs)"
        )
    choice = choose_threshold(
        ck,
        threshold=threshold,
        recall_target=recall_target,
        tune_path=tune_path,
        calibration_path=calibration_path,
        max_per_doc=max_per_doc,
        batch_size=batch_size,
        device=device,
    )
    if save_calibration_path is not None:
        if choice.calibration.get("method") != "recall_target":
            raise LmrcError("--save-calibration: only a recall-target calibration (--recall-target) is saved")
        save_calibration(choice.calibration, save_calibration_path, ck)
    input_path = Path(input_path)
    docs = load_documents(input_path, ck.relations)
    logits = infer_logits(ck.model, _features(ck, docs, input_path), batch_size, device)
    doc_cands = select_candidates(docs, logits, ck.loss, ck.relations, choice.threshold, choice.max_per_doc)
    header = CandidatesHeader(
        model=str(ck.path),
        head=ck.loss_name,
        threshold=choice.threshold,
        calibration=choice.calibration,
        source=str(input_path),
    )
    candidates = Candidates(header=header, documents=doc_cands)
    save_candidates(candidates, output_path)
    rel_preds = None
    if ck.loss.per_relation:
        rel_preds = relation_predictions(docs, logits, ck.loss, ck.relations)
        if relations_output is not None:
            atomic_write_json(relations_output, rel_preds)

    gold = None
    if gold_path is not None:
        from lmrc.stage1.train import load_labelled_docs

        gold = load_labelled_docs(Path(gold_path), ck.relations, "gold")
    elif all(d.labelled for d in docs):
        gold = docs
    report = metrics = None
    if gold is not None:
        report = candidate_report(doc_cands, gold)
        if rel_preds is not None:
            from lmrc.eval.metrics import evaluate

            metrics = evaluate(rel_preds, gold, _train_docs(ck, train_path))
    return PredictResult(candidates, choice.threshold, report, metrics, rel_preds)


def _features(checkpoint, docs: Sequence[Document], source: Path):
    """Features of a whole file, through the feature cache (keyed by the file's content)."""
    from lmrc.models import default_cache_dir
    from lmrc.stage1.features import featurize_all

    cache = default_cache_dir() / "features"
    return featurize_all(
        docs, checkpoint.tokenizer, checkpoint.relations, checkpoint.max_length, cache, file_sha256(source)
    )


def _train_docs(checkpoint, train_path: str | os.PathLike | None) -> list[Document] | None:
    from lmrc.stage1.train import load_labelled_docs

    if train_path is not None:
        return load_labelled_docs(Path(train_path), checkpoint.relations, "training")
    try:
        path = checkpoint.config.data.path("train")
    except LmrcError:
        path = None
    if path is not None and path.is_file():
        log.info("Ign F1 against the checkpoint's training file %s", path)
        return load_labelled_docs(path, checkpoint.relations, "training")
    log.warning("no training file found (pass --train): Ign F1 equals F1")
    return None


# ------------------------------------------------------------------------------------------- cross-fitting


@dataclass
class CrossfitResult:
    candidates: Candidates
    report: CandidateReport
    fold_dirs: list[Path]


def crossfit(
    config,
    folds: int,
    output_path: str | os.PathLike,
    *,
    threshold: float | None = None,
    recall_target: float | None = None,
    max_per_doc: int | None = None,
    batch_size: int = 8,
) -> CrossfitResult:
    """Train `folds` models (each without one fold of `config.data.train`) and write the candidates of every
    training document, proposed by the model that did not see it.

    Fold k trains in `<output_dir>/fold<k>` and is resumed if interrupted (a finished fold is not retrained).
    With `recall_target`, each fold model is calibrated on `config.data.tune`.
    """
    # Imported here: train.py uses this module's scoring functions.
    from lmrc.data.relations import load_relations
    from lmrc.stage1.checkpoint import load_checkpoint
    from lmrc.stage1.train import fold_indices, load_labelled_docs, train

    if recall_target is not None and config.data.tune is None:
        raise LmrcError("cross-fitting with a recall target needs data.tune (the calibration file)")
    relations = load_relations(config.data.path("rel_info"))
    train_path = config.data.path("train")
    docs = load_labelled_docs(train_path, relations, "training")
    parts = fold_indices(len(docs), folds, config.data.fold_seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    by_index: dict[int, DocumentCandidates] = {}
    fold_dirs, thresholds, cals = [], [], []
    for k, held in enumerate(parts):
        cfg_k = dataclasses.replace(
            config,
            data=dataclasses.replace(config.data, folds=folds, holdout_fold=k),
            output_dir=str(Path(config.output_dir) / f"fold{k}"),
        )
        log.info("cross-fitting: fold %d of %d (%d held-out documents)", k + 1, folds, len(held))
        result = train(cfg_k, resume=True)
        ck = load_checkpoint(result.best_dir, device=device)
        choice = choose_threshold(
            ck,
            threshold=threshold,
            recall_target=recall_target,
            tune_path=config.data.path("tune") if recall_target is not None else None,
            max_per_doc=max_per_doc,
            batch_size=batch_size,
            device=device,
        )
        held_docs = [docs[i] for i in held]
        feats = _features(ck, docs, train_path)
        logits = infer_logits(ck.model, [feats[i] for i in held], batch_size, device)
        for i, dc in zip(
            held,
            select_candidates(held_docs, logits, ck.loss, ck.relations, choice.threshold, choice.max_per_doc),
        ):
            by_index[i] = dc
        fold_dirs.append(result.best_dir)
        thresholds.append(choice.threshold)
        cals.append(choice.calibration)
        del ck
    doc_cands = [by_index[i] for i in range(len(docs))]
    same = all(t == thresholds[0] for t in thresholds)
    calibration = dict(cals[0]) if same else {"method": cals[0]["method"]}
    calibration["crossfit"] = {
        "folds": folds,
        "fold_seed": config.data.fold_seed,
        "fold_models": [str(p) for p in fold_dirs],
        "fold_thresholds": thresholds,
        "fold_documents": [len(p) for p in parts],
    }
    header = CandidatesHeader(
        model=str(config.output_dir),
        head=config.loss.name,
        threshold=thresholds[0] if same else None,
        calibration=calibration,
        source=str(train_path),
    )
    candidates = Candidates(header=header, documents=doc_cands)
    save_candidates(candidates, output_path)
    return CrossfitResult(candidates, candidate_report(doc_cands, docs), fold_dirs)


# ------------------------------------------------------------------------------------------ batch by batch


class Proposer:
    """A loaded checkpoint with its threshold resolved: documents -> candidates (and relations), a batch at a
    time, for the pipeline (which streams a corpus and never holds all logits at once).

    Features are built per batch, without the file-level cache: a batch is small, and the cache is keyed by a
    whole file.
    """

    def __init__(
        self,
        checkpoint_dir: str | os.PathLike,
        *,
        threshold: float | None = None,
        recall_target: float | None = None,
        tune_path: str | os.PathLike | None = None,
        calibration_path: str | os.PathLike | None = None,
        max_per_doc: int | None = None,
        batch_size: int = 8,
        device: str | torch.device | None = None,
        head_params: dict[str, Any] | None = None,
    ) -> None:
        from lmrc.stage1.checkpoint import load_checkpoint
        from lmrc.stage1.features import tokenizer_info

        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.checkpoint = load_checkpoint(checkpoint_dir, device=self.device, head_params=head_params)
        self.batch_size = batch_size
        self.choice = choose_threshold(
            self.checkpoint,
            threshold=threshold,
            recall_target=recall_target,
            tune_path=tune_path,
            calibration_path=calibration_path,
            max_per_doc=max_per_doc,
            batch_size=batch_size,
            device=self.device,
        )
        self._info = tokenizer_info(self.checkpoint.tokenizer)

    @property
    def relations(self) -> RelationSet:
        return self.checkpoint.relations

    @property
    def per_relation(self) -> bool:
        return bool(self.checkpoint.loss.per_relation)

    def calibrate_upper(self, tune_path: str | os.PathLike, precision: float) -> dict:
        """The refine mode's upper threshold, calibrated on a labelled tuning file (see calibrate_upper)."""
        from lmrc.stage1.train import load_labelled_docs

        ck = self.checkpoint
        if not ck.loss.per_relation:
            raise LmrcError(
                f"refine needs stage-1 relations: the {ck.loss_name!r} head only scores pairs (use a multi-label head)"
            )
        docs = load_labelled_docs(Path(tune_path), ck.relations, "tuning")
        logits = self.logits(docs)
        scores, predicted, gold = [], [], []
        for doc, lg in zip(docs, logits):
            rel_of = doc.relations_by_pair()
            decided = ck.loss.predict(lg)[:, 1:] if len(lg) else torch.zeros((0, len(ck.relations)))
            scores.append(ck.loss.score(lg).double().tolist() if len(lg) else [])
            predicted.append(
                [{ck.relations.ids[c] for c in row.nonzero().flatten().tolist()} for row in decided]
            )
            gold.append([set(rel_of.get(p, ())) for p in doc.pairs()])
        cal = calibrate_upper(scores, predicted, gold, precision)
        cal.update({"tune": str(tune_path), "tune_sha256": file_sha256(tune_path)})
        return cal

    def logits(self, docs: Sequence[Document]) -> list[Tensor]:
        from lmrc.stage1.features import featurize

        ck = self.checkpoint
        feats = [featurize(d, ck.tokenizer, None, ck.max_length, self._info) for d in docs]
        return infer_logits(ck.model, feats, self.batch_size, self.device)

    def propose(self, docs: Sequence[Document]) -> tuple[list[DocumentCandidates], list[list[dict]] | None]:
        """Candidates of every document, and (multi-label heads) its relation predictions."""
        ck = self.checkpoint
        logits = self.logits(docs)
        cands = select_candidates(
            docs, logits, ck.loss, ck.relations, self.choice.threshold, self.choice.max_per_doc
        )
        rels = None
        if ck.loss.per_relation:
            rels = [relation_predictions([d], [lg], ck.loss, ck.relations) for d, lg in zip(docs, logits)]
        return cands, rels
