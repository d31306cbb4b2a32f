"""Stage-1 model: windowed encoding and the ATLOP pair representation, with tiny random encoders.

References: the encoder called directly on a document that fits; ATLOP's two-window merge written out by hand;
the pair representation computed pair by pair with plain loops from the papers' formulas.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import minilm_dir
from stage1_run_helpers import train_roberta_tokenizer
from torch import nn

from lmrc.errors import LmrcError
from lmrc.stage1.encoder import encode, load_encoder, plan_segments, usable_window, window_spans
from lmrc.stage1.features import collate, featurize, tokenizer_info
from lmrc.stage1.model import Stage1Model


@pytest.fixture(scope="module")
def bert_tok():
    MINILM = minilm_dir()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(MINILM)


def tiny_bert(vocab_size: int, max_pos: int = 64, layers: int = 2, seed: int = 0):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=max_pos,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        attn_implementation="eager",
    )
    return BertModel(cfg, add_pooling_layer=False).eval()


def batch_of(feats):
    b = collate(feats)
    return b["input_ids"], b["attention_mask"], b["entity_pos"], b["hts"]


def test_fitting_documents_encode_exactly_as_one_plain_encoder_call(bert_tok, dev_docs):
    enc = tiny_bert(bert_tok.vocab_size, max_pos=128)
    feats = [featurize(d, bert_tok, None, max_length=n) for d, n in zip(dev_docs[:3], (128, 77, 100))]
    ids, mask, _, _ = batch_of(feats)
    with torch.no_grad():
        hidden, att = encode(enc, ids, mask, window=128)
        ref = enc(input_ids=ids, attention_mask=mask, output_attentions=True)
    for i, f in enumerate(feats):
        n = len(f.input_ids)
        assert torch.allclose(hidden[i, :n], ref.last_hidden_state[i, :n], atol=1e-6)
        assert torch.allclose(att[i, :, :n, :n], ref.attentions[-1][i, :, :n, :n], atol=1e-6)
        assert (hidden[i, n:] == 0).all() and (att[i, :, n:] == 0).all()


def test_two_windows_match_atlop_merge_written_by_hand(bert_tok, dev_docs):
    window, n = 64, 100
    enc = tiny_bert(bert_tok.vocab_size, max_pos=window)
    f = featurize(dev_docs[4], bert_tok, None, max_length=n)
    ids, mask, _, _ = batch_of([f])
    cls, sep = bert_tok.cls_token_id, bert_tok.sep_token_id
    row = ids[0].tolist()
    # ATLOP long_seq.py: window 1 = first W-1 tokens + [SEP]; window 2 = [CLS] + last W-1 tokens.
    w1 = torch.tensor([row[: window - 1] + [sep]])
    w2 = torch.tensor([[cls] + row[-(window - 1) :]])
    with torch.no_grad():
        o1 = enc(input_ids=w1, output_attentions=True)
        o2 = enc(input_ids=w2, output_attentions=True)
        hidden, att = encode(enc, ids, mask, window=window)
    d = o1.last_hidden_state.size(-1)
    h = torch.zeros(n, d)
    c = torch.zeros(n, 1)
    a = torch.zeros(2, n, n)
    h[: window - 1] += o1.last_hidden_state[0, : window - 1]
    c[: window - 1] += 1
    a[:, : window - 1, : window - 1] += o1.attentions[-1][0, :, : window - 1, : window - 1]
    off = n - (window - 1)
    h[off:] += o2.last_hidden_state[0, 1:]
    c[off:] += 1
    a[:, off:, off:] += o2.attentions[-1][0, :, 1:, 1:]
    h = h / c
    a = a / (a.sum(-1, keepdim=True) + 1e-10)
    assert torch.allclose(hidden[0], h, atol=1e-5)
    assert torch.allclose(att[0], a, atol=1e-6)


def test_exact_window_is_one_segment_one_more_token_is_two():
    ids = list(range(100, 164))
    assert len(plan_segments(ids, 0, 64)) == 1
    assert len(plan_segments(ids + [7], 0, 64)) == 2


@pytest.mark.parametrize("n_body", [63, 64, 125, 126, 127, 400, 1000])
def test_window_spans_cover_the_text_with_evenly_spread_overlaps(n_body):
    first = middle = 61
    last = 62
    spans = window_spans(n_body, first, middle, last)
    assert spans[0][0] == 0 and spans[-1][1] == n_body
    assert spans[0][1] - spans[0][0] <= first and spans[-1][1] - spans[-1][0] <= last
    assert all(b - a <= middle for a, b in spans[1:-1])
    assert all(nxt[0] <= cur[1] for cur, nxt in zip(spans, spans[1:]))  # overlap or touch: no gap
    # The fewest windows that can cover the text.
    assert len(spans) == max(2, 2 + -(-(n_body - first - last) // middle))


def test_long_document_windows_cover_every_word_piece_and_every_mention(bert_tok, dev_docs):
    window = 64
    enc = tiny_bert(bert_tok.vocab_size, max_pos=window)
    f = featurize(dev_docs[0], bert_tok, None)
    n = len(f.input_ids)
    assert n > 4 * window
    segments = plan_segments(f.input_ids, 0, window)
    covered = [0] * n
    for seg in segments:
        assert len(seg.ids) <= window
        assert seg.ids[0] == bert_tok.cls_token_id and seg.ids[-1] == bert_tok.sep_token_id
        kept = seg.ids[seg.keep_start : seg.keep_end]
        assert list(kept) == f.input_ids[seg.doc_start : seg.doc_start + len(kept)]
        for p in range(seg.doc_start, seg.doc_start + len(kept)):
            covered[p] += 1
    assert min(covered) >= 1 and max(covered) >= 2
    model = Stage1Model(enc, 5, emb_size=32, block_size=8, window=window).eval()
    ids, mask, pos, hts = batch_of([f])
    with torch.no_grad():
        hidden, att = encode(enc, ids, mask, window=window)
        logits = model(ids, mask, pos, hts)
    mention_states = hidden[0, [p for ps in pos[0] for p in ps]]
    assert torch.isfinite(mention_states).all() and (mention_states.abs().sum(-1) > 0).all()
    assert torch.allclose(att[0].sum(-1), torch.ones(2, n), atol=1e-5)
    assert logits.shape == (len(f.hts), 5) and torch.isfinite(logits).all()


def _reference_logits(model: Stage1Model, enc, f) -> torch.Tensor:
    """The papers' formulas one pair at a time (fitting document, last layer, one classifier)."""
    ids = torch.tensor([f.input_ids])
    out = enc(input_ids=ids, output_attentions=True)
    H, A = out.last_hidden_state[0], out.attentions[-1][0]  # [L, d], [heads, L, L]
    ents = [torch.logsumexp(torch.stack([H[p] for p in pos]), 0) for pos in f.entity_pos]  # Eq. 2
    atts = [torch.stack([A[:, p] for p in pos]).mean(0) for pos in f.entity_pos]  # [heads, L]
    W_h, W_t = model.head_extractors[0], model.tail_extractors[0]
    clf = model.classifiers[0]
    k, bs = model.emb_size // model.block_size, model.block_size
    rows = []
    for h, t in f.hts:
        q = (atts[h] * atts[t]).mean(0)
        q = q / (q.sum() + 1e-5)
        c = H.T @ q
        z_h = torch.tanh(W_h.weight @ torch.cat([ents[h], c]) + W_h.bias)
        z_t = torch.tanh(W_t.weight @ torch.cat([ents[t], c]) + W_t.bias)
        if model.bilinear == "full":
            rows.append(torch.einsum("i,rij,j->r", z_h, clf.weight, z_t) + clf.bias)
        else:
            W = clf.weight.view(-1, k, bs, bs)
            rows.append(torch.einsum("ki,rkij,kj->r", z_h.view(k, bs), W, z_t.view(k, bs)) + clf.bias)
    return torch.stack(rows)


