"""Stage-1 features on real documents: markers, mention positions, labels, caps, cache, batching.

References are computed independently of lmrc's word-by-word code: BERT word-pieces of the whole text (which
splits on whitespace itself), the byte-level BPE's lossless decoding, and labels read from the raw JSON file.
"""

from __future__ import annotations

import dataclasses
import json
import logging

import pytest
import torch
from conftest import minilm_dir
from stage1_run_helpers import train_roberta_tokenizer

from lmrc.errors import LmrcError
from lmrc.stage1 import features as F
from lmrc.stage1.features import (
    collate,
    featurize,
    featurize_all,
    length_grouped_batches,
    special_tokens,
    tokenizer_info,
)

OVERLAPPING_MENTIONS = (1, 19, 36)  # dev_50 documents with overlapping / nested mentions
WHITESPACE_WORDS = (14, 18, 39)  # dev_50 documents with '\xa0' words


@pytest.fixture(scope="module")
def bert_tok():
    MINILM = minilm_dir()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(MINILM)


@pytest.fixture(scope="module")
def roberta_tok(dev_docs):
    """A byte-level BPE trained here on a few real documents, wrapped as a RoBERTa tokenizer."""
    return train_roberta_tokenizer(dev_docs[:6])


def _mention_words(doc, m) -> list[str]:
    return list(doc.sents[m.sent_id][m.pos[0] : m.pos[1]])


def test_bert_special_tokens_and_marker_read_from_tokenizer(bert_tok):
    info = tokenizer_info(bert_tok)
    cls, sep = bert_tok.convert_tokens_to_ids(["[CLS]", "[SEP]"])
    assert info.specials == F.SpecialTokens(start=(cls,), end=(sep,), sep=(sep,))
    assert bert_tok.convert_ids_to_tokens(info.marker_id) == "*"
    assert info.prefix_space is False
    assert info.pad_id == bert_tok.pad_token_id


@pytest.mark.parametrize("doc_index", [0, *OVERLAPPING_MENTIONS, *WHITESPACE_WORDS])
def test_markers_wrap_exactly_each_mention_word_pieces(bert_tok, dev_docs, doc_index):
    doc = dev_docs[doc_index]
    feats = featurize(doc, bert_tok, None)
    tokens = bert_tok.convert_ids_to_tokens(feats.input_ids)
    for ent, positions in zip(doc.entities, feats.entity_pos):
        assert len(positions) == len(ent.mentions)
        for m, p in zip(ent.mentions, positions):
            expected = bert_tok.tokenize(" ".join(_mention_words(doc, m)))
            assert tokens[p] == "*"
            # Walk past the opening marker; nested mentions' markers may sit inside the span.
            got, i = [], p + 1
            while len(got) < len(expected):
                if tokens[i] != "*":
                    got.append(tokens[i])
                i += 1
            assert got == expected, (m, got)
            assert tokens[i] == "*", f"no closing marker right after {m}"


def test_document_word_pieces_in_order_between_cls_and_sep(bert_tok, dev_docs):
    for doc in dev_docs[:10]:
        ids = featurize(doc, bert_tok, None).input_ids
        tokens = bert_tok.convert_ids_to_tokens(ids)
        assert tokens[0] == "[CLS]" and tokens[-1] == "[SEP]"
        assert [t for t in tokens[1:-1] if t != "*"] == bert_tok.tokenize(doc.text())


def test_labels_multi_hot_match_the_raw_file(bert_tok, dev_docs, redocred_dir, rel_info):
    raw = json.loads((redocred_dir / "dev_50.json").read_text())
    for i in (0, 7, 23):
        feats = featurize(dev_docs[i], bert_tok, rel_info)
        n = len(raw[i]["vertexSet"])
        assert feats.hts == [(h, t) for h in range(n) for t in range(n) if h != t]
        truth = {(lab["h"], lab["t"], lab["r"]) for lab in raw[i]["labels"]}
        ids = list(rel_info.ids)
        assert len(feats.labels) == len(feats.hts)
        got = set()
        for (h, t), row in zip(feats.hts, feats.labels):
            assert len(row) == 1 + len(ids)
            positive = {ids[c - 1] for c, v in enumerate(row) if v == 1.0 and c > 0}
            assert row[0] == (0.0 if positive else 1.0)
            assert all(v in (0.0, 1.0) for v in row)
            got |= {(h, t, r) for r in positive}
        assert got == truth


