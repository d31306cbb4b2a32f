"""Stage-1 training: the loss goes down, gradient accumulation weighs micro-batches right, `--resume` replays the
uninterrupted run exactly (after a time box and after Ctrl-C), and bad configs fail with one clear line.

A tiny random BERT (2 layers, 32-d) with the real MiniLM tokenizer, on a few short real Re-DocRED documents.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from stage1_run_helpers import (
    one_entity_doc,
    save_tiny_bert,
    shortest,
    single_thread,  # noqa: F401  (autouse fixture)
    tiny_config,
    write_docs,
)

from lmrc.cli import main
from lmrc.data.split import fold_indices
from lmrc.errors import LmrcError
from lmrc.stage1 import train as train_mod
from lmrc.stage1.config import load_stage1_config
from lmrc.stage1.losses import build_loss
from lmrc.stage1.steps import make_optimizer
from lmrc.stage1.train import train


@pytest.fixture(scope="module")
def files(tmp_path_factory, dev_docs, redocred_dir, cache_dir):
    root = tmp_path_factory.mktemp("stage1-train")
    docs = shortest(dev_docs, 7)
    return {
        "encoder": save_tiny_bert(root / "tiny"),
        "encoder_no_dropout": save_tiny_bert(root / "tiny-nodrop", dropout=0.0),
        "train": write_docs(root / "train.json", docs[:5]),
        "tune": write_docs(root / "tune.json", docs[5:7]),
        "rel_info": redocred_dir / "rel_info.json",
    }


def cfg(files, out: Path, *overrides: str, encoder: str = "encoder"):
    return tiny_config(files[encoder], files["train"], files["tune"], files["rel_info"], out, *overrides)


def test_training_lowers_the_loss_and_keeps_the_best_checkpoint(files, tmp_path):
    result = train(cfg(files, tmp_path / "run", "train.epochs=4"))
    per_epoch = len(result.step_losses) // 4
    first = sum(loss for _, loss in result.step_losses[:per_epoch]) / per_epoch
    last = sum(loss for _, loss in result.step_losses[-per_epoch:]) / per_epoch
    assert result.finished and result.global_step == result.total_steps == 4 * 3  # 5 docs / batch 2 = 3 steps
    assert last < 0.9 * first
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [3, 6, 9, 12]
    assert {"f1", "ign_f1", "pair_f1", "loss"} <= set(records[0]["tune"])
    best = max(records, key=lambda r: r["value"])  # the first of equal values wins, as in training
    assert result.best_step == best["step"]
    meta = json.loads((tmp_path / "run" / "best" / "stage1.json").read_text())
    assert meta["selection"]["step"] == best["step"] and meta["loss"]["name"] == "atl"
    assert (tmp_path / "run" / "best" / "encoder" / "config.json").is_file()
    assert (tmp_path / "run" / "best" / "encoder" / "tokenizer.json").is_file()


def test_the_last_short_accumulation_group_is_not_down_weighted(files, tmp_path):
    """3 documents, batch 1, grad_accum 2: step 1 = mean of two documents' losses, step 2 = the third's alone.

    With no dropout and a learning rate of ~0 the weights stay put, so the reference losses are the final
    model's losses on each document, computed separately.
    """
    from lmrc.stage1.checkpoint import load_checkpoint
    from lmrc.stage1.features import featurize, length_grouped_batches
    from lmrc.stage1.inference import infer_logits

    docs = json.loads(files["train"].read_text())[:3]
    train_file = tmp_path / "three.json"
    train_file.write_text(json.dumps(docs))
    config = tiny_config(
        files["encoder_no_dropout"], train_file, None, files["rel_info"], tmp_path / "run",
        "train.epochs=1", "train.batch_size=1", "train.grad_accum=2", "train.lr_encoder=0", "train.lr_head=1e-12",
    )  # fmt: skip
    result = train(config)
    assert [s for s, _ in result.step_losses] == [1, 2]

    ck = load_checkpoint(tmp_path / "run" / "best")
    from lmrc.data.docred import load_documents

    documents = load_documents(train_file, ck.relations)
    feats = [featurize(d, ck.tokenizer, ck.relations) for d in documents]
    logits = infer_logits(ck.model, feats, 1, "cpu")
    per_doc = [float(ck.loss(lg, torch.tensor(f.labels))) for lg, f in zip(logits, feats)]
    order = [b[0] for b in length_grouped_batches(feats, 1, seed=config.train.seed)]
    expected = [(per_doc[order[0]] + per_doc[order[1]]) / 2, per_doc[order[2]]]
    assert [loss for _, loss in result.step_losses] == pytest.approx(expected, rel=1e-5)


def _tensors_equal(a: Path, b: Path) -> bool:
    ta, tb = load_file(str(a)), load_file(str(b))
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def _metrics_without_timing(path: Path) -> list[dict]:
    records = [json.loads(line) for line in path.read_text().splitlines()]
    for r in records:
        r.pop("eval_s"), r.pop("elapsed_s")
    return records


def test_resume_after_a_time_box_continues_exactly(files, tmp_path):
    # 5 docs, batch 2 -> 3 micro-batches per epoch; grad_accum 2 -> groups of 2 and 1; dropout on (RNG matters)
    extra = ("train.epochs=3", "train.grad_accum=2", "train.warmup_ratio=0.2", "train.deterministic=true")
    full = train(cfg(files, tmp_path / "a", *extra))
    part = train(cfg(files, tmp_path / "b", *extra), stop_after_steps=3)  # stops mid-epoch 2
    assert not part.finished and part.global_step == 3
    rest = train(cfg(files, tmp_path / "b", *extra), resume=True)
    assert rest.finished
    assert rest.step_losses == full.step_losses[3:]  # bit-identical floats
    assert _tensors_equal(tmp_path / "a/last/model.safetensors", tmp_path / "b/last/model.safetensors")
    assert _tensors_equal(tmp_path / "a/best/model.safetensors", tmp_path / "b/best/model.safetensors")
    assert _metrics_without_timing(tmp_path / "a/metrics.jsonl") == _metrics_without_timing(
        tmp_path / "b/metrics.jsonl"
    )


def test_ctrl_c_saves_the_last_step_and_resume_replays_the_rest(files, tmp_path, monkeypatch):
    extra = ("train.grad_accum=2", "train.save_every_steps=0", "train.deterministic=true")
    full = train(cfg(files, tmp_path / "a", *extra))
    calls = {"n": 0}
    original = train_mod.Stage1Recipe._micro_step

    def interrupt_in_step_two(self, inputs, *scale):
        # 3 micro-batches per epoch in groups of 2 and 1: the third call is step 2, mid-epoch
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(self, inputs, *scale)

    monkeypatch.setattr(train_mod.Stage1Recipe, "_micro_step", interrupt_in_step_two)
    with pytest.raises(KeyboardInterrupt):
        train(cfg(files, tmp_path / "b", *extra))
    monkeypatch.setattr(train_mod.Stage1Recipe, "_micro_step", original)
    state = json.loads((tmp_path / "b/last/trainer_state.json").read_text())
    assert (state["global_step"], state["batch_pos"], state["done"]) == (1, 2, False)
    rest = train(cfg(files, tmp_path / "b", *extra), resume=True)
    assert rest.step_losses == full.step_losses[1:]


def test_resume_refuses_a_changed_config_and_a_rerun_needs_resume(files, tmp_path):
    train(cfg(files, tmp_path / "run", "train.epochs=1"))
    with pytest.raises(LmrcError, match="holds a training run already; pass --resume"):
        train(cfg(files, tmp_path / "run", "train.epochs=1"))
    with pytest.raises(LmrcError, match=r"train\.lr_head was 0\.001, now 0\.002"):
        train(cfg(files, tmp_path / "run", "train.epochs=1", "train.lr_head=2e-3"), resume=True)
    again = train(cfg(files, tmp_path / "run", "train.epochs=1"), resume=True)  # finished: nothing to do
    assert again.finished and again.step_losses == []


def test_a_batch_of_one_entity_documents_trains_without_error(files, tmp_path, dev_docs):
    docs = json.loads(files["train"].read_text())[:2]
    docs.append(one_entity_doc(shortest(dev_docs, 8)[7]))
    path = tmp_path / "with-single.json"
    path.write_text(json.dumps(docs))
    config = tiny_config(
        files["encoder"], path, files["tune"], files["rel_info"], tmp_path / "run", "train.batch_size=1",
        "train.epochs=1",
    )  # fmt: skip
    result = train(config)
    assert result.finished and len(result.step_losses) == 3
    assert all(loss == loss for _, loss in result.step_losses)  # no NaN from the empty batch


def test_unknown_loss_name_fails_with_one_line(files, tmp_path, capsys):
    with pytest.raises(LmrcError, match="unknown loss 'focal'"):
        load_stage1_config(None, ["loss.name=focal"])
    code = main(["stage1", "train", "--set", "loss.name=focal", "--output-dir", str(tmp_path / "x")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("lmrc: error:") and "focal" in err[0]


def test_data_paths_expand_environment_variables_and_name_an_unset_one(monkeypatch, tmp_path):
    config = load_stage1_config(None, ["data.train=${LMRC_TEST_DATA}/train.json"])
    monkeypatch.setenv("LMRC_TEST_DATA", str(tmp_path))
    assert config.data.path("train") == tmp_path / "train.json"
    monkeypatch.delenv("LMRC_TEST_DATA")
    with pytest.raises(LmrcError, match=r"data\.train: .*\$\{LMRC_TEST_DATA\}, which is not set"):
        config.data.path("train")


def test_cross_fitting_folds_partition_the_documents():
    folds = fold_indices(11, 3, seed=13)
    assert sorted(i for f in folds for i in f) == list(range(11))
    assert [len(f) for f in folds] == [4, 4, 3] and all(f == sorted(f) for f in folds)
    assert folds == fold_indices(11, 3, seed=13) and folds != fold_indices(11, 3, seed=14)


def test_yaml_configs_in_the_repository_load(monkeypatch):
    monkeypatch.setenv("LMRC_DATA_DIR", "/data")
    root = Path(__file__).resolve().parents[1] / "configs"
    paths = sorted(root.glob("stage1_*.yaml"))
    assert paths, "no stage-1 configs"
    for path in paths:
        config = load_stage1_config(path)
        config.data.path("rel_info")
        if config.loss.name != "amtl":  # amtl's segments come from the training data
            build_loss(config.loss.name, **config.loss.params)


def test_cli_train_writes_its_log_and_resumes_from_the_saved_config(files, tmp_path, caplog, capsys):
    import logging

    caplog.set_level(logging.INFO)
    out = tmp_path / "run"
    sets = [
        f"model.encoder={files['encoder']}", "model.emb_size=64", "model.block_size=16",
        f"data.train={files['train']}", f"data.tune={files['tune']}", f"data.rel_info={files['rel_info']}",
        "train.epochs=2", "train.batch_size=2",
    ]  # fmt: skip
    args = ["stage1", "train", "--output-dir", str(out), "--stop-after-steps", "2"]
    for s in sets:
        args += ["--set", s]
    assert main(args) == 0
    assert "training paused" in capsys.readouterr().out
    assert main(["stage1", "train", "--resume", "--output-dir", str(out)]) == 0
    assert "training finished: step 6 of 6" in capsys.readouterr().out
    log = (out / "train.log").read_text()
    assert "resuming" in log and "eval at step 6" in log


def test_early_stopping_after_patience_evaluations_without_improvement(files, tmp_path):
    # frozen weights (lr ~0, no dropout): the tuning F1 never improves after the first evaluation
    config = cfg(
        files, tmp_path / "run", "train.epochs=5", "train.patience=2", "train.lr_encoder=0", "train.lr_head=1e-12",
        encoder="encoder_no_dropout",
    )  # fmt: skip
    result = train(config)
    assert result.stopped_early and result.finished
    assert [r["step"] for r in result.evaluations] == [3, 6, 9]  # 3 steps per epoch; stop after epoch 3
    assert result.best_step == 3


def test_evaluations_by_steps_and_by_epochs_are_not_repeated(files, tmp_path):
    result = train(cfg(files, tmp_path / "run", "train.eval_every_steps=2"))  # 3 steps per epoch, 2 epochs
    assert [r["step"] for r in result.evaluations] == [2, 3, 4, 6]


def test_a_pause_right_after_an_evaluation_does_not_repeat_it_on_resume(files, tmp_path):
    """Step 3 ends epoch 1 and is evaluated by steps; a run paused there does not evaluate step 3 again at the
    epoch's end when resumed (the uninterrupted run evaluates it once, and a repeat would count against
    patience)."""
    full = train(cfg(files, tmp_path / "a", "train.eval_every_steps=3"))  # 3 steps per epoch, 2 epochs
    part = train(cfg(files, tmp_path / "b", "train.eval_every_steps=3"), stop_after_steps=3)
    rest = train(cfg(files, tmp_path / "b", "train.eval_every_steps=3"), resume=True)
    assert [r["step"] for r in full.evaluations] == [3, 6]
    assert [r["step"] for r in part.evaluations + rest.evaluations] == [3, 6]
    records = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [3, 6]


def test_learning_rates_in_exponent_notation_are_numbers():
    # YAML 1.1 reads "3e-5" (no dot) as a string; the config layer accepts it as the number users mean
    config = load_stage1_config(None, ["train.lr_encoder=3e-5", "train.lr_head=1E-4"])
    assert (config.train.lr_encoder, config.train.lr_head) == (3e-5, 1e-4)
    with pytest.raises(LmrcError, match="lr_head: expected a number"):
        load_stage1_config(None, ["train.lr_head=fast"])


def test_the_fp16_loss_scaler_state_is_saved_and_restored(tmp_path):
    """fp16 runs on CUDA: the scaler's scale and growth tracker survive --resume (written as scaler.json)."""
    import torch

    from lmrc.training.run_folder import ResumeState, capture_rng, read_resume_state, write_resume_state

    scaler = torch.amp.GradScaler("cpu", init_scale=512.0)
    saved = {k: (float(v) if hasattr(v, "item") else v) for k, v in scaler.state_dict().items()}
    assert saved["scale"] == 512.0

    def state(scaler_state):
        return ResumeState(position={"step": 3}, optimizer={"state": {}, "param_groups": []}, scheduler={},
                           rng=[capture_rng()], scaler=scaler_state)  # fmt: skip

    (tmp_path / "a").mkdir()
    write_resume_state(tmp_path / "a", state(saved))
    restored = torch.amp.GradScaler("cpu")
    restored.load_state_dict(read_resume_state(tmp_path / "a").scaler)
    assert restored.get_scale() == 512.0 and restored.state_dict() == scaler.state_dict()
    (tmp_path / "b").mkdir()
    write_resume_state(tmp_path / "b", state(None))
    assert read_resume_state(tmp_path / "b").scaler is None


