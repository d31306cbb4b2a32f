"""Stage-2 prediction end to end (`lmrc stage2 predict`, a run of the one prediction driver with the adapter
alone): tiny model on real documents, result file, progress/resume, no-LLM cases."""

from __future__ import annotations

import json

import pytest
from stage2_helpers import smollm2_tokenizer, tiny_model_dir

from lmrc.cli import main
from lmrc.config import apply_overrides, load_config
from lmrc.data.candidates import (
    CandidatePair,
    Candidates,
    CandidatesHeader,
    DocumentCandidates,
    save_candidates,
)
from lmrc.data.docred import load_documents
from lmrc.data.relations import load_relations
from lmrc.errors import LmrcError
from lmrc.io import read_json, read_jsonl, sidecar
from lmrc.predict.build import stage2_predict_config
from lmrc.predict.config import PredictConfig
from lmrc.predict.run import run_pipeline
from lmrc.stage2 import predict as predict_module
from lmrc.stage2.config import GenerationConfig, load_stage2_config
from lmrc.stage2.generate import Generation, HFGenerator, answer_budget, create_generator
from lmrc.stage2.generate.hf_backend import _RowStopper
from lmrc.stage2.modeling import load_adapter_config
from lmrc.stage2.prompts import PromptEncoder, plan_prompts
from lmrc.stage2.templates import load_template
from lmrc.stage2.train import train


def predict(adapter, docs, out, candidates_path=None, gold_pairs=False, resume=False, debug_out=None,
            overrides=(), generator=None):  # fmt: skip
    """What `lmrc stage2 predict` runs; returns the summary's LLM section."""
    cfg = stage2_predict_config(adapter, candidates_path, gold_pairs, apply_overrides({}, list(overrides)))
    summary = run_pipeline(
        cfg, docs, out, resume=resume, debug_out=debug_out, generator=generator, show_progress=False
    )
    return {**summary["llm"], "predictions": summary["predictions"], "summary": summary}


@pytest.fixture(scope="module")
def adapter(redocred_dir, tmp_path_factory):
    """A tiny rc adapter trained for one step (its answers are noise; the plumbing is what is tested)."""
    cfg = load_stage2_config(
        None,
        [
            f"model={tiny_model_dir()}",
            f"data.train={redocred_dir / 'dev_50.json'}",
            f"data.rel_info={redocred_dir / 'rel_info.json'}",
            "data.max_docs=1",
            "max_seq_len=1024",
            "dtype=float32",
            "train.max_steps=1",
            "train.warmup_steps=0",
        ],
    )
    out = tmp_path_factory.mktemp("stage2-adapter")
    train(cfg, out)
    return out


@pytest.fixture(scope="module")
def docs_file(redocred_dir, tmp_path_factory):
    """Three real dev documents."""
    raw = read_json(redocred_dir / "dev_50.json")[:3]
    path = tmp_path_factory.mktemp("stage2-docs") / "docs.json"
    path.write_text(json.dumps(raw))
    return path


class EchoGenerator:
    """Answers every asked pair with one relation name, read back from the prompt's pair lines."""

    name = "echo"

    def __init__(self, relation: str = "country", fail_on_call: int | None = None) -> None:
        self.tokenizer = smollm2_tokenizer()
        self.relation = relation
        self.fail_on_call = fail_on_call
        self.calls = 0
        self.prompts = 0

    def generate(self, prompts, max_new_tokens, **kwargs):
        self.calls += 1
        if self.fail_on_call == self.calls:
            raise KeyboardInterrupt
        self.prompts += len(prompts)
        out = []
        for ids in prompts:
            text = self.tokenizer.decode(ids)
            block = text.split("Entity pairs:\n", 1)[1].split("\n\n###", 1)[0]
            lines = [line.replace("| -| ", f"| {self.relation}| ") for line in block.splitlines()]
            out.append(Generation("\n".join(lines), n_tokens=10, hit_limit=False))
        return out


def _gold_pairs(docs_file):
    return {(d["title"], f["h"], f["t"]) for d in read_json(docs_file) for f in d["labels"]}


