"""LoRA fine-tuning of the stage-2 LLM (`lmrc stage2 train`).

A plain training loop (through `accelerate`, so `accelerate launch` gives multi-GPU data parallelism): AdamW on
the LoRA weights, linear warmup then linear decay (LMRC Table 7 gives warmup steps), gradient clipping, gradient
accumulation, length-grouped batches with right padding. The loss is the mean cross-entropy over the answer
tokens of an optimizer step (prompt tokens masked); logits are computed only at answer positions, which saves
the vocabulary projection over the long prompts.

Every `save_every_steps` optimizer steps the complete training state (adapter weights, optimizer, scheduler, RNG
states, position in the data) is written to `<output_dir>/last` by a write-then-rename, so a killed run continues
with `--resume` and repeats the very same losses. The finished run saves the adapter (safetensors), tokenizer,
resolved config, prompt template and relation set to `<output_dir>`, which is all `lmrc stage2 predict` needs.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmrc.config import expand_path, save_config, to_dict
from lmrc.data.candidates import load_candidates
from lmrc.data.docred import Document, load_documents, restrict_pairs
from lmrc.data.relations import RelationSet, load_relations
from lmrc.errors import LmrcError
from lmrc.io import append_jsonl, atomic_write_json, atomic_write_text, read_jsonl, recover_dir, replace_dir
from lmrc.stage2.config import Stage2Config, load_stage2_config
from lmrc.stage2.examples import IGNORE_INDEX, ExampleBuilder, ExampleStats, TrainExample
from lmrc.stage2.modeling import (
    ADAPTER_CONFIG,
    CONFIG_FILE,
    RELATIONS_FILE,
    TEMPLATE_FILE,
    load_base_model,
    load_tokenizer,
    resolve_dtype,
    resolve_model_path,
    wrap_lora,
)
from lmrc.stage2.prompts import PromptEncoder, PromptTemplate, default_prompts_dir, load_template
from lmrc.training import (
    capture_rng,
    changed_setting,
    length_grouped_batches,
    linear_schedule,
    restore_rng,
)

log = logging.getLogger(__name__)

STATE_DIR = "last"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "train_summary.json"
# Changing these between a run and its --resume is harmless; any other difference is refused.
RESUMABLE_CHANGES = (
    "output_dir",
    "train.max_steps",
    "train.max_tokens",  # like max_steps: where to stop (the schedule's length changes; a warning says so)
    "train.save_every_steps",
    "train.log_every_steps",
    "train.num_threads",
    "train.gradient_checkpointing",  # memory for compute; the same losses (tests/test_stage2_train.py)
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
    for doc in docs:
        if not doc.labelled:
            raise LmrcError(
                f'{train_path}: document {doc.index} ("{doc.title}") has no labels; training needs them'
            )
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


def steps_for_tokens(
    lengths: Sequence[int], cfg: Stage2Config, steps_per_epoch: int, world: int, budget: int
) -> int:
    """The first step at which the sequences trained on (prompt + answer tokens, no padding) reach `budget`.

    The batch order depends on (seed, epoch) only, so the count is known before training: two adapters given
    the same budget see the same number of LLM tokens (the comparison's fair budget for rc vs direct).
    """
    bs, ga = cfg.train.batch_size, cfg.train.grad_accum
    seen, step = 0, 0
    for epoch in range(cfg.train.epochs or 1):
        batches = length_grouped_batches(lengths, bs, cfg.train.seed + epoch)
        windows = [batches[i : i + ga] for i in range(0, len(batches), ga)]
        for in_epoch in range(steps_per_epoch):
            for rank in range(world):
                window = windows[(in_epoch * world + rank) % len(windows)]
                seen += sum(lengths[j] for b in window for j in b)
            step += 1
            if seen >= budget:
                return step
    return step


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
    recover_dir(output_dir / STATE_DIR)
    d = output_dir / STATE_DIR
    return d if (d / "state.json").is_file() else None


def save_state(output_dir: Path, model: Any, optimizer: Any, scheduler: Any, progress: dict) -> None:
    import torch
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    tmp = output_dir / (STATE_DIR + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    weights = {k: v.detach().to("cpu").contiguous() for k, v in get_peft_model_state_dict(model).items()}
    save_file(weights, str(tmp / "adapter.safetensors"))
    torch.save(
        {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": capture_rng()},
        tmp / "optimizer.pt",
    )
    # state.json last: its presence marks a complete folder.
    atomic_write_json(tmp / "state.json", progress, indent=2)
    replace_dir(tmp, output_dir / STATE_DIR)


def load_state(state_dir: Path, model: Any, optimizer: Any, scheduler: Any) -> dict:
    import torch
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    progress = json.loads((state_dir / "state.json").read_text(encoding="utf-8"))
    set_peft_model_state_dict(model, load_file(str(state_dir / "adapter.safetensors")))
    blob = torch.load(state_dir / "optimizer.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    restore_rng(blob["rng"])
    return progress


def _check_resume_config(saved: Stage2Config, cfg: Stage2Config, where: Path) -> None:
    diff = changed_setting(to_dict(saved), to_dict(cfg), RESUMABLE_CHANGES)
    if diff is not None:
        key, old, new = diff
        raise LmrcError(
            f"{where}: cannot resume: {key} was {old!r} in the interrupted run, now {new!r} "
            "(use the same config, or another --output-dir)"
        )


# ---------------------------------------------------------------------------------------------------------------
# The loop


def prepare_output_dir(output_dir: Path, resume: bool) -> Path | None:
    """The state folder to resume from (None: start afresh); refuses to overwrite another run."""
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


def train(
    cfg: Stage2Config,
    output_dir: str | os.PathLike | None = None,
    resume: bool = False,
    on_step: Callable[[dict], None] | None = None,
    stop_after_steps: int | None = None,
) -> TrainResult:
    """Fine-tune LoRA adapters as configured, or continue an interrupted run (`resume`).

    `stop_after_steps` pauses after that many steps of this call (state saved; continue with `resume`), to
    time-box long CPU runs. `on_step` receives each step's metrics record. Ctrl-C (KeyboardInterrupt) saves the
    state of the last finished step before re-raising.
    """
    import torch
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    out = Path(output_dir or cfg.output_dir)
    cfg = copy.deepcopy(cfg)  # the caller's config stays as given; the saved one names the output folder
    cfg.output_dir = str(out)
    state_dir = prepare_output_dir(out, resume)
    if state_dir is not None:
        _check_resume_config(load_stage2_config(out / CONFIG_FILE), cfg, out / CONFIG_FILE)
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        # A stage-1 run earlier in this process (lmrc compare) may have left accelerate's global state in bf16
        # autocast; stage 2 sets its precision through the weights' dtype instead.
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)
    accelerator = Accelerator(mixed_precision="no")
    main = accelerator.is_main_process
    random.seed(cfg.train.seed)
    torch.manual_seed(cfg.train.seed)

    # Data first: a bad file fails before minutes of model loading.
    relations, docs = load_training_documents(cfg)
    template, template_text = load_training_template(cfg)
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

    if main:
        out.mkdir(parents=True, exist_ok=True)
        if state_dir is None:
            save_config(cfg, out / CONFIG_FILE)
            if (out / METRICS_FILE).exists():
                (out / METRICS_FILE).unlink()

    model = load_base_model(
        cfg, model_path, accelerator.device, training=True, device_index=accelerator.local_process_index
    )
    model = wrap_lora(model, cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)

    lengths = [len(e) for e in examples]
    world = accelerator.num_processes
    bs, ga = cfg.train.batch_size, cfg.train.grad_accum
    windows_per_epoch = math.ceil(math.ceil(len(examples) / bs) / ga)
    steps_per_epoch = math.ceil(windows_per_epoch / world)
    epochs = cfg.train.epochs or 1
    total_steps = steps_per_epoch * epochs
    if cfg.train.max_steps is not None:
        total_steps = min(total_steps, cfg.train.max_steps)
    if cfg.train.max_tokens is not None:
        total_steps = min(
            total_steps, steps_for_tokens(lengths, cfg, steps_per_epoch, world, cfg.train.max_tokens)
        )
    warmup = cfg.train.warmup_steps or 0
    if warmup >= total_steps:
        log.warning(
            "warmup_steps=%d >= %d training steps: the learning rate never reaches train.lr",
            warmup,
            total_steps,
        )
    scheduler = linear_schedule(optimizer, warmup, total_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    unwrapped = accelerator.unwrap_model(model)

    step = 0
    if state_dir is not None:
        progress = load_state(state_dir, unwrapped, optimizer, scheduler)
        step = int(progress["step"])
        log.info("resumed from %s at step %d of %d", state_dir, step, total_steps)
        if progress.get("total_steps") != total_steps:
            log.warning(
                "the interrupted run planned %s steps, this one %d (max_steps or the data changed): the learning "
                "rate schedule differs from an uninterrupted run",
                progress.get("total_steps"),
                total_steps,
            )
        if main:  # forget metrics logged after the saved state: those steps run again
            kept = [r for r in read_jsonl(out / METRICS_FILE) if r.get("step", 0) <= step]
            atomic_write_text(out / METRICS_FILE, "".join(json.dumps(r) + "\n" for r in kept))

    logit_mask = _supports_logit_mask()
    model.train()
    losses: list[float] = []
    tokens_run = 0
    saved_step = step if state_dir is not None else -1
    boundary_rng = capture_rng()
    start = time.perf_counter()
    bar = tqdm(
        total=total_steps,
        initial=step,
        desc="stage2 train",
        disable=None if main else True,
        dynamic_ncols=True,
    )
    running = None
    epoch_windows: dict[int, list] = {}
    stop_at = total_steps if stop_after_steps is None else min(total_steps, step + stop_after_steps)

    def save(at: int) -> None:
        nonlocal saved_step
        accelerator.wait_for_everyone()
        if main:
            save_state(out, unwrapped, optimizer, scheduler, {"step": at, "total_steps": total_steps})
        saved_step = at

    try:
        while step < stop_at:
            epoch, in_epoch = divmod(step, steps_per_epoch)
            if epoch not in epoch_windows:  # the order of an epoch depends on (seed, epoch) only: resumable
                batches = length_grouped_batches(lengths, bs, cfg.train.seed + epoch)
                epoch_windows = {epoch: [batches[i : i + ga] for i in range(0, len(batches), ga)]}
            windows = epoch_windows[epoch]
            # Each step takes `world` windows, one per process; the last group wraps around (DistributedSampler).
            window = windows[(in_epoch * world + accelerator.process_index) % len(windows)]
            collated = [collate([examples[j] for j in b], tokenizer.pad_token_id) for b in window]
            n_answer = sum(int((c["labels"] != IGNORE_INDEX).sum()) for c in collated)
            loss_total = 0.0
            for i, batch in enumerate(collated):
                batch = {k: v.to(accelerator.device) for k, v in batch.items()}
                last = i == len(collated) - 1
                ctx = accelerator.no_sync(model) if not last and world > 1 else contextlib.nullcontext()
                with ctx:
                    loss_sum = answer_loss_sum(model, batch, logit_mask)
                    # Mean over the answer tokens of the whole step, not of each micro-batch.
                    accelerator.backward(loss_sum / max(1, n_answer))
                loss_total += float(loss_sum.detach())
                tokens_run += int(batch["attention_mask"].sum())
            grad_norm = accelerator.clip_grad_norm_(params, cfg.train.max_grad_norm)
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            boundary_rng = capture_rng()
            loss = loss_total / max(1, n_answer)
            if world > 1:
                loss = float(accelerator.reduce(torch.tensor(loss, device=accelerator.device), "mean"))
            losses.append(loss)
            running = loss if running is None else 0.9 * running + 0.1 * loss
            elapsed = time.perf_counter() - start
            record = {
                "step": step,
                "epoch": round(step / steps_per_epoch, 4),
                "loss": loss,
                "lr": lr,
                "grad_norm": float(grad_norm) if grad_norm is not None else None,
                "answer_tokens": n_answer,
                "tokens_per_s": round(tokens_run / elapsed, 2) if elapsed > 0 else None,
                "elapsed_s": round(elapsed, 2),
            }
            if main and (step % cfg.train.log_every_steps == 0 or step == total_steps):
                append_jsonl(out / METRICS_FILE, record)
            bar.update(1)
            bar.set_postfix(loss=f"{running:.4f}", lr=f"{lr:.2e}")
            if bar.disable and main and (step % cfg.train.log_every_steps == 0 or step == total_steps):
                log.info(
                    "step %d/%d loss %.4f (running %.4f) lr %.2e %s tokens/s",
                    step, total_steps, loss, running, lr, record["tokens_per_s"],
                )  # fmt: skip
            every = cfg.train.save_every_steps
            if step == stop_at or (every and step % every == 0):
                save(step)
            if on_step is not None:
                on_step(record)
    except KeyboardInterrupt:
        # Ctrl-C / SIGTERM: keep the steps finished so far. The RNG is rewound to the last step boundary, so the
        # resumed run draws the same dropout masks as an uninterrupted one.
        if step > saved_step and step > 0:
            log.warning("interrupted: saving the state after step %d to %s", step, out / STATE_DIR)
            restore_rng(boundary_rng)
            save(step)
        raise
    finally:
        bar.close()
    seconds = time.perf_counter() - start
    finished = step >= total_steps

    accelerator.wait_for_everyone()
    if main:
        if finished:
            _save_final(out, unwrapped, tokenizer, cfg, template_text, relations)
        summary = {
            "finished": finished,
            "examples": stats.to_dict(),
            "documents": len(docs),
            "steps": step,
            "total_steps": total_steps,
            "steps_per_epoch": steps_per_epoch,
            "seconds_this_call": round(seconds, 2),
            "tokens_this_call": tokens_run,
            "tokens_per_s": round(tokens_run / seconds, 2) if seconds > 0 else None,
            "final_loss": losses[-1] if losses else None,
            "device": str(accelerator.device),
            "processes": world,
            "dtype": str(resolve_dtype(cfg.dtype, accelerator.device)).replace("torch.", ""),
        }
        atomic_write_json(out / SUMMARY_FILE, summary, indent=2)
    return TrainResult(out, step, total_steps, losses, seconds, tokens_run, stats, finished)


def _save_final(
    out: Path, model: Any, tokenizer: Any, cfg: Stage2Config, template_text: str, relations: RelationSet
) -> None:
    """The adapter folder: written to a temporary name first, then the files are moved in."""
    tmp = out / ".final.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(str(tmp), safe_serialization=True)
    tokenizer.save_pretrained(str(tmp))
    atomic_write_text(tmp / TEMPLATE_FILE, template_text)
    atomic_write_json(tmp / RELATIONS_FILE, {rid: relations.name(rid) for rid in relations.ids}, indent=1)
    save_config(cfg, tmp / CONFIG_FILE)
    # adapter_config.json marks a finished adapter, so it is moved in last.
    names = sorted(p.name for p in tmp.iterdir())
    names.sort(key=lambda n: n == ADAPTER_CONFIG)
    for name in names:
        os.replace(tmp / name, out / name)
    tmp.rmdir()
