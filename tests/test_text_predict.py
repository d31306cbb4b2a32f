"""`lmrc predict --text` end to end on tiny random models: text -> entities -> the pipeline -> the result file and
the readable triples; --resume and --shard on text input; the oracle entities score like the gold documents; the
entity model's training resumes to the same model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from browser_helpers import browser, console_errors, open_page
from pipeline_helpers import data_files, stage1_checkpoint
from selenium.webdriver.common.by import By
from stage1_run_helpers import single_thread  # noqa: F401  (autouse fixture)
from text_helpers import need_spacy, tiny_entity_model

from lmrc.cli import main
from lmrc.config import load_config
from lmrc.data.docred import document_to_raw, load_documents
from lmrc.entities.annotate import gold_of, is_exact
from lmrc.entities.config import EntitiesConfig
from lmrc.entities.model import EntityModel
from lmrc.entities.run import docs_path, document_triples, triples_path
from lmrc.entities.segment import segment
from lmrc.entities.train import train
from lmrc.io import read_json


@pytest.fixture(autouse=True)
def _spacy():
    need_spacy()


@pytest.fixture(scope="module")
def files(redocred_dir, cache_dir):
    return data_files(redocred_dir)


@pytest.fixture(scope="module")
def ckpt(redocred_dir, files):
    return stage1_checkpoint(redocred_dir)


@pytest.fixture(scope="module")
def entities(files):
    return tiny_entity_model(files["train"], files["tune"])


def write_jsonl(path: Path, docs) -> Path:
    path.write_text(
        "".join(json.dumps({"title": d.title, "text": gold_of(d).text}) + "\n" for d in docs), "utf-8"
    )
    return path


def test_predict_text_writes_results_built_documents_and_triples(ckpt, entities, files, tmp_path, capsys):
    docs = load_documents(files["test"])
    src = write_jsonl(tmp_path / "in.jsonl", docs)
    out = tmp_path / "run" / "result.json"
    args = [
        "predict",
        "--text",
        str(src),
        "--entities",
        str(entities),
        "--stage1",
        str(ckpt),
        "--output",
        str(out),
    ]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "text:" in printed and "triples:" in printed
    built = read_json(docs_path(out))
    result = read_json(out)
    titles = [d["title"] for d in built]
    assert set(titles) <= {d.title for d in docs}
    lines = [json.loads(x) for x in triples_path(out).read_text("utf-8").splitlines()]
    assert [x["title"] for x in lines] == titles
    assert sum(len(x["triples"]) for x in lines) == len(
        {(p["title"], p["h_idx"], p["t_idx"], p["r"]) for p in result}
    )
    for line, raw in zip(lines, built):
        for tr in line["triples"]:
            for side in ("head", "tail"):
                for m in tr[side]["mentions"]:
                    assert raw["text"][m["start"] : m["end"]] == m["text"]
    summary = read_json(out.with_name("result.summary.json"))
    assert summary["text_input"]["build"]["documents"] == len(built)
    # lmrc show finds the documents built from the text beside the result; no gold, so no scores
    assert main(["show", str(out)]) == 0
    with browser() as driver:
        open_page(driver, out.with_name("result.report.html"))
        assert console_errors(driver) == []
        assert len(driver.find_elements(By.CSS_SELECTOR, "#doc-list li")) == len(built)
        predicted = driver.find_element(By.CSS_SELECTOR, '#score-table td[data-count="predicted"]').text
        assert int(predicted) == len(result)
        assert "no gold relations" in driver.find_element(By.ID, "scores").text
    # --resume reuses the built documents and gives the same files
    before = out.read_bytes(), triples_path(out).read_bytes(), docs_path(out).stat().st_mtime_ns
    assert main(args + ["--resume"]) == 0
    assert (out.read_bytes(), triples_path(out).read_bytes(), docs_path(out).stat().st_mtime_ns) == before
    # shards: each shard's triples are its own documents; together they are the whole run's
    lines_by_shard = []
    for i in range(2):
        o = tmp_path / f"shard{i}" / "r.json"
        assert main(args[:-1] + [str(o), "--shard", f"{i}/2", "--set", "docs_per_batch=2"]) == 0
        lines_by_shard += triples_path(o).read_text("utf-8").splitlines()
    assert [json.loads(x)["title"] for x in lines_by_shard] == titles


def test_triples_name_heads_tails_relations_and_shared_sentences():
    raw = {
        "title": "T",
        "text": "Ada met Bob. Bob lives in Rome. Ada left.",
        "sents": [["Ada", "met", "Bob", "."], ["Bob", "lives", "in", "Rome", "."], ["Ada", "left", "."]],
        "token_offsets": [[[0, 3], [4, 7], [8, 11], [11, 12]], [[13, 16], [17, 22], [23, 25], [26, 30], [30, 31]],
                          [[32, 35], [36, 40], [40, 41]]],
        "vertexSet": [
            [{"name": "Ada", "sent_id": 0, "pos": [0, 1], "type": "PER"}, {"name": "Ada", "sent_id": 2, "pos": [0, 1], "type": "PER"}],
            [{"name": "Bob", "sent_id": 0, "pos": [2, 3], "type": "PER"}, {"name": "Bob", "sent_id": 1, "pos": [0, 1], "type": "PER"}],
            [{"name": "Rome", "sent_id": 1, "pos": [3, 4], "type": "LOC"}],
        ],
    }  # fmt: skip
    line = document_triples(raw, [{"title": "T", "h_idx": 1, "t_idx": 2, "r": "P551"},
                                  {"title": "T", "h_idx": 0, "t_idx": 2, "r": "P27"}], {"P551": "residence"})  # fmt: skip
    first, second = line["triples"]
    assert first["head"]["name"] == "Ada" and first["relation_name"] == "P27" and first["sentences"] == []
    assert [(m["start"], m["end"]) for m in first["head"]["mentions"]] == [(0, 3), (32, 35)]
    assert second["head"]["name"] == "Bob" and second["tail"]["type"] == "LOC"
    assert second["relation"] == "P551" and second["relation_name"] == "residence"
    assert second["sentences"] == [{"id": 1, "start": 13, "end": 31, "text": "Bob lives in Rome."}]


def test_oracle_entities_score_strict_as_the_gold_documents(ckpt, files, tmp_path, capsys):
    """With the gold entities as the oracle, on documents whose mentions all sit on token boundaries, the built
    entities are the gold ones: strict = lenient = the plain comparison of triples with the gold facts."""
    docs = [d for d in load_documents(files["test"]) if all(
        is_exact(segment(gold_of(d).text), m.span) for e in gold_of(d).entities for m in e)]  # fmt: skip
    assert docs
    gold = tmp_path / "gold.json"
    gold.write_text(json.dumps([json.loads(json.dumps(_raw(d))) for d in docs]), "utf-8")
    src = write_jsonl(tmp_path / "in.jsonl", docs)
    out = tmp_path / "r.json"
    assert main(["predict", "--text", str(src), "--entities", f"gold:{gold}", "--stage1", str(ckpt), "--output",
                 str(out)]) == 0  # fmt: skip
    score_file = tmp_path / "s.json"
    assert main(["entities", "score", "--result", str(out), "--built", str(docs_path(out)), "--gold", str(gold),
                 "--output", str(score_file)]) == 0  # fmt: skip
    s = read_json(score_file)
    facts = {(d.title, f.h, f.t, f.r) for d in docs for f in d.facts}
    preds = {(p["title"], p["h_idx"], p["t_idx"], p["r"]) for p in read_json(out)}
    for k in ("strict", "lenient"):
        assert (
            s[k]["right"] == len(preds & facts)
            and s[k]["predicted"] == len(preds)
            and s[k]["gold"] == len(facts)
        )
    assert "strict" in capsys.readouterr().out


def _raw(d):

    return document_to_raw(d)


def test_entity_model_finds_entities_and_resumes_to_the_same_model(files, entities, tmp_path):

    model = EntityModel.load(entities)
    doc = load_documents(files["test"])[0]
    seg = segment(gold_of(doc).text)
    found = model.find(seg)
    for ent in found:
        assert len({m.type for m in ent}) == 1
        for m in ent:
            assert 0 <= m.start < m.end <= len(seg.sents[m.sent])
    # two epochs at once, and one epoch + --resume, give the same weights and threshold
    tiny = read_json(entities / "entities.json")
    enc = (entities / "config.yaml").read_text()
    encoder = next(line.split(": ", 1)[1] for line in enc.splitlines() if line.strip().startswith("encoder:"))
    keys = [f"model.encoder={encoder}", f"data.train={files['train']}", f"data.tune={files['tune']}",
            "train.epochs=2", "train.max_tokens=64", "coref.steps=20"]  # fmt: skip
    cfg = load_config(EntitiesConfig, None, keys)
    whole = train(cfg, tmp_path / "whole")
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "part", stop_after_epochs=1)
    assert (tmp_path / "part" / "state" / "trainer.json").is_file()
    with pytest.raises(Exception, match="--resume"):
        train(cfg, tmp_path / "part")
    part = train(cfg, tmp_path / "part", resume=True)
    from safetensors.torch import load_file

    a = load_file(str(whole / "tagger" / "model.safetensors"))
    b = load_file(str(part / "tagger" / "model.safetensors"))
    assert a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a)
    assert read_json(whole / "entities.json")["coref"] == read_json(part / "entities.json")["coref"]
    assert tiny["labels"][0] == "O"


def test_cli_train_refuses_a_finished_run_without_resume(entities, capsys):
    code = main(
        ["entities", "train", "--config", str(entities / "config.yaml"), "--output-dir", str(entities)]
    )
    assert code == 2
    assert "holds an entity-model run" in capsys.readouterr().err


def test_text_with_no_model_trains_the_default_models_once_then_reuses_them(
    files, tmp_path, monkeypatch, capsys
):
    """`lmrc predict --text my.txt --show`: the first run trains the default entity model and stage 1 into the lmrc
    cache (here with a tiny encoder and one epoch on 6 short documents, the plumbing of the real recipe), a
    second run reuses them without training, and both write the page."""
    from stage1_run_helpers import save_tiny_bert

    from lmrc.predict import default_models

    tiny = save_tiny_bert(tmp_path / "tiny-bert")
    train = tmp_path / "train_450.json"
    train.write_text(json.dumps(read_json(files["train"]) + read_json(files["tune"])), encoding="utf-8")
    monkeypatch.setenv("LMRC_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(default_models, "training_data", lambda: (train, files["rel_info"]))
    ent = json.loads(json.dumps(default_models.ENTITY_SETTINGS))
    ent["model"]["encoder"] = str(tiny)
    ent["train"].update(epochs=2, patience=1, max_tokens=64)
    ent["coref"]["steps"] = 20
    s1 = json.loads(json.dumps(default_models.STAGE1_SETTINGS))
    s1["model"].update(encoder=str(tiny), emb_size=64, block_size=16, n_layers_avg=1)
    s1["train"].update(epochs=1, batch_size=2, mixed_precision="no")
    monkeypatch.setattr(default_models, "ENTITY_SETTINGS", ent)
    monkeypatch.setattr(default_models, "STAGE1_SETTINGS", s1)

    text = tmp_path / "my.txt"
    text.write_text(
        "Ada Lovelace was born in London. She worked with Charles Babbage in London.", encoding="utf-8"
    )
    assert main(["predict", "--text", str(text), "--show"]) == 0
    first = capsys.readouterr().out
    assert "first run: training the default entity model and stage 1 once" in first and "expected" in first
    result = tmp_path / "my.result.json"  # the default output, beside the text
    assert result.is_file() and (tmp_path / "my.result.report.html").is_file() and "done in" in first
    _, ent_dir, s1_dir = default_models.model_folders(train)
    assert (ent_dir / "entities.json").is_file() and (s1_dir / "best").is_dir()
    stamp = (s1_dir / "best").stat().st_mtime_ns
    assert main(["predict", "--text", str(text), "--output", str(tmp_path / "again.json")]) == 0
    second = capsys.readouterr().out
    assert "first run" not in second and (s1_dir / "best").stat().st_mtime_ns == stamp
    assert (tmp_path / "again.json").read_bytes() == result.read_bytes()
    summary = read_json(tmp_path / "again.summary.json")
    assert summary["fingerprint"]["stage1"]["checkpoint"].startswith(str(s1_dir))
    # a new stage-1 recipe trains stage 1 anew and reuses the entity model
    s1["train"]["epochs"] = 2
    assert main(["predict", "--text", str(text), "--output", str(tmp_path / "third.json")]) == 0
    third = capsys.readouterr().out
    assert (
        "first run: training the default stage 1 once" in third and "entity model" not in third.split("(")[0]
    )
    assert default_models.model_folders(train)[1] == ent_dir


def test_without_training_data_the_default_models_say_how_to_get_it(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("LMRC_DATA_DIR", raising=False)
    monkeypatch.setenv("LMRC_CACHE", str(tmp_path / "cache"))
    text = tmp_path / "a.txt"
    text.write_text("Ada Lovelace was born in London.", encoding="utf-8")
    assert main(["predict", "--text", str(text)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lmrc: error: ") and err.count("\n") == 1
    assert "scripts/demo_data.sh" in err and "--entities and --stage1" in err
    assert not (tmp_path / "a.result.json").exists()
