"""Stage-1 training (`lmrc stage1 train`): AdamW, warmup + linear decay, selection on a tuning file, exact resume.

The recipe is ATLOP's (Zhou et al., 2021, Sec. 4.1), which LMRC's stage 1 follows (LMRC Appendix A, Table 6):
AdamW without weight decay, separate learning rates for the encoder and the heads, a linear warmup over the
first 6% of the optimizer steps then a linear decay to 0, gradients clipped to norm 1.0, batches of 4
documents. Batches group documents of similar length (less padding), in a seeded order per epoch; how a step's
micro-batches are dealt to processes and accumulated is in lmrc/stage1/steps.py.

Output folder::

    config.yaml      the resolved config
    train.log        written by the CLI (library code only logs)
    metrics.jsonl    one line per evaluation on the tuning file
    best/            the checkpoint selected by `train.select_metric` (see checkpoint.py)
    last/            the latest checkpoint + optimizer, scheduler, RNG and position: what `--resume` reads

Exact resume: `last/` is written at optimizer-step boundaries (every epoch, every `save_every_steps` steps, and
on an interrupt), holding the state as it was right after that step: weights, optimizer and scheduler, every
RNG, and the position (epoch, micro-batch index in the epoch's batch order, which is a pure function of the seed
and the epoch). Continuing from it replays what the uninterrupted run does next, bit for bit with
`train.deterministic` on the same hardware (without it, multi-threaded CPU backward kernels make even two
uninterrupted runs differ in the last bits).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import gather_object

from lmrc.config import save_config
from lmrc.errors import LmrcError
from lmrc.io import append_jsonl, recover_dir
from lmrc.machine.hardware import gpu_memory_line
from lmrc.progress import Progress
from lmrc.stage1.accelerator import (
    global_loss,
    scaler_state,
    seed_everything,
    start_accelerator,
    torch_settings,
)
from lmrc.stage1.checkpoint import (
    META_FILE,
    build_model,
    model_arguments,
    restore_training_state,
    save_checkpoint,
)
from lmrc.stage1.config import Stage1Config, check_loss_name
from lmrc.stage1.encoder import load_encoder
from lmrc.stage1.features import collate
from lmrc.stage1.losses import build_loss
from lmrc.stage1.small_corpus import check_evaluation, finish_run, prepare_run
from lmrc.stage1.steps import Position, epoch_batches, make_optimizer, rank_share, steps_per_epoch
from lmrc.stage1.train_data import load_train_data
from lmrc.stage1.tune_eval import eval_record, select_metric, tune_metrics_on_every_rank
from lmrc.training.run_folder import (
    CONFIG_FILE,
    POSITION_FILE,
    ResumeState,
    StopRequest,
    capture_rng,
    forget_records_after,
    open_run,
)

log = logging.getLogger(__name__)

# Config keys that may differ between a run and its `--resume` without changing what is computed.
RESUMABLE_CHANGES = frozenset(
    {
        "output_dir",
        "train.num_threads",
        "train.log_every_steps",
        "train.save_every_steps",
        "train.eval_batch_size",
        "train.deterministic",
        "train.ddp_timeout",
    }
)


@dataclass
class Stage1TrainResult:
    """What a stage-1 training call did and where its checkpoints are."""

    output_dir: Path
    best_dir: Path
    select_metric: str
    best_value: float | None
    best_step: int | None
    global_step: int
    total_steps: int
    epochs_completed: int
    step_losses: list[tuple[int, float]]  # (optimizer step, loss) of the steps run by this call
    evaluations: list[dict[str, Any]]  # the metrics.jsonl records written by this call
    stopped_early: bool
    finished: bool
    elapsed_s: float  # training time over all invocations of this run
    warnings: list[str] = field(default_factory=list)  # the end check's (small_corpus.py; train_summary.json)


def train(
    config: Stage1Config, *, resume: bool = False, stop_after_steps: int | None = None
) -> Stage1TrainResult:
    """Train stage 1 as configured; with `resume`, continue the run in `config.output_dir` exactly.

    `stop_after_steps`: save the resumable state and return after this many optimizer steps of this call (a
    time box for long runs on shared machines; `--resume` continues).
    """
    check_loss_name(config.loss.name, "config: loss.name")
    if stop_after_steps is not None and stop_after_steps < 1:
        raise LmrcError(f"stop_after_steps must be at least 1, got {stop_after_steps}")
    recipe = Stage1Recipe(config)
    with torch_settings(config.train.num_threads, config.train.deterministic):
        if recipe.setup(resume):
            with recipe.saving_on_interrupt():
                recipe.train(stop_after_steps)
    return recipe.result()


class Stage1Recipe:
    """One training call: `setup` (processes, run folder, data, model, optimizer, resume state), `train` (the
    epochs and their steps), `evaluate` (tuning file, best checkpoint, early stopping), `save_state` (`last/`)."""

    def __init__(self, config: Stage1Config) -> None:
        self.config = config
        self.out = Path(config.output_dir)
        self.last_dir, self.best_dir = self.out / "last", self.out / "best"
        self.metrics_path = self.out / "metrics.jsonl"
        self.step_losses: list[tuple[int, float]] = []
        self.evaluations: list[dict[str, Any]] = []
        self.warnings: list[str] = []  # the end check's (small_corpus.finish_run)
        self.pos = Position()
        # The position and RNG states right after the last optimizer step: what an interrupt saves.
        self.boundary: tuple[Position, dict[str, Any]] | None = None
        self.stop_request = StopRequest()
        self.stopped = False  # an interrupt already saved its step
        self.clock = time.perf_counter()  # training time counts from here (not the saves and evaluations)

    # ------------------------------------------------------------------------------------------------- setup

    def setup(self, resume: bool) -> bool:
        """Everything the loop needs; False when the resumed run had already finished (nothing to train)."""
        cfg = self.config
        self.accelerator = start_accelerator(cfg)
        if self.accelerator.is_main_process:  # an interrupted swap of last/ is undone once, on rank 0
            recover_dir(self.last_dir)
        self.accelerator.wait_for_everyone()
        resuming = open_run(
            self.out, resume, state_file=self.last_dir / POSITION_FILE, markers=[self.best_dir / META_FILE]
        )
        cfg, documents = prepare_run(cfg, resuming, self.accelerator, RESUMABLE_CHANGES)
        self.config = cfg  # the tuning split, head and epochs resolved: what is saved and trained
        seed_everything(cfg.train.seed)
        with self.accelerator.main_process_first():  # a hub model is downloaded once, by rank 0
            encoder, self.tokenizer = load_encoder(cfg.model.encoder)
        self.data = load_train_data(cfg, self.tokenizer, *documents)
        self.loss = build_loss(cfg.loss.name, **self.data.loss_params)
        self.model_kwargs = model_arguments(
            cfg, self.loss.num_logits(len(self.data.relations)), self.tokenizer
        )
        self.model = build_model(encoder, self.model_kwargs)
        self.select_metric = select_metric(cfg, self.loss)
        if self.accelerator.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.out / CONFIG_FILE)
        self._setup_optimizer()
        if resuming:
            self._restore()
        pos = self.pos
        if self.accelerator.is_main_process:
            forget_records_after(self.metrics_path, pos.has_written)
        self._mark_boundary()
        if pos.done:
            log.info("%s: training already finished (step %d)", self.out, pos.global_step)
        return not pos.done

    def _setup_optimizer(self) -> None:
        """The step plan (steps per epoch, total steps), the optimizer and schedule, the model on the devices."""
        # Micro-batches per optimizer step over all processes (see lmrc/stage1/steps.py).
        self.group_size = self.config.train.grad_accum * self.accelerator.num_processes
        self.n_batches = len(self._batches(0))  # the same every epoch
        if self.n_batches == 0:
            raise LmrcError(f"{self.config.data.train}: no training documents")
        self.pos.steps_per_epoch = steps_per_epoch(self.n_batches, self.group_size)
        self.pos.total_steps = self.pos.steps_per_epoch * self.config.train.epochs
        optimizer, self.scheduler = make_optimizer(self.model, self.config.train, self.pos.total_steps)
        self.model, self.optimizer = self.accelerator.prepare(self.model, optimizer)

    def _restore(self) -> None:
        """The state of `last/`: weights, position, optimizer, scheduler, loss scaler, this process's RNG."""
        acc = self.accelerator
        position = restore_training_state(self.last_dir, acc.unwrap_model(self.model), self.optimizer,
                                          self.scheduler, getattr(acc, "scaler", None), acc.process_index)  # fmt: skip
        saved = Position(**position)
        if (saved.steps_per_epoch, saved.total_steps) != (self.pos.steps_per_epoch, self.pos.total_steps):
            raise LmrcError(
                f"{self.last_dir / POSITION_FILE}: the saved run has {saved.total_steps} optimizer steps, this "
                f"config and data give {self.pos.total_steps}; the training data changed since the run started"
            )
        self.pos = saved
        log.info("resuming %s at epoch %d, micro-batch %d, optimizer step %d of %d", self.out, saved.epoch + 1,
                 saved.batch_pos, saved.global_step, saved.total_steps)  # fmt: skip

    def _batches(self, epoch: int) -> list[list[int]]:
        return epoch_batches(self.data.train_features, self.config.train, epoch)

    # ------------------------------------------------------------------------------------------------- train

    def train(self, stop_after_steps: int | None) -> None:
        """The epochs and their optimizer steps. After each step, in this order (the resume contract): the
        position and the state an interrupt saves (`_step`), the evaluation or save that is due, the time box."""
        cfg, pos = self.config.train, self.pos
        # With log_every_steps the step lines tell the progress; the bar's own lines would repeat them.
        progress = Progress(pos.total_steps, "stage1 train", "step", initial=pos.global_step,
                            every_s=float("inf") if cfg.log_every_steps else 30.0, logger=log)  # fmt: skip
        self.model.train()
        self.clock = time.perf_counter()
        steps_this_call = 0
        try:
            if pos.eval_pending and self._evaluate_pending():
                return
            while pos.epoch < cfg.epochs:
                batches, epoch_loss, epoch_steps = self._batches(pos.epoch), 0.0, 0
                while pos.batch_pos < len(batches):
                    step_loss = self._step(batches[pos.batch_pos : pos.batch_pos + self.group_size])
                    epoch_loss += step_loss
                    epoch_steps += 1
                    steps_this_call += 1
                    progress.update(1, epoch=pos.epoch + 1, loss=f"{epoch_loss / epoch_steps:.4f}")
                    if cfg.log_every_steps and pos.global_step % cfg.log_every_steps == 0:
                        self._log_step(step_loss, epoch_loss / epoch_steps)
                    saved, stop = self._evaluate_or_save()
                    if stop:
                        return self._finish()
                    if stop_after_steps is not None and steps_this_call >= stop_after_steps:
                        if not saved:
                            self.save_state()
                        log.info("stopping after %d steps as asked; continue with --resume", steps_this_call)
                        return
                if self._end_epoch():
                    return self._finish()
            self._finish()
        finally:
            progress.close()

    def _step(self, group: list[list[int]]) -> float:
        """One optimizer step over a group of micro-batches dealt to the processes (gradient accumulation), then
        the position past it; returns the step's loss (the group's mean, over all processes). A Ctrl-C / SIGTERM
        on any process is agreed on in the loss's all-reduce: every process saves this step and stops."""
        acc, pos = self.accelerator, self.pos
        mine = rank_share(group, acc.num_processes, acc.process_index)
        local = 0.0
        for j, (batch, num, den) in enumerate(mine):
            inputs = collate([self.data.train_features[i] for i in batch])
            with contextlib.nullcontext() if j == len(mine) - 1 else acc.no_sync(self.model):
                local += self._micro_step(inputs, num, den)
        step_loss, stop = global_loss(acc, local, self.stop_request.requested)
        if self.config.train.max_grad_norm > 0:
            acc.clip_grad_norm_(self.model.parameters(), self.config.train.max_grad_norm)
        self.boundary = None  # until the step is recorded, no consistent state to save
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        pos.global_step += 1
        pos.batch_pos += len(group)
        pos.loss_sum += step_loss
        pos.loss_steps += 1
        now = time.perf_counter()
        pos.elapsed_s += now - self.clock
        self.clock = now
        every = self.config.train.eval_every_steps
        pos.eval_pending = bool(self.data.tune_docs is not None and every and pos.global_step % every == 0)
        self._mark_boundary()
        if stop:
            log.warning("interrupted: saving the state after step %d to %s", pos.global_step, self.last_dir)
            self.save_state()
            self.stopped = True
            raise KeyboardInterrupt
        self.step_losses.append((pos.global_step, step_loss))
        return step_loss

    def _micro_step(self, inputs: dict, num: int, den: int) -> float:
        """Forward + backward of one micro-batch, its loss scaled by num / den; returns this process's share of
        the step loss (the mean over the group's micro-batches once summed over processes)."""
        device = self.accelerator.device
        labels = inputs["labels"].to(device)
        logits = self.model(
            inputs["input_ids"].to(device),
            inputs["attention_mask"].to(device),
            inputs["entity_pos"],
            inputs["hts"],
        )
        loss = self.loss(logits, labels)
        self.accelerator.backward(loss * num / den)
        return loss.item() * num / den / self.accelerator.num_processes

    def _evaluate_or_save(self) -> tuple[bool, bool]:
        """After a step: the evaluation due at this step (then `last/`), or the periodic save. Returns (saved,
        early stopping says stop)."""
        if self.pos.eval_pending:
            stop = self.evaluate()
            self._mark_boundary()
            if stop:
                return False, True
            self.save_state()
            return True, False
        every = self.config.train.save_every_steps
        if every and self.pos.global_step % every == 0:
            self.save_state()
            return True, False
        return False, False

    def _evaluate_pending(self) -> bool:
        """The evaluation the saved state was due to run (it was interrupted); True when training ends here."""
        epochs = self.config.train.epochs
        stop = self.evaluate() if self.data.tune_docs is not None else False
        self._mark_boundary()
        if stop or self.pos.epoch >= epochs:
            self._finish()
            return True
        self.save_state()
        return False

    def _end_epoch(self) -> bool:
        """Move to the next epoch, evaluate when due and save; True when training ends here.

        The position moves to the next epoch before its evaluation, so that an interrupted evaluation is re-run
        on resume (eval_pending)."""
        cfg, pos = self.config.train, self.pos
        pos.epoch += 1
        pos.batch_pos = 0
        just_evaluated = pos.last_eval_step == pos.global_step
        pos.eval_pending = bool(
            self.data.tune_docs is not None
            and cfg.eval_every_epochs
            and pos.epoch % cfg.eval_every_epochs == 0
            and not just_evaluated
        )
        self._mark_boundary()
        stop = False
        if pos.eval_pending:
            stop = self.evaluate()
            self._mark_boundary()
        if pos.epoch >= cfg.epochs or stop:
            return True
        self.save_state()
        return False

    def _log_step(self, step_loss: float, epoch_mean: float) -> None:
        pos = self.pos
        log.info(
            "epoch %d/%d step %d/%d loss %.4f (epoch mean %.4f) lr %.2e %.2f s/step",
            pos.epoch + 1,
            self.config.train.epochs,
            pos.global_step,
            pos.total_steps,
            step_loss,
            epoch_mean,
            self.optimizer.param_groups[0]["lr"],
            pos.elapsed_s / max(1, pos.global_step),
        )

    # ---------------------------------------------------------------------------------------------- evaluate

    def evaluate(self) -> bool:
        """Evaluate on the tuning file, log, keep the best checkpoint; True when early stopping says stop."""
        pos, start = self.pos, time.perf_counter()
        cfg = self.config.train
        metrics = tune_metrics_on_every_rank(
            self.accelerator, self.model, self.loss, self.data, cfg.eval_batch_size
        )
        value = metrics.get(self.select_metric)
        improved = value is not None and (pos.best_value is None or value > pos.best_value)
        if improved:
            pos.best_value, pos.best_step, pos.bad_evals = value, pos.global_step, 0
            if self.accelerator.is_main_process:
                self.save_checkpoint(self.best_dir, pos, metrics)
        else:
            pos.bad_evals += 1
        lrs = [group["lr"] for group in self.optimizer.param_groups]
        record = eval_record(pos, self.n_batches, lrs, metrics, self.select_metric, improved)
        record.update(eval_s=round(time.perf_counter() - start, 2), elapsed_s=round(pos.elapsed_s, 1))
        check_evaluation(record, len(self.data.tune_docs), self.loss, pos.total_steps)
        if self.accelerator.is_main_process:
            append_jsonl(self.metrics_path, record)
        self.evaluations.append(record)
        log.info("eval at step %d (epoch %.2f): %s = %s (best %s at step %s)%s", pos.global_step, record["epoch"],
                 self.select_metric, _fmt(value), _fmt(pos.best_value), pos.best_step,
                 "  [saved best/]" if improved else "")  # fmt: skip
        pos.loss_sum, pos.loss_steps, pos.eval_pending = 0.0, 0, False
        pos.last_eval_step = pos.global_step
        if cfg.patience and pos.bad_evals >= cfg.patience:
            log.info("early stopping: %d evaluations without improvement", pos.bad_evals)
            pos.stopped_early = True
            return True
        return False

    # -------------------------------------------------------------------------------------------------- save

    def save_checkpoint(
        self, path: Path, pos: Position, metrics: dict | None = None, state: ResumeState | None = None
    ) -> None:
        selection = {
            "metric": self.select_metric,
            "value": pos.best_value,
            "step": pos.global_step,
            "epoch": pos.epoch + pos.batch_pos / max(1, self.n_batches),
            "tune_metrics": metrics or {},
        }
        model = self.accelerator.unwrap_model(self.model)
        cfg, data = self.config, self.data
        save_checkpoint(path, model, self.tokenizer, cfg, data.relations, data.loss_params, self.model_kwargs,
                        selection=selection, state=state)  # fmt: skip

    def save_state(self) -> None:
        """Write `last/`: a full checkpoint plus the resume state at the last step boundary."""
        pos, rng = self.boundary
        rng_all = gather_object([rng]) if self.accelerator.num_processes > 1 else [rng]
        if self.accelerator.is_main_process:
            state = ResumeState(
                position=dataclasses.asdict(pos),
                optimizer=self.optimizer.state_dict(),
                scheduler=self.scheduler.state_dict(),
                rng=rng_all,
                scaler=scaler_state(self.accelerator),
            )
            self.save_checkpoint(self.last_dir, pos, state=state)
        self.accelerator.wait_for_everyone()
        self.clock = time.perf_counter()

    def _mark_boundary(self) -> None:
        """Remember the state right after an optimizer step (what an interrupt saves)."""
        self.boundary = (dataclasses.replace(self.pos), capture_rng())

    @contextlib.contextmanager
    def saving_on_interrupt(self):
        """Ctrl-C / SIGTERM are agreed on at a step's end (`_step`). A KeyboardInterrupt raised elsewhere (a second
        Ctrl-C, or one inside a step) saves the last step boundary when one process runs: with several, a save
        would need every process to join a collective, so the last save is kept."""
        try:
            with self.stop_request:
                yield
        except KeyboardInterrupt:
            if self.boundary is not None and self.accelerator.num_processes == 1 and not self.stopped:
                log.warning("interrupted: saving the state after step %d to %s", self.boundary[0].global_step,
                            self.last_dir)  # fmt: skip
                self.save_state()
            raise

    def _finish(self) -> None:
        pos = self.pos
        if pos.epoch < self.config.train.epochs and not pos.stopped_early:
            return
        pos.done = True
        self._mark_boundary()
        if self.accelerator.is_main_process and not (self.best_dir / META_FILE).is_file():
            log.info("no evaluation selected a model: best/ holds the final weights")
            self.save_checkpoint(self.best_dir, pos)
        self.save_state()
        if torch.cuda.is_available():
            log.info("%s", gpu_memory_line())
        log.info("training finished after %d steps (%.1f min); best %s = %s at step %s", pos.global_step,
                 pos.elapsed_s / 60, self.select_metric, _fmt(pos.best_value), pos.best_step)  # fmt: skip
        self.warnings = finish_run(self)  # the published model's nothing-learned check, train_summary.json

    def result(self) -> Stage1TrainResult:
        pos = self.pos
        return Stage1TrainResult(
            output_dir=self.out,
            best_dir=self.best_dir,
            select_metric=self.select_metric,
            best_value=pos.best_value,
            best_step=pos.best_step,
            global_step=pos.global_step,
            total_steps=pos.total_steps,
            epochs_completed=pos.epoch,
            step_losses=self.step_losses,
            evaluations=self.evaluations,
            stopped_early=pos.stopped_early,
            finished=pos.done,
            elapsed_s=pos.elapsed_s,
            warnings=self.warnings,
        )


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"
