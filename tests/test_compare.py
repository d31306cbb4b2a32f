"""`lmrc compare` on tiny random models and real documents: every mode on the same documents, rows scored
independently, pictures, reuse of finished parts, and training from configs (the `make demo` path)."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import yaml
from browser_helpers import browser, console_errors, open_page
from pipeline_helpers import FAST_GENERATION, adapter, data_files, stage1_checkpoint
from selenium.webdriver.common.by import By
from stage1_run_helpers import save_tiny_bert, single_thread  # noqa: F401  (autouse fixture)
from stage2_helpers import tiny_model_dir

from lmrc.cli import main
from lmrc.data.docred import load_documents
from lmrc.eval.metrics import TrainReference, evaluate, load_predictions
from lmrc.experiments import jobs
from lmrc.experiments.compare import load_compare_config
from lmrc.io import read_json


@pytest.fixture(scope="module")
def models(redocred_dir, cache_dir):
    files = data_files(redocred_dir)
    return {
        "files": files,
        "stage1": stage1_checkpoint(redocred_dir),
        "rc": adapter(redocred_dir, "rc"),
        "direct": adapter(redocred_dir, "direct"),
    }


def _write(path, data) -> str:
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_compare_reuses_models_scores_every_mode_and_draws(models, tmp_path, capsys):
    files = models["files"]
    config = {
        "eval": {"docs": str(files["test"]), "max_docs": 4, "train": str(files["train"])},
        "stage1": {"path": str(models["stage1"])},
        "rc": {"path": str(models["rc"])},
        "direct": {"path": str(models["direct"])},
        "candidates": {"max_per_doc": 4},
        "variants": [
            {"name": "classifier-llm + constrained", "set": ["stage2.overrides.generation.constrained=true"]},
            {"name": "classifier-llm + refine", "set": ["fusion=refine", "refine.upper=0.0"]},
        ],
        "stage2_overrides": FAST_GENERATION,
        "thetas": [0.5, 0.9],
        "candidate_points": 3,
        "docs_per_batch": 2,
    }
    out = tmp_path / "cmp"
    assert main(["compare", "--config", _write(tmp_path / "c.yaml", config), "--output-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    results = read_json(out / "results.json")
    labels = [r["label"] for r in results["rows"]]
    assert labels == [
        "stage1-only", "direct", "direct + SBERT", "classifier-llm", "classifier-llm + SBERT",
        "classifier-llm + constrained", "classifier-llm + constrained + SBERT",
        "classifier-llm + refine", "classifier-llm + refine + SBERT",
    ]  # fmt: skip
    assert all(label in printed for label in labels) and "results.md" in printed
    # each row is the official scorer on that mode's result file, recomputed here
    docs = load_documents(out / "data" / "eval.json")
    assert len(docs) == 4
    ref = TrainReference.from_documents(load_documents(files["train"]))
    for row, path in zip(
        results["rows"],
        [
            "stage1-only.json",
            "direct.strict.json",
            "direct.json",
            "classifier-llm.strict.json",
            "classifier-llm.json",
        ],
    ):
        m = evaluate(load_predictions(out / "runs" / path), docs, ref)
        assert row["f1"] == pytest.approx(m.relation.f1) and row["predicted"] == m.relation.predicted
        assert row["ign_f1"] == pytest.approx(m.ign.f1)
    rows = {r["label"]: r for r in results["rows"]}
    assert rows["stage1-only"]["llm_prompts_per_doc"] == 0
    assert rows["direct"]["prompt_tokens_per_doc"] > rows["classifier-llm"]["prompt_tokens_per_doc"] > 0
    assert results["stage1_candidates"]["candidates"] <= 4 * 4
    # theta sweep from the saved raw answers; candidate curve is monotone in the share of pairs kept
    assert set(results["theta"]["f1"]) == {
        "direct",
        "classifier-llm",
        "classifier-llm + constrained",
        "classifier-llm + refine",
    }
    constrained = rows["classifier-llm + constrained"]
    # (unparsed lines can remain: this test's 12-token budget cuts answers mid-line)
    assert constrained["out_of_set_relations"] == constrained["placeholder_echoes"] == 0
    # the answers table: what reached the LLM, from each run's summary
    for label in ("direct", "classifier-llm", "classifier-llm + refine"):
        llm = read_json(out / "runs" / f"{label.replace(' + ', '___')}.summary.json")["llm"]
        assert rows[label]["pairs_asked"] == llm["pairs_asked"]
    assert rows["classifier-llm"]["share_of_candidates_to_llm"] == pytest.approx(1.0)
    refine = rows["classifier-llm + refine"]
    assert refine["share_of_candidates_to_llm"] == pytest.approx(
        refine["pairs_asked"] / results["stage1_candidates"]["candidates"]
    )
    assert (
        refine["pairs_asked"] + refine["pairs_kept_by_stage1"] <= results["stage1_candidates"]["candidates"]
    )
    assert "LLM answers (totals)" in printed
    # refine with upper 0: every candidate with a stage-1 relation skips the LLM
    assert (
        rows["classifier-llm + refine"]["prompt_tokens_per_doc"]
        <= rows["classifier-llm"]["prompt_tokens_per_doc"]
    )
    curve = results["candidate_curve"]
    assert [p["share_of_pairs"] for p in curve] == sorted(p["share_of_pairs"] for p in curve)
    assert [p["recall"] for p in curve] == sorted(p["recall"] for p in curve)
    assert curve[-1]["share_of_pairs"] == pytest.approx(1.0) and curve[-1]["recall"] == pytest.approx(1.0)
    for name in ("per_relation.png", "theta.png", "candidates.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "results.md").read_text()
    assert "| classifier-llm + SBERT |" in md and "reduction ratio" in md
    answers = md.split("What the LLM was asked")[1]
    assert "| classifier-llm + constrained |" in answers and "| stage1-only |" not in answers
    assert "+ SBERT |" not in answers  # one row per LLM run
    # every row's bootstrap interval contains its F1; the others are compared with stage1-only, paired
    assert all(r["f1_interval"][0] <= r["f1"] <= r["f1_interval"][1] for r in results["rows"])
    assert "delta_f1" not in rows["stage1-only"]
    for r in results["rows"]:
        if r["label"] != "stage1-only":
            assert r["delta_f1"] == pytest.approx(r["f1"] - rows["stage1-only"]["f1"])
            assert r["delta_interval"][0] <= r["delta_interval"][1]
    noise = md.split("Noise:")[1].split("What the LLM was asked")[0]
    assert all(f"| {r['label']} |" in noise for r in results["rows"]) and "noise (paired bootstrap" in printed

    # report.html: every row side by side, its counts the scorer's, in a real browser
    with browser() as driver:
        open_page(driver, out / "report.html")
        assert console_errors(driver) == []
        score_rows = driver.find_elements(By.CSS_SELECTOR, "#score-table tr[data-m]")
        assert [r.find_element(By.TAG_NAME, "td").text for r in score_rows] == labels
        for i, row in enumerate(results["rows"]):
            m = evaluate(load_predictions(out / row["result"]), docs, ref)
            cell = score_rows[i].find_element(By.CSS_SELECTOR, 'td[data-count="right"]')
            assert int(cell.text) == m.relation.correct
        header = [th.text for th in driver.find_elements(By.CSS_SELECTOR, "#fact-table th")]
        assert all(label in header for label in labels)
        assert driver.find_elements(By.CSS_SELECTOR, "details.answers")  # the LLM rows' raw answers

    # a second run reuses every finished part: no document is predicted again
    def result_files():
        return {p.name: p.read_bytes() for p in (out / "runs").glob("*.json") if "summary" not in p.name}

    before, peaks = result_files(), {r["label"]: r["peak_rss_gib"] for r in results["rows"]}
    assert main(["compare", "--config", str(tmp_path / "c.yaml"), "--output-dir", str(out)]) == 0
    assert result_files() == before
    # the peak memory reported is the one of the run that did the work
    assert {r["label"]: r["peak_rss_gib"] for r in read_json(out / "results.json")["rows"]} == peaks
    for mode in ("stage1-only", "direct", "classifier-llm", "classifier-llm___refine"):
        assert read_json(out / "runs" / f"{mode}.summary.json")["documents_this_run"] == 0


def test_compare_trains_missing_models_from_configs(redocred_dir, cache_dir, tmp_path, capsys, monkeypatch):
    """The `make demo` path: configs/demo.yaml's rows and candidates on tiny models, a data split made by compare,
    stage 1 and both adapters trained, same token budget; and the learning curve."""
    demo = yaml.safe_load((Path(__file__).parents[1] / "configs" / "demo.yaml").read_text())
    assert demo["sbert"] is False and "modes" not in demo  # every mode, strict rows only
    files = data_files(redocred_dir)
    encoder = save_tiny_bert(tmp_path / "bert")
    stage1 = {
        "model": {"encoder": str(encoder), "emb_size": 64, "block_size": 16},
        "data": {"rel_info": str(files["rel_info"])},
        "train": {"epochs": 1, "batch_size": 2, "mixed_precision": "no", "log_every_steps": 0},
    }
    llm = {
        "model": str(tiny_model_dir()),
        "max_seq_len": 1024,
        "dtype": "float32",
        "data": {"rel_info": str(files["rel_info"])},
        "train": {"max_tokens": 3000, "warmup_steps": 0, "batch_size": 1},
    }
    config = {
        "eval": {"docs": str(files["test"]), "max_docs": 2, "train": str(files["train"])},
        "data": {"train": str(files["train"]), "tune_fraction": 0.25},
        "stage1": {"config": _write(tmp_path / "s1.yaml", stage1)},
        "rc": {"config": _write(tmp_path / "rc.yaml", llm)},
        "direct": {"config": _write(tmp_path / "direct.yaml", llm)},
        # the demo's own choices (configs/demo.yaml): candidates, rows, batching; tiny models, fast generation
        "candidates": demo["candidates"],
        "variants": demo["variants"],
        "docs_per_batch": demo["docs_per_batch"],
        "sbert": demo["sbert"],
        "stage2_overrides": FAST_GENERATION,
        "thetas": [0.55],
        "candidate_points": 2,
        "learning_curve": {"budgets": [3000, 1000], "max_docs": 1},
    }
    out = tmp_path / "cmp"
    assert main(["compare", "--config", _write(tmp_path / "c.yaml", config), "--output-dir", str(out)]) == 0
    train = load_documents(out / "data" / "train.json")
    tune = load_documents(out / "data" / "tune.json")
    assert (len(train), len(tune)) == (3, 1)
    s1cfg = yaml.safe_load((out / "models" / "stage1" / "config.yaml").read_text())
    assert s1cfg["data"]["train"] == str(out / "data" / "train.json")
    # rc and direct trained to the same token budget: the first step that reaches it
    for kind in ("rc", "direct"):
        metrics = [json.loads(x) for x in (out / "models" / kind / "metrics.jsonl").read_text().splitlines()]
        assert metrics and read_json(out / "models" / kind / "train_summary.json")["finished"]
    docs = load_documents(out / "data" / "eval.json")
    ref = TrainReference.from_documents(load_documents(files["train"]))
    cal = read_json(out / "runs" / "classifier-llm.summary.json")["fingerprint"]["stage1"]
    methods = {"recall_target": "recall_target", "max_per_doc": "max_per_doc", "threshold": "manual"}
    expected = [m for key, m in methods.items() if demo["candidates"].get(key) is not None] or ["default"]
    assert cal["threshold_method"] == expected[0]
    results = read_json(out / "results.json")
    assert [r["label"] for r in results["rows"] if r["variant"] == "strict"] == [
        "stage1-only",
        "direct",
        "classifier-llm",
        "classifier-llm + constrained + refine + keep + gate",
    ]
    printed = capsys.readouterr().out
    assert "classifier-llm + constrained + refine + keep + gate" in printed and "machine: " in printed
    assert results["machine"] and f"Machine: {results['machine']}" in (out / "results.md").read_text()
    # the learning curve: an adapter per (kind, budget) with that token budget, each scored on the documents
    curve = results["learning_curve"]
    assert [(p["kind"], p["budget_tokens"]) for p in curve] == [
        ("rc", 1000),
        ("rc", 3000),
        ("direct", 1000),
        ("direct", 3000),
    ]
    for p in curve:
        name = f"curve-{p['kind']}-{p['budget_tokens']}"
        # the adapters' own budget (3,000 tokens) reuses them; the others are trained for the curve
        adapter = out / "models" / (p["kind"] if p["budget_tokens"] == 3000 else name)
        assert (out / "models" / name).exists() == (p["budget_tokens"] != 3000)
        cfg = yaml.safe_load((adapter / "config.yaml").read_text())
        assert cfg["train"]["max_tokens"] == p["budget_tokens"] and cfg["mode"] == p["kind"]
        summary = read_json(out / "runs" / f"{name}.summary.json")
        assert summary["llm"]["pairs_from"] == ("gold pairs" if p["kind"] == "rc" else "all pairs")
        assert summary["documents"] == p["documents"] == 1  # learning_curve.max_docs of the 2 documents
        m = evaluate(load_predictions(out / "runs" / f"{name}.json"), docs[:1], ref)
        assert p["f1"] == pytest.approx(m.relation.f1) and p["predicted"] == m.relation.predicted
        assert p["f1_interval"] == [pytest.approx(p["f1"])] * 2  # one document: the bootstrap has no spread
    assert (
        "learning curve" in printed and "| rc | gold pairs | 1 | 1,000 |" in (out / "results.md").read_text()
    )
    assert (out / "learning_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # a rerun finds every adapter finished with its settings without loading a model (their resumable state is
    # kept), and reuses every row and point; every adapter training goes through jobs.train_adapter
    assert (out / "models" / "rc" / "last").exists() and (out / "models" / "curve-rc-1000" / "last").exists()

    def no_training(*args, **kwargs):
        raise AssertionError("a finished adapter was trained again")

    monkeypatch.setattr(jobs, "train_adapter", no_training)
    assert main(["compare", "--config", _write(tmp_path / "c.yaml", config), "--output-dir", str(out)]) == 0
    assert read_json(out / "results.json")["rows"] == results["rows"]


def test_compare_config_refuses_unknown_modes():
    from lmrc.errors import LmrcError

    with pytest.raises(LmrcError, match="unknown mode 'llm-only'"):
        load_compare_config(None, ["modes=[llm-only]"])


def test_without_matplotlib_the_pictures_are_skipped_by_name(monkeypatch, tmp_path):
    from lmrc.data.relations import RelationSet
    from lmrc.experiments import plots

    monkeypatch.setattr(plots, "_pyplot", lambda: None)
    results = {
        "per_relation_f1": {"a": {"P1": 0.5}},
        "theta": {"f1": {}, "thetas": []},
        "candidate_curve": [],
    }
    drawn, skipped = plots.draw_all(tmp_path, results, RelationSet(("P1",), {"P1": "one"}))
    assert drawn == [] and skipped == [
        "per_relation.png",
        "theta.png",
        "candidates.png",
        "learning_curve.png",
    ]
    assert not list(tmp_path.iterdir())


def test_per_relation_f1_is_drawn_as_grouped_bars(monkeypatch, tmp_path):
    """One bar group per relation some row got right, one bar per row in it (no line across categories)."""
    from lmrc.data.relations import RelationSet
    from lmrc.experiments import plots

    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig) or path)
    results = {
        "per_relation_f1": {
            "stage1-only": {"P1": 0.5, "P2": 0.0, "P3": 0.0},
            "direct": {"P1": 0.25, "P2": 1.0},
        },
        "relation_train_counts": {"P1": 3, "P2": 9},
    }
    rels = RelationSet(("P1", "P2", "P3"), {"P1": "one", "P2": "two", "P3": "three"})
    assert plots.per_relation(plots._pyplot(), results, rels, tmp_path / "p.png") is not None
    (ax,) = figures[0].axes
    assert not ax.lines and len(ax.containers) == 2  # one bar series per row
    assert [len(c) for c in ax.containers] == [2, 2]  # P2, P1 (P3: nobody scored it)
    assert [t.get_text() for t in ax.get_yticklabels()] == ["two", "one"]  # by training frequency
    assert ax.get_ylim()[0] > ax.get_ylim()[1]  # the most frequent at the top
    lengths = [[b.get_width() for b in c] for c in ax.containers]  # horizontal bars: F1 is the bar's length
    assert lengths == [[0.0, 50.0], [100.0, 25.0]]
    # within a relation's group the rows' bars are side by side, in the legend's order, not on top of each other
    (two_a, one_a), (two_b, one_b) = ([b.get_y() for b in c] for c in ax.containers)
    assert two_a < two_b < one_a < one_b


def test_learning_curve_config_is_checked():
    from lmrc.errors import LmrcError

    with pytest.raises(LmrcError, match="budgets"):
        load_compare_config(None, ["learning_curve.budgets=[100, 100]"])
    with pytest.raises(LmrcError, match="kinds"):
        load_compare_config(None, ["learning_curve.kinds=[llm]"])


def test_learning_curve_snapshots_come_from_the_configs_own_adapter_run(redocred_dir, tmp_path):
    """learning_curve.adapters=snapshots: the config's own adapter keeps the smaller budgets on the way (one run,
    no token trained twice) and each point reads its snapshot; a budget above the adapter's is refused."""
    from lmrc.errors import LmrcError
    from lmrc.experiments.curve import curve_adapter
    from lmrc.experiments.data import DataFiles
    from lmrc.experiments.models import ensure_adapter, snapshot_overrides

    files = data_files(redocred_dir)
    llm = {
        "model": str(tiny_model_dir()),
        "max_seq_len": 1024,
        "dtype": "float32",
        "data": {"rel_info": str(files["rel_info"]), "train": str(files["train"])},
        "train": {"max_tokens": 3000, "warmup_steps": 0, "batch_size": 1},
    }
    rc = _write(tmp_path / "rc.yaml", llm)
    curve = [
        "learning_curve.budgets=[1000, 3000]",
        "learning_curve.kinds=[rc]",
        "learning_curve.adapters=snapshots",
    ]
    cfg = load_compare_config(None, [f"rc.config={rc}", *curve])
    assert snapshot_overrides("rc", cfg) == ["train.snapshot_tokens=[1000]"]
    assert snapshot_overrides("direct", cfg) == []  # not on the curve
    out, files = tmp_path / "cmp", DataFiles(eval=tmp_path / "unused.json")
    point = curve_adapter("rc", 1000, cfg, out, files)
    main_adapter = ensure_adapter("rc", cfg, out, files)  # finished: reused
    assert point == main_adapter / "snapshots" / "tokens-1000"
    meta, done = read_json(point / "train_summary.json"), read_json(main_adapter / "train_summary.json")
    assert 1000 <= meta["tokens_trained"] < done["tokens_trained"] and meta["steps"] < done["steps"]
    assert curve_adapter("rc", 3000, cfg, out, files) == main_adapter  # its own budget: the finished adapter
    assert not (out / "models" / "curve-rc-1000").exists()
    with pytest.raises(LmrcError, match="more than the rc adapter trains"):
        snapshot_overrides(
            "rc", load_compare_config(None, [f"rc.config={rc}", *curve[1:], "learning_curve.budgets=[9000]"])
        )
    with pytest.raises(LmrcError, match="adapters"):
        load_compare_config(None, ["learning_curve.adapters=some"])


