"""LoRA fine-tuning of the stage-2 LLM (`lmrc stage2 train`): the recipe.

Build the tokenizer, the training examples and the LoRA-wrapped model, hand the loop to transformers' Trainer
(`AnswerLossTrainer`: the loss on answer tokens, length-grouped batches), save the adapter. The Trainer runs on
one process or many (`accelerate launch` / `torchrun`: DDP, FSDP, DeepSpeed ZeRO-3). Where the pieces are:

- lmrc.stage2.train_data: documents, template, stage-1 candidates and hints, the examples;
- lmrc.stage2.budget: epochs, `max_steps` and the token budget `max_tokens` as a number of optimizer steps;
- lmrc.stage2.engine: the process group, what each engine can train, the precision;
- lmrc.stage2.trainer: the Trainer subclass, its loss, batches and arguments;
- lmrc.stage2.run_callback: metrics.jsonl, `last/` (the state `--resume` continues), snapshots, interrupts;
- lmrc.stage2.adapter_folder: the adapter folder predict reads (and the snapshots');
- lmrc.stage2.summary: train_summary.json;
- lmrc.training.run_folder: starting or resuming a run folder, the config fingerprint, Ctrl-C / SIGTERM.

Only rank 0 writes files other than the engine's own shards. `--resume` continues with the same losses (up to
float rounding) as an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from transformers import TrainerCallback, TrainingArguments, set_seed

from lmrc.config import save_config
from lmrc.io import read_json, recover_dir
from lmrc.stage2.adapter_folder import (
    AdapterFiles,
    adapter_from_checkpoint,
    save_final_adapter,
    snapshot_writers,
)
from lmrc.stage2.budget import StepPlan, plan_steps
from lmrc.stage2.config import Stage2Config
from lmrc.stage2.engine import apply_precision, check_engine, join_processes
from lmrc.stage2.examples import ExampleStats
from lmrc.stage2.modeling import (
    ADAPTER_CONFIG,
    CONFIG_FILE,
    load_base_model,
    load_tokenizer,
    prefetch_model,
    resolve_model_path,
    wrap_lora,
)
from lmrc.stage2.run_callback import METRICS_FILE, STATE_DIR, STATE_FILE, RunCallback, last_logged_loss
from lmrc.stage2.summary import RunSummary
from lmrc.stage2.train_data import build_training_examples, load_training_documents, load_training_template
from lmrc.stage2.trainer import (
    AnswerCollator,
    AnswerLossTrainer,
    ExampleDataset,
    LengthGroupedBatchSampler,
    quiet_trainer_logs,
    supports_logit_mask,
    training_arguments,
)
from lmrc.training.distributed import distributed_engine
from lmrc.training.run_folder import check_same_config, forget_records_after, open_run, read_saved_config

log = logging.getLogger(__name__)

# Changing these between a run and its --resume is harmless; any other difference is refused.
RESUMABLE_CHANGES = (
    "output_dir",
    "train.max_steps",
    "train.max_tokens",  # like max_steps: where to stop (the schedule's length changes; a warning says so)
    "train.save_every_steps",
    "train.log_every_steps",
    "train.num_threads",
    "train.gradient_checkpointing",  # memory for compute; the same losses (tests/test_stage2_train.py)
    "train.snapshot_tokens",  # what is kept on the way, not how it trains
    "train.ddp_timeout",  # how long ranks wait for each other
    "generation",
    "align",
)


@dataclass
class TrainResult:
    output_dir: Path
    steps: int  # optimizer steps done in total (including those before a resume)
    total_steps: int
    losses: list[float]  # loss of each optimizer step run in this call
    seconds: float  # this call
    tokens: int  # non-padding tokens processed in this call
    stats: ExampleStats
    finished: bool = True  # False: paused by stop_after_steps; continue with resume


def train(
    cfg: Stage2Config,
    output_dir: str | os.PathLike | None = None,
    resume: bool = False,
    on_step: Callable[[dict], None] | None = None,
    stop_after_steps: int | None = None,
    callbacks: Sequence[TrainerCallback] = (),
) -> TrainResult:
    """Fine-tune LoRA adapters as configured, or continue an interrupted run (`resume`). `stop_after_steps`
    pauses after that many steps of this call (state saved) to time-box long CPU runs. `on_step` gets each step's
    metrics record. Ctrl-C / SIGTERM (or KeyboardInterrupt from `on_step`) saves the state of the step under way
    once it is finished, then raises KeyboardInterrupt. `callbacks`: more TrainerCallbacks."""
    out = Path(output_dir or cfg.output_dir)
    cfg = dataclasses.replace(cfg, output_dir=str(out))  # the saved config names the output folder
    cuda, engine = torch.cuda.is_available(), distributed_engine()
    check_engine(cfg, engine)
    procs = join_processes(cfg, cuda)  # joins the process group under torchrun / accelerate launch
    state_dir = _open_run_folder(procs, cfg, out, resume)

    # Data first: a bad file fails before minutes of model loading.
    relations, docs = load_training_documents(cfg)
    template, template_text = load_training_template(cfg)
    model_path, tokenizer = _fetch_model(procs, cfg.model)
    examples, stats = build_training_examples(cfg, tokenizer, relations, docs, template)
    lengths, world = [len(e) for e in examples], procs.num_processes
    plan = plan_steps(lengths, cfg, world)
    start_step = _start_records(procs, cfg, out, state_dir, plan)
    files = AdapterFiles(tokenizer, cfg, template_text, relations)
    summary = RunSummary(cfg, stats, len(docs), lengths, world, plan, procs.device, engine)
    if state_dir is not None and start_step >= plan.total_steps:
        return _already_finished(procs, state_dir, out, files, summary, start_step)

    args, model = _arguments_and_model(cfg, model_path, procs, plan, engine)
    stop_at = plan.stop_at(start_step, stop_after_steps)
    snapshots = snapshot_writers(files, lengths, world, plan, start_step)
    run = RunCallback(out, plan, cfg.train.log_every_steps, stop_at, on_step, snapshots)
    trainer = AnswerLossTrainer(
        model=model,
        args=args,
        train_dataset=ExampleDataset(examples),
        data_collator=AnswerCollator(tokenizer.pad_token_id),
        callbacks=[run, *callbacks],
        batch_sampler=LengthGroupedBatchSampler(lengths, cfg.train.batch_size, cfg.train.seed),
        logit_mask=supports_logit_mask(),
    )
    with run.watching(trainer), quiet_trainer_logs():
        trainer.train(resume_from_checkpoint=str(state_dir) if state_dir is not None else None)
    if run.interrupted:
        raise KeyboardInterrupt
    steps = int(trainer.state.global_step)
    if steps >= plan.total_steps:
        save_final_adapter(trainer, out, files)
    if procs.is_main_process:
        summary.write(steps, run.seconds, run.tokens, run.final_loss)
    procs.wait_for_everyone()
    finished = steps >= plan.total_steps
    return TrainResult(out, steps, plan.total_steps, run.losses, run.seconds, run.tokens, stats, finished)


def prepare_output_dir(out: Path, resume: bool) -> Path | None:
    """The state folder to resume from (None: start afresh); refuses to overwrite another run. Only reads."""
    state_dir = out / STATE_DIR
    found = open_run(out, resume, state_file=state_dir / STATE_FILE, markers=[out / ADAPTER_CONFIG],
                     what="a stage-2 run")  # fmt: skip
    return state_dir if found else None


def _open_run_folder(procs: PartialState, cfg: Stage2Config, out: Path, resume: bool) -> Path | None:
    """`prepare_output_dir` on every rank, once rank 0 has undone an interrupted swap of last/; a resumed run
    must have the interrupted run's settings (but RESUMABLE_CHANGES)."""
    if procs.is_main_process:
        recover_dir(out / STATE_DIR)
    procs.wait_for_everyone()
    state_dir = prepare_output_dir(out, resume)
    if state_dir is not None:
        saved = read_saved_config(Stage2Config, out)
        check_same_config(saved, cfg, out / CONFIG_FILE, allowed=RESUMABLE_CHANGES)
    return state_dir


