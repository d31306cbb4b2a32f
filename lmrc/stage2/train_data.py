"""Stage 2's training data as the config names it: the relation set and documents, the prompt template, stage
1's candidates (false positives answered None with `rc_allow_none`, relation hints with `hints`), and the
examples built from them (`ExampleBuilder`)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lmrc.config import expand_path
from lmrc.data.candidates import hint_names, load_candidates, match_candidates
from lmrc.data.docred import Document, load_documents, require_labels, restrict_pairs
from lmrc.data.relations import RelationSet, load_relations
from lmrc.errors import LmrcError
from lmrc.stage2.config import Stage2Config
from lmrc.stage2.examples import ExampleBuilder, ExampleStats, TrainExample
from lmrc.stage2.prompts import PromptEncoder
from lmrc.stage2.templates import PromptTemplate, default_prompts_dir, load_template

log = logging.getLogger(__name__)


def template_source(cfg: Stage2Config) -> Path:
    return (
        expand_path(cfg.template, "template") if cfg.template else default_prompts_dir() / f"{cfg.mode}.txt"
    )


def load_training_template(cfg: Stage2Config) -> tuple[PromptTemplate, str]:
    """The template and its raw text (saved with the adapter so that predict renders identical prompts)."""
    path = template_source(cfg)
    template = load_template(cfg.mode, path, allow_none=cfg.allow_none, hints=cfg.hints > 0)
    return template, path.read_text(encoding="utf-8")


def load_training_documents(cfg: Stage2Config) -> tuple[RelationSet, list[Document]]:
    rel_path = cfg.data.path("rel_info")
    train_path = cfg.data.path("train")
    assert rel_path is not None and train_path is not None
    relations = load_relations(rel_path)
    docs = restrict_pairs(load_documents(train_path, relations), cfg.data.pair_types, train_path)
    require_labels(docs, train_path, "training")
    if cfg.data.max_docs is not None and cfg.data.max_docs < len(docs):
        log.info(
            "data.max_docs=%d: training on the first %d of %d documents",
            cfg.data.max_docs,
            cfg.data.max_docs,
            len(docs),
        )
        docs = docs[: cfg.data.max_docs]
    return relations, docs


def build_training_examples(
    cfg: Stage2Config,
    tokenizer: Any,
    relations: RelationSet,
    docs: Sequence[Document],
    template: PromptTemplate,
) -> tuple[list[TrainExample], ExampleStats]:
    """The examples the run trains on; a config that yields none is refused."""
    encoder = PromptEncoder(tokenizer, cfg.use_chat_template)
    builder = ExampleBuilder(
        relations, template, encoder, cfg.max_seq_len, cfg.max_pairs, cfg.answer_tokens_per_pair
    )
    examples, stats = builder.build(
        docs,
        cfg.mode,
        load_false_positive_candidates(cfg, docs),
        na_chunk_fraction=cfg.data.direct_na_chunk_fraction,
        seed=cfg.train.seed,
        hints=load_training_hints(cfg, relations, docs),
    )
    if not examples:
        raise LmrcError(f"{cfg.data.train}: no training examples (no document has pairs for mode {cfg.mode})")
    log.info(
        "%d training examples from %d documents (%d prompt + %d answer tokens)",
        len(examples),
        stats.documents,
        stats.prompt_tokens,
        stats.answer_tokens,
    )
    return examples, stats


def load_false_positive_candidates(cfg: Stage2Config, docs: Sequence[Document]) -> dict[str, list] | None:
    """rc_allow_none: title -> stage-1 candidate pairs of the training documents (cross-fitted predictions)."""
    path = cfg.data.path("candidates")
    if not cfg.rc_allow_none:
        if path is not None and not cfg.hints:
            log.warning("data.candidates is ignored: it is used only with rc_allow_none: true or hints")
        return None
    if path is None:
        log.warning(
            "rc_allow_none without data.candidates: the prompt offers None, but no pair is answered None"
        )
        return None
    cands = load_candidates(path)
    by_title = {d.title: d for d in docs}
    out = {}
    for i, dc in enumerate(cands.documents):
        doc = by_title.get(dc.title)
        if doc is None:
            continue
        if dc.n_entities is not None and dc.n_entities != len(doc.entities):
            raise LmrcError(
                f'{path}: documents[{i}] ("{dc.title}"): n_entities={dc.n_entities}, but the training document '
                f"has {len(doc.entities)} entities (candidates from another version of the data?)"
            )
        out[dc.title] = [(p.h, p.t) for p in dc.pairs]
    if not out:
        raise LmrcError(f"{path}: no document title matches the training documents")
    return out


def load_training_hints(cfg: Stage2Config, relations: RelationSet, docs: Sequence[Document]) -> dict | None:
    """hints: title -> pair -> stage 1's best relation names, from the cross-fitted candidates (data.candidates)."""
    if not cfg.hints:
        return None
    path = cfg.data.path("candidates")
    if path is None:
        raise LmrcError(
            "hints: the training prompts take their hints from data.candidates (cross-fitted stage-1 candidates "
            "of the training file: lmrc stage1 crossfit ... --output FILE)"
        )
    matched = match_candidates(load_candidates(path), docs, path, cfg.data.path("train"), relations.ids)
    return {
        d.title: hint_names(dc, relations.names, cfg.hints) for d, dc in zip(docs, matched) if dc is not None
    }
