"""Scores of the entity step recomputed by hand on the examples of the literature, and the end-to-end relation
matching (strict / lenient) on small constructed documents."""

from __future__ import annotations

from fractions import Fraction

import pytest

from lmrc.entities.e2e import entity_matches, score_triples
from lmrc.entities.metrics import (
    EntityScores,
    b_cubed,
    b_cubed_counts,
    ceaf_e,
    conll_f1,
    entity_exact,
    majority_type,
    mention_prf,
    muc,
)

# Pradhan et al. (2014), "Scoring Coreference Partitions of Predicted Mentions", Figure 1 / Section 3:
# key {a b c} {d e f g}, response {a b} {c d} {f g h i} (e is missed, h and i are spurious).
KEY = [["a", "b", "c"], ["d", "e", "f", "g"]]
RESPONSE = [["a", "b"], ["c", "d"], ["f", "g", "h", "i"]]


def close(x: float, num: int, den: int) -> None:
    assert x == pytest.approx(num / den, abs=1e-12)


def test_muc_pradhan_example():
    # recall: (3 - 2) + (4 - 3) links of (3 - 1) + (4 - 1); precision: (2-1) + (2-2) + (4-3) of 1 + 1 + 3.
    s = muc(KEY, RESPONSE)
    close(s.recall, 2, 5)
    close(s.precision, 2, 5)
    close(s.f1, 2, 5)


def test_muc_vilain_example():
    # Vilain et al. (1995): key {A B C D}, response {A B} {C D}: one link missing of three, none wrong.
    s = muc([["A", "B", "C", "D"]], [["A", "B"], ["C", "D"]])
    close(s.recall, 2, 3)
    assert s.precision == 1.0


def test_b_cubed_pradhan_example():
    # recall per key mention: a, b 2/3; c 1/3; d 1/4; e 0; f, g 2/4 -> 35/12 over 7 mentions = 5/12.
    # precision per response mention: a, b 1; c, d 1/2; f, g 2/4; h, i 0 -> 4 over 8 = 1/2.
    s = b_cubed(KEY, RESPONSE)
    close(s.recall, 5, 12)
    close(s.precision, 1, 2)
    p_num, p_den, r_num, r_den = b_cubed_counts(KEY, RESPONSE)
    assert Fraction(r_num).limit_denominator(100) == Fraction(35, 12) and r_den == 7
    assert p_num == pytest.approx(4) and p_den == 8


def test_ceaf_e_pradhan_example():
    # phi4: (K1, R1) 4/5, (K1, R2) 2/5, (K2, R2) 2/6, (K2, R3) 4/8; the best alignment K1-R1, K2-R3 sums to 13/10.
    s = ceaf_e(KEY, RESPONSE)
    close(s.recall, 13, 20)  # 1.3 / 2 key entities
    close(s.precision, 13, 30)  # 1.3 / 3 response entities
    cf = conll_f1(muc(KEY, RESPONSE), b_cubed(KEY, RESPONSE), s)
    expected = (
        Fraction(2, 5)
        + Fraction(2 * 5 * 6, 12 * 11)
        + 2 * Fraction(13, 20) * Fraction(13, 30) / Fraction(13 * 5, 60)
    ) / 3
    assert cf == pytest.approx(float(expected))


def test_identical_partitions_score_one_and_exact_match():
    for fn in (muc, b_cubed, ceaf_e, entity_exact):
        assert fn(KEY, KEY).f1 == pytest.approx(1.0)
    e = entity_exact(KEY, RESPONSE)
    assert e.precision == 0 and e.recall == 0
    e = entity_exact([["a"], ["b", "c"]], [["a"], ["b"], ["c"]])
    close(e.precision, 1, 3)
    close(e.recall, 1, 2)


def test_mention_scores_need_span_and_type():
    gold = [((0, 5), "PER"), ((10, 15), "ORG"), ((20, 22), "NUM")]
    pred = [((0, 5), "PER"), ((10, 15), "LOC"), ((30, 31), "NUM")]
    typed = mention_prf(gold, pred)
    close(typed.precision, 1, 3)
    close(typed.recall, 1, 3)
    span = mention_prf(gold, pred, typed=False)
    close(span.precision, 2, 3)


def test_entity_scores_sum_documents_and_type_accuracy():
    s = EntityScores.empty()
    gold = [[((0, 4), "PER"), ((20, 24), "PER")], [((10, 13), "ORG")]]
    pred = [[((0, 4), "PER"), ((20, 24), "PER")], [((10, 13), "LOC")]]
    s.add(gold, pred)
    s.add([[((0, 2), "NUM")]], [])
    r = s.report()
    close(r["mention"]["precision"], 2, 3)
    close(r["mention"]["recall"], 2, 4)
    close(r["mention_span_only"]["precision"], 3, 3)
    # both predicted entities equal gold mention sets; one has the wrong type
    assert r["type_accuracy"] == 0.5 and r["type_accuracy_entities"] == 2
    close(r["exact"]["recall"], 2, 3)
    assert majority_type(["ORG", "LOC", "LOC"]) == "LOC"
    assert majority_type(["ORG", "LOC"]) == "ORG"


def test_entity_matching_strict_and_lenient():
    gold = [frozenset({(0, 4), (20, 24)}), frozenset({(10, 13)})]
    pred = [frozenset({(0, 4)}), frozenset({(10, 13)}), frozenset({(20, 24), (30, 33)})]
    assert entity_matches(pred, gold, strict=True) == [set(), {1}, set()]
    assert entity_matches(pred, gold, strict=False) == [{0}, {1}, {0}]


def test_relation_scores_strict_and_lenient():
    gold = {
        "D": (
            [frozenset({(0, 4), (20, 24)}), frozenset({(10, 13)}), frozenset({(40, 45)})],
            {(0, 1, "P1"), (2, 1, "P2")},
        )
    }
    built = {"D": [frozenset({(0, 4)}), frozenset({(10, 13)}), frozenset({(20, 24)}), frozenset({(40, 45)})]}
    preds = [
        {
            "title": "D",
            "h_idx": 0,
            "t_idx": 1,
            "r": "P1",
        },  # head only shares a span with gold 0: lenient right
        {"title": "D", "h_idx": 2, "t_idx": 1, "r": "P1"},  # also lenient right, the same gold fact
        {"title": "D", "h_idx": 3, "t_idx": 1, "r": "P2"},  # exact entities: right in both
        {"title": "D", "h_idx": 3, "t_idx": 1, "r": "P1"},  # wrong relation
    ]
    s = score_triples(preds, built, gold)
    close(s["strict"]["precision"], 1, 4)
    close(s["strict"]["recall"], 1, 2)
    close(s["lenient"]["precision"], 3, 4)
    assert s["lenient"]["recall"] == 1.0 and s["lenient"]["found"] == 2
    # a gold document that was not built counts as all missed
    gold["E"] = ([frozenset({(0, 1)}), frozenset({(2, 3)})], {(0, 1, "P1")})
    s = score_triples(preds, built, gold)
    close(s["lenient"]["recall"], 2, 3)
