"""The library's entry points as experiments call them: stage-1 training, stage-2 training and a prediction run,
each in a child process of its own (lmrc.experiments.isolate: its memory goes back when it ends, and a row's peak
memory is its own). The one place where lmrc.experiments calls the trainers and the prediction driver, so that a
changed signature there is one edit here.

Every job resumes: a finished training or prediction is found finished, an interrupted one continues.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmrc.experiments.isolate import run_isolated
from lmrc.predict.build import stage2_predict_config
from lmrc.predict.config import PredictConfig
from lmrc.predict.run import run_pipeline
from lmrc.stage1.config import Stage1Config
from lmrc.stage1.train import train as train_stage1_run
from lmrc.stage2.config import Stage2Config
from lmrc.stage2.train import train as train_stage2_run


def train_stage1(cfg: Stage1Config) -> Path | None:
    """Train stage 1 in `cfg.output_dir` (resumed); its best checkpoint, None when the run did not finish."""
    return run_isolated(f"{cfg.output_dir}: stage-1 training", _train_stage1, cfg)


def train_adapter(cfg: Stage2Config, folder: Path) -> bool:
    """Train the LoRA adapter `cfg` asks for in `folder` (resumed); whether the run finished."""
    return run_isolated(f"{folder}: {cfg.mode} adapter training", _train_adapter, cfg, folder)


def run_prediction(cfg: PredictConfig, documents: Path, output: Path) -> None:
    """`lmrc predict`'s run over `documents` into `output` and its companions (the summary beside it; resumed)."""
    run_isolated(str(output), _predict, cfg, documents, output)


def predict_with_adapter(
    adapter: Path, documents: Path, output: Path, gold_pairs: bool, overrides: dict[str, Any]
) -> None:
    """`lmrc stage2 predict`'s run: the adapter alone, asked about the gold pairs or (a direct adapter) all pairs,
    with `overrides` of its settings (nested, as Stage2Settings.overrides)."""
    run_prediction(
        stage2_predict_config(adapter, gold_pairs=gold_pairs, overrides=overrides), documents, output
    )


# The children's side: module-level functions (spawn pickles them by name).


def _train_stage1(cfg: Stage1Config) -> Path | None:
    result = train_stage1_run(cfg, resume=True)
    return result.best_dir if result.finished else None


def _train_adapter(cfg: Stage2Config, folder: Path) -> bool:
    return train_stage2_run(cfg, folder, resume=True).finished


def _predict(cfg: PredictConfig, documents: Path, output: Path) -> None:
    run_pipeline(cfg, documents, output, resume=True)
