"""Stage 1 on a small corpus (lmrc/stage1/small_corpus.py): `train.min_steps` raises the epochs and the schedule's
total, `loss.name: auto` picks the small-corpus head and saves its name, `data.tune_fraction` carves a seeded
tuning split that a resumed run reuses, and a model that predicts (almost) nothing says so, in the log and in
train_summary.json.

A tiny random BERT (2 layers, 32-d) with the real MiniLM tokenizer, on a few short real Re-DocRED documents.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from stage1_run_helpers import (
    save_tiny_bert,
    shortest,
    single_thread,  # noqa: F401  (autouse fixture)
    tiny_config,
    write_docs,
)

from lmrc.cli import main
from lmrc.config import read_yaml
from lmrc.data.split import split_indices
from lmrc.errors import LmrcError
from lmrc.stage1.config import load_stage1_config
from lmrc.stage1.losses import build_loss
from lmrc.stage1.small_corpus import (
    NOTHING_LEARNED_FRACTION,
    SMALL_CORPUS_DOCS,
    SMALL_CORPUS_HEAD,
    SUMMARY_FILE,
    carve_tune_split,
    choose_head,
    nothing_learned,
    raise_epochs,
)
from lmrc.stage1.train import train
from lmrc.stage1.tune_eval import prediction_counts


@pytest.fixture(scope="module")
def files(tmp_path_factory, dev_docs, redocred_dir, cache_dir):
    root = tmp_path_factory.mktemp("stage1-small")
    docs = shortest(dev_docs, 7)
    return {
        "encoder": save_tiny_bert(root / "tiny"),
        "train": write_docs(root / "train.json", docs[:5]),
        "tune": write_docs(root / "tune.json", docs[5:7]),
        "rel_info": redocred_dir / "rel_info.json",
    }


def cfg(files, out: Path, *overrides: str, tune: bool = True):
    tune_file = files["tune"] if tune else None
    return tiny_config(files["encoder"], files["train"], tune_file, files["rel_info"], out, *overrides)


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------------------- min_steps


def test_min_steps_raises_the_epochs_and_the_schedules_total(files, tmp_path, caplog):
    """5 documents in batches of 2: 3 steps an epoch; 1 epoch with min_steps 7 trains 3 epochs, 9 steps, and the
    learning rate decays to 0 at step 9 (warmup int(0.2 * 9) = 1 step), recomputed here from the raised total."""
    caplog.set_level(logging.INFO)
    extra = ("train.epochs=1", "train.min_steps=7", "train.warmup_ratio=0.2")
    result = train(cfg(files, tmp_path / "a", *extra))
    assert result.finished and (result.global_step, result.total_steps, result.epochs_completed) == (9, 9, 3)
    assert "3 steps per epoch; training 3 epochs (9 steps, min_steps) instead of 1" in caplog.text
    total, warmup, lr0 = 9, int(0.2 * 9), 1e-3
    records = _records(tmp_path / "a")
    assert [r["step"] for r in records] == [3, 6, 9]
    for r in records:
        expected = lr0 * (total - r["step"]) / (total - warmup)
        assert r["lr_encoder"] == pytest.approx(expected, abs=1e-12) and r["lr_head"] == pytest.approx(
            expected
        )
    assert (
        records[-1]["lr_encoder"] == 0.0
    )  # the decayed value at the raised total (the unraised run ends at 3)
    for folder in ("a", "a/best", "a/last"):  # the run's config and the checkpoints' hold the raised epochs
        assert read_yaml(tmp_path / folder / "config.yaml")["train"]["epochs"] == 3

    # a time-boxed run resumed with the original config (epochs 1) continues the same 9-step run, as does the
    # saved config (epochs 3: no raise)
    part = train(cfg(files, tmp_path / "b", *extra), stop_after_steps=4)
    assert not part.finished and part.total_steps == 9
    rest = train(cfg(files, tmp_path / "b", *extra), resume=True)
    assert rest.finished and rest.global_step == 9 and [s for s, _ in rest.step_losses] == list(range(5, 10))
    saved = load_stage1_config(tmp_path / "b" / "config.yaml")
    assert saved.train.epochs == 3 and train(saved, resume=True).finished


def test_raise_epochs_is_a_floor_in_optimizer_steps(caplog):
    caplog.set_level(logging.INFO)
    base = load_stage1_config(None, ["train.epochs=10", "train.batch_size=4", "train.min_steps=1000"])
    raised = raise_epochs(base, 98, group_size=1)
    assert raised.train.epochs == 40  # ceil(98 / 4) = 25 steps an epoch, ceil(1000 / 25) = 40
    assert (
        "a small corpus: 98 documents give 25 steps per epoch; training 40 epochs (1,000 steps, min_steps) "
        "instead of 10" in caplog.text
    )
    assert raise_epochs(base, 98, group_size=2).train.epochs == 77  # ceil(25 / 2) = 13 steps, ceil(1000 / 13)
    assert raise_epochs(base, 400, group_size=1).train.epochs == 10  # 100 x 10 steps: enough already
    off = load_stage1_config(None, ["train.epochs=10", "train.batch_size=4"])
    assert raise_epochs(off, 98, group_size=1).train.epochs == 10  # min_steps 0: off
    with pytest.raises(LmrcError, match="min_steps must be 0 or more"):
        load_stage1_config(None, ["train.min_steps=-1"])


# ------------------------------------------------------------------------------------------------ loss: auto


def test_auto_head_picks_the_small_corpus_head_and_saves_its_name(files, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    extra = ("loss.name=auto", "model.n_layers_avg=1", "train.epochs=2")  # mdre averages 3 layers; tiny has 2
    part = train(cfg(files, tmp_path / "run", *extra), stop_after_steps=1)
    assert f"loss.name auto: 5 training documents, fewer than {SMALL_CORPUS_DOCS}" in caplog.text
    result = train(cfg(files, tmp_path / "run", *extra), resume=True)  # auto resolves to the saved head again
    assert not part.finished and result.finished
    run = tmp_path / "run"
    for folder in (run, run / "best", run / "last"):
        assert read_yaml(folder / "config.yaml")["loss"]["name"] == SMALL_CORPUS_HEAD == "mdre"
    assert json.loads((run / "best" / "stage1.json").read_text())["loss"]["name"] == "mdre"
    # the end check judges best/ by the counts of the evaluation that selected it
    summary = json.loads((run / SUMMARY_FILE).read_text())
    best = next(r for r in _records(run) if r["step"] == result.best_step)
    assert summary["head"] == "mdre" and summary["check"] == {
        "where": "tuning",
        "documents": 2,
        "predicted": best["tune"]["predicted"],
        "gold": best["tune"]["gold"],
    }
    verdict = nothing_learned(
        best["tune"]["predicted"], best["tune"]["gold"], 2, "tuning", head="mdre", steps=6
    )
    assert summary["warnings"] == result.warnings == ([verdict] if verdict else [])


def test_choose_head_by_the_number_of_training_documents():
    auto = load_stage1_config(None, ["loss.name=auto"])
    assert choose_head(auto, SMALL_CORPUS_DOCS - 1).loss.name == "mdre"
    assert choose_head(auto, SMALL_CORPUS_DOCS).loss.name == "atl"  # the paper default
    named = load_stage1_config(None, ["loss.name=atgl"])
    assert choose_head(named, 10).loss.name == "atgl"  # a named head is kept
    assert load_stage1_config(None, []).loss.name == "atl"  # the default is unchanged
    with pytest.raises(LmrcError, match="unknown loss 'autox'.*or auto"):
        load_stage1_config(None, ["loss.name=autox"])


# --------------------------------------------------------------------------------------------- tuning split


def _titles(path: Path) -> list[str]:
    return [d["title"] for d in json.loads(path.read_text())]


def test_tune_fraction_carves_a_seeded_split_that_resume_reuses(files, tmp_path, capsys):
    out = tmp_path / "run"
    sets = [
        f"model.encoder={files['encoder']}", "model.emb_size=64", "model.block_size=16",
        f"data.train={files['train']}", f"data.rel_info={files['rel_info']}", "train.epochs=1", "train.batch_size=2",
    ]  # fmt: skip
    args = ["stage1", "train", "--output-dir", str(out), "--tune-fraction", "0.4"]
    for s in sets:
        args += ["--set", s]
    assert main([*args, "--stop-after-steps", "1"]) == 0
    train_split, tune_split = out / "data" / "train_split0.json", out / "data" / "train_split1.json"
    source = _titles(files["train"])
    train_idx, tune_idx = split_indices(len(source), [0.6, 0.4], seed=13)  # data.fold_seed
    assert _titles(train_split) == [source[i] for i in train_idx] and len(train_idx) == 3
    assert _titles(tune_split) == [source[i] for i in tune_idx] and len(tune_idx) == 2
    saved = read_yaml(out / "config.yaml")["data"]
    assert (saved["train"], saved["tune"], saved["tune_fraction"]) == (
        str(train_split),
        str(tune_split),
        None,
    )
    made = tune_split.stat().st_mtime_ns

    assert main([*args, "--resume"]) == 0  # the same command line resumes: the split is reused, not rewritten
    assert "training finished: step 2 of 2" in capsys.readouterr().out
    assert tune_split.stat().st_mtime_ns == made
    log = (out / "train.log").read_text()
    assert "tuning split: 2 of the 5 documents" in log and f"tuning split: reusing {tune_split}" in log
    assert [r["step"] for r in _records(out)] == [2]  # evaluated on the carved tuning split
    assert main(["stage1", "train", "--resume", "--output-dir", str(out)]) == 0  # the saved config: done
    # the saved config names the split already: carving its training part again is refused, in one line
    assert main(["stage1", "train", "--resume", "--output-dir", str(out), "--tune-fraction", "0.4"]) == 2
    assert "holds no tuning split of" in capsys.readouterr().err


def test_the_tuning_split_follows_data_fold_seed(files, tmp_path):
    tuned = {}
    for seed in (13, 14):
        config = cfg(
            files, tmp_path / f"s{seed}", "data.tune_fraction=0.4", f"data.fold_seed={seed}", tune=False
        )
        carved = carve_tune_split(config, resuming=False)
        assert (
            carved.data.tune_fraction is None
            and Path(carved.data.tune).parent == tmp_path / f"s{seed}" / "data"
        )
        tuned[seed] = _titles(Path(carved.data.tune))
    source = _titles(files["train"])
    for seed in (13, 14):
        assert tuned[seed] == [source[i] for i in split_indices(5, [0.6, 0.4], seed)[1]]
    assert tuned[13] != tuned[14]


def test_tune_fraction_is_checked(files, tmp_path):
    with pytest.raises(LmrcError, match="set data.tune=null too"):
        load_stage1_config(None, ["data.tune_fraction=0.1"])  # data.tune has a default
    with pytest.raises(LmrcError, match=r"tune_fraction must be in \(0, 1\)"):
        load_stage1_config(None, ["data.tune=null", "data.tune_fraction=1.5"])
    config = cfg(files, tmp_path / "run", "data.tune_fraction=0.4", "data.holdout_fold=0", tune=False)
    with pytest.raises(LmrcError, match="not with cross-fitting"):
        train(config)


# -------------------------------------------------------------------------------------- nothing learned


def test_nothing_learned_fires_below_a_tenth_of_the_gold():
    assert NOTHING_LEARNED_FRACTION == 0.1
    line = nothing_learned(0, 1520, 45, "tuning")
    assert line is not None and line.startswith(
        "stage 1 predicts 0 relations on its 45 tuning documents, which hold 1,520: the model has learned nothing"
    )
    assert "--set train.min_steps=2000" in line and "--set loss.name=mdre" in line and "--threshold" in line
    for gold in (1520, 73, 10, 1):
        limit = (
            gold + 9
        ) // 10  # the smallest count that is not fewer than a tenth of the gold: ceil(gold / 10)
        assert nothing_learned(limit, gold, 5, "tuning") is None
        if limit > 1:
            assert "fewer than 10%" in nothing_learned(limit - 1, gold, 5, "tuning")
        assert nothing_learned(0, gold, 5, "tuning") is not None
    assert nothing_learned(0, 0, 5, "tuning") is None  # documents without relations: nothing to judge
    bce = nothing_learned(3, 46, 2, "training", unit="candidate pairs", head="mdre", steps=5000)
    assert "predicts 3 candidate pairs on its 2 training documents, which hold 46 (fewer than 10%)" in bce
    assert "train.min_steps=10000" in bce and "loss.name=atl" in bce


def test_prediction_counts_count_relations_or_bce_candidate_pairs():
    labels = [[0, 1, 0, 1], [1, 0, 0, 0], [0, 0, 1, 0]]  # NA | 3 relations: 3 gold relations in 2 pairs
    features = [SimpleNamespace(labels=labels), SimpleNamespace(labels=[])]
    atl = torch.tensor([[0.0, 1.0, -1.0, 2.0], [0.0, -1.0, -1.0, -1.0], [0.0, 0.5, 0.5, -1.0]])
    assert prediction_counts(build_loss("atl"), [atl, torch.zeros(0, 4)], features) == {
        "predicted": 4,
        "gold": 3,
    }
    na = torch.tensor([[-2.0], [1.0], [-0.1]])  # bce: P(relation) = sigmoid(-na): 0.88, 0.27, 0.52
    assert prediction_counts(build_loss("bce"), [na, torch.zeros(0, 1)], features) == {
        "predicted": 2,
        "gold": 2,
    }


def test_a_model_that_predicts_nothing_says_so_at_evaluations_and_in_the_summary(files, tmp_path, caplog):
    """bce after 6 steps on 5 documents scores every tuning pair below 0.5: no candidate at either evaluation."""
    caplog.set_level(logging.INFO)
    result = train(cfg(files, tmp_path / "run", "loss.name=bce", "train.epochs=2"))
    records = _records(tmp_path / "run")
    assert [r["tune"]["predicted"] for r in records] == [0, 0] and all(r["tune"]["gold"] > 0 for r in records)
    assert all(r["warning"].startswith("stage 1 predicts 0 candidate pairs on its 2 tuning") for r in records)
    summary = json.loads((tmp_path / "run" / SUMMARY_FILE).read_text())
    assert len(result.warnings) == 1 and summary["warnings"] == result.warnings
    assert "learned nothing yet" in result.warnings[0]
    warned = [r for r in caplog.records if r.levelno == logging.WARNING and "predicts 0" in r.getMessage()]
    assert len(warned) == 3  # one line per evaluation, one at the end


def test_without_a_tuning_file_the_end_check_runs_on_training_documents(files, tmp_path, capsys):
    """ATL after 6 steps puts its threshold class above every relation: 0 relations on its own documents."""
    out = tmp_path / "run"
    sets = [
        f"model.encoder={files['encoder']}", "model.emb_size=64", "model.block_size=16",
        f"data.train={files['train']}", "data.tune=null", f"data.rel_info={files['rel_info']}",
        "train.epochs=2", "train.batch_size=2", "train.lr_encoder=1e-3", "train.lr_head=1e-3",
    ]  # fmt: skip
    args = ["stage1", "train", "--output-dir", str(out)]
    for s in sets:
        args += ["--set", s]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "warning: stage 1 predicts 0 relations on its 5 training documents" in printed
    summary = json.loads((out / SUMMARY_FILE).read_text())
    assert summary["check"]["where"] == "training" and summary["check"]["documents"] == 5
    assert summary["warnings"] and summary["warnings"][0] in printed
