"""The learning curve: relation F1 against the LLM's training tokens (see LearningCurveSpec). One point per
(kind, budget): the adapter trained with that many tokens, asked about the gold pairs (rc) or all pairs (direct)
on the first evaluation documents, into `runs/curve-<kind>-<budget>.json` (resumable), scored with a bootstrap
interval."""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from lmrc.data.docred import Document
from lmrc.errors import LmrcError
from lmrc.eval.bootstrap import document_counts, paired_bootstrap
from lmrc.eval.metrics import TrainReference, evaluate, load_predictions
from lmrc.experiments import jobs
from lmrc.experiments.config import CompareConfig
from lmrc.experiments.data import DataFiles, write_if_changed
from lmrc.experiments.models import ensure_adapter, main_budget
from lmrc.io import read_json
from lmrc.stage2.adapter_folder import SNAPSHOTS_DIR
from lmrc.stage2.modeling import ADAPTER_CONFIG
from lmrc.stage2.summary import SUMMARY_FILE

log = logging.getLogger(__name__)


def learning_curve(
    cfg: CompareConfig,
    out: Path,
    files: DataFiles,
    docs: Sequence[Document],
    ref: TrainReference | None,
    say: Callable[[str], None],
) -> list[dict[str, Any]]:
    """Every point of the curve, by kind then budget: its adapter (the config's own adapter at its budget, else
    `models/curve-<kind>-<budget>` or a snapshot of the config's own, as `learning_curve.adapters` says) run on
    the evaluation documents in a child process, scored."""
    lc = cfg.learning_curve
    (out / "runs").mkdir(parents=True, exist_ok=True)
    overrides = copy.deepcopy(cfg.stage2_overrides)
    if lc.constrained:
        overrides.setdefault("generation", {})["constrained"] = True
    points = []
    for kind in lc.kinds:
        kind_docs, eval_path = _curve_documents(kind, cfg, out, files, docs)
        for budget in sorted(lc.budgets):
            say(f"learning curve: {kind} adapter, {budget:,} LLM training tokens")
            adapter = curve_adapter(kind, budget, cfg, out, files)
            result = out / "runs" / f"curve-{kind}-{budget}.json"
            log.info("compare: learning curve point %s -> %s", adapter, result)
            jobs.predict_with_adapter(
                adapter, eval_path, result, gold_pairs=kind == "rc", overrides=overrides
            )
            points.append(_score_point(kind, budget, adapter, result, kind_docs, ref))
    return points


def _curve_documents(
    kind: str, cfg: CompareConfig, out: Path, files: DataFiles, docs: Sequence[Document]
) -> tuple[Sequence[Document], Path]:
    """The evaluation documents of `kind`'s points (`learning_curve.max_docs`, or `direct_max_docs` for direct:
    it asks about every pair, the costly part on a CPU) and their file."""
    lc = cfg.learning_curve
    n = lc.direct_max_docs if kind == "direct" and lc.direct_max_docs is not None else lc.max_docs
    if n is None or n >= len(docs):
        return docs, files.eval
    return docs[:n], write_if_changed(out / "data" / f"curve_eval.{kind}.json", docs[:n])


def curve_adapter(kind: str, budget: int, cfg: CompareConfig, out: Path, files: DataFiles) -> Path:
    """The adapter of one learning-curve point (see LearningCurveSpec.adapters)."""
    if budget == main_budget(kind, cfg):
        return ensure_adapter(kind, cfg, out, files)
    if cfg.learning_curve.adapters == "separate":
        return ensure_adapter(kind, cfg, out, files, [f"train.max_tokens={budget}"], f"curve-{kind}-{budget}")
    main = ensure_adapter(kind, cfg, out, files)
    snapshot = main / SNAPSHOTS_DIR / f"tokens-{budget}"
    if not (snapshot / ADAPTER_CONFIG).is_file():
        raise LmrcError(
            f"{snapshot}: no snapshot (the adapter was trained without train.snapshot_tokens={budget}); "
            "use learning_curve.adapters=separate"
        )
    return snapshot


def _score_point(
    kind: str, budget: int, adapter: Path, result: Path, docs: Sequence[Document], ref: TrainReference | None
) -> dict[str, Any]:
    predictions = load_predictions(result)
    metrics = evaluate(predictions, docs, ref).relation
    # how far the point moves with the draw of documents (the curve is read across few of them)
    spread = paired_bootstrap({"point": document_counts(predictions, docs)}).get("point")
    trained = read_json(adapter / SUMMARY_FILE) if (adapter / SUMMARY_FILE).is_file() else {}
    return {
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
