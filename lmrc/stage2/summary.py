"""`train_summary.json`: what a stage-2 run trained on as a whole (over every call, interrupted or resumed) and
what this call did."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmrc.io import atomic_write_json
from lmrc.machine.hardware import gpu_memory
from lmrc.stage2.budget import StepPlan, tokens_for_steps
from lmrc.stage2.config import Stage2Config
from lmrc.stage2.examples import ExampleStats
from lmrc.stage2.modeling import resolve_dtype

SUMMARY_FILE = "train_summary.json"


@dataclass(frozen=True)
class RunSummary:
    """The facts of a run that do not depend on the call; `write` adds the call's."""

    cfg: Stage2Config
    stats: ExampleStats
    documents: int
    lengths: Sequence[int]  # of the examples, in tokens
    world: int  # processes
    plan: StepPlan
    device: Any
    engine: str

    def write(
        self, steps: int, seconds: float = 0.0, tokens: int = 0, final_loss: float | None = None
    ) -> None:
        """`steps`: done in total; `seconds`, `tokens`: this call's; `final_loss`: the last step's."""
        summary = {
            "finished": steps >= self.plan.total_steps,
            "examples": self.stats.to_dict(),
            "documents": self.documents,
            "steps": steps,
            "total_steps": self.plan.total_steps,
            "steps_per_epoch": self.plan.per_epoch,
            "tokens_trained": tokens_for_steps(
                self.lengths, self.cfg, self.world, steps
            ),  # all calls together
            "seconds_this_call": round(seconds, 2),
            "tokens_this_call": tokens,
            "tokens_per_s": round(tokens / seconds, 2) if seconds > 0 else None,
            "final_loss": final_loss,
            "device": str(self.device),
            "processes": self.world,
            "engine": self.engine,
            "dtype": str(resolve_dtype(self.cfg.dtype, self.device)).replace("torch.", ""),
            "gpu_memory": gpu_memory(),
        }
        atomic_write_json(Path(self.cfg.output_dir) / SUMMARY_FILE, summary, indent=2)
