"""The scorer: hand-computed cases for each official quirk, and agreement with an independent reference
implementation (written in the style of the official DocRED `evaluation.py`) on perturbed real predictions."""

from __future__ import annotations

import copy
import json
import random

import pytest

from lmrc.data.docred import load_labelled, parse_documents
from lmrc.errors import LmrcError
from lmrc.eval import (
    TrainReference,
    check_predictions,
    evaluate,
    format_table,
    load_predictions,
    pair_locality,
)


def _m(name: str, sent_id: int, start: int = 0) -> dict:
    return {"name": name, "sent_id": sent_id, "pos": [start, start + 1], "type": "X"}


# Gold: document A (3 sentences) and B (2 sentences).
#   A: 0 = Paris (s0) / Paris city (s2), 1 = France (s0), 2 = Seine (s1), 3 = Europe (s2)
#      facts: (0,1,P17, ev [0]) intra; (2,1,P17, ev [1,0]) inter; (0,3,P30, ev [2]) intra (via "Paris city")
#   B: 0 = Alice (s0), 1 = Bob (s1); fact (0,1,P26, ev [0,1]) inter
# 4 gold facts, 6 gold evidence sentences; 2 intra, 2 inter.
GOLD_RAW = [
    {
        "title": "A",
        "sents": [["w"] * 4, ["w"] * 4, ["w"] * 4],
        "vertexSet": [
            [_m("Paris", 0), _m("Paris city", 2)],
            [_m("France", 0, 2)],
            [_m("Seine", 1)],
            [_m("Europe", 2, 2)],
        ],
        "labels": [
            {"h": 0, "t": 1, "r": "P17", "evidence": [0]},
            {"h": 2, "t": 1, "r": "P17", "evidence": [1, 0]},
            {"h": 0, "t": 3, "r": "P30", "evidence": [2]},
        ],
    },
    {
        "title": "B",
        "sents": [["w"] * 3, ["w"] * 3],
        "vertexSet": [[_m("Alice", 0)], [_m("Bob", 1)]],
        "labels": [{"h": 0, "t": 1, "r": "P26", "evidence": [0, 1]}],
    },
]

# Train facts as mention-name triples: (Paris city, France, P17) -- reachable only through A's entity 0's
# *second* mention --, (Seine, France, P131) -- same names, other relation --, (Bob, Alice, P26) -- reversed.
TRAIN_RAW = [
    {
        "title": "T1",
        "sents": [["w"] * 4],
        "vertexSet": [[_m("Paris city", 0)], [_m("France", 0, 2)], [_m("Seine", 0, 3)]],
        "labels": [
            {"h": 0, "t": 1, "r": "P17", "evidence": []},
            {"h": 2, "t": 1, "r": "P131", "evidence": []},
        ],
    },
    {
        "title": "T2",
        "sents": [["w"] * 3],
        "vertexSet": [[_m("Bob", 0)], [_m("Alice", 0, 2)]],
        "labels": [{"h": 0, "t": 1, "r": "P26", "evidence": []}],
    },
]

PREDS = [
    {"title": "A", "h_idx": 0, "t_idx": 1, "r": "P17", "evidence": [0, 1]},  # correct, in train; evi 1 of 2
    {
        "title": "A",
        "h_idx": 0,
        "t_idx": 1,
        "r": "P17",
        "evidence": [2],
    },  # duplicate: dropped with its evidence
    {"title": "A", "h_idx": 2, "t_idx": 1, "r": "P17", "evidence": [1]},  # correct, not in train; evi 1 of 1
    {"title": "A", "h_idx": 0, "t_idx": 3, "r": "P17"},  # wrong relation, intra pair
    {"title": "B", "h_idx": 0, "t_idx": 1, "r": "P26", "evidence": [0]},  # correct, not in train; evi 1 of 1
    {"title": "Z", "h_idx": 0, "t_idx": 1, "r": "P17", "evidence": [0, 1, 2]},  # unknown title
    {"title": "A", "h_idx": 7, "t_idx": 1, "r": "P17"},  # h out of range: wrong, no crash
]
# Hand computation: 6 unique predictions, 3 correct (1 in train), 4 gold facts.
#   P = 3/6, R = 3/4, F1 = 0.6; Ign P = (3-1)/(6-1) = 0.4, Ign F1 = 2*.4*.75/1.15
#   evidence: predicted 2+1+0+1+0 = 4 (unknown title and duplicate not counted), overlap 3, gold 6
#   intra: predictions (A,0,1) and (A,0,3), 1 correct, gold 2; inter: (A,2,1), (B,0,1), 2 correct, gold 2