def _check_result_file(path, docs_file, rel_info):
    docs = {d["title"]: d for d in read_json(docs_file)}
    result = read_json(path)
    assert isinstance(result, list)
    for p in result:
        assert set(p) == {"title", "h_idx", "t_idx", "r"}
        n = len(docs[p["title"]]["vertexSet"])
        assert 0 <= p["h_idx"] < n and 0 <= p["t_idx"] < n and p["h_idx"] != p["t_idx"]
        assert p["r"] in rel_info
    return result


def test_rc_predict_with_the_tiny_model_writes_a_valid_result_file(
    adapter, docs_file, rel_info, tmp_path, capsys
):
    out = tmp_path / "result.json"
    debug = tmp_path / "debug.jsonl"
    cap = 12
    code = main(
        [
            "stage2", "predict", "--adapter", str(adapter), "--input", str(docs_file), "--gold-pairs",
            "--output", str(out), "--debug-out", str(debug), "--set", f"generation.max_new_tokens_cap={cap}",
        ]
    )  # fmt: skip
    assert code == 0
    assert "predictions for 3 documents" in capsys.readouterr().out
    _check_result_file(out, docs_file, rel_info)
    whole = read_json(sidecar(out, ".summary.json"))
    assert whole["format"] == "lmrc-predict-summary" and whole["mode"] == "classifier-llm"
    summary = whole["llm"]
    records = read_jsonl(debug)
    assert [r["title"] for r in records] == [d["title"] for d in read_json(docs_file)]
    prompts = [p for r in records for p in r["prompts"]]
    assert summary["prompts"] == len(prompts) > 0
    # Every gold pair is asked exactly once; noise from an untrained model is cut at the token budget.
    asked = {(r["title"], h, t) for r in records for p in r["prompts"] for h, t in p["pairs"]}
    assert asked == _gold_pairs(docs_file) and summary["pairs_asked"] == len(asked)
    assert all(0 <= p["generated_tokens"] <= cap and p["max_new_tokens"] == cap for p in prompts)
    assert summary["outputs_hit_token_limit"] == sum(p["hit_token_limit"] for p in prompts)
    assert summary["generated_tokens"] == sum(p["generated_tokens"] for p in prompts)
    progress = read_jsonl(sidecar(out, ".progress.jsonl"))
    assert progress[0]["format"] == "lmrc-predict-progress" and len(progress) == 2  # header + one batch of 3
    assert whole["fingerprint"]["stage1"] == {"gold_pairs": True}
    assert whole["fingerprint"]["stage2"]["generation"]["max_new_tokens_cap"] == cap


def test_scripted_answers_are_aligned_back_to_exactly_the_asked_pairs(adapter, docs_file, rel_info, tmp_path):
    out = tmp_path / "result.json"
    summary = predict(adapter, docs_file, out, gold_pairs=True, generator=EchoGenerator("country"))
    result = _check_result_file(out, docs_file, rel_info)
    assert {(p["title"], p["h_idx"], p["t_idx"]) for p in result} == _gold_pairs(docs_file)
    assert {p["r"] for p in result} == {"P17"}
    assert summary["predictions"] == len(result) == summary["pairs_asked"]
    assert summary["drops"] == {} and summary["out_of_set_before_mapping"] == 0


def test_interrupted_predict_resumes_without_repeating_documents(adapter, docs_file, tmp_path):
    reference = tmp_path / "reference.json"
    predict(adapter, docs_file, reference, gold_pairs=True, generator=EchoGenerator())
    out = tmp_path / "result.json"
    chunk = ["generation.docs_per_chunk=1"]
    with pytest.raises(KeyboardInterrupt):  # killed while generating the second document
        predict(
            adapter, docs_file, out, gold_pairs=True, overrides=chunk, generator=EchoGenerator(fail_on_call=2)
        )
    done = read_jsonl(sidecar(out, ".progress.jsonl"))[1:]
    assert len(done) == 1 and len(done[0]["documents"]) == 1 and not out.exists()
    first_doc_prompts = done[0]["documents"][0]["counts"]["prompts"]
    resumed = EchoGenerator()
    summary = predict(
        adapter, docs_file, out, gold_pairs=True, resume=True, overrides=chunk, generator=resumed
    )
    assert resumed.calls == 2  # the two remaining documents, one chunk each
    assert resumed.prompts == summary["prompts"] - first_doc_prompts
    assert out.read_bytes() == reference.read_bytes()
    assert len(read_jsonl(sidecar(out, ".progress.jsonl"))) == 4


