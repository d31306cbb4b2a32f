"""What `lmrc compare` reports from its runs: scored rows, the SBERT-threshold and candidate curves, the tables
(markdown and terminal) and results.md. Kept apart from compare.py, which trains and runs the modes, so that the
tables can change without touching the runs (and be rebuilt from saved runs)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmrc.data.docred import Document, restrict_pairs
from lmrc.data.relations import RelationSet
from lmrc.eval.bootstrap import document_counts, paired_bootstrap
from lmrc.eval.metrics import evaluate, load_predictions
from lmrc.experiments.config import LLM_MODES
from lmrc.io import sidecar
from lmrc.models.store import default_cache_dir
from lmrc.predict.run import iter_progress
from lmrc.stage1.inference import gold_pair_flags, pair_scores
from lmrc.stage1.predict import Proposer
from lmrc.stage2.align import RelationMapper, align_output, entity_choices
from lmrc.stage2.modeling import load_adapter_config
from lmrc.stage2.predict import Stage2Runner
from lmrc.stage2.prompts import Prompt, entity_names

log = logging.getLogger(__name__)


@dataclass
class ModeRun:
    """A finished row: its mode, result file and the run's summary."""

    mode: str
    result: Path
    summary: dict[str, Any]
    name: str = ""  # the row label: the mode, or the variant's name

    def __post_init__(self) -> None:
        self.name = self.name or self.mode


def _row(label: str, mode: str, metrics, summary: dict, variant: str) -> dict[str, Any]:
    s = metrics.summary()
    llm = summary.get("llm") or {}
    row = {
        "label": label,
        "mode": mode,
        "variant": variant,
        "precision": s["precision"],
        "recall": s["recall"],
        "f1": s["f1"],
        "ign_f1": s["ign_f1"],
        "intra_f1": s["intra_f1"],
        "inter_f1": s["inter_f1"],
        "frequent_f1": s["frequent_f1"],
        "long_tail_f1": s["long_tail_f1"],
        "predicted": metrics.relation.predicted,
        "llm_prompts_per_doc": llm.get("prompts_per_document", 0.0),
        "prompt_tokens_per_doc": llm.get("prompt_tokens_per_document", 0.0),
        "generated_tokens_per_doc": llm.get("generated_tokens_per_document", 0.0),
        "seconds_per_doc": summary.get("seconds_per_document"),
        "peak_rss_gib": summary.get("peak_rss_gib"),
    }
    if llm:
        drops = llm.get("drops") or {}
        cand = summary.get("candidates") or {}
        row["out_of_set_relations"] = llm.get("out_of_set_before_mapping")
        row["parse_failures"] = drops.get("unparsed", 0)
        row["placeholder_echoes"] = drops.get("empty_field", 0)  # a `-` (or empty) relation field
        row["triples_parsed"] = llm.get("triples_parsed")
        row["none_answers"] = llm.get("none_answers")
        row["pairs_asked"] = llm.get("pairs_asked")
        row["pairs_kept_by_stage1"] = llm.get("pairs_kept_by_stage1", 0)
        row["pairs_cut"] = llm.get("pairs_cut", 0)
        # refine sends only the uncertain band of the candidates to the LLM
        row["share_of_candidates_to_llm"] = (
            llm["pairs_asked"] / cand["candidates"] if cand.get("candidates") else None
        )
    return row


def score_runs(
    runs: Sequence[ModeRun], docs: Sequence[Document], ref, relations: RelationSet
) -> tuple[list[dict], dict[str, Any]]:
    """Rows of the table, and per-relation F1 of every row (for the plot)."""
    rows, per_relation, counts = [], {}, {}
    for run in runs:
        variants = [("strict", run.result)]
        strict = sidecar(run.result, ".strict.json")
        if strict.is_file():  # the result is SBERT-mapped, the strict names beside it
            variants = [("strict", strict), ("sbert", run.result)]
        for variant, path in variants:
            predictions = load_predictions(path)
            metrics = evaluate(predictions, docs, ref)
            label = run.name if variant == "strict" else f"{run.name} + SBERT"
            rows.append({**_row(label, run.mode, metrics, run.summary, variant), "result": str(path)})
            per_relation[label] = {rid: sc.f1 for rid, sc in metrics.per_relation.items()}
            counts[label] = document_counts(predictions, docs)
    add_noise(rows, counts)
    return rows, per_relation