@pytest.fixture(scope="module")
def gold():
    return parse_documents(copy.deepcopy(GOLD_RAW), "gold.json")


@pytest.fixture(scope="module")
def train():
    return parse_documents(copy.deepcopy(TRAIN_RAW), "train.json")


@pytest.fixture(scope="module")
def metrics(gold, train):
    return evaluate(PREDS, gold, train)


def test_relation_scores_deduplicate_and_keep_unknown_titles_in_the_denominator(metrics):
    assert (metrics.relation.correct, metrics.relation.predicted, metrics.relation.gold) == (3, 6, 4)
    assert metrics.relation.precision == pytest.approx(0.5)
    assert metrics.relation.recall == pytest.approx(0.75)
    assert metrics.relation.f1 == pytest.approx(0.6)
    c = metrics.counts
    assert (c.predictions, c.duplicates, c.unknown_title, c.invalid_pair) == (7, 1, 1, 1)
    assert (c.documents, c.gold_facts) == (2, 4)


def test_ign_counts_a_fact_seen_in_train_under_another_mention_name(metrics):
    # Only (A,0,1,P17) is in train, through ("Paris city", "France"); (Seine, France) has P131 in train and
    # (Alice, Bob, P26) is in train reversed only, so neither of those counts.
    assert metrics.ign.correct_in_train == 1
    assert metrics.ign.precision == pytest.approx(0.4)
    assert metrics.ign.recall == pytest.approx(0.75)
    assert metrics.ign.f1 == pytest.approx(2 * 0.4 * 0.75 / 1.15)


def test_evidence_precision_counts_all_predicted_evidence_overlap_only_on_correct_facts(metrics):
    assert (metrics.evidence.correct, metrics.evidence.predicted, metrics.evidence.gold) == (3, 4, 6)
    assert metrics.evidence.precision == pytest.approx(0.75)
    assert metrics.evidence.recall == pytest.approx(0.5)
    assert metrics.evidence.f1 == pytest.approx(0.6)


def test_duplicate_keeps_the_first_occurrence_and_its_evidence(gold):
    first, dup = PREDS[0], PREDS[1]
    m = evaluate([first, dup], gold)
    assert (m.evidence.correct, m.evidence.predicted) == (1, 2)
    m = evaluate([dup, first], gold)
    assert (m.evidence.correct, m.evidence.predicted) == (0, 1)
    assert m.relation.predicted == 1 and m.counts.duplicates == 1


def test_intra_and_inter_split_by_the_gold_pair(metrics):
    assert (metrics.intra.correct, metrics.intra.predicted, metrics.intra.gold) == (1, 2, 2)
    assert metrics.intra.f1 == pytest.approx(0.5)
    assert (metrics.inter.correct, metrics.inter.predicted, metrics.inter.gold) == (2, 2, 2)
    assert metrics.inter.f1 == pytest.approx(1.0)


def test_pair_locality_uses_any_mention_pair(gold):
    a = gold[0]
    assert pair_locality(a, 0, 3) == "intra"  # Paris city (s2) / Europe (s2)
    assert pair_locality(a, 3, 0) == "intra"
    assert pair_locality(a, 2, 1) == "inter"
    assert pair_locality(a, 0, 0) is None
    assert pair_locality(a, -1, 1) is None  # not Python's "last entity"
    assert pair_locality(a, 0, 4) is None


