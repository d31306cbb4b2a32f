"""Typed datasets (CDR: Chemical -> Disease): only the allowed entity-type pairs are features, training rows,
candidates and scored pairs, on the real CDR data."""

from __future__ import annotations

import pytest
from stage1_run_helpers import save_tiny_bert, single_thread, tiny_config, write_docs  # noqa: F401

from lmrc.data.docred import load_documents, restrict_pairs
from lmrc.data.relations import load_relations

CHEM_DIS = [["Chemical", "Disease"]]


@pytest.fixture(scope="module")
def cdr(data_dir):
    rel = load_relations(data_dir / "cdr" / "rel_info.json")
    return rel, load_documents(data_dir / "cdr" / "train.json", rel)


def test_restricted_documents_ask_only_chemical_disease_pairs(cdr):
    rel, docs = cdr
    typed = restrict_pairs(docs[:20], CHEM_DIS)
    for plain, d in zip(docs[:20], typed):
        types = [e.type for e in d.entities]
        expected = [(h, t) for h, t in plain.pairs() if (types[h], types[t]) == ("Chemical", "Disease")]
        assert d.pairs() == expected and len(d.pairs()) < len(plain.pairs())
        assert set(d.relations_by_pair()) <= set(d.pairs())  # every CDR fact is Chemical -> Disease
        assert d.facts == plain.facts
    assert restrict_pairs(docs[:2], None) == docs[:2]


def test_facts_outside_the_pair_types_are_dropped_with_a_warning(cdr, caplog):
    rel, docs = cdr
    (d,) = restrict_pairs(docs[:1], [["Disease", "Chemical"]], "cdr")
    assert d.facts == () and "facts between entity types outside pair_types" in caplog.text


def test_stage1_with_pair_types_proposes_and_counts_only_typed_pairs(cdr, data_dir, tmp_path, cache_dir):
    from lmrc.stage1.config import CandidateSettings
    from lmrc.stage1.predict import predict
    from lmrc.stage1.train import train

    rel, docs = cdr
    short = sorted(docs, key=lambda d: len(d.words))[:6]
    train_file = write_docs(tmp_path / "train.json", short[:4])
    test_file = write_docs(tmp_path / "test.json", short[4:])
    cfg = tiny_config(save_tiny_bert(tmp_path / "bert"), train_file, None, data_dir / "cdr" / "rel_info.json",
                      tmp_path / "run", "data.pair_types=[[Chemical, Disease]]", "train.epochs=1")  # fmt: skip
    result = predict(train(cfg).best_dir, test_file, tmp_path / "c.json", CandidateSettings(max_per_doc=1000))
    typed = restrict_pairs(short[4:], CHEM_DIS)
    assert result.report.pairs == sum(len(d.pairs()) for d in typed)
    for dc, d in zip(result.candidates.documents, typed):
        assert {(p.h, p.t) for p in dc.pairs} == set(d.pairs())  # every typed pair, and no other
