"""Grammar-constrained answers: the grammar accepts exactly the allowed answers (real xgrammar on the packaged
SmolLM2 tokenizer, property-tested over random pair lists and relation sets), and a random tiny model under it can
only write lines the scorer keeps."""

from __future__ import annotations

import functools

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from stage2_helpers import smollm2_tokenizer, tiny_model_dir

from lmrc.stage2.grammar import GrammarCompiler, answer_bound, answer_grammar, relation_rule, utf8_bytes
from lmrc.stage2.parse import parse_triples


@functools.lru_cache(maxsize=1)
def compiler() -> GrammarCompiler:
    tok = smollm2_tokenizer()
    return GrammarCompiler(tok, len(tok), [tok.eos_token_id])


def accepts(ebnf: str, text: str) -> bool:
    """The whole text is an answer: accepted, then the end of answer (EOS) is accepted too."""
    c = compiler()
    m = c.matcher(c.compile(ebnf))
    return m.accept_string(text) and m.accept_token(smollm2_tokenizer().eos_token_id) and m.is_terminated()


# Names as lmrc renders them (entity_names / rel_info): letters, digits, spaces, punctuation, never '|' or newline.
name = (
    st.text(
        alphabet=st.characters(categories=("L", "N", "Zs"), include_characters="-.,'()&/"),
        min_size=1,
        max_size=12,
    )
    .map(lambda s: " ".join(s.split()))
    .filter(bool)
)


def answer_of(slots) -> str:
    """The answer text of `slots`: a list of ((head, tail), [relations]) in order."""
    return "\n".join(f"({h}| {r}| {t})" for (h, t), rels in slots for r in rels)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    entities=st.lists(name, min_size=2, max_size=6, unique=True),
    relations=st.lists(name.filter(lambda s: s not in ("None", "-")), min_size=1, max_size=6, unique=True),
    allow_none=st.booleans(),
    k=st.integers(1, 4),
    data=st.data(),
)
def test_the_grammar_accepts_exactly_one_bounded_answer_per_asked_pair_in_order(
    entities, relations, allow_none, k, data
):
    all_pairs = [(h, t) for h in entities for t in entities if h != t]
    asked = data.draw(st.lists(st.sampled_from(all_pairs), min_size=1, max_size=5, unique=True))
    rel = relation_rule(relations, allow_none, k)
    ebnf = answer_grammar(asked, rel)
    # every asked pair in order: None (when offered), or 1..k distinct relation-set names (none at all when the
    # template has no None)
    # (sets this small get distinct relations in the set's order: lmrc.stage2.grammar.CANONICAL_ORDER_MAX)
    relation_sets = st.lists(st.sampled_from(relations), min_size=1, max_size=k, unique=True).map(
        lambda chosen: [r for r in relations if r in chosen]
    )
    no_answer = st.just(["None"]) if allow_none else st.just([])
    slots = [(p, data.draw(st.one_of(no_answer, relation_sets))) for p in asked]
    answer = answer_of(slots)
    assert accepts(ebnf, answer), answer
    tok = smollm2_tokenizer()
    # the bound: the answer's characters and its tokens (+ EOS), whatever it holds
    assert len(answer) + 1 <= answer_bound(asked, rel)
    assert len(tok(answer)["input_ids"]) + 1 <= answer_bound(asked, rel, utf8_bytes)
    assert len(tok(answer)["input_ids"]) + 1 <= answer_bound(asked, rel, lambda s: len(tok(s)["input_ids"]))

    (h, t), r = asked[0], relations[0]
    unasked = [p for p in all_pairs if p not in asked]
    bad = [
        f"({h}| -| {t})",  # the placeholder echoed back
        f"({h}| {r}| {t}",  # a line cut short
        f"({h} | {r} | {t})",  # another spacing
        answer + "\n",  # a trailing empty line
        answer + " extra",
        answer_of([(asked[0], [r] * (k + 1))]),  # k + 1 lines for one pair
        answer_of([(asked[0], [r, r])]),  # a relation repeated
    ]
    if "zz" + r not in relations:
        bad.append(answer_of([(asked[0], ["zz" + r])]))  # a name outside the relation set
    if not allow_none:
        bad.append(answer_of([(asked[0], ["None"])]))
    if unasked:
        bad.append(answer_of([(unasked[0], [r])]))  # a pair that was not asked
    if len(asked) > 1:
        one = [(p, [r]) for p in asked]
        bad.append(answer_of(one[::-1]))  # out of order
        bad.append(answer_of(one + one[:1]))  # the first pair again after the others: a loop
        if allow_none:
            bad.append(answer_of(one[1:]))  # a pair left out
    if allow_none:
        bad.append("")  # no answer at all
    else:
        assert accepts(ebnf, "")  # no pair holds a relation
    for text in bad:
        assert not accepts(ebnf, text), text


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    relations=st.lists(name.filter(lambda s: s not in ("None", "-")), min_size=2, max_size=7, unique=True),
    allow_none=st.booleans(),
    k=st.integers(1, 4),
    data=st.data(),
)
def test_narrowed_choices_allow_only_their_relations_distinct_in_the_sets_order(
    relations, allow_none, k, data
):
    rel = relation_rule(relations, allow_none, k)
    pairs = [("A", "B"), ("B", "C")]
    chosen = data.draw(st.lists(st.sampled_from(relations), min_size=1, max_size=4, unique=True))
    ebnf = answer_grammar(pairs, rel, [chosen, None])  # the second pair keeps the whole set
    in_order = [r for r in relations if r in chosen]
    picks = data.draw(st.lists(st.sampled_from(in_order), min_size=1, max_size=k, unique=True))
    picks = [r for r in in_order if r in picks]  # the relation set's order
    rest = [relations[-1]]
    assert accepts(ebnf, answer_of([(pairs[0], picks), (pairs[1], rest)]))
    assert len(answer_of([(pairs[0], picks), (pairs[1], rest)])) + 1 <= answer_bound(pairs, rel)
    outside = [r for r in relations if r not in chosen]
    bad = [answer_of([(pairs[0], [picks[0], picks[0]]), (pairs[1], rest)])]  # a repeat
    if len(picks) > 1:
        bad.append(answer_of([(pairs[0], picks[::-1]), (pairs[1], rest)]))  # out of the set's order
    if outside:
        bad.append(answer_of([(pairs[0], [outside[0]]), (pairs[1], rest)]))  # not one of the pair's choices
    for text in bad:
        assert not accepts(ebnf, text), text
    if outside:  # the whole set stays open to the pair without choices
        assert accepts(ebnf, answer_of([(pairs[0], picks), (pairs[1], [outside[0]])]))


