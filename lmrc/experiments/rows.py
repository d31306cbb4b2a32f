"""The rows of a comparison: each mode, and each variant of a mode, run by the prediction driver on the same
evaluation documents, into `runs/<row>.json` with its summary and progress file beside it and its settings in
`runs/<row>.yaml` (the `--config` that `lmrc predict` repeats the row with). A finished or killed row resumes."""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from lmrc.config import apply_overrides, expand_path, from_dict
from lmrc.experiments import jobs
from lmrc.experiments.config import ALL_MODES, LLM_MODES, CompareConfig, Variant
from lmrc.experiments.data import DataFiles
from lmrc.experiments.models import ADAPTER_OF_MODE, predicts_relations
from lmrc.experiments.report import ModeRun
from lmrc.io import atomic_write_text, read_json, sidecar
from lmrc.predict.config import PredictConfig
from lmrc.stage1.config import CandidateSettings

log = logging.getLogger(__name__)


def run_rows(
    cfg: CompareConfig,
    models: dict[str, Path],
    files: DataFiles,
    out: Path,
    n_docs: int,
    say: Callable[[str], None],
) -> list[ModeRun]:
    """Every mode of the config in the table's order, each followed by its variants."""
    runs = []
    for mode in [m for m in ALL_MODES if m in cfg.modes]:
        if mode == "stage1-only" and not predicts_relations(models["stage1"]):
            log.warning("stage1-only skipped: the stage-1 head predicts no relations (bce)")
            continue
        say(f"predict: {mode} on {n_docs} documents")
        runs.append(run_row(cfg, mode, models, files, out))
        for v in cfg.variants:
            if v.mode == mode:
                say(f"predict: {v.name} ({mode} with {' '.join(v.set) or 'the same settings'})")
                runs.append(run_row(cfg, mode, models, files, out, v))
    return runs


def run_row(
    cfg: CompareConfig,
    mode: str,
    models: dict[str, Path],
    files: DataFiles,
    out: Path,
    variant: Variant | None = None,
) -> ModeRun:
    """One mode (or variant) over the evaluation documents, in a child process (its own peak memory)."""
    runs = out / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    name = variant.name if variant is not None else mode
    slug = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)
    settings = row_settings(cfg, mode, models, files.tune, variant.set if variant else ())
    predict_cfg = from_dict(
        PredictConfig, copy.deepcopy(settings), f"variant of {mode}"
    )  # a bad key: refused
    atomic_write_text(runs / f"{slug}.yaml", yaml.safe_dump(settings, sort_keys=False))
    if cfg.eval.train is not None:  # Ign F1 and the frequent / long-tail split refer to these documents
        predict_cfg = dataclasses.replace(predict_cfg, train=str(expand_path(cfg.eval.train, "eval.train")))
    result = runs / f"{slug}.json"
    log.info("compare: %s -> %s", name, result)
    jobs.run_prediction(predict_cfg, files.eval, result)
    return ModeRun(mode, result, read_json(sidecar(result, ".summary.json")), name)


def row_settings(
    cfg: CompareConfig, mode: str, models: dict[str, Path], tune: Path | None, extra: Sequence[str] = ()
) -> dict[str, Any]:
    """The `lmrc predict` settings of a row (PredictConfig's keys): the mode's models, the candidate rule, the
    predict-time stage-2 settings, then a variant's `extra` overrides (`--set` keys of `lmrc predict`)."""
    overrides = copy.deepcopy(cfg.stage2_overrides)
    if cfg.sbert and mode in LLM_MODES:
        overrides.setdefault("align", {}).update({"relation_mapping": "sbert", "theta": cfg.theta})
    c = cfg.candidates
    stage1: dict[str, Any] = {}
    if mode != "direct":
        stage1 = {"checkpoint": str(models["stage1"])}
    if mode == "classifier-llm":
        stage1.update(_candidate_rule(c))
    stage2: dict[str, Any] = {}
    if mode in LLM_MODES:
        stage2 = {"adapter": str(models[ADAPTER_OF_MODE[mode]]), "overrides": overrides}
    settings = {
        "mode": mode,
        "stage1": {k: v for k, v in stage1.items() if v is not None},
        "stage2": stage2,
        "docs_per_batch": cfg.docs_per_batch,
    }
    apply_overrides(settings, list(extra))
    needs_tune = c.recall_target is not None or settings.get("fusion") == "refine"
    if mode == "classifier-llm" and needs_tune and c.calibration is None:
        tune_file = expand_path(c.tune, "candidates.tune") if c.tune else tune
        if tune_file is not None:
            settings["stage1"].setdefault("tune", str(tune_file))
    return settings


def _candidate_rule(c: CandidateSettings) -> dict[str, Any]:
    """The candidate settings a classifier-llm row passes on: those that differ from the defaults (`tune` is
    settled by row_settings)."""
    default = CandidateSettings()
    return {
        f.name: getattr(c, f.name)
        for f in dataclasses.fields(c)
        if f.name != "tune" and getattr(c, f.name) != getattr(default, f.name)
    }
