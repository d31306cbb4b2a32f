"""lmrc/data/candidates.py: the stage-1 -> stage-2 candidates file round-trips and refuses bad files precisely."""

from __future__ import annotations

import copy
import json

import pytest

from lmrc.data.candidates import (
    CandidatePair,
    Candidates,
    CandidatesHeader,
    DocumentCandidates,
    candidates_to_raw,
    load_candidates,
    parse_candidates,
    save_candidates,
)
from lmrc.errors import LmrcError


def sample() -> Candidates:
    return Candidates(
        header=CandidatesHeader(
            model="runs/atlop-minilm",
            head="atl",
            threshold=0.0,
            calibration={"method": "recall_target", "target": 0.95, "dev_recall": 0.951},
            source="dev_50.json",
        ),
        documents=[
            DocumentCandidates(
                title="Alice",
                n_entities=3,
                pairs=(
                    CandidatePair(h=0, t=2, score=2.5, relations={"P108": 2.5, "P551": 0.25}),
                    CandidatePair(h=1, t=0, score=0.125),
                ),
            ),
            DocumentCandidates(title="Empty", pairs=()),
        ],
    )


def test_save_then_load_gives_back_the_same_candidates(tmp_path):
    path = tmp_path / "candidates.json"
    save_candidates(sample(), path)
    assert load_candidates(path) == sample()
    assert load_candidates(path).by_title()["Alice"].pairs[0].relations == {"P108": 2.5, "P551": 0.25}


def test_written_file_follows_the_documented_schema(tmp_path):
    path = tmp_path / "candidates.json"
    save_candidates(sample(), path)
    raw = json.loads(path.read_text(encoding="utf-8"))
    assert raw == {
        "format": "lmrc-candidates",
        "version": 1,
        "header": {
            "model": "runs/atlop-minilm",
            "head": "atl",
            "threshold": 0.0,
            "calibration": {"method": "recall_target", "target": 0.95, "dev_recall": 0.951},
            "source": "dev_50.json",
        },
        "documents": [
            {
                "title": "Alice",
                "n_entities": 3,
                "pairs": [
                    {"h": 0, "t": 2, "score": 2.5, "relations": {"P108": 2.5, "P551": 0.25}},
                    {"h": 1, "t": 0, "score": 0.125},
                ],
            },
            {"title": "Empty", "pairs": []},
        ],
    }


def test_minimal_header_gets_the_default_calibration():
    raw = candidates_to_raw(sample())
    raw["header"] = {"model": "m", "head": "bce", "threshold": None}
    c = parse_candidates(raw, "c.json")
    assert c.header.calibration == {"method": "default"}
    assert c.header.threshold is None and c.header.source is None


def _set(path: tuple, value):
    def mutate(raw: dict) -> None:
        target = raw
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return mutate


def _del(path: tuple):
    def mutate(raw: dict) -> None:
        target = raw
        for key in path[:-1]:
            target = target[key]
        del target[path[-1]]

    return mutate


P = ("documents", 0, "pairs")
CASES = [
    (
        "wrong_format",
        _set(("format",), "docred"),
        'top level: not an lmrc candidates file (expected "format": "lmrc-candidates")',
    ),
    ("wrong_version", _set(("version",), 2), "version: unsupported version 2 (this lmrc reads 1)"),
    (
        "header_without_model",
        _del(("header", "model")),
        "header: expected an object with string fields 'model' and 'head'",
    ),
    (
        "threshold_string",
        _set(("header", "threshold"), "0.5"),
        "header.threshold: expected a number or null, got '0.5'",
    ),
    (
        "calibration_string",
        _set(("header", "calibration"), "auto"),
        "header.calibration: expected an object, got 'auto'",
    ),
    ("source_number", _set(("header", "source"), 3), "header.source: expected a string or null, got 3"),
    ("documents_object", _set(("documents",), {}), "documents: expected a list"),
    (
        "document_without_title",
        _del(("documents", 1, "title")),
        "documents[1]: expected an object with a string 'title'",
    ),
    (
        "duplicate_title",
        _set(("documents", 1, "title"), "Alice"),
        "documents[1].title: duplicate title 'Alice'",
    ),
    (
        "negative_n_entities",
        _set(("documents", 0, "n_entities"), -1),
        "documents[0].n_entities: expected a non-negative integer, got -1",
    ),
    (
        "bool_n_entities",
        _set(("documents", 0, "n_entities"), True),
        "documents[0].n_entities: expected a non-negative integer, got True",
    ),
    ("pairs_missing", _del(("documents", 0, "pairs")), "documents[0].pairs: expected a list"),
    ("pair_not_object", _set((*P, 1), [1, 0]), "documents[0].pairs[1]: expected an object"),
    (
        "h_negative",
        _set((*P, 0, "h"), -1),
        "documents[0].pairs[0].h: expected a non-negative integer, got -1",
    ),
    ("t_float", _set((*P, 1, "t"), 0.0), "documents[0].pairs[1].t: expected a non-negative integer, got 0.0"),
    (
        "t_out_of_range",
        _set((*P, 0, "t"), 3),
        "documents[0].pairs[0].t: 3 out of range (document has 3 entities)",
    ),
    ("h_equals_t", _set((*P, 1, "h"), 0), "documents[0].pairs[1]: h and t are the same entity (0)"),
    (
        "duplicate_pair",
        _set((*P, 1), {"h": 0, "t": 2, "score": 1.0}),
        "documents[0].pairs[1]: duplicate pair (h=0, t=2)",
    ),
    (
        "score_missing",
        _del((*P, 1, "score")),
        "documents[0].pairs[1].score: expected a finite number, got None",
    ),
    (
        "score_nan",
        _set((*P, 1, "score"), float("nan")),
        "documents[0].pairs[1].score: expected a finite number, got nan",
    ),
    (
        "relations_list",
        _set((*P, 0, "relations"), ["P108"]),
        "documents[0].pairs[0].relations: expected an object mapping relation id to a number",
    ),
    (
        "relation_score_string",
        _set((*P, 0, "relations", "P108"), "high"),
        "documents[0].pairs[0].relations: expected an object mapping relation id to a number",
    ),
]


@pytest.mark.parametrize(("mutate", "message"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_candidates_file_is_refused_naming_file_and_place(tmp_path, mutate, message):
    raw = copy.deepcopy(candidates_to_raw(sample()))
    mutate(raw)
    path = tmp_path / "candidates.json"
    path.write_text(json.dumps(raw), encoding="utf-8")  # json writes NaN, and Python's reader accepts it
    with pytest.raises(LmrcError) as exc:
        load_candidates(path)
    assert str(exc.value) == f"{path}: {message}"


def test_a_docred_file_is_not_mistaken_for_candidates(tmp_path):
    path = tmp_path / "dev.json"
    path.write_text(json.dumps([{"title": "A", "sents": [], "vertexSet": []}]), encoding="utf-8")
    with pytest.raises(LmrcError, match=r"dev\.json: top level: not an lmrc candidates file"):
        load_candidates(path)


def test_truncated_candidates_file_is_a_malformed_json_error(tmp_path):
    path = tmp_path / "candidates.json"
    save_candidates(sample(), path)
    text = path.read_text(encoding="utf-8")
    path.write_text(text[: len(text) // 2], encoding="utf-8")
    with pytest.raises(LmrcError, match=r"candidates\.json: line 1, column \d+: malformed JSON"):
        load_candidates(path)
