"""The DocRED scorer: relation P/R/F1, Ign F1, evidence F1, intra/inter, per-relation and frequent/long-tail F1.

The headline numbers follow the official DocRED `evaluation.py` (Yao et al., 2019; the copy in the ATLOP
repository is the one most papers run), quirks included, so that numbers are comparable with published tables:

- predictions are de-duplicated on (title, h_idx, t_idx, r); the first occurrence (and its evidence) is kept;
- a prediction whose title is not in the gold file still counts in the precision denominator, but its
  evidence is not counted (the official loop skips it before counting evidence);
- R = correct / number of unique gold facts (title, h, t, r);
- Ign: the train facts are every (head mention name, tail mention name, r) over all mention pairs of every fact
  of the train files; a correct prediction is "in train" when any mention-name pair of its two gold entities,
  with its relation, is a train fact. Ign P = (correct - in_train) / (#predictions - in_train); Ign F1 combines
  Ign P with the ordinary R;
- evidence P = overlap / all predicted evidence sentences (of predictions with a known title), where the overlap
  is counted on correct facts only; evidence R = overlap / all gold evidence sentences.

Where the official script would divide by zero (no predictions, no gold facts, no gold evidence) the value is 0.
ATLOP's copy adds 1e-5 to the Ign P denominator; the official script does not, and neither does this one.
Gold facts repeated within a document are counted once (the loader de-duplicates them, keeping the first);
the official script would count the repeat's evidence in the evidence total.

Additions that are not in the official script, with the conventions used:

- intra / inter: a pair is intra-sentence when some head mention and some tail mention share a sentence
  (minimum sentence distance 0), as in LSR/GAIN. Gold facts are split by their pair; predictions by the status of
  their pair in the gold document. Predictions that have no gold pair to look at (unknown title, index out of
  range, head == tail) belong to neither split, so intra and inter predictions need not add up to all predictions.
- per relation: P/R/F1 of every relation that occurs in the gold facts or the predictions (all predictions of
  that relation, unknown titles included, are in its precision denominator).
- frequent / long-tail: the `n_frequent` (10) relations with most facts in the train files (ties broken by
  relation id) vs all other relations (cf. the Head-10 band of AMTL, Table 6); absent (None) without train files.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from lmrc.data.docred import Document
from lmrc.errors import LmrcError
from lmrc.eval.packed import PackedPredictions
from lmrc.io import read_json

log = logging.getLogger(__name__)

N_FREQUENT = 10  # "frequent" = the 10 most frequent train relations (AMTL Table 6, Head-10)

# (title, h_idx, t_idx, r): the key on which the official scorer de-duplicates and matches predictions.
Key = tuple[str, int, int, str]


# --------------------------------------------------------------------------------------------------- scores


def _ratio(num: float, den: float) -> float:
    return num / den if den else 0.0


def _f1(p: float, r: float) -> float:
    return 2 * p * r / (p + r) if p + r else 0.0


@dataclass(frozen=True)
class Score:
    """P/R/F1 with the counts they come from (P = correct / predicted, R = correct / gold)."""

    precision: float
    recall: float
    f1: float
    correct: int
    predicted: int
    gold: int

    @classmethod
    def from_counts(cls, correct: int, predicted: int, gold: int) -> Score:
        p, r = _ratio(correct, predicted), _ratio(correct, gold)
        return cls(p, r, _f1(p, r), correct, predicted, gold)


@dataclass(frozen=True)
class IgnScore:
    """Ign P/F1 (official DocRED): correct facts seen in train are removed from numerator and denominator of P;
    the recall is the ordinary one."""

    precision: float
    recall: float
    f1: float
    correct_in_train: int


@dataclass(frozen=True)
class Counts:
    predictions: int  # as given
    duplicates: int  # removed by de-duplication on (title, h_idx, t_idx, r)
    unknown_title: int  # unique predictions whose title is not in the gold file (still in P's denominator)
    invalid_pair: int  # unique predictions of a known title with h/t out of range or h == t (always wrong)
    documents: int  # gold documents
    gold_facts: int


@dataclass(frozen=True)
class Metrics:
    relation: Score
    ign: IgnScore
    evidence: Score
    intra: Score
    inter: Score
    per_relation: dict[str, Score]  # relation id -> score; gold count descending, then id
    frequent: Score | None  # None without train files
    long_tail: Score | None
    frequent_relations: tuple[str, ...] | None  # the relations counted as frequent; None without train files
    counts: Counts
    train_used: bool  # False: Ign equals the ordinary score and frequent/long-tail are None

    def summary(self) -> dict[str, float | None]:
        """The headline numbers as a flat dict (for metrics.jsonl and checkpoint selection by name)."""
        return {
            "precision": self.relation.precision,
            "recall": self.relation.recall,
            "f1": self.relation.f1,
            "ign_precision": self.ign.precision,
            "ign_f1": self.ign.f1,
            "evidence_f1": self.evidence.f1,
            "intra_f1": self.intra.f1,
            "inter_f1": self.inter.f1,
            "frequent_f1": None if self.frequent is None else self.frequent.f1,
            "long_tail_f1": None if self.long_tail is None else self.long_tail.f1,
        }

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["frequent_relations"] = None if self.frequent_relations is None else list(self.frequent_relations)
        return {"summary": self.summary(), **out}


# ------------------------------------------------------------------------------------------ train reference


@dataclass(frozen=True)
class TrainReference:
    """What the scorer needs from the train files: the mention-name facts (for Ign) and relation counts
    (for frequent / long-tail). Build it once and pass it to `evaluate` when scoring repeatedly."""

    facts: frozenset[tuple[str, str, str]]  # (head mention name, tail mention name, r)
    relation_counts: dict[str, int]  # relation id -> number of unique facts

    @classmethod
    def from_documents(cls, docs: Iterable[Document]) -> TrainReference:
        facts: set[tuple[str, str, str]] = set()
        counts: Counter[str] = Counter()
        for doc in docs:
            for f in doc.facts or ():
                counts[f.r] += 1
                for m1 in doc.entities[f.h].mentions:
                    for m2 in doc.entities[f.t].mentions:
                        facts.add((m1.name, m2.name, f.r))
        return cls(frozenset(facts), dict(counts))

    def frequent_relations(self, k: int = N_FREQUENT) -> tuple[str, ...]:
        """The k relations with most train facts; ties broken by relation id so the split is deterministic."""
        ranked = sorted(self.relation_counts.items(), key=lambda kv: (-kv[1], kv[0]))
        return tuple(rid for rid, _ in ranked[:k])


# ------------------------------------------------------------------------------------- inputs and checks


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def check_predictions(data: Any, source: str | os.PathLike) -> None:
    """Refuse anything but a list of `{title: str, h_idx: int, t_idx: int, r: str[, evidence: [int]]}`,
    with one message naming the source and the first bad prediction. Extra fields (e.g. a score) are allowed."""
    if not isinstance(data, list):
        raise LmrcError(f"{source}: expected a JSON list of predictions, got {type(data).__name__}")
    for i, p in enumerate(data):
        where = f"{source}: predictions[{i}]"
        if not isinstance(p, Mapping):
            raise LmrcError(f"{where}: expected an object {{title, h_idx, t_idx, r}}, got {type(p).__name__}")
        for key, ok, want in (
            ("title", lambda v: isinstance(v, str), "a string"),
            ("h_idx", _is_int, "an integer"),
            ("t_idx", _is_int, "an integer"),
            ("r", lambda v: isinstance(v, str), "a relation id string"),
        ):
            if key not in p:
                raise LmrcError(f"{where}: missing field '{key}'")
            if not ok(p[key]):
                raise LmrcError(f"{where}.{key}: expected {want}, got {p[key]!r}")
        ev = p.get("evidence", [])
        if not isinstance(ev, list) or not all(_is_int(s) for s in ev):
            raise LmrcError(f"{where}.evidence: expected a list of sentence ids, got {ev!r}")


def load_predictions(path: str | os.PathLike) -> list[dict]:
    """A result file in the official format, validated (see `check_predictions`)."""
    data = read_json(path)
    check_predictions(data, path)
    return data


def _gold_index(gold: Sequence[Document]) -> dict[str, Document]:
    by_title: dict[str, Document] = {}
    for doc in gold:
        if doc.facts is None:
            raise LmrcError(f'gold document {doc.index} ("{doc.title}") has no labels')
        if doc.title in by_title:
            raise LmrcError(
                f'gold documents {by_title[doc.title].index} and {doc.index} share the title "{doc.title}"'
            )
        by_title[doc.title] = doc
    return by_title


def pair_locality(doc: Document, h: int, t: int) -> str | None:
    """'intra' when a head and a tail mention share a sentence, 'inter' otherwise; None for no valid pair."""
    n = len(doc.entities)
    if not (0 <= h < n and 0 <= t < n) or h == t:
        return None
    head_sents = {m.sent_id for m in doc.entities[h].mentions}
    return "intra" if any(m.sent_id in head_sents for m in doc.entities[t].mentions) else "inter"


# ----------------------------------------------------------------------------------------------- scoring


def _gold_counts(
    gold: Sequence[Document],
) -> tuple[dict[Key, frozenset[int]], int, Counter[str], Counter[str | None]]:
    """The gold facts with their evidence, the number of evidence ids, and facts by relation and by locality."""
    evidence: dict[Key, frozenset[int]] = {}
    n_evidence = 0
    by_rel: Counter[str] = Counter()
    by_loc: Counter[str | None] = Counter()
    for doc in gold:
        for f in doc.facts or ():
            evidence[(doc.title, f.h, f.t, f.r)] = frozenset(f.evidence)
            n_evidence += len(f.evidence)  # the official total counts the listed ids, repeats included
            by_rel[f.r] += 1
            by_loc[pair_locality(doc, f.h, f.t)] += 1
    return evidence, n_evidence, by_rel, by_loc


def _frequent_and_long_tail(
    per_relation: dict[str, Score], ref: TrainReference | None, n_frequent: int
) -> tuple[Score | None, Score | None, tuple[str, ...] | None]:
    """Pooled scores of the `n_frequent` relations most frequent in training and of the others (None without
    training counts), and the frequent relations."""
    if ref is None or not ref.relation_counts:
        return None, None, None
    frequent_ids = ref.frequent_relations(n_frequent)
    frequent = _pooled(per_relation, lambda rid: rid in frequent_ids)
    long_tail = _pooled(per_relation, lambda rid: rid not in frequent_ids)
    return frequent, long_tail, frequent_ids


@dataclass
class _Matches:
    """What the unique predictions add up to, before the scores are computed."""

    unique: int = 0
    correct: int = 0
    in_train: int = 0
    pred_evidence: int = 0
    correct_evidence: int = 0
    unknown_title: int = 0
    invalid_pair: int = 0
    pred_by_rel: Counter[str] = field(default_factory=Counter)
    correct_by_rel: Counter[str] = field(default_factory=Counter)
    pred_by_loc: Counter[str | None] = field(default_factory=Counter)
    correct_by_loc: Counter[str | None] = field(default_factory=Counter)

    def add_correct(self, doc: Document, h: int, t: int, r: str, loc: str | None, ref: TrainReference | None):
        self.correct += 1
        self.correct_by_rel[r] += 1
        self.correct_by_loc[loc] += 1
        if ref is not None and _seen_in_train(doc, h, t, r, ref.facts):
            self.in_train += 1


def evaluate(
    predictions: Sequence[Mapping[str, Any]],
    gold: Sequence[Document],
    train: Iterable[Document] | TrainReference | None = None,
    n_frequent: int = N_FREQUENT,
    packed: Sequence[PackedPredictions] = (),
) -> Metrics:
    """Score official-format predictions against labelled gold documents (see the module docstring).

    `packed` adds predictions held as arrays (stage 1's, without evidence), scored as the same dicts would be."""
    check_predictions(list(predictions), "predictions")
    docs = _gold_index(gold)
    ref = (
        train if train is None or isinstance(train, TrainReference) else TrainReference.from_documents(train)
    )
    predictions, packed = _unpack_listed_titles(predictions, packed)
    n_given = len(predictions) + sum(len(pp) for pp in packed)

    gold_evidence, n_gold_evidence, gold_by_rel, gold_by_loc = _gold_counts(gold)
    unique: dict[Key, Mapping[str, Any]] = {}
    for p in predictions:
        unique.setdefault((p["title"], p["h_idx"], p["t_idx"], p["r"]), p)

    m = _Matches(unique=len(unique))
    _match_records(unique, docs, gold_evidence, ref, m)
    for pp in packed:
        _match_packed(pp, docs.get(pp.title), gold_evidence, ref, m)

    n_pred, n_gold = m.unique, len(gold_evidence)
    relation = Score.from_counts(m.correct, n_pred, n_gold)
    ign_p = _ratio(m.correct - m.in_train, n_pred - m.in_train)
    ign = IgnScore(ign_p, relation.recall, _f1(ign_p, relation.recall), m.in_train)

    rels = sorted(set(gold_by_rel) | set(m.pred_by_rel), key=lambda rid: (-gold_by_rel[rid], rid))
    per_relation = {
        rid: Score.from_counts(m.correct_by_rel[rid], m.pred_by_rel[rid], gold_by_rel[rid]) for rid in rels
    }
    frequent, long_tail, frequent_ids = _frequent_and_long_tail(per_relation, ref, n_frequent)

    return Metrics(
        relation=relation,
        ign=ign,
        evidence=Score.from_counts(m.correct_evidence, m.pred_evidence, n_gold_evidence),
        intra=Score.from_counts(m.correct_by_loc["intra"], m.pred_by_loc["intra"], gold_by_loc["intra"]),
        inter=Score.from_counts(m.correct_by_loc["inter"], m.pred_by_loc["inter"], gold_by_loc["inter"]),
        per_relation=per_relation,
        frequent=frequent,
        long_tail=long_tail,
        frequent_relations=frequent_ids,
        counts=Counts(
            predictions=n_given,
            duplicates=n_given - n_pred,
            unknown_title=m.unknown_title,
            invalid_pair=m.invalid_pair,
            documents=len(gold),
            gold_facts=n_gold,
        ),
        train_used=ref is not None,
    )


def _unpack_listed_titles(
    predictions: Sequence[Mapping[str, Any]], packed: Sequence[PackedPredictions]
) -> tuple[Sequence[Mapping[str, Any]], Sequence[PackedPredictions]]:
    """Packed predictions of a document that also has dict predictions, turned into dicts: duplicates across both
    forms are then removed as among dicts."""
    listed_titles = {p["title"] for p in predictions}
    if not any(pp.title in listed_titles for pp in packed):
        return predictions, packed
    predictions = [*predictions, *(x for pp in packed if pp.title in listed_titles for x in pp.records())]
    return predictions, [pp for pp in packed if pp.title not in listed_titles]


def _match_records(
    unique: Mapping[Key, Mapping[str, Any]],
    docs: Mapping[str, Document],
    gold_evidence: Mapping[Key, frozenset[int]],
    ref: TrainReference | None,
    m: _Matches,
) -> None:
    """The unique dict predictions into `m`: counted by relation and locality, matched against the gold facts."""
    for key, p in unique.items():
        title, h, t, r = key
        m.pred_by_rel[r] += 1
        doc = docs.get(title)
        if doc is None:
            m.unknown_title += 1
            continue
        evidence = set(p.get("evidence", ()))
        m.pred_evidence += len(evidence)
        loc = pair_locality(doc, h, t)
        m.invalid_pair += loc is None
        m.pred_by_loc[loc] += 1
        if key not in gold_evidence:
            continue
        m.add_correct(doc, h, t, r, loc, ref)
        m.correct_evidence += len(gold_evidence[key] & evidence)


def _match_packed(
    pp: PackedPredictions,
    doc: Document | None,
    gold_evidence: Mapping[Key, frozenset[int]],
    ref: TrainReference | None,
    m: _Matches,
) -> None:
    """One document's packed predictions into `m`, array-wise: what the loop over dicts does for them (they
    carry no evidence), with a Python step only for the correct ones (at most the gold facts)."""
    rows = np.unique(pp.triples, axis=0) if len(pp) else pp.triples.reshape(0, 3)
    m.unique += len(rows)
    for k, n in enumerate(np.bincount(rows[:, 2], minlength=len(pp.relations)).tolist()):
        if n:
            m.pred_by_rel[pp.relations[k]] += n
    if doc is None:
        m.unknown_title += len(rows)
        return
    n_ent = len(doc.entities)
    h, t = rows[:, 0].astype(np.int64), rows[:, 1].astype(np.int64)
    valid = (h >= 0) & (h < n_ent) & (t >= 0) & (t < n_ent) & (h != t)
    intra = valid & _intra_matrix(doc)[h.clip(0, max(n_ent - 1, 0)), t.clip(0, max(n_ent - 1, 0))]
    n_intra, n_valid = int(intra.sum()), int(valid.sum())
    m.invalid_pair += len(rows) - n_valid
    m.pred_by_loc["intra"] += n_intra
    m.pred_by_loc["inter"] += n_valid - n_intra
    m.pred_by_loc[None] += len(rows) - n_valid
    index = {r: k for k, r in enumerate(pp.relations)}
    n_rel = max(len(pp.relations), 1)
    gold = [
        (gh * n_ent + gt) * n_rel + index[r]
        for title, gh, gt, r in gold_evidence
        if title == doc.title and r in index
    ]
    codes = (h * n_ent + t) * n_rel + rows[:, 2]
    hits = np.flatnonzero(valid & np.isin(codes, np.asarray(gold, dtype=np.int64)))
    for i in hits.tolist():
        hh, tt, r = int(h[i]), int(t[i]), pp.relations[int(rows[i, 2])]
        m.add_correct(doc, hh, tt, r, "intra" if intra[i] else "inter", ref)


def _intra_matrix(doc: Document) -> np.ndarray:
    """[entities, entities] bool: some mention of one shares a sentence with some mention of the other
    (pair_locality's 'intra')."""
    n_sent = max((m.sent_id for e in doc.entities for m in e.mentions), default=-1) + 1
    in_sent = np.zeros((len(doc.entities), n_sent), dtype=np.float32)
    for i, e in enumerate(doc.entities):
        for mention in e.mentions:
            in_sent[i, mention.sent_id] = 1.0
    return (in_sent @ in_sent.T) > 0


def _seen_in_train(doc: Document, h: int, t: int, r: str, facts: frozenset[tuple[str, str, str]]) -> bool:
    """Official Ign rule: any (head mention name, tail mention name, r) of the pair is a train fact."""
    return any(
        (m1.name, m2.name, r) in facts for m1 in doc.entities[h].mentions for m2 in doc.entities[t].mentions
    )


def _pooled(per_relation: Mapping[str, Score], keep) -> Score:
    """Micro-averaged score over the relations `keep` selects."""
    chosen = [s for rid, s in per_relation.items() if keep(rid)]
    return Score.from_counts(
        sum(s.correct for s in chosen), sum(s.predicted for s in chosen), sum(s.gold for s in chosen)
    )
