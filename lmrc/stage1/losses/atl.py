"""ATL, ATLOP's adaptive thresholding loss."""

from __future__ import annotations

from torch import Tensor

from lmrc.stage1.losses.base import SingleThresholdLoss, ranking_loss


class ATLoss(SingleThresholdLoss):
    """ATL, ATLOP's adaptive thresholding loss (Zhou et al., AAAI 2021; restated as ATGL Eq. 1, AMTL Eq. 1,
    MD-RE Eq. 9): L1 = -sum_{r in P} log softmax over P u {TH}; L2 = -log p(TH) under a softmax over N u {TH};
    loss = mean over pairs of L1 + L2."""

    name = "atl"

    def _per_pair(self, rel: Tensor, th: Tensor, pos: Tensor) -> Tensor:
        return ranking_loss(rel, th, pos)
