"""ATSL, MD-RE's Adaptive Threshold Shifted Loss."""

from __future__ import annotations

from torch import Tensor

from lmrc.stage1.losses.base import SingleThresholdLoss, check_number, ranking_loss


class ATSLoss(SingleThresholdLoss):
    """ATSL, Adaptive Threshold Shifted Loss (MD-RE paper, Eq. 15): ATL with the threshold shifted during
    training only: L2' uses logit_TH + lam in its numerator and normaliser (Eq. 11), L1' uses logit_TH + beta in
    its normaliser (Eq. 14). Prediction uses the unshifted threshold. lam 3.0 (the paper's best, Fig. 3), beta 0
    (the paper tunes only lambda). lam = beta = 0 is ATL."""

    name = "atsl"

    def __init__(self, lam: float = 3.0, beta: float = 0.0, top_k: int | None = None) -> None:
        super().__init__(top_k)
        # The paper's biases are >= 0 (they lower the learned threshold); negative values would raise it.
        self.lam = check_number(self.name, "lam", lam, ge=0.0)
        self.beta = check_number(self.name, "beta", beta, ge=0.0)

    def _per_pair(self, rel: Tensor, th: Tensor, pos: Tensor) -> Tensor:
        return ranking_loss(rel, th, pos, pos_shift=self.beta, neg_shift=self.lam)