@pytest.mark.parametrize("bilinear", ["grouped", "full"])
def test_logits_match_pair_by_pair_reference(bert_tok, dev_docs, bilinear):
    enc = tiny_bert(bert_tok.vocab_size, max_pos=128)
    feats = [featurize(dev_docs[i], bert_tok, None, max_length=n) for i, n in ((3, 90), (5, 128))]
    model = Stage1Model(enc, 7, emb_size=32, block_size=8, bilinear=bilinear).eval()
    with torch.no_grad():
        logits = model(*batch_of(feats))
        ref = torch.cat([_reference_logits(model, enc, f) for f in feats])
    assert logits.shape == (sum(len(f.hts) for f in feats), 7)
    assert torch.allclose(logits, ref, atol=1e-5)


def test_zero_pair_document_gives_zero_rows_and_gradients_flow(bert_tok, dev_docs):
    enc = tiny_bert(bert_tok.vocab_size, max_pos=64).train()
    single = dataclasses.replace(dev_docs[6], entities=dev_docs[6].entities[:1], facts=())
    alone = featurize(single, bert_tok, None)
    other = featurize(dev_docs[7], bert_tok, None)
    model = Stage1Model(enc, 4, emb_size=32, block_size=8)
    assert model(*batch_of([alone])).shape == (0, 4)
    logits = model(*batch_of([alone, other]))
    assert logits.shape == (len(other.hts), 4)
    logits.square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model.head_extractors[0].weight.grad.abs().sum() > 0
    assert enc.embeddings.word_embeddings.weight.grad.abs().sum() > 0
    n_head = sum(p.numel() for p in model.head_parameters())
    assert n_head + sum(p.numel() for p in model.encoder_parameters()) == sum(
        p.numel() for p in model.parameters()
    )


