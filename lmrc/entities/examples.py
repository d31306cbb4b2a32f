"""The entity model's training examples: DocRED-format documents turned into text (`detok`) and segmented as
text input is, so that the tagger learns on the tokens it will see, with the gold mentions aligned to them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lmrc.data.docred import Document, load_documents
from lmrc.entities.annotate import TokenMention, align_span, gold_of
from lmrc.entities.mentions import encode_window, plan_windows, window_labels
from lmrc.entities.segment import Segmented, segment
from lmrc.errors import LmrcError


@dataclass
class Example:
    """A training document as the tagger sees text: segmented, with its gold mentions on those tokens."""

    title: str
    seg: Segmented
    mentions: list[TokenMention]  # gold, aligned
    cluster_ids: list[int]  # gold entity of each mention
    gold: list[list[tuple[tuple[int, int], str]]]  # gold entities as (char span, type), for scoring


def make_example(doc: Document) -> Example:
    g = gold_of(doc)
    seg = segment(g.text)
    mentions, ids = [], []
    for ei, ent in enumerate(g.entities):
        for m in ent:
            al = align_span(seg, m.span)
            if al is not None:
                mentions.append(TokenMention(al[0], al[1], al[2], m.type))
                ids.append(ei)
    order = sorted(range(len(mentions)), key=lambda i: (mentions[i].sent, mentions[i].start, mentions[i].end))
    gold = [[(m.span, m.type) for m in ent] for ent in g.entities]
    return Example(doc.title, seg, [mentions[i] for i in order], [ids[i] for i in order], gold)


def mention_types(docs: list[Document]) -> list[str]:
    types = sorted({m.type for d in docs for e in d.entities for m in e.mentions if m.type})
    if not types:
        raise LmrcError("entities train: the training file has no mention types")
    return types


def load_split(path: str, role: str, max_docs: int) -> list[Document]:
    """The documents of `data.<role>` (the first `max_docs` when > 0)."""
    if not path:
        raise LmrcError(f"entities train: data.{role} is not set (a DocRED-format file)")
    docs = load_documents(path)
    if not docs:
        raise LmrcError(f"{path}: no documents")
    return docs[:max_docs] if max_docs > 0 else docs


def training_windows(examples: list[Example], tokenizer: Any, window_cap: int, labels: list[str]) -> list:
    """(token ids, first word-piece of each word, BIO label ids) for every encoder-size window of every document."""
    label_ids = {lab: i for i, lab in enumerate(labels)}
    rows = []
    for ex in examples:
        words = ex.seg.words()
        for w in plan_windows(words, tokenizer, window_cap):
            ids, first = encode_window(tokenizer, words, w, window_cap)
            rows.append((ids, first, window_labels(w, ex.mentions, label_ids)))
    return rows


def span_of(seg: Segmented, m: TokenMention) -> tuple[int, int]:
    """A token mention's character span in the text."""
    return seg.sents[m.sent][m.start].start, seg.sents[m.sent][m.end - 1].end
