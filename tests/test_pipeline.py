"""`lmrc predict` / `lmrc merge`: the pipeline end to end on tiny random models and real documents.

What is checked: each mode's output against the stages run on their own; kill-and-resume and shard-and-merge give
the bytes of one uninterrupted run; bad input is one clear line and leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pipeline_helpers import FAST_GENERATION, adapter, data_files, other_relation_set, stage1_checkpoint
from stage1_run_helpers import single_thread  # noqa: F401  (autouse fixture)

from lmrc.cli import main
from lmrc.config import load_config
from lmrc.data.candidates import load_candidates
from lmrc.data.docred import load_documents
from lmrc.errors import LmrcError
from lmrc.io import read_json, sidecar
from lmrc.predict import run as predict_run
from lmrc.predict.config import PredictConfig
from lmrc.predict.merge import merge
from lmrc.predict.run import Shard, run_pipeline
from lmrc.stage1.calibration import calibrate_additions, calibrate_upper
from lmrc.stage1.config import CandidateSettings
from lmrc.stage1.predict import predict as stage1_predict
from lmrc.stage2.generate import create_generator
from lmrc.stage2.modeling import load_adapter_config
from lmrc.stage2.predict import Stage2Runner


@pytest.fixture(scope="module")
def files(redocred_dir, cache_dir):
    return data_files(redocred_dir)


@pytest.fixture(scope="module")
def ckpt(redocred_dir, files):
    return stage1_checkpoint(redocred_dir)


@pytest.fixture(scope="module")
def rc(redocred_dir, files):
    return adapter(redocred_dir, "rc")


@pytest.fixture(scope="module")
def direct(redocred_dir, files):
    return adapter(redocred_dir, "direct")


def config(**keys) -> PredictConfig:
    """A PredictConfig from flat `a.b=value` keys, with the fast stage-2 settings."""
    overrides = [f"{k}={json.dumps(v)}" for k, v in keys.items()]
    cfg = load_config(PredictConfig, None, overrides)
    for section, values in FAST_GENERATION.items():
        cfg.stage2.overrides.setdefault(section, {}).update(values)
    return cfg


def llm_config(ckpt, rc, **keys) -> PredictConfig:
    return config(**{"stage1.checkpoint": str(ckpt), "stage2.adapter": str(rc), "docs_per_batch": 2, **keys})


# ------------------------------------------------------------------------------------------------ modes


def test_classifier_llm_asks_the_llm_exactly_about_the_stage1_candidates(ckpt, rc, files, tmp_path):
    out = tmp_path / "result.json"
    summary = run_pipeline(llm_config(ckpt, rc), files["test"], out, save_candidates=tmp_path / "c.json")
    assert summary["mode"] == "classifier-llm" and summary["documents"] == 7
    # stage 1 run on its own over the whole file proposes the same candidates as the streamed batches
    alone = stage1_predict(ckpt, files["test"], tmp_path / "alone.json").candidates
    streamed = load_candidates(tmp_path / "c.json")
    assert [(d.title, [(p.h, p.t) for p in d.pairs]) for d in streamed.documents] == [
        (d.title, [(p.h, p.t) for p in d.pairs]) for d in alone.documents
    ]
    for a, b in zip(alone.documents, streamed.documents):
        assert [p.score for p in b.pairs] == pytest.approx([p.score for p in a.pairs], abs=1e-5)
        assert [sorted(p.top) for p in b.pairs] == [sorted(p.top) for p in a.pairs]  # the best relations too
    n_cands = sum(len(d.pairs) for d in alone.documents)
    c = summary["candidates"]
    assert c["candidates"] == n_cands and c["reduction"] == pytest.approx(n_cands / c["pairs"])
    # the LLM saw every candidate pair once and nothing else
    records = [
        r
        for line in sidecar(out, ".progress.jsonl").read_text().splitlines()[1:]
        for r in json.loads(line)["documents"]
    ]
    asked = {(r["title"], h, t) for r in records for raw in r["raw"] for h, t in raw["pairs"]}
    assert asked == {(d.title, p.h, p.t) for d in alone.documents for p in d.pairs}
    assert summary["llm"]["pairs_asked"] == n_cands
    # every prediction is about a candidate pair
    result = read_json(out)
    assert {(p["title"], p["h_idx"], p["t_idx"]) for p in result} <= asked
    assert "scores" in summary and 0.0 <= summary["scores"]["f1"] <= 1.0
    assert summary["peak_rss_gib"] > 0


def test_stage1_only_equals_the_heads_own_relation_predictions(ckpt, files, tmp_path):
    out = tmp_path / "result.json"
    summary = run_pipeline(config(**{"stage1.checkpoint": str(ckpt)}), files["test"], out)
    assert summary["mode"] == "stage1-only" and "llm" not in summary
    stage1_predict(ckpt, files["test"], tmp_path / "c.json", relations_output=tmp_path / "alone.json")
    key = lambda p: (p["title"], p["h_idx"], p["t_idx"], p["r"])  # noqa: E731
    assert sorted(map(key, read_json(out))) == sorted(map(key, read_json(tmp_path / "alone.json")))


def test_direct_mode_asks_all_pairs_of_every_document(direct, files, tmp_path):
    out = tmp_path / "result.json"
    summary = run_pipeline(
        config(**{"stage2.adapter": str(direct), "docs_per_batch": 4}), files["unlabelled"], out
    )
    docs = read_json(files["unlabelled"])
    n_pairs = sum(len(d["vertexSet"]) * (len(d["vertexSet"]) - 1) for d in docs)
    assert summary["mode"] == "direct" and summary["llm"]["pairs_asked"] == n_pairs
    assert "scores" not in summary and "candidates" not in summary  # unlabelled input, no stage 1


def test_constrained_answers_leave_nothing_for_the_scorer_to_drop(ckpt, rc, files, tmp_path):
    cfg = llm_config(ckpt, rc, **{"stage1.max_per_doc": 4})
    cfg.stage2.overrides["generation"].update(
        {"constrained": True, "max_new_tokens_per_pair": 4, "max_new_tokens_cap": None}
    )
    summary = run_pipeline(cfg, files["test"], tmp_path / "r.json")
    llm = summary["llm"]
    assert llm["triples_parsed"] > 0 and llm["out_of_set_before_mapping"] == 0
    for reason in ("out_of_set_relation", "pair_not_asked", "below_cutoff", "empty_field", "self_loop"):
        assert llm["drops"].get(reason, 0) == 0, llm["drops"]
    # the budget is the grammar's bound in bytes (no token spells less than one byte), not pairs x 4 tokens: even a
    # random model, which writes in odd short tokens, is never cut, so nothing fails to parse
    assert llm["outputs_hit_token_limit"] == 0 and llm["drops"].get("unparsed", 0) == 0, llm


def test_stage1_choices_narrow_every_constrained_answer_to_stage1s_best_relations(ckpt, rc, files, tmp_path):
    cfg = llm_config(ckpt, rc, **{"stage1.max_per_doc": 4})
    cfg.stage2.overrides["generation"].update(
        {"constrained": True, "stage1_choices": 2, "max_new_tokens_cap": None}
    )
    out = tmp_path / "r.json"
    summary = run_pipeline(cfg, files["test"], out)
    best = {}  # (title, h, t) -> stage 1's two best relation ids by margin, from stage 1 run on its own
    alone = stage1_predict(
        ckpt, files["test"], tmp_path / "alone.json", CandidateSettings(max_per_doc=4)
    ).candidates
    for dc in alone.documents:
        for p in dc.pairs:
            assert p.top, "a multi-label head gives every candidate its best relations"
            ranked = sorted(p.top.items(), key=lambda kv: (-kv[1], kv[0]))
            best[(dc.title, p.h, p.t)] = {rid for rid, _ in ranked[:2]}
    triples = read_json(out)
    assert summary["llm"]["triples_parsed"] > 0 and triples
    for x in triples:  # a random model, yet every relation it names is one of its pair's two
        assert x["r"] in best[(x["title"], x["h_idx"], x["t_idx"])], x
    per_pair: dict = {}
    for x in triples:
        per_pair.setdefault((x["title"], x["h_idx"], x["t_idx"]), []).append(x["r"])
    assert all(len(rs) == len(set(rs)) for rs in per_pair.values())


def test_cli_predict_prints_scores_and_writes_the_summary(ckpt, rc, files, tmp_path, capsys):
    out = tmp_path / "r.json"
    code = main(
        ["predict", "--input", str(files["test"]), "--output", str(out), "--stage1", str(ckpt), "--stage2", str(rc),
         "--max-per-doc", "3", "--set", "stage2.overrides.generation.max_new_tokens_cap=8"]
    )  # fmt: skip
    assert code == 0
    text = capsys.readouterr().out
    assert "classifier-llm" in text and "scores: P" in text and "pair recall" in text
    summary = read_json(sidecar(out, ".summary.json"))
    assert summary["fingerprint"]["stage1"]["max_per_doc"] == 3
    assert summary["candidates"]["candidates"] <= 3 * 7


# ------------------------------------------------------------------------------------------ resume, shards


def _uninterrupted(ckpt, rc, files, tmp_path) -> bytes:
    out = tmp_path / "whole" / "result.json"
    run_pipeline(llm_config(ckpt, rc), files["test"], out, save_candidates=tmp_path / "whole" / "c.json")
    return out.read_bytes()


@pytest.fixture(scope="module")
def whole(ckpt, rc, files, tmp_path_factory):
    return _uninterrupted(ckpt, rc, files, tmp_path_factory.mktemp("whole"))


class _FailingGenerator:
    """The adapter's real generator, interrupted on its n-th call: a kill between stage 1 and stage 2."""

    def __init__(self, rc, n):

        self.inner = create_generator(load_adapter_config(rc, _fast()), Path(rc))
        self.tokenizer = self.inner.tokenizer
        self.n, self.calls = n, 0

    def generate(self, prompts, budgets, **kwargs):
        self.calls += 1
        if self.calls == self.n:
            raise KeyboardInterrupt
        return self.inner.generate(prompts, budgets, **kwargs)