def test_the_relation_side_keeps_the_relation_set_order_and_checks_its_arguments():
    rel = relation_rule(["country", "capital", "country"], allow_none=True)
    assert rel.names == ("country", "capital") and rel.max_relations == 4
    with pytest.raises(ValueError):
        relation_rule(["a"], allow_none=True, max_relations=0)
    with pytest.raises(ValueError):
        relation_rule(["None"], allow_none=True)
    with pytest.raises(ValueError):
        relation_rule([], allow_none=False)


def test_longer_relation_names_are_not_cut_short_by_a_prefix():
    rel = relation_rule(["country", "country of citizenship"], allow_none=False, max_relations=2)
    ebnf = answer_grammar([("A", "B")], rel)
    assert accepts(ebnf, "(A| country| B)\n(A| country of citizenship| B)")
    assert accepts(ebnf, "(A| country of citizenship| B)")
    assert not accepts(ebnf, "(A| country of| B)")
    # the shared rule of a large set: the longer name is not cut short either
    big = relation_rule(["country", "country of citizenship", *(f"r{i}" for i in range(9))], False, 2)
    assert accepts(answer_grammar([("A", "B")], big), "(A| country of citizenship| B)\n(A| country| B)")


def test_the_budget_is_the_bound_within_the_context():
    from lmrc.stage2.config import GenerationConfig
    from lmrc.stage2.generate import answer_budget

    rel = relation_rule(["country", "capital"], allow_none=True, max_relations=2)
    pairs = [("Paris", "France"), ("France", "Europe")]
    bound = answer_bound(pairs, rel, utf8_bytes)
    # two pairs x two lines of the longest names, the newlines, the end
    lines = ["(Paris| country| France)", "(Paris| capital| France)", "(France| country| Europe)"]
    assert bound == sum(map(len, lines)) + len("(France| capital| Europe)") + 3 + 1
    cfg = GenerationConfig(max_new_tokens_per_pair=4)
    assert answer_budget(2, cfg, bound=bound) == bound  # not pairs x per-pair tokens: the grammar's own bound
    assert answer_budget(2, cfg) == 8
    assert answer_budget(2, cfg, prompt_len=1000, context=1010, bound=bound) == 10  # the room left


def test_a_random_model_under_the_grammar_writes_only_asked_pairs_and_known_relations():
    import torch
    from transformers import AutoModelForCausalLM

    from lmrc.stage2.config import GenerationConfig
    from lmrc.stage2.generate import HFGenerator
    from lmrc.stage2.modeling import load_tokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir())).eval()
    tok = load_tokenizer(tiny_model_dir())
    gen = HFGenerator(model, tok, GenerationConfig(batch_size=4, stop_repeated_lines=0))
    rel_rule = relation_rule(["country", "capital", "member of"], allow_none=False, max_relations=2)
    asks = [[("Perth", "Australia")], [("Paris", "France"), ("France", "Europe")], [("A", "B")]]
    prompts = [tok(f"Question {i}: relations?")["input_ids"] for i in range(len(asks))]
    budgets = [40, 60, 3]  # the last one is cut by its budget mid-line
    free = gen.generate(prompts, budgets)
    constrained = gen.generate(prompts, budgets, [answer_grammar(a, rel_rule) for a in asks])
    assert not any(parse_triples(g.text) for g in free)  # unconstrained, a random model writes noise
    for g, asked, budget in zip(constrained, asks, budgets):
        assert g.n_tokens <= budget
        seen = []
        for line in filter(None, g.text.split("\n")):
            if g.hit_limit and line == g.text.split("\n")[-1]:
                continue  # the line the budget cut
            assert line.startswith("(") and line.endswith(")"), g.text
            ((h, r, t),) = parse_triples(line)
            assert (h, t) in asked and r in {"country", "capital", "member of"}
            seen.append((h, t))
        assert seen == sorted(seen, key=asked.index)  # in the order asked
        assert all(seen.count(p) <= 2 for p in asked)  # at most k = 2 lines per pair
    assert any(parse_triples(g.text) for g in constrained[:2])
    assert constrained[2].hit_limit
    # budgets of the grammar's bound: the answers end by themselves, none is cut
    bounds = [answer_bound(a, rel_rule, utf8_bytes) for a in asks]
    ended = gen.generate(prompts, bounds, [answer_grammar(a, rel_rule) for a in asks])
    assert not any(g.hit_limit for g in ended), [g.text for g in ended]


def test_a_grammar_needs_a_pair():
    with pytest.raises(ValueError):
        answer_grammar([], relation_rule(["a"], False))
