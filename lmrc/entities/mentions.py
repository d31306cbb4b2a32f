"""Mention detection: a BIO token-classification model over DocRED's entity types, on any encoder.

Words are the segmentation's tokens; each word is labelled by its first word-piece (the others are ignored in the
loss). A document is cut into windows of whole sentences that fit `max_tokens` word-pieces (a sentence longer than
that is cut between words), so every word of a long document is tagged, none dropped. The same forward pass gives
each word a vector (its first word-piece's last hidden state), which the coreference model uses.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lmrc.entities.annotate import TokenMention

OUTSIDE = "O"


def bio_labels(types: Sequence[str]) -> list[str]:
    return [OUTSIDE] + [f"{p}-{t}" for t in types for p in ("B", "I")]


@dataclass(frozen=True)
class Window:
    """Words (sentence, token) of one encoder input, in document order."""

    words: tuple[tuple[int, int], ...]


def plan_windows(sents: Sequence[Sequence[str]], tokenizer, max_tokens: int) -> list[Window]:
    """Whole sentences packed into windows of at most `max_tokens` word-pieces (special tokens included)."""
    budget = max(8, max_tokens - tokenizer.num_special_tokens_to_add())
    sizes = [[max(1, len(tokenizer.tokenize(w))) for w in s] for s in sents]
    windows: list[list[tuple[int, int]]] = []
    cur: list[tuple[int, int]] = []
    used = 0
    for si, s in enumerate(sizes):
        n = sum(s)
        if n <= budget:
            if used + n > budget and cur:
                windows.append(cur)
                cur, used = [], 0
            cur.extend((si, ti) for ti in range(len(s)))
            used += n
            continue
        for ti, k in enumerate(s):  # a sentence longer than a window: cut between words
            k = min(k, budget)
            if used + k > budget and cur:
                windows.append(cur)
                cur, used = [], 0
            cur.append((si, ti))
            used += k
    if cur:
        windows.append(cur)
    return [Window(tuple(w)) for w in windows]


def encode_window(tokenizer, sents: Sequence[Sequence[str]], window: Window, max_tokens: int):
    """Input ids, and for every word of the window the index of its first word-piece (-1 when cut off)."""
    words = [sents[si][ti] for si, ti in window.words]
    enc = tokenizer(words, is_split_into_words=True, truncation=True, max_length=max_tokens)
    first = [-1] * len(words)
    for pos, wid in enumerate(enc.word_ids()):
        if wid is not None and first[wid] == -1:
            first[wid] = pos
    return enc["input_ids"], first


def window_labels(window: Window, mentions: Sequence[TokenMention], label_ids: dict[str, int]) -> list[int]:
    """BIO label id of every word of the window; overlapping mentions: the longer one wins."""
    where = {w: i for i, w in enumerate(window.words)}
    out = [label_ids[OUTSIDE]] * len(window.words)
    taken = [False] * len(window.words)
    for m in sorted(mentions, key=lambda m: -(m.end - m.start)):
        idx = [where.get((m.sent, t)) for t in range(m.start, m.end)]
        if any(i is None for i in idx) or any(taken[i] for i in idx):  # type: ignore[index]
            continue
        for k, i in enumerate(idx):
            out[i] = label_ids[f"{'B' if k == 0 else 'I'}-{m.type}"]  # type: ignore[index]
            taken[i] = True  # type: ignore[index]
    return out


def collate(batch: Sequence[tuple[list[int], list[int], list[int]]], pad_id: int):
    """(ids, first-piece positions, labels) rows -> padded tensors with labels on first pieces, -100 elsewhere."""
    width = max(len(ids) for ids, _, _ in batch)
    ids_t = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    for b, (ids, first, labs) in enumerate(batch):
        ids_t[b, : len(ids)] = torch.tensor(ids)
        mask[b, : len(ids)] = 1
        for pos, lab in zip(first, labs):
            if pos >= 0:
                labels[b, pos] = lab
    return ids_t, mask, labels


@torch.no_grad()
def tag_document(model, tokenizer, sents: Sequence[Sequence[str]], max_tokens: int, batch_size: int = 8):
    """Per word: the label log-probabilities [n_labels] and the vector [hidden] (zeros for words cut off)."""
    windows = plan_windows(sents, tokenizer, max_tokens)
    n_labels = model.config.num_labels
    hidden = model.config.hidden_size
    logp = {(si, ti): None for si, s in enumerate(sents) for ti in range(len(s))}
    vecs: dict[tuple[int, int], torch.Tensor] = {}
    pad = tokenizer.pad_token_id or 0
    for b0 in range(0, len(windows), batch_size):
        chunk = windows[b0 : b0 + batch_size]
        rows = [(*encode_window(tokenizer, sents, w, max_tokens), [0] * len(w.words)) for w in chunk]
        ids, mask, _ = collate(rows, pad)
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, return_dict=True)
        lp = out.logits.log_softmax(-1)
        hs = out.hidden_states[-1]
        for b, (w, (_, first, _)) in enumerate(zip(chunk, rows)):
            for word, pos in zip(w.words, first):
                if pos >= 0:
                    logp[word] = lp[b, pos]
                    vecs[word] = hs[b, pos]
    outside = torch.full((n_labels,), -1e4)
    outside[0] = 0.0
    return (
        [
            [logp[(si, ti)] if logp[(si, ti)] is not None else outside for ti in range(len(s))]
            for si, s in enumerate(sents)
        ],
        [[vecs.get((si, ti), torch.zeros(hidden)) for ti in range(len(s))] for si, s in enumerate(sents)],
    )


def decode_bio(label_seq: Sequence[str], sent: int) -> list[TokenMention]:
    """Mentions of one sentence from its word labels: B-X starts one, I-X continues a mention of type X, and an
    I-X that continues nothing starts one (the usual lenient BIO repair)."""
    out: list[TokenMention] = []
    start, typ = None, None
    for i, lab in enumerate(list(label_seq) + [OUTSIDE]):
        prefix, _, t = lab.partition("-")
        if start is not None and not (prefix == "I" and t == typ):
            out.append(TokenMention(sent, start, i, typ))  # type: ignore[arg-type]
            start, typ = None, None
        if prefix == "B" or (prefix == "I" and start is None):
            start, typ = i, t
    return out