def test_unlabelled_document_has_no_labels_and_collates_to_none(bert_tok, dev_docs, rel_info):
    doc = dataclasses.replace(dev_docs[0], facts=None)
    feats = featurize(doc, bert_tok, rel_info)
    assert feats.labels is None
    assert collate([feats])["labels"] is None


def test_all_dev_docs_featurized_no_entity_dropped_lengths_match_whole_text(bert_tok, dev_docs):
    feats = featurize_all(dev_docs, bert_tok, None)
    marker = bert_tok.convert_tokens_to_ids("*")
    n_long = 0
    for doc, f in zip(dev_docs, feats):
        assert len(f.entity_pos) == len(doc.entities)
        assert all(len(pos) == len(e.mentions) for pos, e in zip(f.entity_pos, doc.entities))
        assert all(f.input_ids[p] == marker for pos in f.entity_pos for p in pos)
        # Independent length: whole-text word-pieces + one marker per distinct mention start and end + 2 specials.
        starts = {(m.sent_id, m.pos[0]) for e in doc.entities for m in e.mentions}
        ends = {(m.sent_id, m.pos[1]) for e in doc.entities for m in e.mentions}
        assert len(f.input_ids) == len(bert_tok.tokenize(doc.text())) + len(starts) + len(ends) + 2
        n_long += len(f.input_ids) > 512
        assert f.n_truncated_mentions == 0
    assert n_long == 1  # dev_50 has one document beyond MiniLM's 512 positions (544 word-pieces)


def test_max_length_cap_counts_cut_mentions_and_keeps_every_entity(bert_tok, dev_docs, caplog):
    doc = dev_docs[0]
    full = featurize(doc, bert_tok, None)
    cap = 64
    with caplog.at_level(logging.WARNING, logger="lmrc.stage1.features"):
        [cut] = featurize_all([doc], bert_tok, None, max_length=cap)
    assert len(cut.input_ids) == cap
    assert cut.input_ids[: cap - 1] == full.input_ids[: cap - 1]
    assert cut.input_ids[-1] == bert_tok.sep_token_id
    # Reference from the uncapped features: a mention survives iff its marker lies before the final [SEP].
    lost = sum(p >= cap - 1 for pos in full.entity_pos for p in pos)
    assert lost > 0 and cut.n_truncated_mentions == lost
    for before, after in zip(full.entity_pos, cut.entity_pos):
        kept = [p for p in before if p < cap - 1]
        assert after == (kept or [0])
    assert cut.n_fallback_entities == sum(all(p >= cap - 1 for p in pos) for pos in full.entity_pos) > 0
    assert f"cut {lost} mentions" in caplog.text


def test_feature_cache_roundtrip_and_invalidation(
    bert_tok, dev_docs, rel_info, tmp_path, monkeypatch, caplog
):
    docs = dev_docs[:3]
    first = featurize_all(docs, bert_tok, rel_info, cache_dir=tmp_path)
    [entry] = list(tmp_path.glob("stage1-features-*.json"))

    def fail(*a, **k):
        raise AssertionError("featurize called although the cache holds these features")

    monkeypatch.setattr(F, "featurize", fail)
    assert featurize_all(docs, bert_tok, rel_info, cache_dir=tmp_path) == first
    monkeypatch.undo()

    featurize_all(
        docs, bert_tok, rel_info, max_length=128, cache_dir=tmp_path
    )  # other settings: another entry
    featurize_all(
        docs[:2], bert_tok, rel_info, cache_dir=tmp_path, source_hash="x"
    )  # other documents: another
    assert len(list(tmp_path.glob("stage1-features-*.json"))) == 3

    entry.write_text("{ torn")
    with caplog.at_level(logging.WARNING, logger="lmrc.stage1.features"):
        assert featurize_all(docs, bert_tok, rel_info, cache_dir=tmp_path) == first
    assert "unusable cache" in caplog.text
    assert json.loads(entry.read_text())["format"] == "lmrc-stage1-features"