NOISE_REFERENCE = "stage1-only"  # the row every other row is compared with, when present


def add_noise(rows: list[dict], counts: dict) -> None:
    """Each row's 95% bootstrap interval of F1 over the documents, and its paired difference to stage1-only
    (lmrc.eval.bootstrap): whether a gap between rows is more than the draw of documents."""
    reference = NOISE_REFERENCE if NOISE_REFERENCE in counts else None
    noise = paired_bootstrap(counts, reference)
    for row in rows:
        n = noise.get(row["label"])
        if n is None:
            continue
        row["f1_interval"] = [n.f1.low, n.f1.high]
        if n.delta is not None and n.delta_interval is not None:
            row["delta_reference"] = reference
            row["delta_f1"] = n.delta
            row["delta_interval"] = [n.delta_interval.low, n.delta_interval.high]


def theta_curves(
    runs: Sequence[ModeRun], docs: Sequence[Document], ref, relations: RelationSet, thetas: Sequence[float]
) -> dict[str, list[float]]:
    """F1 against the SBERT threshold theta (LMRC Fig. 3), re-aligning the saved raw answers (no LLM run)."""
    by_title = {d.title: d for d in docs}
    curves: dict[str, list[float]] = {}
    for run in runs:
        if run.mode not in LLM_MODES:
            continue
        adapter = run.summary["fingerprint"]["stage2"]["adapter"]
        align = load_adapter_config(adapter).align
        mapper = RelationMapper(
            relations, sbert_path=align.sbert_model, mode="sbert", cache_dir=default_cache_dir()
        )
        records = list(iter_progress(sidecar(run.result, ".progress.jsonl")))
        prepared = []
        for r in records:
            doc = by_title[r["title"]]
            names = entity_names(doc)
            prepared.append((doc, names, entity_choices(doc, names), r.get("raw", [])))
        f1s = []
        for theta in thetas:
            mapper.theta = float(theta)
            preds: list[dict] = []
            for doc, names, choices, raws in prepared:
                seen = set()
                for raw in raws:
                    prompt = Prompt(doc.title, "", "", tuple(tuple(p) for p in raw["pairs"]))
                    res = align_output(
                        raw["text"],
                        prompt,
                        doc,
                        names,
                        relations,
                        mapper,
                        align.cutoff,
                        align.scorer,
                        choices,
                    )
                    for p in res.predictions:
                        key = (p["h_idx"], p["t_idx"], p["r"])
                        if key not in seen:
                            seen.add(key)
                            preds.append(p)
            f1s.append(evaluate(preds, docs, ref).relation.f1)
        curves[run.name] = f1s
    return curves


def candidate_curve(
    stage1: Path, rc: Path | None, docs: Sequence[Document], points: int
) -> list[dict[str, float]]:
    """Stage-1 pair recall and LLM prompt tokens per document against the candidate threshold."""
    proposer = Proposer(stage1)
    docs = restrict_pairs(docs, proposer.checkpoint.config.data.pair_types)
    scores = pair_scores(proposer.checkpoint.loss, proposer.logits(docs))
    flat = sorted((s for doc in scores for s in doc), reverse=True)
    if not flat:
        return []
    runner = None
    if rc is not None:
        runner = Stage2Runner(rc)
    gold = [gold_pair_flags(d) for d in docs]
    n_pos = sum(sum(g) for g in gold)
    out = []
    for k in range(points):
        keep = max(1, round(len(flat) * (k + 1) / points))
        threshold = flat[keep - 1] - 1e-9
        kept = [[i for i, s in enumerate(doc_s) if s > threshold] for doc_s in scores]
        hit = sum(doc_g[i] for doc_g, doc_k in zip(gold, kept) for i in doc_k)
        point = {
            "threshold": threshold,
            "share_of_pairs": sum(map(len, kept)) / len(flat),
            "recall": hit / n_pos if n_pos else 0.0,
        }
        if runner is not None:
            tokens = 0
            for doc, idx in zip(docs, kept):
                pairs = [doc.pairs()[i] for i in idx]
                _, prompts = runner.plan(doc, sorted(pairs))
                tokens += sum(len(runner.encoder.encode_prompt(p.text)) for p in prompts)
            point["prompt_tokens_per_doc"] = tokens / len(docs)
        out.append(point)
    return out


