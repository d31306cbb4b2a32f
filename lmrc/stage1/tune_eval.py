"""Evaluation during stage-1 training: the metrics on the tuning file (computed on rank 0, the same on every
rank), and the metrics.jsonl record of an evaluation."""

from __future__ import annotations

from typing import Any

from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from lmrc.errors import LmrcError
from lmrc.stage1.config import Stage1Config
from lmrc.stage1.inference import infer_logits, tune_metrics
from lmrc.stage1.steps import Position
from lmrc.stage1.train_data import TrainData


def select_metric(cfg: Stage1Config, loss) -> str:
    """The tuning metric that selects best/ (`train.select_metric`), checked against what the head predicts."""
    name = cfg.train.resolved_select_metric(cfg.loss.name)
    if name in ("f1", "ign_f1") and not loss.per_relation:
        raise LmrcError(
            f"config: train.select_metric {name!r} needs relation predictions; "
            f"the {cfg.loss.name!r} head has none (use pair_f1)"
        )
    return name


def tune_metrics_on_every_rank(
    accelerator: Accelerator, model, loss, data: TrainData, batch_size: int
) -> dict[str, Any]:
    """The tuning file's metrics (f1, ign_f1, pair_f1, loss, ...), computed once and sent to every process, so
    that all processes take the same decisions (best checkpoint, early stopping)."""
    metrics: dict[str, Any] = {}
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        with accelerator.autocast():
            logits = infer_logits(unwrapped, data.tune_features, batch_size, accelerator.device)
        unwrapped.train()
        metrics = tune_metrics(
            loss, logits, data.tune_docs, data.tune_features, data.relations, data.train_reference
        )
    if accelerator.num_processes > 1:
        metrics = broadcast_object_list([metrics])[0]
    return metrics


def eval_record(
    pos: Position, n_batches: int, lrs: list[float], metrics: dict, select_metric: str, improved: bool
) -> dict[str, Any]:
    """One metrics.jsonl line: where training stands, the tuning metrics and the selection (before the timing
    fields, which the caller adds)."""
    return {
        "epoch": round(pos.epoch + pos.batch_pos / max(1, n_batches), 4),
        "step": pos.global_step,
        "train_loss": pos.loss_sum / pos.loss_steps if pos.loss_steps else None,
        "lr_encoder": lrs[0],
        "lr_head": lrs[1],
        "tune": metrics,
        "select_metric": select_metric,
        "value": metrics.get(select_metric),
        "best": improved,
        "best_value": pos.best_value,
    }
