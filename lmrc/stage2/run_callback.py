"""The Trainer callback that keeps a stage-2 run folder while the Trainer trains.

- `metrics.jsonl`: one record per optimizer step (every `train.log_every_steps`), written by rank 0;
- `last/`: the Trainer's checkpoint (adapter safetensors, optimizer, scheduler, per-rank RNG, trainer state) moved
  into place after every save, with `state.json` (written last) marking it complete; `--resume` continues it;
- snapshots: at the steps of `train.snapshot_tokens` a save is asked for, and the snapshot copied from it;
- interrupts: Ctrl-C or SIGTERM on any rank (or KeyboardInterrupt raised by `on_step`) sets a flag that all ranks
  agree on at the step's end; the run then saves that step and stops.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from lmrc.io import append_jsonl, atomic_write_json, read_jsonl, replace_dir
from lmrc.stage2.budget import StepPlan
from lmrc.stage2.trainer import AnswerLossTrainer
from lmrc.training.run_folder import StopRequest

log = logging.getLogger(__name__)

STATE_DIR = "last"
STATE_FILE = "state.json"  # in last/: {"step", "total_steps"}
METRICS_FILE = "metrics.jsonl"


class RunCallback(TrainerCallback):
    """Our per-step record, the saves the run needs (periodic, snapshot, final, interrupt), `last/` in place;
    the Trainer it watches trains inside `watching`."""

    def __init__(
        self,
        out: Path,
        plan: StepPlan,
        log_every: int,
        stop_at: int,
        on_step: Callable[[dict], None] | None = None,
        snapshots: dict[int, Callable[[Path], None]] | None = None,
    ) -> None:
        self.out, self.plan, self.log_every, self.stop_at = out, plan, log_every, stop_at
        self.on_step = on_step
        self.interrupt = StopRequest()
        self.snapshots = snapshots or {}  # optimizer step -> writes the snapshot from that step's checkpoint
        self.trainer: AnswerLossTrainer | None = None
        self.losses: list[float] = []  # of every step this call
        self.tokens = 0  # non-padding tokens of this call, all ranks
        self.interrupted = False
        self.seconds = 0.0  # that the Trainer trained
        self.start = time.perf_counter()
        self.running: float | None = None

    @contextmanager
    def watching(self, trainer: AnswerLossTrainer) -> Iterator[None]:
        """While `trainer` trains: Ctrl-C / SIGTERM stop it at the end of a step; the time it takes."""
        self.trainer = trainer
        start = time.perf_counter()
        with self.interrupt:
            yield
        self.seconds = time.perf_counter() - start

    @property
    def final_loss(self) -> float | None:
        """The loss of the run's last step so far."""
        return self.losses[-1] if self.losses else last_logged_loss(self.out)

    @property
    def main(self) -> bool:
        return bool(self.trainer.accelerator.is_main_process)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kw: Any) -> Any:
        if not logs or "loss" not in logs or "train_loss" in logs:
            return control
        step = state.global_step
        record = {
            "step": step,
            "epoch": round(step / self.plan.per_epoch, 4),
            "loss": float(logs["loss"]),
            "lr": float(logs.get("learning_rate", 0.0)),
            "grad_norm": float(logs["grad_norm"]) if logs.get("grad_norm") is not None else None,
        }
        stop = self._call_hook(record) or self.interrupt.requested
        local, self.trainer.local_tokens = self.trainer.local_tokens, 0
        stop, tokens = self._agree(stop, local)
        self.tokens += tokens
        self._log_step(record)
        if stop:
            self.interrupted = True
            log.warning("interrupted: saving the state after step %d to %s", step, self.out / STATE_DIR)
        if step in self.snapshots:
            control.should_save = True  # the snapshot is copied from this step's checkpoint
        if stop or step >= self.stop_at:
            control.should_save = True
            control.should_training_stop = True
        return control

    def on_save(self, args: Any, state: Any, control: Any, **kw: Any) -> Any:
        self.publish_checkpoint(state.global_step)
        return control

    def _call_hook(self, record: dict) -> bool:
        """Give `on_step` the record; True when it raised KeyboardInterrupt (handled like Ctrl-C)."""
        try:
            if self.on_step is not None:
                self.on_step(dict(record))
        except KeyboardInterrupt:
            return True
        return False

    def _agree(self, flag: bool, tokens: int) -> tuple[bool, int]:
        """Every rank's interrupt flag and token count, in one collective: any rank's interrupt stops all."""
        acc = self.trainer.accelerator
        if acc.num_processes == 1:
            return flag, tokens
        g = acc.gather(torch.tensor([[float(flag), float(tokens)]], device=acc.device))
        return bool(g[:, 0].max() > 0), int(g[:, 1].sum())

    def _log_step(self, record: dict) -> None:
        step, loss = record["step"], record["loss"]
        elapsed = time.perf_counter() - self.start
        record["tokens_per_s"] = round(self.tokens / elapsed, 2) if elapsed > 0 else None
        record["elapsed_s"] = round(elapsed, 2)
        self.losses.append(loss)
        self.running = loss if self.running is None else 0.9 * self.running + 0.1 * loss
        if self.main and (step % self.log_every == 0 or step == self.plan.total_steps):
            append_jsonl(self.out / METRICS_FILE, record)
            log.info(
                "step %d/%d loss %.4f (running %.4f) lr %.2e %s tokens/s",
                step, self.plan.total_steps, loss, self.running, record["lr"], record["tokens_per_s"],
            )  # fmt: skip

    def publish_checkpoint(self, step: int) -> None:
        """Move the Trainer's `checkpoint-<step>` (complete on every rank) into `last/`, on rank 0."""
        acc = self.trainer.accelerator
        acc.wait_for_everyone()
        if self.main:
            src = self.out / f"{PREFIX_CHECKPOINT_DIR}-{step}"
            atomic_write_json(
                src / STATE_FILE, {"step": step, "total_steps": self.plan.total_steps}, indent=2
            )
            if step in self.snapshots:
                self.snapshots[step](src)
            replace_dir(src, self.out / STATE_DIR)
        acc.wait_for_everyone()


def last_logged_loss(out: Path) -> float | None:
    """The loss of the last step in `out`'s metrics.jsonl (for a call that trained nothing: a finished run
    asked to resume)."""
    records = read_jsonl(out / METRICS_FILE)
    return records[-1].get("loss") if records else None
