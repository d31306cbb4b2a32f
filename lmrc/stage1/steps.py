"""How stage 1's optimizer steps are made: where a run stands (`Position`, saved with the resume state), the
micro-batches of an epoch, each process's share of a step's group, and the optimizer with its schedule.

Gradient accumulation and several processes: the micro-batches of an epoch (`batch_size` documents each; one
order for all processes) are taken in groups of `grad_accum * processes`; each process runs every
`processes`-th micro-batch of a group and each micro-batch's loss (a mean over its pairs) is divided by the size
of its group, so every optimizer step sees the mean of its group's micro-batch losses, including the shorter last
group of an epoch. N processes with `grad_accum` k thus take the same optimizer steps over the same documents as
one process with `grad_accum` N*k (the global batch). A process left without a micro-batch in a short last group
runs a zero-weighted one, so that all processes join the same gradient reductions.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lmrc.stage1.config import TrainConfig
from lmrc.stage1.features import DocFeatures, length_grouped_batches
from lmrc.training.schedule import linear_schedule


@dataclass
class Position:
    """Where the run stands; saved as `last/trainer_state.json`."""

    epoch: int = 0  # current epoch (0-based)
    batch_pos: int = 0  # index of the next micro-batch in this epoch's order (a group boundary)
    global_step: int = 0  # optimizer steps taken
    eval_pending: bool = False  # an evaluation is due at this point (it was interrupted, or not yet run)
    best_value: float | None = None
    best_step: int | None = None
    bad_evals: int = 0  # evaluations since the last improvement (early-stopping patience)
    loss_sum: float = 0.0  # sum of step losses since the last evaluation
    loss_steps: int = 0
    elapsed_s: float = 0.0
    done: bool = False
    stopped_early: bool = False
    steps_per_epoch: int = 0
    total_steps: int = 0
    last_eval_step: int | None = None  # the step of the latest evaluation (an epoch's end does not repeat it)

    def has_written(self, record: dict) -> bool:
        """Whether the run had written the metrics.jsonl `record` when it stood here (a resumed run forgets the
        records written after its saved state: those steps and evaluations run again)."""
        step = record.get("step", 0)
        return self.global_step > 0 and (
            step < self.global_step or (step == self.global_step and not self.eval_pending)
        )


def epoch_batches(features: Sequence[DocFeatures], cfg: TrainConfig, epoch: int) -> list[list[int]]:
    """The micro-batches of an epoch, in one order for all processes (a pure function of seed and epoch)."""
    if cfg.length_grouped:
        return length_grouped_batches(features, cfg.batch_size, seed=cfg.seed + epoch)
    order = list(
        range(len(features))
    )  # ATLOP's DataLoader(shuffle=True): a seeded permutation cut into batches
    random.Random(cfg.seed + epoch).shuffle(order)
    return [order[i : i + cfg.batch_size] for i in range(0, len(order), cfg.batch_size)]


def steps_per_epoch(n_batches: int, group_size: int) -> int:
    return math.ceil(n_batches / group_size)


def rank_share(group: list[list[int]], world: int, rank: int) -> list[tuple[list[int], int, int]]:
    """This process's micro-batches of one step's group, each with its loss weight (num, den): every process runs
    the same number (DDP reduces in lockstep); a missing one is the group's first, weighted 0. The weights make
    the gradient averaged over the processes the mean over the group's micro-batches."""
    mine = group[rank::world]
    passes = math.ceil(len(group) / world)
    return [
        (mine[j], world, len(group)) if j < len(mine) else (group[0], 0, len(group)) for j in range(passes)
    ]


def make_optimizer(
    model, cfg: TrainConfig, total_steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW with one learning rate for the encoder and one for the heads, warmup then linear decay (ATLOP)."""
    enc = [p for p in model.encoder_parameters() if p.requires_grad]
    head = [p for p in model.head_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        [{"params": enc, "lr": cfg.lr_encoder}, {"params": head, "lr": cfg.lr_head}],
        eps=cfg.adam_eps,
        weight_decay=cfg.weight_decay,
    )
    warmup = int(cfg.warmup_ratio * total_steps)  # ATLOP: warmup_steps = int(total * ratio)
    return optimizer, linear_schedule(optimizer, warmup, total_steps)