def test_resume_with_other_alignment_settings_is_refused(adapter, docs_file, tmp_path):
    out = tmp_path / "result.json"
    predict(adapter, docs_file, out, gold_pairs=True, generator=EchoGenerator())
    with pytest.raises(LmrcError, match="cannot resume"):
        predict(adapter, docs_file, out, gold_pairs=True, resume=True, overrides=["align.cutoff=50"],
                generator=EchoGenerator())  # fmt: skip


def _candidates(path, entries):
    docs = [
        DocumentCandidates(title=t, pairs=tuple(CandidatePair(h, t_, 1.0) for h, t_ in pairs))
        for t, pairs in entries
    ]
    save_candidates(Candidates(CandidatesHeader(model="test", head="atl", threshold=0.0), docs), path)


def test_documents_with_empty_candidate_lists_cost_no_llm_call(adapter, docs_file, tmp_path, monkeypatch):
    titles = [d["title"] for d in read_json(docs_file)]
    cands = tmp_path / "cands.json"
    _candidates(cands, [(titles[0], []), (titles[1], [(0, 1), (1, 0)])])  # titles[2] has no entry at all
    counting = EchoGenerator()
    summary = predict(adapter, docs_file, tmp_path / "r.json", candidates_path=cands, generator=counting)
    assert counting.calls == 1 and counting.prompts == summary["prompts"] == 1
    assert summary["documents_without_pairs"] == 2
    assert summary["summary"]["candidates"]["documents_missing_candidates"] == 1
    assert {(p["h_idx"], p["t_idx"]) for p in read_json(tmp_path / "r.json")} == {(0, 1), (1, 0)}

    # No pairs anywhere: the model is never even loaded.
    def no_model(*args, **kwargs):
        raise AssertionError("the model must not be loaded")

    monkeypatch.setattr(predict_module, "create_generator", no_model)
    _candidates(cands, [(t, []) for t in titles])
    summary = predict(adapter, docs_file, tmp_path / "empty.json", candidates_path=cands)
    assert read_json(tmp_path / "empty.json") == [] and summary["prompts"] == 0


class GarbageGenerator(EchoGenerator):
    def generate(self, prompts, max_new_tokens, **kwargs):
        junk = ["", "((((|||| None )", "(| | )\n" * 50 + "blah " * 200, "1. (x| country| y) (Cuba| -| )"]
        return [
            Generation(junk[i % len(junk)], n_tokens=n, hit_limit=True) for i, n in enumerate(max_new_tokens)
        ]


def test_garbage_and_empty_outputs_are_counted_not_fatal(adapter, docs_file, rel_info, tmp_path):
    out = tmp_path / "result.json"
    summary = predict(adapter, docs_file, out, gold_pairs=True, generator=GarbageGenerator())
    _check_result_file(out, docs_file, rel_info)
    assert summary["empty_outputs"] >= 1
    assert summary["outputs_hit_token_limit"] == summary["prompts"]


def test_sbert_mapping_maps_near_names_and_keeps_a_strict_result(adapter, docs_file, tmp_path, cache_dir):
    out = tmp_path / "result.json"
    summary = predict(
        adapter, docs_file, out, gold_pairs=True, overrides=["align.relation_mapping=sbert"],
        generator=EchoGenerator("country of citizen"),
    )  # fmt: skip
    n = summary["pairs_asked"]
    assert summary["out_of_set_before_mapping"] == n and summary["out_of_set_after_mapping"] == 0
    assert {p["r"] for p in read_json(out)} == {"P27"}  # country of citizenship
    assert read_json(sidecar(out, ".strict.json")) == []


@pytest.mark.parametrize(
    "override",
    ["mode=direct", "model=smollm2-135m", "max_seq_len=4096", "max_pairs=5", "answer_tokens_per_pair=8"],
)
def test_settings_fixed_by_training_cannot_be_overridden(adapter, docs_file, tmp_path, override):
    key = override.split("=")[0]
    with pytest.raises(LmrcError, match=f"--set {key}: the adapter was trained with {key}="):
        predict(adapter, docs_file, tmp_path / "r.json", overrides=[override], generator=EchoGenerator())
    assert not (tmp_path / "r.json").exists()


