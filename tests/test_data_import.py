"""`lmrc data import`: real documents exported to each annotation format and imported back; broken exports give
one warning line per problem and a count; unreadable files one error line; the output passes `lmrc data validate`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from import_helpers import EXPORTERS, SAME_TEXT_JOINS, expected, gold_of, imported

from lmrc.cli import main
from lmrc.data.docred import load_documents, validate_raw
from lmrc.data.importers import FORMATS, import_file

pytest.importorskip("spacy")


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def warnings_of(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("lmrc: warning: ")]


@pytest.fixture(scope="module")
def golds(data_dir):
    """Five Re-DocRED dev documents and five CDR dev documents, as text with character-span entities."""
    red = load_documents(data_dir / "redocred" / "dev_50.json")[:5]
    cdr = load_documents(data_dir / "cdr" / "dev.json")[:5]
    return {"redocred": [gold_of(d) for d in red], "cdr": [gold_of(d) for d in cdr]}


# --- (a) round trips --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dataset", ["redocred", "cdr"])
@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_round_trip_keeps_what_the_format_expresses(golds, tmp_path, fmt, dataset):
    """Entity clusters (sets of typed character spans, through the imported token_offsets) and relation triples
    come back; for Label Studio and doccano (no coreference of their own) coreference travels as `coref` /
    `same_as` links, and the expected clusters also join gold entities that share a mention of identical text and
    type (their documented rule)."""
    docs = golds[dataset]
    export, name = EXPORTERS[fmt]
    result = import_file(fmt, export(docs, tmp_path / name))
    assert len(result.documents) == len(docs)
    assert not validate_raw(result.documents)
    for gold, raw in zip(docs, result.documents):
        want_clusters, want_triples = expected(gold, fmt in SAME_TEXT_JOINS)
        got_clusters, got_triples = imported(raw)
        assert got_clusters == want_clusters, gold.title
        assert got_triples == want_triples, gold.title
        assert raw["text"] == gold.text
        for sent, offs in zip(raw["sents"], raw["token_offsets"]):
            assert sent == [gold.text[a:b] for a, b in offs]
        assert all(lab["evidence"] == [] for lab in raw["labels"])
    # only what the format cannot say was reported: duplicate facts across relation types never, joined entities
    # relating to themselves only where identical text joined them
    for line in result.problems:
        assert fmt in SAME_TEXT_JOINS and "links an entity to itself" in line, line
    assert result.relations == {r: r for r in sorted({x[2] for g in docs for x in g.relations})}


def test_titles_and_pubtator_text(golds, tmp_path):
    docs = golds["cdr"]
    result = import_file("pubtator", EXPORTERS["pubtator"][0](docs, tmp_path / "x.txt"))
    assert [d["title"] for d in result.documents] == [str(1000 + i) for i in range(len(docs))]
    result = import_file("labelstudio", EXPORTERS["labelstudio"][0](docs, tmp_path / "x.json"))
    assert [d["title"] for d in result.documents] == [g.title for g in docs]


def test_a_span_inside_a_token_splits_it_and_a_span_across_sentences_joins_them(tmp_path):
    text = "The Obamas met. We flew to New\n\nYork today."  # a blank line always ends a sentence
    path = tmp_path / "x.jsonl"
    spans = [(4, 9, "PER"), (text.index("New"), text.index("York") + 4, "LOC")]  # "Obama" inside "Obamas"
    ents = [{"type": t, "mentions": [{"start": s, "end": e}]} for s, e, t in spans]
    path.write_text(json.dumps({"text": text, "entities": ents, "relations": []}) + "\n", encoding="utf-8")
    result = import_file("jsonl", path)
    (raw,) = result.documents
    assert [e[0]["name"] for e in raw["vertexSet"]] == ["Obama", "New\n\nYork"]
    assert raw["sents"] == [
        ["The", "Obama", "s", "met", "."],
        ["We", "flew", "to", "New", "York", "today", "."],
    ]
    assert result.report.notes == {
        "tokens split at a mention boundary": 1,
        "sentences joined (a mention crossed them)": 1,
    }
    assert not result.problems
    assert imported(raw)[0] == {frozenset({s}) for s in spans}


# --- (b) broken exports: one warning line per problem, counted ---------------------------------------------

TEXT = "Alice Smith works for Acme Corp in Paris. Smith founded Acme."
A, S, C, P = (0, 11), (42, 47), (22, 31), (35, 40)  # Alice Smith, Smith, Acme Corp, Paris


def _brat(tmp_path: Path, ann: str) -> Path:
    folder = tmp_path / "brat"
    folder.mkdir()
    (folder / "d.txt").write_text(TEXT, encoding="utf-8")
    good = f"T1\tPER {A[0]} {A[1]}\tAlice Smith\nT2\tORG {C[0]} {C[1]}\tAcme Corp\nR1\tworks_for Arg1:T1 Arg2:T2\n"
    (folder / "d.ann").write_text(good + ann, encoding="utf-8")
    return folder


BRAT_CASES = [
    ("T3\tLOC 35 38;39 40\tPar s\n", "line 4 (T3): discontinuous span 35-38;39-40", "mentions", "discontinuous span"),
    ("T3\tLOC 120 130\tParis\n", "line 4 (T3): offset 120-130 outside the text (61 characters)", "mentions",
     "offsets outside the text or empty"),
    ("T3\tLOC 35 40\tLondon\n", "line 4 (T3): annotated text 'London' does not match", "mentions",
     "text does not match the offsets"),
    (f"T3\tPER {A[0]} {A[1]}\tAlice Smith\n*\tCoref T1 T3\n", "line 4 (T3): duplicate mention 'Alice Smith'",
     "mentions", "duplicate mention"),
    ("R2\tlocated_in Arg1:T2 Arg2:T9\n", "line 4 (R2): relation located_in names T9, not a text-bound", "relations",
     "names a missing entity"),
    ("R2\tknows Arg1:T1 Arg2:T1\n", "line 4 (R2): relation knows links an entity to itself", "relations",
     "entity related to itself"),
    ("R2\tworks_for Arg1:T1 Arg2:T2\n", "line 4 (R2): duplicate relation works_for", "relations",
     "duplicate relation"),
]  # fmt: skip


@pytest.mark.parametrize(("ann", "message", "kind", "reason"), BRAT_CASES)
def test_each_brat_problem_is_one_warning_and_a_count(capsys, tmp_path, ann, message, kind, reason):
    folder = _brat(tmp_path, ann)
    out_path = tmp_path / "out.json"
    code, out, err = run(capsys, "data", "import", "brat", folder, "--output", out_path)
    assert code == 0
    (line,) = warnings_of(err)
    assert line.startswith(f"lmrc: warning: {folder / 'd.ann'}: {message}")
    assert f"skipped {kind}: 1 ({reason}: 1)" in out
    (doc,) = json.loads(out_path.read_text(encoding="utf-8"))
    assert doc["labels"][0]["r"] == "works_for"


def test_brat_counts_the_lines_it_ignores_and_warns_of_unknown_ones(capsys, tmp_path):
    folder = _brat(
        tmp_path, "E1\tFounding:T1\nA1\tNegated E1\nN1\tReference T1 Wikidata:Q1\t\n#1\tNote T1\tok\nX\n"
    )
    code, out, err = run(capsys, "data", "import", "brat", folder, "--output", tmp_path / "o.json")
    assert code == 0
    (line,) = warnings_of(err)
    assert line == f"lmrc: warning: {folder / 'd.ann'}: line 8: not a brat annotation line ('X'); ignored"
    assert (
        "ignored: attributes (A/M lines): 1, events (E lines): 1, normalizations (N lines): 1, notes (# lines): 1"
        in out
    )


def test_a_txt_without_its_ann_is_reported_and_left_out(capsys, tmp_path):
    folder = _brat(tmp_path, "")
    (folder / "lonely.txt").write_text("Nothing here.", encoding="utf-8")
    code, out, err = run(capsys, "data", "import", "brat", folder, "--output", tmp_path / "o.json")
    assert code == 0
    assert warnings_of(err) == [
        f"lmrc: warning: {folder / 'lonely.txt'}: no lonely.ann beside it; document left out"
    ]
    assert "skipped documents: 1 (no .ann file: 1)" in out


def _task(result: list[dict]) -> list[dict]:
    value = [
        {"start": s, "end": e, "text": TEXT[s:e], "labels": [t]} for (s, e), t in ((A, "PER"), (C, "ORG"))
    ]
    items = [{"id": f"m{i}", "type": "labels", "value": v} for i, v in enumerate(value)]
    return [{"id": 4, "data": {"text": TEXT}, "annotations": [{"result": items + result}]}]


LS_CASES = [
    ({"type": "relation", "from_id": "m0", "to_id": "m7", "labels": ["x"]}, "task 4: result 2 (relation m0 -> m7): "
     "relation names missing entity m7", "relations", "names a missing entity"),
    ({"type": "relation", "from_id": "m0", "to_id": "m1", "labels": []}, "task 4: result 2 (relation m0 -> m1): "
     "relation without a label", "relations", "unlabelled relation"),
    ({"id": "m2", "type": "labels", "value": {"start": 50, "end": 99, "labels": ["LOC"]}}, "task 4: result m2: "
     "offset 50-99 outside the text", "mentions", "offsets outside the text or empty"),
]  # fmt: skip


@pytest.mark.parametrize(("item", "message", "kind", "reason"), LS_CASES)
def test_each_labelstudio_problem_is_one_warning_and_a_count(capsys, tmp_path, item, message, kind, reason):
    path = tmp_path / "export.json"
    path.write_text(json.dumps(_task([item])), encoding="utf-8")
    code, out, err = run(capsys, "data", "import", "labelstudio", path, "--output", tmp_path / "o.json")
    assert code == 0
    (line,) = warnings_of(err)
    assert line.startswith(f"lmrc: warning: {path}: {message}")
    assert f"skipped {kind}: 1 ({reason}: 1)" in out


LINE_CASES = [
    ("doccano", '{"text": "x", "entities": [', "line 2: malformed JSON", "documents", "malformed JSON line"),
    ("doccano", json.dumps({"text": TEXT, "entities": [{"id": 1, "label": "PER", "start_offset": 0, "end_offset": 11}],
     "relations": [{"id": 5, "from_id": 1, "to_id": 3, "type": "r"}]}), "line 2: relation 5: relation names missing "
     "entity 3", "relations", "names a missing entity"),
    ("jsonl", json.dumps({"text": TEXT, "entities": [{"type": "PER", "mentions": [{"start": 0, "end": 11}]}],
     "relations": [{"head": 0, "tail": 4, "type": "r"}]}), "line 2: relations[0]: relation names missing entity 4",
     "relations", "names a missing entity"),
    ("jsonl", json.dumps({"text": TEXT, "entities": [{"type": "PER", "mentions": [{"start": 0, "end": 5}, {"start": 0}]}]}),
     "line 2: entities[0].mentions[1]: a mention needs", "mentions", "malformed item"),
]  # fmt: skip


@pytest.mark.parametrize(("fmt", "line2", "message", "kind", "reason"), LINE_CASES)
def test_each_json_lines_problem_is_one_warning_and_a_count(
    capsys, tmp_path, fmt, line2, message, kind, reason
):
    good = {"text": "Bob sleeps.", "entities": [], "relations": []}
    if fmt == "doccano":
        good["entities"] = [{"id": 1, "label": "PER", "start_offset": 0, "end_offset": 3}]
    else:
        good["entities"] = [{"type": "PER", "mentions": [{"start": 0, "end": 3}]}]
    path = tmp_path / "export.jsonl"
    path.write_text(json.dumps(good) + "\n" + line2 + "\n", encoding="utf-8")
    code, out, err = run(capsys, "data", "import", fmt, path, "--output", tmp_path / "o.json")
    assert code == 0
    (line,) = warnings_of(err)
    assert line.startswith(f"lmrc: warning: {path}: {message}")
    assert f"skipped {kind}: 1 ({reason}: 1)" in out


def test_pubtator_composite_ids_and_missing_concepts(capsys, tmp_path):
    title, abstract = "Lithium and haloperidol toxicity.", "Seizures followed."
    text = f"{title} {abstract}"
    path = tmp_path / "cdr.txt"
    lines = [f"7|t|{title}", f"7|a|{abstract}", "7\t0\t7\tLithium\tChemical\tD1|D2",
             "7\t24\t32\ttoxicity\tDisease\tD9", f"7\t{text.index('Seizures')}\t{text.index('Seizures') + 8}\t"
             "Seizures\tDisease\t-1", "7\tCID\tD1\tD9", "7\tCID\tD4\tD9"]  # fmt: skip
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    code, out, err = run(capsys, "data", "import", "pubtator", path, "--output", tmp_path / "o.json")
    assert code == 0
    assert warnings_of(err) == [
        f"lmrc: warning: {path}: PMID 7: line 3: composite concept id 'D1|D2'; the mention is kept as 'D1'",
        f"lmrc: warning: {path}: PMID 7: line 7: relation CID names missing entity D4 (no mention has that concept "
        "id); skipped",
    ]
    assert "skipped relations: 1 (names a missing entity: 1)" in out
    assert "kept with a warning: composite concept id: 1" in out
    (doc,) = json.loads((tmp_path / "o.json").read_text(encoding="utf-8"))
    assert [e[0]["name"] for e in doc["vertexSet"]] == ["Lithium", "toxicity", "Seizures"]
    assert doc["labels"] == [{"h": 0, "t": 1, "r": "CID", "evidence": []}]


@pytest.mark.parametrize(
    ("fmt", "name", "content", "message"),
    [
        ("labelstudio", "export.json", b"[{", "line 1, column 3: malformed JSON"),
        ("labelstudio", "missing.json", None, "file not found"),
        ("doccano", "export.jsonl", b'{"text": "caf\xe9"}\n', "byte 13: not UTF-8 text"),
        ("pubtator", "missing.txt", None, "file not found"),
        ("jsonl", "export.jsonl", b"\xff\xfe", "byte 0: not UTF-8 text"),
    ],
)
def test_an_unreadable_file_is_one_error_line_and_nothing_is_written(
    capsys, tmp_path, fmt, name, content, message
):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    output = tmp_path / "o.json"
    code, out, err = run(capsys, "data", "import", fmt, path, "--output", output)
    assert code == 2
    assert len(err.splitlines()) == 1
    assert err.startswith(f"lmrc: error: {path}: {message}")
    assert not output.exists()


def test_a_brat_ann_that_is_not_utf8_stops_the_import(capsys, tmp_path):
    folder = _brat(tmp_path, "")
    (folder / "d.ann").write_bytes(b"T1\tPER 0 5\tAl\xe9\n")
    code, _, err = run(capsys, "data", "import", "brat", folder, "--output", tmp_path / "o.json")
    assert code == 2
    assert err == f"lmrc: error: {folder / 'd.ann'}: byte 13: not UTF-8 text (re-save it as UTF-8)\n"


# --- (c) the command: a file `lmrc data validate` accepts, the inventory, the summary ---------------------------


def test_the_command_writes_what_validate_accepts_and_prints_the_summary(capsys, golds, tmp_path):
    docs = golds["cdr"]
    export = EXPORTERS["pubtator"][0](docs, tmp_path / "cdr.txt")
    output, rel_info = tmp_path / "docs.json", tmp_path / "rel_info.json"
    code, out, err = run(
        capsys, "data", "import", "pubtator", export, "--output", output, "--rel-info", rel_info
    )
    assert code == 0 and not warnings_of(err)
    written = json.loads(output.read_text(encoding="utf-8"))
    n_ent = sum(len(d["vertexSet"]) for d in written)
    n_men = sum(len(e) for d in written for e in d["vertexSet"])
    n_rel = sum(len(g.relations) for g in docs)
    assert out.splitlines()[:2] == [
        f"{output}: {len(docs)} documents from pubtator {export}",
        f"  converted: {len(docs)} documents, {n_ent} entities, {n_men} mentions, {n_rel} relations (1 relation types)",
    ]
    assert json.loads(rel_info.read_text(encoding="utf-8")) == {"CID": "CID"}
    code, out, _ = run(capsys, "data", "validate", output, "--rel-info", rel_info)
    assert code == 0, out
    assert out.splitlines()[-1] == f"{output}: OK: {len(docs)} documents, 0 errors, 0 warnings"
    # an existing output is refused without --overwrite; an output never replaces the input
    code, _, err = run(capsys, "data", "import", "pubtator", export, "--output", output)
    assert code == 2 and "pass --overwrite" in err
    code, _, err = run(capsys, "data", "import", "pubtator", export, "--output", export, "--overwrite")
    assert code == 2 and "an output never replaces an input" in err


def test_relations_inventory_maps_names_to_ids_and_reports_unknown_types(
    capsys, golds, redocred_dir, tmp_path
):
    g = golds["redocred"][0]
    names = json.loads((redocred_dir / "rel_info.json").read_text(encoding="utf-8"))
    h, t, r = g.relations[0]
    lines = [
        {"text": g.text, "entities": [{"type": e[0][2], "mentions": [{"start": s, "end": x} for s, x, _ in e]}
                                      for e in g.entities],
         "relations": [{"head": h, "tail": t, "type": names[r]}, {"head": t, "tail": h, "type": "likes"}]},
    ]  # fmt: skip
    path = tmp_path / "x.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n", encoding="utf-8")
    output, rel_info = tmp_path / "o.json", tmp_path / "rel.json"
    code, out, err = run(
        capsys, "data", "import", "jsonl", path, "--output", output, "--rel-info", rel_info,
        "--relations", redocred_dir / "rel_info.json",
    )  # fmt: skip
    assert code == 0
    assert warnings_of(err) == [
        f"lmrc: warning: {path}: line 1: relations[1]: relation type 'likes' is not in the relation inventory "
        "(--relations); skipped"
    ]
    assert "skipped relations: 1 (relation type not in the inventory: 1)" in out
    (doc,) = json.loads(output.read_text(encoding="utf-8"))
    assert [lab["r"] for lab in doc["labels"]] == [r]
    assert json.loads(rel_info.read_text(encoding="utf-8")) == {r: names[r]}
    code, _, _ = run(capsys, "data", "validate", output, "--rel-info", redocred_dir / "rel_info.json")
    assert code == 0


def test_nothing_converted_is_an_error_and_writes_nothing(capsys, tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text(json.dumps({"text": "No entities here."}) + "\n", encoding="utf-8")
    code, _, err = run(capsys, "data", "import", "jsonl", path, "--output", tmp_path / "o.json")
    assert code == 2
    assert err.splitlines() == [
        f"lmrc: warning: {path}: line 1: no usable entity mention (a DocRED document needs at least one entity); "
        "document left out",
        f"lmrc: error: {path}: no document could be converted (see the warnings above); nothing written",
    ]
    assert not (tmp_path / "o.json").exists()


def test_labelstudio_offsets_count_utf16_units_and_identical_text_joins(tmp_path):
    text = "🙂 Bob met Ann. Bob left."  # the emoji is two UTF-16 units: Label Studio's offsets are one higher after it
    spans = [(2, 5, "PER"), (10, 13, "PER"), (15, 18, "PER")]  # characters: Bob, Ann, Bob
    items = [
        {
            "id": f"m{i}",
            "type": "labels",
            "value": {"start": s + 1, "end": e + 1, "text": text[s:e], "labels": [t]},
        }
        for i, (s, e, t) in enumerate(spans)
    ]
    items.append({"type": "relation", "from_id": "m2", "to_id": "m1", "labels": ["knows"]})
    path = tmp_path / "export.json"
    path.write_text(
        json.dumps([{"id": 1, "data": {"body": text}, "annotations": [{"result": items}]}]), "utf-8"
    )
    result = import_file("labelstudio", path)
    assert not result.problems
    (raw,) = result.documents
    bob, ann = frozenset({spans[0], spans[2]}), frozenset({spans[1]})
    assert imported(raw) == ({bob, ann}, {(bob, ann, "knows")})
