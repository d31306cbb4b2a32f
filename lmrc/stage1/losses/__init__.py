"""Stage-1 heads' losses and decision rules (config `stage1.loss`; build one with `build_loss(name, **params)`).

Every loss is one class with the same interface:

- `forward(logits, labels) -> scalar`: the training loss, averaged over the pairs of the batch. `labels` is a
  float multi-hot `[pairs, 1 + R]` tensor (column 0 = NA, columns 1..R = relations in RelationSet column
  order). Only columns 1..R are read (a pair is NA exactly when it has no positive relation, so column 0 carries
  no extra information); the caller's tensors are never modified.
- `margins(logits) -> [pairs, R]`: for every relation, its logit minus the threshold that applies to it, in label
  column order (None for `bce`, which has no per-relation outputs: see `per_relation`).
- `predict(logits) -> bool [pairs, 1 + R]`: multi-hot decisions, column 0 set exactly when no relation is
  predicted. For the multi-label heads `predict(x)[:, 1:] == (margins(x) > 0)`, except with ATL's optional top-k
  cap. `bce` returns `[pairs, 2]` (NA, has-relation): see `BCELoss`.
- `score(logits) -> [pairs]`: the candidate-ranking score of the candidates file; for every head a pair is
  predicted to hold a relation exactly when `score > score_threshold` (0 for margins, 0.5 for bce).
- `num_logits(n_relations) -> int`: how many logits per pair the head must produce.

Losses are computed in float32 at least (fp16/bf16 logits from autocast are upcast).
"""

from __future__ import annotations

import inspect
from typing import Any

from lmrc.errors import LmrcError
from lmrc.stage1.losses.amtl import AMTLoss, amtl_segments
from lmrc.stage1.losses.atgl import ATGLoss
from lmrc.stage1.losses.atl import ATLoss
from lmrc.stage1.losses.atsl import ATSLoss
from lmrc.stage1.losses.base import RelationLoss, loss_error
from lmrc.stage1.losses.bce import BCELoss
from lmrc.stage1.losses.mdre import MDRELoss, select_hard_negatives

__all__ = [
    "LOSSES",
    "AMTLoss",
    "ATGLoss",
    "ATLoss",
    "ATSLoss",
    "BCELoss",
    "MDRELoss",
    "RelationLoss",
    "amtl_segments",
    "build_loss",
    "select_hard_negatives",
]

LOSSES: dict[str, type[RelationLoss]] = {
    "bce": BCELoss,
    "atl": ATLoss,
    "atgl": ATGLoss,
    "amtl": AMTLoss,
    "atsl": ATSLoss,
    "mdre": MDRELoss,
}


def build_loss(name: str, **params: Any) -> RelationLoss:
    """The loss registered as `name`, built with `params` (the config's loss parameters)."""
    cls = LOSSES.get(name)
    if cls is None:
        raise LmrcError(f"unknown stage1 loss {name!r}; known: {', '.join(LOSSES)}")
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise loss_error(
            name, f"unknown parameter(s) {', '.join(unknown)}; accepted: {', '.join(accepted) or 'none'}"
        )
    return cls(**params)