def test_rc_adapter_needs_candidates_or_gold_pairs(adapter, docs_file, tmp_path):
    with pytest.raises(LmrcError, match="--candidates"):
        predict(adapter, docs_file, tmp_path / "r.json", generator=EchoGenerator())


def test_missing_adapter_and_unknown_model_are_one_line_errors(redocred_dir, docs_file, tmp_path, capsys):
    code = main(["stage2", "predict", "--adapter", str(tmp_path / "nope"), "--input", str(docs_file),
                 "--gold-pairs", "--output", str(tmp_path / "r.json")])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("lmrc: error:") and "adapter folder not found" in err
    assert len(err.splitlines()) == 1
    data = [f"data.train={docs_file}", f"data.rel_info={redocred_dir / 'rel_info.json'}"]
    code = main(["stage2", "train", "--set", f"model={tmp_path / 'no-such-model'}", "--set", data[0], "--set",
                 data[1], "--output-dir", str(tmp_path / "run")])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("lmrc: error:") and "no-such-model" in err
    assert len(err.splitlines()) == 1


def _tiny_generator(batch_size: int, **kw):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir()), dtype=torch.float32).eval()
    return HFGenerator(model, smollm2_tokenizer(), GenerationConfig(batch_size=batch_size, **kw))


def test_left_padded_batches_generate_what_each_prompt_generates_alone():
    tok = smollm2_tokenizer()
    prompts = [
        tok(t)["input_ids"]
        for t in ("(Alpha| -| Beta)\n", "A much longer prompt about Gamma and Delta.", "x")
    ]
    budgets = [7, 3, 5]
    batched = _tiny_generator(batch_size=3).generate(prompts, budgets)
    alone = [_tiny_generator(batch_size=1).generate([p], [b])[0] for p, b in zip(prompts, budgets)]
    assert [g.text for g in batched] == [g.text for g in alone]
    # Each prompt keeps its own budget even when it shares a batch with a larger one.
    assert [g.n_tokens for g in batched] == [g.n_tokens for g in alone]
    assert all(g.n_tokens <= b for g, b in zip(batched, budgets))


def test_sampling_is_seeded():
    tok = smollm2_tokenizer()
    prompts = [tok("(Alpha| -| Beta)\n")["input_ids"]]
    a = _tiny_generator(1, do_sample=True, temperature=1.5, seed=7).generate(prompts, [8])
    b = _tiny_generator(1, do_sample=True, temperature=1.5, seed=7).generate(prompts, [8])
    assert a == b


def test_answer_budget_scales_with_pairs_and_stays_in_the_room_the_prompt_leaves():

    cfg = GenerationConfig(max_new_tokens_per_pair=40)
    assert answer_budget(3, cfg) == 120
    assert answer_budget(98, cfg, prompt_len=1000, context=8192) == 3920  # no fixed cap by default
    assert answer_budget(18, cfg, prompt_len=8000, context=8192) == 192
    assert answer_budget(18, GenerationConfig(max_new_tokens_per_pair=40, max_new_tokens_cap=500)) == 500


class CuttingEcho(EchoGenerator):
    """EchoGenerator whose answer stops at its token budget, as a real model's would."""

    def generate(self, prompts, max_new_tokens, **kwargs):
        out = []
        for g, budget in zip(super().generate(prompts, max_new_tokens, **kwargs), max_new_tokens):
            ids = self.tokenizer(g.text, add_special_tokens=False)["input_ids"]
            cut = len(ids) > budget
            text = self.tokenizer.decode(ids[:budget]) if cut else g.text
            out.append(Generation(text, n_tokens=min(len(ids), budget), hit_limit=cut))
        return out