def test_per_relation_scores(metrics):
    assert list(metrics.per_relation) == ["P17", "P26", "P30"]  # gold count descending, then id
    p17 = metrics.per_relation["P17"]  # predicted: (A,0,1), (A,2,1), (A,0,3), (Z,0,1), (A,7,1)
    assert (p17.correct, p17.predicted, p17.gold) == (2, 5, 2)
    assert p17.f1 == pytest.approx(2 * 0.4 * 1.0 / 1.4)
    assert (metrics.per_relation["P30"].f1, metrics.per_relation["P26"].f1) == (0.0, 1.0)


def test_frequent_and_long_tail_split_by_train_relation_counts(metrics):
    # Train has 3 relations (< 10), all frequent; P30 never occurs in train, so it is long-tail.
    assert set(metrics.frequent_relations) == {"P17", "P131", "P26"}
    assert (metrics.frequent.correct, metrics.frequent.predicted, metrics.frequent.gold) == (3, 6, 3)
    assert metrics.frequent.f1 == pytest.approx(2 * 0.5 * 1.0 / 1.5)
    assert (metrics.long_tail.correct, metrics.long_tail.predicted, metrics.long_tail.gold) == (0, 0, 1)
    assert metrics.long_tail.f1 == 0.0


def test_frequent_relations_are_the_top_k_by_count_with_ties_broken_by_id():
    counts = {f"P{i}": 100 - i for i in range(1, 12)}  # P1 most frequent ... P11 least
    counts["P0"] = counts["P10"]  # ties with the 10th
    ref = TrainReference(frozenset(), counts)
    assert ref.frequent_relations(10) == ("P1", "P2", "P3", "P4", "P5", "P6", "P7", "P8", "P9", "P0")
    assert ref.frequent_relations(2) == ("P1", "P2")


def test_train_counts_each_fact_once_and_all_mention_name_pairs():
    raw = copy.deepcopy(TRAIN_RAW)
    raw[0]["vertexSet"][0].append(_m("Lutetia", 0, 3))
    ref = TrainReference.from_documents(parse_documents(raw, "train.json"))
    assert ref.relation_counts == {"P17": 1, "P131": 1, "P26": 1}
    assert ref.facts == {
        ("Paris city", "France", "P17"),
        ("Lutetia", "France", "P17"),
        ("Seine", "France", "P131"),
        ("Bob", "Alice", "P26"),
    }


def test_without_train_ign_equals_ordinary_and_frequent_is_absent(gold):
    m = evaluate(PREDS, gold)
    assert not m.train_used
    assert m.ign.correct_in_train == 0
    assert (m.ign.precision, m.ign.f1) == (m.relation.precision, m.relation.f1)
    assert m.frequent is None and m.long_tail is None and m.frequent_relations is None
    d = json.loads(json.dumps(m.to_dict()))
    assert d["frequent"] is None and d["summary"]["frequent_f1"] is None
    assert "no train files" in format_table(m)


def test_train_reference_gives_the_same_metrics_as_train_documents(gold, train, metrics):
    assert evaluate(PREDS, gold, TrainReference.from_documents(train)) == metrics
    assert evaluate(PREDS, gold, iter(train)) == metrics  # any iterable of documents


def test_ign_precision_is_zero_when_every_prediction_is_a_correct_train_fact(gold, train):
    m = evaluate([PREDS[0]], gold, train)  # the official formula would divide 0 by 0
    assert m.relation.precision == 1.0 and m.relation.recall == pytest.approx(0.25)
    assert (m.ign.correct_in_train, m.ign.precision, m.ign.f1) == (1, 0.0, 0.0)


def test_no_predictions_gives_zeros(gold, train):
    m = evaluate([], gold, train)
    for s in (m.relation, m.evidence, m.intra, m.inter, m.frequent, m.long_tail):
        assert (s.precision, s.recall, s.f1, s.correct, s.predicted) == (0.0, 0.0, 0.0, 0, 0)
    assert (m.ign.precision, m.ign.f1) == (0.0, 0.0)
    assert m.relation.gold == 4 and m.evidence.gold == 6


