"""The default models of `lmrc predict --text` when none is named: an entity model and a stage-1 model, trained once
on Re-DocRED's labelled documents into the lmrc cache and reused by every later run.

Why: a newcomer with a `.txt` file should get relations from one command. The first run trains (with progress bars,
the expected time printed first; an interrupted training continues where it stopped on the next run), later runs
find the finished models at once. The folder's name holds a digest of the settings and of the training data, so a
change of either trains anew instead of reusing a model made otherwise.

The settings are the CPU configs of the repository (configs/entities_minilm_cpu.yaml, configs/stage1_minilm_cpu.yaml)
with one change that matters here: the entity tagger trains until its tuning mention F1 stops rising (up to 8
epochs, patience 2) instead of a fixed 2 epochs. docs/RESULTS.md ("One command") has what they score and cost.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmrc.config import from_dict
from lmrc.data.split import split_file, split_output_paths
from lmrc.entities.config import EntitiesConfig
from lmrc.entities.model import META_FILE
from lmrc.entities.train import train as train_entities
from lmrc.errors import LmrcError
from lmrc.models.store import default_cache_dir
from lmrc.stage1.config import Stage1Config
from lmrc.stage1.train import train as train_stage1
from lmrc.training.run_folder import POSITION_FILE

log = logging.getLogger(__name__)

VERSION = 1  # raise when the recipe changes in a way the settings digest does not show

ENTITY_SETTINGS: dict[str, Any] = {
    "model": {"encoder": "minilm"},
    "data": {"max_docs": 0},
    "train": {"epochs": 8, "patience": 2, "batch_size": 4, "lr": 2.0e-4, "max_tokens": 256, "seed": 13},
    "coref": {"hidden": 32, "steps": 300},
}
# MD-RE: the head that learns most in a CPU budget (3 epochs over these documents: 43.8 dev F1 against ATL's 36.7,
# docs/RESULTS.md "Stage 1: every head under one budget")
STAGE1_SETTINGS: dict[str, Any] = {
    "model": {"encoder": "minilm"},
    "data": {},
    "loss": {"name": "mdre"},
    "train": {"epochs": 3, "batch_size": 4, "eval_every_epochs": 1, "save_every_steps": 25,
              "log_every_steps": 10, "deterministic": True},
}  # fmt: skip
# Measured on a 2-core Intel Xeon (AVX512, no native bf16): 74 to 100 s per entity epoch (8 epochs before the
# tuning F1 stopped rising) and 17.9 min for stage 1; the whole first run took 31.5 min (docs/RESULTS.md "One
# command"). Scaled by the cores here, a rough guide only (an AVX2-only CPU is slower).
_MINUTES_2_CORES = {"entity_epoch": 1.5, "stage1": 18.0}


@dataclass(frozen=True)
class DefaultModels:
    entities: Path
    stage1: Path


def training_data() -> tuple[Path, Path]:
    """Re-DocRED's labelled documents and relation inventory: `$LMRC_DATA_DIR/redocred`, else the copy that
    scripts/demo_data.sh makes under the lmrc cache."""
    places = []
    if os.environ.get("LMRC_DATA_DIR"):
        places.append(Path(os.environ["LMRC_DATA_DIR"]).expanduser() / "redocred")
    places.append(default_cache_dir() / "data" / "redocred")
    for folder in places:
        if (folder / "train_450.json").is_file() and (folder / "rel_info.json").is_file():
            return folder / "train_450.json", folder / "rel_info.json"
    raise LmrcError(
        f"{places[0] / 'train_450.json'}: not found; the default models are trained once on Re-DocRED's labelled "
        "documents: run `export LMRC_DATA_DIR=$(bash scripts/demo_data.sh)` (it finds or fetches them), or name "
        "your models with --entities and --stage1"
    )


def models_folder(train_file: Path) -> Path:
    """`$LMRC_CACHE/default-models`: the split and each model in a folder named by a digest of what made it."""
    return default_cache_dir() / "default-models"


def _digest(settings: Any, train_file: Path) -> str:
    """The recipe version, the settings and the training data: a change of any trains anew."""
    digest = hashlib.sha256(json.dumps([VERSION, settings], sort_keys=True).encode())
    digest.update(hashlib.sha256(train_file.read_bytes()).digest())
    return digest.hexdigest()[:16]


def model_folders(train_file: Path) -> tuple[Path, Path, Path]:
    """The tuning split's folder, the entity model's and stage 1's (each keyed by its own settings, so a new
    stage-1 recipe reuses the entity model)."""
    root = models_folder(train_file)
    return (
        root / f"data-{_digest(None, train_file)}",
        root / f"entities-{_digest(ENTITY_SETTINGS, train_file)}",
        root / f"stage1-{_digest(STAGE1_SETTINGS, train_file)}",
    )


def expected_minutes(threads: int, entities: bool, stage1: bool) -> tuple[float, float]:
    """A rough range for what is left to train here: the entity tagger stops between 3 and 8 epochs."""
    scale = 2.0 / max(1, threads)
    epoch, s1 = _MINUTES_2_CORES["entity_epoch"], _MINUTES_2_CORES["stage1"] if stage1 else 0.0
    low, high = (3 * epoch if entities else 0.0) + s1, (8 * epoch if entities else 0.0) + s1
    return low * scale, high * scale


def _finished_entities(folder: Path) -> bool:
    return (folder / META_FILE).is_file() and not (folder / "best").exists()


def _finished_stage1(folder: Path) -> bool:
    """`last/`'s position says `done` (written when the last epoch, or early stopping, ended the run)."""
    try:
        return bool(json.loads((folder / "last" / POSITION_FILE).read_text(encoding="utf-8")).get("done"))
    except (OSError, ValueError):
        return False


