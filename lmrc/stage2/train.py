"""LoRA fine-tuning of the stage-2 LLM (`lmrc stage2 train`), on transformers' `Trainer`.

The Trainer runs the loop on one process or many (`accelerate launch` / `torchrun`: DDP, FSDP, DeepSpeed ZeRO-3),
with what those engines need and a hand-written loop got wrong: gradient accumulation that steps the optimizer once
per window under every engine, clipping over the whole (sharded) model, adapters gathered from the shards when
saved, per-rank RNG states, mid-epoch resume. What is ours:

- the loss: the mean next-token cross-entropy over the answer tokens of an optimizer step (prompt tokens masked),
  summed over the step's micro-batches and ranks and divided by their answer-token count (the Trainer's
  `num_items_in_batch`); logits are computed only at answer positions (transformers >= 5 `logits_to_keep` mask);
- the batches: length-grouped, in an order that depends on (seed, epoch) only, so the training-token budget
  (`train.max_tokens`) becomes a step count (`max_steps`) before training starts;
- the run folder: `last/` is the Trainer's checkpoint (adapter safetensors, optimizer, scheduler, per-rank RNG,
  trainer state) moved into place after every save, with `state.json` marking it complete; the finished run saves
  the adapter (safetensors), tokenizer, resolved config, prompt template and relation set to `<output_dir>`, which
  is all `lmrc stage2 predict` needs. Only rank 0 writes files other than the engine's own shards.
- interrupts: Ctrl-C or SIGTERM (on any rank) sets a flag that all ranks agree on at the next step's end; the run
  then saves that step's state and stops (a second Ctrl-C aborts at once). `--resume` continues with the same
  losses (up to float rounding) as an uninterrupted run.
"""

from __future__ import annotations

import copy
import itertools
import json
import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmrc.config import expand_path, save_config, to_dict
from lmrc.data.candidates import load_candidates
from lmrc.data.docred import Document, load_documents, require_labels, restrict_pairs
from lmrc.data.relations import RelationSet, load_relations
from lmrc.errors import LmrcError
from lmrc.io import (
    append_jsonl,
    atomic_write_json,
    atomic_write_text,
    move_files_into,
    read_jsonl,
    recover_dir,
    replace_dir,
    write_dir_atomically,
)
from lmrc.stage2.config import Stage2Config, load_stage2_config
from lmrc.stage2.examples import IGNORE_INDEX, ExampleBuilder, ExampleStats, TrainExample
from lmrc.stage2.modeling import (
    ADAPTER_CONFIG,
    CONFIG_FILE,
    RELATIONS_FILE,
    TEMPLATE_FILE,
    load_base_model,
    load_tokenizer,
    prefetch_model,
    resolve_dtype,
    resolve_model_path,
    wrap_lora,
)
from lmrc.stage2.prompts import PromptEncoder, PromptTemplate, default_prompts_dir, load_template
from lmrc.training import (
    StopRequest,
    changed_setting,
    distributed_engine,
    length_grouped_batches,
)

log = logging.getLogger(__name__)

STATE_DIR = "last"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "train_summary.json"
SNAPSHOTS_DIR = "snapshots"  # <output_dir>/snapshots/tokens-<n>: the adapter at train.snapshot_tokens
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


# ---------------------------------------------------------------------------------------------------------------
# Data


def template_source(cfg: Stage2Config) -> Path:
    return (
        expand_path(cfg.template, "template") if cfg.template else default_prompts_dir() / f"{cfg.mode}.txt"
    )


def load_training_template(cfg: Stage2Config) -> tuple[PromptTemplate, str]:
    """The template and its raw text (saved with the adapter so that predict renders identical prompts)."""
    path = template_source(cfg)
    template = load_template(cfg.mode, path, allow_none=cfg.allow_none, hints=cfg.hints > 0)
    return template, path.read_text(encoding="utf-8")


def load_training_documents(cfg: Stage2Config) -> tuple[RelationSet, list[Document]]:
    rel_path = cfg.data.path("rel_info")
    train_path = cfg.data.path("train")
    assert rel_path is not None and train_path is not None
    relations = load_relations(rel_path)
    docs = restrict_pairs(load_documents(train_path, relations), cfg.data.pair_types, train_path)
    require_labels(docs, train_path, "training")
    if cfg.data.max_docs is not None and cfg.data.max_docs < len(docs):
        log.info(
            "data.max_docs=%d: training on the first %d of %d documents",
            cfg.data.max_docs,
            cfg.data.max_docs,
            len(docs),
        )
        docs = docs[: cfg.data.max_docs]
    return relations, docs


