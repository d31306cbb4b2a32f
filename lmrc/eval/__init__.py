"""The DocRED scorer (official `evaluation.py` semantics) and its report; pure Python, no models."""

from lmrc.eval.metrics import (
    Counts,
    IgnScore,
    Metrics,
    Score,
    TrainReference,
    check_predictions,
    evaluate,
    load_predictions,
    pair_locality,
)
from lmrc.eval.report import format_table

__all__ = [
    "Counts",
    "IgnScore",
    "Metrics",
    "Score",
    "TrainReference",
    "check_predictions",
    "evaluate",
    "format_table",
    "load_predictions",
    "pair_locality",
]