def ensure_default_models(
    need_entities: bool, need_stage1: bool, say: Callable[[str], None] | None = None
) -> DefaultModels:
    """The default models, training the ones asked for that are not in the cache yet (resuming a killed run)."""
    say = say or (lambda msg: log.info("%s", msg))
    train_file, rel_info = training_data()
    data_dir, ent_dir, s1_dir = model_folders(train_file)
    todo = [n for n, need, done in (("entity model", need_entities, _finished_entities(ent_dir)),
                                    ("stage 1", need_stage1, _finished_stage1(s1_dir))) if need and not done]  # fmt: skip
    if todo:
        low, high = expected_minutes(torch.get_num_threads(), "entity model" in todo, "stage 1" in todo)
        say(
            f"first run: training the default {' and '.join(todo)} once on {train_file} (expected {low:.0f} to "
            f"{high:.0f} min on this machine; later runs reuse them from {ent_dir.parent}; Ctrl-C stops, the next run "
            "continues)"
        )
        splits = _splits(train_file, data_dir)
        if need_entities and not _finished_entities(ent_dir):
            _train_entities(splits, ent_dir)
        if need_stage1 and not _finished_stage1(s1_dir):
            _train_stage1(splits, rel_info, s1_dir)
    return DefaultModels(ent_dir, s1_dir)


def _splits(train_file: Path, folder: Path) -> tuple[Path, Path]:
    """The 90 / 10 training / tuning split of the README (seed 13), made once."""
    train, tune = split_output_paths(train_file, folder, 2)
    if not (train.is_file() and tune.is_file()):
        split_file(train_file, [0.9, 0.1], 13, folder)
    return train, tune


def _train_entities(splits: tuple[Path, Path], out: Path) -> None:
    data = {**ENTITY_SETTINGS["data"], "train": str(splits[0]), "tune": str(splits[1])}
    cfg = from_dict(
        EntitiesConfig, {**ENTITY_SETTINGS, "data": data, "output_dir": str(out)}, "default entities"
    )
    train_entities(cfg, out, resume=out.exists() and any(out.iterdir()))


def _train_stage1(splits: tuple[Path, Path], rel_info: Path, out: Path) -> None:
    data = {
        **STAGE1_SETTINGS["data"],
        "train": str(splits[0]),
        "tune": str(splits[1]),
        "rel_info": str(rel_info),
    }
    cfg = from_dict(
        Stage1Config, {**STAGE1_SETTINGS, "data": data, "output_dir": str(out)}, "default stage 1"
    )
    train_stage1(cfg, resume=out.exists() and any(out.iterdir()))
