"""Encoding documents longer than the encoder's window, and loading encoders with attention probabilities.

ATLOP (Zhou et al., 2021, `long_seq.py`) encodes a document of up to 1024 tokens as two overlapping 512-token
windows, averages the hidden states where they overlap and re-normalises the summed attention rows. This module
generalises that to as many windows as a document needs: windows are spread evenly over the document, every
word-piece is covered, every window carries the tokenizer's own start tokens and is closed by the pair separator
(`[SEP]` for BERT, `</s></s>` for RoBERTa) or, for the last one, by the document's end tokens. The tokens added at
window edges are dropped after encoding; the document's own special tokens are kept.

A document that fits is one window, and goes through the same split / merge code unchanged.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import AutoModel, AutoTokenizer

from lmrc.errors import LmrcError
from lmrc.models.store import resolve
from lmrc.stage1.features import SpecialTokens

log = logging.getLogger(__name__)


def usable_window(encoder) -> int:
    """How many tokens one encoder call can take: `max_position_embeddings` minus the position offset.

    RoBERTa-style embeddings number positions from `padding_idx + 1` (their position table has a padding row),
    so RoBERTa's 514 positions hold 512 tokens; BERT's position table has no padding row and no offset.
    """
    max_pos = getattr(encoder.config, "max_position_embeddings", None)
    if not max_pos:
        raise LmrcError(f"encoder {type(encoder).__name__}: config has no max_position_embeddings")
    table = getattr(getattr(encoder, "embeddings", None), "position_embeddings", None)
    padding_idx = getattr(table, "padding_idx", None)
    offset = padding_idx + 1 if padding_idx is not None else 0
    return int(max_pos) - offset


@dataclass(frozen=True)
class Segment:
    """One encoder input: `ids`; its tokens [keep_start, keep_end) are document tokens from `doc_start` on."""

    doc: int  # row in the batch
    ids: tuple[int, ...]
    keep_start: int
    keep_end: int
    doc_start: int


def window_spans(n_body: int, first: int, middle: int, last: int) -> list[tuple[int, int]]:
    """Spans [a, b) of the text (special tokens excluded) covered by each window, evenly spread, overlapping.

    `first`, `middle`, `last`: how many text tokens the first, middle and last windows can hold. The number of
    windows is the fewest that cover `n_body` tokens; starts are spaced by at most `middle`, so neighbours
    overlap or touch.
    """
    if n_body <= last:
        raise ValueError("window_spans is for texts that do not fit one window")
    if min(first, middle, last) < 1:
        raise LmrcError("stage1 encoder: the window is too small to hold any text next to the special tokens")
    m = 2 + max(0, -(-(n_body - first - last) // middle))
    final = n_body - last
    spans = [(0, min(first, n_body))]
    for i in range(1, m - 1):
        a = i * final // (m - 1)
        spans.append((a, min(a + middle, n_body)))
    spans.append((final, n_body))
    return spans


def plan_segments(
    ids: list[int], doc: int, window: int, specials: SpecialTokens | None = None
) -> list[Segment]:
    """The encoder inputs for one document (without padding), covering every one of its tokens.

    `ids` is the whole document with its own special tokens. Without `specials`, the layout is read from the
    document itself: one start token (its first), one end token (its last), windows closed by the end token.
    """
    n = len(ids)
    if n <= window:
        return [Segment(doc, tuple(ids), 0, n, 0)]
    if specials is None:
        specials = SpecialTokens(start=(ids[0],), end=(ids[-1],), sep=(ids[-1],))
    s, e = len(specials.start), len(specials.end)
    body = ids[s : n - e]
    p = len(specials.sep)
    spans = window_spans(len(body), window - s - p, window - s - p, window - s - e)
    out = []
    last = len(spans) - 1
    for i, (a, b) in enumerate(spans):
        head = tuple(ids[:s]) if i == 0 else specials.start
        tail = tuple(ids[n - e :]) if i == last else specials.sep
        seg = head + tuple(body[a:b]) + tail
        keep_start = 0 if i == 0 else s
        keep_end = len(seg) if i == last else s + (b - a)
        out.append(Segment(doc, seg, keep_start, keep_end, s + a if i else 0))
    return out


# Windows through the encoder at once: bounds every layer's attention kept alive in inference.
SEGMENTS_PER_CALL = 8


def encode(
    encoder,
    input_ids: Tensor,
    attention_mask: Tensor,
    window: int | None = None,
    specials: SpecialTokens | None = None,
    n_layers_avg: int = 1,
    rows: Sequence[Sequence[int]] | None = None,
) -> tuple[Tensor, Tensor]:
    """Hidden states [B, L, d] and attention probabilities of right-padded documents: [B, heads, L, L], or with
    `rows` (per document, the token positions whose attention rows are needed) [B, heads, R, L], where row r of
    document b is position rows[b][r] (rows past len(rows[b]) are zero).

    Why rows: the model only reads the attention rows at mention markers; a long document's full [heads, L, L]
    (12 x 5,500 x 5,500 floats for 20 concatenated DocRED documents) is gigabytes it never looks at.
    The windows go through the encoder SEGMENTS_PER_CALL at a time, so in inference (no autograd graph) every
    layer's attention of one group is freed before the next. With `n_layers_avg` k > 1, hidden states and
    attentions are averaged over the last k layers (DREEAM, Ma et al., 2023; MD-RE Sec. 3.2). Where windows
    overlap, hidden states are averaged; a document encoded in several windows has its attention rows summed
    over windows and re-normalised to 1 (ATLOP), which also spreads the mass of the dropped edge tokens.
    """
    window = window or usable_window(encoder)
    lengths = attention_mask.sum(1).tolist()
    segments = [
        seg
        for b, (row, n) in enumerate(zip(input_ids.tolist(), lengths))
        for seg in plan_segments(row[:n], b, window, specials)
    ]
    pad = encoder.config.pad_token_id
    pad = 0 if pad is None else pad
    device = input_ids.device
    sums = _WindowSums(*input_ids.shape, _row_positions(rows, input_ids.shape[0]))
    for g0 in range(0, len(segments), SEGMENTS_PER_CALL):
        group = segments[g0 : g0 + SEGMENTS_PER_CALL]
        seg_ids, seg_mask = _padded(group, pad)
        hidden, attention = _run(encoder, seg_ids.to(device), seg_mask.to(device), n_layers_avg)
        for i, seg in enumerate(group):
            sums.add(seg, hidden[i], attention[i])
        del hidden, attention
    return sums.result()


def _row_positions(rows: Sequence[Sequence[int]] | None, n_docs: int) -> Tensor | None:
    """[B, R] the token positions whose attention rows are needed, -1 where a document has fewer rows."""
    if rows is None:
        return None
    most = max((len(r) for r in rows), default=0)
    row_pos = torch.full((n_docs, most), -1, dtype=torch.long)
    for b, r in enumerate(rows):
        row_pos[b, : len(r)] = torch.as_tensor(list(r), dtype=torch.long)
    return row_pos


def _padded(group: Sequence[Segment], pad: int) -> tuple[Tensor, Tensor]:
    """Input ids and attention mask of a group of windows, right-padded."""
    width = max(len(seg.ids) for seg in group)
    seg_ids = torch.full((len(group), width), pad, dtype=torch.long)
    seg_mask = torch.zeros((len(group), width), dtype=torch.long)
    for i, seg in enumerate(group):
        seg_ids[i, : len(seg.ids)] = torch.tensor(seg.ids, dtype=torch.long)
        seg_mask[i, : len(seg.ids)] = 1
    return seg_ids, seg_mask


class _WindowSums:
    """The documents' hidden states and attention (rows), summed over the windows that keep each position."""

    def __init__(self, n_docs: int, length: int, row_pos: Tensor | None) -> None:
        self.n_docs, self.length, self.row_pos = n_docs, length, row_pos
        self.hidden: Tensor | None = None  # [B, L, d], allocated with the first window's dtype and device
        self.attention: Tensor | None = None  # [B, heads, L or R, L]
        self.count: Tensor | None = None  # [B, L, 1] windows that kept each position
        self.n_windows = [0] * n_docs

    def add(self, seg: Segment, hidden: Tensor, attention: Tensor) -> None:
        """One window's kept part ([keep_start, keep_end) of its tokens), at its place in the document."""
        if self.hidden is None:
            n_rows = self.length if self.row_pos is None else self.row_pos.size(1)
            self.hidden = hidden.new_zeros((self.n_docs, self.length, hidden.size(-1)))
            self.attention = attention.new_zeros((self.n_docs, attention.size(0), n_rows, self.length))
            self.count = hidden.new_zeros((self.n_docs, self.length, 1))
        k0, k1, d0 = seg.keep_start, seg.keep_end, seg.doc_start
        d1 = d0 + (k1 - k0)
        self.hidden[seg.doc, d0:d1] += hidden[k0:k1]
        if self.row_pos is None:
            self.attention[seg.doc, :, d0:d1, d0:d1] += attention[:, k0:k1, k0:k1]
        else:  # only the needed rows that this window keeps
            pos = self.row_pos[seg.doc]
            r = torch.nonzero((pos >= d0) & (pos < d1)).flatten()
            if r.numel():
                device = attention.device
                src = (pos[r] - d0 + k0).to(device)
                self.attention[seg.doc, :, r.to(device), d0:d1] += attention[:, src, k0:k1]
        self.count[seg.doc, d0:d1] += 1
        self.n_windows[seg.doc] += 1

    def result(self) -> tuple[Tensor, Tensor]:
        """Hidden states averaged over windows; the attention rows of a document seen in several windows
        re-normalised to 1."""
        hidden = self.hidden / self.count.clamp(min=1)
        attention = self.attention
        multi = torch.tensor([w > 1 for w in self.n_windows], device=attention.device).view(
            self.n_docs, 1, 1, 1
        )
        if bool(multi.any()):
            attention = torch.where(multi, attention / (attention.sum(-1, keepdim=True) + 1e-10), attention)
        return hidden, attention