def load_false_positive_candidates(cfg: Stage2Config, docs: Sequence[Document]) -> dict[str, list] | None:
    """rc_allow_none: title -> stage-1 candidate pairs of the training documents (cross-fitted predictions)."""
    path = cfg.data.path("candidates")
    if not cfg.rc_allow_none:
        if path is not None and not cfg.hints:
            log.warning("data.candidates is ignored: it is used only with rc_allow_none: true or hints")
        return None
    if path is None:
        log.warning(
            "rc_allow_none without data.candidates: the prompt offers None, but no pair is answered None"
        )
        return None
    cands = load_candidates(path)
    by_title = {d.title: d for d in docs}
    out = {}
    for i, dc in enumerate(cands.documents):
        doc = by_title.get(dc.title)
        if doc is None:
            continue
        if dc.n_entities is not None and dc.n_entities != len(doc.entities):
            raise LmrcError(
                f'{path}: documents[{i}] ("{dc.title}"): n_entities={dc.n_entities}, but the training document '
                f"has {len(doc.entities)} entities (candidates from another version of the data?)"
            )
        out[dc.title] = [(p.h, p.t) for p in dc.pairs]
    if not out:
        raise LmrcError(f"{path}: no document title matches the training documents")
    return out


def build_training_examples(
    cfg: Stage2Config,
    tokenizer: Any,
    relations: RelationSet,
    docs: Sequence[Document],
    template: PromptTemplate,
) -> tuple[list[TrainExample], ExampleStats]:
    encoder = PromptEncoder(tokenizer, cfg.use_chat_template)
    builder = ExampleBuilder(
        relations, template, encoder, cfg.max_seq_len, cfg.max_pairs, cfg.answer_tokens_per_pair
    )
    candidates = load_false_positive_candidates(cfg, docs)
    return builder.build(
        docs,
        cfg.mode,
        candidates,
        na_chunk_fraction=cfg.data.direct_na_chunk_fraction,
        seed=cfg.train.seed,
        hints=load_training_hints(cfg, relations, docs),
    )


def load_training_hints(cfg: Stage2Config, relations: RelationSet, docs: Sequence[Document]) -> dict | None:
    """hints: title -> pair -> stage 1's best relation names, from the cross-fitted candidates (data.candidates)."""
    if not cfg.hints:
        return None
    path = cfg.data.path("candidates")
    if path is None:
        raise LmrcError(
            "hints: the training prompts take their hints from data.candidates (cross-fitted stage-1 candidates "
            "of the training file: lmrc stage1 crossfit ... --output FILE)"
        )
    from lmrc.data.candidates import hint_names, match_candidates

    matched = match_candidates(load_candidates(path), docs, path, cfg.data.path("train"), relations.ids)
    return {
        d.title: hint_names(dc, relations.names, cfg.hints) for d, dc in zip(docs, matched) if dc is not None
    }


