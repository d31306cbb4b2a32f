"""`lmrc compare`: the LMRC comparison on one set of documents — stage 1 alone, direct fine-tuning, classifier-LLM.

A run folder (`--output-dir DIR`) holds everything, and re-running the same config reuses what is finished:

- `data/`: the training / tuning split, when the config asks compare to make one (`data.train`);
- `models/stage1`, `models/rc`, `models/direct`: models trained here (resumable) unless the config names trained
  ones (`stage1.path`, `rc.path`, `direct.path`);
- `runs/<mode>.json` (+ `.summary.json`, `.progress.jsonl`, `.yaml`): each mode run by `lmrc predict` in its own
  process (so that its peak memory is its own), resumable;
- `results.json`, `results.md`: one row per mode and variant (SBERT relation mapping on/off);
- `per_relation.png`, `theta.png`, `candidates.png` when matplotlib is installed (LMRC Figures 2 and 3, and the
  stage-1 threshold trade-off); `theta.png` re-aligns the saved raw LLM answers, without re-running the LLM.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lmrc.config import expand_path, load_config, to_dict
from lmrc.data.docred import Document, document_to_raw, load_documents, require_labels
from lmrc.data.relations import RelationSet, load_relations
from lmrc.errors import LmrcError
from lmrc.experiments.report import (
    LLM_MODES,
    ModeRun,
    candidate_curve,
    results_markdown,
    score_runs,
    theta_curves,
)
from lmrc.io import atomic_write_json, atomic_write_text, read_json

log = logging.getLogger(__name__)

ALL_MODES = ("stage1-only", "direct", "classifier-llm")


@dataclass
class ModelSpec:
    path: str | None = None  # a trained model to reuse (stage-1 checkpoint or stage-2 adapter folder)
    config: str | None = None  # its training config, when `path` is not given
    set: list[str] = field(default_factory=list)  # overrides of that config (as --set)


@dataclass
class DataSpec:
    """A training / tuning split that compare makes itself (so a fresh clone needs no `lmrc data split`)."""

    train: str | None = None  # labelled documents; None: the models' configs name their own data
    max_docs: int | None = None  # keep this many documents of it (after the seeded shuffle)
    tune_fraction: float = 0.1  # the tuning split: model selection and the recall-target calibration
    seed: int = 13

    def __post_init__(self) -> None:
        if not 0.0 <= self.tune_fraction < 1.0:
            raise ValueError("data.tune_fraction must be in [0, 1)")
        if self.max_docs is not None and self.max_docs < 2:
            raise ValueError("data.max_docs must be at least 2")


@dataclass
class EvalSpec:
    docs: str = "${LMRC_DATA_DIR}/redocred/dev_50.json"
    max_docs: int | None = None  # the first N documents; None: all
    indices: list[int] | None = None  # or these documents (0-based positions in the file)
    train: str | None = "${LMRC_DATA_DIR}/redocred/train_450.json"  # Ign F1, frequent / long-tail, plot order

    def __post_init__(self) -> None:
        if self.max_docs is not None and self.max_docs < 1:
            raise ValueError("eval.max_docs must be at least 1")
        if self.indices is not None and self.max_docs is not None:
            raise ValueError("eval: give max_docs or indices, not both")


@dataclass
class CandidateSpec:
    """How stage 1 chooses the LLM's candidates (at most one; none: the head's own rule)."""

    threshold: float | None = None
    recall_target: float | None = None  # calibrated on `tune` (default: the tuning split made by `data`)
    tune: str | None = None
    max_per_doc: int | None = None


@dataclass
class Variant:
    """A further row: a mode run with other `lmrc predict` settings (e.g. constrained answers, refine)."""

    name: str
    mode: str = "classifier-llm"
    set: list[str] = field(default_factory=list)  # overrides of the mode's predict config (`--set` keys)

    def __post_init__(self) -> None:
        if self.mode not in LLM_MODES:
            raise ValueError(f"variant {self.name!r}: mode must be one of {', '.join(LLM_MODES)}")
        if not self.name.strip() or "/" in self.name:
            raise ValueError(f"variant name {self.name!r}: a non-empty name without '/'")


@dataclass
class LearningCurveSpec:
    """Relation F1 against LLM training tokens (the curve a user with a GPU reads the budget from): for every
    budget an rc and a direct adapter, rc asked about the gold pairs (LMRC's "RC stage" ablation) and direct about
    all pairs, both with grammar-constrained answers by default.

    The adapters (`adapters`): `separate` (default) trains one per budget with `train.max_tokens` = the budget,
    each with its own full schedule (what a user training to that budget gets; the config's own adapters serve
    their budget); `snapshots` takes them from the config's own adapters' runs, kept on the way
    (`train.snapshot_tokens`): no token trained twice, but a smaller budget's point is an adapter mid-schedule,
    its learning rate not yet decayed."""

    budgets: list[int] = field(default_factory=list)  # LLM training tokens; empty: no curve
    kinds: list[str] = field(default_factory=lambda: ["rc", "direct"])
    adapters: str = "separate"  # separate | snapshots
    constrained: bool = True
    # the first N evaluation documents (None: all): direct asks about every pair, the costly part on a CPU
    max_docs: int | None = None
    direct_max_docs: int | None = None  # direct's points on fewer of them (None: max_docs)

    def __post_init__(self) -> None:
        for name in ("max_docs", "direct_max_docs"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"learning_curve.{name} must be at least 1")
        if any(b < 1 for b in self.budgets) or len(set(self.budgets)) != len(self.budgets):
            raise ValueError("learning_curve.budgets: distinct positive token counts")
        if self.adapters not in ("separate", "snapshots"):
            raise ValueError(f"learning_curve.adapters: separate or snapshots, not {self.adapters!r}")
        bad = [k for k in self.kinds if k not in ("rc", "direct")]
        if bad or not self.kinds:
            raise ValueError(f"learning_curve.kinds: rc and/or direct, not {bad[0] if bad else 'nothing'!r}")


@dataclass
class CompareConfig:
    eval: EvalSpec = field(default_factory=EvalSpec)
    data: DataSpec = field(default_factory=DataSpec)
    stage1: ModelSpec = field(default_factory=ModelSpec)
    rc: ModelSpec = field(default_factory=ModelSpec)
    direct: ModelSpec = field(default_factory=ModelSpec)
    candidates: CandidateSpec = field(default_factory=CandidateSpec)
    modes: list[str] = field(default_factory=lambda: list(ALL_MODES))
    variants: list[Variant] = field(default_factory=list)
    # Rows with the LLM's relation names mapped by SBERT (LMRC Appendix B) beside the strict rows.
    sbert: bool = True
    theta: float = 0.55  # LMRC Appendix B
    thetas: list[float] = field(default_factory=lambda: [0.3, 0.4, 0.5, 0.55, 0.6, 0.7, 0.8, 0.9, 1.0])
    stage2_overrides: dict[str, Any] = field(default_factory=dict)  # predict-time settings of both adapters
    docs_per_batch: int = 4
    candidate_points: int = 9  # thresholds on candidates.png
    learning_curve: LearningCurveSpec = field(default_factory=LearningCurveSpec)

    def __post_init__(self) -> None:
        unknown = [m for m in self.modes if m not in ALL_MODES]
        if unknown:
            raise ValueError(f"modes: unknown mode {unknown[0]!r} (expected {', '.join(ALL_MODES)})")
        if not self.modes:
            raise ValueError("modes: name at least one mode")
        names = [v.name for v in self.variants]
        clash = [n for n in names if n in ALL_MODES or names.count(n) > 1]
        if clash:
            raise ValueError(f"variants: name {clash[0]!r} is taken (a mode or another variant)")
        missing = [v.name for v in self.variants if v.mode not in self.modes]
        if missing:
            raise ValueError(f"variant {missing[0]!r}: its mode is not in modes")


def load_compare_config(path: str | os.PathLike | None, overrides: Sequence[str] = ()) -> CompareConfig:
    return load_config(CompareConfig, path, overrides)


# ------------------------------------------------------------------------------------------------ data


def _write_docs(path: Path, docs: Sequence[Document]) -> None:
    atomic_write_json(path, [document_to_raw(d) for d in docs])


def _same_or_write(path: Path, docs: Sequence[Document]) -> Path:
    """Write the documents unless the file already holds exactly them (keeps reruns' fingerprints stable)."""
    raw = [document_to_raw(d) for d in docs]
    if not (path.is_file() and read_json(path) == raw):
        atomic_write_json(path, raw)
    return path


def prepare_data(cfg: CompareConfig, out: Path, relations: RelationSet) -> dict[str, Path | None]:
    """The evaluation file (its first `eval.max_docs` documents) and, when asked, the train / tune split."""
    from lmrc.data.split import split_indices

    eval_path = expand_path(cfg.eval.docs, "eval.docs")
    docs = load_documents(eval_path, relations)
    require_labels(docs, eval_path, "compare scores every row")
    if cfg.eval.max_docs is not None:
        docs = docs[: cfg.eval.max_docs]
    if cfg.eval.indices is not None:
        bad = [i for i in cfg.eval.indices if not 0 <= i < len(docs)]
        if bad:
            raise LmrcError(f"eval.indices: {bad[0]} is out of range ({eval_path} has {len(docs)} documents)")
        docs = [docs[i] for i in cfg.eval.indices]
    paths: dict[str, Path | None] = {"eval": _same_or_write(out / "data" / "eval.json", docs)}
    paths["train"] = paths["tune"] = None
    if cfg.data.train is not None:
        train_path = expand_path(cfg.data.train, "data.train")
        train_docs = load_documents(train_path, relations)
        if cfg.data.max_docs is not None:
            import random

            order = list(range(len(train_docs)))
            random.Random(cfg.data.seed).shuffle(order)
            train_docs = [train_docs[i] for i in sorted(order[: cfg.data.max_docs])]
        if cfg.data.tune_fraction > 0:
            ratios = (1 - cfg.data.tune_fraction, cfg.data.tune_fraction)
            part_train, part_tune = split_indices(len(train_docs), ratios, cfg.data.seed)
            paths["tune"] = _same_or_write(out / "data" / "tune.json", [train_docs[i] for i in part_tune])
        else:
            part_train = list(range(len(train_docs)))
        paths["train"] = _same_or_write(out / "data" / "train.json", [train_docs[i] for i in part_train])
    return paths


# ---------------------------------------------------------------------------------------------- training


def _data_overrides(kind: str, paths: dict[str, Path | None]) -> list[str]:
    if paths["train"] is None:
        return []
    out = [f"data.train={paths['train']}"]
    if kind == "stage1":
        out.append(f"data.tune={paths['tune'] if paths['tune'] is not None else 'null'}")
    return out


def ensure_stage1(cfg: CompareConfig, out: Path, paths: dict[str, Path | None]) -> Path:
    from lmrc.stage1.config import load_stage1_config
    from lmrc.stage1.train import train

    if cfg.stage1.path is not None:
        return expand_path(cfg.stage1.path, "stage1.path")
    folder = out / "models" / "stage1"
    overrides = [*_data_overrides("stage1", paths), *cfg.stage1.set, f"output_dir={folder}"]
    s1 = load_stage1_config(cfg.stage1.config, overrides)
    log.info("compare: training stage 1 in %s", folder)
    result = train(s1, resume=True)
    if not result.finished:
        raise LmrcError(f"{folder}: stage-1 training did not finish (rerun lmrc compare to continue)")
    return result.best_dir


def ensure_adapter(
    kind: str,
    cfg: CompareConfig,
    out: Path,
    paths: dict[str, Path | None],
    extra: Sequence[str] = (),
    name: str | None = None,
) -> Path:
    """The `kind` adapter (rc or direct): the config's trained one, else trained in `models/<name>` (default: the
    kind) with the config's settings and then `extra` overrides; resumed when a run was interrupted."""
    from lmrc.stage2.config import load_stage2_config
    from lmrc.stage2.modeling import ADAPTER_CONFIG
    from lmrc.stage2.train import train

    spec: ModelSpec = getattr(cfg, kind)
    if spec.path is not None and not extra:
        return expand_path(spec.path, f"{kind}.path")
    folder = out / "models" / (name or kind)
    if not extra:  # the config's own adapter keeps the learning curve's snapshots on the way
        extra = _snapshot_overrides(kind, cfg)
    overrides = [*_data_overrides(kind, paths), *spec.set, *extra, f"mode={kind}", f"output_dir={folder}"]
    s2 = load_stage2_config(spec.config, overrides)
    if (folder / ADAPTER_CONFIG).is_file() and (not (folder / "last").exists() or _finished_with(folder, s2)):
        return folder  # finished earlier (with these settings: no model load to find that out)
    log.info("compare: training the %s adapter in %s", kind, folder)
    result = train(s2, folder, resume=True)
    if not result.finished:
        raise LmrcError(f"{folder}: {kind} training did not finish (rerun lmrc compare to continue)")
    return folder


def _finished_with(folder: Path, s2) -> bool:
    """Whether the adapter in `folder` finished its training with the settings `s2` asks for (a resumable state
    is kept after the last step; a changed budget continues from it instead)."""
    from lmrc.stage2.config import load_stage2_config
    from lmrc.stage2.modeling import CONFIG_FILE
    from lmrc.stage2.train import SUMMARY_FILE

    summary = folder / SUMMARY_FILE
    if not summary.is_file() or not read_json(summary).get("finished"):
        return False
    return to_dict(load_stage2_config(folder / CONFIG_FILE)) == to_dict(s2)


# ------------------------------------------------------------------------------------------------ modes


def _predict_config(
    cfg: CompareConfig, mode: str, models: dict[str, Path], tune: Path | None, extra: Sequence[str] = ()
) -> dict:
    from lmrc.config import apply_overrides
    from lmrc.predict.config import PredictConfig

    overrides = json.loads(json.dumps(cfg.stage2_overrides))
    if cfg.sbert and mode in LLM_MODES:
        overrides.setdefault("align", {}).update({"relation_mapping": "sbert", "theta": cfg.theta})
    c = cfg.candidates
    stage1: dict[str, Any] = {}
    if mode != "direct":
        stage1 = {"checkpoint": str(models["stage1"])}
    if mode == "classifier-llm":
        stage1.update(
            {"threshold": c.threshold, "recall_target": c.recall_target, "max_per_doc": c.max_per_doc}
        )
    stage2: dict[str, Any] = {}
    if mode in LLM_MODES:
        stage2 = {
            "adapter": str(models["rc" if mode == "classifier-llm" else "direct"]),
            "overrides": overrides,
        }
    out = {
        "mode": mode,
        "stage1": {k: v for k, v in stage1.items() if v is not None},
        "stage2": stage2,
        "docs_per_batch": cfg.docs_per_batch,
    }
    apply_overrides(out, list(extra))
    if mode == "classifier-llm" and (c.recall_target is not None or out.get("fusion") == "refine"):
        tune_file = expand_path(c.tune, "candidates.tune") if c.tune else tune
        if tune_file is not None:
            out["stage1"].setdefault("tune", str(tune_file))
    from lmrc.config import from_dict

    from_dict(PredictConfig, json.loads(json.dumps(out)), f"variant of {mode}")  # refuse a bad key now
    return out


def run_mode(
    cfg: CompareConfig,
    mode: str,
    models: dict[str, Path],
    paths: dict[str, Path | None],
    out: Path,
    variant: Variant | None = None,
) -> ModeRun:
    """`lmrc predict` for one mode (or variant) in a child process (its own peak memory), resuming a finished or
    killed run."""
    from lmrc.predict.run import sidecar

    runs = out / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    name = variant.name if variant is not None else mode
    slug = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)
    config_path = runs / f"{slug}.yaml"
    predict_cfg = _predict_config(cfg, mode, models, paths["tune"], variant.set if variant else ())
    atomic_write_text(config_path, yaml.safe_dump(predict_cfg, sort_keys=False))
    result = runs / f"{slug}.json"
    cmd = [
        sys.executable,
        "-m",
        "lmrc.cli",
        "predict",
        "--config",
        str(config_path),
        "--input",
        str(paths["eval"]),
    ]
    cmd += ["--output", str(result), "--resume"]
    if cfg.eval.train is not None:
        cmd += ["--train", str(expand_path(cfg.eval.train, "eval.train"))]
    log.info("compare: %s", " ".join(cmd))
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=None, text=True)
    if proc.returncode != 0:
        raise LmrcError(
            f"lmrc predict --config {config_path} failed (exit {proc.returncode}); see the lines above"
        )
    return ModeRun(mode, result, read_json(sidecar(result, ".summary.json")), name)


