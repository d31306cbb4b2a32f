"""The paired bootstrap over documents (lmrc.eval.bootstrap): per-document counts that add up to the official
scorer's, intervals recomputed by a plain loop over the same draws, and the properties a reader relies on."""

from __future__ import annotations

import random

import numpy as np
import pytest

from lmrc.data.docred import load_labelled
from lmrc.data.relations import load_relations
from lmrc.eval.bootstrap import document_counts, paired_bootstrap
from lmrc.eval.metrics import evaluate


@pytest.fixture(scope="module")
def docs(redocred_dir):
    rel = load_relations(redocred_dir / "rel_info.json")
    return load_labelled(redocred_dir / "dev_50.json", rel)[:12]


def _noisy_predictions(docs, keep: float, wrong: int, seed: int) -> list[dict]:
    """Part of the gold facts, some wrong triples, a few duplicates and one unknown title."""
    rng = random.Random(seed)
    preds = []
    for d in docs:
        for f in d.facts:
            if rng.random() < keep:
                preds.append({"title": d.title, "h_idx": f.h, "t_idx": f.t, "r": f.r})
        for _ in range(wrong):
            h, t = rng.sample(range(len(d.entities)), 2)
            preds.append({"title": d.title, "h_idx": h, "t_idx": t, "r": "P17"})
    preds += preds[:3]  # duplicates count once
    preds.append({"title": "not a document", "h_idx": 0, "t_idx": 1, "r": "P17"})
    return preds


def test_document_counts_add_up_to_the_official_scorer(docs):
    preds = _noisy_predictions(docs, keep=0.6, wrong=3, seed=1)
    c = document_counts(preds, docs)
    m = evaluate(preds, docs).relation
    assert (int(c.correct.sum()), int(c.predicted.sum()) + c.extra_predicted, int(c.gold.sum())) == (
        m.correct,
        m.predicted,
        m.gold,
    )
    assert c.extra_predicted == 1 and len(c.gold) == len(docs)
    assert all(c.correct <= c.predicted) and all(c.correct <= c.gold)


def _loop_f1(counts, drawn: list[int]) -> float:
    correct = sum(int(counts.correct[i]) for i in drawn)
    predicted = sum(int(counts.predicted[i]) for i in drawn) + counts.extra_predicted
    gold = sum(int(counts.gold[i]) for i in drawn)
    return 2 * correct / (predicted + gold) if predicted + gold else 0.0


def test_intervals_equal_a_plain_loop_over_the_same_draws(docs):
    a = document_counts(_noisy_predictions(docs, 0.5, 2, seed=2), docs)
    b = document_counts(_noisy_predictions(docs, 0.7, 4, seed=3), docs)
    resamples, seed = 300, 11
    noise = paired_bootstrap({"a": a, "b": b}, reference="a", resamples=resamples, seed=seed, level=0.9)
    # the documented draws: numpy's default_rng(seed), one row of n document indices per resample
    draws = np.random.default_rng(seed).integers(0, len(docs), size=(resamples, len(docs)))
    fa = [_loop_f1(a, list(row)) for row in draws]
    fb = [_loop_f1(b, list(row)) for row in draws]
    diffs = [y - x for x, y in zip(fa, fb)]
    assert noise["a"].f1.low == pytest.approx(np.quantile(fa, 0.05))
    assert noise["a"].f1.high == pytest.approx(np.quantile(fa, 0.95))
    assert noise["b"].delta_interval.low == pytest.approx(np.quantile(diffs, 0.05))
    assert noise["b"].delta_interval.high == pytest.approx(np.quantile(diffs, 0.95))
    full = [_loop_f1(c, list(range(len(docs)))) for c in (a, b)]
    assert noise["b"].delta == pytest.approx(full[1] - full[0])
    assert noise["a"].delta is None and noise["a"].delta_interval is None


def test_a_row_better_on_every_document_is_clear_of_noise_and_equal_rows_are_not(docs):
    base = document_counts(_noisy_predictions(docs, 0.4, 3, seed=4), docs)
    better = document_counts(  # the same predictions plus one more right fact in every document
        _noisy_predictions(docs, 0.4, 3, seed=4)
        + [{"title": d.title, "h_idx": f.h, "t_idx": f.t, "r": f.r} for d in docs for f in d.facts[:1]],
        docs,
    )
    assert all(better.correct >= base.correct) and (better.correct > base.correct).any()
    noise = paired_bootstrap({"base": base, "better": better, "same": base}, reference="base", seed=0)
    assert noise["better"].delta_interval.low > 0 and noise["better"].delta > 0
    assert noise["same"].delta_interval.low == noise["same"].delta_interval.high == 0.0
    f1 = _loop_f1(base, list(range(len(docs))))
    assert noise["base"].f1.low < f1 < noise["base"].f1.high  # 12 documents that differ: a real spread


def test_one_document_has_no_spread_and_bad_calls_are_refused(docs):
    c = document_counts(_noisy_predictions(docs[:1], 0.5, 1, seed=5), docs[:1])
    noise = paired_bootstrap({"x": c}, resamples=50)
    assert noise["x"].f1.low == noise["x"].f1.high == pytest.approx(_loop_f1(c, [0]))
    other = document_counts([], docs[:2])
    with pytest.raises(ValueError, match="same documents"):
        paired_bootstrap({"x": c, "y": other})
    with pytest.raises(ValueError, match="reference"):
        paired_bootstrap({"x": c}, reference="stage1-only")
    assert paired_bootstrap({}) == {}