def test_empty_gold_gives_zeros(train):
    for gold_docs in ([], parse_documents([{**GOLD_RAW[1], "labels": []}], "gold.json")):
        m = evaluate(PREDS, gold_docs, train)
        assert (m.relation.correct, m.relation.gold) == (0, 0)
        assert (m.relation.precision, m.relation.recall, m.relation.f1, m.ign.f1, m.evidence.f1) == (
            0,
            0,
            0,
            0,
            0,
        )
        assert m.relation.predicted == 6
    m = evaluate([], [], None)
    assert m.relation.f1 == 0.0 and m.per_relation == {}


def test_unlabelled_gold_documents_are_refused(gold):
    unlabelled = parse_documents([{k: v for k, v in GOLD_RAW[1].items() if k != "labels"}], "gold.json")
    with pytest.raises(LmrcError, match="no labels"):
        evaluate(PREDS, unlabelled)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"title": "A"}, "preds.json: expected a JSON list of predictions, got dict"),
        ([PREDS[0], 3], r"preds.json: predictions\[1\]: expected an object"),
        ([{"h_idx": 0, "t_idx": 1, "r": "P17"}], r"preds.json: predictions\[0\]: missing field 'title'"),
        ([{**PREDS[0], "h_idx": "0"}], r"preds.json: predictions\[0\].h_idx: expected an integer, got '0'"),
        ([{**PREDS[0], "t_idx": True}], r"preds.json: predictions\[0\].t_idx: expected an integer, got True"),
        ([{**PREDS[0], "r": 17}], r"preds.json: predictions\[0\].r: expected a relation id string, got 17"),
        (
            [PREDS[0], {**PREDS[0], "evidence": [0, "1"]}],
            r"predictions\[1\].evidence: expected a list of sentence",
        ),
        (
            [{**PREDS[0], "evidence": None}],
            r"predictions\[0\].evidence: expected a list of sentence ids, got None",
        ),
    ],
)
def test_bad_predictions_are_refused_naming_the_source_and_index(data, message):
    with pytest.raises(LmrcError, match=message):
        check_predictions(data, "preds.json")


def test_evaluate_refuses_bad_prediction_dicts(gold):
    with pytest.raises(LmrcError, match=r"predictions\[0\]: missing field 'r'"):
        evaluate([{"title": "A", "h_idx": 0, "t_idx": 1}], gold)


def test_load_predictions_names_the_file(tmp_path):
    path = tmp_path / "result.json"
    path.write_text(json.dumps([{**PREDS[0], "score": 0.9}]))
    assert load_predictions(path) == [{**PREDS[0], "score": 0.9}]  # extra fields are allowed
    path.write_text(json.dumps([{**PREDS[0], "h_idx": 1.0}]))
    with pytest.raises(LmrcError, match=rf"^{path}: predictions\[0\].h_idx: expected an integer, got 1.0$"):
        load_predictions(path)


def test_load_labelled_refuses_a_document_without_labels(tmp_path):
    path = tmp_path / "gold.json"
    path.write_text(json.dumps([GOLD_RAW[0], {k: v for k, v in GOLD_RAW[1].items() if k != "labels"}]))
    with pytest.raises(LmrcError, match=r'gold.json: document 1 \("B"\): missing field \'labels\''):
        load_labelled(path)


def test_to_dict_is_json_ready_and_summary_matches(metrics):
    d = json.loads(json.dumps(metrics.to_dict()))
    assert d["summary"]["f1"] == pytest.approx(0.6)
    assert d["summary"]["ign_f1"] == pytest.approx(2 * 0.4 * 0.75 / 1.15)
    assert d["relation"] == {
        "precision": 0.5,
        "recall": 0.75,
        "f1": pytest.approx(0.6),
        "correct": 3,
        "predicted": 6,
        "gold": 4,
    }
    assert d["per_relation"]["P26"]["f1"] == 1.0
    assert sorted(d["frequent_relations"]) == ["P131", "P17", "P26"]