# -------------------------------------------------------------------------------------- learning curve


def _snapshot_overrides(kind: str, cfg: CompareConfig) -> list[str]:
    """`train.snapshot_tokens` for the config's own `kind` adapter when the learning curve takes its points from
    that run (the budgets below its own; its own budget is the finished adapter)."""
    lc = cfg.learning_curve
    if lc.adapters != "snapshots" or kind not in lc.kinds or not lc.budgets:
        return []
    main = _main_budget(kind, cfg)
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


def _curve_adapter(
    kind: str, budget: int, cfg: CompareConfig, out: Path, paths: dict[str, Path | None]
) -> Path:
    """The adapter of one learning-curve point (see LearningCurveSpec.adapters)."""
    from lmrc.stage2.modeling import ADAPTER_CONFIG
    from lmrc.stage2.train import SNAPSHOTS_DIR

    if budget == _main_budget(kind, cfg):
        return ensure_adapter(kind, cfg, out, paths)
    if cfg.learning_curve.adapters == "separate":
        return ensure_adapter(kind, cfg, out, paths, [f"train.max_tokens={budget}"], f"curve-{kind}-{budget}")
    main = ensure_adapter(kind, cfg, out, paths)
    snapshot = main / SNAPSHOTS_DIR / f"tokens-{budget}"
    if not (snapshot / ADAPTER_CONFIG).is_file():
        raise LmrcError(
            f"{snapshot}: no snapshot (the adapter was trained without train.snapshot_tokens={budget}); "
            "use learning_curve.adapters=separate"
        )
    return snapshot