def test_plain_shuffled_batches_as_the_reference_code(files, tmp_path):
    """train.length_grouped: false: each epoch is a seeded permutation cut into batches (ATLOP's shuffle)."""
    config = tiny_config(
        files["encoder_no_dropout"], files["train"], None, files["rel_info"], tmp_path / "run",
        "train.epochs=1", "train.batch_size=2", "train.length_grouped=false",
    )  # fmt: skip
    result = train(config)
    assert result.finished and result.global_step == -(-len(json.loads(files["train"].read_text())) // 2)


def test_the_optimizer_takes_weight_decay_and_adam_eps_and_the_select_metric_is_checked():
    from types import SimpleNamespace

    config = load_stage1_config(None, ["train.weight_decay=0.01", "train.adam_eps=1e-8"])
    model = SimpleNamespace(
        encoder_parameters=lambda: [torch.nn.Parameter(torch.zeros(2))],
        head_parameters=lambda: [torch.nn.Parameter(torch.zeros(3))],
    )
    optimizer, _ = make_optimizer(model, config.train, total_steps=10)
    assert optimizer.defaults["weight_decay"] == 0.01 and optimizer.defaults["eps"] == 1e-8
    assert (
        load_stage1_config(None, ["train.select_metric=pair_f1"]).train.resolved_select_metric("atl")
        == "pair_f1"
    )
    assert load_stage1_config(None, []).train.resolved_select_metric("bce") == "pair_f1"
    with pytest.raises(LmrcError, match="select_metric must be one of"):
        load_stage1_config(None, ["train.select_metric=accuracy"])
    with pytest.raises(LmrcError, match="bce has none"):
        load_stage1_config(None, ["loss.name=bce", "train.select_metric=f1"])
