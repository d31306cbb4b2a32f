"""Scores of the entity step: mentions, clustering (coreference) and types, and relations end to end.

Mentions are compared as character spans of one text, so a system that tokenises differently from the gold
annotation is still scored fairly. Clustering scores follow the CoNLL-2012 scorer's definitions (Pradhan et al.,
2014, "Scoring Coreference Partitions of Predicted Mentions"): MUC (Vilain et al., 1995), B-cubed (Bagga and
Baldwin, 1998) and entity-based CEAF (CEAF-e, Luo, 2005), and their average (the CoNLL F1). Singletons count, as
in DocRED every entity (also a single mention) is a node of the relation graph.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import numpy as np

Span = tuple[int, int]


@dataclass(frozen=True)
class PRF:
    precision: float
    recall: float
    f1: float

    @classmethod
    def of(cls, p_num: float, p_den: float, r_num: float, r_den: float) -> PRF:
        p = p_num / p_den if p_den else 0.0
        r = r_num / r_den if r_den else 0.0
        return cls(p, r, 2 * p * r / (p + r) if p + r else 0.0)

    def as_dict(self) -> dict[str, float]:
        return {"precision": self.precision, "recall": self.recall, "f1": self.f1}


def mention_prf(
    gold: Sequence[tuple[Span, str]], pred: Sequence[tuple[Span, str]], typed: bool = True
) -> PRF:
    """Exact-match mention scores: a predicted mention is right when its span (and type, if `typed`) is a gold one."""
    key = (lambda m: (m[0], m[1])) if typed else (lambda m: m[0])
    g, p = {key(m) for m in gold}, {key(m) for m in pred}
    tp = len(g & p)
    return PRF.of(tp, len(p), tp, len(g))


def _clusters(xs: Sequence[Sequence[Hashable]]) -> list[frozenset]:
    return [frozenset(c) for c in xs if c]


Counts = tuple[float, float, float, float]  # precision numerator, denominator, recall numerator, denominator


def muc_counts(key: Sequence[Sequence[Hashable]], response: Sequence[Sequence[Hashable]]) -> Counts:
    """MUC: links. Recall = sum(|K| - |partitions of K by the response|) / sum(|K| - 1); precision swaps roles.
    A mention missing from the other side is a partition of its own."""

    def side(a: list[frozenset], b: list[frozenset]) -> tuple[int, int]:
        where = {m: i for i, c in enumerate(b) for m in c}
        num = den = 0
        for c in a:
            num += len(c) - len({where.get(m, ("alone", m)) for m in c})
            den += len(c) - 1
        return num, den

    return _both_sides(side, key, response)


def _both_sides(side, key: Sequence[Sequence[Hashable]], response: Sequence[Sequence[Hashable]]) -> Counts:
    """(precision num, den, recall num, den): recall is `side` from the key's clusters against the response's,
    precision the other way round."""
    k, r = _clusters(key), _clusters(response)
    rn, rd = side(k, r)
    pn, pd = side(r, k)
    return pn, pd, rn, rd


def b_cubed_counts(key: Sequence[Sequence[Hashable]], response: Sequence[Sequence[Hashable]]) -> Counts:
    """B-cubed: per mention, the overlap of its key and response clusters over the size of its key (recall) or
    response (precision) cluster, summed over the mentions of that side (the mean is num / den)."""

    def side(a: list[frozenset], b: list[frozenset]) -> tuple[float, int]:
        where = {m: c for c in b for m in c}
        total, n = 0.0, 0
        for c in a:
            for m in c:
                n += 1
                other = where.get(m)
                if other is not None:
                    total += len(c & other) / len(c)
        return total, n

    return _both_sides(side, key, response)


def ceaf_e_counts(key: Sequence[Sequence[Hashable]], response: Sequence[Sequence[Hashable]]) -> Counts:
    """CEAF-e: the best one-to-one alignment of key and response entities under phi4 = 2|K & R| / (|K| + |R|);
    recall divides its total by the number of key entities, precision by the number of response entities."""
    # scipy.optimize takes ~0.4 s to import; this module is on the CLI's light path (lmrc entities).
    from scipy.optimize import linear_sum_assignment

    k, r = _clusters(key), _clusters(response)
    total = 0.0
    if k and r:
        sim = np.array([[2 * len(a & b) / (len(a) + len(b)) for b in r] for a in k])
        rows, cols = linear_sum_assignment(-sim)
        total = float(sim[rows, cols].sum())
    return total, len(r), total, len(k)


def exact_counts(key: Sequence[Sequence[Hashable]], response: Sequence[Sequence[Hashable]]) -> Counts:
    """Entities whose mention sets equal a gold entity's (the strict matching of JEREX, Eberts and Ulges, 2021)."""
    k, r = set(_clusters(key)), set(_clusters(response))
    tp = len(k & r)
    return tp, len(r), tp, len(k)