# ----------------------------------------------------------------------------------------------- tables


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.2f}"


def _num(x: float | None, fmt: str = "{:,.0f}") -> str:
    return "–" if x is None else fmt.format(x)


TABLE_COLUMNS = (
    ("mode", lambda r: r["label"]),
    ("P", lambda r: _pct(r["precision"])),
    ("R", lambda r: _pct(r["recall"])),
    ("F1", lambda r: _pct(r["f1"])),
    ("Ign F1", lambda r: _pct(r["ign_f1"])),
    ("intra F1", lambda r: _pct(r["intra_f1"])),
    ("inter F1", lambda r: _pct(r["inter_f1"])),
    ("freq. F1", lambda r: _pct(r["frequent_f1"])),
    ("LT F1", lambda r: _pct(r["long_tail_f1"])),
    ("#pred", lambda r: f"{r['predicted']:,}"),
    ("LLM prompts/doc", lambda r: _num(r["llm_prompts_per_doc"], "{:,.1f}")),
    ("prompt tok/doc", lambda r: _num(r["prompt_tokens_per_doc"])),
    ("gen. tok/doc", lambda r: _num(r["generated_tokens_per_doc"])),
    ("s/doc", lambda r: _num(r["seconds_per_doc"], "{:.2f}")),
    ("peak GiB", lambda r: _num(r["peak_rss_gib"], "{:.2f}")),
)


# What the LLM was asked and what became of its answers (issue 8: format failures should vanish with
# constrained decoding; refine sends only part of the candidates). One row per LLM run (strict names).
ANSWER_COLUMNS = (
    ("mode", lambda r: r["label"]),
    ("pairs asked", lambda r: _num(r["pairs_asked"])),
    ("share of cand.", lambda r: _pct(r["share_of_candidates_to_llm"])),
    ("kept by stage 1", lambda r: _num(r["pairs_kept_by_stage1"])),
    ("triples", lambda r: _num(r["triples_parsed"])),
    ("None", lambda r: _num(r["none_answers"])),
    ("unparsed lines", lambda r: _num(r["parse_failures"])),
    ("'-' echoes", lambda r: _num(r["placeholder_echoes"])),
    ("out-of-set names", lambda r: _num(r["out_of_set_relations"])),
    ("pairs cut", lambda r: _num(r["pairs_cut"])),
)


def _signed(x: float) -> str:
    return f"{100 * x:+.2f}"


def _interval(bounds: Sequence[float] | None, fmt=_pct) -> str:
    return "–" if not bounds else f"{fmt(bounds[0])} – {fmt(bounds[1])}"


def _verdict(r: dict) -> str:
    low, high = r["delta_interval"]
    if low == high == 0:
        return "no difference"  # the same score on every draw of the documents
    return "higher" if low > 0 else "lower" if high < 0 else "within noise"


# Noise (compare's paired bootstrap over documents): one row per scored row; the difference columns are empty for
# the reference row (stage1-only) and when there is none.
NOISE_COLUMNS = (
    ("mode", lambda r: r["label"]),
    ("F1", lambda r: _pct(r["f1"])),
    (
        "F1 95% interval",
        lambda r: _interval(r.get("f1_interval")),
    ),
    ("ΔF1 vs stage1-only", lambda r: _signed(r["delta_f1"]) if "delta_f1" in r else "–"),
    (
        "Δ 95% interval",
        lambda r: _interval(r.get("delta_interval"), _signed),
    ),
    ("reading", lambda r: _verdict(r) if "delta_interval" in r else "–"),
)


def noise_rows(rows: Sequence[dict]) -> list[dict]:
    return [r for r in rows if "f1_interval" in r]


