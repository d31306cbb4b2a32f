"""lmrc/data/docred.py and relations.py: loading real files, and one exact message per kind of bad input."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from lmrc.data.docred import Document, document_to_raw, load_documents, parse_documents, validate_raw
from lmrc.data.relations import RelationSet, load_relations
from lmrc.errors import LmrcError

RELATIONS = RelationSet(ids=("P551", "P108"), names={"P551": "residence", "P108": "employer"})


def tiny_doc(title: str = "A") -> dict:
    """Two sentences, three entities, two facts; every index below is checked against this by hand."""
    return {
        "title": title,
        "sents": [["Alice", "lives", "in", "Paris", "."], ["She", "works", "for", "Acme", "."]],
        "vertexSet": [
            [
                {"name": "Alice", "sent_id": 0, "pos": [0, 1], "type": "PER"},
                {"name": "She", "sent_id": 1, "pos": [0, 1], "type": "PER"},
            ],
            [{"name": "Paris", "sent_id": 0, "pos": [3, 4], "type": "LOC"}],
            [{"name": "Acme", "sent_id": 1, "pos": [3, 4], "type": "ORG"}],
        ],
        "labels": [
            {"h": 0, "t": 1, "r": "P551", "evidence": [0]},
            {"h": 0, "t": 2, "r": "P108", "evidence": [1]},
        ],
    }


def write(tmp_path: Path, data, name: str = "docs.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


# --- real files -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "n_docs", "n_facts"), [("train_450", 450, 15636), ("dev_50", 50, 1648)])
def test_redocred_splits_load_with_documented_counts(redocred_dir, rel_info, name, n_docs, n_facts):
    docs = load_documents(redocred_dir / f"{name}.json", rel_info)
    assert len(docs) == n_docs
    assert sum(len(d.facts) for d in docs) == n_facts


@pytest.mark.parametrize(("split", "n_facts"), [("train", 1038), ("dev", 1012), ("test", 1066)])
def test_cdr_splits_load_500_documents_of_chemical_disease_facts(cdr_dir, split, n_facts):
    docs = load_documents(cdr_dir / f"{split}.json", load_relations(cdr_dir / "rel_info.json"))
    assert len(docs) == 500
    facts = [(d, f) for d in docs for f in d.facts]
    assert len(facts) == n_facts
    assert {f.r for _, f in facts} == {"CID"}
    assert {(d.entities[f.h].type, d.entities[f.t].type) for d, f in facts} == {("Chemical", "Disease")}


def test_loaded_documents_keep_original_indices_and_fields(redocred_dir, dev_docs):
    raw = json.loads((redocred_dir / "dev_50.json").read_text(encoding="utf-8"))
    for i, (doc, r) in enumerate(zip(dev_docs, raw)):
        assert doc.index == i and doc.title == r["title"]
        assert [e.index for e in doc.entities] == list(range(len(r["vertexSet"])))
        for ent, rent in zip(doc.entities, r["vertexSet"]):
            assert [(m.name, m.sent_id, list(m.pos), m.type) for m in ent.mentions] == [
                (m["name"], m["sent_id"], m["pos"], m["type"]) for m in rent
            ]
        assert [(f.h, f.t, f.r, list(f.evidence)) for f in doc.facts] == [
            (x["h"], x["t"], x["r"], x["evidence"]) for x in r["labels"]
        ]


def test_words_and_sentence_offsets_flatten_the_sentences(tmp_path):
    (doc,) = load_documents(write(tmp_path, [tiny_doc()]), RELATIONS)
    assert doc.words == ("Alice", "lives", "in", "Paris", ".", "She", "works", "for", "Acme", ".")
    assert doc.sent_offsets == (0, 5)
    m = doc.entities[2].mentions[0]  # "Acme": sentence 1, words [3, 4)
    start = doc.sent_offsets[m.sent_id] + m.pos[0]
    assert doc.words[start] == "Acme"
    assert doc.text() == "Alice lives in Paris . She works for Acme ."


def test_pairs_are_all_ordered_pairs_row_major(tmp_path):
    (doc,) = load_documents(write(tmp_path, [tiny_doc()]))
    assert doc.pairs() == [(0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1)]
    assert doc.relations_by_pair() == {(0, 1): ["P551"], (0, 2): ["P108"]}


def test_unlabelled_documents_load_with_facts_none(redocred_dir, tmp_path):
    raw = json.loads((redocred_dir / "dev_50.json").read_text(encoding="utf-8"))
    for d in raw:
        del d["labels"]
    docs = load_documents(write(tmp_path, raw))
    assert len(docs) == 50
    assert all(d.facts is None and not d.labelled and d.relations_by_pair() == {} for d in docs)


def test_document_level_extra_fields_survive_a_round_trip(tmp_path):
    raw = tiny_doc()
    raw["doc_id"] = "wiki-7"
    (doc,) = load_documents(write(tmp_path, [raw]))
    assert doc.extra == {"doc_id": "wiki-7"}
    assert document_to_raw(doc) == raw


def test_empty_labels_list_is_labelled_with_no_facts(tmp_path):
    raw = tiny_doc()
    raw["labels"] = []
    (doc,) = load_documents(write(tmp_path, [raw]))
    assert doc.facts == () and doc.labelled


# --- validation: one problem per case, exact file / document / field ---------------------------------------


def _set(path: tuple, value):
    def mutate(doc: dict) -> None:
        target = doc
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return mutate


def _del(path: tuple):
    def mutate(doc: dict) -> None:
        target = doc
        for key in path[:-1]:
            target = target[key]
        del target[path[-1]]

    return mutate


D = 'document 0 ("A")'
CASES = [
    # wrong types
    ("title_not_string", _set(("title",), 5), "document 0: title: expected a string, got int"),
    ("sents_not_list", _set(("sents",), "Alice lives"), f"{D}: sents: expected a list of sentences, got str"),
    ("word_not_string", _set(("sents", 1, 2), 3), f"{D}: sents[1]: expected a list of word strings"),
    (
        "vertexset_not_list",
        _set(("vertexSet",), {}),
        f"{D}: vertexSet: expected a list of entities, got dict",
    ),
    (
        "entity_not_list",
        _set(("vertexSet", 1), "Paris"),
        f"{D}: vertexSet[1]: expected a list of mentions, got str",
    ),
    (
        "sent_id_not_int",
        _set(("vertexSet", 1, 0, "sent_id"), "0"),
        f"{D}: vertexSet[1][0].sent_id: expected an integer, got '0'",
    ),
    (
        "pos_one_number",
        _set(("vertexSet", 1, 0, "pos"), [3]),
        f"{D}: vertexSet[1][0].pos: expected [start, end], got [3]",
    ),
    ("labels_not_list", _set(("labels",), {}), f"{D}: labels: expected a list, got dict"),
    ("label_h_not_int", _set(("labels", 1, "h"), "0"), f"{D}: labels[1].h: expected an integer, got '0'"),
    (
        "label_r_not_string",
        _set(("labels", 0, "r"), 551),
        f"{D}: labels[0].r: expected a relation id string, got 551",
    ),
    (
        "evidence_not_list",
        _set(("labels", 0, "evidence"), 0),
        f"{D}: labels[0].evidence: expected a list of sentence ids, got 0",
    ),
    # missing fields
    ("missing_title", _del(("title",)), "document 0: missing field 'title'"),
    ("missing_sents", _del(("sents",)), f"{D}: missing field 'sents'"),
    ("missing_vertexset", _del(("vertexSet",)), f"{D}: missing field 'vertexSet'"),
    (
        "missing_mention_name",
        _del(("vertexSet", 2, 0, "name")),
        f"{D}: vertexSet[2][0]: missing field 'name'",
    ),
    ("missing_label_r", _del(("labels", 0, "r")), f"{D}: labels[0]: missing field 'r'"),
    ("missing_label_t", _del(("labels", 1, "t")), f"{D}: labels[1]: missing field 't'"),
    # empty entity lists
    (
        "empty_vertexset",
        _set(("vertexSet",), []),
        f"{D}: vertexSet: is empty (a document needs at least one entity)",
    ),
    ("entity_without_mentions", _set(("vertexSet", 1), []), f"{D}: vertexSet[1]: entity has no mentions"),
    # out of range
    (
        "sent_id_out_of_range",
        _set(("vertexSet", 2, 0, "sent_id"), 2),
        f"{D}: vertexSet[2][0].sent_id: 2 out of range (document has 2 sentences)",
    ),
    (
        "pos_past_sentence_end",
        _set(("vertexSet", 1, 0, "pos"), [3, 6]),
        f"{D}: vertexSet[1][0].pos: [3, 6] out of range for sentence 0 (5 words)",
    ),
    (
        "pos_empty_span",
        _set(("vertexSet", 1, 0, "pos"), [3, 3]),
        f"{D}: vertexSet[1][0].pos: [3, 3] out of range for sentence 0 (5 words)",
    ),
    (
        "label_h_out_of_range",
        _set(("labels", 0, "h"), 3),
        f"{D}: labels[0].h: 3 out of range (document has 3 entities)",
    ),
    (
        "label_t_negative",
        _set(("labels", 1, "t"), -1),
        f"{D}: labels[1].t: -1 out of range (document has 3 entities)",
    ),
    ("label_h_equals_t", _set(("labels", 0, "t"), 0), f"{D}: labels[0]: h and t are the same entity (0)"),
    (
        "evidence_out_of_range",
        _set(("labels", 1, "evidence"), [1, 2]),
        f"{D}: labels[1].evidence: [1, 2] has a sentence id out of range (document has 2 sentences)",
    ),
    (
        "unknown_relation_id",
        _set(("labels", 1, "r"), "P999"),
        f"{D}: labels[1].r: unknown relation id 'P999' (not in the relation inventory)",
    ),
]


@pytest.mark.parametrize(("mutate", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_document_is_refused_naming_file_document_and_field(tmp_path, mutate, expected):
    raw = tiny_doc()
    mutate(raw)
    path = write(tmp_path, [raw])
    problems = validate_raw([raw], RELATIONS)
    assert [p.format(path) for p in problems] == [f"{path}: {expected}"]
    assert problems[0].severity == "error"
    with pytest.raises(LmrcError) as exc:
        load_documents(path, RELATIONS)
    assert str(exc.value) == f"{path}: {expected}"


def test_unknown_relation_ids_pass_without_an_inventory():
    raw = tiny_doc()
    raw["labels"][1]["r"] = "P999"
    assert validate_raw([raw]) == []


def test_top_level_must_be_a_list_of_objects(tmp_path):
    path = write(tmp_path, {"title": "A"})
    with pytest.raises(
        LmrcError, match=r"^.*docs\.json: top level: expected a JSON list of documents, got dict$"
    ):
        load_documents(path)
    assert [p.format("f.json") for p in validate_raw([["A"]])] == [
        "f.json: document 0: expected an object, got list"
    ]


def test_second_document_is_named_by_its_index_and_title(tmp_path):
    bad = tiny_doc("B")
    bad["labels"][0]["h"] = 9
    path = write(tmp_path, [tiny_doc("A"), bad])
    with pytest.raises(LmrcError) as exc:
        load_documents(path)
    assert (
        str(exc.value) == f'{path}: document 1 ("B"): labels[0].h: 9 out of range (document has 3 entities)'
    )


def test_duplicate_titles_are_errors_naming_both_documents(tmp_path):
    path = write(tmp_path, [tiny_doc("A"), tiny_doc("B"), tiny_doc("A")])
    with pytest.raises(LmrcError) as exc:
        load_documents(path)
    assert str(exc.value) == f'{path}: document 2 ("A"): title: duplicate title (also document 0)'


def test_duplicate_facts_are_warnings_and_load_once(tmp_path, caplog):
    raw = tiny_doc()
    raw["labels"].append({"h": 0, "t": 2, "r": "P108", "evidence": []})
    path = write(tmp_path, [raw])
    expected = f"{path}: {D}: labels[2]: duplicate fact (h=0, t=2, r=P108; also labels[1])"
    problems = validate_raw([raw], RELATIONS)
    assert [(p.severity, p.format(path)) for p in problems] == [("warning", expected)]
    with caplog.at_level(logging.WARNING, logger="lmrc.data.docred"):
        (doc,) = load_documents(path, RELATIONS)
    assert [(f.h, f.t, f.r) for f in doc.facts] == [(0, 1, "P551"), (0, 2, "P108")]
    assert doc.facts[1].evidence == (1,)  # the first occurrence wins
    assert expected in caplog.text
    with pytest.raises(LmrcError) as exc:
        load_documents(path, RELATIONS, allow_duplicate_facts=False)
    assert str(exc.value) == expected


def test_several_problems_report_the_first_and_count_the_rest(tmp_path):
    raw = tiny_doc()
    raw["labels"][0]["h"] = 7
    raw["labels"][1]["r"] = "P999"
    raw["vertexSet"][2][0]["sent_id"] = 5
    path = write(tmp_path, [raw])
    assert len(validate_raw([raw], RELATIONS)) == 3
    with pytest.raises(LmrcError) as exc:
        load_documents(path, RELATIONS)
    assert str(exc.value) == (
        f"{path}: {D}: vertexSet[2][0].sent_id: 5 out of range (document has 2 sentences)"
        f" (and 2 more problems; run `lmrc data validate {path}`)"
    )


def test_truncated_json_names_the_line_and_column(tmp_path):
    text = json.dumps([tiny_doc("A"), tiny_doc("B")], indent=1)
    cut = text.index('"title": "B"') + len('"title": "B",')  # ends right after a complete member
    truncated = text[:cut]
    line = truncated.count("\n") + 1
    column = len(truncated) - truncated.rfind("\n")  # the error is at the end of the text
    path = tmp_path / "cut.json"
    path.write_text(truncated, encoding="utf-8")
    with pytest.raises(LmrcError) as exc:
        load_documents(path)
    assert str(exc.value).startswith(f"{path}: line {line}, column {column}: malformed JSON: ")


def test_missing_file_is_a_one_line_error(tmp_path):
    with pytest.raises(LmrcError, match=r"nope\.json: file not found$"):
        load_documents(tmp_path / "nope.json")


def test_parse_documents_names_the_given_source():
    raw = tiny_doc()
    raw["vertexSet"] = []
    with pytest.raises(LmrcError, match=r"^memory: document 0 \(\"A\"\): vertexSet: is empty"):
        parse_documents([raw], "memory")


def test_documents_are_frozen(tmp_path):
    (doc,) = load_documents(write(tmp_path, [tiny_doc()]))
    assert isinstance(doc, Document)
    with pytest.raises(AttributeError):
        doc.title = "B"  # type: ignore[misc]


# --- relations --------------------------------------------------------------------------------------------


def test_relation_columns_are_one_based_in_file_order(redocred_dir, rel_info):
    raw = json.loads((redocred_dir / "rel_info.json").read_text(encoding="utf-8"))
    assert len(rel_info) == 96
    assert rel_info.ids == tuple(raw)
    assert rel_info.column(next(iter(raw))) == 1
    assert rel_info.column(list(raw)[-1]) == 96
    assert rel_info.name("P17") == "country"
    assert "Na" not in rel_info


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({}, "expected a non-empty JSON object mapping relation id to name"),
        ({"P1": ""}, "relation 'P1': name must be a non-empty string, got ''"),
        ({"P1": "x", "P2": "x"}, "relation names must be unique; repeated: ['x']"),
        ({"Na": "none"}, "relation id 'Na' is reserved for 'no relation'"),
    ],
)
def test_bad_relation_inventories_are_refused(tmp_path, content, message):
    path = write(tmp_path, content, "rel_info.json")
    with pytest.raises(LmrcError) as exc:
        load_relations(path)
    assert str(exc.value) == f"{path}: {message}"