def test_collate_pads_with_pad_id_and_stacks_labels(bert_tok, dev_docs, rel_info):
    one_entity = dataclasses.replace(dev_docs[2], entities=dev_docs[2].entities[:1], facts=())
    feats = [featurize(d, bert_tok, rel_info) for d in (dev_docs[0], one_entity, dev_docs[1])]
    assert feats[1].hts == [] and feats[1].labels == []
    batch = collate(feats)
    width = max(len(f.input_ids) for f in feats)
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (3, width)
    for i, f in enumerate(feats):
        n = len(f.input_ids)
        assert batch["input_ids"][i, :n].tolist() == f.input_ids
        assert (batch["input_ids"][i, n:] == bert_tok.pad_token_id).all()
        assert batch["attention_mask"][i].sum() == n
    n_pairs = len(feats[0].hts) + len(feats[2].hts)
    assert batch["labels"].shape == (n_pairs, 1 + len(rel_info))
    assert torch.equal(batch["labels"][: len(feats[0].hts)], torch.tensor(feats[0].labels))
    assert collate([feats[1]])["labels"].shape == (0, 1 + len(rel_info))


def test_length_grouped_batches_partition_and_group_by_length():
    lengths = [5, 300, 17, 120, 44, 260, 9, 88, 150, 33, 71]
    feats = [F.DocFeatures(str(i), [0] * n, [[0]], [], None) for i, n in enumerate(lengths)]
    ordered = length_grouped_batches(feats, 3, seed=0, shuffle=False)
    assert [len(b) for b in ordered] == [3, 3, 3, 2]
    flat = [i for b in ordered for i in b]
    assert [lengths[i] for i in flat] == sorted(lengths, reverse=True)
    a = length_grouped_batches(feats, 3, seed=1)
    assert a == length_grouped_batches(feats, 3, seed=1)
    assert sorted(i for b in a for i in b) == list(range(len(lengths)))
    # All documents fit one mega-batch, so each batch is a run of the length-sorted order.
    runs = {tuple(b) for b in ordered}
    assert {tuple(b) for b in a} == runs
    assert any(length_grouped_batches(feats, 3, seed=s) != a for s in range(2, 6))


def test_roberta_tokenizer_layout_and_leading_spaces(roberta_tok, dev_docs):
    info = tokenizer_info(roberta_tok)
    bos, eos = roberta_tok.bos_token_id, roberta_tok.eos_token_id
    assert info.specials == F.SpecialTokens(start=(bos,), end=(eos,), sep=(eos, eos))
    assert special_tokens(roberta_tok) == info.specials
    assert info.prefix_space is True and info.pad_id == roberta_tok.pad_token_id
    doc = dev_docs[0]
    feats = featurize(doc, roberta_tok, None, info=info)
    ids = feats.input_ids
    assert ids[0] == bos and ids[-1] == eos
    # Byte-level BPE is lossless: the marker-free body decodes back to the words joined by single spaces.
    body = [i for i in ids[1:-1] if i != info.marker_id]
    assert roberta_tok.decode(body) == doc.text()
    tokens = roberta_tok.convert_ids_to_tokens(ids)
    for ent, positions in zip(doc.entities, feats.entity_pos):
        for m, p in zip(ent.mentions, positions):
            assert tokens[p] == "*"
            first_word = m.sent_id == 0 and m.pos[0] == 0
            assert tokens[p + 1].startswith("Ġ") != first_word
            text = ("" if first_word else " ") + " ".join(_mention_words(doc, m))
            n = len(roberta_tok(text, add_special_tokens=False)["input_ids"])
            assert roberta_tok.decode(ids[p + 1 : p + 1 + n]) == text
            assert tokens[p + 1 + n] == "*"


def test_word_prefix_space_no_tokenises_words_alone_as_atlop(roberta_tok, dev_docs):
    """The reference ATLOP code tokenises each word without a leading space (model.word_prefix_space: no)."""
    info = tokenizer_info(roberta_tok, "no")
    assert info.prefix_space is False
    doc = dev_docs[0]
    ids = featurize(doc, roberta_tok, None, info=info).input_ids
    tokens = roberta_tok.convert_ids_to_tokens([i for i in ids[1:-1] if i != info.marker_id])
    assert not any(t.startswith("Ġ") for t in tokens)
    expected = [p for w in doc.words for p in roberta_tok(w, add_special_tokens=False)["input_ids"]]
    assert [i for i in ids[1:-1] if i != info.marker_id] == expected
    with pytest.raises(LmrcError, match="word_prefix_space"):
        tokenizer_info(roberta_tok, "sometimes")
