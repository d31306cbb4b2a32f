"""Alignment of parsed triples to entities (thefuzz cutoffs, asked pairs) and relations (strict, real SBERT)."""

from __future__ import annotations

import pytest

from lmrc.data.docred import Document, Entity, Mention
from lmrc.data.relations import RelationSet
from lmrc.errors import LmrcError
from lmrc.stage2.align import RelationMapper, align_entity, align_output
from lmrc.stage2.prompts import Prompt, entity_names, plan_prompts, render_answer
from lmrc.stage2.templates import load_template

RELS = RelationSet(ids=("P17", "P36"), names={"P17": "country", "P36": "capital"})


def _doc(*entities: list[str]) -> Document:
    return Document(
        index=0,
        title="Doc",
        sents=(("w",),),
        entities=tuple(
            Entity(i, tuple(Mention(n, 0, (0, 1), "LOC") for n in ms)) for i, ms in enumerate(entities)
        ),
        facts=(),
    )


DOC = _doc(["Paris"], ["France", "French Republic"], ["Berlin"], ["John Smith"], ["John Smyth"])
NAMES = entity_names(DOC)


def _prompt(*pairs: tuple[int, int]) -> Prompt:
    return Prompt(title="Doc", prefix="", suffix="", pairs=tuple(pairs))


def test_fuzzy_name_aligns_above_cutoff_and_not_below():
    # fuzz ratio of "pariss" vs "paris": 2 * 5 matching chars / 11 chars = 90.9 -> 91.
    assert align_entity("Pariss", [0, 1], DOC, NAMES, cutoff=80) == (0, 91.0)
    assert align_entity("Pariss", [0, 1], DOC, NAMES, cutoff=92) == (None, 0.0)


def test_any_mention_name_aligns():
    assert align_entity("french republic", [0, 1], DOC, NAMES)[0] == 1


def test_asked_entities_are_preferred_over_better_matches_elsewhere():
    # "John Smith" matches entity 3 exactly, but only entity 4 ("John Smyth", ratio 90) is among the candidates.
    assert align_entity("John Smith", [4], DOC, NAMES) == (4, 90.0)
    assert align_entity("John Smith", [0, 1], DOC, NAMES) == (3, 100.0)  # fallback to all entities


def test_unknown_scorer_is_refused():
    with pytest.raises(LmrcError, match="unknown fuzzy scorer"):
        align_entity("Paris", [0], DOC, NAMES, scorer="nope")


def test_align_output_keeps_asked_pairs_and_counts_each_drop():
    text = "\n".join(
        [
            "Here you go:",  # unparsed
            "(Paris| capital| France)",  # kept
            "(Pariss| country| French Republic)",  # kept (fuzzy head, second mention name for the tail)
            "(Paris| capital| France)",  # parser dedupes exact repeats
            "(paris| Capital| france)",  # same prediction after alignment: duplicate
            "(France| country| Paris)",  # pair (1, 0) was not asked
            "(Paris| country| Paris)",  # self-loop
            "(Xanadu| country| France)",  # below cutoff
            "(Paris| banana| France)",  # not a relation name (strict)
            "(Paris| None| Berlin)",  # None answer: not a prediction, not a drop
        ]
    )
    result = align_output(text, _prompt((0, 1), (0, 2)), DOC, NAMES, RELS, RelationMapper(RELS))
    assert result.predictions == [
        {"title": "Doc", "h_idx": 0, "t_idx": 1, "r": "P36"},
        {"title": "Doc", "h_idx": 0, "t_idx": 1, "r": "P17"},
    ]
    assert dict(result.drops) == {
        "unparsed": 1,
        "duplicate": 1,
        "pair_not_asked": 1,
        "self_loop": 1,
        "below_cutoff": 1,
        "out_of_set_relation": 1,
    }
    assert (result.n_out_of_set_before_mapping, result.n_out_of_set_after_mapping) == (1, 1)
    assert result.n_none == 1
    assert [d["status"] for d in result.details] == [
        "kept",
        "kept",
        "duplicate",
        "pair_not_asked",
        "self_loop",
        "below_cutoff",
        "out_of_set_relation",
    ]


def test_verbatim_display_name_separates_names_that_differ_only_in_case():
    doc = _doc(["Mad World"], ["Tears for Fears"], ["Tears For Fears"])
    names = entity_names(doc)
    text = "(Mad World| performer| Tears For Fears)\n(Mad World| performer| Tears for Fears)"
    rels = RelationSet(ids=("P175",), names={"P175": "performer"})
    result = align_output(text, _prompt((0, 1), (0, 2)), doc, names, rels, RelationMapper(rels))
    assert [(p["h_idx"], p["t_idx"]) for p in result.predictions] == [(0, 2), (0, 1)]


def test_cutoff_decides_whether_a_misspelt_name_is_kept():
    text = "(Pariss| capital| France)"
    prompt = _prompt((0, 1))
    kept = align_output(text, prompt, DOC, NAMES, RELS, RelationMapper(RELS), cutoff=90)
    dropped = align_output(text, prompt, DOC, NAMES, RELS, RelationMapper(RELS), cutoff=92)
    assert len(kept.predictions) == 1 and not kept.drops
    assert dropped.predictions == [] and dict(dropped.drops) == {"below_cutoff": 1}


