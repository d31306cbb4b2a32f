"""What stage 2 adds to transformers' Trainer: the loss on answer tokens, the batches, and the arguments.

The Trainer runs the loop on one process or many (`accelerate launch` / `torchrun`: DDP, FSDP, DeepSpeed ZeRO-3),
with gradient accumulation that steps the optimizer once per window under every engine, clipping over the whole
(sharded) model, adapters gathered from the shards when saved, per-rank RNG states and mid-epoch resume. Ours:

- the loss: the mean next-token cross-entropy over the answer tokens of an optimizer step (prompt tokens masked),
  summed over the step's micro-batches and ranks and divided by their answer-token count (the Trainer's
  `num_items_in_batch`); logits are computed only at answer positions (transformers >= 5 `logits_to_keep` mask);
- the batches: length-grouped, in an order that depends on (seed, epoch) only, so that the token budget is a
  step count known before training (lmrc.stage2.budget).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from transformers import Trainer, TrainingArguments, modeling_utils
from transformers.utils import logging as hf_logging

from lmrc.stage2.config import Stage2Config
from lmrc.stage2.engine import Precision
from lmrc.stage2.examples import IGNORE_INDEX, TrainExample
from lmrc.training.schedule import length_grouped_batches


def collate(examples: Sequence[TrainExample], pad_id: int) -> dict[str, Any]:
    """Right-padded tensors; padding is masked in attention and labels."""
    n = max(len(e) for e in examples)
    ids = torch.full((len(examples), n), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), n), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), n), dtype=torch.long)
    for i, e in enumerate(examples):
        ids[i, : len(e)] = torch.tensor(e.input_ids)
        labels[i, : len(e)] = torch.tensor(e.labels)
        mask[i, : len(e)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def supports_logit_mask() -> bool:
    """transformers >= 5 computes logits only at the positions of a boolean `logits_to_keep` mask."""
    return hasattr(modeling_utils, "slice_logits_to_keep")


def answer_loss_sum(model: Any, batch: dict[str, Any], logit_mask: bool = True) -> torch.Tensor:
    """Summed next-token cross-entropy over the answer tokens of a batch (float32 logits)."""
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


class ExampleDataset(Dataset):
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


class AnswerLossTrainer(Trainer):
    """The Trainer with our batches and the answer-token loss; counts the tokens it trains on (`local_tokens`,
    reset by whoever reads it)."""

    # compute_loss divides by the step's answer-token count over all micro-batches and ranks itself.
    loss_is_scaled_for_ga = True

    def __init__(self, *args: Any, batch_sampler: LengthGroupedBatchSampler, logit_mask: bool, **kw: Any):
        super().__init__(*args, **kw)
        self.batch_sampler = batch_sampler
        self.logit_mask = logit_mask
        self.model_accepts_loss_kwargs = True  # count num_items_in_batch (labels[..., 1:] != -100)
        self.local_tokens = 0

    def get_train_dataloader(self) -> Any:
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


def training_arguments(
    cfg: Stage2Config,
    out: Path,
    total_steps: int,
    warmup: int,
    precision: Precision,
    *,
    main: bool,
    cuda: bool,
) -> TrainingArguments:
    """The Trainer's arguments: our batch sizes, schedule, precision and save cadence; logging every step (our
    callback writes metrics.jsonl), no reporting integrations, the progress bar only on rank 0's terminal.

    Build them before the model: under DeepSpeed ZeRO-3 this makes from_pretrained load the weights partitioned."""
    every = cfg.train.save_every_steps
    return TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=cfg.train.batch_size,
        gradient_accumulation_steps=cfg.train.grad_accum,
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


@contextmanager
def quiet_trainer_logs() -> Iterator[None]:
    """The Trainer prints its own progress lines at INFO; ours go to the log (and train.log) instead."""
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_warning()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
