"""The models a comparison needs: the config's trained ones, else trained here in `models/` (resumed).

`models/stage1` is the stage-1 run, `models/rc` and `models/direct` the adapters; a training run that finished
with the settings the config asks for now is reused without loading a model, one that was interrupted (or asked
for a larger budget) continues from its resumable state. Each training runs in a child process
(lmrc.experiments.jobs).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

from lmrc.config import expand_path, to_dict
from lmrc.data.relations import RelationSet, load_relations
from lmrc.errors import LmrcError
from lmrc.experiments import jobs
from lmrc.experiments.config import CompareConfig, ModelSpec
from lmrc.experiments.data import DataFiles
from lmrc.io import read_json
from lmrc.stage1.checkpoint import load_checkpoint
from lmrc.stage1.config import load_stage1_config
from lmrc.stage2.config import Stage2Config, load_stage2_config
from lmrc.stage2.modeling import ADAPTER_CONFIG, CONFIG_FILE, load_adapter_config
from lmrc.stage2.predict import adapter_relations
from lmrc.stage2.summary import SUMMARY_FILE

log = logging.getLogger(__name__)

# the stage-2 adapter each LLM mode asks
ADAPTER_OF_MODE = {"classifier-llm": "rc", "direct": "direct"}


def ensure_models(
    cfg: CompareConfig, out: Path, files: DataFiles, say: Callable[[str], None]
) -> dict[str, Path]:
    """The models of the config's modes: `stage1`, `rc`, `direct` -> checkpoint or adapter folder."""
    models: dict[str, Path] = {}
    if "stage1-only" in cfg.modes or "classifier-llm" in cfg.modes:
        say("stage 1: training or reusing the pair classifier")
        models["stage1"] = ensure_stage1(cfg, out, files)
    for mode, kind in ADAPTER_OF_MODE.items():
        if mode in cfg.modes:
            say(f"stage 2: training or reusing the {kind} adapter")
            models[kind] = ensure_adapter(kind, cfg, out, files)
    return models


def ensure_stage1(cfg: CompareConfig, out: Path, files: DataFiles) -> Path:
    """The config's stage-1 checkpoint, else the best checkpoint of `models/stage1` (trained or resumed)."""
    if cfg.stage1.path is not None:
        return expand_path(cfg.stage1.path, "stage1.path")
    folder = out / "models" / "stage1"
    overrides = [*_data_overrides("stage1", files), *cfg.stage1.set, f"output_dir={folder}"]
    s1 = load_stage1_config(cfg.stage1.config, overrides)
    log.info("compare: training stage 1 in %s", folder)
    best = jobs.train_stage1(s1)
    if best is None:
        raise LmrcError(f"{folder}: stage-1 training did not finish (rerun lmrc compare to continue)")
    return best


def ensure_adapter(
    kind: str,
    cfg: CompareConfig,
    out: Path,
    files: DataFiles,
    extra: Sequence[str] = (),
    name: str | None = None,
) -> Path:
    """The `kind` adapter (rc or direct): the config's trained one, else trained in `models/<name>` (default: the
    kind) with the config's settings and then `extra` overrides; resumed when a run was interrupted."""
    spec: ModelSpec = getattr(cfg, kind)
    if spec.path is not None and not extra:
        return expand_path(spec.path, f"{kind}.path")
    folder = out / "models" / (name or kind)
    if not extra:  # the config's own adapter keeps the learning curve's snapshots on the way
        extra = snapshot_overrides(kind, cfg)
    overrides = [*_data_overrides(kind, files), *spec.set, *extra, f"mode={kind}", f"output_dir={folder}"]
    s2 = load_stage2_config(spec.config, overrides)
    if (folder / ADAPTER_CONFIG).is_file() and (not (folder / "last").exists() or _finished_with(folder, s2)):
        return folder  # finished earlier (with these settings: no model load to find that out)
    log.info("compare: training the %s adapter in %s", kind, folder)
    if not jobs.train_adapter(s2, folder):
        raise LmrcError(f"{folder}: {kind} training did not finish (rerun lmrc compare to continue)")
    return folder


def _data_overrides(kind: str, files: DataFiles) -> list[str]:
    """The training config's data files when compare made the split (stage 1 also selects on the tuning part)."""
    if files.train is None:
        return []
    out = [f"data.train={files.train}"]
    if kind == "stage1":
        out.append(f"data.tune={files.tune if files.tune is not None else 'null'}")
    return out


def _finished_with(folder: Path, s2: Stage2Config) -> bool:
    """Whether the adapter in `folder` finished its training with the settings `s2` asks for (a resumable state
    is kept after the last step; a changed budget continues from it instead)."""
    summary = folder / SUMMARY_FILE
    if not summary.is_file() or not read_json(summary).get("finished"):
        return False
    return to_dict(load_stage2_config(folder / CONFIG_FILE)) == to_dict(s2)


def snapshot_overrides(kind: str, cfg: CompareConfig) -> list[str]:
    """`train.snapshot_tokens` for the config's own `kind` adapter when the learning curve takes its points from
    that run (the budgets below its own; its own budget is the finished adapter)."""
    lc = cfg.learning_curve
    if lc.adapters != "snapshots" or kind not in lc.kinds or not lc.budgets:
        return []
    main = main_budget(kind, cfg)
    if main is None:
        raise LmrcError(
            f"learning_curve.adapters=snapshots: the {kind} adapter has no train.max_tokens to snapshot"
        )
    over = [b for b in lc.budgets if b > main]
    if over:
        raise LmrcError(
            f"learning_curve.budgets: {over[0]:,} tokens is more than the {kind} adapter trains ({main:,}); "
            "snapshots are taken on the way (raise its train.max_tokens or use learning_curve.adapters=separate)"
        )
    return [f"train.snapshot_tokens=[{', '.join(str(b) for b in sorted(lc.budgets) if b < main)}]"]


def main_budget(kind: str, cfg: CompareConfig) -> int | None:
    """train.max_tokens of the config's own `kind` adapter when compare trains it (None otherwise)."""
    spec: ModelSpec = getattr(cfg, kind)
    if spec.path is not None:
        return None
    return load_stage2_config(spec.config, [*spec.set, f"mode={kind}"]).train.max_tokens


def relation_set(cfg: CompareConfig) -> RelationSet:
    """The relation set of the models: a trained model's copy, else the stage-1 training config's rel_info."""
    if cfg.rc.path is not None or cfg.direct.path is not None:
        path = expand_path(cfg.rc.path or cfg.direct.path, "rc.path")  # type: ignore[arg-type]
        return adapter_relations(path, load_adapter_config(path))
    if cfg.stage1.path is not None:
        return load_checkpoint(expand_path(cfg.stage1.path, "stage1.path")).relations
    s1 = load_stage1_config(cfg.stage1.config, cfg.stage1.set)
    return load_relations(s1.data.path("rel_info"))


def predicts_relations(checkpoint: Path) -> bool:
    """Whether the stage-1 head predicts relations itself (multi-label), which the stage1-only row needs."""
    return bool(load_checkpoint(checkpoint).loss.per_relation)
