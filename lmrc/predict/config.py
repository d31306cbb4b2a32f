"""Pipeline configuration (`lmrc predict`): which models, which mode, how candidates are chosen, batch size.

The command-line flags (`--stage1`, `--stage2`, `--mode`, `--threshold`, ...) set the same keys as a YAML
`--config` or `--set key=value`; flags win. Stage 1's candidate rule is lmrc.stage1.config.CandidateSettings. Stage-2 settings of the adapter's own config (generation, alignment)
are overridden under `stage2.overrides`, e.g. `--set stage2.overrides.align.relation_mapping=sbert`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lmrc.config import replace_nested
from lmrc.stage1.config import CandidateSettings
from lmrc.stage2.config import Stage2Config

# classifier-llm: stage-1 candidates -> an rc adapter (LMRC); direct: a direct adapter over all pairs (the
# baseline); stage1-only: the multi-label head's own relations.
MODES = ("classifier-llm", "direct", "stage1-only")


@dataclass
class Stage1Settings(CandidateSettings):
    """Where the pairs the LLM is asked about come from: a stage-1 checkpoint run with the candidate rule (the
    fields of CandidateSettings, `stage1.threshold` and so on), a candidates file, or the gold pairs."""

    checkpoint: str | None = None  # stage-1 checkpoint folder (or training folder)
    candidates: str | None = None  # a candidates file written earlier, instead of running a checkpoint
    # Instead of stage 1: ask the LLM about each document's gold relation pairs (needs labels; the LMRC
    # ablation's "RC stage" setting, `lmrc stage2 predict --gold-pairs`).
    gold_pairs: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if (self.checkpoint is not None) + (self.candidates is not None) + self.gold_pairs > 1:
            raise ValueError("give one of stage1.checkpoint, stage1.candidates and stage1.gold_pairs")


@dataclass
class Stage2Settings:
    """The adapter, and the settings of its own config to change for this run (`overrides`, a part of the
    adapter's config.yaml: `{generation: {batch_size: 4}}`); settings fixed by training cannot change."""

    adapter: str | None = None  # folder written by `lmrc stage2 train` (rc or direct)
    overrides: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Checked and typed now, against the stage-2 config's fields: a misspelt key fails before a model loads.
        replace_nested(Stage2Config(), self.overrides, "stage2.overrides")


FUSIONS = ("none", "refine")
REFINE_ADDITIONS = ("any", "calibrated")


@dataclass
class RefineConfig:
    """Refine-and-fuse (after "Refiner", NAACL 2025): the LLM decides only the pairs stage 1 is unsure about.

    Candidates come from the stage-1 threshold as usual (the lower threshold). Pairs scored above an upper
    threshold keep stage 1's relations without an LLM call; the upper threshold is the lowest score at which
    stage 1's relations reach `precision` on the tuning file (`stage1.tune`), or `upper` when given.
    """

    precision: float = 0.9
    upper: float | None = None  # a fixed upper threshold instead of the calibrated one
    # Fusion in the uncertain band: also keep a stage-1 relation the LLM did not name when its margin is above
    # this value (None: the LLM alone decides the band).
    keep_margin: float | None = None
    # The LLM's relations in the band that stage 1 does not predict: "any" (the LLM decides) or "calibrated":
    # only stage 1's near misses above a margin chosen on the tuning file, where adding them all would raise F1
    # (lmrc.stage1.calibration.calibrate_additions); the LLM then confirms among them.
    additions: str = "any"

    def __post_init__(self) -> None:
        if not 0.0 < self.precision <= 1.0:
            raise ValueError("refine.precision must be in (0, 1]")
        if self.additions not in REFINE_ADDITIONS:
            raise ValueError(f"refine.additions must be one of {REFINE_ADDITIONS}, got {self.additions!r}")


@dataclass
class PredictConfig:
    mode: str | None = None  # None: inferred from the models given
    stage1: Stage1Settings = field(default_factory=Stage1Settings)
    stage2: Stage2Settings = field(default_factory=Stage2Settings)
    # Documents per batch: stage 1 runs on a batch, then stage 2 on its candidates, then the batch is saved.
    # Part of a run's identity: resumed runs and shards must use the same value.
    docs_per_batch: int = 8
    train: str | None = None  # training documents for Ign F1 when the input is labelled
    # classifier-llm: "none" (LMRC: the LLM decides every candidate) or "refine" (see RefineConfig).
    fusion: str = "none"
    refine: RefineConfig = field(default_factory=RefineConfig)

    def __post_init__(self) -> None:
        if self.fusion not in FUSIONS:
            raise ValueError(f"unknown fusion {self.fusion!r} (expected one of {', '.join(FUSIONS)})")
        if self.mode is not None and self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r} (expected one of {', '.join(MODES)})")
        if self.docs_per_batch < 1:
            raise ValueError("docs_per_batch must be at least 1")