def steps_per_epoch(n_batches: int, grad_accum: int, world: int) -> int:
    """Optimizer steps in an epoch of `n_batches` micro-batches: each rank takes every `world`-th batch (the last
    round wraps around to the first batches, as accelerate's even batches), `grad_accum` of them a step."""
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
    `budget`.

    The batch order depends on (seed, epoch) only, so the count is known before training: two adapters given
    the same budget see the same number of LLM tokens (the comparison's fair budget for rc vs direct).
    """
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
    """Tokens of every optimizer step in training order (the order depends on (seed, epoch) only)."""
    bs, ga = cfg.train.batch_size, cfg.train.grad_accum
    for epoch in range(cfg.train.epochs or 1):
        batches = length_grouped_batches(lengths, bs, cfg.train.seed + epoch)
        for in_epoch in range(steps_per_epoch(len(batches), ga, world)):
            yield sum(lengths[j] for k in step_batches(len(batches), in_epoch, ga, world) for j in batches[k])


def collate(examples: Sequence[TrainExample], pad_id: int) -> dict[str, Any]:
    """Right-padded tensors; padding is masked in attention and labels."""
    import torch

    n = max(len(e) for e in examples)
    ids = torch.full((len(examples), n), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), n), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), n), dtype=torch.long)
    for i, e in enumerate(examples):
        ids[i, : len(e)] = torch.tensor(e.input_ids)
        labels[i, : len(e)] = torch.tensor(e.labels)
        mask[i, : len(e)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _supports_logit_mask() -> bool:
    """transformers >= 5 computes logits only at the positions of a boolean `logits_to_keep` mask."""
    from transformers import modeling_utils

    return hasattr(modeling_utils, "slice_logits_to_keep")


def answer_loss_sum(model: Any, batch: dict[str, Any], logit_mask: bool = True) -> Any:
    """Summed next-token cross-entropy over the answer tokens of a batch (float32 logits)."""
    import torch
    import torch.nn.functional as F

    labels = batch["labels"]
    targets = labels[:, 1:]
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = targets != IGNORE_INDEX
    if logit_mask:
        out = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            logits_to_keep=keep,
            use_cache=False,
        )
        logits = out.logits.reshape(-1, out.logits.shape[-1])
    else:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        logits = out.logits[keep]
    return F.cross_entropy(logits.float(), targets[keep[:, :-1]], reduction="sum")


# ---------------------------------------------------------------------------------------------------------------
# Resumable state


def _state_dir(output_dir: Path) -> Path | None:
    d = output_dir / STATE_DIR
    return d if (d / "state.json").is_file() else None


def _check_resume_config(saved: Stage2Config, cfg: Stage2Config, where: Path) -> None:
    diff = changed_setting(to_dict(saved), to_dict(cfg), RESUMABLE_CHANGES)
    if diff is not None:
        key, old, new = diff
        raise LmrcError(
            f"{where}: cannot resume: {key} was {old!r} in the interrupted run, now {new!r} "
            "(use the same config, or another --output-dir)"
        )


def prepare_output_dir(output_dir: Path, resume: bool) -> Path | None:
    """The state folder to resume from (None: start afresh); refuses to overwrite another run.

    Call it on every rank after rank 0 ran `recover_dir` (see `train`); it only reads."""
    state = _state_dir(output_dir)
    if resume:
        if state is None:
            log.info("%s: no saved state to resume; starting a new run", output_dir)
        return state
    if state is not None:
        raise LmrcError(
            f"{output_dir}: holds an unfinished run; continue it with --resume or use another --output-dir"
        )
    if (output_dir / ADAPTER_CONFIG).is_file():
        raise LmrcError(f"{output_dir}: already holds a trained adapter; use another --output-dir")
    return None


# ---------------------------------------------------------------------------------------------------------------
# Precision


@dataclass(frozen=True)
class Precision:
    """How the weights are loaded and what the Trainer autocasts to.

    Plain data parallel: the base weights in the resolved dtype, the LoRA weights in float32 (peft), no autocast,
    except float16, which needs autocast + a loss scaler (GPUs without native bf16). FSDP flattens the parameters
    of a wrapped module into one tensor of one dtype, so the base is loaded in float32 too and FSDP's mixed
    precision computes in bf16/fp16 (float32 master weights). DeepSpeed casts every parameter to its bf16/fp16.
    """

    load_dtype: Any
    bf16: bool
    fp16: bool

    @property
    def mixed_precision(self) -> str:
        """accelerate's name for the autocast: what the Trainer's Accelerator must get, whatever the launcher said."""
        return "bf16" if self.bf16 else "fp16" if self.fp16 else "no"


def resolve_precision(cfg: Stage2Config, device: Any, engine: str) -> Precision:
    """QLoRA: the 4-bit base computes in its compute dtype (the resolved dtype), the adapter is float32, and the
    Trainer autocasts to that dtype (bf16 where the GPU has it; fp16 with a loss scaler on older GPUs), as the
    QLoRA recipe trains; without autocast the float32 adapter would run the LoRA matmuls in float32."""
    import torch

    dtype = resolve_dtype(cfg.dtype, device)
    half = dtype in (torch.bfloat16, torch.float16)
    cuda = device.type == "cuda"
    if cfg.load_in_4bit:
        return Precision(dtype, dtype == torch.bfloat16 and cuda, dtype == torch.float16 and cuda)
    if engine == "fsdp":
        return Precision(torch.float32, dtype == torch.bfloat16, dtype == torch.float16)
    if engine == "deepspeed":
        return Precision(dtype, dtype == torch.bfloat16, dtype == torch.float16)
    return Precision(dtype, False, half and dtype == torch.float16 and device.type == "cuda")


# DeepSpeed's first release whose ZeRO-3 keeps frozen parameters gathered during a non-reentrant checkpoint
# recompute (deepspeedai/DeepSpeed#8148, in 0.19.3): older ones fail LoRA + gradient checkpointing with
# "CheckpointError: Recomputed values ... have different metadata" (huggingface/transformers#47254).
DEEPSPEED_CHECKPOINTING_MIN = (0, 19, 3)


def check_engine(cfg: Stage2Config, engine: str) -> None:
    """Refuse, in one line and before any model is loaded, what the distributed engines cannot train.

    - QLoRA under FSDP or ZeRO-3: the 4-bit base is placed whole on each GPU (`device_map`) and its packed uint8
      storage cannot be flattened (FSDP) or partitioned (ZeRO-3) without `bnb_4bit_quant_storage`, which lmrc does
      not set up; one GPU per process with DDP trains QLoRA, or drop load_in_4bit and shard the 16-bit base.
    - LoRA + gradient checkpointing under DeepSpeed releases before 0.19.3 (see DEEPSPEED_CHECKPOINTING_MIN).
    """
    if cfg.load_in_4bit and engine in ("fsdp", "deepspeed"):
        name = "FSDP" if engine == "fsdp" else "DeepSpeed"
        raise LmrcError(
            f"load_in_4bit (QLoRA) does not train under {name}: launch without the FSDP / DeepSpeed config "
            "(QLoRA fits a 13B model on one GPU per process), or set load_in_4bit: false to shard the 16-bit model"
        )
    if engine == "deepspeed" and cfg.train.gradient_checkpointing:
        version = _installed_version("deepspeed")
        if version is not None and version < DEEPSPEED_CHECKPOINTING_MIN:
            need = ".".join(map(str, DEEPSPEED_CHECKPOINTING_MIN))
            raise LmrcError(
                f"train.gradient_checkpointing with LoRA under DeepSpeed ZeRO-3 needs deepspeed >= {need} (this is "
                f"{'.'.join(map(str, version))}: a CheckpointError in the backward pass): pip install 'lmrc[deepspeed]'"
                ", or set train.gradient_checkpointing: false"
            )


def _installed_version(package: str) -> tuple[int, ...] | None:
    """The release numbers of an installed package ((0, 19, 3) for "0.19.3+cu12"); None when not installed."""
    import re
    from importlib import metadata

    try:
        text = metadata.version(package)
    except metadata.PackageNotFoundError:
        return None
    return tuple(int(x) for x in re.findall(r"\d+", text.split("+")[0])[:3])


def join_processes(cfg: Stage2Config, cuda: bool) -> Any:
    """accelerate's process state; under torchrun / accelerate launch it creates the process group, with
    collectives that wait `train.ddp_timeout` seconds.

    The timeout must be given here: this is the first PartialState of the process, so the Trainer's own (from
    TrainingArguments.ddp_timeout) finds the group made, and NCCL's 10-minute default would apply while rank 0
    downloads or loads a 13B model and the others wait at the barrier."""
    from datetime import timedelta

    from accelerate import PartialState

    return PartialState(cpu=not cuda, timeout=timedelta(seconds=cfg.train.ddp_timeout))


# ---------------------------------------------------------------------------------------------------------------
# Data for the Trainer


class _Examples:
    """A map-style dataset over the built examples (the collator pads them)."""

    def __init__(self, examples: Sequence[TrainExample]) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> TrainExample:
        return self.examples[i]


class LengthGroupedBatchSampler:
    """The batches of `length_grouped_batches` for (seed + epoch); the Trainer sets the epoch."""

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int) -> None:
        self.lengths, self.batch_size, self.seed = list(lengths), batch_size, seed
        self.epoch = 0
        self._n = len(length_grouped_batches(self.lengths, batch_size, seed))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self._n

    def __iter__(self) -> Iterator[list[int]]:
        return iter(length_grouped_batches(self.lengths, self.batch_size, self.seed + self.epoch))


class AnswerCollator:
    """Right-padded batches; labels hold the answer tokens only (the prompt is masked)."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, examples: Sequence[TrainExample]) -> dict[str, Any]:
        return collate(examples, self.pad_id)


