"""AMTL, the Adaptive Multi-Threshold Loss: one threshold per frequency segment of the relations."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from lmrc.stage1.losses.base import (
    RelationLoss,
    check_count,
    check_number,
    float_logits,
    loss_error,
    mean_over_pairs,
    positives_of,
    ranking_loss,
)

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
        raise loss_error(loss, "relation_counts is empty")
    for i, c in enumerate(counts):
        if isinstance(c, bool) or not isinstance(c, int) or c < 0:
            raise loss_error(loss, f"relation_counts[{i}] must be a count (integer >= 0), got {c!r}")
    n_rel = len(counts)
    if segment_sizes is not None:
        sizes = [check_count(loss, f"segment_sizes[{i}]", s) for i, s in enumerate(segment_sizes)]
        if not sizes:
            raise loss_error(loss, "segment_sizes is empty")
        if n_segments is not None and n_segments != len(sizes):
            raise loss_error(loss, f"n_segments={n_segments} but segment_sizes has {len(sizes)} entries")
        if sum(sizes) != n_rel:
            raise loss_error(
                loss, f"segment_sizes {sizes} sum to {sum(sizes)}, but there are {n_rel} relations"
            )
    else:
        n = check_count(loss, "n_segments", 4 if n_segments is None else n_segments)
        if n > n_rel:
            raise loss_error(loss, f"n_segments={n} is more than the number of relations ({n_rel})")
        rest = n_rel - _AMTL_SEGMENT_STEP * (n - 1)
        if rest < 1:
            raise loss_error(
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
            raise loss_error(loss, f"segments[{i}] must be a non-empty list of label columns, got {seg!r}")
        groups.append(tuple(check_count(loss, f"segments[{i}]", c) for c in seg))
    if not groups:
        raise loss_error(loss, "segments is empty")
    columns = sorted(c for g in groups for c in g)
    if columns != list(range(1, len(columns) + 1)):
        raise loss_error(loss, "segments must cover the label columns 1..R, each exactly once")
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
                raise loss_error(
                    self.name, "give either segments or relation_counts (+ segment_sizes), not both"
                )
            groups = _check_segments(segments)
            if n_segments is not None and n_segments != len(groups):
                raise loss_error(self.name, f"n_segments={n_segments} but {len(groups)} segments were given")
        elif relation_counts is not None:
            groups = amtl_segments(relation_counts, n_segments, segment_sizes)
        else:
            raise loss_error(
                self.name,
                "needs relation_counts (training facts per relation, in label column order) "
                "or explicit segments (label columns per segment)",
            )
        if threshold_mode not in ("combined", "raw"):
            raise loss_error(self.name, f"threshold_mode must be 'combined' or 'raw', got {threshold_mode!r}")
        self.segments = groups
        self.n_segments = len(groups)
        self.n_relations = sum(len(g) for g in groups)
        # AMTL §4 (implementation details): lambda = n - 0.5 for DocRED / Re-DocRED / DocGNRE.
        self.lam = self.n_segments - 0.5 if lam is None else check_number(self.name, "lam", lam, gt=0.0)
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
            raise loss_error(
                self.name, f"segments cover {self.n_relations} relations, the relation set has {n_relations}"
            )
        return self.n_relations + self.n_segments

    def _split(self, logits: Tensor) -> tuple[Tensor, Tensor]:
        logits = float_logits(self.name, logits, width=self.n_relations + self.n_segments)
        return logits[:, : self.n_segments], logits[:, self.n_segments :]

    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        th_all, rel = self._split(logits)
        pos = positives_of(self.name, labels, rel.shape[0], self.n_relations)
        th = th_all.sum(dim=-1) / self.lam  # Eq. 2: the same training threshold for every segment
        member = self._member.to(rel.device)
        per_pair = sum(ranking_loss(rel, th, pos, member[i]) for i in range(self.n_segments))  # Eq. 3
        return mean_over_pairs(per_pair / self.n_segments)  # Eq. 4

    def margins(self, logits: Tensor) -> Tensor:
        th_all, rel = self._split(logits)
        if self.threshold_mode == "combined":
            return rel - th_all.sum(dim=-1, keepdim=True) / self.lam
        return rel - th_all[:, self._segment_of.to(rel.device)]
