"""Stage-2 training examples: exact prompt masking, pair coverage, fitting into max_seq_len, None answers."""

from __future__ import annotations

import pytest
from stage2_helpers import smollm2_tokenizer

from lmrc.data.docred import parse_documents
from lmrc.stage2.examples import IGNORE_INDEX, ExampleBuilder, training_pairs
from lmrc.stage2.prompts import PromptEncoder, entity_names, render_prefix, render_suffix
from lmrc.stage2.templates import load_template


@pytest.fixture(scope="module")
def tok():
    return smollm2_tokenizer()


def _builder(rel_info, tok, mode="rc", allow_none=None, max_seq_len=2048, chat=False, **kw):
    template = load_template(mode, allow_none=allow_none)
    return ExampleBuilder(rel_info, template, PromptEncoder(tok, chat), max_seq_len, **kw), template


def _gold_answer(doc, rel_info, pairs, none: bool) -> str:
    """The expected answer, written out independently of render_answer."""
    names = entity_names(doc)
    lines = []
    for h, t in pairs:
        rels = list(dict.fromkeys(f.r for f in doc.facts if (f.h, f.t) == (h, t)))
        if not rels and none:
            lines.append(f"({names[h]}| None| {names[t]})")
        for r in rels:
            lines.append(f"({names[h]}| {rel_info.names[r]}| {names[t]})")
    return "\n".join(lines)


def _prompt_text(doc, rel_info, template, pairs) -> str:
    names = entity_names(doc)
    prefix, _ = render_prefix(template, doc, rel_info)
    return prefix + render_suffix(template, list(pairs), names)


def test_labels_mask_exactly_the_prompt_and_decode_to_answer_plus_eos(dev_docs, rel_info, tok):
    doc = dev_docs[0]
    builder, template = _builder(rel_info, tok)
    examples, _ = builder.build([doc], "rc")
    assert examples
    for ex in examples:
        prompt_ids = tok(_prompt_text(doc, rel_info, template, ex.pairs))["input_ids"]
        n = len(prompt_ids)
        assert ex.input_ids[:n] == prompt_ids
        assert ex.labels[:n] == [IGNORE_INDEX] * n
        assert ex.labels[n:] == ex.input_ids[n:]
        assert IGNORE_INDEX not in ex.labels[n:]
        expected = _gold_answer(doc, rel_info, ex.pairs, none=False) + tok.eos_token
        assert tok.decode(ex.labels[n:]) == expected
        assert ex.labels[-1] == tok.eos_token_id


def test_rc_examples_ask_each_gold_pair_once_in_row_major_order(dev_docs, rel_info, tok):
    doc = dev_docs[1]
    builder, _ = _builder(rel_info, tok, max_pairs=4)
    examples, stats = builder.build([doc], "rc")
    asked = [p for ex in examples for p in ex.pairs]
    assert asked == sorted({(f.h, f.t) for f in doc.facts})
    assert all(len(ex.pairs) <= 4 for ex in examples)
    assert stats.examples == len(examples) and stats.pairs == len(asked) and stats.none_pairs == 0


def _small_doc(dev_docs, max_entities=8):
    return min((d for d in dev_docs if 3 <= len(d.entities) <= max_entities), key=lambda d: len(d.entities))


def test_direct_examples_cover_all_pairs_and_answer_none_for_na_pairs(dev_docs, rel_info, tok):
    doc = _small_doc(dev_docs)
    builder, template = _builder(rel_info, tok, mode="direct")
    examples, stats = builder.build([doc], "direct")
    asked = [p for ex in examples for p in ex.pairs]
    n = len(doc.entities)
    assert asked == [(h, t) for h in range(n) for t in range(n) if h != t]
    gold_pairs = {(f.h, f.t) for f in doc.facts}
    assert stats.none_pairs == len(asked) - len(gold_pairs)
    for ex in examples:
        n_prompt = sum(1 for x in ex.labels if x == IGNORE_INDEX)
        answer = tok.decode(ex.labels[n_prompt:])
        assert answer == _gold_answer(doc, rel_info, ex.pairs, none=True) + tok.eos_token


def test_direct_na_chunk_fraction_zero_keeps_only_chunks_with_a_relation(dev_docs, rel_info, tok):
    docs = [d for d in dev_docs if len(d.entities) <= 12][:3]
    builder, _ = _builder(rel_info, tok, mode="direct", max_pairs=6)
    full, full_stats = builder.build(docs, "direct", na_chunk_fraction=1.0)
    sampled, stats = builder.build(docs, "direct", na_chunk_fraction=0.0)
    gold = {(d.title, f.h, f.t) for d in docs for f in d.facts}
    all_na = [ex for ex in full if not any((ex.title, *p) in gold for p in ex.pairs)]
    assert all_na, "the chosen documents should have chunks without any relation"
    assert full_stats.na_chunks == len(all_na) and full_stats.na_chunks_dropped == 0
    assert stats.na_chunks == len(all_na) and stats.na_chunks_dropped == len(all_na)
    assert len(sampled) == len(full) - len(all_na)
    assert all(any((ex.title, *p) in gold for p in ex.pairs) for ex in sampled)


