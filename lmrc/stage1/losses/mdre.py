"""MD-RE, the Multi-Discrimination framework: three ATSL discriminators and a fused decision."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lmrc.stage1.losses.base import (
    NEG_INF,
    RelationLoss,
    check_count,
    check_number,
    float_logits,
    loss_error,
    mean_over_pairs,
    positives_of,
    ranking_loss,
)


def select_hard_negatives(pair_loss: Tensor, positive: Tensor, rho: float) -> Tensor:
    """MD-RE's Loss-aware Negative Selection (Eq. 6): keep all positive pairs and the k negative pairs with the
    highest loss, k = min(floor(rho * #positives), #negatives); no positives means k = 0. bool [pairs]."""
    n_pos = int(positive.sum())
    k = min(math.floor(rho * n_pos + 1e-9), int((~positive).sum()))
    keep = positive.clone()
    if k > 0:
        ranked = pair_loss.detach().masked_fill(positive, NEG_INF)
        keep[ranked.topk(k).indices] = True
    return keep


class MDRELoss(RelationLoss):
    """MD-RE, the Multi-Discrimination framework (MD-RE paper §3.3-3.4): three discriminators, each its own
    classifier head on the shared pair representation, each trained with ATSL (Eq. 15):
    recall (lam_recall 3.0, all pairs), coarse (lam_coarse 1.5) and fine (lam_fine 0); coarse and fine see all
    positive pairs plus the top-k negative pairs of the batch by loss (Eq. 6, `select_hard_negatives`, rho 4).

    Logit layout: [recall (1 + R) | coarse (1 + R) | fine (1 + R)], each block [TH | rel_1 .. rel_R].

    Our choices where the paper is silent: negatives are ranked by the detached per-pair loss of the discriminator
    being trained (coarse by the coarse loss, fine by the fine loss); "per batch" is one forward call; each
    discriminator's loss is the mean over the pairs it sees; the total is the sum of the three.

    Inference (Eq. 6-8 text): accept (h, r, t) if all three discriminators predict it (logit_r > their own
    unshifted TH); otherwise accept if sum_d logit_r^d > alpha * TH^recall + TH^coarse + TH^fine (alpha 0.65
    for BERT-size encoders, 0.60 for RoBERTa-large). `margins` is that fused margin, except that for a triple all
    three accept it is at least the smallest of the three discriminators' own margins (> 0), so that
    `predict == margins > 0` and `score > 0` selects exactly the predicted pairs.
    """

    name = "mdre"

    def __init__(
        self,
        lam_recall: float = 3.0,
        lam_coarse: float = 1.5,
        lam_fine: float = 0.0,
        beta: float = 0.0,
        rho: float = 4.0,
        alpha: float = 0.65,
    ) -> None:
        super().__init__()
        self.lams = tuple(
            check_number(self.name, key, value, ge=0.0)
            for key, value in (("lam_recall", lam_recall), ("lam_coarse", lam_coarse), ("lam_fine", lam_fine))
        )
        self.beta = check_number(self.name, "beta", beta, ge=0.0)
        self.rho = check_number(self.name, "rho", rho, gt=0.0)
        self.alpha = check_number(self.name, "alpha", alpha)

    def num_logits(self, n_relations: int) -> int:
        return 3 * (1 + check_count(self.name, "n_relations", n_relations))

    def _blocks(self, logits: Tensor) -> tuple[Tensor, Tensor]:
        """rel [P, 3, R] and th [P, 3], discriminators in the order recall, coarse, fine."""
        logits = float_logits(self.name, logits)
        if logits.shape[1] % 3 or logits.shape[1] < 6:
            raise loss_error(self.name, f"expected 3 x (1 + R) logits per pair, got {logits.shape[1]}")
        blocks = logits.unflatten(-1, (3, logits.shape[1] // 3))
        return blocks[..., 1:], blocks[..., 0]

    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        rel, th = self._blocks(logits)
        pos = positives_of(self.name, labels, rel.shape[0], rel.shape[2])
        positive_pair = pos.any(dim=-1)
        total = rel.new_zeros(())
        for d, lam in enumerate(self.lams):
            per_pair = ranking_loss(rel[:, d], th[:, d], pos, pos_shift=self.beta, neg_shift=lam)
            if d > 0:  # coarse and fine: Loss-aware Negative Selection
                per_pair = per_pair[select_hard_negatives(per_pair, positive_pair, self.rho)]
            total = total + mean_over_pairs(per_pair)
        return total

    def margins(self, logits: Tensor) -> Tensor:
        rel, th = self._blocks(logits)
        fused = rel.sum(dim=1) - (self.alpha * th[:, 0] + th[:, 1] + th[:, 2]).unsqueeze(-1)  # Eq. 7-8
        weakest = (rel - th.unsqueeze(-1)).min(dim=1).values  # > 0 iff all three discriminators accept
        return torch.where(weakest > 0, torch.maximum(fused, weakest), fused)
