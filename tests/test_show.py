"""`lmrc show`: the page's data is the scorer's, and the page works in a real browser (headless Chromium).

Checked in the browser: no console errors; the counts in the DOM (score table, and the rows of every document once
opened) equal lmrc's scorer; a click on a row outlines exactly its head's and tail's mentions and its evidence
sentences; the filters and the search change what is visible; markup in a document or an LLM answer stays text.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from browser_helpers import browser, console_errors, open_page
from pipeline_helpers import FAST_GENERATION, adapter, data_files, stage1_checkpoint
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select
from stage1_run_helpers import single_thread  # noqa: F401  (autouse fixture)

from lmrc.cli import main
from lmrc.data.docred import load_documents
from lmrc.eval.metrics import evaluate, load_predictions
from lmrc.io import read_json
from lmrc.show import collect
from lmrc.show.page import render, script_json


@pytest.fixture(scope="module")
def files(redocred_dir, cache_dir):
    return data_files(redocred_dir)


def _predictions(docs) -> list[dict]:
    """Right ones (every other gold fact), wrong ones (a gold pair with another relation), a duplicate, an
    invalid pair and an unknown title: each case the scorer counts."""
    preds = []
    for d in docs:
        facts = list(d.facts)
        for f in facts[::2]:
            preds.append(
                {"title": d.title, "h_idx": f.h, "t_idx": f.t, "r": f.r, "evidence": list(f.evidence)}
            )
        f = facts[0]
        wrong = next(
            r for r in ("P17", "P131", "P27", "P569") if (f.h, f.t, r) not in {(g.h, g.t, g.r) for g in facts}
        )
        preds.append({"title": d.title, "h_idx": f.h, "t_idx": f.t, "r": wrong})
    preds.append(dict(preds[0]))  # a duplicate: counted once
    preds.append({"title": docs[0].title, "h_idx": 0, "t_idx": 0, "r": "P17"})  # invalid: h == t
    preds.append({"title": "no such document", "h_idx": 0, "t_idx": 1, "r": "P17"})
    return preds


@pytest.fixture(scope="module")
def handmade(files, tmp_path_factory):
    """A result file written by hand beside 5 real labelled documents (no summary, no progress file)."""
    root = tmp_path_factory.mktemp("show")
    docs = load_documents(files["test"])[:5]
    result = root / "result.json"
    result.write_text(json.dumps(_predictions(docs)), encoding="utf-8")
    return {"result": result, "docs": files["test"], "n": len(load_documents(files["test"]))}


def test_the_pages_marks_are_the_scorers_matches(handmade, files):
    source = collect.from_predict_run(handmade["result"], handmade["docs"], rel_info=files["rel_info"])
    data = collect.payload(source)
    docs = load_documents(handmade["docs"])
    m = evaluate(load_predictions(handmade["result"]), docs)
    s = data["methods"][0]["scores"]["relation"]
    assert (s["correct"], s["predicted"], s["gold"]) == (
        m.relation.correct,
        m.relation.predicted,
        m.relation.gold,
    )
    marks = {"right": 0, "wrong": 0, "missed": 0}
    for d in data["docs"]:
        for f in d["facts"]:
            found = "0" in f["m"]
            marks["right"] += f["gold"] and found
            marks["wrong"] += (not f["gold"]) and found
            marks["missed"] += f["gold"] and not found
    assert marks["right"] == m.relation.correct > 0
    assert marks["missed"] == m.relation.gold - m.relation.correct
    # wrong rows: every unique wrong prediction of a known document (the invalid pair included)
    assert marks["wrong"] == m.relation.predicted - m.relation.correct - m.counts.unknown_title
    assert m.counts.unknown_title == data["methods"][0]["unknown_titles"] == 1
    assert data["relations"]["P17"] == "country"
    assert data["methods"][0]["scores"]["per_relation"]["P17"]["gold"] == m.per_relation["P17"].gold


def test_json_in_the_page_cannot_close_its_script_block():
    nasty = {"title": "</script><script>alert(1)</script><!--", "sep": "a\u2028b\u2029c & d"}
    text = script_json(nasty)
    assert "<" not in text and ">" not in text and "&" not in text and "\u2028" not in text
    assert json.loads(text) == nasty
    page = render({"methods": [{"name": "<b>x</b>"}], **nasty})
    assert page.count("</script>") == 2 and "<title>lmrc show: &lt;b&gt;x&lt;/b&gt;</title>" in page


def _dom_marks(driver, n_docs: int, method: int = 0) -> dict[str, int]:
    total = {"right": 0, "wrong": 0, "missed": 0, "found": 0}
    for i in range(n_docs):
        driver.find_element(By.CSS_SELECTOR, f'#doc-list li[data-doc="{i}"]').click()
        for cell in driver.find_elements(By.CSS_SELECTOR, f'#fact-table td[data-m="{method}"]'):
            status = cell.get_attribute("data-status")
            if status:
                total[status] += 1
    return total


def _score_cell(driver, method: int, count: str) -> int:
    return int(
        driver.find_element(
            By.CSS_SELECTOR, f'#score-table tr[data-m="{method}"] td[data-count="{count}"]'
        ).text
    )


def test_the_page_in_a_browser_counts_highlights_filters_and_searches(handmade, files, tmp_path):
    page = tmp_path / "page.html"
    args = [
        "show",
        str(handmade["result"]),
        "--docs",
        str(handmade["docs"]),
        "--rel-info",
        str(files["rel_info"]),
    ]
    assert main([*args, "--output", str(page)]) == 0
    assert main([*args, "--output", str(page)]) == 2  # exists: --overwrite replaces it
    docs = load_documents(handmade["docs"])
    m = evaluate(load_predictions(handmade["result"]), docs)
    with browser() as driver:
        open_page(driver, page)
        assert console_errors(driver) == []
        assert _score_cell(driver, 0, "right") == m.relation.correct
        assert _score_cell(driver, 0, "wrong") == m.relation.predicted - m.relation.correct
        assert _score_cell(driver, 0, "missed") == m.relation.gold - m.relation.correct
        assert f"{100 * m.relation.f1:.2f}" in driver.find_element(By.ID, "score-table").text
        marks = _dom_marks(driver, len(docs))
        assert marks["right"] == m.relation.correct
        assert marks["missed"] == m.relation.gold - m.relation.correct
        assert marks["wrong"] == m.relation.predicted - m.relation.correct - m.counts.unknown_title

        # a click outlines the head's and the tail's mentions, and the evidence sentences
        driver.find_element(By.CSS_SELECTOR, '#doc-list li[data-doc="0"]').click()
        doc = docs[0]
        fact = next(f for f in doc.facts if f.evidence)
        row = driver.find_element(
            By.CSS_SELECTOR, f'tr.fact[data-h="{fact.h}"][data-t="{fact.t}"][data-rel="{fact.r}"]'
        )
        row.click()
        heads = driver.find_elements(By.CSS_SELECTOR, ".ment.hl-h")
        tails = driver.find_elements(By.CSS_SELECTOR, ".ment.hl-t")
        assert {e.get_attribute("data-entity") for e in heads} == {str(fact.h)}
        assert {e.get_attribute("data-entity") for e in tails} == {str(fact.t)}
        assert len(heads) == len(doc.entities[fact.h].mentions) and len(tails) == len(
            doc.entities[fact.t].mentions
        )
        lit = {int(e.get_attribute("data-sent")) for e in driver.find_elements(By.CSS_SELECTOR, ".sent.hl-s")}
        assert set(fact.evidence) <= lit
        assert doc.entities[fact.h].mentions[0].name in driver.find_element(By.ID, "pair-panel").text

        # filters: only the missed rows, then only one relation
        visible = lambda: [r for r in driver.find_elements(By.CSS_SELECTOR, "tr.fact") if r.is_displayed()]  # noqa: E731
        n_rows = len(visible())
        Select(driver.find_element(By.ID, "f-status")).select_by_value("missed")
        missed = visible()
        assert 0 < len(missed) < n_rows
        assert all(
            r.find_element(By.CSS_SELECTOR, 'td[data-m="0"]').get_attribute("data-status") == "missed"
            for r in missed
        )
        Select(driver.find_element(By.ID, "f-status")).select_by_value("")
        Select(driver.find_element(By.ID, "f-rel")).select_by_value(fact.r)
        assert {r.get_attribute("data-rel") for r in visible()} == {fact.r}
        data = collect.payload(collect.from_predict_run(handmade["result"], handmade["docs"]))
        assert len(visible()) == sum(1 for f in data["docs"][0]["facts"] if f["r"] == fact.r)

        # search by an entity name of the third document only
        name = next(
            m.name for e in docs[2].entities for m in e.mentions
            if all(m.name.lower() not in (d.title + " " + " ".join(x.name for en in d.entities for x in en.mentions)).lower()
                   for k, d in enumerate(docs) if k != 2)
        )  # fmt: skip
        driver.find_element(By.ID, "search").send_keys(name)
        shown = [
            li.get_attribute("data-doc")
            for li in driver.find_elements(By.CSS_SELECTOR, "#doc-list li")
            if li.is_displayed()
        ]
        assert shown == ["2"]
        assert console_errors(driver) == []


def test_markup_in_documents_and_answers_is_shown_as_text_and_never_runs(tmp_path):
    evil = "</script><script>window.__pwned = 1</script>"
    doc = {
        "title": evil,
        "sents": [["<img", "src=x", "onerror=window.__pwned=2>", "met", "Bob", "."]],
        "vertexSet": [
            [{"name": "<img src=x onerror=window.__pwned=3>", "sent_id": 0, "pos": [0, 3], "type": "<b>"}],
            [{"name": "Bob", "sent_id": 0, "pos": [4, 5], "type": "PER"}],
        ],
        "labels": [{"h": 0, "t": 1, "r": "P<i>", "evidence": [0]}],
    }
    docs = tmp_path / "docs.json"
    docs.write_text(json.dumps([doc]), encoding="utf-8")
    result = tmp_path / "result.json"
    result.write_text(
        json.dumps([{"title": evil, "h_idx": 1, "t_idx": 0, "r": "<svg onload=window.__pwned=4>"}])
    )
    progress = tmp_path / "result.progress.jsonl"
    answer = "(<img src=x onerror=window.__pwned=5>| <b>bold</b>| Bob)"
    record = {"title": evil, "index": 0, "candidates": [[1, 0, 0.5, {}]],
              "raw": [{"pairs": [[1, 0]], "text": answer, "lines": [["<img>", "<b>", "Bob", 1, 0, None, "out_of_set_relation"]], "hit_limit": False}]}  # fmt: skip
    progress.write_text(
        json.dumps({"header": 1}) + "\n" + json.dumps({"batch": 0, "documents": [record]}) + "\n"
    )
    (tmp_path / "result.summary.json").write_text(
        json.dumps({"mode": "classifier-llm", "machine": "<u>m</u>"})
    )
    page = tmp_path / "page.html"
    assert main(["show", str(result), "--docs", str(docs), "--output", str(page)]) == 0
    with browser() as driver:
        open_page(driver, page)
        assert driver.execute_script("return window.__pwned === undefined")
        assert driver.find_element(By.ID, "doc-title").text == evil
        text = driver.find_element(By.ID, "doc-text").text
        assert "<img src=x onerror=window.__pwned=2>" in text and "<b>" in text and " met Bob" in text
        assert driver.find_elements(By.CSS_SELECTOR, "#doc-view img, #doc-view svg, #doc-view b") == []
        driver.find_element(By.CSS_SELECTOR, 'tr.fact[data-h="1"]').click()
        assert answer in driver.find_element(By.ID, "pair-panel").text
        assert "Machine: <u>m</u>" in driver.find_element(By.ID, "header").text
        assert driver.execute_script("return window.__pwned === undefined")
        assert console_errors(driver) == []


@pytest.mark.slow
def test_predict_show_writes_the_page_with_the_llms_answers_and_their_fates(
    redocred_dir, files, tmp_path, capsys
):
    ckpt, rc = stage1_checkpoint(redocred_dir), adapter(redocred_dir, "rc")
    out = tmp_path / "result.json"
    assert main(["predict", "--input", str(files["test"]), "--output", str(out), "--stage1", str(ckpt),
                 "--stage2", str(rc), "--max-per-doc", "3", "--show", "--set", f"stage2.overrides={json.dumps(FAST_GENERATION)}"]) == 0  # fmt: skip
    page = out.with_name("result.report.html")
    assert f"page: {page}" in capsys.readouterr().out
    summary = read_json(out.with_name("result.summary.json"))
    assert summary["machine"] and summary["relation_names"]["P17"] == "country"
    # the progress file keeps what became of each parsed answer line
    records = [json.loads(x) for x in out.with_name("result.progress.jsonl").read_text().splitlines()[1:]]
    prompts = [p for batch in records for d in batch["documents"] for p in d["raw"]]
    assert prompts and all({"pairs", "text", "lines", "hit_limit"} <= set(p) for p in prompts)
    with browser() as driver:
        open_page(driver, page)
        assert console_errors(driver) == []
        assert summary["machine"] in driver.find_element(By.ID, "header").text
        docs = load_documents(files["test"])
        m = evaluate(load_predictions(out), docs)
        assert _dom_marks(driver, len(docs))["missed"] == m.relation.gold - m.relation.correct
        # a candidate pair's row names its stage-1 score and the LLM's answer about it
        driver.find_element(By.CSS_SELECTOR, '#doc-list li[data-doc="0"]').click()
        answers = driver.find_elements(By.CSS_SELECTOR, "details.answers")
        assert answers and re.search(r"\d+ prompts", answers[0].text)


def test_an_unlabelled_run_is_scored_against_gold_given_later(handmade, files, tmp_path):
    """The run read unlabelled documents: no scores; with --gold (the same titles, labelled) the page scores it
    as `lmrc evaluate` would."""
    args = ["show", str(handmade["result"]), "--docs", str(files["unlabelled"])]
    assert main([*args, "--output", str(tmp_path / "plain.html")]) == 0
    assert main([*args, "--gold", str(files["test"]), "--output", str(tmp_path / "gold.html")]) == 0
    plain = collect.payload(collect.from_predict_run(handmade["result"], files["unlabelled"]))
    assert plain["labelled"] is False and plain["methods"][0]["scores"] is None
    m = evaluate(load_predictions(handmade["result"]), load_documents(files["test"]))
    with browser() as driver:
        open_page(driver, tmp_path / "plain.html")
        assert (
            console_errors(driver) == [] and "no gold relations" in driver.find_element(By.ID, "scores").text
        )
        assert {
            c.get_attribute("data-status") for c in driver.find_elements(By.CSS_SELECTOR, "td[data-m]")
        } <= {"found", ""}
        open_page(driver, tmp_path / "gold.html")
        assert _score_cell(driver, 0, "right") == m.relation.correct
        assert _score_cell(driver, 0, "missed") == m.relation.gold - m.relation.correct


def test_a_compare_configs_training_path_with_variables_is_found(files, tmp_path, monkeypatch):
    """compare keeps `${LMRC_DATA_DIR}/...` in its config; the page must expand it, or Ign F1 silently equals F1."""
    monkeypatch.setenv("LMRC_SHOW_TEST_DIR", str(Path(files["train"]).parent))
    ref = collect._train_reference("${LMRC_SHOW_TEST_DIR}/" + Path(files["train"]).name)
    assert ref is not None and ref.relation_counts
    assert collect._train_reference("${LMRC_SHOW_NOT_SET}/x.json") is None