def _fetch_model(procs: PartialState, name: str) -> tuple[Path, Any]:
    """The model's local folder and its tokenizer; a hub model is downloaded once, by rank 0, while the others
    wait."""
    if procs.is_main_process:
        prefetch_model(name)
    procs.wait_for_everyone()
    model_path = resolve_model_path(name)
    return model_path, load_tokenizer(model_path)


def _arguments_and_model(
    cfg: Stage2Config, model_path: Path, procs: PartialState, plan: StepPlan, engine: str
) -> tuple[TrainingArguments, Any]:
    """The Trainer's arguments, then the base model with LoRA adapters, left where it was loaded: the Trainer
    places it (DDP) or shards it. In this order: under DeepSpeed ZeRO-3 the arguments make from_pretrained load
    the weights partitioned."""
    precision = apply_precision(cfg, procs.device, engine)
    main, cuda = procs.is_main_process, torch.cuda.is_available()
    out = Path(cfg.output_dir)
    args = training_arguments(cfg, out, plan.total_steps, plan.warmup, precision, main=main, cuda=cuda)
    set_seed(cfg.train.seed)
    model = load_base_model(
        cfg,
        model_path,
        procs.device,
        training=True,
        device_index=procs.local_process_index,
        dtype=precision.load_dtype,
        place=False,
    )
    return args, wrap_lora(model, cfg)