def muc(key, response) -> PRF:
    return PRF.of(*muc_counts(key, response))


def b_cubed(key, response) -> PRF:
    return PRF.of(*b_cubed_counts(key, response))


def ceaf_e(key, response) -> PRF:
    return PRF.of(*ceaf_e_counts(key, response))


def entity_exact(key, response) -> PRF:
    return PRF.of(*exact_counts(key, response))


def conll_f1(m: PRF, b: PRF, c: PRF) -> float:
    """The CoNLL-2012 average: the mean of the MUC, B-cubed and CEAF-e F1."""
    return (m.f1 + b.f1 + c.f1) / 3


def majority_type(types: Sequence[str]) -> str:
    """The most frequent type of an entity's mentions (ties: the earliest mention's)."""
    counts: dict[str, int] = {}
    for t in types:
        counts[t] = counts.get(t, 0) + 1
    best = max(counts.values())
    return next(t for t in types if counts[t] == best)


@dataclass
class EntityScores:
    """Sums over documents; `report()` turns them into the numbers of docs/RESULTS.md."""

    mention_counts: list[int]  # tp typed, tp untyped, gold, predicted
    link: dict[str, list[float]]  # metric -> [p_num, p_den, r_num, r_den]
    type_right: int = 0
    type_total: int = 0

    @classmethod
    def empty(cls) -> EntityScores:
        return cls([0, 0, 0, 0], {k: [0.0, 0.0, 0.0, 0.0] for k in ("muc", "b_cubed", "ceaf_e", "exact")})

    def add(
        self,
        gold: Sequence[Sequence[tuple[Span, str]]],
        pred: Sequence[Sequence[tuple[Span, str]]],
    ) -> None:
        """One document: entities as lists of (span, type) mentions. Clustering is scored over spans (the
        mentions each side found), as the CoNLL scorer does with predicted mentions."""
        g_m = [m for e in gold for m in e]
        p_m = [m for e in pred for m in e]
        gs, ps = {m for m in g_m}, {m for m in p_m}
        self.mention_counts[0] += len(gs & ps)
        self.mention_counts[1] += len({s for s, _ in gs} & {s for s, _ in ps})
        self.mention_counts[2] += len(gs)
        self.mention_counts[3] += len(ps)
        gk = [[s for s, _ in e] for e in gold]
        pk = [[s for s, _ in e] for e in pred]
        for name, fn in (("muc", muc_counts), ("b_cubed", b_cubed_counts), ("ceaf_e", ceaf_e_counts),
                         ("exact", exact_counts)):  # fmt: skip
            for i, v in enumerate(fn(gk, pk)):
                self.link[name][i] += v
        gold_sets = {frozenset(s for s, _ in e): majority_type([t for _, t in e]) for e in gold}
        for e in pred:
            t = gold_sets.get(frozenset(s for s, _ in e))
            if t is not None:
                self.type_total += 1
                self.type_right += int(majority_type([x for _, x in e]) == t)

    def report(self) -> dict:
        tp, tp_span, n_gold, n_pred = self.mention_counts
        out = {
            "mention": PRF.of(tp, n_pred, tp, n_gold).as_dict(),
            "mention_span_only": PRF.of(tp_span, n_pred, tp_span, n_gold).as_dict(),
            "gold_mentions": n_gold,
            "predicted_mentions": n_pred,
        }
        prfs = {k: PRF.of(*v) for k, v in self.link.items()}
        for k, v in prfs.items():
            out[k] = v.as_dict()
        out["conll_f1"] = conll_f1(prfs["muc"], prfs["b_cubed"], prfs["ceaf_e"])
        out["type_accuracy"] = self.type_right / self.type_total if self.type_total else 0.0
        out["type_accuracy_entities"] = self.type_total
        return out