# ---------------------------------------------------------------------------------------------------------------
# The Trainer and its callback


def _make_trainer_class() -> type:
    """The Trainer subclass (built lazily: importing lmrc must not import transformers)."""
    from transformers import Trainer

    class AnswerLossTrainer(Trainer):
        # compute_loss divides by the step's answer-token count over all micro-batches and ranks itself.
        loss_is_scaled_for_ga = True

        def __init__(self, *args: Any, batch_sampler: LengthGroupedBatchSampler, logit_mask: bool, **kw: Any):
            super().__init__(*args, **kw)
            self.batch_sampler = batch_sampler
            self.logit_mask = logit_mask
            self.model_accepts_loss_kwargs = True  # count num_items_in_batch (labels[..., 1:] != -100)
            self.local_tokens = 0

        def get_train_dataloader(self) -> Any:
            from torch.utils.data import DataLoader

            loader = DataLoader(
                self.train_dataset, batch_sampler=self.batch_sampler, collate_fn=self.data_collator
            )
            # accelerate shards the batches over the ranks (rank r takes batches r, r + world, ...).
            return self.accelerator.prepare(loader)

        def _run_epoch(self, model: Any, epoch: int, *args: Any, **kwargs: Any) -> Any:
            # The batch order is a function of (seed, epoch); set it also when a resumed epoch skips batches.
            self.batch_sampler.set_epoch(epoch)
            return super()._run_epoch(model, epoch, *args, **kwargs)

        def compute_loss(
            self, model: Any, inputs: dict, return_outputs: bool = False, num_items_in_batch: Any = None
        ) -> Any:
            loss_sum = answer_loss_sum(model, inputs, self.logit_mask)
            self.local_tokens += int(inputs["attention_mask"].sum())
            if num_items_in_batch is None:
                num_items_in_batch = max(1, int((inputs["labels"][:, 1:] != IGNORE_INDEX).sum()))
            loss = loss_sum / num_items_in_batch
            # num_items_in_batch counts every rank's tokens; DDP/FSDP/DeepSpeed average the gradients over ranks.
            if self.args.average_tokens_across_devices:
                loss = loss * self.accelerator.num_processes
            return (loss, None) if return_outputs else loss

    return AnswerLossTrainer


def _run_callback_class() -> type:
    from transformers import TrainerCallback

    class RunCallback(TrainerCallback):
        """Our per-step record (metrics.jsonl, on_step), periodic/final/interrupt saves, `last/` in place."""

        def __init__(self, run: _Run) -> None:
            self.run = run

        def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kw: Any) -> Any:
            if not logs or "loss" not in logs or "train_loss" in logs:
                return control
            return self.run.on_step_logged(state, control, logs)

        def on_save(self, args: Any, state: Any, control: Any, **kw: Any) -> Any:
            self.run.publish_checkpoint(state.global_step)
            return control

    return RunCallback