def test_a_long_pair_list_is_answered_whole_and_a_cut_answer_is_counted(adapter, docs_file, tmp_path):

    doc = max(load_documents(docs_file), key=lambda d: len(d.pairs()))
    pairs = doc.pairs()[:60]
    cands = tmp_path / "c.json"
    save_candidates(
        Candidates(
            CandidatesHeader(model="m", head="atl", threshold=0.0),
            [
                DocumentCandidates(
                    doc.title, tuple(CandidatePair(h, t, 1.0) for h, t in pairs), len(doc.entities)
                )
            ],
        ),
        cands,
    )
    whole = predict(adapter, docs_file, tmp_path / "a.json", candidates_path=cands, generator=CuttingEcho())
    assert whole["pairs_asked"] == 60 and whole["pairs_cut"] == 0 and whole["outputs_hit_token_limit"] == 0
    assert len(read_json(tmp_path / "a.json")) == 60  # one relation for every pair: nothing lost
    cut = predict(
        adapter, docs_file, tmp_path / "b.json", candidates_path=cands, generator=CuttingEcho(),
        overrides=["generation.max_new_tokens_cap=100"],
    )  # fmt: skip
    kept = len(read_json(tmp_path / "b.json"))
    assert cut["outputs_hit_token_limit"] >= 1 and 0 < kept < 60
    assert cut["pairs_cut"] == 60 - kept


def test_vllm_backend_without_vllm_is_a_clear_error(adapter):
    pytest.importorskip("torch")
    try:
        import vllm  # noqa: F401

        pytest.skip("vllm is installed")
    except ImportError:
        pass

    cfg = load_adapter_config(adapter, ["generation.backend=vllm"])
    with pytest.raises(LmrcError, match="pip install"):
        create_generator(cfg, adapter)


def test_rows_stop_at_their_own_budget_or_after_repeated_lines():
    import torch

    tok = smollm2_tokenizer()
    line = tok("(Alpha| country| Beta)\n")["input_ids"]
    other = tok("(Alpha| country| Gamma)\n")["input_ids"]
    new_rows = [
        other + line * 3,
        line * 2 + other + line * 2,
    ]  # a loop of 3 vs. no 3 identical lines in a row
    width = 4
    stopper = _RowStopper(width, budgets=[1000, 1000], tokenizer=tok, repeat=3)
    n = min(len(r) for r in new_rows)
    for k in range(1, n + 1):
        ids = torch.tensor([[0] * width + r[:k] for r in new_rows])
        stopper(ids, None)
    assert stopper.stopped_at == [len(other) + 3 * len(line), None]
    budget = _RowStopper(width, budgets=[2, 1000], tokenizer=tok, repeat=0)
    for k in range(1, 4):
        budget(torch.tensor([[0] * width + r[:k] for r in new_rows]), None)
    assert budget.stopped_at == [2, None]


def test_a_looping_answer_is_cut_after_the_repeated_line():

    tok = smollm2_tokenizer()
    gen = HFGenerator.__new__(HFGenerator)
    gen.tokenizer, gen.cfg, gen.eos_ids = tok, GenerationConfig(), [tok.eos_token_id]
    line = tok("(Alpha| country| Beta)\n")["input_ids"]
    looped = gen._finish(line * 3 + [tok.eos_token_id] * 5, limit=200, stopped_at=3 * len(line))
    assert looped.stopped_on_repeat and not looped.hit_limit and looped.n_tokens == 3 * len(line)
    ended = gen._finish(line + [tok.eos_token_id] + line, limit=200, stopped_at=None)
    assert ended.text == "(Alpha| country| Beta)\n" and not ended.hit_limit and not ended.stopped_on_repeat
    cut = gen._finish(line * 4, limit=5, stopped_at=5)
    assert cut.hit_limit and cut.n_tokens == 5