def test_direct_na_chunk_sampling_is_seeded(dev_docs, rel_info, tok):
    docs = [d for d in dev_docs if len(d.entities) <= 12][:3]
    builder, _ = _builder(rel_info, tok, mode="direct", max_pairs=6)
    a, _ = builder.build(docs, "direct", na_chunk_fraction=0.5, seed=3)
    b, _ = builder.build(docs, "direct", na_chunk_fraction=0.5, seed=3)
    assert [ex.pairs for ex in a] == [ex.pairs for ex in b]


def test_prompts_are_split_again_when_real_answers_overflow_the_planned_budget(dev_docs, rel_info, tok):
    # A doc with many gold pairs; planning reserves 1 token per answer pair, so real answers overflow and the
    # builder must split the prompts again until every example fits.
    doc = max(dev_docs[:20], key=lambda d: len(d.relations_by_pair()))
    base_prompt = len(
        tok(_prompt_text(doc, rel_info, load_template("rc"), training_pairs(doc, "rc")[:1]))["input_ids"]
    )
    max_seq_len = base_prompt + 120
    builder, _ = _builder(rel_info, tok, max_seq_len=max_seq_len, answer_tokens_per_pair=1)
    examples, stats = builder.build([doc], "rc")
    assert stats.resplit_prompts > 0
    assert stats.answers_cut == 0 and stats.truncated_documents == 0
    assert all(len(ex) <= max_seq_len for ex in examples)
    assert [p for ex in examples for p in ex.pairs] == training_pairs(doc, "rc")


def _doc_with_many_relations(rel_info, n_rel: int):
    raw = {
        "title": "Many relations",
        "sents": [["Alpha", "met", "Beta", "in", "the", "town", "."]],
        "vertexSet": [
            [{"name": "Alpha", "sent_id": 0, "pos": [0, 1], "type": "PER"}],
            [{"name": "Beta", "sent_id": 0, "pos": [2, 3], "type": "PER"}],
        ],
        "labels": [{"h": 0, "t": 1, "r": r, "evidence": [0]} for r in rel_info.ids[:n_rel]],
    }
    return parse_documents([raw], "<test>", rel_info)[0]


def test_a_single_pair_whose_answer_cannot_fit_is_cut_and_counted(rel_info, tok):
    doc = _doc_with_many_relations(rel_info, 30)
    template = load_template("rc")
    prompt_len = len(tok(_prompt_text(doc, rel_info, template, [(0, 1)]))["input_ids"])
    max_seq_len = prompt_len + 40
    builder, _ = _builder(rel_info, tok, max_seq_len=max_seq_len)
    examples, stats = builder.build([doc], "rc")
    assert len(examples) == 1 and stats.answers_cut == 1
    ex = examples[0]
    assert len(ex) == max_seq_len and ex.answer_cut
    assert ex.labels[-1] != tok.eos_token_id
    full_answer = tok(_gold_answer(doc, rel_info, [(0, 1)], none=False))["input_ids"]
    assert ex.labels[prompt_len:] == full_answer[:40]


def test_chat_template_examples_wrap_the_prompt_as_a_user_turn(dev_docs, rel_info, tok):
    doc = dev_docs[0]
    builder, template = _builder(rel_info, tok, chat=True)
    examples, _ = builder.build([doc], "rc")
    ex = examples[0]
    chat = tok.apply_chat_template(
        [{"role": "user", "content": _prompt_text(doc, rel_info, template, ex.pairs)}],
        tokenize=False,
        add_generation_prompt=True,
    )
    prompt_ids = tok(chat, add_special_tokens=False)["input_ids"]
    n = len(prompt_ids)
    assert ex.input_ids[:n] == prompt_ids
    assert ex.labels[:n] == [IGNORE_INDEX] * n
    assert tok.decode(ex.labels[n:]) == _gold_answer(doc, rel_info, ex.pairs, none=False) + tok.eos_token


def test_rc_allow_none_adds_stage1_false_positives_answered_none(dev_docs, rel_info, tok):
    doc = dev_docs[0]
    gold = set(doc.relations_by_pair())
    false_pos = [p for p in doc.pairs() if p not in gold][:3]
    builder, template = _builder(rel_info, tok, allow_none=True)
    examples, stats = builder.build([doc], "rc", candidates={doc.title: false_pos})
    asked = [p for ex in examples for p in ex.pairs]
    assert asked == sorted(gold | set(false_pos))
    assert stats.false_positive_pairs == 3 and stats.none_pairs == 3
    answers = "\n".join(tok.decode([x for x in ex.labels if x != IGNORE_INDEX]) for ex in examples)
    names = entity_names(doc)
    for h, t in false_pos:
        assert f"({names[h]}| None| {names[t]})" in answers
    assert "None" in template.text


def test_candidates_without_a_none_template_are_refused(dev_docs, rel_info, tok):
    builder, _ = _builder(rel_info, tok)
    with pytest.raises(ValueError, match="None"):
        builder.build([dev_docs[0]], "rc", candidates={dev_docs[0].title: [(0, 1)]})


def test_documents_without_pairs_give_no_examples(rel_info, tok):
    raw = {
        "title": "Lonely",
        "sents": [["Alpha", "slept", "."]],
        "vertexSet": [[{"name": "Alpha", "sent_id": 0, "pos": [0, 1], "type": "PER"}]],
        "labels": [],
    }
    doc = parse_documents([raw], "<test>", rel_info)[0]
    for mode in ("rc", "direct"):
        builder, _ = _builder(rel_info, tok, mode=mode)
        examples, stats = builder.build([doc], mode)
        assert examples == [] and stats.documents_without_pairs == 1