class _Run:
    """What one `train` call tracks around the Trainer."""

    def __init__(self, out: Path, cfg: Stage2Config, total_steps: int, steps_per_epoch: int, start_step: int,
                 stop_at: int, interrupt: StopRequest, on_step: Callable[[dict], None] | None,
                 snapshots: dict[int, Callable[[Path], None]] | None = None) -> None:  # fmt: skip
        self.out, self.cfg = out, cfg
        self.snapshots = snapshots or {}  # optimizer step -> writes the snapshot from that step's checkpoint
        self.total_steps, self.steps_per_epoch = total_steps, steps_per_epoch
        self.start_step, self.stop_at = start_step, stop_at
        self.interrupt, self.on_step = interrupt, on_step
        self.trainer: Any = None
        self.losses: list[float] = []
        self.tokens = 0
        self.start = time.perf_counter()
        self.interrupted = False
        self.running: float | None = None

    @property
    def main(self) -> bool:
        return bool(self.trainer.accelerator.is_main_process)

    def _agree(self, flag: bool, tokens: int) -> tuple[bool, int]:
        """Every rank's interrupt flag and token count, in one collective: any rank's interrupt stops all."""
        import torch

        acc = self.trainer.accelerator
        if acc.num_processes == 1:
            return flag, tokens
        t = torch.tensor([[float(flag), float(tokens)]], device=acc.device)
        g = acc.gather(t)
        return bool(g[:, 0].max() > 0), int(g[:, 1].sum())

    def on_step_logged(self, state: Any, control: Any, logs: dict) -> Any:
        step = state.global_step
        loss = float(logs["loss"])
        local, self.trainer.local_tokens = self.trainer.local_tokens, 0
        flag = False
        record = {
            "step": step,
            "epoch": round(step / self.steps_per_epoch, 4),
            "loss": loss,
            "lr": float(logs.get("learning_rate", 0.0)),
            "grad_norm": float(logs["grad_norm"]) if logs.get("grad_norm") is not None else None,
        }
        try:
            if self.on_step is not None:
                self.on_step(dict(record))
        except KeyboardInterrupt:  # an interrupt raised by a hook: handled like Ctrl-C
            flag = True
        flag = flag or self.interrupt.requested
        flag, tokens = self._agree(flag, local)
        self.tokens += tokens
        elapsed = time.perf_counter() - self.start
        record["tokens_per_s"] = round(self.tokens / elapsed, 2) if elapsed > 0 else None
        record["elapsed_s"] = round(elapsed, 2)
        self.losses.append(loss)
        self.running = loss if self.running is None else 0.9 * self.running + 0.1 * loss
        every = self.cfg.train.log_every_steps
        if self.main and (step % every == 0 or step == self.total_steps):
            append_jsonl(self.out / METRICS_FILE, record)
            log.info(
                "step %d/%d loss %.4f (running %.4f) lr %.2e %s tokens/s",
                step, self.total_steps, loss, self.running, record["lr"], record["tokens_per_s"],
            )  # fmt: skip
        if flag:
            self.interrupted = True
            log.warning("interrupted: saving the state after step %d to %s", step, self.out / STATE_DIR)
        if step in self.snapshots:
            control.should_save = True  # the snapshot is copied from this step's checkpoint
        if flag or step >= self.stop_at:
            control.should_save = True
            control.should_training_stop = True
        return control

    def publish_checkpoint(self, step: int) -> None:
        """Move the Trainer's `checkpoint-<step>` (complete on every rank) into `last/`, on rank 0."""
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        acc = self.trainer.accelerator
        acc.wait_for_everyone()
        if self.main:
            src = self.out / f"{PREFIX_CHECKPOINT_DIR}-{step}"
            # state.json last: its presence marks a complete folder.
            atomic_write_json(src / "state.json", {"step": step, "total_steps": self.total_steps}, indent=2)
            if step in self.snapshots:
                self.snapshots[step](src)
            replace_dir(src, self.out / STATE_DIR)
        acc.wait_for_everyone()


# ---------------------------------------------------------------------------------------------------------------
# The entry point


def _training_arguments(
    cfg: Stage2Config, out: Path, total_steps: int, warmup: int, precision: Any, *, main: bool, cuda: bool
) -> Any:
    """The Trainer's arguments: our batch sizes, schedule, precision and save cadence; logging every step (our
    callback writes metrics.jsonl), no reporting integrations, the progress bar only on rank 0's terminal."""
    from transformers import TrainingArguments

    bs, ga = cfg.train.batch_size, cfg.train.grad_accum
    every = cfg.train.save_every_steps
    return TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=bs,
        gradient_accumulation_steps=ga,
        learning_rate=cfg.train.lr,
        weight_decay=cfg.train.weight_decay,
        max_grad_norm=cfg.train.max_grad_norm,
        lr_scheduler_type="linear",  # warmup from 0, then linear decay to 0 (training.linear_schedule)
        warmup_steps=warmup,
        max_steps=total_steps,
        optim="adamw_torch",
        logging_strategy="steps",
        logging_steps=1,
        save_strategy="steps" if every else "no",
        save_steps=every or 1,
        report_to="none",
        disable_tqdm=not (main and sys.stderr.isatty()),
        seed=cfg.train.seed,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        average_tokens_across_devices=True,
        use_cpu=not cuda,
        bf16=precision.bf16,
        fp16=precision.fp16,
        ddp_find_unused_parameters=False,
        ddp_timeout=cfg.train.ddp_timeout,
        log_level="warning",
    )


