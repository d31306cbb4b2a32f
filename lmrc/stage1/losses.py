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
import math
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmrc.errors import LmrcError

_NEG_INF = float("-inf")

# ----------------------------------------------------------------------------------------------------------
# parameter and tensor checks


def _fail(loss: str, msg: str) -> LmrcError:
    return LmrcError(f"stage1 loss {loss!r}: {msg}")


def _number(
    loss: str,
    key: str,
    value: Any,
    *,
    gt: float | None = None,
    ge: float | None = None,
    lt: float | None = None,
) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _fail(loss, f"{key} must be a finite number, got {value!r}")
    if gt is not None and not value > gt:
        raise _fail(loss, f"{key} must be > {gt}, got {value!r}")
    if ge is not None and not value >= ge:
        raise _fail(loss, f"{key} must be >= {ge}, got {value!r}")
    if lt is not None and not value < lt:
        raise _fail(loss, f"{key} must be < {lt}, got {value!r}")
    return float(value)


def _count(loss: str, key: str, value: Any, *, ge: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < ge:
        raise _fail(loss, f"{key} must be an integer >= {ge}, got {value!r}")
    return value


def _top_k(loss: str, value: Any) -> int | None:
    return None if value is None else _count(loss, "top_k", value)


def _as_float(loss: str, logits: Tensor, width: int | None = None) -> Tensor:
    if logits.dim() != 2 or not logits.is_floating_point():
        raise _fail(
            loss,
            f"logits must be a 2-D float tensor [pairs, logits], got {tuple(logits.shape)} {logits.dtype}",
        )
    if width is not None and logits.shape[1] != width:
        raise _fail(loss, f"expected {width} logits per pair, got {logits.shape[1]}")
    # autocast may hand us fp16/bf16 logits, whose log-sum-exp loses too much precision for a loss.
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


def _positives(loss: str, labels: Tensor, n_pairs: int, n_relations: int) -> Tensor:
    """bool [pairs, R]: the positive relations of each pair (label columns 1..R)."""
    if labels.dim() != 2 or tuple(labels.shape) != (n_pairs, 1 + n_relations):
        raise _fail(
            loss,
            f"labels must have shape [pairs, 1 + relations] = [{n_pairs}, {1 + n_relations}], "
            f"got {list(labels.shape)}",
        )
    return labels[:, 1:] > 0


# ----------------------------------------------------------------------------------------------------------
# shared pieces


def _mean_over_pairs(per_pair: Tensor) -> Tensor:
    # An empty selection gives 0 (still attached to the graph) instead of NaN.
    return per_pair.sum() / max(per_pair.numel(), 1)


def _ranking_loss(
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
    lse_pos = torch.logsumexp(torch.cat([rel.masked_fill(~pos, _NEG_INF), th_pos], dim=-1), dim=-1)
    lse_neg = torch.logsumexp(torch.cat([rel.masked_fill(~neg, _NEG_INF), th_neg], dim=-1), dim=-1)
    l1 = pos.sum(dim=-1) * lse_pos - torch.where(pos, rel, 0.0).sum(dim=-1)
    l2 = lse_neg - th_neg.squeeze(-1)
    return l1 + l2


def _multi_hot(accept: Tensor) -> Tensor:
    """bool [P, R] per-relation decisions -> bool [P, 1 + R], column 0 (NA) set when nothing is accepted."""
    return torch.cat([~accept.any(dim=-1, keepdim=True), accept], dim=-1)


def _keep_top_k(accept: Tensor, margins: Tensor, k: int | None) -> Tensor:
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
        return _multi_hot(self.margins(logits) > 0)

    def score(self, logits: Tensor) -> Tensor:
        return self.margins(logits).max(dim=-1).values


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
        self.threshold = _number(self.name, "threshold", threshold, gt=0.0, lt=1.0)
        self.score_threshold = self.threshold

    def num_logits(self, n_relations: int) -> int:
        _count(self.name, "n_relations", n_relations)
        return 1

    def _na_logit(self, logits: Tensor) -> Tensor:
        if logits.dim() == 1:
            logits = logits.unsqueeze(-1)
        return _as_float(self.name, logits, width=1)[:, 0]

    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        z = self._na_logit(logits)
        if labels.dim() != 2 or labels.shape[0] != z.shape[0] or labels.shape[1] < 2:
            raise _fail(
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


class _SingleThresholdLoss(RelationLoss):
    """Logit layout [TH | rel_1 .. rel_R]: column 0 is the pair's adaptive threshold, columns 1..R line up with
    the label columns. Prediction (ATLOP): r is predicted when logit_r > logit_TH; `top_k` optionally keeps only
    the k highest of those (the ATLOP/ATGL/AMTL code's `num_labels`, 4 there; off by default as in the papers).
    """

    def __init__(self, top_k: int | None = None) -> None:
        super().__init__()
        self.top_k = _top_k(self.name, top_k)

    def num_logits(self, n_relations: int) -> int:
        return 1 + _count(self.name, "n_relations", n_relations)

    def _per_pair(self, rel: Tensor, th: Tensor, pos: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        logits = _as_float(self.name, logits)
        pos = _positives(self.name, labels, logits.shape[0], logits.shape[1] - 1)
        return _mean_over_pairs(self._per_pair(logits[:, 1:], logits[:, 0], pos))

    def margins(self, logits: Tensor) -> Tensor:
        logits = _as_float(self.name, logits)
        return logits[:, 1:] - logits[:, :1]

    def predict(self, logits: Tensor) -> Tensor:
        margins = self.margins(logits)
        return _multi_hot(_keep_top_k(margins > 0, margins, self.top_k))


class ATLoss(_SingleThresholdLoss):
    """ATL, ATLOP's adaptive thresholding loss (Zhou et al., AAAI 2021; restated as ATGL Eq. 1, AMTL Eq. 1,
    MD-RE Eq. 9): L1 = -sum_{r in P} log softmax over P u {TH}; L2 = -log p(TH) under a softmax over N u {TH};
    loss = mean over pairs of L1 + L2."""

    name = "atl"

    def _per_pair(self, rel: Tensor, th: Tensor, pos: Tensor) -> Tensor:
        return _ranking_loss(rel, th, pos)


class ATGLoss(_SingleThresholdLoss):
    """ATGL, Adaptive-Threshold Global Loss (Xu et al.; Eq. 6): one softmax over all relations and TH,
    loss = -sum_r w_r log p_r with w = alpha (> 1) for positives, 1 for TH, 0 for negatives; mean over pairs.
    Gradient W p - w with W = alpha |P| + 1 (Eq. 20); at the optimum logit_pos - logit_TH = ln alpha (Eq. 37).
    alpha 16.5 is the paper's Re-DocRED value (Table 10; ~7 for small label spaces, 7.5 for CDR)."""

    name = "atgl"

    def __init__(self, alpha: float = 16.5, top_k: int | None = None) -> None:
        super().__init__(top_k)
        self.alpha = _number(self.name, "alpha", alpha, gt=1.0)  # Eq. 14 requires alpha > 1

    def _per_pair(self, rel: Tensor, th: Tensor, pos: Tensor) -> Tensor:
        # -sum_r w_r (s_r - log Z) = W log Z - sum_r w_r s_r  (Eq. 19)
        log_z = torch.logsumexp(torch.cat([th.unsqueeze(-1), rel], dim=-1), dim=-1)
        total_weight = self.alpha * pos.sum(dim=-1) + 1.0
        return total_weight * log_z - self.alpha * torch.where(pos, rel, 0.0).sum(dim=-1) - th


class ATSLoss(_SingleThresholdLoss):
    """ATSL, Adaptive Threshold Shifted Loss (MD-RE paper, Eq. 15): ATL with the threshold shifted during
    training only: L2' uses logit_TH + lam in its numerator and normaliser (Eq. 11), L1' uses logit_TH + beta in
    its normaliser (Eq. 14). Prediction uses the unshifted threshold. lam 3.0 (the paper's best, Fig. 3), beta 0
    (the paper tunes only lambda). lam = beta = 0 is ATL."""

    name = "atsl"

    def __init__(self, lam: float = 3.0, beta: float = 0.0, top_k: int | None = None) -> None:
        super().__init__(top_k)
        # The paper's biases are >= 0 (they lower the learned threshold); negative values would raise it.
        self.lam = _number(self.name, "lam", lam, ge=0.0)
        self.beta = _number(self.name, "beta", beta, ge=0.0)

    def _per_pair(self, rel: Tensor, th: Tensor, pos: Tensor) -> Tensor:
        return _ranking_loss(rel, th, pos, pos_shift=self.beta, neg_shift=self.lam)


# ----------------------------------------------------------------------------------------------------------
# AMTL


_AMTL_SEGMENT_STEP = 10  # AMTL appendix A.1: "we insert a new segment for every ten labels"


def amtl_segments(
    relation_counts: Sequence[int],
    n_segments: int | None = None,
    segment_sizes: Sequence[int] | None = None,
) -> tuple[tuple[int, ...], ...]:
    """AMTL's sub-label spaces as tuples of label columns (1-based), most frequent relations first (AMTL §3.3).

    `relation_counts[i]` is the number of training facts of the relation in label column i + 1. Relations are
    sorted by count, descending (ties keep column order), then cut into `segment_sizes`; by default into
    `n_segments` (4) segments of 10, 10, ..., and the rest (appendix A.1). The authors' code uses 10/20/46/20.
    """
    loss = AMTLoss.name
    counts = list(relation_counts)
    if not counts:
        raise _fail(loss, "relation_counts is empty")
    for i, c in enumerate(counts):
        if isinstance(c, bool) or not isinstance(c, int) or c < 0:
            raise _fail(loss, f"relation_counts[{i}] must be a count (integer >= 0), got {c!r}")
    n_rel = len(counts)
    if segment_sizes is not None:
        sizes = [_count(loss, f"segment_sizes[{i}]", s) for i, s in enumerate(segment_sizes)]
        if not sizes:
            raise _fail(loss, "segment_sizes is empty")
        if n_segments is not None and n_segments != len(sizes):
            raise _fail(loss, f"n_segments={n_segments} but segment_sizes has {len(sizes)} entries")
        if sum(sizes) != n_rel:
            raise _fail(loss, f"segment_sizes {sizes} sum to {sum(sizes)}, but there are {n_rel} relations")
    else:
        n = _count(loss, "n_segments", 4 if n_segments is None else n_segments)
        if n > n_rel:
            raise _fail(loss, f"n_segments={n} is more than the number of relations ({n_rel})")
        rest = n_rel - _AMTL_SEGMENT_STEP * (n - 1)
        if rest < 1:
            raise _fail(
                loss,
                f"{n} segments of {_AMTL_SEGMENT_STEP} labels (the paper's rule) need more than "
                f"{_AMTL_SEGMENT_STEP * (n - 1)} relations, there are {n_rel}; give segment_sizes explicitly",
            )
        sizes = [_AMTL_SEGMENT_STEP] * (n - 1) + [rest]
    order = sorted(range(n_rel), key=lambda i: -counts[i])
    segments, start = [], 0
    for size in sizes:
        segments.append(tuple(i + 1 for i in order[start : start + size]))
        start += size
    return tuple(segments)


def _check_segments(segments: Any) -> tuple[tuple[int, ...], ...]:
    loss = AMTLoss.name
    groups = []
    for i, seg in enumerate(segments):
        if isinstance(seg, (str, bytes)) or not isinstance(seg, Sequence) or not seg:
            raise _fail(loss, f"segments[{i}] must be a non-empty list of label columns, got {seg!r}")
        groups.append(tuple(_count(loss, f"segments[{i}]", c) for c in seg))
    if not groups:
        raise _fail(loss, "segments is empty")
    columns = sorted(c for g in groups for c in g)
    if columns != list(range(1, len(columns) + 1)):
        raise _fail(loss, "segments must cover the label columns 1..R, each exactly once")
    return tuple(groups)


class AMTLoss(RelationLoss):
    """AMTL, Adaptive Multi-Threshold Loss (Xu et al.; Eq. 2-4).

    Relations are cut into n segments by training frequency (see `amtl_segments`), one TH logit per segment.
    Logit layout (ours): [TH_1 .. TH_n | rel_1 .. rel_R], thresholds in segment order (segment 1 = the most
    frequent relations), relations in label column order; with n = 1 it is ATL's layout.

    Training, Eq. 2 taken literally: every segment's threshold is (TH_i + sum_{j != i} TH_j) / lam =
    sum_j TH_j / lam; then per segment ATL's L3 + L4 restricted to that segment (Eq. 3); loss = mean over
    segments (Eq. 4), then over pairs. lam defaults to n - 0.5 (the paper's Re-DocRED value; n for DWIE).
    n = 1 with lam = 1 is exactly ATL.

    Inference, `threshold_mode`: 'combined' (default; Eq. 2's value sum_j TH_j / lam, the same for every
    segment) or 'raw' (each segment's own TH_i, as the authors' code does).

    Give either `relation_counts` (training facts per relation, label column order) with optional
    `n_segments` (default 4) or `segment_sizes`, or explicit `segments` (label columns per segment).
    """

    name = "amtl"

    def __init__(
        self,
        relation_counts: Sequence[int] | None = None,
        n_segments: int | None = None,
        segment_sizes: Sequence[int] | None = None,
        segments: Sequence[Sequence[int]] | None = None,
        lam: float | None = None,
        threshold_mode: str = "combined",
    ) -> None:
        super().__init__()
        if segments is not None:
            if relation_counts is not None or segment_sizes is not None:
                raise _fail(self.name, "give either segments or relation_counts (+ segment_sizes), not both")
            groups = _check_segments(segments)
            if n_segments is not None and n_segments != len(groups):
                raise _fail(self.name, f"n_segments={n_segments} but {len(groups)} segments were given")
        elif relation_counts is not None:
            groups = amtl_segments(relation_counts, n_segments, segment_sizes)
        else:
            raise _fail(
                self.name,
                "needs relation_counts (training facts per relation, in label column order) "
                "or explicit segments (label columns per segment)",
            )
        if threshold_mode not in ("combined", "raw"):
            raise _fail(self.name, f"threshold_mode must be 'combined' or 'raw', got {threshold_mode!r}")
        self.segments = groups
        self.n_segments = len(groups)
        self.n_relations = sum(len(g) for g in groups)
        # AMTL §4 (implementation details): lambda = n - 0.5 for DocRED / Re-DocRED / DocGNRE.
        self.lam = self.n_segments - 0.5 if lam is None else _number(self.name, "lam", lam, gt=0.0)
        self.threshold_mode = threshold_mode
        member = torch.zeros(self.n_segments, self.n_relations, dtype=torch.bool)
        segment_of = torch.empty(self.n_relations, dtype=torch.long)
        for i, group in enumerate(groups):
            for column in group:
                member[i, column - 1] = True
                segment_of[column - 1] = i
        self.register_buffer("_member", member, persistent=False)
        self.register_buffer("_segment_of", segment_of, persistent=False)

    def num_logits(self, n_relations: int) -> int:
        if n_relations != self.n_relations:
            raise _fail(
                self.name, f"segments cover {self.n_relations} relations, the relation set has {n_relations}"
            )
        return self.n_relations + self.n_segments

    def _split(self, logits: Tensor) -> tuple[Tensor, Tensor]:
        logits = _as_float(self.name, logits, width=self.n_relations + self.n_segments)
        return logits[:, : self.n_segments], logits[:, self.n_segments :]

    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        th_all, rel = self._split(logits)
        pos = _positives(self.name, labels, rel.shape[0], self.n_relations)
        th = th_all.sum(dim=-1) / self.lam  # Eq. 2: the same training threshold for every segment
        member = self._member.to(rel.device)
        per_pair = sum(_ranking_loss(rel, th, pos, member[i]) for i in range(self.n_segments))  # Eq. 3
        return _mean_over_pairs(per_pair / self.n_segments)  # Eq. 4

    def margins(self, logits: Tensor) -> Tensor:
        th_all, rel = self._split(logits)
        if self.threshold_mode == "combined":
            return rel - th_all.sum(dim=-1, keepdim=True) / self.lam
        return rel - th_all[:, self._segment_of.to(rel.device)]


# ----------------------------------------------------------------------------------------------------------
# MD-RE


def select_hard_negatives(pair_loss: Tensor, positive: Tensor, rho: float) -> Tensor:
    """MD-RE's Loss-aware Negative Selection (Eq. 6): keep all positive pairs and the k negative pairs with the
    highest loss, k = min(floor(rho * #positives), #negatives); no positives means k = 0. bool [pairs]."""
    n_pos = int(positive.sum())
    k = min(math.floor(rho * n_pos + 1e-9), int((~positive).sum()))
    keep = positive.clone()
    if k > 0:
        ranked = pair_loss.detach().masked_fill(positive, _NEG_INF)
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
            _number(self.name, key, value, ge=0.0)
            for key, value in (("lam_recall", lam_recall), ("lam_coarse", lam_coarse), ("lam_fine", lam_fine))
        )
        self.beta = _number(self.name, "beta", beta, ge=0.0)
        self.rho = _number(self.name, "rho", rho, gt=0.0)
        self.alpha = _number(self.name, "alpha", alpha)

    def num_logits(self, n_relations: int) -> int:
        return 3 * (1 + _count(self.name, "n_relations", n_relations))

    def _blocks(self, logits: Tensor) -> tuple[Tensor, Tensor]:
        """rel [P, 3, R] and th [P, 3], discriminators in the order recall, coarse, fine."""
        logits = _as_float(self.name, logits)
        if logits.shape[1] % 3 or logits.shape[1] < 6:
            raise _fail(self.name, f"expected 3 x (1 + R) logits per pair, got {logits.shape[1]}")
        blocks = logits.unflatten(-1, (3, logits.shape[1] // 3))
        return blocks[..., 1:], blocks[..., 0]

    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        rel, th = self._blocks(logits)
        pos = _positives(self.name, labels, rel.shape[0], rel.shape[2])
        positive_pair = pos.any(dim=-1)
        total = rel.new_zeros(())
        for d, lam in enumerate(self.lams):
            per_pair = _ranking_loss(rel[:, d], th[:, d], pos, pos_shift=self.beta, neg_shift=lam)
            if d > 0:  # coarse and fine: Loss-aware Negative Selection
                per_pair = per_pair[select_hard_negatives(per_pair, positive_pair, self.rho)]
            total = total + _mean_over_pairs(per_pair)
        return total

    def margins(self, logits: Tensor) -> Tensor:
        rel, th = self._blocks(logits)
        fused = rel.sum(dim=1) - (self.alpha * th[:, 0] + th[:, 1] + th[:, 2]).unsqueeze(-1)  # Eq. 7-8
        weakest = (rel - th.unsqueeze(-1)).min(dim=1).values  # > 0 iff all three discriminators accept
        return torch.where(weakest > 0, torch.maximum(fused, weakest), fused)


# ----------------------------------------------------------------------------------------------------------
# registry

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
        raise _fail(
            name, f"unknown parameter(s) {', '.join(unknown)}; accepted: {', '.join(accepted) or 'none'}"
        )
    return cls(**params)
