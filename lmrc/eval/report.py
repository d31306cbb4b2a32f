"""Plain-text tables of scorer results (percentages with two decimals, as papers report them)."""

from __future__ import annotations

from collections.abc import Mapping

from lmrc.eval.metrics import Metrics, Score

_COLUMNS = f"{'P':>8}{'R':>8}{'F1':>8}{'correct':>10}{'predicted':>11}{'gold':>8}"
_LABEL = 22  # width of the label column of the headline table
_REL_LABEL = 44  # per-relation rows: "P1001 applies to jurisdiction"


def _row(label: str, s: Score, width: int = _LABEL) -> str:
    return (
        f"{label[: width - 1]:<{width}}{100 * s.precision:>8.2f}{100 * s.recall:>8.2f}{100 * s.f1:>8.2f}"
        f"{s.correct:>10,}{s.predicted:>11,}{s.gold:>8,}"
    )


def format_table(
    m: Metrics, relation_names: Mapping[str, str] | None = None, per_relation: bool = False
) -> str:
    """The headline table; with `per_relation`, one row per relation after it."""
    c = m.counts
    lines = [
        f"{c.predictions:,} predictions ({c.duplicates:,} duplicates removed, {c.unknown_title:,} for titles not in "
        f"gold, {c.invalid_pair:,} with an invalid entity pair) vs {c.gold_facts:,} gold facts in "
        f"{c.documents:,} documents",
        "",
        " " * _LABEL + _COLUMNS,
        _row("relation", m.relation),
        f"{'ign':<22}{100 * m.ign.precision:>8.2f}{100 * m.ign.recall:>8.2f}{100 * m.ign.f1:>8.2f}"
        f"  ({m.ign.correct_in_train:,} correct facts seen in train)",
        _row("evidence", m.evidence),
        _row("intra-sentence", m.intra),
        _row("inter-sentence", m.inter),
    ]
    if m.frequent is not None and m.long_tail is not None and m.frequent_relations is not None:
        lines.append(_row(f"frequent ({len(m.frequent_relations)})", m.frequent))
        lines.append(_row("long-tail", m.long_tail))
    else:
        lines.append("")
        lines.append("no train files: Ign equals the ordinary scores; frequent / long-tail not computed")
    if per_relation and m.per_relation:
        names = relation_names or {}
        lines += ["", f"{'relation':<{_REL_LABEL}}{_COLUMNS}"]
        for rid, s in m.per_relation.items():
            lines.append(_row(f"{rid} {names[rid]}" if rid in names else rid, s, _REL_LABEL))
    return "\n".join(lines)
