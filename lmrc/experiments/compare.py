"""`lmrc compare`: the LMRC comparison on one set of documents — stage 1 alone, direct fine-tuning, classifier-LLM.

A run folder (`--output-dir DIR`) holds everything, and re-running the same config reuses what is finished:

- `data/`: the evaluation documents, and the training / tuning split when the config asks compare to make one
  (`data.train`; lmrc.experiments.data);
- `models/stage1`, `models/rc`, `models/direct`: models trained here (resumable) unless the config names trained
  ones (`stage1.path`, `rc.path`, `direct.path`; lmrc.experiments.models);
- `runs/<mode>.json` (+ `.summary.json`, `.progress.jsonl`, `.yaml`): each mode and variant run by the prediction
  driver in a child process of its own (so that its peak memory is its own), resumable (lmrc.experiments.rows);
- `results.json`, `results.md`: one row per mode and variant (SBERT relation mapping on/off), and the learning
  curve's points (lmrc.experiments.curve);
- `per_relation.png`, `theta.png`, `candidates.png`, `learning_curve.png` when matplotlib is installed (LMRC
  Figures 2 and 3, the stage-1 threshold trade-off, the curve); `theta.png` re-aligns the saved raw LLM answers,
  without re-running the LLM.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmrc.config import expand_path, to_dict
from lmrc.data.docred import load_documents
from lmrc.data.relations import RelationSet
from lmrc.eval.metrics import TrainReference
from lmrc.experiments import plots
from lmrc.experiments.config import CompareConfig, load_compare_config
from lmrc.experiments.curve import learning_curve
from lmrc.experiments.data import prepare_data
from lmrc.experiments.models import ensure_models, relation_set
from lmrc.experiments.report import candidate_curve, results_markdown, score_runs, theta_curves
from lmrc.experiments.rows import run_rows
from lmrc.io import atomic_write_json, atomic_write_text
from lmrc.machine.hardware import describe_line
from lmrc.show import collect, page

__all__ = ["CompareResult", "compare", "load_compare_config"]

log = logging.getLogger(__name__)


@dataclass
class CompareResult:
    rows: list[dict]
    results_md: Path
    results_json: Path
    pictures: list[Path]
    skipped_pictures: list[str]
    candidates: dict[str, Any] | None
    learning_curve: list[dict[str, Any]] = field(default_factory=list)
    machine: str = ""  # the machine kind the rows were measured on (lmrc.machine.hardware.describe_line)


def compare(
    cfg: CompareConfig, output_dir: str | os.PathLike, on_stage: Callable[[str], None] | None = None
) -> CompareResult:
    """Train what is missing, run every mode on the same documents, score, tabulate and plot."""
    machine = describe_line()
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    say = on_stage or (lambda msg: log.info("%s", msg))
    relations = relation_set(cfg)
    files = prepare_data(cfg, out, relations)
    docs = load_documents(files.eval, relations)
    ref = _train_reference(cfg, relations)
    models = ensure_models(cfg, out, files, say)
    runs = run_rows(cfg, models, files, out, len(docs), say)

    say("scoring")
    rows, per_relation = score_runs(runs, docs, ref, relations)
    for row in rows:  # relative: the folder can move (lmrc show reads it)
        row["result"] = os.path.relpath(row["result"], out)
    cand = next((r.summary.get("candidates") for r in runs if r.name == "classifier-llm"), None)
    thetas = theta_curves(runs, docs, ref, relations, cfg.thetas) if cfg.sbert else {}
    curve = []
    if "stage1" in models:
        curve = candidate_curve(models["stage1"], models.get("rc"), docs, cfg.candidate_points)
    points = learning_curve(cfg, out, files, docs, ref, say) if cfg.learning_curve.budgets else []
    results = {
        "config": to_dict(cfg),
        "machine": machine,
        "documents": len(docs),
        "eval": str(files.eval),
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
    atomic_write_text(results_md, results_markdown(rows, cand, len(docs), files.eval, points, machine))
    pictures, skipped = plots.draw_all(out, results, relations)
    page.write_page(collect.payload(collect.from_compare_folder(out)), out / "report.html")
    return CompareResult(rows, results_md, results_json, pictures, skipped, cand, points, machine)


def _train_reference(cfg: CompareConfig, relations: RelationSet) -> TrainReference | None:
    """The training documents the scores refer to (Ign F1, frequent / long-tail relations), when configured."""
    if cfg.eval.train is None:
        return None
    return TrainReference.from_documents(load_documents(expand_path(cfg.eval.train, "eval.train"), relations))