def train(
    cfg: Stage2Config,
    output_dir: str | os.PathLike | None = None,
    resume: bool = False,
    on_step: Callable[[dict], None] | None = None,
    stop_after_steps: int | None = None,
    callbacks: Sequence[Any] = (),
) -> TrainResult:
    """Fine-tune LoRA adapters as configured, or continue an interrupted run (`resume`).

    `stop_after_steps` pauses after that many steps of this call (state saved; continue with `resume`), to
    time-box long CPU runs. `on_step` receives each step's metrics record (raising KeyboardInterrupt there acts
    as Ctrl-C). Ctrl-C / SIGTERM saves the state of the step under way once it is finished, then raises
    KeyboardInterrupt. `callbacks`: more transformers TrainerCallbacks (scripts/gpu_check.py inspects the
    prepared model with one: gradient checkpointing on, weights sharded).

    Not split: this is the recipe read top to bottom (run folder and resume point, data, step plan, model, Trainer,
    adapter, summary), in the order in which the ranks meet at their barriers; its parts are functions already.
    """
    import torch
    from transformers import set_seed

    out = Path(output_dir or cfg.output_dir)
    cfg = copy.deepcopy(cfg)  # the caller's config stays as given; the saved one names the output folder
    cfg.output_dir = str(out)
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        # A stage-1 run earlier in this process (lmrc compare) may have left accelerate's global state in bf16
        # autocast; stage 2 sets its precision through the weights' dtype and the Trainer's arguments.
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)
    cuda = torch.cuda.is_available()
    engine = distributed_engine()
    check_engine(cfg, engine)
    state = join_processes(cfg, cuda)  # joins the process group under torchrun / accelerate launch
    main, world = state.is_main_process, state.num_processes
    if main:  # an interrupted swap of last/ is undone once, before any rank looks at it
        recover_dir(out / STATE_DIR)
    state.wait_for_everyone()
    state_dir = prepare_output_dir(out, resume)
    if state_dir is not None:
        _check_resume_config(load_stage2_config(out / CONFIG_FILE), cfg, out / CONFIG_FILE)

    # Data first: a bad file fails before minutes of model loading.
    relations, docs = load_training_documents(cfg)
    template, template_text = load_training_template(cfg)
    if main:  # a hub model is downloaded once, by rank 0, while the others wait
        prefetch_model(cfg.model)
    state.wait_for_everyone()
    model_path = resolve_model_path(cfg.model)
    tokenizer = load_tokenizer(model_path)
    examples, stats = build_training_examples(cfg, tokenizer, relations, docs, template)
    if not examples:
        raise LmrcError(f"{cfg.data.train}: no training examples (no document has pairs for mode {cfg.mode})")
    log.info(
        "%d training examples from %d documents (%d prompt + %d answer tokens)",
        len(examples),
        stats.documents,
        stats.prompt_tokens,
        stats.answer_tokens,
    )

    lengths = [len(e) for e in examples]
    bs, ga = cfg.train.batch_size, cfg.train.grad_accum
    sampler = LengthGroupedBatchSampler(lengths, bs, cfg.train.seed)
    per_epoch = steps_per_epoch(len(sampler), ga, world)
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

    start_step = 0
    if state_dir is not None:
        progress = json.loads((state_dir / "state.json").read_text(encoding="utf-8"))
        start_step = int(progress["step"])
        log.info("resuming from %s at step %d of %d", state_dir, start_step, total_steps)
        if progress.get("total_steps") != total_steps:
            log.warning(
                "the interrupted run planned %s steps, this one %d (max_steps or the data changed): the learning "
                "rate schedule differs from an uninterrupted run",
                progress.get("total_steps"),
                total_steps,
            )
    if main:
        out.mkdir(parents=True, exist_ok=True)
        if state_dir is None:
            save_config(cfg, out / CONFIG_FILE)
            if (out / METRICS_FILE).exists():
                (out / METRICS_FILE).unlink()
        else:  # forget metrics logged after the saved state: those steps run again
            kept = [r for r in read_jsonl(out / METRICS_FILE) if r.get("step", 0) <= start_step]
            atomic_write_text(out / METRICS_FILE, "".join(json.dumps(r) + "\n" for r in kept))
    state.wait_for_everyone()
    stop_at = total_steps if stop_after_steps is None else min(total_steps, start_step + stop_after_steps)

    device = state.device
    already_done = state_dir is not None and start_step >= total_steps
    if already_done:
        # Nothing to train: no model is loaded (nor wrapped by an engine, whose save would need it prepared).
        if main and not (out / ADAPTER_CONFIG).is_file():
            _finish_from_state(state_dir, out, tokenizer, cfg, template_text, relations)
        log.info("%s: training had already finished (step %d of %d)", out, start_step, total_steps)
        if main:
            summary = _summary(cfg, stats, docs, start_step, total_steps, per_epoch, lengths, world, 0.0, 0,
                               None, device, engine)  # fmt: skip
            atomic_write_json(out / SUMMARY_FILE, summary, indent=2)
        state.wait_for_everyone()
        return TrainResult(out, start_step, total_steps, [], 0.0, 0, stats, True)

    precision = resolve_precision(cfg, device, engine)
    # The Trainer's Accelerator takes its autocast from ACCELERATE_MIXED_PRECISION when TrainingArguments say
    # neither bf16 nor fp16: a launcher's (or a node's default config's) fp16 would autocast over bf16 weights.
    os.environ["ACCELERATE_MIXED_PRECISION"] = precision.mixed_precision
    # Built before the model: under DeepSpeed ZeRO-3 this makes from_pretrained load the weights partitioned.
    args = _training_arguments(cfg, out, total_steps, warmup, precision, main=main, cuda=cuda)
    set_seed(cfg.train.seed)
    model = load_base_model(
        cfg,
        model_path,
        device,
        training=True,
        device_index=state.local_process_index,
        dtype=precision.load_dtype,
        place=False,  # the Trainer places it (DDP), or shards it (FSDP, DeepSpeed)
    )
    model = wrap_lora(model, cfg)

    interrupt = StopRequest()
    snapshots = _snapshot_writers(
        out, cfg, lengths, world, total_steps, start_step, tokenizer, template_text, relations
    )
    run = _Run(out, cfg, total_steps, per_epoch, start_step, stop_at, interrupt, on_step, snapshots)
    trainer = _make_trainer_class()(
        model=model,
        args=args,
        train_dataset=_Examples(examples),
        data_collator=AnswerCollator(tokenizer.pad_token_id),
        callbacks=[_run_callback_class()(run), *callbacks],
        batch_sampler=sampler,
        logit_mask=_supports_logit_mask(),
    )
    run.trainer = trainer
    start = time.perf_counter()
    with interrupt, _quiet_trainer_logs():
        trainer.train(resume_from_checkpoint=str(state_dir) if state_dir is not None else None)
    steps = int(trainer.state.global_step)
    seconds = time.perf_counter() - start
    if run.interrupted:
        raise KeyboardInterrupt
    finished = steps >= total_steps

    if finished:
        _save_final(trainer, out, tokenizer, cfg, template_text, relations)
    if main:
        summary = _summary(cfg, stats, docs, steps, total_steps, per_epoch, lengths, world, seconds, run.tokens,
                           run.losses[-1] if run.losses else None, device, engine)  # fmt: skip
        atomic_write_json(out / SUMMARY_FILE, summary, indent=2)
    state.wait_for_everyone()
    return TrainResult(out, steps, total_steps, run.losses, seconds, run.tokens, stats, finished)