def test_direct_mode_asks_all_pairs_and_reads_none_answers(redocred_dir, tmp_path):
    cfg = load_stage2_config(
        None,
        [
            "mode=direct",
            f"model={tiny_model_dir()}",
            f"data.train={redocred_dir / 'dev_50.json'}",
            f"data.rel_info={redocred_dir / 'rel_info.json'}",
            "data.max_docs=1",
            "data.direct_na_chunk_fraction=0.0",
            "max_seq_len=1024",
            "dtype=float32",
            "train.max_steps=1",
            "train.warmup_steps=0",
        ],
    )
    adapter = tmp_path / "direct"
    train(cfg, adapter)
    raw = read_json(redocred_dir / "dev_50.json")
    small = min(raw, key=lambda d: len(d["vertexSet"]))
    lonely = {"title": "Lonely", "sents": [["Alpha", "slept", "."]], "labels": [],
              "vertexSet": [[{"name": "Alpha", "sent_id": 0, "pos": [0, 1], "type": "PER"}]]}  # fmt: skip
    docs = tmp_path / "docs.json"
    docs.write_text(json.dumps([small, lonely]))
    echo = EchoGenerator("None")
    summary = predict(adapter, docs, tmp_path / "r.json", debug_out=tmp_path / "d.jsonl", generator=echo)
    n = len(small["vertexSet"])
    assert summary["pairs_asked"] == n * (n - 1) and summary["none_answers"] == n * (n - 1)
    assert read_json(tmp_path / "r.json") == [] and summary["drops"] == {}
    assert summary["documents_without_pairs"] == 1  # one entity: no pair, no prompt
    records = read_jsonl(tmp_path / "d.jsonl")
    assert records[1]["prompts"] == [] and echo.prompts == summary["prompts"]
    with pytest.raises(LmrcError, match="all pairs"):
        predict(adapter, docs, tmp_path / "r2.json", gold_pairs=True, generator=echo)


def test_resume_after_a_torn_progress_line_leaves_a_readable_progress_file(adapter, docs_file, tmp_path):
    out = tmp_path / "result.json"
    chunk = ["generation.docs_per_chunk=1"]
    with pytest.raises(KeyboardInterrupt):
        predict(
            adapter, docs_file, out, gold_pairs=True, overrides=chunk, generator=EchoGenerator(fail_on_call=2)
        )
    progress = sidecar(out, ".progress.jsonl")
    with open(progress, "a", encoding="utf-8") as fh:  # a process killed in the middle of an append
        fh.write('{"batch": 1, "documents": [{"title": "torn')
    predict(adapter, docs_file, out, gold_pairs=True, resume=True, overrides=chunk, generator=EchoGenerator())
    records = read_jsonl(progress)  # the next append must not have been glued onto the torn line
    assert len(records) == 4 and len({d["title"] for r in records[1:] for d in r["documents"]}) == 3
    again = EchoGenerator()
    predict(adapter, docs_file, out, gold_pairs=True, resume=True, overrides=chunk, generator=again)
    assert again.calls == 0


def test_a_shared_prefix_is_prefilled_once_and_the_answers_do_not_change(redocred_dir):
    """Direct-mode prompts of a document share instruction, relation set and text: with prefix_cache the prefix
    is prefilled once per document, and greedy answers equal those of plain left-padded batches."""

    rel = load_relations(redocred_dir / "rel_info.json")
    docs = sorted(load_documents(redocred_dir / "dev_50.json", rel), key=lambda d: len(d.pairs()))[:2]
    tok = smollm2_tokenizer()
    enc = PromptEncoder(tok)
    prompts, groups = [], []
    for g, d in enumerate(docs):
        for p in plan_prompts(
            d, rel, d.pairs()[:20], load_template("direct"), enc.count_tokens, 4000, max_pairs=6
        ):
            prompts.append(enc.encode_prompt(p.text))
            groups.append(g)
    assert len(prompts) >= 6
    budgets = [6 + i % 3 for i in range(len(prompts))]  # rows stop at different points
    plain = _tiny_generator(3, prefix_cache=False).generate(prompts, budgets, groups=groups)
    cached = _tiny_generator(3, prefix_cache=True).generate(prompts, budgets, groups=groups)
    assert [g.text for g in cached] == [g.text for g in plain]
    assert [g.n_tokens for g in cached] == [g.n_tokens for g in plain]
    assert sum(g.prefill_tokens for g in cached) * 2 < sum(map(len, prompts))  # at least 2x fewer


