"""Stage 2's step plan: optimizer steps per epoch, the run's length, and the token budget as a step count.

The batch order depends on (seed, epoch) only (`length_grouped_batches`), so the LLM tokens of every optimizer
step are known before training starts: `train.max_tokens` and `train.snapshot_tokens` become step numbers, and
two adapters given the same budget see the same number of tokens (the comparison's fair budget for rc vs direct).
Each rank takes every `world`-th batch (the last round wraps around to the first batches, as accelerate's even
batches do), `grad_accum` of them an optimizer step.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from lmrc.stage2.config import Stage2Config
from lmrc.training.schedule import length_grouped_batches

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepPlan:
    """How long the run is, in optimizer steps, for this data, config and number of processes."""

    per_epoch: int
    total_steps: int
    warmup: int

    def stop_at(self, start_step: int, stop_after_steps: int | None) -> int:
        """The step a call that starts at `start_step` stops at: the run's last, or `stop_after_steps` later."""
        if stop_after_steps is None:
            return self.total_steps
        return min(self.total_steps, start_step + stop_after_steps)


def plan_steps(lengths: Sequence[int], cfg: Stage2Config, world: int) -> StepPlan:
    """Epochs, then `train.max_steps` and `train.max_tokens`, whichever ends the run first."""
    n_batches = len(length_grouped_batches(lengths, cfg.train.batch_size, cfg.train.seed))
    per_epoch = steps_per_epoch(n_batches, cfg.train.grad_accum, world)
    total_steps = per_epoch * (cfg.train.epochs or 1)
    if cfg.train.max_steps is not None:
        total_steps = min(total_steps, cfg.train.max_steps)
    if cfg.train.max_tokens is not None:
        total_steps = min(total_steps, steps_for_tokens(lengths, cfg, world, cfg.train.max_tokens))
    warmup = cfg.train.warmup_steps or 0
    if warmup >= total_steps:
        log.warning(
            "warmup_steps=%d >= %d training steps: the learning rate never reaches train.lr",
            warmup,
            total_steps,
        )
    return StepPlan(per_epoch, total_steps, warmup)


def steps_per_epoch(n_batches: int, grad_accum: int, world: int) -> int:
    """Optimizer steps in an epoch of `n_batches` micro-batches shared by `world` ranks."""
    local = math.ceil(n_batches / world)
    return max(1, math.ceil(local / grad_accum))


def step_batches(n_batches: int, step_in_epoch: int, grad_accum: int, world: int) -> list[int]:
    """Indices into an epoch's batch order of the micro-batches of one optimizer step, over all ranks."""
    local = math.ceil(n_batches / world)
    out = []
    for k in range(step_in_epoch * grad_accum, min(local, (step_in_epoch + 1) * grad_accum)):
        out.extend((k * world + r) % n_batches for r in range(world))
    return out


def steps_for_tokens(lengths: Sequence[int], cfg: Stage2Config, world: int, budget: int) -> int:
    """The first step at which the sequences trained on (prompt + answer tokens, no padding, all ranks) reach
    `budget`; the run's last step when they never do."""
    seen, step = 0, 0
    for step, tokens in enumerate(_tokens_per_step(lengths, cfg, world), start=1):
        seen += tokens
        if seen >= budget:
            return step
    return step


def tokens_for_steps(lengths: Sequence[int], cfg: Stage2Config, world: int, steps: int) -> int:
    """The LLM tokens (prompt + answer, no padding, all ranks) of the first `steps` optimizer steps: what a run
    trained on, however many calls (interruptions, resumes) it took."""
    return sum(itertools.islice(_tokens_per_step(lengths, cfg, world), steps))


def _tokens_per_step(lengths: Sequence[int], cfg: Stage2Config, world: int) -> Iterator[int]:
    """Tokens of every optimizer step in training order."""
    bs, ga = cfg.train.batch_size, cfg.train.grad_accum
    for epoch in range(cfg.train.epochs or 1):
        batches = length_grouped_batches(lengths, bs, cfg.train.seed + epoch)
        for in_epoch in range(steps_per_epoch(len(batches), ga, world)):
            yield sum(lengths[j] for k in step_batches(len(batches), in_epoch, ga, world) for j in batches[k])
