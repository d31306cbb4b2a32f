"""What the entity model's training measures on the tuning file: the tagger's mention F1 (which epoch is kept)
and the coreference threshold with the best CoNLL F1 on gold mentions."""

from __future__ import annotations

import logging

import torch

from lmrc.entities.coref import PairScorer, link, pair_matrix
from lmrc.entities.examples import Example, span_of
from lmrc.entities.mentions import decode_bio, tag_document
from lmrc.entities.metrics import EntityScores
from lmrc.entities.model import EntityModel, mention_infos, typed_clusters
from lmrc.entities.segment import Segmented

log = logging.getLogger(__name__)


def predict_entities(model: EntityModel, seg: Segmented) -> list[list[tuple[tuple[int, int], str]]]:
    """The model's entities as (char span, type) mentions."""
    return [[(span_of(seg, m), m.type) for m in ent] for ent in model.find(seg)]


def mention_f1(tagger, tokenizer, labels: list[str], max_tokens: int, examples: list[Example]) -> float:
    tp = n_pred = n_gold = 0
    for ex in examples:
        logp, _ = tag_document(tagger, tokenizer, ex.seg.words(), max_tokens)
        pred = set()
        for si, row in enumerate(logp):
            pred.update(decode_bio([labels[int(x.argmax())] for x in row], si))
        gold = set(ex.mentions)
        tp += len(pred & gold)
        n_pred += len(pred)
        n_gold += len(gold)
    p, r = tp / max(n_pred, 1), tp / max(n_gold, 1)
    return 2 * p * r / (p + r) if p + r else 0.0


def coref_data(tagger, tokenizer, max_tokens: int, examples: list[Example]) -> list:
    """(mention features with the tagger's word vectors, gold cluster ids) of every example."""
    data = []
    for ex in examples:
        _, vecs = tag_document(tagger, tokenizer, ex.seg.words(), max_tokens)
        data.append((mention_infos(ex.seg, ex.mentions, vecs), ex.cluster_ids))
    return data


def tune_threshold(scorer: PairScorer, tagger, tokenizer, max_tokens, examples: list[Example], grid):
    """The linking threshold with the best CoNLL F1 on the tuning documents' gold mentions."""
    data = coref_data(tagger, tokenizer, max_tokens, examples)
    feats = []
    for infos, _ in data:
        x, pairs = pair_matrix(infos)
        with torch.no_grad():
            feats.append((pairs, torch.sigmoid(scorer(x)).tolist() if pairs else []))
    best = (-1.0, 0.5, {})
    for thr in grid:
        s = EntityScores.empty()
        for ex, (infos, _), (pairs, probs) in zip(examples, data, feats):
            groups = link(len(infos), pairs, probs, thr)
            ents = typed_clusters(ex.mentions, groups)
            pred = [[(span_of(ex.seg, m), m.type) for m in e] for e in ents]
            gold = [[(span_of(ex.seg, m), m.type) for m, c in zip(ex.mentions, ex.cluster_ids) if c == k]
                    for k in sorted(set(ex.cluster_ids))]  # fmt: skip
            s.add(gold, pred)
        rep = s.report()
        if rep["conll_f1"] > best[0]:
            best = (rep["conll_f1"], float(thr), rep)
    log.info("coreference threshold %.2f: tune CoNLL F1 %.4f on gold mentions", best[1], best[0])
    return best[1], best[2]
