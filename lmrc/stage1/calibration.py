"""Stage-1 thresholds: the head's own rule, an explicit value, a recall target calibrated on a labelled tuning
file (our addition, not in the papers), the K best pairs per document, and the refine mode's upper threshold.

Calibrations go to the candidates header and, on request, to a file the user names (`--save-calibration`,
reused with `--calibration`); checkpoint folders are never written.
"""

from __future__ import annotations

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

from lmrc.data.docred import Document, load_labelled, restrict_pairs
from lmrc.errors import LmrcError
from lmrc.io import atomic_write_json, file_sha256, read_json
from lmrc.stage1.config import CandidateSettings
from lmrc.stage1.inference import (
    CANDIDATE_TOP_K,
    CandidateReport,
    file_features,
    gold_pair_flags,
    infer_logits,
    pair_scores,
)

log = logging.getLogger(__name__)


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
    checkpoint, rule: CandidateSettings, device: str | torch.device = "cpu"
) -> ThresholdChoice:
    """Resolve the candidate rule's threshold for a loaded checkpoint: an explicit value, the K best pairs, a
    recall target (calibrated on `rule.tune`, or read from `rule.calibration`), else the head's own rule. The
    checkpoint folder is never written."""
    if rule.tune is not None and rule.recall_target is None:
        raise LmrcError("--tune is only used with --recall-target")
    if rule.threshold is not None:
        return ThresholdChoice(float(rule.threshold), None, {"method": "manual"})
    if rule.max_per_doc is not None:
        return ThresholdChoice(None, rule.max_per_doc, {"method": "max_per_doc", "k": rule.max_per_doc})
    if rule.recall_target is not None:
        calibration = _recall_calibration(checkpoint, rule, device)
        return ThresholdChoice(float(calibration["threshold"]), None, calibration)
    return ThresholdChoice(float(checkpoint.loss.score_threshold), None, {"method": "default"})


def _recall_calibration(checkpoint, rule: CandidateSettings, device: str | torch.device) -> dict[str, Any]:
    """The recall target's calibration: from a saved file, calibrated now on the tuning file, or (checkpoints of
    lmrc 0.1) the one stored in the checkpoint folder."""
    target = rule.recall_target
    assert target is not None
    if rule.calibration is not None:
        return load_calibration(rule.calibration, checkpoint, target)
    if rule.tune is not None:
        return calibrate_on_file(checkpoint, rule.tune, target, rule.batch_size, device)
    stored = checkpoint.calibration
    if stored and stored.get("method") == "recall_target" and stored.get("target") == target:
        log.info("using the calibration stored in %s (recall target %s)", checkpoint.path, target)
        return stored
    raise LmrcError(
        f"recall target {target}: pass --tune FILE (a labelled tuning file) to calibrate, or "
        "--calibration FILE (saved earlier with --save-calibration)"
    )


def calibrate_on_file(
    checkpoint,
    tune_path: str | os.PathLike,
    target: float,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
) -> dict:
    """Calibrate the recall-target threshold on a labelled file (the checkpoint is left as it is)."""
    tune_path = Path(tune_path)
    docs = restrict_pairs(
        load_labelled(tune_path, checkpoint.relations, role="tuning"), checkpoint.config.data.pair_types
    )
    features = file_features(checkpoint, docs, tune_path)
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


