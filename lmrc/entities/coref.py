"""Grouping mentions into entities, as DocRED annotates them (name variants, abbreviations, repeated names).

A mention-pair model scores every earlier mention as an antecedent: a small MLP over string features (exact and
partial matches, acronyms, head words, token overlap, types, distance) and the cosine similarity of the mentions'
encoder vectors. It is trained on all mention pairs of the training documents' `vertexSet` clusters. Clustering is
best-first antecedent linking (Ng and Cardie, 2002): each mention joins the cluster of its best-scored earlier
mention when that score passes a threshold, which is tuned on the tuning split for the CoNLL F1.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

FEATURES = (
    "exact", "exact_no_article", "contains", "head_match", "first_match", "acronym", "jaccard", "same_type",
    "cosine", "sent_distance", "token_distance", "both_single", "length_ratio", "number_mismatch", "bias_short",
)  # fmt: skip
_ARTICLES = {"the", "a", "an"}
_WORD = re.compile(r"\w+", re.UNICODE)


@dataclass(frozen=True)
class MentionInfo:
    """What the pair features need of a mention: its text, predicted type, place and encoder vector."""

    text: str
    type: str
    sent: int
    position: int  # word index in the document
    vector: torch.Tensor  # unit length


def _tokens(s: str) -> list[str]:
    return [w.lower() for w in _WORD.findall(s)]


def _acronym(short: str, long: str) -> bool:
    letters = "".join(c for c in short if c.isalnum())
    if len(letters) < 2 or not letters.isupper():
        return False
    words = [w for w in _WORD.findall(long) if w.lower() not in ("of", "the", "and", "for", "&")]
    return len(words) >= 2 and "".join(w[0] for w in words).upper() == letters.upper()


def pair_features(a: MentionInfo, b: MentionInfo) -> list[float]:
    """Features of (antecedent a, mention b); symmetric except for the distances."""
    ta, tb = _tokens(a.text), _tokens(b.text)
    la, lb = a.text.lower().strip(), b.text.lower().strip()
    na = [w for w in ta if w not in _ARTICLES]
    nb = [w for w in tb if w not in _ARTICLES]
    sa, sb = set(ta), set(tb)
    short, long = (a.text, b.text) if len(a.text) <= len(b.text) else (b.text, a.text)
    digits_a = {w for w in ta if w.isdigit()}
    digits_b = {w for w in tb if w.isdigit()}
    return [
        float(la == lb),
        float(bool(na) and na == nb),
        float(bool(na) and bool(nb) and (" ".join(na) in " ".join(nb) or " ".join(nb) in " ".join(na))),
        float(bool(ta) and bool(tb) and ta[-1] == tb[-1]),
        float(bool(na) and bool(nb) and na[0] == nb[0]),
        float(_acronym(short, long)),
        len(sa & sb) / len(sa | sb) if sa | sb else 0.0,
        float(a.type == b.type),
        float(torch.dot(a.vector, b.vector)),
        math.log1p(abs(b.sent - a.sent)) / 3.0,
        math.log1p(abs(b.position - a.position)) / 6.0,
        float(len(ta) == 1 and len(tb) == 1),
        min(len(la), len(lb)) / max(len(la), len(lb), 1),
        float(bool(digits_a) and bool(digits_b) and digits_a != digits_b),
        float(min(len(la), len(lb)) <= 2),
    ]


class PairScorer(nn.Module):
    """Logit that two mentions corefer, from their pair features."""

    def __init__(self, n_features: int = len(FEATURES), hidden: int = 32) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(n_features, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)


def pair_matrix(mentions: Sequence[MentionInfo]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Features of every (earlier i, later j) pair, and the pairs."""
    pairs = [(i, j) for j in range(len(mentions)) for i in range(j)]
    if not pairs:
        return torch.zeros((0, len(FEATURES))), pairs
    feats = torch.tensor([pair_features(mentions[i], mentions[j]) for i, j in pairs], dtype=torch.float32)
    return feats, pairs


@torch.no_grad()
def cluster(scorer: PairScorer, mentions: Sequence[MentionInfo], threshold: float) -> list[list[int]]:
    """Best-first antecedent linking; clusters of mention indices in order of their first mention."""
    feats, pairs = pair_matrix(mentions)
    probs = torch.sigmoid(scorer(feats)).tolist() if pairs else []
    return link(len(mentions), pairs, probs, threshold)


def link(
    n: int, pairs: Sequence[tuple[int, int]], probs: Sequence[float], threshold: float
) -> list[list[int]]:
    best: dict[int, tuple[float, int]] = {}
    for (i, j), p in zip(pairs, probs):
        if p > threshold and (j not in best or p > best[j][0]):
            best[j] = (p, i)
    owner = list(range(n))
    for j in range(n):
        if j in best:
            owner[j] = owner[best[j][1]]
    groups: dict[int, list[int]] = {}
    for j in range(n):
        groups.setdefault(owner[j], []).append(j)
    return list(groups.values())


def train_scorer(
    docs: Sequence[tuple[Sequence[MentionInfo], Sequence[int]]],
    hidden: int = 32,
    steps: int = 300,
    lr: float = 1e-2,
    seed: int = 13,
) -> PairScorer:
    """Fit on all pairs of the documents' mentions (`docs`: mentions and the gold cluster id of each); full-batch
    Adam on the binary cross-entropy, positives up-weighted to balance the classes."""
    torch.manual_seed(seed)
    xs, ys = [], []
    for mentions, ids in docs:
        feats, pairs = pair_matrix(mentions)
        if pairs:
            xs.append(feats)
            ys.append(torch.tensor([float(ids[i] == ids[j]) for i, j in pairs]))
    scorer = PairScorer(len(FEATURES), hidden)
    if not xs:
        return scorer
    x, y = torch.cat(xs), torch.cat(ys)
    pos = float(y.sum())
    weight = torch.tensor((len(y) - pos) / max(pos, 1.0))
    opt = torch.optim.Adam(scorer.parameters(), lr=lr, weight_decay=1e-4)
    loss_fn = nn.BCEWithLogitsLoss(pos_weight=weight)
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_fn(scorer(x), y)
        loss.backward()
        opt.step()
    scorer.eval()
    return scorer