def test_predict_prefills_a_documents_shared_prefix_once(redocred_dir, tmp_path):
    """`lmrc predict` hands the generator each prompt's document, so generation.prefix_cache (the default) works
    there too, not only when the generator is called directly: the same answers from fewer prefilled tokens."""
    cfg = load_stage2_config(
        None,
        [
            f"model={tiny_model_dir()}",
            "mode=direct",
            f"data.train={redocred_dir / 'dev_50.json'}",
            f"data.rel_info={redocred_dir / 'rel_info.json'}",
            "data.max_docs=1",
            "max_seq_len=1024",
            "max_pairs=4",
            "dtype=float32",
            "train.max_steps=1",
            "train.warmup_steps=0",
        ],
    )
    direct = tmp_path / "direct"
    train(cfg, direct)
    raw = sorted(read_json(redocred_dir / "dev_50.json"), key=lambda d: len(d["vertexSet"]))[:2]
    docs = tmp_path / "docs.json"
    docs.write_text(json.dumps(raw))
    runs = {}
    for cached in (False, True):
        sets = [f"generation.prefix_cache={str(cached).lower()}", "generation.max_new_tokens_per_pair=2"]
        debug = tmp_path / f"debug-{cached}.jsonl"
        runs[cached] = predict(direct, docs, tmp_path / f"r-{cached}.json", overrides=sets, debug_out=debug)
        runs[cached]["raw"] = [p["raw_output"] for r in read_jsonl(debug) for p in r["prompts"]]
    plain, cached = runs[False], runs[True]
    assert plain["prompts"] > 2 * len(raw)  # several prompts per document share its prefix
    assert cached["raw"] == plain["raw"] and cached["predictions"] == plain["predictions"]
    assert plain["prefill_tokens"] == plain["prompt_tokens"] == cached["prompt_tokens"]
    assert cached["prefill_tokens"] * 2 < plain["prefill_tokens"]


def test_stage2_predict_is_lmrc_predict_with_the_adapter_alone(adapter, docs_file, tmp_path):

    alone = predict(adapter, docs_file, tmp_path / "a.json", gold_pairs=True, generator=EchoGenerator())
    cfg = load_config(PredictConfig, None, [f"stage2.adapter={adapter}", "stage1.gold_pairs=true"])
    both = run_pipeline(cfg, docs_file, tmp_path / "b.json", generator=EchoGenerator(), show_progress=False)
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()
    assert both["llm"] == alone["summary"]["llm"] and both["llm"]["pairs_from"] == "gold pairs"


def test_gold_pairs_need_labels_and_exclude_candidates(adapter, docs_file, tmp_path):
    raw = read_json(docs_file)
    del raw[1]["labels"]
    unlabelled = tmp_path / "unlabelled.json"
    unlabelled.write_text(json.dumps(raw))
    with pytest.raises(LmrcError, match=r"document 1 .*missing field 'labels' \(needed by --gold-pairs\)"):
        predict(adapter, unlabelled, tmp_path / "r.json", gold_pairs=True, generator=EchoGenerator())
    assert not (tmp_path / "r.json").exists() and not sidecar(tmp_path / "r.json", ".progress.jsonl").exists()
    with pytest.raises(LmrcError, match="choose one of --candidates and --gold-pairs"):
        predict(adapter, docs_file, tmp_path / "r.json", candidates_path=docs_file, gold_pairs=True)


def test_top_p_near_zero_samples_the_greedy_answer():
    tok = smollm2_tokenizer()
    prompts = [tok("(Alpha| -| Beta)\n")["input_ids"], tok("x")["input_ids"]]
    greedy = _tiny_generator(2).generate(prompts, [8, 8])
    narrow = _tiny_generator(2, do_sample=True, temperature=1.5, top_p=1e-6, seed=3).generate(prompts, [8, 8])
    assert [g.text for g in narrow] == [g.text for g in greedy]


def test_a_merged_adapter_generates_what_the_unmerged_one_does(adapter):

    tok = smollm2_tokenizer()
    prompts = [tok("(Alpha| -| Beta)\n")["input_ids"]]
    outputs = []
    for merge in (False, True):
        cfg = load_adapter_config(adapter, [f"generation.merge_adapter={str(merge).lower()}"])
        gen = HFGenerator.load(cfg, adapter, device="cpu")
        assert hasattr(gen.model, "peft_config") != merge  # merged: a plain model, no LoRA layers left
        outputs.append([g.text for g in gen.generate(prompts, [6])])
    assert outputs[0] == outputs[1]
