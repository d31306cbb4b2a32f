"""Evaluation during stage-1 training: the metrics on the tuning file (computed on rank 0, the same on every
rank), with how many relations the head predicts and the gold holds, and the metrics.jsonl record of an
evaluation."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
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
        metrics.update(prediction_counts(loss, logits, data.tune_features))
    if accelerator.num_processes > 1:
        metrics = broadcast_object_list([metrics])[0]
    return metrics


def prediction_counts(loss, logits: Sequence[torch.Tensor], features: Sequence) -> dict[str, int]:
    """`predicted`: the relations the head predicts (its own rule) over the documents; `gold`: the relations their
    labels hold. The bce head predicts candidates, not relations: its candidate pairs (score above its
    threshold) and the gold pairs that hold a relation."""
    predicted = gold = 0
    for lg, f in zip(logits, features):
        if not len(lg):
            continue
        positive = torch.tensor(f.labels, dtype=torch.float)[:, 1:] > 0
        if loss.per_relation:
            predicted += int(loss.predict(lg)[:, 1:].sum())
            gold += int(positive.sum())
        else:
            predicted += int((loss.score(lg) > loss.score_threshold).sum())
            gold += int(positive.any(dim=-1).sum())
    return {"predicted": predicted, "gold": gold}


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
