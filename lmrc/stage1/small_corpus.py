"""Stage 1 on a small corpus: a useful model, never a silent all-NA one (issue 30).

A 98-document corpus trained with ATL for 10 epochs (250 optimizer steps) predicted no relation at all, even on
its own training documents, while MD-RE reached 34.9 F1 under the same budget, and nothing told the user. What
the recipe (lmrc/stage1/train.py) does about it, all settled before training starts:

- `train.min_steps`: epochs x steps-per-epoch below it raise the epochs, so that the run takes at least that
  many optimizer steps; the schedule's warmup and decay follow the raised total, and the saved config holds the
  raised epochs (a `--resume` with the original config resolves to the same run).
- `loss.name: auto`: `mdre` below SMALL_CORPUS_DOCS training documents, the paper default (`atl`) otherwise; the
  saved config and the checkpoint name the chosen head, so prediction never sees `auto`.
- `data.tune_fraction` (`lmrc stage1 train --tune-fraction`): with no `data.tune`, a seeded tuning split carved
  out of `data.train` into `<output_dir>/data/` by `lmrc.data.split.split_file` (reused on `--resume`); the
  saved config names the two split files.

And after it: the nothing-learned check (`nothing_learned`) at every evaluation on the tuning file (a `warning`
in its metrics.jsonl record) and on the published model at the end, whose verdict goes into
`<output_dir>/train_summary.json` (`warnings`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path
from typing import Any

from lmrc.data.split import fold_indices, manifest_path, split_file, split_output_paths
from lmrc.errors import LmrcError
from lmrc.io import atomic_write_json, file_sha256, read_json
from lmrc.stage1.checkpoint import META_FILE
from lmrc.stage1.config import AUTO_HEAD, PAPER_HEAD, Stage1Config
from lmrc.stage1.inference import infer_logits
from lmrc.stage1.steps import steps_per_epoch
from lmrc.stage1.train_data import read_documents
from lmrc.stage1.tune_eval import prediction_counts
from lmrc.training.run_folder import CONFIG_FILE, check_same_config, read_saved_config

log = logging.getLogger(__name__)

# Provisional until measured: below this many training documents `loss.name: auto` trains SMALL_CORPUS_HEAD.
# Evidence so far: MD-RE led every head on 405 Re-DocRED documents (docs/RESULTS.md, 43.8 vs ATL's 36.7 F1),
# and on a 98-document corpus ATL learned nothing in 250 steps where MD-RE reached 34.9 F1.
SMALL_CORPUS_DOCS = 500
SMALL_CORPUS_HEAD = "mdre"
# A model predicting fewer than this fraction of the relations its documents hold has learned (almost) nothing.
NOTHING_LEARNED_FRACTION = 0.1
TRAIN_CHECK_DOCS = 50  # without a tuning file, the end check runs on up to this many training documents
SUMMARY_FILE = "train_summary.json"


# ---------------------------------------------------------------------------------------------- before training


def prepare_run(
    cfg: Stage1Config, resuming: bool, accelerator, resumable_changes
) -> tuple[Stage1Config, tuple]:
    """The run's resolved config (tuning split, head, epochs) and its documents (`read_documents`); a resumed run's
    saved config must match the resolved one, but for the `resumable_changes`."""
    cfg = carve_tune_split(cfg, resuming, write=accelerator.is_main_process)
    accelerator.wait_for_everyone()  # rank 0 wrote the split files
    documents = read_documents(cfg)
    n_docs = training_documents(cfg, len(documents[1]))
    cfg = choose_head(cfg, n_docs)
    cfg = raise_epochs(cfg, n_docs, cfg.train.grad_accum * accelerator.num_processes)
    if resuming:
        out = Path(cfg.output_dir)
        saved = read_saved_config(Stage1Config, out)
        check_same_config(saved, cfg, out / CONFIG_FILE, resumable_changes, keep=("loss.params",))
    return cfg, documents


def carve_tune_split(cfg: Stage1Config, resuming: bool, write: bool = True) -> Stage1Config:
    """With `data.tune_fraction`: the config training on part 0 of a seeded split of `data.train` and tuning on
    part 1, both in `<output_dir>/data/`; the split is made once (by the process that `write`s) and reused."""
    fraction = cfg.data.tune_fraction
    if fraction is None:
        return cfg
    if cfg.data.holdout_fold is not None:
        raise LmrcError("data.tune_fraction: not with cross-fitting (data.holdout_fold); give data.tune")
    source, folder = cfg.data.path("train"), Path(cfg.output_dir) / "data"
    ratios, seed = [1.0 - fraction, fraction], cfg.data.fold_seed
    train_path, tune_path = split_output_paths(source, folder, 2)
    if _split_made(source, folder, ratios, seed):
        log.info("tuning split: reusing %s (carved from %s, seed %d)", tune_path, source, seed)
    elif resuming:
        raise LmrcError(
            f"{folder}: holds no tuning split of {source} (ratio {fraction:g}, seed {seed}): the training file "
            "changed since the run started, or the saved config names its split already (resume without "
            "--tune-fraction / data.tune_fraction)"
        )
    elif write:
        train_part, tune_part = split_file(source, ratios, seed, folder)
        total = len(train_part.indices) + len(tune_part.indices)
        log.info("tuning split: %d of the %d documents of %s (data.tune_fraction %g, seed %d) -> %s; training "
                 "on the other %d (%s)", len(tune_part.indices), total, source, fraction, seed, tune_path,
                 len(train_part.indices), train_path)  # fmt: skip
    data = dataclasses.replace(cfg.data, train=str(train_path), tune=str(tune_path), tune_fraction=None)
    return dataclasses.replace(cfg, data=data)


def _split_made(source: Path, folder: Path, ratios: list[float], seed: int) -> bool:
    manifest = manifest_path(source, folder)
    if not manifest.is_file() or not all(p.is_file() for p in split_output_paths(source, folder, 2)):
        return False
    made = read_json(manifest)
    return (made.get("source_sha256"), made.get("seed"), made.get("ratios")) == (
        file_sha256(source),
        seed,
        ratios,
    )


def training_documents(cfg: Stage1Config, n_file: int) -> int:
    """How many documents of the training file are trained on (all, or all but the cross-fitting fold)."""
    if cfg.data.holdout_fold is None or n_file < cfg.data.folds:
        return n_file
    return n_file - len(fold_indices(n_file, cfg.data.folds, cfg.data.fold_seed)[cfg.data.holdout_fold])


def choose_head(cfg: Stage1Config, n_docs: int) -> Stage1Config:
    """`loss.name: auto` -> SMALL_CORPUS_HEAD below SMALL_CORPUS_DOCS training documents, else PAPER_HEAD."""
    if cfg.loss.name != AUTO_HEAD:
        return cfg
    if n_docs < SMALL_CORPUS_DOCS:
        name, why = SMALL_CORPUS_HEAD, f"fewer than {SMALL_CORPUS_DOCS}"
    else:
        name, why = PAPER_HEAD, f"at least {SMALL_CORPUS_DOCS}"
    log.info("loss.name auto: %d training documents, %s (SMALL_CORPUS_DOCS, provisional): the %s head", n_docs,
             why, name)  # fmt: skip
    return dataclasses.replace(cfg, loss=dataclasses.replace(cfg.loss, name=name))


def raise_epochs(cfg: Stage1Config, n_docs: int, group_size: int) -> Stage1Config:
    """The config with enough epochs for `train.min_steps` optimizer steps (micro-batches of `batch_size`
    documents, `group_size` of them a step: lmrc/stage1/steps.py)."""
    t = cfg.train
    per_epoch = steps_per_epoch(math.ceil(n_docs / t.batch_size), group_size)
    if not t.min_steps or not per_epoch or per_epoch * t.epochs >= t.min_steps:
        return cfg
    epochs = math.ceil(t.min_steps / per_epoch)
    log.info("a small corpus: %d documents give %d steps per epoch; training %d epochs (%s steps, min_steps) "
             "instead of %d", n_docs, per_epoch, epochs, f"{epochs * per_epoch:,}", t.epochs)  # fmt: skip
    return dataclasses.replace(cfg, train=dataclasses.replace(t, epochs=epochs))


# ------------------------------------------------------------------------------------------- the check


def nothing_learned(
    predicted: int,
    gold: int,
    docs: int,
    where: str,
    *,
    unit: str = "relations",
    head: str = "",
    steps: int = 0,
) -> str | None:
    """One warning line when a model predicts no `unit` at all, or fewer than NOTHING_LEARNED_FRACTION of the
    `gold` ones its `docs` `where` documents hold (None otherwise, and when they hold none)."""
    if gold <= 0 or (predicted > 0 and predicted >= NOTHING_LEARNED_FRACTION * gold):
        return None
    few, what = (
        ("", "nothing") if predicted == 0 else (f" (fewer than {NOTHING_LEARNED_FRACTION:.0%})", "little")
    )
    other = PAPER_HEAD if head == SMALL_CORPUS_HEAD else SMALL_CORPUS_HEAD
    return (
        f"stage 1 predicts {predicted:,} {unit} on its {docs:,} {where} documents, which hold {gold:,}{few}: the "
        f"model has learned {what} yet; try training longer (--set train.min_steps={max(2000, 2 * steps)}), "
        f"another head (--set loss.name={other}), or a lower threshold at prediction (--threshold)"
    )


def _warning(counts: dict, docs: int, where: str, loss, steps: int) -> str | None:
    unit = "relations" if loss.per_relation else "candidate pairs"
    return nothing_learned(counts["predicted"], counts["gold"], docs, where, unit=unit, head=loss.name,
                           steps=steps)  # fmt: skip


def check_evaluation(record: dict[str, Any], docs: int, loss, steps: int) -> None:
    """At an evaluation on the tuning file: log the warning and add it to the metrics.jsonl `record`."""
    tune = record.get("tune") or {}
    warning = _warning(tune, docs, "tuning", loss, steps) if "predicted" in tune else None
    if warning:
        log.warning("%s", warning)
        record["warning"] = warning


def finish_run(recipe) -> list[str]:
    """At the end of training (rank 0): the check of the published model (best/) and train_summary.json.

    best/ chosen at an evaluation is judged by that evaluation's counts; best/ holding the final weights (no
    evaluation selected one) is evaluated now on the tuning documents, or on up to TRAIN_CHECK_DOCS training
    documents without a tuning file."""
    if not recipe.accelerator.is_main_process:
        return []
    data, pos = recipe.data, recipe.pos
    selected = (read_json(recipe.best_dir / META_FILE).get("selection") or {}).get("tune_metrics") or {}
    check = None
    if "predicted" in selected:
        check = {"where": "tuning", "documents": len(data.tune_docs), **_counts(selected)}
    elif not selected:  # (selected without counts: a run resumed from before the check; not judged)
        check = _check_final_weights(recipe)
    warnings = []
    if check is not None:
        warning = _warning(check, check["documents"], check["where"], recipe.loss, pos.total_steps)
        if warning:
            log.warning("%s", warning)
            warnings.append(warning)
    summary = {
        "finished": pos.done, "stopped_early": pos.stopped_early, "global_step": pos.global_step,
        "total_steps": pos.total_steps, "epochs": recipe.config.train.epochs,
        "min_steps": recipe.config.train.min_steps, "head": recipe.config.loss.name,
        "training_documents": len(data.train_docs),
        "tuning_documents": None if data.tune_docs is None else len(data.tune_docs),
        "select_metric": recipe.select_metric, "best_value": pos.best_value, "best_step": pos.best_step,
        "check": check, "warnings": warnings,
    }  # fmt: skip
    atomic_write_json(recipe.out / SUMMARY_FILE, summary, indent=1)
    return warnings


def _counts(metrics: dict) -> dict[str, int]:
    return {"predicted": int(metrics["predicted"]), "gold": int(metrics["gold"])}


def _check_final_weights(recipe) -> dict[str, Any]:
    data, acc = recipe.data, recipe.accelerator
    if data.tune_features is not None:
        where, features = "tuning", data.tune_features
    else:
        where, features = "training", data.train_features[:TRAIN_CHECK_DOCS]
    model = acc.unwrap_model(recipe.model)
    with acc.autocast():
        logits = infer_logits(model, features, recipe.config.train.eval_batch_size, acc.device)
    return {"where": where, "documents": len(features), **prediction_counts(recipe.loss, logits, features)}