# The learning curve (compare's `learning_curve`): one row per adapter.
LEARNING_COLUMNS = (
    ("adapter", lambda r: r["kind"]),
    ("pairs asked", lambda r: r["pairs"]),
    ("docs", lambda r: _num(r.get("documents"))),
    ("LLM training tokens", lambda r: f"{r['budget_tokens']:,}"),
    ("trained", lambda r: _num(r.get("trained_tokens"))),
    ("from", lambda r: r.get("adapter", "trained to the budget")),
    ("P", lambda r: _pct(r["precision"])),
    ("R", lambda r: _pct(r["recall"])),
    ("F1", lambda r: _pct(r["f1"])),
    (
        "F1 95% interval",
        lambda r: _interval(r.get("f1_interval")),
    ),
    ("#pred", lambda r: f"{r['predicted']:,}"),
)


def learning_curve_rows(points: Sequence[dict]) -> list[dict]:
    """The curve's points, rc first, each by budget."""
    return sorted(points, key=lambda p: (p["kind"] != "rc", p["budget_tokens"]))


def answer_rows(rows: Sequence[dict]) -> list[dict]:
    return [r for r in rows if r["mode"] in LLM_MODES and r["variant"] == "strict" and "pairs_asked" in r]


def markdown_table(rows: Sequence[dict], columns=TABLE_COLUMNS) -> str:
    head = "| " + " | ".join(name for name, _ in columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(get(r) for _, get in columns) + " |" for r in rows]
    return "\n".join([head, rule, *body])


def text_table(rows: Sequence[dict], columns=TABLE_COLUMNS) -> str:
    """The table for a terminal: aligned columns."""
    cells = [[name for name, _ in columns]] + [[get(r) for _, get in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = []
    for k, row in enumerate(cells):
        lines.append(
            "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
        )
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def results_markdown(
    rows: Sequence[dict],
    cand: dict | None,
    n_docs: int,
    eval_path: Path | None,
    curve: Sequence[dict] = (),
    machine: str = "",
) -> str:
    """results.md: the machine, the scores table, the LLM-answers table, the stage-1 candidate line and the
    learning curve's table."""
    lines = [
        "# lmrc compare",
        "",
        f"{n_docs} evaluation documents ({eval_path}). Scores: official DocRED F1 / Ign F1 (%); frequent = the 10 "
        "relations with most training facts, LT = the others. Token and time columns are per document.",
        "",
        *([f"Machine: {machine}.", ""] if machine else []),
        markdown_table(rows),
        "",
    ]
    if any("delta_interval" in r for r in rows):
        lines += [
            "Noise: 95% intervals from a paired bootstrap over the documents (2,000 resamples of the documents, every "
            "row scored on the same draws; lmrc.eval.bootstrap). A row differs from stage1-only beyond the draw of "
            "documents when the interval of its difference excludes 0:",
            "",
            markdown_table(noise_rows(rows), NOISE_COLUMNS),
            "",
        ]
    answers = answer_rows(rows)
    if answers:
        lines += [
            "What the LLM was asked and what became of its answers (totals over the documents; share of cand.: "
            "the candidates that reached the LLM, below 100% with refine; '-' echoes: the prompt's placeholder "
            "written as the relation; pairs cut: answers lost to the token budget):",
            "",
            markdown_table(answers, ANSWER_COLUMNS),
            "",
        ]
    if cand:
        line = (
            f"Stage-1 candidates for the LLM: {cand['candidates']:,} of {cand['pairs']:,} pairs "
            f"(reduction ratio {cand['reduction']:.4f})"
        )
        if "recall" in cand:
            line += f", pair recall {100 * cand['recall']:.2f}%"
        lines += [line + ".", ""]
    if curve:
        lines += [
            "Learning curve (`learning_curve.png`): relation F1 against LLM training tokens, constrained answers; "
            'rc is asked about the gold pairs (LMRC\'s "RC stage" ablation), direct about all pairs:',
            "",
            markdown_table(learning_curve_rows(curve), LEARNING_COLUMNS),
            "",
        ]
    return "\n".join(lines)