def _run(encoder, ids: Tensor, mask: Tensor, n_layers_avg: int) -> tuple[Tensor, Tensor]:
    out = encoder(
        input_ids=ids,
        attention_mask=mask,
        output_attentions=True,
        output_hidden_states=n_layers_avg > 1,
        return_dict=True,
    )
    if not out.attentions or out.attentions[-1] is None:
        raise LmrcError(
            f"encoder {type(encoder).__name__} returned no attention probabilities; load it with "
            "attn_implementation='eager' (lmrc.stage1.encoder.load_encoder does)"
        )
    if n_layers_avg == 1:
        return out.last_hidden_state, out.attentions[-1]
    hidden = torch.stack(out.hidden_states[-n_layers_avg:]).mean(0)
    attention = torch.stack(out.attentions[-n_layers_avg:]).mean(0)
    return hidden, attention


def ensure_eager_attention(encoder) -> None:
    """Localized context pooling needs attention probabilities, which fused (sdpa / flash) kernels do not return."""
    if getattr(encoder.config, "_attn_implementation", None) in (None, "eager"):
        return
    if not hasattr(encoder, "set_attn_implementation"):
        raise LmrcError(
            "stage-1 encoder: load it with attn_implementation='eager' (attention probabilities are needed)"
        )
    log.info("stage-1 encoder: switching attention to 'eager' (attention probabilities are needed)")
    encoder.set_attn_implementation("eager")


def load_encoder(name_or_path: str | os.PathLike, **kwargs):
    """(encoder, tokenizer) for a model name (`lmrc.models.store.resolve`), with eager attention.

    The pooler is removed: pair classification never uses the pooled [CLS] vector, and parameters without
    gradients waste optimizer state and trip DistributedDataParallel.
    """
    path = resolve(str(name_or_path))
    kwargs.setdefault("attn_implementation", "eager")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        encoder = AutoModel.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as exc:
        raise LmrcError(f"{path}: cannot load the encoder: {exc}") from None
    if getattr(encoder, "pooler", None) is not None:
        encoder.pooler = None
    return encoder, tokenizer