def test_table_shows_percentages(metrics):
    table = format_table(metrics, {"P17": "country"}, per_relation=True)
    assert "60.00" in table.splitlines()[3]  # relation F1
    assert any(line.startswith("P17 country") for line in table.splitlines())


# ------------------------------------------------------------------------------------------------------------
# An independent reference, written from the official script's description: raw JSON, a dict keyed by
# (title, r, h, t), sort-then-drop-adjacent de-duplication, explicit loops over mention pairs.


def reference_scores(submission, truth, train_data):
    fact_in_train = set()
    rel_freq = {}
    for data in train_data:
        vertex_set = data["vertexSet"]
        for label in data["labels"]:
            rel_freq[label["r"]] = rel_freq.get(label["r"], 0) + 1
            for n1 in vertex_set[label["h"]]:
                for n2 in vertex_set[label["t"]]:
                    fact_in_train.add((n1["name"], n2["name"], label["r"]))

    def is_intra(vertex_set, h, t):
        return min(abs(m1["sent_id"] - m2["sent_id"]) for m1 in vertex_set[h] for m2 in vertex_set[t]) == 0

    std = {}
    tot_evidences = 0
    title2vertex_set = {}
    gold_intra = gold_inter = 0
    for x in truth:
        title2vertex_set[x["title"]] = x["vertexSet"]
        for label in x["labels"]:
            std[(x["title"], label["r"], label["h"], label["t"])] = set(label["evidence"])
            tot_evidences += len(label["evidence"])
            if is_intra(x["vertexSet"], label["h"], label["t"]):
                gold_intra += 1
            else:
                gold_inter += 1
    tot_relations = len(std)

    def key(x):
        return (x["title"], x["h_idx"], x["t_idx"], x["r"])

    ordered = sorted(submission, key=key)
    answer = [ordered[0]] + [
        ordered[i] for i in range(1, len(ordered)) if key(ordered[i]) != key(ordered[i - 1])
    ]

    frequent = set(sorted(rel_freq, key=lambda r: (-rel_freq[r], r))[:10])
    correct_re = correct_evidence = pred_evi = correct_in_train = 0
    pred_intra = pred_inter = correct_intra = correct_inter = 0
    pred_freq = correct_freq = 0
    for x in answer:
        title, h_idx, t_idx, r = x["title"], x["h_idx"], x["t_idx"], x["r"]
        if r in frequent:
            pred_freq += 1
        if title not in title2vertex_set:
            continue
        vertex_set = title2vertex_set[title]
        evi = set(x["evidence"]) if "evidence" in x else set()
        pred_evi += len(evi)
        valid = 0 <= h_idx < len(vertex_set) and 0 <= t_idx < len(vertex_set) and h_idx != t_idx
        intra = valid and is_intra(vertex_set, h_idx, t_idx)
        if valid:
            pred_intra += intra
            pred_inter += not intra
        if (title, r, h_idx, t_idx) in std:
            correct_re += 1
            correct_intra += intra
            correct_inter += not intra
            correct_freq += r in frequent
            correct_evidence += len(std[(title, r, h_idx, t_idx)] & evi)
            in_train = False
            for n1 in vertex_set[h_idx]:
                for n2 in vertex_set[t_idx]:
                    if (n1["name"], n2["name"], r) in fact_in_train:
                        in_train = True
            if in_train:
                correct_in_train += 1

    def f1(p, r):
        return 0 if p + r == 0 else 2 * p * r / (p + r)

    re_p = correct_re / len(answer)
    re_r = correct_re / tot_relations
    evi_p = correct_evidence / pred_evi if pred_evi > 0 else 0
    evi_r = correct_evidence / tot_evidences
    ign_p = (correct_re - correct_in_train) / (len(answer) - correct_in_train)
    gold_freq = sum(1 for k in std if k[1] in frequent)
    freq_p, freq_r = correct_freq / pred_freq, correct_freq / gold_freq
    lt_p = (correct_re - correct_freq) / (len(answer) - pred_freq)
    lt_r = (correct_re - correct_freq) / (tot_relations - gold_freq)
    return {
        "precision": re_p,
        "recall": re_r,
        "f1": f1(re_p, re_r),
        "ign_f1": f1(ign_p, re_r),
        "evidence_f1": f1(evi_p, evi_r),
        "intra_f1": f1(correct_intra / pred_intra, correct_intra / gold_intra),
        "inter_f1": f1(correct_inter / pred_inter, correct_inter / gold_inter),
        "frequent_f1": f1(freq_p, freq_r),
        "long_tail_f1": f1(lt_p, lt_r),
        "correct_in_train": correct_in_train,
    }