def _fast() -> list[str]:
    """FAST_GENERATION as `--set` items of the adapter's config."""
    return [
        f"{section}.{k}={json.dumps(v)}"
        for section, values in FAST_GENERATION.items()
        for k, v in values.items()
    ]


def test_a_run_killed_between_stage1_and_stage2_resumes_to_the_same_bytes(ckpt, rc, files, tmp_path, whole):
    out = tmp_path / "result.json"
    cfg = llm_config(ckpt, rc)
    with pytest.raises(KeyboardInterrupt):  # batch 0 done, killed inside batch 1's generation
        run_pipeline(cfg, files["test"], out, generator=_FailingGenerator(rc, 2))
    lines = sidecar(out, ".progress.jsonl").read_text().splitlines()
    assert len(lines) == 2 and not out.exists()  # header + batch 0; no result file yet
    with pytest.raises(KeyboardInterrupt):  # resumed, paused after one more batch
        run_pipeline(cfg, files["test"], out, resume=True, stop_after_batches=1)
    # a torn last line (killed mid-append) is dropped and its batch redone
    with open(sidecar(out, ".progress.jsonl"), "a") as fh:
        fh.write('{"batch": 2, "documents": [{"title": "half')
    summary = run_pipeline(cfg, files["test"], out, resume=True)
    assert out.read_bytes() == whole
    assert summary["documents_this_run"] == 7 - 4  # batches 0 and 1 were not redone


