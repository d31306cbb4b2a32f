"""Stage-1 prediction memory (issue 26): relation predictions are kept as arrays (PackedPredictions) from the head
to the result file and the scores, and stage-1 scoring does not run under keep_freed_memory's heap settings.

The packed form must give exactly what the dicts gave: the same result-file records in the same order, and the
same scores (checked against `evaluate` on the dicts, duplicates, unknown titles and invalid pairs included)."""

from __future__ import annotations

import copy
import json
import os
import random
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from test_metrics import GOLD_RAW, PREDS, TRAIN_RAW

from lmrc.data.docred import parse_documents
from lmrc.errors import LmrcError
from lmrc.eval.metrics import evaluate
from lmrc.eval.packed import PackedPredictions
from lmrc.machine import heap
from lmrc.predict.outputs import prediction_count
from lmrc.predict.run import run_batch
from lmrc.stage1 import inference


def _packed_from_dicts(title: str, preds: list[dict], ids: list[str]) -> PackedPredictions:
    mine = [p for p in preds if p["title"] == title]
    return PackedPredictions.from_columns(
        title,
        np.array([p["h_idx"] for p in mine], dtype=np.int64),
        np.array([p["t_idx"] for p in mine], dtype=np.int64),
        np.array([ids.index(p["r"]) for p in mine], dtype=np.int64),
        ids,
    )


IDS = ["P17", "P26", "P30", "P131", "P6"]


def _no_evidence(preds: list[dict]) -> list[dict]:
    return [{k: v for k, v in p.items() if k != "evidence"} for p in preds]


@pytest.fixture(scope="module")
def gold():
    return parse_documents(copy.deepcopy(GOLD_RAW), "gold.json")


@pytest.fixture(scope="module")
def train():
    return parse_documents(copy.deepcopy(TRAIN_RAW), "train.json")


def test_packed_predictions_score_as_their_dicts(gold, train):
    # the hand-made cases (duplicate, unknown title, h out of range) plus random ones (h == t, repeats)
    rng = random.Random(0)
    preds = _no_evidence(PREDS)
    for _ in range(300):
        title = rng.choice(["A", "B", "Z"])
        preds.append(
            {"title": title, "h_idx": rng.randrange(-1, 5), "t_idx": rng.randrange(5), "r": rng.choice(IDS)}
        )
    packed = [_packed_from_dicts(title, preds, IDS) for title in ("A", "B", "Z")]
    assert sum(len(p) for p in packed) == len(preds)
    ordered = [x for title in ("A", "B", "Z") for x in preds if x["title"] == title]
    assert [x for p in packed for x in p.records()] == ordered
    for ref in (None, train):
        assert evaluate([], gold, ref, packed=packed) == evaluate(ordered, gold, ref)
    # a title given both ways is de-duplicated across them
    both = evaluate(ordered[:5], gold, train, packed=packed)
    assert both.relation == evaluate(ordered[:5] + ordered, gold, train).relation


def test_packed_predictions_round_trip_and_refuse_a_damaged_form():
    p = PackedPredictions.from_columns(
        "doc", np.array([0, 2, 1]), np.array([1, 0, 2]), np.array([4, 0, 4]), ["P1", "P2", "P3", "P4", "P5"]
    )
    assert p.relations == ("P1", "P5")
    raw = json.loads(json.dumps(p.to_raw()))
    back = PackedPredictions.from_raw("doc", raw, "here")
    assert (
        list(back.records())
        == list(p.records())
        == [
            {"title": "doc", "h_idx": 0, "t_idx": 1, "r": "P5"},
            {"title": "doc", "h_idx": 2, "t_idx": 0, "r": "P1"},
            {"title": "doc", "h_idx": 1, "t_idx": 2, "r": "P5"},
        ]
    )
    assert prediction_count({"packed_predictions": raw, "predictions": [{}]}) == 4
    with pytest.raises(LmrcError, match="here.triples: 8 bytes"):
        PackedPredictions.from_raw("doc", {"relations": ["P1"], "triples": "AAAAAAAAAAA="}, "here")
    with pytest.raises(LmrcError, match="here.triples: a relation index outside its 1 relations"):
        PackedPredictions.from_raw("doc", {**raw, "relations": ["P1"]}, "here")


class _Loss:
    """A multi-label head stand-in: a relation is predicted where its logit (columns 1..) is positive."""

    per_relation = True
    name = "fake"

    def predict(self, logits):
        return torch.cat([torch.zeros(len(logits), 1, dtype=torch.bool), logits[:, 1:] > 0], dim=1)


def test_stage1_only_records_hold_the_relations_packed_not_as_dicts(gold):
    """Every (pair, relation) predicted: the record stays ~16 bytes a triple (the dicts took ~85 in JSON and
    ~400 in memory, for the whole document), and gives back the dicts of relation_predictions, in order."""
    doc = gold[0]
    relations = SimpleNamespace(ids=IDS)
    logits = torch.ones(len(doc.pairs()), 1 + len(IDS))
    packed = inference.packed_relations(doc, logits, _Loss(), relations)
    assert list(packed.records()) == inference.relation_predictions([doc], [logits], _Loss(), relations)
    assert packed.triples.dtype == np.int32 and len(packed) == len(doc.pairs()) * len(IDS)

    proposer = SimpleNamespace(propose=lambda docs: ([None] * len(docs), [packed]))
    pipeline = SimpleNamespace(proposer=proposer, mode="stage1-only", candidates=None)
    (record,), debug = run_batch(pipeline, [doc])
    assert "predictions" not in record and prediction_count(record) == len(packed)
    assert len(json.dumps(record["packed_predictions"])) < 17 * len(packed) + 100
    back = PackedPredictions.from_raw(doc.title, record["packed_predictions"], "record")
    assert list(back.records()) == list(packed.records())


def test_scoring_gives_the_heap_back_to_glibc_defaults_trims_it_and_restores_lmrc_s(monkeypatch):
    calls = []
    trims = []
    libc = SimpleNamespace(
        mallopt=lambda param, value: calls.append((param, value)) or 1,
        malloc_trim=lambda pad: trims.append(pad),
    )
    monkeypatch.setattr(heap, "TRIM_EVERY_S", 0.01)
    monkeypatch.setattr(heap, "_glibc", lambda: libc)
    monkeypatch.setattr(heap, "large_buffers_from_heap", lambda: True)
    for k in [k for k in os.environ if k.startswith("MALLOC_")]:
        monkeypatch.delenv(k)
    with heap.scoring_heap() as changed:
        assert changed and calls == list(heap._SCORING.items())
        while not trims:  # the heap is trimmed while scoring
            time.sleep(0.01)
    assert calls[3:] == list(heap._KEPT.items())
    assert not any(t.name == "lmrc-heap-trim" for t in threading.enumerate())
    # a user's MALLOC_* settings, or glibc's defaults (big buffers already mapped), are left alone
    calls.clear()
    monkeypatch.setenv("MALLOC_ARENA_MAX", "2")
    with heap.scoring_heap() as changed:
        assert not changed
    monkeypatch.delenv("MALLOC_ARENA_MAX")
    monkeypatch.setattr(heap, "large_buffers_from_heap", lambda: False)
    with heap.scoring_heap() as changed:
        assert not changed
    assert calls == []