def test_last_three_layers_averaged(bert_tok, dev_docs):
    enc = tiny_bert(bert_tok.vocab_size, max_pos=128, layers=4)
    f = featurize(dev_docs[8], bert_tok, None, max_length=80)
    ids, mask, _, _ = batch_of([f])
    with torch.no_grad():
        hidden, att = encode(enc, ids, mask, window=128, n_layers_avg=3)
        out = enc(input_ids=ids, output_attentions=True, output_hidden_states=True)
    assert torch.allclose(hidden, torch.stack(out.hidden_states[-3:]).mean(0), atol=1e-6)
    assert torch.allclose(att, torch.stack(out.attentions[-3:]).mean(0), atol=1e-6)
    assert not torch.allclose(hidden, out.last_hidden_state, atol=1e-3)


def test_three_classifiers_concatenate_their_own_logits(bert_tok, dev_docs):
    enc = tiny_bert(bert_tok.vocab_size, max_pos=128)
    f = featurize(dev_docs[9], bert_tok, None, max_length=70)
    shared = Stage1Model(enc, 9, emb_size=32, block_size=8, n_classifiers=3).eval()
    assert len(shared.head_extractors) == 1 and len(shared.classifiers) == 3
    with torch.no_grad():
        shared.classifiers[1].weight.zero_()
        shared.classifiers[1].bias.fill_(2.5)
        logits = shared(*batch_of([f]))
    assert logits.shape == (len(f.hts), 9)
    assert (logits[:, 3:6] == 2.5).all() and not (logits[:, :3] == 2.5).any()
    own = Stage1Model(enc, 9, emb_size=32, block_size=8, n_classifiers=3, separate_extractors=True)
    assert len(own.head_extractors) == len(own.tail_extractors) == 3
    with pytest.raises(LmrcError, match="multiple of n_classifiers"):
        Stage1Model(enc, 10, emb_size=32, block_size=8, n_classifiers=3)


