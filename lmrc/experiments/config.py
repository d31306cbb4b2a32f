"""The `lmrc compare` config: one dataclass per YAML section; defaults are the paper's settings where it has one.

A YAML file only overrides (`--config`, `--set key=value`); the resolved config is written to `results.json`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from lmrc.config import load_config
from lmrc.stage1.config import CandidateSettings

ALL_MODES = ("stage1-only", "direct", "classifier-llm")  # in the order of the table's rows
LLM_MODES = ("direct", "classifier-llm")  # the modes whose rows come from an LLM


@dataclass
class ModelSpec:
    """A model a row needs (`stage1`, `rc`, `direct`): a trained one, or trained here from its config."""

    path: str | None = None  # a trained model to reuse (stage-1 checkpoint or stage-2 adapter folder)
    config: str | None = None  # its training config, when `path` is not given
    set: list[str] = field(default_factory=list)  # overrides of that config (as --set)


@dataclass
class DataSpec:
    """A training / tuning split that compare makes itself (so a fresh clone needs no `lmrc data split`)."""

    train: str | None = None  # labelled documents; None: the models' configs name their own data
    max_docs: int | None = None  # keep this many documents of it (after the seeded shuffle)
    tune_fraction: float = 0.1  # the tuning split: model selection and the recall-target calibration
    seed: int = 13

    def __post_init__(self) -> None:
        if not 0.0 <= self.tune_fraction < 1.0:
            raise ValueError("data.tune_fraction must be in [0, 1)")
        if self.max_docs is not None and self.max_docs < 2:
            raise ValueError("data.max_docs must be at least 2")


@dataclass
class EvalSpec:
    """The documents every row is scored on (labelled), and the training documents the scores refer to."""

    docs: str = "${LMRC_DATA_DIR}/redocred/dev_50.json"
    max_docs: int | None = None  # the first N documents; None: all
    indices: list[int] | None = None  # or these documents (0-based positions in the file)
    train: str | None = "${LMRC_DATA_DIR}/redocred/train_450.json"  # Ign F1, frequent / long-tail, plot order

    def __post_init__(self) -> None:
        if self.max_docs is not None and self.max_docs < 1:
            raise ValueError("eval.max_docs must be at least 1")
        if self.indices is not None and self.max_docs is not None:
            raise ValueError("eval: give max_docs or indices, not both")


@dataclass
class Variant:
    """A further row: a mode run with other `lmrc predict` settings (e.g. constrained answers, refine)."""

    name: str
    mode: str = "classifier-llm"
    set: list[str] = field(default_factory=list)  # overrides of the mode's predict config (`--set` keys)

    def __post_init__(self) -> None:
        if self.mode not in LLM_MODES:
            raise ValueError(f"variant {self.name!r}: mode must be one of {', '.join(LLM_MODES)}")
        if not self.name.strip() or "/" in self.name:
            raise ValueError(f"variant name {self.name!r}: a non-empty name without '/'")


@dataclass
class LearningCurveSpec:
    """Relation F1 against LLM training tokens (the curve a user with a GPU reads the budget from): for every
    budget an rc and a direct adapter, rc asked about the gold pairs (LMRC's "RC stage" ablation) and direct about
    all pairs, both with grammar-constrained answers by default.

    The adapters (`adapters`): `separate` (default) trains one per budget with `train.max_tokens` = the budget,
    each with its own full schedule (what a user training to that budget gets; the config's own adapters serve
    their budget); `snapshots` takes them from the config's own adapters' runs, kept on the way
    (`train.snapshot_tokens`): no token trained twice, but a smaller budget's point is an adapter mid-schedule,
    its learning rate not yet decayed."""

    budgets: list[int] = field(default_factory=list)  # LLM training tokens; empty: no curve
    kinds: list[str] = field(default_factory=lambda: ["rc", "direct"])
    adapters: str = "separate"  # separate | snapshots
    constrained: bool = True
    # the first N evaluation documents (None: all): direct asks about every pair, the costly part on a CPU
    max_docs: int | None = None
    direct_max_docs: int | None = None  # direct's points on fewer of them (None: max_docs)

    def __post_init__(self) -> None:
        for name in ("max_docs", "direct_max_docs"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"learning_curve.{name} must be at least 1")
        if any(b < 1 for b in self.budgets) or len(set(self.budgets)) != len(self.budgets):
            raise ValueError("learning_curve.budgets: distinct positive token counts")
        if self.adapters not in ("separate", "snapshots"):
            raise ValueError(f"learning_curve.adapters: separate or snapshots, not {self.adapters!r}")
        bad = [k for k in self.kinds if k not in ("rc", "direct")]
        if bad or not self.kinds:
            raise ValueError(f"learning_curve.kinds: rc and/or direct, not {bad[0] if bad else 'nothing'!r}")


@dataclass
class CompareConfig:
    eval: EvalSpec = field(default_factory=EvalSpec)
    data: DataSpec = field(default_factory=DataSpec)
    stage1: ModelSpec = field(default_factory=ModelSpec)
    rc: ModelSpec = field(default_factory=ModelSpec)
    direct: ModelSpec = field(default_factory=ModelSpec)
    # stage 1's candidate rule for the LLM (classifier-llm rows); `tune` defaults to the split made by `data`
    candidates: CandidateSettings = field(default_factory=CandidateSettings)
    modes: list[str] = field(default_factory=lambda: list(ALL_MODES))
    variants: list[Variant] = field(default_factory=list)
    # Rows with the LLM's relation names mapped by SBERT (LMRC Appendix B) beside the strict rows.
    sbert: bool = True
    theta: float = 0.55  # LMRC Appendix B
    thetas: list[float] = field(default_factory=lambda: [0.3, 0.4, 0.5, 0.55, 0.6, 0.7, 0.8, 0.9, 1.0])
    stage2_overrides: dict[str, Any] = field(default_factory=dict)  # predict-time settings of both adapters
    docs_per_batch: int = 4
    candidate_points: int = 9  # thresholds on candidates.png
    learning_curve: LearningCurveSpec = field(default_factory=LearningCurveSpec)

    def __post_init__(self) -> None:
        unknown = [m for m in self.modes if m not in ALL_MODES]
        if unknown:
            raise ValueError(f"modes: unknown mode {unknown[0]!r} (expected {', '.join(ALL_MODES)})")
        if not self.modes:
            raise ValueError("modes: name at least one mode")
        names = [v.name for v in self.variants]
        clash = [n for n in names if n in ALL_MODES or names.count(n) > 1]
        if clash:
            raise ValueError(f"variants: name {clash[0]!r} is taken (a mode or another variant)")
        missing = [v.name for v in self.variants if v.mode not in self.modes]
        if missing:
            raise ValueError(f"variant {missing[0]!r}: its mode is not in modes")


def load_compare_config(path: str | os.PathLike | None, overrides: Sequence[str] = ()) -> CompareConfig:
    """Defaults <- YAML <- `--set` overrides."""
    return load_config(CompareConfig, path, overrides)