def _summary(cfg: Stage2Config, stats: ExampleStats, docs: Sequence[Document], steps: int, total_steps: int,
             per_epoch: int, lengths: Sequence[int], world: int, seconds: float, tokens: int,
             final_loss: float | None, device: Any, engine: str) -> dict[str, Any]:  # fmt: skip
    """train_summary.json: the run as a whole (tokens over all calls) and this call."""
    from lmrc.hardware import gpu_memory

    return {
        "finished": steps >= total_steps,
        "examples": stats.to_dict(),
        "documents": len(docs),
        "steps": steps,
        "total_steps": total_steps,
        "steps_per_epoch": per_epoch,
        "tokens_trained": tokens_for_steps(lengths, cfg, world, steps),  # all calls together
        "seconds_this_call": round(seconds, 2),
        "tokens_this_call": tokens,
        "tokens_per_s": round(tokens / seconds, 2) if seconds > 0 else None,
        "final_loss": final_loss if final_loss is not None else _last_logged_loss(Path(cfg.output_dir)),
        "device": str(device),
        "processes": world,
        "engine": engine,
        "dtype": str(resolve_dtype(cfg.dtype, device)).replace("torch.", ""),
        "gpu_memory": gpu_memory(),
    }


def _finish_from_state(
    state_dir: Path, out: Path, tokenizer: Any, cfg: Stage2Config, template_text: str, relations: RelationSet
) -> None:
    """The adapter folder of a run whose last step was saved in last/ but which was killed before the folder was
    written: a copy of the saved adapter (the Trainer's checkpoint holds it whole, gathered from the shards).

    Copied, not saved through the Trainer: under DeepSpeed `save_model` needs the engine-wrapped model, which
    exists only once training starts, and a finished run has nothing to train."""
    weights = state_dir / "adapter_model.safetensors"
    if not weights.is_file() or not (state_dir / ADAPTER_CONFIG).is_file():
        raise LmrcError(
            f"{state_dir}: the finished run's checkpoint holds no whole adapter (adapter_model.safetensors, "
            f"{ADAPTER_CONFIG}) to write {out} from (a sharded state dict?); train again in another --output-dir"
        )
    tmp = out / ".final.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    for name in ("adapter_model.safetensors", ADAPTER_CONFIG):
        shutil.copy2(state_dir / name, tmp / name)
    _write_adapter_files(tmp, tokenizer, cfg, template_text, relations)
    move_files_into(tmp, out, last=ADAPTER_CONFIG)  # adapter_config.json marks a finished adapter
    log.info("%s: adapter written from %s", out, state_dir)


