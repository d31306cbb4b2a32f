"""Stage-1 inference: logits of every pair, the head's candidate scores and relations, the candidates of a
document at a threshold, and the pair-level and relation-level metrics that training selects on.

Every ordered entity pair of a document is scored with the head's `score()` (bce: P(has relation); multi-label
heads: max_r logit_r minus the threshold that applies to r) and becomes a candidate when its score is above the
threshold. A pair counts as positive for the candidate metrics when it holds at least one relation.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lmrc.data.candidates import (
    CandidatePair,
    DocumentCandidates,
)
from lmrc.data.docred import Document
from lmrc.data.relations import RelationSet
from lmrc.errors import LmrcError
from lmrc.eval.metrics import PackedPredictions, evaluate
from lmrc.io import file_sha256
from lmrc.machine.heap import scoring_heap
from lmrc.models.store import default_cache_dir
from lmrc.stage1.features import collate, featurize_all, length_grouped_batches

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------- scoring


@torch.no_grad()
def infer_logits(
    model: torch.nn.Module, features: Sequence, batch_size: int, device: str | torch.device
) -> list[Tensor]:
    """Logits [pairs, num_logits] (float32, CPU) of every document, pairs in `doc.pairs()` order.

    Documents are batched by length; those without pairs (one entity) are not run through the encoder.
    """
    model.eval()
    out: list[Tensor | None] = [None] * len(features)
    runnable = [i for i, f in enumerate(features) if f.hts]
    width = getattr(model, "num_logits", None)
    for i, f in enumerate(features):
        if not f.hts:
            out[i] = torch.zeros((0, width or 1))
    subset = [features[i] for i in runnable]
    with scoring_heap():
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
    return [x for doc, lg in zip(docs, logits) for x in packed_relations(doc, lg, loss, relations).records()]


def packed_relations(doc: Document, logits: Tensor, loss, relations: RelationSet) -> PackedPredictions:
    """One document's relation decisions as arrays, in relation_predictions' order (pair, then relation):
    12 bytes a triple, where the dicts would take ~400 (a noisy head predicts hundreds of thousands)."""
    if not loss.per_relation:
        raise LmrcError(f"the {loss.name!r} head predicts no relations (only whether a pair has one)")
    empty = np.zeros(0, dtype=np.int64)
    if not len(logits):
        return PackedPredictions.from_columns(doc.title, empty, empty, empty, relations.ids)
    found = loss.predict(logits)[:, 1:].nonzero().numpy()  # [n, 2]: pair row, relation column
    pairs = np.asarray(doc.pairs(), dtype=np.int64).reshape(-1, 2)[found[:, 0]]
    return PackedPredictions.from_columns(doc.title, pairs[:, 0], pairs[:, 1], found[:, 1], relations.ids)


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
        packed = [packed_relations(d, lg, loss, relations) for d, lg in zip(docs, logits)]
        summary = evaluate([], docs, train_ref, packed=packed).summary()
        for key in ("precision", "recall", "f1", "ign_f1"):
            out[key] = summary[key]
    return out


# ---------------------------------------------------------------------------------------------- candidates


CANDIDATE_TOP_K = 3  # a candidate's best relations recorded, predicted or not (hints, choices, refine)


def select_candidates(
    docs: Sequence[Document],
    logits: Sequence[Tensor],
    loss,
    relations: RelationSet,
    threshold: float | None,
    max_per_doc: int | None = None,
    top_k: int = CANDIDATE_TOP_K,
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


def file_features(checkpoint, docs: Sequence[Document], source: Path):
    """Features of a whole file, through the feature cache (keyed by the file's content)."""
    cache = default_cache_dir() / "features"
    return featurize_all(
        docs,
        checkpoint.tokenizer,
        checkpoint.relations,
        checkpoint.max_length,
        cache,
        file_sha256(source),
        checkpoint.config.model.word_prefix_space,
    )
