"""The comparison's pictures (matplotlib, an optional extra): per-relation F1 (LMRC Fig. 2, grouped bars), F1
against the SBERT threshold theta (LMRC Fig. 3), stage-1 recall / LLM prompt tokens against the candidate
threshold, and the learning curve (F1 against LLM training tokens)."""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Any

from lmrc.data.relations import RelationSet
from lmrc.io import atomic_write_bytes

log = logging.getLogger(__name__)


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())
    return path


def per_relation(plt, results: dict[str, Any], relations: RelationSet, path: Path) -> Path | None:
    """Per-relation F1 of every row as grouped bars (relations are unordered categories: a line across them would
    read as a trend), relations ordered by training frequency (most frequent at the top); relations no row scored
    above zero are left out. The bars run horizontally so that long relation names ("located in the
    administrative territorial entity") stay readable when DocRED's ~40-90 relations times several rows are drawn:
    the picture grows in height, which a document viewer scrolls, not in width, which it shrinks."""
    rows = results["per_relation_f1"]
    counts = results.get("relation_train_counts") or {}
    scored = {r for scores in rows.values() for r, f1 in scores.items() if f1 > 0}
    # when no row got any relation right, all of them (a picture of zeros says so)
    rels = sorted(
        scored or {r for scores in rows.values() for r in scores}, key=lambda r: (-counts.get(r, 0), r)
    )
    if not rels or not rows:
        return None
    height = 0.8 / len(rows)
    fig, ax = plt.subplots(figsize=(8, max(3.5, 0.09 * len(rels) * len(rows) + 1.5)))
    for k, (label, scores) in enumerate(rows.items()):
        ys = [i - 0.4 + height * (k + 0.5) for i in range(len(rels))]
        ax.barh(ys, [100 * scores.get(r, 0.0) for r in rels], height=height, label=label)
    ax.set_yticks(range(len(rels)))
    ax.set_yticklabels([relations.names.get(r, r) for r in rels], fontsize=8)
    ax.set_ylim(
        len(rels) - 0.5, -0.5
    )  # the most frequent relation at the top, each group's rows in legend order
    ax.set_xlim(0, 100)
    ax.set_xlabel("F1 (%)")
    ax.set_ylabel("relation (most training facts first)")
    ax.grid(axis="x", alpha=0.3)
    # above the axes, not on them: any corner of the axes may hold a long bar
    ax.legend(
        fontsize=7,
        loc="lower center",
        bbox_to_anchor=(0.5, 1.0),
        ncol=2,
        frameon=False,
        title="Per-relation F1",
        title_fontsize=11,
    )
    return _save(fig, path)


def learning_curve(plt, results: dict[str, Any], path: Path) -> Path | None:
    """Relation F1 against LLM training tokens (log scale), one line per adapter kind, with each point's 95%
    bootstrap interval over the documents as an error bar."""
    points = results.get("learning_curve") or []
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    labels = {"rc": "rc adapter, gold pairs (RC stage)", "direct": "direct, all pairs"}
    for kind in dict.fromkeys(p["kind"] for p in points):
        pts = sorted((p for p in points if p["kind"] == kind), key=lambda p: p["budget_tokens"])
        f1 = [100 * p["f1"] for p in pts]
        spread = [p.get("f1_interval") or [p["f1"], p["f1"]] for p in pts]
        below = [y - 100 * lo for y, (lo, _) in zip(f1, spread)]
        above = [100 * hi - y for y, (_, hi) in zip(f1, spread)]
        ax.errorbar(
            [p["budget_tokens"] for p in pts],
            f1,
            yerr=[below, above],
            marker="o",
            capsize=3,
            label=labels.get(kind, kind),
        )
    ax.set_xscale("log")
    ax.set_xlabel("LLM training tokens")
    ax.set_ylabel("relation F1 (%)")
    ax.set_title("Learning curve (constrained answers)")
    ax.legend()
    return _save(fig, path)


def theta(plt, results: dict[str, Any], path: Path) -> Path | None:
    curves = results["theta"]["f1"]
    if not curves:
        return None
    thetas = results["theta"]["thetas"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for mode, f1 in curves.items():
        ax.plot(thetas, [100 * x for x in f1], marker="o", label=mode)
    ax.set_xlabel("SBERT similarity threshold theta")
    ax.set_ylabel("F1 (%)")
    ax.set_title("F1 against theta (relation names mapped by SBERT)")
    ax.legend()
    return _save(fig, path)


def candidates(plt, results: dict[str, Any], path: Path) -> Path | None:
    curve = results["candidate_curve"]
    if not curve:
        return None
    x = [100 * p["share_of_pairs"] for p in curve]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(x, [100 * p["recall"] for p in curve], marker="o", color="tab:blue", label="pair recall")
    ax.set_xlabel("candidates kept (% of all pairs), by stage-1 threshold")
    ax.set_ylabel("stage-1 pair recall (%)", color="tab:blue")
    if "prompt_tokens_per_doc" in curve[0]:
        ax2 = ax.twinx()
        ax2.plot(x, [p["prompt_tokens_per_doc"] for p in curve], marker="s", color="tab:red")
        ax2.set_ylabel("LLM prompt tokens per document", color="tab:red")
    ax.set_title("Stage-1 candidate threshold: recall vs LLM cost")
    return _save(fig, path)


def draw_all(out: Path, results: dict[str, Any], relations: RelationSet) -> tuple[list[Path], list[str]]:
    """The pictures written, and the names of those skipped (no matplotlib, or nothing to draw)."""
    names = ("per_relation.png", "theta.png", "candidates.png", "learning_curve.png")
    plt = _pyplot()
    if plt is None:
        log.warning("matplotlib is not installed (pip install 'lmrc[plot]'): pictures skipped")
        return [], list(names)
    drawn, skipped = [], []
    for name, draw in zip(
        names,
        (
            lambda p: per_relation(plt, results, relations, p),
            lambda p: theta(plt, results, p),
            lambda p: candidates(plt, results, p),
            lambda p: learning_curve(plt, results, p),
        ),
    ):
        path = draw(out / name)
        plt.close("all")
        (drawn if path is not None else skipped).append(path if path is not None else name)
    return drawn, skipped