def test_a_killed_cli_run_resumes_to_the_same_bytes(ckpt, rc, files, tmp_path, whole):
    out = tmp_path / "result.json"
    args = [sys.executable, "-m", "lmrc.cli", "predict", "--input", str(files["test"]), "--output", str(out),
            "--stage1", str(ckpt), "--stage2", str(rc), "--set", "docs_per_batch=2"]  # fmt: skip
    args += [f"--set=stage2.overrides.{k}" for k in _fast()]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    progress = sidecar(out, ".progress.jsonl")
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if progress.exists() and len(progress.read_text().splitlines()) >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    done = subprocess.run(args + ["--resume"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert out.read_bytes() == whole


def test_shards_merge_into_the_bytes_of_one_run(ckpt, rc, files, tmp_path, whole):
    cfg = llm_config(ckpt, rc)
    outs = [tmp_path / f"shard_{i}.json" for i in range(3)]
    sizes = []
    for i, out in enumerate(outs):
        sizes.append(run_pipeline(cfg, files["test"], out, shard=Shard(i, 3))["documents"])
    assert sum(sizes) == 7 and all(sizes)
    merged = tmp_path / "merged.json"
    summary = merge(list(reversed(outs)), merged)  # any order on the command line
    assert merged.read_bytes() == whole
    assert summary["documents"] == 7
    # overlapping, missing and mismatched shards are refused, and nothing is written
    bad = tmp_path / "bad.json"
    with pytest.raises(LmrcError, match="given twice"):
        merge([outs[0], outs[0], outs[1], outs[2]], bad)
    with pytest.raises(LmrcError, match=r"shard\(s\) 1/3 missing"):
        merge([outs[0], outs[2]], bad)
    other = tmp_path / "other_1.json"
    run_pipeline(llm_config(ckpt, rc, **{"stage1.max_per_doc": 2}), files["test"], other, shard=Shard(1, 3))
    with pytest.raises(LmrcError, match="made with another stage1"):
        merge([outs[0], other, outs[2]], bad)
    assert not bad.exists()


def test_shard_specs_are_checked():
    assert Shard.parse("2/4") == Shard(2, 4)
    assert [list(Shard(i, 3).batches(4)) for i in range(3)] == [[0], [1], [2, 3]]
    for spec, msg in (
        ("3/2", "between 0 and 1"),
        ("a/b", "expected i/n"),
        ("1", "expected i/n"),
        ("0/0", "n >= 1"),
    ):
        with pytest.raises(LmrcError, match=msg):
            Shard.parse(spec)


def test_resume_with_other_settings_is_refused(ckpt, rc, files, tmp_path):
    out = tmp_path / "r.json"
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(llm_config(ckpt, rc), files["test"], out, stop_after_batches=1)
    with pytest.raises(LmrcError, match="cannot resume: docs_per_batch was 2, now 3"):
        run_pipeline(llm_config(ckpt, rc, docs_per_batch=3), files["test"], out, resume=True)


# ------------------------------------------------------------------------------------------------ bad input


def _run(capsys, *args) -> tuple[int, str]:
    code = main(list(args))
    return code, capsys.readouterr().err


def test_bad_input_is_one_line_and_writes_nothing(ckpt, rc, direct, files, redocred_dir, tmp_path, capsys):
    out = tmp_path / "out" / "r.json"
    base = ["predict", "--input", str(files["test"]), "--output", str(out)]
    cases = [
        (["--stage1", str(ckpt), "--stage2", str(rc), "--mode", "magic"], "unknown mode 'magic'"),
        (["--stage1", str(ckpt), "--stage2", str(rc), "--shard", "3/2"], "--shard 3/2: shard index must be between 0 and 1"),
        (["--stage1", str(ckpt), "--stage2", str(direct), "--mode", "classifier-llm"], "a direct-mode adapter cannot classify"),
        (["--stage1", str(ckpt), "--stage2", str(direct)], "a direct-mode adapter asks about all pairs"),
        (["--stage2", str(rc)], "needs stage-1 candidates"),
        ([], "nothing to run"),
    ]  # fmt: skip
    # a candidates file made for other documents
    other_docs = tmp_path / "cands_other.json"
    stage1_predict(ckpt, files["train"], other_docs)
    cases.append((["--candidates", str(other_docs), "--stage2", str(rc)], "no document title matches"))
    # an adapter trained on another relation set
    other_rc = adapter(redocred_dir, "rc", other_relation_set(tmp_path, redocred_dir))
    cases.append((["--stage1", str(ckpt), "--stage2", str(other_rc)], "use different relation sets"))
    capsys.readouterr()
    for extra, message in cases:
        code, err = _run(capsys, *base, *extra)
        assert code == 2, extra
        assert err.count("\n") == 1 and err.startswith("lmrc: error:") and message in err, (extra, err)
        assert not out.parent.exists() or not any(out.parent.iterdir()), extra


def test_candidates_file_for_another_relation_set_is_refused(ckpt, rc, files, tmp_path):
    path = tmp_path / "c.json"
    stage1_predict(ckpt, files["test"], path, CandidateSettings(max_per_doc=2))
    raw = read_json(path)
    raw["documents"][0]["pairs"][0]["relations"] = {"P99999": 1.0}
    path.write_text(json.dumps(raw))
    cfg = config(**{"stage1.candidates": str(path), "stage2.adapter": str(rc)})
    with pytest.raises(LmrcError, match="'P99999' is not in the relation set"):
        run_pipeline(cfg, files["test"], tmp_path / "r.json")
    assert not (tmp_path / "r.json").exists() and not sidecar(tmp_path / "r.json", ".progress.jsonl").exists()


# ------------------------------------------------------------------------------------------ refine and fuse


def test_calibrate_upper_is_the_lowest_threshold_reaching_the_precision():

    # one document, pairs by score: 3.0 right, 2.0 right, 1.0 wrong, 0.5 right, -1.0 (no relation predicted)
    scores = [[3.0, 2.0, 1.0, 0.5, -1.0]]
    predicted = [[{"a"}, {"b"}, {"c"}, {"d"}, set()]]
    gold = [[{"a"}, {"b"}, {"x"}, {"d"}, {"e"}]]
    # precision above 1.5: 2/2; above 0.75: 2/3; above 0.25: 3/4
    assert calibrate_upper(scores, predicted, gold, 1.0)["upper"] == pytest.approx(1.5)
    assert calibrate_upper(scores, predicted, gold, 0.75)["upper"] == pytest.approx(0.0)  # (0.5 + -1.0)/2 < 0
    assert calibrate_upper(scores, predicted, gold, 0.7)["upper"] == pytest.approx(0.0)
    assert calibrate_upper([[1.0]], [[{"a"}]], [[{"b"}]], 0.9)["upper"] is None  # never reached


def test_calibrate_additions_picks_the_near_miss_set_that_raises_f1_most():

    # stage 1: 4 right of 8 predicted, 12 gold -> F1 = 8 / 20 = 0.4; adding a set of near misses helps iff its
    # precision is above F1 / 2 = 0.2
    rows = [
        (-0.1, True),
        (-0.2, False),
        (-0.3, True),
        (-0.5, False),
        (-0.6, False),
        (-0.7, False),
        (-0.9, False),
    ]
    cal = calibrate_additions(rows, hits=4, n_pred=8, n_gold=12)
    f1 = {m: 2 * (4 + r) / (20 + n) for m, n, r in [(-0.1, 1, 1), (-0.2, 2, 1), (-0.3, 3, 2), (-0.5, 4, 2)]}
    assert cal["stage1_f1"] == pytest.approx(0.4)
    assert cal["add_margin"] == -0.3 and cal["f1"] == pytest.approx(max(f1.values())) == pytest.approx(
        12 / 23
    )
    assert (cal["added"], cal["right"], cal["near_misses"]) == (3, 2, 7)
    # all wrong: nothing raises F1, so no margin (the LLM may add nothing)
    assert calibrate_additions([(-0.1, False), (-0.2, False)], 4, 8, 12)["add_margin"] is None
    # equal margins are added together or not at all
    tied = calibrate_additions(
        [(-0.1, True), (-0.1, False), (-0.1, False), (-0.1, False), (-0.1, False)], 4, 8, 12
    )
    assert tied["add_margin"] is None  # 1 right of 5: 0.2 is not above F1 / 2
    assert calibrate_additions([], 0, 0, 0) == {
        "method": "no_harm_near_misses", "stage1_f1": 0.0, "near_misses": 0, "add_margin": None, "f1": 0.0,
        "added": 0, "right": 0,
    }  # fmt: skip


def test_refine_gates_the_llms_additions_at_the_calibrated_margin(ckpt, rc, files, tmp_path):
    cfg = llm_config(
        ckpt,
        rc,
        fusion="refine",
        **{"refine.additions": "calibrated", "stage1.tune": str(files["tune"]), "stage1.max_per_doc": 6},
    )
    constrained = {"constrained": True, "max_new_tokens_cap": None}  # a random model that writes triples
    cfg.stage2.overrides["generation"].update(constrained)
    out = tmp_path / "r.json"
    summary = run_pipeline(cfg, files["test"], out)
    gate = summary["fingerprint"]["fusion"]["calibration"]["additions"]
    assert (
        gate["method"] == "no_harm_near_misses"
        and summary["fingerprint"]["fusion"]["additions"] == "calibrated"
    )
    margin = gate["add_margin"] if gate["add_margin"] is not None else float("inf")
    alone = stage1_predict(
        ckpt, files["test"], tmp_path / "s1.json", CandidateSettings(max_per_doc=6)
    ).candidates
    stage1 = {(d.title, p.h, p.t): p for d in alone.documents for p in d.pairs}
    added = 0
    for x in read_json(out):
        p = stage1[(x["title"], x["h_idx"], x["t_idx"])]
        if x["r"] not in (p.relations or {}):
            added += 1
            assert p.top[x["r"]] >= margin, (x, p.top, margin)
    # the same run without the gate: the gate removed exactly the LLM's other relations
    free_cfg = llm_config(
        ckpt, rc, fusion="refine", **{"stage1.tune": str(files["tune"]), "stage1.max_per_doc": 6}
    )
    free_cfg.stage2.overrides["generation"].update(constrained)
    free = run_pipeline(free_cfg, files["test"], tmp_path / "free.json")
    assert len(read_json(tmp_path / "free.json")) - len(read_json(out)) == summary["llm"]["additions_gated"]
    assert (
        free["llm"]["additions_gated"] == 0 and summary["llm"]["additions_gated"] > 0
    )  # a random LLM names others


def test_refine_sends_only_the_uncertain_band_to_the_llm_and_keeps_stage1_above_it(ckpt, rc, files, tmp_path):
    alone = stage1_predict(ckpt, files["test"], tmp_path / "s1.json").candidates
    with_rel = sorted(p.score for d in alone.documents for p in d.pairs if p.relations)
    assert len(with_rel) >= 4
    upper = with_rel[len(with_rel) // 2]
    cfg = llm_config(ckpt, rc, fusion="refine", **{"refine.upper": upper})
    out = tmp_path / "r.json"
    summary = run_pipeline(cfg, files["test"], out)
    confident = {
        (d.title, p.h, p.t) for d in alone.documents for p in d.pairs if p.score > upper and p.relations
    }
    band = {(d.title, p.h, p.t) for d in alone.documents for p in d.pairs} - confident
    records = [
        r
        for line in sidecar(out, ".progress.jsonl").read_text().splitlines()[1:]
        for r in json.loads(line)["documents"]
    ]
    asked = {(r["title"], h, t) for r in records for raw in r["raw"] for h, t in raw["pairs"]}
    assert asked == band and summary["llm"]["pairs_kept_by_stage1"] == len(confident) > 0
    result = {(p["title"], p["h_idx"], p["t_idx"], p["r"]) for p in read_json(out)}
    stage1_rel = {
        (d.title, p.h, p.t, r)
        for d in alone.documents
        for p in d.pairs
        if p.score > upper and p.relations
        for r in p.relations
    }
    assert stage1_rel <= result
    assert summary["fingerprint"]["fusion"]["calibration"] == {"method": "manual", "upper": upper}


def test_refine_calibrates_its_upper_threshold_on_the_tuning_file(ckpt, rc, files, tmp_path):
    cfg = llm_config(
        ckpt, rc, fusion="refine", **{"refine.precision": 0.01, "stage1.tune": str(files["tune"])}
    )
    with pytest.raises(LmrcError, match="stage1.tune"):
        run_pipeline(llm_config(ckpt, rc, fusion="refine"), files["test"], tmp_path / "x.json")
    cal = run_pipeline(cfg, files["test"], tmp_path / "r.json")["fingerprint"]["fusion"]["calibration"]
    assert cal["method"] == "relation_precision" and cal["target"] == 0.01
    assert cal["upper"] is None or cal["precision"] >= 0.01


def test_hints_adapter_learns_from_crossfit_style_candidates_and_predicts_with_hints(
    ckpt, files, redocred_dir, tmp_path
):

    train_cands = tmp_path / "train.cands.json"  # stands in for `lmrc stage1 crossfit` output
    stage1_predict(ckpt, files["train"], train_cands, CandidateSettings(max_per_doc=6))
    assert all(p.top and len(p.top) == 3 for d in load_candidates(train_cands).documents for p in d.pairs)
    hinted = adapter(redocred_dir, "rc", None, ("hints=2", f"data.candidates={train_cands}"))
    out = tmp_path / "r.json"
    summary = run_pipeline(llm_config(ckpt, hinted, **{"stage1.max_per_doc": 3}), files["test"], out)
    assert summary["llm"]["pairs_asked"] > 0
    with pytest.raises(LmrcError, match="hints, which gold pairs do not have"):
        run_pipeline(config(**{"stage2.adapter": str(hinted), "stage1.gold_pairs": True}), files["test"], out)
    runner = Stage2Runner(hinted)

    doc = load_documents(files["test"])[0]
    dc = stage1_predict(
        ckpt, files["test"], tmp_path / "c.json", CandidateSettings(max_per_doc=3)
    ).candidates.documents[0]
    _, prompts = runner.plan(doc, sorted((p.h, p.t) for p in dc.pairs), runner.hints_for(dc))
    assert prompts[0].suffix.count("| hints: ") == len(dc.pairs)
    assert "best guesses of a relation classifier" in prompts[0].prefix
    with pytest.raises(LmrcError, match="data.candidates"):
        adapter(redocred_dir, "rc", None, ("hints=2",))


def test_predict_peak_memory_counts_every_gpu_and_what_other_processes_use(monkeypatch):
    """GPU memory in the predict summary: torch's peak over all local devices, and the device memory in use by
    every process (a vLLM engine's), from lmrc.machine.hardware.gpu_memory (mocked: no GPU here)."""
    fake = [
        {"device": 0, "peak_allocated_gib": 1.5, "peak_reserved_gib": 2.0, "device_used_gib": 30.0},
        {"device": 1, "peak_allocated_gib": 0.5, "peak_reserved_gib": 1.0, "device_used_gib": 20.0},
    ]
    monkeypatch.setattr(predict_run, "gpu_memory", lambda: fake)
    peaks = predict_run._peak_memory()
    assert peaks["peak_cuda_gib"] == 2.0 and peaks["gpu_in_use_gib"] == 50.0 and peaks["peak_rss_gib"] > 0
    monkeypatch.setattr(predict_run, "gpu_memory", lambda: [])
    assert set(predict_run._peak_memory()) == {"peak_rss_gib"}
