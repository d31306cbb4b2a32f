"""What every stage-1 loss shares: the interface (`RelationLoss`), the single-threshold layout of ATL, ATGL
and ATSL, the ranking loss of the ATL family, and the checks of parameters and tensors."""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from lmrc.errors import LmrcError

NEG_INF = float("-inf")

# ----------------------------------------------------------------------------------------------------------
# parameter and tensor checks


def loss_error(loss: str, msg: str) -> LmrcError:
    return LmrcError(f"stage1 loss {loss!r}: {msg}")


def check_number(
    loss: str,
    key: str,
    value: Any,
    *,
    gt: float | None = None,
    ge: float | None = None,
    lt: float | None = None,
) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise loss_error(loss, f"{key} must be a finite number, got {value!r}")
    if gt is not None and not value > gt:
        raise loss_error(loss, f"{key} must be > {gt}, got {value!r}")
    if ge is not None and not value >= ge:
        raise loss_error(loss, f"{key} must be >= {ge}, got {value!r}")
    if lt is not None and not value < lt:
        raise loss_error(loss, f"{key} must be < {lt}, got {value!r}")
    return float(value)


def check_count(loss: str, key: str, value: Any, *, ge: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < ge:
        raise loss_error(loss, f"{key} must be an integer >= {ge}, got {value!r}")
    return value


def check_top_k(loss: str, value: Any) -> int | None:
    return None if value is None else check_count(loss, "top_k", value)


def float_logits(loss: str, logits: Tensor, width: int | None = None) -> Tensor:
    if logits.dim() != 2 or not logits.is_floating_point():
        raise loss_error(
            loss,
            f"logits must be a 2-D float tensor [pairs, logits], got {tuple(logits.shape)} {logits.dtype}",
        )
    if width is not None and logits.shape[1] != width:
        raise loss_error(loss, f"expected {width} logits per pair, got {logits.shape[1]}")
    # autocast may hand us fp16/bf16 logits, whose log-sum-exp loses too much precision for a loss.
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


def positives_of(loss: str, labels: Tensor, n_pairs: int, n_relations: int) -> Tensor:
    """bool [pairs, R]: the positive relations of each pair (label columns 1..R)."""
    if labels.dim() != 2 or tuple(labels.shape) != (n_pairs, 1 + n_relations):
        raise loss_error(
            loss,
            f"labels must have shape [pairs, 1 + relations] = [{n_pairs}, {1 + n_relations}], "
            f"got {list(labels.shape)}",
        )
    return labels[:, 1:] > 0


# ----------------------------------------------------------------------------------------------------------
# shared pieces


def mean_over_pairs(per_pair: Tensor) -> Tensor:
    # An empty selection gives 0 (still attached to the graph) instead of NaN.
    return per_pair.sum() / max(per_pair.numel(), 1)


def ranking_loss(
    rel: Tensor,
    th: Tensor,
    pos: Tensor,
    member: Tensor | None = None,
    *,
    pos_shift: float = 0.0,
    neg_shift: float = 0.0,
) -> Tensor:
    """Per-pair ATL-family loss [pairs]: positives ranked above the threshold, the threshold above negatives.

    rel [P, R] relation logits, th [P] threshold logit, pos [P, R] positives; `member` [R] restricts both
    positives and negatives to one sub-label space (an AMTL segment). With P, N the positive/negative relations:
      L1 = -sum_{r in P} log(e^{l_r} / (e^{TH + pos_shift} + sum_{r' in P} e^{l_r'}))
         = |P| * logsumexp(P u {TH + pos_shift}) - sum_{r in P} l_r
      L2 = -log(e^{TH + neg_shift} / (e^{TH + neg_shift} + sum_{r' in N} e^{l_r'}))
         = logsumexp(N u {TH + neg_shift}) - (TH + neg_shift)
    Shifts 0: ATL (ATGL Eq. 1); pos_shift = beta, neg_shift = lambda: ATSL (MD-RE Eq. 14, 11, 15).
    """
    neg = ~pos
    if member is not None:
        pos = pos & member
        neg = neg & member
    th_pos = (th + pos_shift).unsqueeze(-1)
    th_neg = (th + neg_shift).unsqueeze(-1)
    lse_pos = torch.logsumexp(torch.cat([rel.masked_fill(~pos, NEG_INF), th_pos], dim=-1), dim=-1)
    lse_neg = torch.logsumexp(torch.cat([rel.masked_fill(~neg, NEG_INF), th_neg], dim=-1), dim=-1)
    l1 = pos.sum(dim=-1) * lse_pos - torch.where(pos, rel, 0.0).sum(dim=-1)
    l2 = lse_neg - th_neg.squeeze(-1)
    return l1 + l2


def multi_hot(accept: Tensor) -> Tensor:
    """bool [P, R] per-relation decisions -> bool [P, 1 + R], column 0 (NA) set when nothing is accepted."""
    return torch.cat([~accept.any(dim=-1, keepdim=True), accept], dim=-1)


def keep_top_k(accept: Tensor, margins: Tensor, k: int | None) -> Tensor:
    if k is None or k >= margins.shape[-1]:
        return accept
    top = torch.zeros_like(accept)
    top.scatter_(-1, margins.topk(k, dim=-1).indices, True)
    return accept & top


# ----------------------------------------------------------------------------------------------------------
# the interface


class RelationLoss(nn.Module):
    """What every stage-1 loss offers (see the module docstring for the contract of each method)."""

    name: ClassVar[str] = ""
    # False for heads without per-relation logits (bce): margins() returns None, predict() is [pairs, 2].
    per_relation: ClassVar[bool] = True
    # predict() marks a pair as holding a relation exactly when score() > score_threshold.
    score_threshold: float = 0.0

    def num_logits(self, n_relations: int) -> int:
        raise NotImplementedError

    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        raise NotImplementedError

    def margins(self, logits: Tensor) -> Tensor | None:
        raise NotImplementedError

    def predict(self, logits: Tensor) -> Tensor:
        return multi_hot(self.margins(logits) > 0)

    def score(self, logits: Tensor) -> Tensor:
        return self.margins(logits).max(dim=-1).values


class SingleThresholdLoss(RelationLoss):
    """Logit layout [TH | rel_1 .. rel_R]: column 0 is the pair's adaptive threshold, columns 1..R line up with
    the label columns. Prediction (ATLOP): r is predicted when logit_r > logit_TH; `top_k` optionally keeps only
    the k highest of those (the ATLOP/ATGL/AMTL code's `num_labels`, 4 there; off by default as in the papers).
    """

    def __init__(self, top_k: int | None = None) -> None:
        super().__init__()
        self.top_k = check_top_k(self.name, top_k)

    def num_logits(self, n_relations: int) -> int:
        return 1 + check_count(self.name, "n_relations", n_relations)

    def _per_pair(self, rel: Tensor, th: Tensor, pos: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        logits = float_logits(self.name, logits)
        pos = positives_of(self.name, labels, logits.shape[0], logits.shape[1] - 1)
        return mean_over_pairs(self._per_pair(logits[:, 1:], logits[:, 0], pos))

    def margins(self, logits: Tensor) -> Tensor:
        logits = float_logits(self.name, logits)
        return logits[:, 1:] - logits[:, :1]

    def predict(self, logits: Tensor) -> Tensor:
        margins = self.margins(logits)
        return multi_hot(keep_top_k(margins > 0, margins, self.top_k))
