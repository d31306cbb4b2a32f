"""Stage-1 features: word-pieces with entity markers, mention positions, pair indices and multi-hot labels.

Tokenisation follows ATLOP (Zhou et al., 2021): every word is tokenised on its own, so that word -> word-piece
offsets are exact, and a marker `*` is inserted before the first and after the last word-piece of every mention
(the entity-marker technique, LMRC Sec. 3.1). A mention is represented by its opening marker. Mentions that start
(or end) at the same word share one marker, as in ATLOP.

Byte-level BPE tokenizers (RoBERTa, GPT-2) encode a word differently with and without a leading space; those get
the space before every word but the first, so that a word is tokenised as it is in running text. Which kind a
tokenizer is is read from its behaviour (`"a"` vs `" a"`), not from the model name. Special tokens (`[CLS]`/`[SEP]`,
`<s>`/`</s>`, and the separator between two segments, `</s></s>` for RoBERTa) are read from the tokenizer itself.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmrc.data.docred import Document, document_to_raw
from lmrc.data.relations import RelationSet
from lmrc.errors import LmrcError
from lmrc.io import atomic_write_json, read_json
from lmrc.training.schedule import length_grouped_batches as by_length

log = logging.getLogger(__name__)

MARKER = "*"
# Bump whenever the features computed from the same inputs change, so that every cache entry is rebuilt.
FEATURE_VERSION = 1
_CACHE_FORMAT = "lmrc-stage1-features"


@dataclass
class DocFeatures:
    title: str
    input_ids: list[int]  # whole document with markers and the tokenizer's specials; may exceed the window
    entity_pos: list[list[int]]  # per entity, each mention's opening-marker index; never empty (cap: [0])
    hts: list[tuple[int, int]]  # == doc.pairs() (canonical order)
    labels: list[list[float]] | None  # multi-hot [len(hts), 1 + R], column 0 = NA; None for unlabelled docs
    n_truncated_mentions: int = 0  # mentions cut by a configured length cap
    n_fallback_entities: int = 0  # entities that lost every mention to the cap: represented by token 0
    n_label_columns: int = 0  # 1 + R (so that a batch of one-entity documents still has a label width)
    pad_id: int = 0  # the tokenizer's padding id, used by `collate`


@dataclass(frozen=True)
class SpecialTokens:
    """The tokenizer's special-token layout: `start + text + end`, and `sep` between two segments of a pair.

    BERT: start [CLS], end [SEP], sep [SEP]. RoBERTa: start <s>, end </s>, sep </s></s>. A window that does not
    end the document is closed with `sep`, as ATLOP's long-document code does.
    """

    start: tuple[int, ...]
    end: tuple[int, ...]
    sep: tuple[int, ...]


@dataclass(frozen=True)
class TokenizerInfo:
    """What featurisation needs from a tokenizer, computed once per tokenizer."""

    specials: SpecialTokens
    marker_id: int
    prefix_space: bool  # prepend a space to every word but the first (byte-level BPE)
    pad_id: int


def _special_runs(ids: list[int], mask: list[int]) -> list[tuple[int, ...]]:
    """The special tokens before, between and after the text runs of an encoding: [before, (between,) after]."""
    runs: list[list[int]] = [[]]
    in_text = False
    for tok, special in zip(ids, mask):
        if special:
            if in_text:
                runs.append([])
                in_text = False
            runs[-1].append(tok)
        else:
            in_text = True
    if in_text:
        runs.append([])
    return [tuple(r) for r in runs]


def special_tokens(tokenizer) -> SpecialTokens:
    """Read the special-token layout from how the tokenizer encodes one text and a pair of texts."""
    single = tokenizer("x", return_special_tokens_mask=True)
    runs = _special_runs(single["input_ids"], single["special_tokens_mask"])
    start, end = runs[0], runs[-1]
    sep = end
    try:
        pair = tokenizer("x", "y", return_special_tokens_mask=True)
        pruns = _special_runs(pair["input_ids"], pair["special_tokens_mask"])
        if len(pruns) == 3 and pruns[1]:
            sep = pruns[1]
    except (TypeError, ValueError, NotImplementedError):
        pass  # no pair template: close windows with the single-text end tokens
    return SpecialTokens(start=start, end=end, sep=sep)


def tokenizer_info(tokenizer, word_prefix_space: str = "auto") -> TokenizerInfo:
    marker = tokenizer(MARKER, add_special_tokens=False)["input_ids"]
    if len(marker) != 1:
        raise LmrcError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r}: the entity marker {MARKER!r} is not a single "
            f"token (got {len(marker)} tokens)"
        )
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    spaced = tokenizer(" a", add_special_tokens=False)["input_ids"]
    pad = tokenizer.pad_token_id
    info = TokenizerInfo(
        specials=special_tokens(tokenizer),
        marker_id=marker[0],
        prefix_space=plain != spaced,
        pad_id=0 if pad is None else int(pad),
    )
    if word_prefix_space == "no":  # ATLOP: every word tokenised on its own, without a leading space
        info = dataclasses.replace(info, prefix_space=False)
    elif word_prefix_space != "auto":
        raise LmrcError(f"model.word_prefix_space must be auto or no, got {word_prefix_space!r}")
    return info


def word_pieces(words: Sequence[str], tokenizer, prefix_space: bool) -> list[list[int]]:
    """Word-piece ids of every word, tokenised one word at a time (one batched tokenizer call)."""
    # A word made only of whitespace has no word-pieces (a byte-level BPE would otherwise emit a lone 'Ġ').
    texts = [(" " + w if prefix_space and i > 0 else w) for i, w in enumerate(words)]
    keep = [bool(w.strip()) for w in words]
    if not texts:
        return []
    ids = tokenizer([t for t, k in zip(texts, keep) if k], add_special_tokens=False)["input_ids"]
    it = iter(ids)
    return [list(next(it)) if k else [] for k in keep]


def _doc_where(doc: Document) -> str:
    return f'document {doc.index} ("{doc.title}")'


def featurize(
    doc: Document,
    tokenizer,
    relations: RelationSet | None,
    max_length: int | None = None,
    info: TokenizerInfo | None = None,
) -> DocFeatures:
    """Features of one document; `info` (from `tokenizer_info`) saves re-reading the tokenizer per document.

    With `max_length` set, the sequence (special tokens included) is cut to that many tokens; mentions whose
    opening marker falls past the cut are dropped and counted. An entity that loses every mention keeps one
    position, token 0 (the start token, e.g. [CLS]), so that no entity and no pair disappears.
    Labels are built for labelled documents when `relations` is given (None: features for prediction only).
    """
    info = info or tokenizer_info(tokenizer)
    specials = info.specials
    offsets = doc.sent_offsets
    spans = [
        [(offsets[m.sent_id] + m.pos[0], offsets[m.sent_id] + m.pos[1] - 1) for m in ent.mentions]
        for ent in doc.entities
    ]
    body, marker_at = _marked_body(doc, tokenizer, info, spans)
    s = len(specials.start)
    if max_length is not None:
        room = max_length - s - len(specials.end)
        if room < 1:
            raise LmrcError(
                f"stage1 features: max_length {max_length} leaves no room for text after special tokens"
            )
        body = body[:room]
    input_ids = list(specials.start) + body + list(specials.end)
    entity_pos, truncated, fallback = _entity_positions(spans, marker_at, limit=s + len(body))
    hts = doc.pairs()
    n_cols = 1 + len(relations) if relations is not None else 0
    labels = _multi_hot(doc, hts, relations) if doc.facts is not None and relations is not None else None
    return DocFeatures(
        title=doc.title,
        input_ids=input_ids,
        entity_pos=entity_pos,
        hts=hts,
        labels=labels,
        n_truncated_mentions=truncated,
        n_fallback_entities=fallback,
        n_label_columns=n_cols,
        pad_id=info.pad_id,
    )


def _marked_body(
    doc: Document, tokenizer, info: TokenizerInfo, spans: list[list[tuple[int, int]]]
) -> tuple[list[int], dict[int, int]]:
    """The document's word pieces with a marker token around every mention (ATLOP's entity marker), and per first
    word of a mention the position of its opening marker in the input ids (after the start tokens)."""
    starts = {first for ent in spans for first, _ in ent}
    ends = {last for ent in spans for _, last in ent}
    s = len(info.specials.start)
    body: list[int] = []
    marker_at: dict[int, int] = {}
    for w, pieces in enumerate(word_pieces(doc.words, tokenizer, info.prefix_space)):
        if w in starts:
            marker_at[w] = s + len(body)
            body.append(info.marker_id)
        body.extend(pieces)
        if w in ends:
            body.append(info.marker_id)
    return body, marker_at


def _entity_positions(
    spans: list[list[tuple[int, int]]], marker_at: dict[int, int], limit: int
) -> tuple[list[list[int]], int, int]:
    """Per entity the positions of its mentions' opening markers before `limit`; the number of mentions cut, and
    of entities that lost every mention (they keep position 0, the start token)."""
    entity_pos: list[list[int]] = []
    truncated = fallback = 0
    for ent in spans:
        pos = [marker_at[first] for first, _ in ent if marker_at[first] < limit]
        truncated += len(ent) - len(pos)
        if not pos:
            pos = [0]
            fallback += 1
        entity_pos.append(pos)
    return entity_pos, truncated, fallback


def _multi_hot(doc: Document, hts: list[tuple[int, int]], relations: RelationSet) -> list[list[float]]:
    n_cols = 1 + len(relations)
    row_of = {p: i for i, p in enumerate(hts)}
    labels = [[0.0] * n_cols for _ in hts]
    for f in doc.facts or ():
        if f.r not in relations:
            raise LmrcError(f"{_doc_where(doc)}: fact ({f.h}, {f.t}, {f.r!r}) names an unknown relation id")
        labels[row_of[(f.h, f.t)]][relations.column(f.r)] = 1.0
    for row in labels:
        if 1.0 not in row:
            row[0] = 1.0
    return labels


def featurize_all(
    docs: Sequence[Document],
    tokenizer,
    relations: RelationSet | None,
    max_length: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    source_hash: str | None = None,
    word_prefix_space: str = "auto",
) -> list[DocFeatures]:
    """Features of many documents, cached in `cache_dir` when given.

    The cache key hashes the documents (`source_hash`, e.g. the file's sha256, stands for their content; the
    documents' indices and titles are always added, so a subset of a file gets its own entry), the tokenizer
    (class, full serialised vocabulary and rules), the settings and FEATURE_VERSION.
    """
    info = tokenizer_info(tokenizer, word_prefix_space)
    path = None
    if cache_dir is not None:
        key = _cache_key(docs, tokenizer, info, relations, max_length, source_hash)
        path = Path(cache_dir) / f"stage1-features-{key[:32]}.json"
        cached = _read_cache(path, key, docs)
        if cached is not None:
            log.info("stage-1 features: %d documents from cache %s", len(cached), path)
            _warn_truncation(cached, max_length)
            return cached
    feats = [featurize(d, tokenizer, relations, max_length, info) for d in docs]
    _warn_truncation(feats, max_length)
    if path is not None:
        atomic_write_json(
            path, {"format": _CACHE_FORMAT, "key": key, "features": [_to_json(f) for f in feats]}
        )
        log.info("stage-1 features: cached %d documents in %s", len(feats), path)
    return feats


def _warn_truncation(feats: list[DocFeatures], max_length: int | None) -> None:
    mentions = sum(f.n_truncated_mentions for f in feats)
    if mentions:
        log.warning(
            "stage-1 features: max_length=%s cut %d mentions in %d of %d documents; %d entities lost every mention "
            "and are represented by the start token",
            max_length,
            mentions,
            sum(1 for f in feats if f.n_truncated_mentions),
            len(feats),
            sum(f.n_fallback_entities for f in feats),
        )


def _tokenizer_fingerprint(tokenizer) -> str:
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(json.dumps(sorted(map(str, tokenizer.all_special_tokens))).encode())
    return h.hexdigest()


def _cache_key(docs, tokenizer, info, relations, max_length, source_hash) -> str:
    h = hashlib.sha256()
    if source_hash is None:
        for d in docs:
            h.update(json.dumps(document_to_raw(d), sort_keys=True, ensure_ascii=False).encode())
    else:
        h.update(source_hash.encode())
    settings = {
        "version": FEATURE_VERSION,
        "docs": [[d.index, d.title] for d in docs],
        "tokenizer": _tokenizer_fingerprint(tokenizer),
        "info": [list(info.specials.start), list(info.specials.end), list(info.specials.sep)],
        "marker": info.marker_id,
        "prefix_space": info.prefix_space,
        "pad": info.pad_id,
        "relations": None if relations is None else list(relations.ids),
        "max_length": max_length,
        "pair_types": sorted(docs[0].pair_types) if docs and docs[0].pair_types else None,
    }
    h.update(json.dumps(settings, sort_keys=True, ensure_ascii=False).encode())
    return h.hexdigest()


def _to_json(f: DocFeatures) -> dict[str, Any]:
    # Labels are stored sparsely (row, columns of the positive relations): a dense [pairs, 97] grid is ~99% zeros.
    labels = None
    if f.labels is not None:
        labels = [
            [i] + [c for c, v in enumerate(row) if v and c] for i, row in enumerate(f.labels) if not row[0]
        ]
    return {
        "title": f.title,
        "input_ids": f.input_ids,
        "entity_pos": f.entity_pos,
        "hts": f.hts,
        "labels": labels,
        "n_truncated_mentions": f.n_truncated_mentions,
        "n_fallback_entities": f.n_fallback_entities,
        "n_label_columns": f.n_label_columns,
        "pad_id": f.pad_id,
    }


def _from_json(raw: dict[str, Any]) -> DocFeatures:
    hts = [(h, t) for h, t in raw["hts"]]
    labels = None
    if raw["labels"] is not None:
        n_cols = raw["n_label_columns"]
        labels = [[1.0] + [0.0] * (n_cols - 1) for _ in hts]
        for i, *cols in raw["labels"]:
            labels[i][0] = 0.0
            for c in cols:
                labels[i][c] = 1.0
    return DocFeatures(
        title=raw["title"],
        input_ids=raw["input_ids"],
        entity_pos=raw["entity_pos"],
        hts=hts,
        labels=labels,
        n_truncated_mentions=raw["n_truncated_mentions"],
        n_fallback_entities=raw["n_fallback_entities"],
        n_label_columns=raw["n_label_columns"],
        pad_id=raw["pad_id"],
    )


def _read_cache(path: Path, key: str, docs: Sequence[Document]) -> list[DocFeatures] | None:
    """The cached features, or None when absent or unusable (a damaged entry is rebuilt, with a warning)."""
    if not path.exists():
        return None
    try:
        raw = read_json(path)
        if raw.get("format") != _CACHE_FORMAT or raw.get("key") != key:
            raise ValueError("key mismatch")
        feats = [_from_json(r) for r in raw["features"]]
        if [f.title for f in feats] != [d.title for d in docs]:
            raise ValueError("documents differ")
        return feats
    except (LmrcError, ValueError, KeyError, TypeError, AttributeError) as exc:
        log.warning("stage-1 features: ignoring unusable cache file %s (%s); rebuilding it", path, exc)
        return None


def collate(batch: list[DocFeatures]) -> dict:
    """Pad a batch (right padding with the tokenizer's pad id); labels of all pairs stacked in document order."""
    if not batch:
        raise ValueError("collate: empty batch")
    width = max(len(f.input_ids) for f in batch)
    input_ids = torch.full((len(batch), width), batch[0].pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, f in enumerate(batch):
        input_ids[i, : len(f.input_ids)] = torch.tensor(f.input_ids, dtype=torch.long)
        attention_mask[i, : len(f.input_ids)] = 1
    labels = None
    if all(f.labels is not None for f in batch):
        rows = [row for f in batch for row in f.labels]
        n_cols = max(f.n_label_columns for f in batch)
        labels = torch.tensor(rows, dtype=torch.float) if rows else torch.zeros((0, n_cols))
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "entity_pos": [f.entity_pos for f in batch],
        "hts": [list(f.hts) for f in batch],
        "labels": labels,
    }


def length_grouped_batches(
    features: Sequence[DocFeatures], batch_size: int, seed: int, shuffle: bool = True
) -> list[list[int]]:
    """Batches of documents of similar length (lmrc.training.schedule.length_grouped_batches on their token counts)."""
    return by_length([len(f.input_ids) for f in features], batch_size, seed, shuffle)
