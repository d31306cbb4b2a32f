"""LMRC's binary stage-1 head: has the pair a relation or not."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lmrc.stage1.losses.base import RelationLoss, check_count, check_number, float_logits, loss_error


class BCELoss(RelationLoss):
    """LMRC stage 1 (Eq. 5-6): one logit per pair with sigmoid(logit) = P(NA | e_s, e_o); binary cross-entropy.

    `logits` is [pairs, 1] (or [pairs]). The head only knows "has a relation or not", so:
    - `predict` returns bool [pairs, 2]: column 0 NA, column 1 has-relation. It keeps the NA-first convention of
      the other heads (`~predict(x)[:, 0]` selects the candidates for every head) without inventing
      per-relation decisions; a pair is a candidate when P(has relation) > `threshold` (0.5, as the paper).
    - `score` is the probability P(has relation) = sigmoid(-logit), as the candidates file stores for bce.
    - `margins` returns None.
    """

    name = "bce"
    per_relation = False

    def __init__(self, threshold: float = 0.5) -> None:
        super().__init__()
        self.threshold = check_number(self.name, "threshold", threshold, gt=0.0, lt=1.0)
        self.score_threshold = self.threshold

    def num_logits(self, n_relations: int) -> int:
        check_count(self.name, "n_relations", n_relations)
        return 1

    def _na_logit(self, logits: Tensor) -> Tensor:
        if logits.dim() == 1:
            logits = logits.unsqueeze(-1)
        return float_logits(self.name, logits, width=1)[:, 0]

    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        z = self._na_logit(logits)
        if labels.dim() != 2 or labels.shape[0] != z.shape[0] or labels.shape[1] < 2:
            raise loss_error(
                self.name, f"labels must have shape [{z.shape[0]}, 1 + relations], got {list(labels.shape)}"
            )
        is_na = ~(labels[:, 1:] > 0).any(dim=-1)
        return F.binary_cross_entropy_with_logits(z, is_na.to(z.dtype), reduction="sum") / max(z.shape[0], 1)

    def margins(self, logits: Tensor) -> None:
        return None

    def score(self, logits: Tensor) -> Tensor:
        return torch.sigmoid(-self._na_logit(logits))

    def predict(self, logits: Tensor) -> Tensor:
        has_relation = self.score(logits) > self.threshold
        return torch.stack([~has_relation, has_relation], dim=-1)
