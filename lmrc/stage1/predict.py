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

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from lmrc.data.candidates import (
    Candidates,
    CandidatesHeader,
    DocumentCandidates,
    save_candidates,
)
from lmrc.data.docred import Document, load_documents, load_labelled, restrict_pairs
from lmrc.data.relations import RelationSet
from lmrc.errors import LmrcError
from lmrc.eval.metrics import Metrics, PackedPredictions, evaluate
from lmrc.io import atomic_write_json
from lmrc.stage1.calibration import calibrate_refine, choose_threshold, save_calibration
from lmrc.stage1.checkpoint import load_checkpoint
from lmrc.stage1.config import CandidateSettings
from lmrc.stage1.features import featurize, tokenizer_info
from lmrc.stage1.inference import (
    CandidateReport,
    candidate_report,
    file_features,
    infer_logits,
    packed_relations,
    relation_predictions,
    select_candidates,
)

log = logging.getLogger(__name__)


@dataclass
class PredictResult:
    candidates: Candidates
    threshold: float | None
    report: CandidateReport | None  # with gold documents
    relation_metrics: Metrics | None  # multi-label heads with gold documents
    relation_predictions: list[dict] | None


def pick_device(rule: CandidateSettings) -> str:
    return rule.device or ("cuda" if torch.cuda.is_available() else "cpu")


def predict(
    checkpoint_dir: str | os.PathLike,
    input_path: str | os.PathLike,
    output_path: str | os.PathLike,
    rule: CandidateSettings | None = None,
    *,
    relations_output: str | os.PathLike | None = None,
    save_calibration_path: str | os.PathLike | None = None,
    gold_path: str | os.PathLike | None = None,
    train_path: str | os.PathLike | None = None,
) -> PredictResult:
    """Score `input_path`'s documents with a checkpoint and write the candidates file (and the relation result).

    The candidate report needs gold labels: `gold_path`, or the input itself when it is labelled. Ign F1 needs
    the training documents: `train_path`, else the checkpoint config's `data.train` when that file exists.
    `rule`: the candidate rule (default: the head's own threshold).
    """
    rule = rule or CandidateSettings()
    device = pick_device(rule)
    ck = load_checkpoint(checkpoint_dir, device=device, head_params=rule.head_params)
    if relations_output is not None and not ck.loss.per_relation:
        raise LmrcError(
            f"--relations: the {ck.loss_name!r} head predicts no relations (only candidate pairs)"
        )
    choice = choose_threshold(ck, rule, device)
    if save_calibration_path is not None:
        if choice.calibration.get("method") != "recall_target":
            raise LmrcError("--save-calibration: only a recall-target calibration (--recall-target) is saved")
        save_calibration(choice.calibration, save_calibration_path, ck)
    input_path = Path(input_path)
    docs = restrict_pairs(load_documents(input_path, ck.relations), ck.config.data.pair_types, input_path)
    logits = infer_logits(ck.model, file_features(ck, docs, input_path), rule.batch_size, device)
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
    gold = _gold_documents(ck, docs, gold_path)
    report = metrics = None
    if gold is not None:
        report = candidate_report(doc_cands, gold)
        if rel_preds is not None:
            metrics = evaluate(rel_preds, gold, _train_docs(ck, train_path))
    return PredictResult(candidates, choice.threshold, report, metrics, rel_preds)


def _gold_documents(
    checkpoint, docs: list[Document], gold_path: str | os.PathLike | None
) -> list[Document] | None:
    """The labelled documents of the report: `gold_path`, else the input when it is labelled, else none."""
    if gold_path is not None:
        gold = load_labelled(Path(gold_path), checkpoint.relations, role="gold")
        return restrict_pairs(gold, checkpoint.config.data.pair_types)
    return docs if all(d.labelled for d in docs) else None


def _train_docs(checkpoint, train_path: str | os.PathLike | None) -> list[Document] | None:
    if train_path is not None:
        return load_labelled(Path(train_path), checkpoint.relations, role="training")
    try:
        path = checkpoint.config.data.path("train")
    except LmrcError:
        path = None
    if path is not None and path.is_file():
        log.info("Ign F1 against the checkpoint's training file %s", path)
        return load_labelled(path, checkpoint.relations, role="training")
    log.warning("no training file found (pass --train): Ign F1 equals F1")
    return None


# ------------------------------------------------------------------------------------------ batch by batch


class Proposer:
    """A loaded checkpoint with its threshold resolved: documents -> candidates (and relations), a batch at a
    time, for the pipeline (which streams a corpus and never holds all logits at once).

    Features are built per batch, without the file-level cache: a batch is small, and the cache is keyed by a
    whole file.
    """

    def __init__(self, checkpoint_dir: str | os.PathLike, rule: CandidateSettings | None = None) -> None:
        rule = rule or CandidateSettings()
        self.device = pick_device(rule)
        self.checkpoint = load_checkpoint(checkpoint_dir, device=self.device, head_params=rule.head_params)
        self.batch_size = rule.batch_size
        self.choice = choose_threshold(self.checkpoint, rule, self.device)
        self._info = tokenizer_info(self.checkpoint.tokenizer, self.checkpoint.config.model.word_prefix_space)

    @property
    def relations(self) -> RelationSet:
        return self.checkpoint.relations

    @property
    def per_relation(self) -> bool:
        return bool(self.checkpoint.loss.per_relation)

    def calibrate_upper(
        self,
        tune_path: str | os.PathLike,
        precision: float,
        additions: bool = False,
        upper: float | None = None,
    ) -> dict:
        """Fusion refine's thresholds on a labelled tuning file, from this checkpoint's logits (see
        lmrc.stage1.calibration.calibrate_refine)."""
        ck = self.checkpoint
        if not ck.loss.per_relation:
            raise LmrcError(
                f"refine needs stage-1 relations: the {ck.loss_name!r} head only scores pairs (use a multi-label head)"
            )
        docs = restrict_pairs(
            load_labelled(Path(tune_path), ck.relations, role="tuning"), ck.config.data.pair_types
        )
        return calibrate_refine(
            ck, docs, self.logits(docs), tune_path, precision, self.choice.threshold, additions, upper
        )

    def logits(self, docs: Sequence[Document]) -> list[Tensor]:
        ck = self.checkpoint
        feats = [featurize(d, ck.tokenizer, None, ck.max_length, self._info) for d in docs]
        return infer_logits(ck.model, feats, self.batch_size, self.device)

    def propose(
        self, docs: Sequence[Document]
    ) -> tuple[list[DocumentCandidates], list[PackedPredictions] | None]:
        """Candidates of every document, and (multi-label heads) its relation predictions, as arrays."""
        ck = self.checkpoint
        logits = self.logits(docs)
        cands = select_candidates(
            docs, logits, ck.loss, ck.relations, self.choice.threshold, self.choice.max_per_doc
        )
        rels = None
        if ck.loss.per_relation:
            rels = [packed_relations(d, lg, ck.loss, ck.relations) for d, lg in zip(docs, logits)]
        return cands, rels