def _start_records(
    procs: PartialState, cfg: Stage2Config, out: Path, state_dir: Path | None, plan: StepPlan
) -> int:
    """The optimizer steps the saved state has done (0: a new run). A new run writes its config (its
    fingerprint) and a fresh metrics.jsonl; a resumed run forgets the metrics logged after its saved state
    (those steps run again)."""
    start_step = 0 if state_dir is None else _saved_step(state_dir, plan)
    if procs.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        if state_dir is None:
            save_config(cfg, out / CONFIG_FILE)
            (out / METRICS_FILE).unlink(missing_ok=True)
        else:
            forget_records_after(out / METRICS_FILE, lambda r: r.get("step", 0) <= start_step)
    procs.wait_for_everyone()
    return start_step


def _saved_step(state_dir: Path, plan: StepPlan) -> int:
    """The step the saved state in `state_dir` was written at."""
    progress = read_json(state_dir / STATE_FILE)
    step = int(progress["step"])
    log.info("resuming from %s at step %d of %d", state_dir, step, plan.total_steps)
    if progress.get("total_steps") != plan.total_steps:
        log.warning(
            "the interrupted run planned %s steps, this one %d (max_steps or the data changed): the learning "
            "rate schedule differs from an uninterrupted run",
            progress.get("total_steps"),
            plan.total_steps,
        )
    return step


def _already_finished(
    procs: PartialState, state_dir: Path, out: Path, files: AdapterFiles, summary: RunSummary, steps: int
) -> TrainResult:
    """A resumed run with nothing left to train loads no model (nor wraps one in an engine, whose save would need
    it): it writes the adapter folder from last/ when a kill came before it, and the summary."""
    if procs.is_main_process:
        if not (out / ADAPTER_CONFIG).is_file():
            adapter_from_checkpoint(state_dir, out, files)
        summary.write(steps, final_loss=last_logged_loss(out))
    log.info("%s: training had already finished (step %d of %d)", out, steps, summary.plan.total_steps)
    procs.wait_for_everyone()
    return TrainResult(out, steps, summary.plan.total_steps, [], 0.0, 0, summary.stats, True)
