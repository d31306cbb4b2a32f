"""Cross-fitting (`lmrc stage1 crossfit`): K models, each trained without one fold of the training file, propose
the candidates of the fold they did not see, so that stage 2 trains on realistic candidates without leakage."""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from lmrc.data.candidates import (
    Candidates,
    CandidatesHeader,
    DocumentCandidates,
    save_candidates,
)
from lmrc.data.docred import load_labelled, restrict_pairs
from lmrc.data.relations import load_relations
from lmrc.data.split import fold_indices
from lmrc.errors import LmrcError
from lmrc.stage1.calibration import choose_threshold
from lmrc.stage1.checkpoint import load_checkpoint
from lmrc.stage1.config import CandidateSettings
from lmrc.stage1.inference import (
    CandidateReport,
    candidate_report,
    file_features,
    infer_logits,
    select_candidates,
)
from lmrc.stage1.train import train

log = logging.getLogger(__name__)


@dataclass
class CrossfitResult:
    candidates: Candidates
    report: CandidateReport
    fold_dirs: list[Path]


def crossfit(
    config,
    folds: int,
    output_path: str | os.PathLike,
    rule: CandidateSettings | None = None,
) -> CrossfitResult:
    """Train `folds` models (each without one fold of `config.data.train`) and write the candidates of every
    training document, proposed by the model that did not see it.

    Fold k trains in `<output_dir>/fold<k>` and is resumed if interrupted (a finished fold is not retrained).
    `rule`: the candidate rule; with a recall target, each fold model is calibrated on `config.data.tune`.
    """
    rule = rule or CandidateSettings()
    if rule.recall_target is not None and config.data.tune is None:
        raise LmrcError("cross-fitting with a recall target needs data.tune (the calibration file)")
    relations = load_relations(config.data.path("rel_info"))
    train_path = config.data.path("train")
    docs = restrict_pairs(
        load_labelled(train_path, relations, role="training"), config.data.pair_types, train_path
    )
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
        tune = str(config.data.path("tune")) if rule.recall_target is not None else None
        choice = choose_threshold(ck, dataclasses.replace(rule, tune=tune), device)
        held_docs = [docs[i] for i in held]
        feats = file_features(ck, docs, train_path)
        logits = infer_logits(ck.model, [feats[i] for i in held], rule.batch_size, device)
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
    header = _header(config, parts, fold_dirs, thresholds, cals, train_path)
    candidates = Candidates(header=header, documents=doc_cands)
    save_candidates(candidates, output_path)
    return CrossfitResult(candidates, candidate_report(doc_cands, docs), fold_dirs)


def _header(
    config, parts: list[list[int]], fold_dirs, thresholds: list, cals: list[dict], train_path
) -> CandidatesHeader:
    """The candidates file's header: the folds' common threshold and calibration (when they agree) and how the
    folds were made."""
    same = all(t == thresholds[0] for t in thresholds)
    calibration = dict(cals[0]) if same else {"method": cals[0]["method"]}
    calibration["crossfit"] = {
        "folds": len(parts),
        "fold_seed": config.data.fold_seed,
        "fold_models": [str(p) for p in fold_dirs],
        "fold_thresholds": thresholds,
        "fold_documents": [len(p) for p in parts],
    }
    return CandidatesHeader(
        model=str(config.output_dir),
        head=config.loss.name,
        threshold=thresholds[0] if same else None,
        calibration=calibration,
        source=str(train_path),
    )