def perturbed_predictions(truth, relation_ids, seed):
    """Gold facts, some dropped, plus wrong relations, random pairs, duplicates, unknown titles and bad indices."""
    rng = random.Random(seed)
    preds = []
    for doc in truth:
        n = len(doc["vertexSet"])
        n_sents = len(doc["sents"])
        for lab in doc["labels"]:
            if rng.random() < 0.25:
                continue
            p = {"title": doc["title"], "h_idx": lab["h"], "t_idx": lab["t"], "r": lab["r"]}
            u = rng.random()
            if u < 0.5:
                p["evidence"] = list(lab["evidence"])
            elif u < 0.75:
                p["evidence"] = list(lab["evidence"]) + [rng.randrange(n_sents)] * 2
            preds.append(p)
            if rng.random() < 0.15:
                preds.append({**p, "r": rng.choice(relation_ids), "evidence": [rng.randrange(n_sents)]})
        for _ in range(3):
            h, t = rng.sample(range(n), 2)
            preds.append({"title": doc["title"], "h_idx": h, "t_idx": t, "r": rng.choice(relation_ids)})
        preds.append({"title": doc["title"], "h_idx": n + 2, "t_idx": 0, "r": "P17"})
    for p in rng.sample(preds, 60):
        preds.append({**p, "evidence": [0]})
    preds += [
        {"title": f"not in gold {i}", "h_idx": 0, "t_idx": 1, "r": "P17", "evidence": [0, 1]}
        for i in range(7)
    ]
    preds.append({"title": truth[0]["title"], "h_idx": -1, "t_idx": 0, "r": "P17"})
    rng.shuffle(preds)
    return preds


@pytest.fixture(scope="module")
def real(redocred_dir, rel_info, dev_docs):
    truth = json.loads((redocred_dir / "dev_50.json").read_text())
    train_raw = json.loads((redocred_dir / "train_450.json").read_text())
    ref = TrainReference.from_documents(load_labelled(redocred_dir / "train_450.json", rel_info))
    return truth, train_raw, ref, list(rel_info.ids)


@pytest.mark.parametrize("seed", [0, 1])
def test_agrees_with_the_reference_on_perturbed_real_predictions(real, dev_docs, seed):
    truth, train_raw, ref, relation_ids = real
    preds = perturbed_predictions(truth, relation_ids, seed)
    expected = reference_scores(preds, truth, train_raw)
    m = evaluate(preds, dev_docs, ref)
    got = m.summary()
    for name in (
        "precision",
        "recall",
        "f1",
        "ign_f1",
        "evidence_f1",
        "intra_f1",
        "inter_f1",
        "frequent_f1",
        "long_tail_f1",
    ):
        assert got[name] == pytest.approx(expected[name], abs=1e-6), name
    assert m.ign.correct_in_train == expected["correct_in_train"]
    # the perturbation exercised every quirk
    c = m.counts
    assert c.duplicates > 0 and c.unknown_title == 7 and c.invalid_pair == 51
    assert 0 < m.ign.correct_in_train < m.relation.correct < m.relation.predicted
    assert m.ign.f1 < m.relation.f1