def _main_budget(kind: str, cfg: CompareConfig) -> int | None:
    """train.max_tokens of the config's own `kind` adapter when compare trains it (None otherwise)."""
    from lmrc.stage2.config import load_stage2_config

    spec: ModelSpec = getattr(cfg, kind)
    if spec.path is not None:
        return None
    return load_stage2_config(spec.config, [*spec.set, f"mode={kind}"]).train.max_tokens


def learning_curve(
    cfg: CompareConfig, out: Path, paths: dict[str, Path | None], docs: Sequence[Document], ref, say
) -> list[dict[str, Any]]:
    """One point per (kind, budget): the adapter trained with that many LLM tokens (the config's own adapter at
    its budget, else `models/curve-<kind>-<budget>` or a snapshot of the config's own, as
    `learning_curve.adapters` says), run by `lmrc stage2 predict` in a child process (resumable) on the
    evaluation documents, scored."""
    from lmrc.eval.bootstrap import document_counts, paired_bootstrap
    from lmrc.eval.metrics import evaluate, load_predictions
    from lmrc.stage2.train import SUMMARY_FILE

    lc = cfg.learning_curve
    runs = out / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    all_docs = docs
    from lmrc.predict.config import Stage2Settings

    sets = Stage2Settings(overrides=json.loads(json.dumps(cfg.stage2_overrides))).override_list()
    if lc.constrained:
        sets.append("generation.constrained=true")
    points = []
    for kind in lc.kinds:
        n = lc.direct_max_docs if kind == "direct" and lc.direct_max_docs is not None else lc.max_docs
        docs, eval_path = all_docs, paths["eval"]
        if n is not None and n < len(all_docs):
            docs = all_docs[:n]
            eval_path = _same_or_write(out / "data" / f"curve_eval.{kind}.json", docs)
        for budget in sorted(lc.budgets):
            name = f"curve-{kind}-{budget}"
            say(f"learning curve: {kind} adapter, {budget:,} LLM training tokens")
            adapter = _curve_adapter(kind, budget, cfg, out, paths)
            result = runs / f"{name}.json"
            cmd = [sys.executable, "-m", "lmrc.cli", "stage2", "predict", "--adapter", str(adapter)]
            cmd += ["--input", str(eval_path), "--output", str(result), "--resume"]
            if kind == "rc":
                cmd.append("--gold-pairs")
            for item in sets:
                cmd += ["--set", item]
            log.info("compare: %s", " ".join(cmd))
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=None, text=True)
            if proc.returncode != 0:
                raise LmrcError(f"learning curve: {' '.join(cmd)} failed (exit {proc.returncode})")
            predictions = load_predictions(result)
            metrics = evaluate(predictions, docs, ref).relation
            # how far the point moves with the draw of documents (the curve is read across few of them)
            spread = paired_bootstrap({"point": document_counts(predictions, docs)}).get("point")
            trained = read_json(adapter / SUMMARY_FILE) if (adapter / SUMMARY_FILE).is_file() else {}
            points.append(
                {
                    "kind": kind,
                    "pairs": "gold pairs" if kind == "rc" else "all pairs",
                    "budget_tokens": budget,
                    "adapter": "snapshot" if trained.get("snapshot_of") else "trained to the budget",
                    "documents": len(docs),
                    "trained_tokens": trained.get("tokens_trained", trained.get("tokens_this_call")),
                    "precision": metrics.precision,
                    "recall": metrics.recall,
                    "f1": metrics.f1,
                    "f1_interval": [spread.f1.low, spread.f1.high] if spread else None,
                    "predicted": metrics.predicted,
                }
            )
    return points


