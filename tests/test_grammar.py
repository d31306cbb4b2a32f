"""Grammar-constrained answers: the grammar accepts exactly the allowed answers (real xgrammar on the packaged
SmolLM2 tokenizer, property-tested over random pair lists and relation sets), and a random tiny model under it can
only write lines the scorer keeps."""

from __future__ import annotations

import functools

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from stage2_helpers import smollm2_tokenizer, tiny_model_dir

from lmrc.stage2.grammar import GrammarCompiler, answer_grammar, relation_rule
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


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    entities=st.lists(name, min_size=2, max_size=6, unique=True),
    relations=st.lists(name, min_size=1, max_size=6, unique=True),
    allow_none=st.booleans(),
    data=st.data(),
)
def test_the_grammar_accepts_exactly_the_allowed_answers(entities, relations, allow_none, data):
    all_pairs = [(h, t) for h in entities for t in entities if h != t]
    asked = data.draw(st.lists(st.sampled_from(all_pairs), min_size=1, max_size=5, unique=True))
    rels = relations + (["None"] if allow_none else [])
    ebnf = answer_grammar(asked, relation_rule(relations, allow_none))
    # any sequence of lines about asked pairs with relation-set names, and the empty answer, is accepted
    lines = data.draw(st.lists(st.tuples(st.sampled_from(asked), st.sampled_from(rels)), max_size=4))
    answer = "\n".join(f"({h}| {r}| {t})" for (h, t), r in lines)
    assert accepts(ebnf, answer)
    (h, t), r = asked[0], rels[0]
    # what the scorer would drop cannot be generated
    unasked = [p for p in all_pairs if p not in asked]
    bad = [
        f"({h}| -| {t})",  # the placeholder echoed back
        f"({h}| {r}| {t}",  # a line cut short
        f"({h} | {r} | {t})",  # another spacing
        f"({h}| {r}| {t})\n",  # a trailing empty line
        f"({h}| {r}| {t}) extra",
    ]
    if "zz" + r not in rels:
        bad.append(f"({h}| zz{r}| {t})")  # a name outside the relation set
    if not allow_none and "None" not in relations:
        bad.append(f"({h}| None| {t})")
    if unasked:
        uh, ut = unasked[0]
        bad.append(f"({uh}| {r}| {ut})")  # a pair that was not asked
    for text in bad:
        assert not accepts(ebnf, text), text


def test_relation_rule_lists_longer_names_first_and_none_only_when_allowed():
    rule = relation_rule(["country", "country of citizenship"], allow_none=False)
    assert rule == 'rel ::= "country of citizenship" | "country"'
    assert relation_rule(["a"], allow_none=True) == 'rel ::= "None" | "a"'


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
    rel_rule = relation_rule(["country", "capital", "member of"], allow_none=False)
    asks = [[("Perth", "Australia")], [("Paris", "France"), ("France", "Europe")], [("A", "B")]]
    prompts = [tok(f"Question {i}: relations?")["input_ids"] for i in range(len(asks))]
    budgets = [40, 60, 3]  # the last one is cut by its budget mid-line
    free = gen.generate(prompts, budgets)
    constrained = gen.generate(prompts, budgets, [answer_grammar(a, rel_rule) for a in asks])
    assert not any(parse_triples(g.text) for g in free)  # unconstrained, a random model writes noise
    for g, asked, budget in zip(constrained, asks, budgets):
        assert g.n_tokens <= budget
        for line in filter(None, g.text.split("\n")):
            if g.hit_limit and line == g.text.split("\n")[-1]:
                continue  # the line the budget cut
            assert line.startswith("(") and line.endswith(")"), g.text
            ((h, r, t),) = parse_triples(line)
            assert (h, t) in asked and r in {"country", "capital", "member of"}
    assert any(parse_triples(g.text) for g in constrained[:2])
    assert constrained[2].hit_limit


@pytest.mark.parametrize("pairs", [[]])
def test_a_grammar_needs_a_pair(pairs):
    with pytest.raises(ValueError):
        answer_grammar(pairs, relation_rule(["a"], False))