def test_entities_sharing_a_name_align_to_the_asked_pair(dev_docs, rel_info):
    doc = next(d for d in dev_docs if d.title == "Souvlaki")
    names = entity_names(doc)
    greek = sorted(i for i, e in enumerate(doc.entities) if e.name == "Greek")
    head = next(i for i, e in enumerate(doc.entities) if "Souvlaki" in {m.name for m in e.mentions})
    for g in greek:
        prompt = _prompt((head, g))
        result = align_output(
            "(Souvlaki| country of origin| Greek)", prompt, doc, names, rel_info, RelationMapper(rel_info)
        )
        assert [(p["h_idx"], p["t_idx"], p["r"]) for p in result.predictions] == [(head, g, "P495")]


def test_gold_answers_align_back_to_the_gold_facts_on_real_documents(dev_docs, rel_info):
    template = load_template("rc")
    mapper = RelationMapper(rel_info)
    for doc in dev_docs:
        names = entity_names(doc)
        gold = doc.relations_by_pair()
        got = set()
        for prompt in plan_prompts(doc, rel_info, list(gold), template, len, max_context=10**6):
            answer = render_answer(prompt.pairs, names, gold, rel_info, template)
            result = align_output(answer, prompt, doc, names, rel_info, mapper)
            assert not result.drops, (doc.title, result.drops)
            got |= {(p["h_idx"], p["t_idx"], p["r"]) for p in result.predictions}
        assert got == {(f.h, f.t, f.r) for f in doc.facts}, doc.title


def test_strict_mapping_accepts_exact_names_only(rel_info):
    mapper = RelationMapper(rel_info)
    assert mapper.mode == "strict"
    assert mapper.map("  Country OF   citizenship ") == ("P27", 1.0)
    assert mapper.map("country of citizenship of") == (None, 0.0)


def test_unknown_mapping_mode_is_refused(rel_info):
    with pytest.raises(LmrcError, match="unknown relation mapping mode"):
        RelationMapper(rel_info, mode="fuzzy")


@pytest.fixture(scope="module")
def sbert_mapper(rel_info, tmp_path_factory):
    return RelationMapper(rel_info, sbert_path="minilm", theta=0.55, cache_dir=tmp_path_factory.mktemp("emb"))


@pytest.mark.slow
def test_sbert_maps_a_paraphrase_and_drops_an_unrelated_name(sbert_mapper):
    rid, sim = sbert_mapper.map("country of citizenship of")
    assert rid == "P27" and 0.55 <= sim < 1.0
    rid, sim = sbert_mapper.map("banana")
    assert rid is None and sim < 0.55
    assert sbert_mapper.map("Country") == ("P17", 1.0)  # exact names never go through SBERT


@pytest.mark.slow
def test_sbert_mapping_is_counted_before_and_after(sbert_mapper, rel_info):
    doc = _doc(["Marie Curie"], ["Poland"])
    names = entity_names(doc)
    text = "(Marie Curie| country of citizenship of| Poland)\n(Marie Curie| banana| Poland)"
    result = align_output(text, _prompt((0, 1)), doc, names, rel_info, sbert_mapper)
    assert result.predictions == [{"title": "Doc", "h_idx": 0, "t_idx": 1, "r": "P27"}]
    assert (result.n_out_of_set_before_mapping, result.n_out_of_set_after_mapping) == (2, 1)
    assert dict(result.drops) == {"out_of_set_relation": 1}


@pytest.mark.slow
def test_relation_embeddings_are_cached_on_disk(sbert_mapper, rel_info):
    first = sbert_mapper.relation_embeddings()
    files = list(sbert_mapper.cache_dir.rglob("*.safetensors"))
    assert len(files) == 1
    again = RelationMapper(rel_info, sbert_path="minilm", cache_dir=sbert_mapper.cache_dir)
    again._model, again._model_dir = sbert_mapper._model, sbert_mapper._model_dir  # share the loaded model

    def no_encoding(texts):
        raise AssertionError(f"encoded {texts[:2]}... instead of reading the cache")

    again._encode = no_encoding
    cached = again.relation_embeddings()
    assert cached is not first and (cached == first).all()
    assert first.shape == (len(rel_info), 384)


def test_echoed_placeholder_and_empty_fields_are_counted_as_drops():
    # LMRC Appendix B: the fine-tuned model "outputs '-' appearing in the entity pair input format as a
    # relation". The parser skips such triples; the alignment must still count them, not lose them silently.
    text = "(Paris| -| France)\n(Paris| capital| )\n(Paris| capital| France)"
    result = align_output(text, _prompt((0, 1)), DOC, NAMES, RELS, RelationMapper(RELS))
    assert result.predictions == [{"title": "Doc", "h_idx": 0, "t_idx": 1, "r": "P36"}]
    assert dict(result.drops) == {"empty_field": 2}
