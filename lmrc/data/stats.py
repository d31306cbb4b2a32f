"""Corpus statistics of DocRED-format documents (`lmrc data stats`).

Pure: documents in, a JSON-ready dict out. Label statistics (facts, NA ratio, intra/inter-sentence facts,
relation counts) are computed over the labelled documents only; when no document is labelled they are None.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

from lmrc.data.docred import Document, Fact
from lmrc.data.relations import RelationSet


def is_intra_sentence(doc: Document, fact: Fact) -> bool:
    """A fact is intra-sentence when some head mention and some tail mention share a sentence.

    That is the usual DocRED definition: the minimum sentence distance over all (head mention, tail mention)
    pairs is 0. Otherwise the fact needs reasoning across sentences (inter-sentence).
    """
    head_sents = {m.sent_id for m in doc.entities[fact.h].mentions}
    return any(m.sent_id in head_sents for m in doc.entities[fact.t].mentions)


def document_stats(docs: Sequence[Document], relations: RelationSet | None = None) -> dict[str, Any]:
    """Counts over `docs`; `relations` only adds relation names to the per-relation counts."""
    labelled = [d for d in docs if d.facts is not None]
    stats: dict[str, Any] = {
        "documents": len(docs),
        "labelled_documents": len(labelled),
        "sentences": sum(len(d.sents) for d in docs),
        "tokens": sum(len(s) for d in docs for s in d.sents),
        "entities": sum(len(d.entities) for d in docs),
        "mentions": sum(len(e.mentions) for d in docs for e in d.entities),
        "entity_pairs": sum(len(d.entities) * (len(d.entities) - 1) for d in docs),
    }
    if not labelled:
        stats.update(
            facts=None,
            labelled_pairs=None,
            pairs_with_relation=None,
            na_pairs=None,
            na_ratio=None,
            intra_sentence_facts=None,
            inter_sentence_facts=None,
            relation_types=None,
            relations=[],
        )
        return stats

    labelled_pairs = sum(len(d.entities) * (len(d.entities) - 1) for d in labelled)
    facts = sum(len(d.facts or ()) for d in labelled)
    positive = sum(len({(f.h, f.t) for f in d.facts or ()}) for d in labelled)
    intra = sum(is_intra_sentence(d, f) for d in labelled for f in d.facts or ())
    counts = Counter(f.r for d in labelled for f in d.facts or ())
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    stats.update(
        facts=facts,
        labelled_pairs=labelled_pairs,
        pairs_with_relation=positive,
        na_pairs=labelled_pairs - positive,
        na_ratio=(labelled_pairs - positive) / labelled_pairs if labelled_pairs else None,
        intra_sentence_facts=intra,
        inter_sentence_facts=facts - intra,
        relation_types=len(counts),
        relations=[
            {
                "id": rid,
                "name": relations.names.get(rid) if relations is not None else None,
                "count": n,
            }
            for rid, n in ranked
        ],
    )
    return stats
