"""Stage 1's training data: the relation set, the training documents (less a held-out fold when cross-fitting),
the tuning documents, their features (cached), and what the loss learns from the training facts."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmrc.data.docred import Document, load_labelled, restrict_pairs
from lmrc.data.relations import RelationSet, load_relations
from lmrc.data.split import fold_indices
from lmrc.errors import LmrcError
from lmrc.eval.metrics import TrainReference
from lmrc.io import file_sha256
from lmrc.models.store import default_cache_dir
from lmrc.stage1.config import Stage1Config
from lmrc.stage1.features import DocFeatures, featurize_all

log = logging.getLogger(__name__)


@dataclass
class TrainData:
    relations: RelationSet
    train_docs: list[Document]
    train_features: list[DocFeatures]
    tune_docs: list[Document] | None  # None without a tuning file (no model selection)
    tune_features: list[DocFeatures] | None
    train_reference: TrainReference | None = None  # for Ign F1, built once
    loss_params: dict[str, Any] = field(default_factory=dict)


def read_documents(cfg: Stage1Config) -> tuple[RelationSet, list[Document], list[Document] | None]:
    """The relation set, training and tuning documents (None without a tuning file), checked: read before the
    encoder is loaded, so that a bad data file is reported at once."""
    relations = load_relations(cfg.data.path("rel_info"))
    train_path = cfg.data.path("train")
    train = restrict_pairs(
        load_labelled(train_path, relations, role="training"), cfg.data.pair_types, train_path
    )
    tune_path = cfg.data.path("tune")
    tune = None
    if tune_path is not None:
        tune = restrict_pairs(
            load_labelled(tune_path, relations, role="tuning"), cfg.data.pair_types, tune_path
        )
    return relations, train, tune


def load_train_data(
    cfg: Stage1Config,
    tokenizer,
    relations: RelationSet,
    all_train: list[Document],
    tune: list[Document] | None,
) -> TrainData:
    """Features of the training documents (without the held-out fold) and of the tuning documents."""
    train_path = cfg.data.path("train")
    all_features = _features(cfg, tokenizer, relations, all_train, train_path)
    keep = kept_for_training(cfg, len(all_train))
    train_docs = [all_train[i] for i in keep]
    tune_features = None
    if tune is not None:
        tune_path = cfg.data.path("tune")
        overlap = {d.title for d in tune} & {d.title for d in train_docs}
        if overlap:
            raise LmrcError(
                f"{tune_path}: {len(overlap)} tuning documents are also in the training file "
                f"{train_path} (e.g. {sorted(overlap)[0]!r}); split them apart with `lmrc data split`"
            )
        tune_features = _features(cfg, tokenizer, relations, tune, tune_path)
    else:
        log.warning("no tuning file (data.tune): no model selection, best/ will hold the last epoch")
    return TrainData(
        relations=relations,
        train_docs=train_docs,
        train_features=[all_features[i] for i in keep],
        tune_docs=tune,
        tune_features=tune_features,
        train_reference=TrainReference.from_documents(train_docs),
        loss_params=resolve_loss_params(cfg, train_docs, relations),
    )


def kept_for_training(cfg: Stage1Config, n_docs: int) -> list[int]:
    """Indices of the training documents trained on: all, or all but `data.holdout_fold` (cross-fitting)."""
    keep = list(range(n_docs))
    if cfg.data.holdout_fold is None:
        return keep
    held = set(fold_indices(n_docs, cfg.data.folds, cfg.data.fold_seed)[cfg.data.holdout_fold])
    keep = [i for i in keep if i not in held]
    log.info(
        "cross-fitting: training on %d of %d documents (fold %d of %d held out)",
        len(keep),
        n_docs,
        cfg.data.holdout_fold,
        cfg.data.folds,
    )
    return keep


def _features(cfg: Stage1Config, tokenizer, relations: RelationSet, docs: list[Document], path: Path):
    return featurize_all(
        docs,
        tokenizer,
        relations,
        cfg.model.max_length,
        feature_cache_dir(cfg),
        file_sha256(path),
        cfg.model.word_prefix_space,
    )


def feature_cache_dir(cfg: Stage1Config) -> Path:
    if cfg.data.cache_dir:
        return Path(cfg.data.cache_dir).expanduser()
    return default_cache_dir() / "features"


def relation_counts(docs: list[Document], relations: RelationSet) -> list[int]:
    """Training facts per relation, in label column order (AMTL sorts its segments by these)."""
    counts = [0] * len(relations)
    for doc in docs:
        for f in doc.facts or ():
            counts[relations.column(f.r) - 1] += 1
    return counts


def resolve_loss_params(cfg: Stage1Config, train_docs: list[Document], relations: RelationSet) -> dict:
    """The config's loss parameters plus what the training data decides (AMTL's relation frequencies)."""
    params = dict(cfg.loss.params)
    if cfg.loss.name == "amtl" and "segments" not in params and "relation_counts" not in params:
        params["relation_counts"] = relation_counts(train_docs, relations)
    return params