def test_sdpa_encoder_switched_to_eager_and_bad_options_refused(bert_tok):
    from transformers import BertConfig, BertModel

    cfg = BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        attn_implementation="sdpa",
    )
    enc = BertModel(cfg)
    assert enc.config._attn_implementation == "sdpa"
    Stage1Model(enc, 3, emb_size=16, block_size=8)
    assert enc.config._attn_implementation == "eager"
    with pytest.raises(LmrcError, match="block_size"):
        Stage1Model(enc, 3, emb_size=20, block_size=8)
    with pytest.raises(LmrcError, match="window"):
        Stage1Model(enc, 3, emb_size=16, block_size=8, window=513)
    with pytest.raises(LmrcError, match="n_layers_avg"):
        Stage1Model(enc, 3, emb_size=16, block_size=8, n_layers_avg=3)


# ---------------------------------------------------------------------------------------------------------
# RoBERTa: byte-level BPE tokenizer trained here, tiny random RoBERTa with a 40-usable-position window


@pytest.fixture(scope="module")
def roberta(dev_docs):
    from transformers import RobertaConfig, RobertaModel

    tok = train_roberta_tokenizer(dev_docs[:6])
    torch.manual_seed(0)
    cfg = RobertaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=42,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        attn_implementation="eager",
    )
    return tok, RobertaModel(cfg, add_pooling_layer=False).eval()


def test_roberta_window_is_positions_minus_padding_offset(roberta):
    tok, enc = roberta
    assert usable_window(enc) == 40
    with torch.no_grad():
        enc(input_ids=torch.full((1, 40), 10))
        with pytest.raises((IndexError, RuntimeError)):
            enc(input_ids=torch.full((1, 41), 10))  # position 42 does not exist: the offset is real


def test_roberta_windows_open_with_bos_and_close_with_double_eos(roberta, dev_docs):
    tok, enc = roberta
    info = tokenizer_info(tok)
    bos, eos = tok.bos_token_id, tok.eos_token_id
    feats = [featurize(dev_docs[i], tok, None, info=info) for i in (0, 1)]
    segments = plan_segments(feats[0].input_ids, 0, 40, info.specials)
    assert len(segments) > 3
    for i, seg in enumerate(segments):
        assert len(seg.ids) <= 40 and seg.ids[0] == bos
        if i < len(segments) - 1:
            assert seg.ids[-2:] == (eos, eos) and seg.ids[-3] != eos
        else:
            assert seg.ids[-1] == eos and seg.ids[-2] != eos
    model = Stage1Model(enc, 6, emb_size=32, block_size=8, specials=info.specials).eval()
    assert model.window == 40
    with torch.no_grad():
        logits = model(*batch_of(feats))
    assert logits.shape == (sum(len(f.hts) for f in feats), 6) and torch.isfinite(logits).all()


# ---------------------------------------------------------------------------------------------------------
# The packaged MiniLM


def test_load_encoder_minilm_eager_without_pooler_encodes_long_document(dev_docs, cache_dir):
    minilm_dir()  # fails (CI) or skips when the packaged model is missing
    enc, tok = load_encoder("minilm")
    assert enc.config._attn_implementation == "eager" and enc.pooler is None
    assert usable_window(enc) == 512
    info = tokenizer_info(tok)
    long_doc = next(d for d in dev_docs if len(featurize(d, tok, None, info=info).input_ids) > 512)
    f = featurize(long_doc, tok, None, info=info)
    model = Stage1Model(enc.eval(), 2, emb_size=64, block_size=16, specials=info.specials).eval()
    with torch.no_grad():
        logits = model(*batch_of([f]))
    assert logits.shape == (len(f.hts), 2) and torch.isfinite(logits).all()


