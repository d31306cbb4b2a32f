"""Stage-1 training (`lmrc stage1 train`): AdamW, warmup + linear decay, selection on a tuning file, exact resume.

The recipe is ATLOP's (Zhou et al., 2021, Sec. 4.1), which LMRC's stage 1 follows (LMRC Appendix A, Table 6):
AdamW without weight decay, separate learning rates for the encoder and the heads, a linear warmup over the
first 6% of the optimizer steps then a linear decay to 0, gradients clipped to norm 1.0, batches of 4
documents. Batches group documents of similar length (less padding), in a seeded order per epoch.

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

Gradient accumulation and several processes: the micro-batches of an epoch (`batch_size` documents each; one
order for all processes) are taken in groups of `grad_accum * processes`; each process runs every
`processes`-th micro-batch of a group and each micro-batch's loss (a mean over its pairs) is divided by the size
of its group, so every optimizer step sees the mean of its group's micro-batch losses, including the shorter last
group of an epoch. N processes with `grad_accum` k thus take the same optimizer steps over the same documents as
one process with `grad_accum` N*k (the global batch). A process left without a micro-batch in a short last group
runs a zero-weighted one, so that all processes join the same gradient reductions.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lmrc.config import from_dict, read_yaml, save_config, to_dict
from lmrc.data.docred import Document, load_labelled, restrict_pairs
from lmrc.data.relations import RelationSet, load_relations
from lmrc.data.split import fold_indices
from lmrc.errors import LmrcError
from lmrc.hardware import cpu_capability, resolve_mixed_precision
from lmrc.io import append_jsonl, file_sha256, recover_dir
from lmrc.progress import Progress
from lmrc.stage1 import checkpoint as ckpt
from lmrc.stage1.config import Stage1Config, check_loss_name
from lmrc.training import StopRequest, capture_rng, changed_setting, linear_schedule, restore_rng

log = logging.getLogger(__name__)

# Config keys that may differ between a run and its `--resume` without changing what is computed.
_RESUMABLE_CHANGES = frozenset(
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


@dataclass
class _Position:
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


@dataclass
class _Data:
    relations: RelationSet
    train_docs: list[Document]
    train_features: list
    tune_docs: list[Document] | None
    tune_features: list | None
    train_reference: Any = None  # lmrc.eval.metrics.TrainReference (Ign F1, built once)
    loss_params: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------- public helpers


def relation_counts(docs: list[Document], relations: RelationSet) -> list[int]:
    """Training facts per relation, in label column order (AMTL sorts its segments by these)."""
    counts = [0] * len(relations)
    for doc in docs:
        for f in doc.facts or ():
            counts[relations.column(f.r) - 1] += 1
    return counts


def resolve_loss_params(config: Stage1Config, train_docs: list[Document], relations: RelationSet) -> dict:
    """The config's loss parameters plus what the training data decides (AMTL's relation frequencies)."""
    params = dict(config.loss.params)
    if config.loss.name == "amtl" and "segments" not in params and "relation_counts" not in params:
        params["relation_counts"] = relation_counts(train_docs, relations)
    return params


def model_kwargs(config: Stage1Config, num_logits: int, tokenizer) -> dict[str, Any]:
    """Stage1Model arguments besides the encoder, as JSON (stored in the checkpoint to rebuild the model)."""
    from lmrc.stage1.features import special_tokens

    name = config.loss.name
    specials = special_tokens(tokenizer)
    return {
        "num_logits": num_logits,
        "emb_size": config.model.emb_size,
        "block_size": config.model.block_size,
        "bilinear": config.model.resolved_bilinear(name),
        "n_layers_avg": config.model.resolved_layers(name),
        # MD-RE: three discriminators, each its own classifier on the shared pair representation (Sec. 3.3).
        "n_classifiers": 3 if name == "mdre" else 1,
        "window": config.model.window,
        "specials": {"start": list(specials.start), "end": list(specials.end), "sep": list(specials.sep)},
        "separate_extractors": config.model.separate_extractors,
    }


def seed_everything(seed: int) -> None:
    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def feature_cache_dir(config: Stage1Config) -> Path:
    from lmrc.model_store import default_cache_dir

    return (
        Path(config.data.cache_dir).expanduser()
        if config.data.cache_dir
        else default_cache_dir() / "features"
    )


def saved_run_config(output_dir: str | Path) -> Stage1Config:
    """The resolved config of an existing run (for `--resume` without `--config`)."""
    path = Path(output_dir) / ckpt.CONFIG_FILE
    if not path.is_file():
        raise LmrcError(f"{path}: not found; is {output_dir} a stage-1 training folder?")
    return from_dict(Stage1Config, read_yaml(path), str(path))


# ---------------------------------------------------------------------------------------------------- training


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
    with _torch_settings(config.train.num_threads, config.train.deterministic):
        return _Trainer(config, resume).run(stop_after_steps)


@contextlib.contextmanager
def _torch_settings(num_threads: int | None, deterministic: bool):
    """Process-wide torch settings for the run, restored afterwards."""
    threads, det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    if num_threads:
        torch.set_num_threads(num_threads)
    if deterministic:
        if torch.cuda.is_available():
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it for determinism
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(det)


# What `accelerate launch` sets for an engine other than DDP (a config file or a node's default config).
_SHARDED_ENGINE_ENV = {
    "ACCELERATE_USE_DEEPSPEED": "DeepSpeed",
    "ACCELERATE_USE_FSDP": "FSDP",
    "ACCELERATE_USE_MEGATRON_LM": "Megatron-LM",
}


def refuse_sharded_engine() -> None:
    """Stage 1 trains with DDP (or one process) only: one line instead of a failure deep inside the engine.

    Why: under DeepSpeed ZeRO-3 `prepare(model, optimizer)` without a dataloader fails on the "auto" micro-batch,
    and under FSDP the whole Stage1Model becomes one unit whose `state_dict()` on rank 0 reads sharded views. A
    RoBERTa-large classifier fits any training GPU, so sharding buys nothing; the accelerate configs in
    configs/accelerate are for stage 2 (scripts/launch.sh does not pass them to stage 1)."""
    from accelerate.utils import str_to_bool

    for var, name in _SHARDED_ENGINE_ENV.items():
        if str_to_bool(os.environ.get(var, "false") or "false"):
            raise LmrcError(
                f"stage 1 trains with DDP only, but accelerate launch set up {name} ({var}); launch it with "
                "`accelerate launch --multi_gpu` (scripts/train_stage1.sh does), the FSDP / DeepSpeed configs "
                "are for stage 2"
            )
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    if AcceleratorState._shared_state and AcceleratorState().distributed_type in (
        DistributedType.DEEPSPEED,
        DistributedType.FSDP,
        DistributedType.MEGATRON_LM,
    ):
        raise LmrcError(
            f"stage 1 trains with DDP only, but this process's accelerate state is "
            f"{AcceleratorState().distributed_type.value}; run stage 1 in its own `accelerate launch --multi_gpu`"
        )


def make_accelerator(cfg: Stage1Config, mixed_precision: str, cuda: bool) -> Any:
    """The run's Accelerator: DDP that tolerates unused parameters (a batch whose documents have no entity pairs
    leaves the heads without gradient), and a process group whose collectives wait `train.ddp_timeout` seconds.

    The timeout must be given here, where the process group is created: NCCL's default of 10 minutes would
    otherwise apply while rank 0 downloads or loads the encoder and the other ranks wait at the barrier."""
    from datetime import timedelta

    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

    return Accelerator(
        cpu=not cuda,
        mixed_precision=mixed_precision,
        kwargs_handlers=[
            DistributedDataParallelKwargs(find_unused_parameters=True),
            InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.train.ddp_timeout)),
        ],
    )


class _Trainer:
    def __init__(self, config: Stage1Config, resume: bool) -> None:
        self.config = config
        self.out = Path(config.output_dir)
        self.last_dir = self.out / "last"
        self.best_dir = self.out / "best"
        self.metrics_path = self.out / "metrics.jsonl"
        self.resume = resume
        self.step_losses: list[tuple[int, float]] = []
        self.evaluations: list[dict[str, Any]] = []
        self.pos = _Position()
        self._boundary: tuple[_Position, list[dict]] | None = None
        self._stop_request = StopRequest()
        self._stopped = False

    # ------------------------------------------------------------------------------------------------ setup

    def _check_output_dir(self) -> bool:
        """True when there is a run to resume; refuses to overwrite a run without --resume."""
        has_state = (self.last_dir / ckpt.STATE_FILE).is_file()
        if not self.resume:
            if has_state or (self.best_dir / ckpt.META_FILE).is_file():
                raise LmrcError(
                    f"{self.out}: holds a training run already; pass --resume to continue it, or choose another "
                    "--output-dir"
                )
            return False
        if not has_state:
            log.info("%s: nothing to resume, starting a new run", self.out)
            return False
        saved = saved_run_config(self.out)
        diff = changed_setting(
            to_dict(saved), to_dict(self.config), _RESUMABLE_CHANGES, keep=("loss.params",)
        )
        if diff is not None:
            key, old, new = diff
            raise LmrcError(
                f"{self.out / ckpt.CONFIG_FILE}: cannot resume with a different config: {key} was {old!r}, now {new!r}"
            )
        return True

    def _setup(self) -> bool:
        from lmrc.stage1.encoder import load_encoder

        cfg = self.config
        refuse_sharded_engine()
        cuda = torch.cuda.is_available()
        mp = resolve_mixed_precision(cfg.train.mixed_precision, cuda)
        log.info(
            "mixed precision: %s (train.mixed_precision=%s, CPU %s)",
            mp,
            cfg.train.mixed_precision,
            cpu_capability(),
        )
        if mp == "fp16" and not cuda:
            # fp16 autocast needs CUDA; bf16 autocast also runs on CPUs (2x faster where avx512_bf16/AMX exist).
            log.info("mixed_precision=fp16 needs CUDA; training in float32 on the CPU")
            mp = "no"
        if int(os.environ.get("WORLD_SIZE", "1")) == 1:
            # One process may train several models (cross-fitting, lmrc compare, tests) with different precisions;
            # accelerate keeps one global state and refuses a second mixed_precision unless it is reset.
            from accelerate.state import AcceleratorState

            AcceleratorState._reset_state(reset_partial_state=True)
        self.accelerator = make_accelerator(cfg, mp, cuda)
        if self.accelerator.is_main_process:  # an interrupted swap of last/ is undone once, on rank 0
            recover_dir(self.last_dir)
        self.accelerator.wait_for_everyone()
        resuming = self._check_output_dir()
        seed_everything(cfg.train.seed)
        documents = self._read_documents()  # a bad data file is reported before the encoder is loaded
        with self.accelerator.main_process_first():  # a hub model is downloaded once, by rank 0
            self.encoder, self.tokenizer = load_encoder(cfg.model.encoder)
        self.data = self._load_data(*documents)
        self._build_model()
        if self.accelerator.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.out / ckpt.CONFIG_FILE)
        return resuming

    def _read_documents(self) -> tuple[RelationSet, list[Document], list[Document] | None]:
        """The relation set, training and tuning documents (None without a tuning file), checked."""
        cfg = self.config
        relations = load_relations(cfg.data.path("rel_info"))
        train_path = cfg.data.path("train")
        all_train = restrict_pairs(
            load_labelled(train_path, relations, role="training"), cfg.data.pair_types, train_path
        )
        tune_path = cfg.data.path("tune")
        tune_docs = None
        if tune_path is not None:
            tune_docs = restrict_pairs(
                load_labelled(tune_path, relations, role="tuning"), cfg.data.pair_types, tune_path
            )
        return relations, all_train, tune_docs

    def _load_data(
        self, relations: RelationSet, all_train: list[Document], all_tune: list[Document] | None
    ) -> _Data:
        from lmrc.eval.metrics import TrainReference
        from lmrc.stage1.features import featurize_all

        cfg = self.config
        train_path = cfg.data.path("train")
        cache = feature_cache_dir(cfg)
        all_features = featurize_all(
            all_train,
            self.tokenizer,
            relations,
            cfg.model.max_length,
            cache,
            file_sha256(train_path),
            cfg.model.word_prefix_space,
        )
        keep = list(range(len(all_train)))
        if cfg.data.holdout_fold is not None:
            held = set(
                fold_indices(len(all_train), cfg.data.folds, cfg.data.fold_seed)[cfg.data.holdout_fold]
            )
            keep = [i for i in keep if i not in held]
            log.info(
                "cross-fitting: training on %d of %d documents (fold %d of %d held out)",
                len(keep),
                len(all_train),
                cfg.data.holdout_fold,
                cfg.data.folds,
            )
        train_docs = [all_train[i] for i in keep]
        train_features = [all_features[i] for i in keep]
        tune_docs = tune_features = None
        tune_path = cfg.data.path("tune")
        if tune_path is not None:
            tune_docs = all_tune
            overlap = {d.title for d in tune_docs} & {d.title for d in train_docs}
            if overlap:
                raise LmrcError(
                    f"{tune_path}: {len(overlap)} tuning documents are also in the training file "
                    f"{train_path} (e.g. {sorted(overlap)[0]!r}); split them apart with `lmrc data split`"
                )
            tune_features = featurize_all(
                tune_docs,
                self.tokenizer,
                relations,
                cfg.model.max_length,
                cache,
                file_sha256(tune_path),
                cfg.model.word_prefix_space,
            )
        else:
            log.warning("no tuning file (data.tune): no model selection, best/ will hold the last epoch")
        return _Data(
            relations=relations,
            train_docs=train_docs,
            train_features=train_features,
            tune_docs=tune_docs,
            tune_features=tune_features,
            train_reference=TrainReference.from_documents(train_docs),
            loss_params=resolve_loss_params(cfg, train_docs, relations),
        )

    def _build_model(self) -> None:
        from lmrc.stage1.losses import build_loss

        cfg = self.config
        self.loss = build_loss(cfg.loss.name, **self.data.loss_params)
        self.model_kwargs = model_kwargs(cfg, self.loss.num_logits(len(self.data.relations)), self.tokenizer)
        self.model = ckpt.build_model(self.encoder, self.model_kwargs)
        self.select_metric = cfg.train.resolved_select_metric(cfg.loss.name)
        if self.select_metric in ("f1", "ign_f1") and not self.loss.per_relation:
            raise LmrcError(
                f"config: train.select_metric {self.select_metric!r} needs relation predictions; "
                f"the {cfg.loss.name!r} head has none (use pair_f1)"
            )

    def _optimizer(self) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
        cfg = self.config.train
        enc = [p for p in self.model.encoder_parameters() if p.requires_grad]
        head = [p for p in self.model.head_parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(
            [{"params": enc, "lr": cfg.lr_encoder}, {"params": head, "lr": cfg.lr_head}],
            eps=cfg.adam_eps,
            weight_decay=cfg.weight_decay,
        )
        warmup = int(cfg.warmup_ratio * self.pos.total_steps)  # ATLOP: warmup_steps = int(total * ratio)
        total = self.pos.total_steps
        scheduler = linear_schedule(optimizer, warmup, total)
        return optimizer, scheduler

    # ------------------------------------------------------------------------------------------- batches

    @property
    def _group_size(self) -> int:
        """Micro-batches per optimizer step over all processes."""
        return self.config.train.grad_accum * self.accelerator.num_processes

    def _local_batches(self, epoch: int) -> list[list[int]]:
        """The micro-batches of an epoch, in one order for all processes (a pure function of seed and epoch);
        `_step_batches` deals each step's group out to the processes."""
        from lmrc.stage1.features import length_grouped_batches

        cfg = self.config.train
        if cfg.length_grouped:
            batches = length_grouped_batches(self.data.train_features, cfg.batch_size, seed=cfg.seed + epoch)
        else:  # ATLOP's DataLoader(shuffle=True): a seeded permutation cut into batches
            order = list(range(len(self.data.train_features)))
            random.Random(cfg.seed + epoch).shuffle(order)
            batches = [order[i : i + cfg.batch_size] for i in range(0, len(order), cfg.batch_size)]
        return batches

    def _step_batches(self, group: list[list[int]]) -> list[tuple[list[int], int, int]]:
        """This process's micro-batches of one step's group, each with its loss weight: every process runs the
        same number (DDP reduces in lockstep); a missing one is the group's first, weighted 0. The weights make
        the gradient averaged over the processes the mean over the group's micro-batches."""
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        mine = group[rank::world]
        passes = math.ceil(len(group) / world)
        return [
            (mine[j], world, len(group)) if j < len(mine) else (group[0], 0, len(group))
            for j in range(passes)
        ]

    # ------------------------------------------------------------------------------------------------ state

    def _save_last(self, pos: _Position, rng: list[dict]) -> None:
        """Write `last/`: a full checkpoint plus the resumable state at the given step boundary."""
        from accelerate.utils import gather_object

        rng_all = gather_object([rng[0]]) if self.accelerator.num_processes > 1 else rng
        if self.accelerator.is_main_process:
            state = ckpt.TrainingState(
                trainer=dataclasses.asdict(pos),
                optimizer=self.optimizer.state_dict(),
                scheduler=self.scheduler.state_dict(),
                rng=rng_all,
                scaler=self._scaler_state(),
            )
            self._save_checkpoint(self.last_dir, {"state": ckpt.training_state_writer(state)}, pos)
        self.accelerator.wait_for_everyone()

    def _save_checkpoint(
        self, path: Path, extra: dict | None, pos: _Position, metrics: dict | None = None
    ) -> None:
        selection = {
            "metric": self.select_metric,
            "value": pos.best_value,
            "step": pos.global_step,
            "epoch": pos.epoch + pos.batch_pos / max(1, len(self.batches) if self.batches else 1),
            "tune_metrics": metrics or {},
        }
        ckpt.save_checkpoint(
            path,
            self.accelerator.unwrap_model(self.model),
            self.tokenizer,
            self.config,
            self.data.relations,
            self.config.loss.name,
            self.data.loss_params,
            self.model_kwargs,
            max_length=self.config.model.max_length,
            selection=selection,
            extra_files=extra,
        )

    def _scaler_state(self) -> dict | None:
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is None:
            return None
        return {k: (float(v) if hasattr(v, "item") else v) for k, v in scaler.state_dict().items()}

    def _restore(self) -> None:
        from safetensors.torch import load_file

        state = ckpt.load_training_state(self.last_dir)
        weights = load_file(str(self.last_dir / ckpt.WEIGHTS_FILE))
        self.accelerator.unwrap_model(self.model).load_state_dict(weights, strict=True)
        saved = _Position(**state.trainer)
        if (saved.steps_per_epoch, saved.total_steps) != (self.pos.steps_per_epoch, self.pos.total_steps):
            raise LmrcError(
                f"{self.last_dir / ckpt.STATE_FILE}: the saved run has {saved.total_steps} optimizer steps, this "
                f"config and data give {self.pos.total_steps}; the training data changed since the run started"
            )
        self.pos = saved
        self.optimizer.load_state_dict(state.optimizer)
        self.scheduler.load_state_dict(state.scheduler)
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is not None and state.scaler is not None:
            scaler.load_state_dict(state.scaler)
        elif scaler is not None:
            log.warning(
                "%s: no loss-scaler state saved (an older run); the fp16 scale restarts", self.last_dir
            )
        rank = self.accelerator.process_index
        if rank >= len(state.rng):
            raise LmrcError(f"{self.last_dir}: saved with {len(state.rng)} processes, cannot resume on more")
        restore_rng(state.rng[rank])
        log.info(
            "resuming %s at epoch %d, micro-batch %d, optimizer step %d of %d",
            self.out,
            self.pos.epoch + 1,
            self.pos.batch_pos,
            self.pos.global_step,
            self.pos.total_steps,
        )

    def _mark_boundary(self) -> None:
        """Remember the state right after an optimizer step (what an interrupt saves)."""
        self._boundary = (dataclasses.replace(self.pos), [capture_rng()])

    # ------------------------------------------------------------------------------------------- evaluation

    def _evaluate(self) -> dict[str, Any]:
        from lmrc.stage1.inference import infer_logits, tune_metrics

        model = self.accelerator.unwrap_model(self.model)
        with self.accelerator.autocast():
            logits = infer_logits(
                model, self.data.tune_features, self.config.train.eval_batch_size, self.accelerator.device
            )
        model.train()
        return tune_metrics(
            self.loss,
            logits,
            self.data.tune_docs,
            self.data.tune_features,
            self.data.relations,
            self.data.train_reference,
        )

    def _run_evaluation(self) -> bool:
        """Evaluate, log, keep the best checkpoint; True when early stopping says stop."""
        from accelerate.utils import broadcast_object_list

        pos = self.pos
        start = time.perf_counter()
        metrics = self._evaluate() if self.accelerator.is_main_process else {}
        if self.accelerator.num_processes > 1:  # every process must take the same decisions
            metrics = broadcast_object_list([metrics])[0]
        value = metrics.get(self.select_metric)
        improved = value is not None and (pos.best_value is None or value > pos.best_value)
        if improved:
            pos.best_value, pos.best_step, pos.bad_evals = value, pos.global_step, 0
            if self.accelerator.is_main_process:
                self._save_checkpoint(self.best_dir, None, pos, metrics)
        else:
            pos.bad_evals += 1
        record = {
            "epoch": round(pos.epoch + pos.batch_pos / max(1, len(self.batches)), 4),
            "step": pos.global_step,
            "train_loss": pos.loss_sum / pos.loss_steps if pos.loss_steps else None,
            "lr_encoder": self.optimizer.param_groups[0]["lr"],
            "lr_head": self.optimizer.param_groups[1]["lr"],
            "tune": metrics,
            "select_metric": self.select_metric,
            "value": value,
            "best": improved,
            "best_value": pos.best_value,
            "eval_s": round(time.perf_counter() - start, 2),
            "elapsed_s": round(pos.elapsed_s, 1),
        }
        if self.accelerator.is_main_process:
            append_jsonl(self.metrics_path, record)
        self.evaluations.append(record)
        log.info(
            "eval at step %d (epoch %.2f): %s = %s (best %s at step %s)%s",
            pos.global_step,
            record["epoch"],
            self.select_metric,
            _fmt(value),
            _fmt(pos.best_value),
            pos.best_step,
            "  [saved best/]" if improved else "",
        )
        pos.loss_sum, pos.loss_steps, pos.eval_pending = 0.0, 0, False
        patience = self.config.train.patience
        if patience and pos.bad_evals >= patience:
            log.info("early stopping: %d evaluations without improvement", pos.bad_evals)
            pos.stopped_early = True
            return True
        return False

    # ------------------------------------------------------------------------------------------------- loop

    def run(self, stop_after_steps: int | None) -> Stage1TrainResult:
        cfg = self.config.train
        resuming = self._setup()
        n_batches = len(self._local_batches(0))
        if n_batches == 0:
            raise LmrcError(f"{self.config.data.train}: no training documents")
        self.pos.steps_per_epoch = math.ceil(n_batches / self._group_size)
        self.pos.total_steps = self.pos.steps_per_epoch * cfg.epochs
        self.optimizer, self.scheduler = self._optimizer()
        self.model, self.optimizer = self.accelerator.prepare(self.model, self.optimizer)
        self.batches = self._local_batches(0)
        if resuming:
            self._restore()
        if self.accelerator.is_main_process:
            self._trim_metrics_log()
        self._mark_boundary()
        if self.pos.done:
            log.info("%s: training already finished (step %d)", self.out, self.pos.global_step)
            return self._result()
        try:
            with StopRequest() as self._stop_request:
                self._loop(stop_after_steps)
        except KeyboardInterrupt:
            # A second Ctrl-C, or one raised inside a step: with several processes a save would need every
            # process to join a collective, so the last save is kept (a first Ctrl-C / SIGTERM saves on all).
            if self._boundary is not None and self.accelerator.num_processes == 1 and not self._stopped:
                log.warning(
                    "interrupted: saving the state after step %d to %s",
                    self._boundary[0].global_step,
                    self.last_dir,
                )
                self._save_last(*self._boundary)
            raise
        return self._result()

    def _trim_metrics_log(self) -> None:
        """Drop metrics.jsonl records the restored state has not reached (written after the last save), so a
        resumed run's log reads as the uninterrupted run's would."""
        from lmrc.io import atomic_write_text, read_jsonl

        records = read_jsonl(self.metrics_path)
        pos = self.pos
        keep = [
            r
            for r in records
            if r.get("step", 0) < pos.global_step
            or (r.get("step") == pos.global_step and not pos.eval_pending)
        ]
        if pos.global_step == 0:
            keep = []
        if len(keep) != len(records):
            log.info(
                "%s: dropping %d records written after the saved state",
                self.metrics_path,
                len(records) - len(keep),
            )
            atomic_write_text(
                self.metrics_path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in keep)
            )

    def _loop(self, stop_after_steps: int | None) -> None:
        """The epochs and their optimizer steps, with the bookkeeping that makes a stop at any step resumable.

        Not split: the order of the bookkeeping after a step (position, consistent-state boundary, interrupt,
        evaluation, save, pause) is the resume contract; it reads as one sequence."""
        cfg = self.config.train
        pos = self.pos
        tune = self.data.tune_docs is not None
        steps_this_call = 0
        # With log_every_steps the step lines below tell the progress; the bar's own lines would repeat them.
        progress = Progress(
            pos.total_steps,
            "stage1 train",
            "step",
            initial=pos.global_step,
            every_s=float("inf") if cfg.log_every_steps else 30.0,
            logger=log,
        )
        clock = time.perf_counter()
        self.model.train()
        try:
            if (
                pos.eval_pending
            ):  # the state was saved with an evaluation due (it was interrupted): run it now
                self.batches = self._local_batches(min(pos.epoch, cfg.epochs - 1))
                stop = self._run_evaluation() if tune else False
                self._mark_boundary()
                if stop or pos.epoch >= cfg.epochs:
                    return self._finish()
                self._save_last(*self._boundary)
                clock = time.perf_counter()
            while pos.epoch < cfg.epochs:
                self.batches = self._local_batches(pos.epoch)
                epoch_loss, epoch_steps = 0.0, 0
                while pos.batch_pos < len(self.batches):
                    group = self.batches[pos.batch_pos : pos.batch_pos + self._group_size]
                    step_loss, stop = self._optimizer_step(group)
                    pos.global_step += 1
                    pos.batch_pos += len(group)
                    pos.loss_sum += step_loss
                    pos.loss_steps += 1
                    now = time.perf_counter()
                    pos.elapsed_s += now - clock
                    clock = now
                    due_eval = bool(
                        tune and cfg.eval_every_steps and pos.global_step % cfg.eval_every_steps == 0
                    )
                    pos.eval_pending = due_eval
                    self._mark_boundary()
                    if stop:  # Ctrl-C / SIGTERM on some process: all agree, save this step, stop
                        log.warning(
                            "interrupted: saving the state after step %d to %s",
                            pos.global_step,
                            self.last_dir,
                        )
                        self._save_last(*self._boundary)
                        self._stopped = True
                        raise KeyboardInterrupt
                    epoch_loss += step_loss
                    epoch_steps += 1
                    steps_this_call += 1
                    self.step_losses.append((pos.global_step, step_loss))
                    progress.update(1, epoch=pos.epoch + 1, loss=f"{epoch_loss / epoch_steps:.4f}")
                    if cfg.log_every_steps and pos.global_step % cfg.log_every_steps == 0:
                        self._log_step(step_loss, epoch_loss / epoch_steps)
                    saved = False
                    if due_eval:
                        stop = self._run_evaluation()
                        self._mark_boundary()
                        if stop:
                            return self._finish()
                        self._save_last(*self._boundary)
                        saved = True
                    elif cfg.save_every_steps and pos.global_step % cfg.save_every_steps == 0:
                        self._save_last(*self._boundary)
                        saved = True
                    if stop_after_steps is not None and steps_this_call >= stop_after_steps:
                        if not saved:
                            self._save_last(*self._boundary)
                        log.info("stopping after %d steps as asked; continue with --resume", steps_this_call)
                        return
                    if saved:
                        clock = time.perf_counter()
                if self._end_epoch(tune):
                    return self._finish()
                clock = time.perf_counter()
            self._finish()
        finally:
            progress.close()

    def _optimizer_step(self, group: list[list[int]]) -> tuple[float, bool]:
        """One optimizer step over a group of micro-batches dealt to the processes (gradient accumulation).

        Returns the step's loss (the mean over the group, summed over processes) and whether any process was
        asked to stop (Ctrl-C / SIGTERM), agreed in the same all-reduce."""
        from lmrc.stage1.features import collate

        cfg = self.config.train
        mine = self._step_batches(group)
        step_loss = 0.0
        for j, (batch, num, den) in enumerate(mine):
            inputs = collate([self.data.train_features[i] for i in batch])
            sync = j == len(mine) - 1
            ctx = contextlib.nullcontext() if sync else self.accelerator.no_sync(self.model)
            with ctx:
                step_loss += self._micro_step(inputs, num, den)
        step_loss, stop = self._global_loss(step_loss, self._stop_request.requested)
        if cfg.max_grad_norm > 0:
            self.accelerator.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
        self._boundary = None  # until the step is recorded, no consistent state to save
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return step_loss, stop

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

    def _end_epoch(self, tune: bool) -> bool:
        """Move to the next epoch, evaluate when due and save; True when training ends here.

        The position moves to the next epoch before its evaluation, so that an interrupted evaluation is re-run
        on resume (eval_pending)."""
        cfg, pos = self.config.train, self.pos
        pos.epoch += 1
        pos.batch_pos = 0
        just_evaluated = bool(self.evaluations) and self.evaluations[-1]["step"] == pos.global_step
        pos.eval_pending = bool(
            tune and cfg.eval_every_epochs and pos.epoch % cfg.eval_every_epochs == 0 and not just_evaluated
        )
        self._mark_boundary()
        stop = False
        if pos.eval_pending:
            stop = self._run_evaluation()
            self._mark_boundary()
        if pos.epoch >= cfg.epochs or stop:
            return True
        self._save_last(*self._boundary)
        return False

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

    def _global_loss(self, local: float, stop: bool) -> tuple[float, bool]:
        """The step loss over all processes, and whether any process was asked to stop (one small all-reduce;
        the same values on every process)."""
        if self.accelerator.num_processes == 1:
            return local, stop
        t = torch.tensor([local, float(stop)], dtype=torch.float64, device=self.accelerator.device)
        total = self.accelerator.reduce(t, "sum")
        return float(total[0]), bool(total[1] > 0)

    def _finish(self) -> None:
        pos = self.pos
        if pos.epoch < self.config.train.epochs and not pos.stopped_early:
            return
        pos.done = True
        self._mark_boundary()
        if self.accelerator.is_main_process and not (self.best_dir / ckpt.META_FILE).is_file():
            log.info("no evaluation selected a model: best/ holds the final weights")
            self._save_checkpoint(self.best_dir, None, pos)
        self._save_last(*self._boundary)
        from lmrc.hardware import gpu_memory_line

        if torch.cuda.is_available():
            log.info("%s", gpu_memory_line())
        log.info(
            "training finished after %d steps (%.1f min); best %s = %s at step %s",
            pos.global_step,
            pos.elapsed_s / 60,
            self.select_metric,
            _fmt(pos.best_value),
            pos.best_step,
        )

    def _result(self) -> Stage1TrainResult:
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
        )


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"
