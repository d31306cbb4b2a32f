"""Plain text in: reading (bad input one line each), segmentation, the detokeniser's offsets, the round trip
document -> text -> entities (gold as an oracle) -> the same document, the spaCy-pipeline option, and the entity
model's training (resume gives the same model)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from stage1_run_helpers import single_thread  # noqa: F401  (autouse fixture)
from text_helpers import need_spacy

from lmrc.cli import main
from lmrc.data.docred import Document, Entity, Mention, parse_documents
from lmrc.entities import reader
from lmrc.entities.annotate import gold_of, is_exact
from lmrc.entities.build import build_documents
from lmrc.entities.detok import detokenize
from lmrc.entities.e2e import built_entity_spans
from lmrc.entities.model import GoldAnnotator, SpacyAnnotator
from lmrc.entities.reader import TextDoc, read_texts
from lmrc.errors import LmrcError
from lmrc.io import read_json


@pytest.fixture(autouse=True)
def _spacy():
    need_spacy()


def simple_doc() -> Document:
    raw = {
        "title": "Ada",
        "sents": [
            ["Ada", "Lovelace", "was", "born", "in", "London", "(", "England", ")", "in", "1815", "."],
            ["Lovelace", "worked", "with", "Charles", "Babbage", "on", "the", '"', "Analytical", "Engine", '"', "."],
        ],
        "vertexSet": [
            [{"name": "Ada Lovelace", "sent_id": 0, "pos": [0, 2], "type": "PER"},
             {"name": "Lovelace", "sent_id": 1, "pos": [0, 1], "type": "PER"}],
            [{"name": "London", "sent_id": 0, "pos": [5, 6], "type": "LOC"}],
            [{"name": "England", "sent_id": 0, "pos": [7, 8], "type": "LOC"}],
            [{"name": "1815", "sent_id": 0, "pos": [10, 11], "type": "TIME"}],
            [{"name": "Charles Babbage", "sent_id": 1, "pos": [3, 5], "type": "PER"}],
            [{"name": "Analytical Engine", "sent_id": 1, "pos": [8, 10], "type": "MISC"}],
        ],
    }  # fmt: skip
    return parse_documents([raw], "simple")[0]


# ------------------------------------------------------------------------------------------- detokeniser


def test_detokenised_text_reads_as_written_and_offsets_point_at_tokens():
    doc = simple_doc()
    d = detokenize(doc)
    assert d.text == (
        "Ada Lovelace was born in London (England) in 1815. Lovelace worked with Charles Babbage on the "
        '"Analytical Engine".'
    )
    for sent, spans in zip(doc.sents, d.spans):
        for tok, (a, b) in zip(sent, spans):
            assert d.text[a:b] == tok


def test_gold_mention_spans_point_at_the_mention_tokens_on_real_documents(dev_docs):
    for doc in dev_docs:
        g = gold_of(doc)
        for ent, gent in zip(doc.entities, g.entities):
            for m, cm in zip(ent.mentions, gent):
                words = doc.sents[m.sent_id][m.pos[0] : m.pos[1]]
                a, b = cm.span
                assert g.text[a:b].replace(" ", "") == "".join(words).replace(" ", "")


# ------------------------------------------------------------------------------------------- round trip


def test_round_trip_gives_the_same_document():
    doc = simple_doc()
    g = gold_of(doc)
    raws, stats = build_documents([TextDoc(doc.title, g.text, "mem")], GoldAnnotator.from_documents([doc]))
    assert stats.documents == 1 and not stats.skipped
    back = parse_documents(raws, "built")[0]
    assert back.sents == doc.sents
    assert back.entities == doc.entities
    # the built file carries its text and token offsets, and they point at the mention strings
    raw = raws[0]
    for ent in raw["vertexSet"]:
        for m in ent:
            offs = raw["token_offsets"][m["sent_id"]]
            assert raw["text"][offs[m["pos"][0]][0] : offs[m["pos"][1] - 1][1]] == m["name"]


def test_round_trip_on_real_documents_keeps_every_mention_span_that_tokens_can_hold(dev_docs):
    docs = dev_docs[:20]
    oracle = GoldAnnotator.from_documents(docs)
    texts = [TextDoc(d.title, gold_of(d).text, d.title) for d in docs]
    raws, stats = build_documents(texts, oracle)
    assert stats.documents == len(docs)
    n_exact = n_total = 0
    for doc, raw in zip(docs, raws):
        g = gold_of(doc)
        built = built_entity_spans(raw)
        assert len(built) == len(doc.entities)  # the same entities, in vertexSet order
        from lmrc.entities.segment import segment

        seg = segment(g.text)
        for gold_ent, spans in zip(g.entities, built):
            exact = {m.span for m in gold_ent if is_exact(seg, m.span)}
            assert exact <= spans  # every mention on token boundaries comes back with its exact span
            n_exact += len(exact)
            n_total += len(gold_ent)
            for a, b in spans:
                assert raw["text"][a:b] == raw["text"][a:b].strip()
        parse_documents([raw], "built")  # a valid DocRED document
    assert n_exact / n_total > 0.95, (n_exact, n_total)


# ------------------------------------------------------------------------------------------- bad input


def test_bad_files_are_one_line_each_and_the_others_go_on(tmp_path, monkeypatch, caplog):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a_good.txt").write_text("Ada Lovelace was born in London.", encoding="utf-8")
    (folder / "b_empty.txt").write_text("  \n\n", encoding="utf-8")
    (folder / "c_binary.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    (folder / "d_latin1.txt").write_bytes("Caf\xe9 in M\xfcnchen".encode("latin-1"))
    (folder / "e_huge.txt").write_text("word " * 400, encoding="utf-8")
    (folder / "notes.md").write_text("not read", encoding="utf-8")
    monkeypatch.setattr(reader, "MAX_CHARS", 1000)
    docs, skipped = read_texts(folder)
    assert [d.title for d in docs] == ["a_good"]
    problems = {Path(s.source).name: s.problem for s in skipped}
    assert "empty" in problems["b_empty.txt"]
    assert "binary" in problems["c_binary.txt"]
    assert "not UTF-8" in problems["d_latin1.txt"] and "byte 3" in problems["d_latin1.txt"]
    assert "too large" in problems["e_huge.txt"]
    assert len(skipped) == 4


def test_jsonl_input_titles_and_bad_lines(tmp_path):
    f = tmp_path / "docs.jsonl"
    f.write_text(
        '{"title": "One", "text": "Paris is in France."}\n'
        "not json\n"
        '{"text": "No title here about Berlin."}\n'
        '{"title": "One", "text": "A second One."}\n'
        '{"title": "Empty", "text": ""}\n'
        '{"title": 3, "text": "x"}\n',
        encoding="utf-8",
    )
    docs, skipped = read_texts(f)
    assert [d.title for d in docs] == ["One", "docs:3", "One (2)"]
    assert [s.source.rsplit(" ", 1)[-1] for s in skipped] == ["2", "5", "6"]


def test_nothing_readable_is_one_error_line(tmp_path, capsys):
    f = tmp_path / "empty.txt"
    f.write_text("", encoding="utf-8")
    code = main(["data", "from-text", str(f), "--entities", "gold:" + str(tmp_path / "none.json"), "--output",
                 str(tmp_path / "o.json")])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("lmrc: error: ") and "Traceback" not in "".join(err)
    with pytest.raises(LmrcError, match="no readable document"):
        read_texts(f)


def test_from_text_cli_with_the_oracle_and_a_bad_file(tmp_path, capsys):
    doc = simple_doc()
    gold = tmp_path / "gold.json"
    from lmrc.data.docred import document_to_raw

    gold.write_text(json.dumps([document_to_raw(doc)]), encoding="utf-8")
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "Ada.txt").write_text(gold_of(doc).text, encoding="utf-8")
    (folder / "broken.txt").write_bytes(b"\xff\xfe\x00\x00")
    out = tmp_path / "built.json"
    assert main(["data", "from-text", str(folder), "--entities", f"gold:{gold}", "--output", str(out)]) == 0
    captured = capsys.readouterr()
    assert "1 documents" in captured.out and "1 skipped" in captured.out
    warned = [line for line in captured.err.splitlines() if "broken.txt" in line]
    assert len(warned) == 1 and "binary" in warned[0]
    built = parse_documents(read_json(out), out)
    assert len(built) == 1 and built[0].entities == doc.entities
    # the output never replaces the input
    assert main(["data", "from-text", str(out), "--entities", f"gold:{gold}", "--output", str(out)]) == 2


def test_long_documents_are_tagged_in_windows_none_dropped():
    from conftest import minilm_dir
    from transformers import AutoTokenizer

    from lmrc.entities.mentions import plan_windows

    tok = AutoTokenizer.from_pretrained(minilm_dir())
    sents = [["word"] * 30 for _ in range(20)] + [["verylongwordpiece"] * 200]
    windows = plan_windows(sents, tok, 64)
    covered = [w for win in windows for w in win.words]
    assert covered == [(si, ti) for si, s in enumerate(sents) for ti in range(len(s))]
    for win in windows:
        pieces = sum(len(tok.tokenize(sents[si][ti])) for si, ti in win.words)
        assert pieces <= 62


# ------------------------------------------------------------------------------------------- spaCy pipelines


def test_a_spacy_pipeline_with_ontonotes_types_is_mapped_to_docred_types(tmp_path):
    import spacy

    nlp = spacy.blank("en")
    ruler = nlp.add_pipe("entity_ruler")
    ruler.add_patterns([
        {"label": "PERSON", "pattern": "Ada Lovelace"}, {"label": "PERSON", "pattern": "Lovelace"},
        {"label": "GPE", "pattern": "London"}, {"label": "DATE", "pattern": "1815"},
        {"label": "NORP", "pattern": "English"}, {"label": "WORK_OF_ART", "pattern": "Notes"},
    ])  # fmt: skip
    path = tmp_path / "pipe"
    nlp.to_disk(path)
    ann = SpacyAnnotator.load(str(path))
    text = "Ada Lovelace was born in London in 1815. The English writer Lovelace wrote the Notes."
    raws, _ = build_documents([TextDoc("t", text, "t")], ann)
    ents = [[(m["name"], m["type"]) for m in e] for e in raws[0]["vertexSet"]]
    assert ents == [[("Ada Lovelace", "PER")], [("London", "LOC")], [("1815", "TIME")], [("English", "ORG")],
                    [("Lovelace", "PER")], [("Notes", "MISC")]]  # fmt: skip
    with pytest.raises(LmrcError, match="cannot load"):
        SpacyAnnotator.load(str(tmp_path / "missing"))


def test_an_entity_free_text_is_reported_not_dropped_silently(caplog):
    raws, stats = build_documents([TextDoc("x", "nothing here at all.", "x.txt")], GoldAnnotator({}))
    assert raws == [] and [s.source for s in stats.skipped] == ["x.txt"]


# ------------------------------------------------------------------------------------------- typed objects


def test_oracle_mentions_are_typed_as_given():
    doc = simple_doc()
    e = doc.entities[0]
    assert isinstance(e, Entity) and isinstance(e.mentions[0], Mention) and e.type == "PER"


def test_evaluate_with_the_oracle_scores_one_everywhere(tmp_path, capsys):
    from lmrc.data.docred import document_to_raw

    gold = tmp_path / "gold.json"
    gold.write_text(json.dumps([document_to_raw(simple_doc())]), encoding="utf-8")
    out = tmp_path / "scores.json"
    texts = tmp_path / "texts.jsonl"
    assert main(["entities", "evaluate", "--entities", f"gold:{gold}", "--gold", str(gold), "--output", str(out),
                 "--text-output", str(texts)]) == 0  # fmt: skip
    r = read_json(out)
    for k in ("mention", "muc", "b_cubed", "ceaf_e", "exact"):
        assert r[k]["f1"] == pytest.approx(1.0), k
    assert r["conll_f1"] == pytest.approx(1.0) and r["type_accuracy"] == 1.0
    assert r["gold_mentions_on_token_boundaries"] == 1.0
    assert json.loads(texts.read_text("utf-8"))["text"] == gold_of(simple_doc()).text
    assert "CoNLL F1" in capsys.readouterr().out


def test_entities_needs_text(tmp_path, capsys):
    f = tmp_path / "a.txt"
    f.write_text("Ada Lovelace was born in London.", encoding="utf-8")
    assert main(["predict", "--input", str(f), "--entities", "x", "--output", str(tmp_path / "r.json")]) == 2
    assert "--entities goes with --text" in capsys.readouterr().err
