"""Stage 1 scores the pairs of a document in chunks (memory linear in pairs on long documents): the logits and
the gradients equal one unchunked pass, and equal the padded-gather formula the model used before chunking."""

from __future__ import annotations

import pytest
import torch

from lmrc.stage1 import model as model_module
from lmrc.stage1.model import Stage1Model


def tiny_model(seed: int = 0) -> Stage1Model:
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        attn_implementation="eager",
    )
    encoder = BertModel(cfg, add_pooling_layer=False)
    return Stage1Model(encoder, num_logits=6, emb_size=16, block_size=4, n_classifiers=2).eval()


def batch(seed: int = 1):
    """Two documents (40 and 27 tokens, right-padded) with 7 and 4 entities of 1-3 mentions, all ordered pairs."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 50, (2, 40), generator=g)
    mask = torch.ones(2, 40, dtype=torch.long)
    mask[1, 27:] = 0
    entity_pos = [
        [[1], [3, 10], [5, 20, 30], [7], [12, 39], [15], [25]],
        [[0], [4, 8, 26], [11], [20]],
    ]
    hts = [[(h, t) for h in range(len(e)) for t in range(len(e)) if h != t] for e in entity_pos]
    return ids, mask, entity_pos, hts


def padded_gather_logits(model: Stage1Model, ids, mask, entity_pos, hts) -> torch.Tensor:
    """The pre-chunking computation: every pair of a document at once, mention rows gathered into padded slots."""
    from lmrc.stage1.encoder import encode

    hidden, attention = encode(model.encoder, ids, mask, model.window, model.specials, model.n_layers_avg)
    heads, tails, contexts = [], [], []
    for b, ents in enumerate(entity_pos):
        counts = torch.tensor([len(e) for e in ents])
        most = int(counts.max())
        slot = torch.arange(most) < counts[:, None]
        index = torch.zeros((len(ents), most), dtype=torch.long)
        index[slot] = torch.tensor([p for e in ents for p in e])
        entity = torch.logsumexp(hidden[b][index].masked_fill(~slot[..., None], float("-inf")), dim=1)
        rows = attention[b][:, index].masked_fill(~slot[None, :, :, None], 0.0)
        entity_att = (rows.sum(2) / counts[None, :, None]).transpose(0, 1)
        pairs = torch.tensor(hts[b])
        h, t = pairs[:, 0], pairs[:, 1]
        q = (entity_att[h] * entity_att[t]).mean(1)
        q = q / (q.sum(1, keepdim=True) + 1e-5)
        heads.append(entity[h])
        tails.append(entity[t])
        contexts.append(q @ hidden[b])
    return model._classify(torch.cat(heads), torch.cat(tails), torch.cat(contexts))


@pytest.mark.parametrize("elements, most", [(1, 8192), (2 * 40 * 5, 8192), (1 << 24, 3)])
def test_chunked_logits_equal_one_pass_and_the_padded_formula(monkeypatch, elements, most):
    model = tiny_model()
    inputs = batch()
    with torch.no_grad():
        whole = model(*inputs)
        reference = padded_gather_logits(model, *inputs)
        monkeypatch.setattr(model_module, "PAIR_CONTEXT_ELEMENTS", elements)
        monkeypatch.setattr(model_module, "MAX_PAIR_CHUNK", most)
        chunked = model(*inputs)
    assert whole.shape == (42 + 12, 6)
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(whole, reference, rtol=1e-5, atol=1e-6)


def test_chunked_gradients_equal_one_pass(monkeypatch):
    """Training goes through the same chunks: the gradient of every parameter is unchanged."""

    def grads() -> dict[str, torch.Tensor]:
        model = tiny_model()
        model.train()
        model(*batch()).pow(2).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    whole = grads()
    monkeypatch.setattr(model_module, "PAIR_CONTEXT_ELEMENTS", 1)
    chunked = grads()
    assert whole.keys() == chunked.keys() and len(whole) > 5
    for name in whole:
        torch.testing.assert_close(chunked[name], whole[name], rtol=1e-4, atol=1e-6, msg=name)


def test_chunk_size_bounds_the_attention_product():
    """A normal document is one chunk; a long one gets chunks whose [pairs, heads, length] product is bounded."""
    assert (
        model_module.pair_chunk(heads=12, length=400) >= 380
    )  # a typical Re-DocRED document's pairs, at once
    long_doc = model_module.pair_chunk(heads=12, length=5500)
    assert long_doc * 12 * 5500 <= model_module.PAIR_CONTEXT_ELEMENTS
    assert model_module.pair_chunk(heads=12, length=10**9) == 1
    assert model_module.pair_chunk(heads=1, length=1) == model_module.MAX_PAIR_CHUNK


def test_a_batch_without_pairs_gives_empty_logits_that_backpropagate():
    model = tiny_model().train()
    ids, mask, _, _ = batch()
    logits = model(ids, mask, [[[1]], [[4]]], [[], []])
    assert logits.shape == (0, 6) and logits.requires_grad
    logits.sum().backward()  # a batch of one-entity documents trains without error
