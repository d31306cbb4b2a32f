"""Stage-2 LoRA training on a tiny random Llama: loss, resume, adapter round trip, export, schedule, batching."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from stage2_helpers import smollm2_tokenizer, tiny_model_dir

from lmrc.errors import LmrcError
from lmrc.io import read_json, read_jsonl
from lmrc.stage2.config import load_stage2_config
from lmrc.stage2.run_callback import STATE_DIR
from lmrc.stage2.train import prepare_output_dir, train
from lmrc.stage2.train_data import build_training_examples, load_training_documents, load_training_template
from lmrc.training.schedule import length_grouped_batches, linear_schedule


def _cfg(redocred_dir, *extra: str):
    return load_stage2_config(
        None,
        [
            f"model={tiny_model_dir()}",
            f"data.train={redocred_dir / 'dev_50.json'}",
            f"data.rel_info={redocred_dir / 'rel_info.json'}",
            "data.max_docs=1",
            "max_seq_len=1024",
            "dtype=float32",
            "train.batch_size=1",
            "train.warmup_steps=0",
            *extra,
        ],
    )


@pytest.fixture(scope="module")
def reference_run(redocred_dir, tmp_path_factory):
    """An uninterrupted 6-step run; the resume test must reproduce its losses."""
    cfg = _cfg(
        redocred_dir, "train.epochs=3", "train.max_steps=6", "train.lr=0.05", "train.save_every_steps=2"
    )
    out = tmp_path_factory.mktemp("stage2-run")
    result = train(cfg, out)
    return cfg, out, result


def test_first_step_loss_is_the_mean_answer_token_cross_entropy(reference_run):
    cfg, _, result = reference_run
    from transformers import AutoModelForCausalLM

    relations, docs = load_training_documents(cfg)
    template, _ = load_training_template(cfg)
    examples, _ = build_training_examples(cfg, smollm2_tokenizer(), relations, docs, template)
    first = examples[length_grouped_batches([len(e) for e in examples], 1, cfg.train.seed)[0][0]]
    # LoRA starts with B = 0, so step 1 sees the base model; transformers' own loss averages over labels != -100.
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir()), dtype=torch.float32)
    with torch.no_grad():
        expected = base(
            input_ids=torch.tensor([first.input_ids]), labels=torch.tensor([first.labels])
        ).loss.item()
    assert result.losses[0] == pytest.approx(expected, rel=1e-5)


def _mean_answer_loss(model, examples) -> float:
    from lmrc.stage2.trainer import answer_loss_sum, collate

    total = tokens = 0.0
    with torch.no_grad():
        for ex in examples:
            batch = collate([ex], smollm2_tokenizer().pad_token_id)
            total += float(answer_loss_sum(model, batch))
            tokens += ex.n_answer_tokens
    return total / tokens


def test_lora_training_lowers_the_loss_on_the_training_examples(reference_run):
    cfg, out, result = reference_run
    from transformers import AutoModelForCausalLM

    from lmrc.stage2.modeling import load_adapter

    assert result.steps == 6 and result.finished
    logged = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in logged] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in logged] == result.losses
    relations, docs = load_training_documents(cfg)
    template, _ = load_training_template(cfg)
    examples, _ = build_training_examples(cfg, smollm2_tokenizer(), relations, docs, template)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir()), dtype=torch.float32).eval()
    trained = load_adapter(out, device=torch.device("cpu")).model
    before, after = _mean_answer_loss(base, examples), _mean_answer_loss(trained, examples)
    assert after < before - 0.5, (before, after)


def test_resume_reproduces_the_losses_of_an_uninterrupted_run(reference_run, tmp_path):
    cfg, _, ref = reference_run
    out = tmp_path / "run"

    def fail_at(step, exc):
        def hook(record):
            if record["step"] == step:
                raise exc

        return hook

    # Ctrl-C after step 3: the state of step 3 is saved on the way out.
    with pytest.raises(KeyboardInterrupt):
        train(cfg, out, on_step=fail_at(3, KeyboardInterrupt()))
    assert json.loads((out / STATE_DIR / "state.json").read_text())["step"] == 3
    # A time-boxed call: one more step, then pause.
    paused = train(cfg, out, resume=True, stop_after_steps=1)
    assert not paused.finished and paused.steps == 4
    assert not (out / "adapter_config.json").exists()
    # A hard crash at step 5 saves nothing: the run continues from the periodic save at step 4.
    with pytest.raises(RuntimeError):
        train(cfg, out, resume=True, on_step=fail_at(5, RuntimeError("killed")))
    final = train(cfg, out, resume=True)
    assert final.finished and final.steps == 6
    assert paused.losses == pytest.approx(ref.losses[3:4], rel=1e-6, abs=1e-7)
    assert final.losses == pytest.approx(ref.losses[4:], rel=1e-6, abs=1e-7)
    logged = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in logged] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in logged] == pytest.approx(ref.losses, rel=1e-6, abs=1e-7)
    # --resume of a finished run changes nothing; a run killed between its last save and the adapter folder
    # writes the adapter from last/
    # the summary counts the tokens of all six steps, trained over four calls, as the one-call run saw them
    one_call = read_json(reference_run[1] / "train_summary.json")
    assert one_call["tokens_trained"] == one_call["tokens_this_call"] == ref.tokens > 0
    assert read_json(out / "train_summary.json")["tokens_trained"] == ref.tokens
    adapter = (out / "adapter_model.safetensors").read_bytes()
    again = train(cfg, out, resume=True)
    assert again.finished and again.steps == 6 and not again.losses
    summary = read_json(out / "train_summary.json")  # a call that trained nothing keeps the run's record
    assert summary["tokens_trained"] == ref.tokens and summary["final_loss"] == pytest.approx(ref.losses[-1])
    assert (out / "adapter_model.safetensors").read_bytes() == adapter
    (out / "adapter_config.json").unlink()
    (out / "adapter_model.safetensors").unlink()
    train(cfg, out, resume=True)
    from safetensors.torch import load_file

    rewritten = load_file(str(out / "adapter_model.safetensors"))
    saved = load_file(str(out / STATE_DIR / "adapter_model.safetensors"))
    assert rewritten.keys() == saved.keys() and all(torch.equal(rewritten[k], saved[k]) for k in saved)


def test_saved_adapter_reloads_to_identical_logits(reference_run):
    _, out, _ = reference_run
    from peft import PeftModel, set_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from lmrc.stage2.modeling import load_adapter

    ids = torch.tensor([smollm2_tokenizer()("(Alpha| country| Beta)")["input_ids"]])
    loaded = load_adapter(out, device=torch.device("cpu"))
    # The in-memory weights at the end of training are those of the last/ state saved at the final step.
    manual = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(str(tiny_model_dir()), dtype=torch.float32), str(out)
    )
    set_peft_model_state_dict(manual, load_file(str(out / STATE_DIR / "adapter_model.safetensors")))
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir()), dtype=torch.float32)
    with torch.no_grad():
        a = loaded.model(input_ids=ids).logits
        b = manual.eval()(input_ids=ids).logits
        c = base(input_ids=ids).logits
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)  # the adapter does change the model


def test_peft_round_trip_of_random_lora_weights_is_exact(redocred_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lmrc.stage2.modeling import wrap_lora

    cfg = _cfg(redocred_dir)
    model = wrap_lora(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir()), dtype=torch.float32), cfg)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.5)
    model.save_pretrained(str(tmp_path))
    assert (tmp_path / "adapter_model.safetensors").is_file()
    reloaded = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(str(tiny_model_dir()), dtype=torch.float32), str(tmp_path)
    )
    ids = torch.tensor([[5, 17, 300, 4000, 12]])
    with torch.no_grad():
        assert torch.equal(model.eval()(input_ids=ids).logits, reloaded.eval()(input_ids=ids).logits)


def test_export_merges_the_adapter_into_a_plain_model(reference_run, tmp_path):
    _, out, _ = reference_run
    from transformers import AutoModelForCausalLM

    from lmrc.stage2.modeling import export_merged, load_adapter

    merged_dir = export_merged(out, tmp_path / "merged", dtype="float32")
    assert (merged_dir / "model.safetensors").is_file() and (merged_dir / "tokenizer.json").is_file()
    assert not (merged_dir / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(str(merged_dir), dtype=torch.float32)
    adapter = load_adapter(out, device=torch.device("cpu")).model
    ids = torch.tensor([[5, 17, 300, 4000, 12]])
    with torch.no_grad():
        torch.testing.assert_close(
            merged(input_ids=ids).logits, adapter(input_ids=ids).logits, rtol=1e-4, atol=1e-5
        )
    with pytest.raises(LmrcError, match="not empty"):
        export_merged(out, merged_dir)


def test_both_stages_share_one_schedule_warmup_from_zero_then_linear_decay():
    """transformers' get_linear_schedule_with_warmup: the lr of step k (0-based) is lr * k / warmup during the
    warmup, then lr * (total - k) / (total - warmup), recomputed here by hand."""
    import torch

    def lrs(warmup, total):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
        sched = linear_schedule(opt, warmup, total)
        out = []
        for _ in range(total):
            out.append(sched.get_last_lr()[0])
            opt.step()
            sched.step()
        return out

    assert lrs(2, 6) == pytest.approx([0.0, 1.0, 2.0, 1.5, 1.0, 0.5])
    assert lrs(0, 4) == pytest.approx([2.0, 1.5, 1.0, 0.5])


def test_length_grouped_batches_cover_every_example_once_with_similar_lengths():
    lengths = [5, 100, 7, 98, 6, 99, 50, 51, 52]
    batches = length_grouped_batches(lengths, 3, seed=0)
    assert sorted(i for b in batches for i in b) == list(range(9))
    groups = sorted(sorted(lengths[i] for i in b) for b in batches)
    assert groups == [[5, 6, 7], [50, 51, 52], [98, 99, 100]]
    assert batches == length_grouped_batches(lengths, 3, seed=0)
    orders = {tuple(map(tuple, length_grouped_batches(lengths, 3, seed=s))) for s in range(6)}
    assert len(orders) > 1  # the batch order is shuffled per seed (epoch)


def test_output_dir_with_an_unfinished_run_needs_resume(tmp_path):
    (tmp_path / STATE_DIR).mkdir()
    (tmp_path / STATE_DIR / "state.json").write_text('{"step": 1}')
    with pytest.raises(LmrcError, match="--resume"):
        prepare_output_dir(tmp_path, resume=False)
    assert prepare_output_dir(tmp_path, resume=True) == tmp_path / STATE_DIR
    assert prepare_output_dir(tmp_path / "fresh", resume=True) is None


def test_resume_with_a_different_config_is_refused(reference_run, redocred_dir, tmp_path):
    cfg, _, _ = reference_run
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train(cfg, out, on_step=lambda r: (_ for _ in ()).throw(KeyboardInterrupt()))
    changed = _cfg(
        redocred_dir, "train.epochs=3", "train.max_steps=6", "train.lr=0.01", "train.save_every_steps=2"
    )
    with pytest.raises(LmrcError, match="train.lr"):
        train(changed, out, resume=True)


def test_load_in_4bit_on_cpu_is_a_clear_error(redocred_dir):
    from lmrc.stage2.modeling import load_base_model

    cfg = _cfg(redocred_dir, "load_in_4bit=true")
    with pytest.raises(LmrcError, match="CUDA"):
        load_base_model(cfg, tiny_model_dir(), torch.device("cpu"), training=True)


def test_unknown_lora_target_module_names_the_available_ones(redocred_dir):
    from transformers import AutoModelForCausalLM

    from lmrc.stage2.modeling import wrap_lora

    cfg = _cfg(redocred_dir, "lora.target_modules=[query_key_value]")
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir()), dtype=torch.float32)
    with pytest.raises(LmrcError, match="q_proj"):
        wrap_lora(model, cfg)


def test_paper_epochs_and_warmup_follow_the_mode():
    rc = load_stage2_config(None, [])
    direct = load_stage2_config(None, ["mode=direct"])
    assert (rc.train.epochs, rc.train.warmup_steps) == (8, 100)  # LMRC Table 7, RC stage
    assert (direct.train.epochs, direct.train.warmup_steps) == (2, 200)  # LMRC Table 7, Pre
    assert (rc.lora.r, rc.lora.alpha, rc.train.lr, rc.train.batch_size) == (8, 16, 1e-4, 4)


def test_gradient_checkpointing_gives_the_same_first_loss(reference_run, tmp_path):
    cfg, _, ref = reference_run
    cfg = copy.deepcopy(cfg)
    cfg.train.gradient_checkpointing = True
    cfg.train.max_steps = 1
    result = train(cfg, tmp_path / "gc")
    assert result.losses[0] == pytest.approx(ref.losses[0], rel=1e-5)


def test_false_positive_candidates_are_matched_by_title_and_checked(redocred_dir, tmp_path):
    from lmrc.data.candidates import (
        CandidatePair,
        Candidates,
        CandidatesHeader,
        DocumentCandidates,
        save_candidates,
    )
    from lmrc.stage2.train_data import load_false_positive_candidates

    cfg = _cfg(redocred_dir, "rc_allow_none=true", f"data.candidates={tmp_path / 'c.json'}")
    _, docs = load_training_documents(cfg)
    doc = docs[0]
    header = CandidatesHeader(model="m", head="atl", threshold=0.0)
    pairs = (CandidatePair(0, 1, 2.0), CandidatePair(2, 0, 1.0))
    save_candidates(
        Candidates(header, [DocumentCandidates(doc.title, pairs, len(doc.entities))]), tmp_path / "c.json"
    )
    assert load_false_positive_candidates(cfg, docs) == {doc.title: [(0, 1), (2, 0)]}
    wrong = DocumentCandidates(doc.title, pairs, len(doc.entities) + 1)
    save_candidates(Candidates(header, [wrong]), tmp_path / "c.json")
    with pytest.raises(LmrcError, match="n_entities"):
        load_false_positive_candidates(cfg, docs)


def test_cli_train_pauses_and_resumes_from_the_saved_config(redocred_dir, tmp_path, capsys):
    from lmrc.cli import main

    out = tmp_path / "run"
    sets = [
        f"model={tiny_model_dir()}",
        f"data.train={redocred_dir / 'dev_50.json'}",
        f"data.rel_info={redocred_dir / 'rel_info.json'}",
        "data.max_docs=1",
        "max_seq_len=1024",
        "train.max_steps=2",
        "train.warmup_steps=0",
    ]
    args = [x for s in sets for x in ("--set", s)]
    assert main(["stage2", "train", *args, "--output-dir", str(out), "--stop-after-steps", "1"]) == 0
    assert "paused" in capsys.readouterr().out
    assert main(["stage2", "train", "--resume", "--output-dir", str(out)]) == 0
    assert "training finished: step 2 of 2" in capsys.readouterr().out
    assert (out / "adapter_model.safetensors").is_file() and (out / "train.log").is_file()
    saved = load_stage2_config(out / "config.yaml")
    assert saved.model == str(tiny_model_dir()) and saved.output_dir == str(out)


def test_sharded_training_leaves_the_weights_where_they_were_loaded(redocred_dir):
    """Under FSDP / ZeRO-3 the Trainer shards the model; a full copy moved to every GPU first defeats that."""
    from lmrc.stage2.modeling import load_base_model

    cfg = _cfg(redocred_dir)
    meta = torch.device("meta")  # stands for a GPU: a move there is visible, and costs nothing
    kept = load_base_model(cfg, tiny_model_dir(), meta, training=True, place=False, dtype=torch.float32)
    assert {p.device.type for p in kept.parameters()} == {"cpu"}
    moved = load_base_model(cfg, tiny_model_dir(), meta, training=True)
    assert {p.device.type for p in moved.parameters()} == {"meta"}


def test_snapshots_keep_the_adapter_of_the_step_that_reaches_each_budget(
    reference_run, redocred_dir, tmp_path
):
    """train.snapshot_tokens: the adapter as it was at the first step whose tokens reach each count (the
    max_tokens rule), in a folder predict reads, with the tokens it had trained on; the run itself unchanged."""
    from safetensors.torch import load_file

    from lmrc.stage2.adapter_folder import SNAPSHOTS_DIR
    from lmrc.stage2.budget import steps_for_tokens, tokens_for_steps

    cfg, _, ref = reference_run
    relations, docs = load_training_documents(cfg)
    template, _ = load_training_template(cfg)
    examples, _ = build_training_examples(cfg, smollm2_tokenizer(), relations, docs, template)
    lengths = [len(e) for e in examples]
    after2 = tokens_for_steps(lengths, cfg, 1, 2)
    # exactly step 2's count -> step 2; one token more -> step 3; the run's own end -> no snapshot (the adapter)
    budgets = [after2, after2 + 1, tokens_for_steps(lengths, cfg, 1, 6)]
    assert [steps_for_tokens(lengths, cfg, 1, b) for b in budgets] == [2, 3, 6]
    snap_cfg = copy.deepcopy(cfg)
    snap_cfg.train.snapshot_tokens = budgets
    out = tmp_path / "run"
    result = train(snap_cfg, out)
    assert result.losses == pytest.approx(ref.losses, rel=1e-6, abs=1e-7)  # keeping snapshots changes nothing
    folders = sorted(p.name for p in (out / SNAPSHOTS_DIR).iterdir())
    assert folders == sorted(f"tokens-{b}" for b in budgets[:2])
    # the weights of step 2 (and 3): what a run paused after that step holds in its resumable state
    for budget, step in zip(budgets[:2], (2, 3)):
        snap = out / SNAPSHOTS_DIR / f"tokens-{budget}"
        meta = read_json(snap / "train_summary.json")
        assert (meta["steps"], meta["tokens_trained"]) == (step, tokens_for_steps(lengths, cfg, 1, step))
        paused = tmp_path / f"paused-{step}"
        train(cfg, paused, stop_after_steps=step)
        want = load_file(str(paused / STATE_DIR / "adapter_model.safetensors"))
        got = load_file(str(snap / "adapter_model.safetensors"))
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
        assert load_stage2_config(snap / "config.yaml").mode == cfg.mode
        # the files of a finished adapter folder, as `lmrc stage2 predict --adapter` reads them
        assert {f.name for f in snap.iterdir()} <= {f.name for f in out.iterdir()}
        assert {"adapter_config.json", "prompt_template.txt", "rel_info.json"} <= {
            f.name for f in snap.iterdir()
        }
    with pytest.raises(LmrcError, match="snapshot_tokens"):
        _cfg(redocred_dir, "train.snapshot_tokens=[5, 5]")


def test_a_finished_run_killed_before_its_adapter_folder_is_written_from_last_without_loading_the_model(
    reference_run, tmp_path, monkeypatch
):
    """Under DeepSpeed the Trainer's save_model needs the engine-wrapped model, which a run with nothing left to
    train never builds: the adapter is copied from last/ (the Trainer's checkpoint holds it whole)."""
    import shutil

    from lmrc.stage2 import train as train_mod

    cfg, ref_out, ref = reference_run
    out = tmp_path / "run"
    shutil.copytree(ref_out, out)
    (out / "adapter_config.json").unlink()
    (out / "adapter_model.safetensors").unlink()

    def no_model(*a, **kw):
        raise AssertionError("a finished run loads no model")

    monkeypatch.setattr(train_mod, "load_base_model", no_model)
    result = train_mod.train(cfg, out, resume=True)
    assert result.finished and result.steps == ref.steps and not result.losses
    assert (out / "adapter_model.safetensors").read_bytes() == (
        out / STATE_DIR / "adapter_model.safetensors"
    ).read_bytes()
    assert (out / "adapter_model.safetensors").read_bytes() == (
        ref_out / "adapter_model.safetensors"
    ).read_bytes()
    assert {"tokenizer.json", "config.yaml", "prompt_template.txt", "rel_info.json"} <= {
        p.name for p in out.iterdir()
    }
    assert read_json(out / "train_summary.json")["tokens_trained"] == ref.tokens
    (out / STATE_DIR / "adapter_model.safetensors").unlink()  # a sharded checkpoint: nothing whole to copy
    (out / "adapter_config.json").unlink()
    with pytest.raises(LmrcError, match="holds no whole adapter"):
        train_mod.train(cfg, out, resume=True)