def _snapshot_writers(
    out: Path,
    cfg: Stage2Config,
    lengths: Sequence[int],
    world: int,
    total_steps: int,
    start_step: int,
    tokenizer: Any,
    template_text: str,
    relations: RelationSet,
) -> dict[int, Callable[[Path], None]]:
    """For each `train.snapshot_tokens` count the run reaches before its last step: the optimizer step at which
    it is reached (the same rule as `train.max_tokens`) and a function that writes the adapter folder
    `snapshots/tokens-<n>` from that step's Trainer checkpoint. A snapshot is the adapter part-way through one
    learning-rate schedule, not an adapter trained to that budget with its own schedule (which decays to 0)."""
    writers: dict[int, Callable[[Path], None]] = {}
    for budget in sorted(cfg.train.snapshot_tokens):
        step = steps_for_tokens(lengths, cfg, world, budget)
        dest = out / SNAPSHOTS_DIR / f"tokens-{budget}"
        if step >= total_steps:
            log.warning(
                "train.snapshot_tokens %d: the run ends at that step; the finished adapter is it", budget
            )
            continue
        if step <= start_step:
            if not (dest / ADAPTER_CONFIG).is_file():
                log.warning(
                    "%s: its step %d was trained before this resume without it; not written", dest, step
                )
            continue
        meta = {
            "finished": True,
            "snapshot_of": str(out),
            "budget_tokens": budget,
            "steps": step,
            "total_steps": total_steps,
            "tokens_trained": tokens_for_steps(lengths, cfg, world, step),
        }

        def write(src: Path, dest: Path = dest, meta: dict = meta) -> None:
            weights = src / "adapter_model.safetensors"
            if not weights.is_file():  # a sharded state dict (FSDP): the checkpoint holds no whole adapter
                log.warning("%s: no adapter_model.safetensors in %s; snapshot not written", dest, src)
                return

            def fill(tmp: Path) -> None:
                for name in ("adapter_model.safetensors", ADAPTER_CONFIG):
                    shutil.copy2(src / name, tmp / name)
                snap = copy.deepcopy(cfg)
                snap.output_dir = str(dest)
                _write_adapter_files(tmp, tokenizer, snap, template_text, relations)
                atomic_write_json(tmp / SUMMARY_FILE, meta, indent=2)

            write_dir_atomically(dest, fill)
            log.info(
                "snapshot at step %d (%d tokens trained): %s", meta["steps"], meta["tokens_trained"], dest
            )

        writers[step] = write
    return writers


def _last_logged_loss(out: Path) -> float | None:
    """The loss of the last logged step (a call that trained nothing: a finished run asked to resume)."""
    path = out / METRICS_FILE
    records = read_jsonl(path) if path.is_file() else []
    return records[-1].get("loss") if records else None


class _quiet_trainer_logs:
    """The Trainer prints its own progress lines at INFO; ours go to the log (and train.log) instead."""

    def __enter__(self) -> None:
        from transformers.utils import logging as hf_logging

        self.level = hf_logging.get_verbosity()
        hf_logging.set_verbosity_warning()

    def __exit__(self, *exc: Any) -> None:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity(self.level)


def _write_adapter_files(
    folder: Path, tokenizer: Any, cfg: Stage2Config, template_text: str, relations: RelationSet
) -> None:
    """What `lmrc stage2 predict --adapter` reads beside the adapter weights: the finished adapter and every
    snapshot get the same files."""
    tokenizer.save_pretrained(str(folder))
    atomic_write_text(folder / TEMPLATE_FILE, template_text)
    atomic_write_json(folder / RELATIONS_FILE, {rid: relations.name(rid) for rid in relations.ids}, indent=1)
    save_config(cfg, folder / CONFIG_FILE)


def _save_final(
    trainer: Any, out: Path, tokenizer: Any, cfg: Stage2Config, template_text: str, relations: RelationSet
) -> None:
    """The adapter folder. Every rank takes part in the Trainer's save (it gathers the adapter from the shards
    under FSDP / ZeRO-3); rank 0 writes it to a temporary folder first, then moves the files in."""
    tmp = out / ".final.tmp"
    main = trainer.accelerator.is_main_process
    if main and tmp.exists():
        shutil.rmtree(tmp)
    trainer.accelerator.wait_for_everyone()
    # gather the adapter on rank 0, whatever state-dict type the checkpoints use
    if getattr(trainer, "is_fsdp_enabled", False):
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    trainer.save_model(str(tmp))
    trainer.accelerator.wait_for_everyone()
    if not main:
        return
    (tmp / "training_args.bin").unlink(missing_ok=True)  # a pickle; the resolved config says it all
    _write_adapter_files(tmp, tokenizer, cfg, template_text, relations)
    move_files_into(tmp, out, last=ADAPTER_CONFIG)  # adapter_config.json marks a finished adapter