# --------------------------------------------------------------------------------------------- scoring


# ----------------------------------------------------------------------------------------------- compare


@dataclass
class CompareResult:
    rows: list[dict]
    results_md: Path
    results_json: Path
    pictures: list[Path]
    skipped_pictures: list[str]
    candidates: dict[str, Any] | None
    learning_curve: list[dict[str, Any]] = field(default_factory=list)
    machine: str = ""  # the machine kind the rows were measured on (lmrc.hardware.describe_line)


def compare(
    cfg: CompareConfig, output_dir: str | os.PathLike, on_stage: Callable[[str], None] | None = None
) -> CompareResult:
    """Train what is missing, run every mode on the same documents, score, tabulate and plot."""
    from lmrc.eval.metrics import TrainReference
    from lmrc.experiments import plots
    from lmrc.hardware import describe_line

    machine = describe_line()
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    say = on_stage or (lambda msg: log.info("%s", msg))
    relations = _relation_set(cfg)
    paths = prepare_data(cfg, out, relations)
    docs = load_documents(paths["eval"], relations)  # type: ignore[arg-type]
    ref = None
    if cfg.eval.train is not None:
        ref = TrainReference.from_documents(
            load_documents(expand_path(cfg.eval.train, "eval.train"), relations)
        )

    models: dict[str, Path] = {}
    if "stage1-only" in cfg.modes or "classifier-llm" in cfg.modes:
        say("stage 1: training or reusing the pair classifier")
        models["stage1"] = ensure_stage1(cfg, out, paths)
    for kind, mode in (("rc", "classifier-llm"), ("direct", "direct")):
        if mode in cfg.modes:
            say(f"stage 2: training or reusing the {kind} adapter")
            models[kind] = ensure_adapter(kind, cfg, out, paths)

    runs = []
    for mode in [m for m in ALL_MODES if m in cfg.modes]:
        if mode == "stage1-only" and not _multi_label(models["stage1"]):
            log.warning("stage1-only skipped: the stage-1 head predicts no relations (bce)")
            continue
        say(f"predict: {mode} on {len(docs)} documents")
        runs.append(run_mode(cfg, mode, models, paths, out))
        for v in cfg.variants:
            if v.mode == mode:
                say(f"predict: {v.name} ({mode} with {' '.join(v.set) or 'the same settings'})")
                runs.append(run_mode(cfg, mode, models, paths, out, v))

    say("scoring")
    rows, per_relation = score_runs(runs, docs, ref, relations)
    cand = next((r.summary.get("candidates") for r in runs if r.name == "classifier-llm"), None)
    thetas = theta_curves(runs, docs, ref, relations, cfg.thetas) if cfg.sbert else {}
    curve = []
    if "stage1" in models:
        curve = candidate_curve(models["stage1"], models.get("rc"), docs, cfg.candidate_points)
    points = learning_curve(cfg, out, paths, docs, ref, say) if cfg.learning_curve.budgets else []
    results = {
        "config": to_dict(cfg),
        "machine": machine,
        "documents": len(docs),
        "eval": str(paths["eval"]),
        "models": {k: str(v) for k, v in models.items()},
        "rows": rows,
        "stage1_candidates": cand,
        "theta": {"thetas": list(cfg.thetas), "f1": thetas},
        "candidate_curve": curve,
        "per_relation_f1": per_relation,
        "relation_train_counts": ref.relation_counts if ref is not None else None,
        "learning_curve": points,
    }
    results_json = out / "results.json"
    atomic_write_json(results_json, results, indent=2)
    results_md = out / "results.md"
    atomic_write_text(results_md, results_markdown(rows, cand, len(docs), paths["eval"], points, machine))
    pictures, skipped = plots.draw_all(out, results, relations)
    return CompareResult(rows, results_md, results_json, pictures, skipped, cand, points, machine)


def _relation_set(cfg: CompareConfig) -> RelationSet:
    """The relation set of the models: a trained model's copy, else the stage-1 training config's rel_info."""
    from lmrc.stage1.config import load_stage1_config

    if cfg.rc.path is not None or cfg.direct.path is not None:
        from lmrc.stage2.modeling import load_adapter_config
        from lmrc.stage2.predict import adapter_relations

        path = expand_path(cfg.rc.path or cfg.direct.path, "rc.path")  # type: ignore[arg-type]
        return adapter_relations(path, load_adapter_config(path))
    if cfg.stage1.path is not None:
        from lmrc.stage1.checkpoint import load_checkpoint

        return load_checkpoint(expand_path(cfg.stage1.path, "stage1.path")).relations
    s1 = load_stage1_config(cfg.stage1.config, cfg.stage1.set)
    return load_relations(s1.data.path("rel_info"))


def _multi_label(checkpoint: Path) -> bool:
    from lmrc.stage1.checkpoint import load_checkpoint

    return bool(load_checkpoint(checkpoint).loss.per_relation)