def test_full_bilinear_head_runs_under_bf16_autocast():
    """The LMRC BCE head's nn.Bilinear under CPU bf16 autocast (train.mixed_precision: bf16) gives float logits."""
    torch.manual_seed(0)
    layer = Stage1Model.__new__(Stage1Model)
    nn.Module.__init__(layer)
    layer.bilinear = "full"
    classifier = nn.Bilinear(8, 8, 1)
    z_h, z_t = torch.randn(5, 8), torch.randn(5, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer._bilinear(classifier, z_h.bfloat16(), z_t.bfloat16())
    expected = torch.einsum(
        "pi,oij,pj->po", z_h.bfloat16().float(), classifier.weight, z_t.bfloat16().float()
    )
    assert out.dtype == torch.float32
    # bf16 matmuls inside F.bilinear under autocast: close to the float32 value, not equal
    assert torch.allclose(out, expected + classifier.bias, rtol=0.02, atol=0.02)


def test_grouped_bilinear_without_stored_outer_products_equals_the_linear_layer(monkeypatch):
    """lmrc.stage1.model.grouped_bilinear: same values and gradients as nn.Linear on the materialised outer
    products (ATLOP Eq. 7), chunked over pairs; under bf16 autocast it computes in bf16 as nn.Linear would."""
    from lmrc.stage1 import model as stage1_model

    monkeypatch.setattr(stage1_model, "PAIR_CHUNK", 7)  # several chunks and a ragged last one
    torch.manual_seed(0)
    b1 = torch.randn(20, 3, 4, dtype=torch.double, requires_grad=True)
    b2 = torch.randn(20, 3, 4, dtype=torch.double, requires_grad=True)
    lin = torch.nn.Linear(48, 5).double()
    ref = lin((b1.unsqueeze(3) * b2.unsqueeze(2)).reshape(20, -1))
    assert torch.allclose(stage1_model.grouped_bilinear(b1, b2, lin.weight, lin.bias), ref)
    assert torch.autograd.gradcheck(stage1_model.grouped_bilinear, (b1, b2, lin.weight, lin.bias))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lin32 = torch.nn.Linear(48, 5)
        x1, x2 = b1.detach().float(), b2.detach().float()
        out = stage1_model.grouped_bilinear(x1, x2, lin32.weight, lin32.bias)
        expected = lin32((x1.unsqueeze(3) * x2.unsqueeze(2)).reshape(20, -1))
    assert out.dtype == expected.dtype == torch.bfloat16
    assert torch.allclose(out.float(), expected.float(), atol=0.05, rtol=0.02)


def test_encode_with_rows_equals_those_rows_of_the_full_attention(bert_tok, dev_docs, monkeypatch):
    """The model asks encode for the mention rows only; they must be the full attention's rows, re-normalised
    the same way, on a document of many windows, also when the windows go through the encoder in several groups
    (a row asked twice, rows of different counts per document, an unordered request)."""
    import lmrc.stage1.encoder as encoder_module

    window = 64
    enc = tiny_bert(bert_tok.vocab_size, max_pos=window).eval()
    fs = [featurize(dev_docs[0], bert_tok, None), featurize(dev_docs[1], bert_tok, None)]
    ids, mask, pos, _ = batch_of(fs)
    rows = [[p for ps in pos[0] for p in ps][::-1] + [0], [p for ps in pos[1] for p in ps][:5]]
    with torch.no_grad():
        hidden, full = encode(enc, ids, mask, window=window)
        monkeypatch.setattr(encoder_module, "SEGMENTS_PER_CALL", 3)
        hidden_r, part = encode(enc, ids, mask, window=window, rows=rows)
    assert len(plan_segments(fs[0].input_ids, 0, window)) > 3
    assert torch.allclose(hidden, hidden_r, atol=1e-6)
    assert part.shape == (2, full.size(1), max(len(r) for r in rows), full.size(-1))
    for b, r in enumerate(rows):
        assert torch.allclose(part[b, :, : len(r)], full[b][:, r], atol=1e-6)
        assert not part[b, :, len(r) :].any()