def test_no_experiment_module_starts_lmrc_in_a_subprocess():
    """compare calls the library as functions (lmrc.experiments.jobs); a child process only through
    lmrc.experiments.isolate (multiprocessing), never a command line of lmrc or another program."""
    import lmrc.experiments

    starts_programs = {"system", "popen", "execv", "execvp", "execl", "spawnv", "spawnl", "executable"}
    for path in sorted(Path(lmrc.experiments.__file__).parent.glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        modules = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        modules |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        bad = {
            m
            for m in modules
            if m == "subprocess" or m.startswith(("lmrc.cli", "lmrc.commands", "lmrc.__main__"))
        }
        assert not bad, f"{path.name} imports {sorted(bad)}"
        attributes = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
        assert not attributes & starts_programs, f"{path.name} uses {sorted(attributes & starts_programs)}"
        strings = [
            n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
        ]
        assert not [s for s in strings if "lmrc.cli" in s or s == "-m"], f"{path.name} builds a command line"


def test_a_rows_candidate_rule_is_the_configs_candidate_settings(tmp_path):
    """`candidates` is stage 1's CandidateSettings: a classifier-llm row passes on what differs from the defaults,
    with the split's tuning file for a recall target unless a saved calibration is given; other rows none."""
    from lmrc.errors import LmrcError
    from lmrc.experiments.rows import row_settings

    models, tune = {"stage1": tmp_path / "s1", "rc": tmp_path / "rc"}, tmp_path / "tune.json"
    cfg = load_compare_config(None, ["candidates.recall_target=0.9", "candidates.batch_size=4"])
    assert row_settings(cfg, "classifier-llm", models, tune)["stage1"] == {
        "checkpoint": str(tmp_path / "s1"),
        "recall_target": 0.9,
        "batch_size": 4,
        "tune": str(tune),
    }
    assert row_settings(cfg, "stage1-only", models, tune)["stage1"] == {"checkpoint": str(tmp_path / "s1")}
    saved = load_compare_config(None, ["candidates.recall_target=0.9", "candidates.calibration=cal.json"])
    assert "tune" not in row_settings(saved, "classifier-llm", models, tune)["stage1"]
    with pytest.raises(LmrcError, match="choose one of"):
        load_compare_config(None, ["candidates.threshold=0.1", "candidates.max_per_doc=3"])