def calibrate_additions(
    near_misses: Sequence[tuple[float, bool]], hits: int, n_pred: int, n_gold: int
) -> dict:
    """Refine's gate on the LLM's additions (`refine.additions: calibrated`): the lowest margin m such that adding
    every near miss of stage 1 scored at or above m (relations it ranks among a band pair's best but does not
    predict) maximises F1 on labelled documents; None when no such set raises F1.

    Why: adding n triples of which c are right raises F1 = 2 TP / (P + G) exactly when c / n > F1 / 2, so a set
    of near misses that raises F1 keeps doing so on average when a weak LLM accepts a random part of it, and an
    LLM that tells right from wrong raises it more. Relations outside the set are the ones a barely trained LLM
    gets wrong (measured: docs/RESULTS.md). `near_misses`: (margin, is gold) rows; hits / n_pred / n_gold: stage
    1's own relation-level counts on the same documents.
    """
    denominator = n_pred + n_gold
    base = 2 * hits / denominator if denominator else 0.0
    best: dict[str, Any] = {"add_margin": None, "f1": base, "added": 0, "right": 0}
    rows = sorted(near_misses, key=lambda r: -r[0])
    added = right = 0
    for k, (margin, gold) in enumerate(rows):
        added += 1
        right += bool(gold)
        if k + 1 < len(rows) and rows[k + 1][0] == margin:
            continue  # a margin cannot separate equal scores
        f1 = 2 * (hits + right) / (denominator + added)
        if f1 > best["f1"]:
            best = {"add_margin": margin, "f1": f1, "added": added, "right": right}
    return {"method": "no_harm_near_misses", "stage1_f1": base, "near_misses": len(rows), **best}


def calibrate_refine(
    checkpoint,
    docs: Sequence[Document],
    logits: Sequence[Tensor],
    tune_path: str | os.PathLike,
    precision: float,
    threshold: float | None,
    additions: bool = False,
    upper: float | None = None,
) -> dict:
    """Fusion refine's thresholds on labelled tuning documents and their logits: the upper threshold
    (calibrate_upper) unless `upper` is given, and with `additions` the gate on the LLM's additions in the band
    between the candidate `threshold` and the upper one (calibrate_additions)."""
    loss, ids = checkpoint.loss, checkpoint.relations.ids
    scores, predicted, gold, margins = [], [], [], []
    for doc, doc_logits in zip(docs, logits):
        relations_of = doc.relations_by_pair()
        decided = loss.predict(doc_logits)[:, 1:] if len(doc_logits) else torch.zeros((0, len(ids)))
        scores.append(loss.score(doc_logits).double().tolist() if len(doc_logits) else [])
        predicted.append([{ids[c] for c in row.nonzero().flatten().tolist()} for row in decided])
        gold.append([set(relations_of.get(p, ())) for p in doc.pairs()])
        margins.append(loss.margins(doc_logits).double() if additions and len(doc_logits) else None)
    if upper is None:
        cal = calibrate_upper(scores, predicted, gold, precision)
    else:
        cal = {"method": "manual", "upper": upper}
    cal.update({"tune": str(tune_path), "tune_sha256": file_sha256(tune_path)})
    if additions:
        rows, counts = _near_misses(ids, scores, predicted, gold, margins, threshold, cal["upper"])
        cal["additions"] = calibrate_additions(rows, *counts)
    return cal


def _near_misses(ids, scores, predicted, gold, margins, threshold: float | None, upper: float | None):
    """The band's candidate pairs (above the candidate threshold, not above `upper`): their best relations by
    margin (as many as the candidates record) that stage 1 does not predict, as (margin, is gold) rows; and stage
    1's own relation-level counts (hits, predicted, gold) on the same documents."""
    rows, hits, n_pred, n_gold = [], 0, 0, 0
    for ds, dp, dg, dm in zip(scores, predicted, gold, margins):
        for i, (s, p, g) in enumerate(zip(ds, dp, dg)):
            hits, n_pred, n_gold = hits + len(p & g), n_pred + len(p), n_gold + len(g)
            in_band = (threshold is None or s > threshold) and (upper is None or s <= upper or not p)
            if not in_band or dm is None:
                continue
            best = torch.topk(dm[i], min(CANDIDATE_TOP_K, dm.shape[1]))
            for v, c in zip(best.values.tolist(), best.indices.tolist()):
                if ids[c] not in p:
                    rows.append((float(v), ids[c] in g))
    return rows, (hits, n_pred, n_gold)


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
