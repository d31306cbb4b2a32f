"""`lmrc entities evaluate`: a labelled DocRED file turned into text, its entities built again and scored."""

from __future__ import annotations

import json
import logging
import os
import resource
import sys
import time

from lmrc.data.docred import load_documents
from lmrc.entities.annotate import gold_of, is_exact
from lmrc.entities.metrics import EntityScores
from lmrc.entities.model import load_annotator
from lmrc.entities.segment import segment
from lmrc.io import atomic_write_text

log = logging.getLogger(__name__)


def peak_rss_gib() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / (1024**3 if sys.platform == "darwin" else 1024**2)


def evaluate(spec: str, gold_path: str | os.PathLike, text_output: str | os.PathLike | None = None) -> dict:
    docs = load_documents(gold_path)
    t_load = time.perf_counter()
    annotator = load_annotator(spec)
    load_seconds = time.perf_counter() - t_load
    scores = EntityScores.empty()
    exact = total = 0
    seconds = 0.0
    lines = []
    for d in docs:
        g = gold_of(d)
        lines.append(json.dumps({"title": d.title, "text": g.text}, ensure_ascii=False))
        t0 = time.perf_counter()
        seg = segment(g.text)
        ents = annotator.find(seg)
        seconds += time.perf_counter() - t0
        for e in g.entities:
            for m in e:
                total += 1
                exact += is_exact(seg, m.span)
        pred = [[((seg.sents[m.sent][m.start].start, seg.sents[m.sent][m.end - 1].end), m.type) for m in e]
                for e in ents]  # fmt: skip
        scores.add([[(m.span, m.type) for m in e] for e in g.entities], pred)
    if text_output is not None:
        atomic_write_text(text_output, "\n".join(lines) + "\n")
    report = scores.report()
    report.update(
        {
            "entities": spec,
            "gold": str(gold_path),
            "documents": len(docs),
            "gold_mentions_on_token_boundaries": exact / total if total else 0.0,
            "seconds_per_document": seconds / len(docs) if docs else 0.0,
            "model_load_seconds": load_seconds,
            "peak_rss_gib": peak_rss_gib(),
        }
    )
    return report


def format_report(r: dict) -> str:
    def prf(k: str) -> str:
        s = r[k]
        return f"P {100 * s['precision']:.2f}  R {100 * s['recall']:.2f}  F1 {100 * s['f1']:.2f}"

    return "\n".join(
        [
            f"{r['gold']}: {r['documents']} documents, entities from {r['entities']}",
            f"  mentions (span + type)   {prf('mention')}",
            f"  mentions (span only)     {prf('mention_span_only')}",
            f"  MUC                      {prf('muc')}",
            f"  B-cubed                  {prf('b_cubed')}",
            f"  CEAF-e                   {prf('ceaf_e')}",
            f"  CoNLL F1                 {100 * r['conll_f1']:.2f}",
            f"  entity exact match       {prf('exact')}",
            f"  entity type accuracy     {100 * r['type_accuracy']:.2f} (of {r['type_accuracy_entities']} exactly found entities)",
            f"  gold mentions on token boundaries {100 * r['gold_mentions_on_token_boundaries']:.2f}%",
            f"  {r['seconds_per_document']:.3f} s per document (model load {r['model_load_seconds']:.1f} s), "
            f"peak memory {r['peak_rss_gib']:.2f} GiB",
        ]
    )
