"""Stage-1 configuration: typed sections whose defaults are the papers' values; YAML files only override them.

Defaults follow ATLOP (Zhou et al., 2021, Sec. 4.1: BERT-base encoder lr 5e-5, classifier 1e-4, warmup ratio
0.06, batch 4, gradient norm 1.0, embedding 768, block 64) and LMRC's stage-1 settings (Table 6: 30 epochs,
AdamW, linear warmup over the first 6% of steps). The encoder default is `minilm`, a BERT-size model, so the
BERT-base learning rate applies; the RoBERTa-large values live in `configs/stage1_roberta_large_redocred.yaml`.

Paths may contain environment variables (`${LMRC_DATA_DIR}/redocred/rel_info.json`); they are expanded when a
path is used, not when the config is loaded, so the saved config stays portable and a checkpoint's config can
be read on a machine where the variable is not set.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmrc.config import expand_path, load_config
from lmrc.errors import LmrcError

# `lmrc data split ${LMRC_DATA_DIR}/redocred/train_450.json --ratios 0.9,0.1 --seed 13 --out-dir data/splits`
# writes part 0 (90%, training) and part 1 (10%, tuning); dev_50.json is the report set, never used here.
DEFAULT_TRAIN = "data/splits/train_450_split0.json"
DEFAULT_TUNE = "data/splits/train_450_split1.json"
DEFAULT_REL_INFO = "${LMRC_DATA_DIR}/redocred/rel_info.json"

BILINEAR = ("grouped", "full")
PAPER_HEAD = "atl"  # ATLOP's adaptive-threshold loss: the default head
AUTO_HEAD = "auto"  # loss.name: auto: chosen by the training corpus's size (lmrc/stage1/small_corpus.py)
MIXED_PRECISION = ("auto", "no", "fp16", "bf16")
SELECT_METRICS = ("f1", "ign_f1", "pair_f1", "pair_recall")


@dataclass
class ModelConfig:
    encoder: str = (
        "minilm"  # a packaged default, a local folder or a Hugging Face id (lmrc.models.store.resolve)
    )
    emb_size: int = 768  # ATLOP Sec. 4.1
    block_size: int = 64  # ATLOP Sec. 4.1 (grouped bilinear)
    bilinear: str | None = None  # None: "full" for bce (LMRC Eq. 5, a d x d W), "grouped" for the others
    n_layers_avg: int | None = None  # None: 3 for mdre (MD-RE averages the last 3 layers), 1 otherwise
    max_length: int | None = None  # word-piece cap per document; None: none (long documents are windowed)
    window: int | None = None  # tokens per encoder call; None: the encoder's max_position_embeddings
    separate_extractors: bool = False  # mdre: each discriminator gets its own W_h, W_t (default: shared)
    # Byte-level BPE (RoBERTa): "auto" tokenises each word as it reads in running text (with its leading space, as
    # the encoder was pre-trained); "no" tokenises words on their own, as the reference ATLOP code does.
    word_prefix_space: str = "auto"

    def __post_init__(self) -> None:
        if self.word_prefix_space not in ("auto", "no"):
            raise ValueError(f"word_prefix_space must be auto or no, got {self.word_prefix_space!r}")
        if self.bilinear is not None and self.bilinear not in BILINEAR:
            raise ValueError(f"bilinear must be one of {BILINEAR}, got {self.bilinear!r}")
        for name in ("emb_size", "block_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive")
        if self.n_layers_avg is not None and self.n_layers_avg < 1:
            raise ValueError("n_layers_avg must be at least 1")
        if self.max_length is not None and self.max_length < 8:
            raise ValueError("max_length must be at least 8 word-pieces")
        if self.window is not None and self.window < 8:
            raise ValueError("window must be at least 8 tokens")

    def resolved_bilinear(self, loss_name: str) -> str:
        return self.bilinear or ("full" if loss_name == "bce" else "grouped")

    def resolved_layers(self, loss_name: str) -> int:
        return self.n_layers_avg or (3 if loss_name == "mdre" else 1)


@dataclass
class LossConfig:
    name: str = PAPER_HEAD  # see lmrc.stage1.losses.LOSSES for the others; "auto": by corpus size
    params: dict[str, Any] = field(default_factory=dict)  # passed to build_loss (e.g. {alpha: 7.5} for atgl)


@dataclass
class DataConfig:
    train: str = DEFAULT_TRAIN
    tune: str | None = DEFAULT_TUNE  # model selection and early stopping; None: keep the last epoch
    # With `tune` None: carve this fraction of `train` (seeded by fold_seed) into a tuning split in the run's
    # data/ folder (lmrc/stage1/small_corpus.py); the saved config names the two split files instead.
    tune_fraction: float | None = None
    rel_info: str = DEFAULT_REL_INFO
    cache_dir: str | None = None  # feature cache; None: <LMRC_CACHE or ~/.cache/lmrc>/features
    # Cross-fitting: with `holdout_fold` set, train on every fold of `train` but that one (see crossfit).
    # Typed datasets: only these (head type, tail type) entity pairs can hold a relation and are scored (CDR:
    # [[Chemical, Disease]]; GDA: [[Gene, Disease]]). None: every ordered pair (DocRED).
    pair_types: list[list[str]] | None = None
    folds: int = 5
    holdout_fold: int | None = None
    fold_seed: int = 13

    def __post_init__(self) -> None:
        if self.folds < 2:
            raise ValueError("folds must be at least 2")
        if self.holdout_fold is not None and not 0 <= self.holdout_fold < self.folds:
            raise ValueError(f"holdout_fold must be in 0..{self.folds - 1}")
        if self.tune_fraction is not None:
            if not 0.0 < self.tune_fraction < 1.0:
                raise ValueError(f"tune_fraction must be in (0, 1), got {self.tune_fraction}")
            if self.tune is not None:
                raise ValueError(
                    "tune_fraction carves the tuning split out of data.train when data.tune is not given: "
                    "set data.tune=null too (`lmrc stage1 train --tune-fraction` does)"
                )

    def path(self, key: str) -> Path | None:
        value = getattr(self, key)
        return None if value is None else expand_path(value, f"data.{key}")


@dataclass
class TrainConfig:
    epochs: int = 30  # LMRC Table 6 (Re-DocRED), as ATLOP
    # At least this many optimizer steps: fewer epochs x steps-per-epoch raise the epochs (small corpora; the
    # saved config holds the raised epochs). 0: off. Our addition, not the papers'.
    min_steps: int = 0
    batch_size: int = 4  # ATLOP Sec. 4.1; LMRC Table 6
    grad_accum: int = 1
    lr_encoder: float = 5e-5  # ATLOP Sec. 4.1, BERT-base (LMRC Table 6 uses 3e-5 with RoBERTa-large)
    lr_head: float = 1e-4  # ATLOP Sec. 4.1; LMRC Table 6
    weight_decay: float = 0.0  # ATLOP's AdamW
    adam_eps: float = 1e-6  # ATLOP's AdamW
    warmup_ratio: float = 0.06  # ATLOP Sec. 4.1; LMRC Appendix A (first 6% of steps)
    max_grad_norm: float = 1.0  # ATLOP Sec. 4.1; LMRC Table 6
    seed: int = 13
    # auto: bf16 autocast where the hardware runs bf16 natively (CUDA with bf16, CPUs with AVX512-BF16 / AMX),
    # fp16 on older CUDA GPUs, float32 elsewhere (emulated bf16 on AVX2-only CPUs is ~10x slower than float32).
    # "bf16" / "fp16" / "no" force a precision ("fp16" falls back to float32 on a CPU).
    mixed_precision: str = "auto"
    # Length-grouped batches (less padding: default) or plainly shuffled ones, as the reference ATLOP code.
    length_grouped: bool = True
    eval_every_epochs: int = 1  # 0: only by steps
    eval_every_steps: int = 0  # 0: only by epochs
    eval_batch_size: int = 8
    select_metric: str | None = (
        None  # None: "f1" (relation F1) for multi-label heads, "pair_f1" for bce (LMRC)
    )
    patience: int = 0  # evaluations without improvement before stopping; 0: never stop early
    save_every_steps: int = 200  # resumable state (last/) also every N optimizer steps; 0: only per epoch
    log_every_steps: int = 20  # a progress line in the log (tqdm only shows on a terminal)
    num_threads: int | None = None  # torch.set_num_threads; None: torch's default
    # torch.use_deterministic_algorithms: bit-identical reruns and resumes (multi-threaded CPU backward kernels
    # otherwise differ in the last bits from run to run); may be slower on GPU.
    deterministic: bool = False
    # Seconds a rank waits at a collective (barrier, all-reduce) before the run fails. NCCL's default is 10
    # minutes, less than rank 0 may take to download or load the encoder while the others wait; a generous limit
    # still ends a hung job. Several GPUs only; changing it on --resume is harmless.
    ddp_timeout: int = 3600

    def __post_init__(self) -> None:
        if self.ddp_timeout < 1:
            raise ValueError("ddp_timeout must be at least 1 (seconds)")
        for name in ("epochs", "batch_size", "grad_accum", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        for name in (
            "min_steps",
            "eval_every_epochs",
            "eval_every_steps",
            "patience",
            "save_every_steps",
            "log_every_steps",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be 0 or more")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError("warmup_ratio must be in [0, 1)")
        if self.lr_encoder < 0 or self.lr_head <= 0:
            raise ValueError("learning rates must be positive")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(
                f"mixed_precision must be one of {MIXED_PRECISION}, got {self.mixed_precision!r}"
            )
        if self.select_metric is not None and self.select_metric not in SELECT_METRICS:
            raise ValueError(f"select_metric must be one of {SELECT_METRICS}, got {self.select_metric!r}")
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError("num_threads must be at least 1")

    def resolved_select_metric(self, loss_name: str) -> str:
        return self.select_metric or ("pair_f1" if loss_name == "bce" else "f1")


@dataclass
class CandidateSettings:
    """Stage 1's candidate rule: which scored pairs become candidates, and how the pairs are scored.

    At most one of `threshold`, `recall_target` and `max_per_doc`; none of them is the head's own rule (0.5 for
    bce as in LMRC, margin 0 for the multi-label heads). The recall target is our addition, not the papers': the
    highest threshold whose pair recall on the labelled `tune` file reaches it, or the one saved in a
    `calibration` file (`lmrc stage1 predict --save-calibration`). `lmrc stage1 predict`, `lmrc stage1
    crossfit` and `lmrc predict` (its `stage1` section) all read these settings.
    """

    threshold: float | None = None
    recall_target: float | None = None
    tune: str | None = None  # labelled tuning file (recall target; in `lmrc predict` also fusion refine)
    calibration: str | None = None  # a calibration file saved earlier, instead of calibrating on `tune`
    max_per_doc: int | None = None  # the K best-scored pairs of every document, no threshold
    batch_size: int = 8  # documents per encoder forward pass
    device: str | None = None  # None: cuda when available, else cpu
    head_params: dict[str, Any] = field(default_factory=dict)  # prediction-time head parameters

    def __post_init__(self) -> None:
        given = [
            name for name in ("threshold", "recall_target", "max_per_doc") if getattr(self, name) is not None
        ]
        if len(given) > 1:
            flags = " and ".join(f"--{name.replace('_', '-')}" for name in given)
            raise ValueError(f"choose one of --threshold, --recall-target, --max-per-doc (got {flags})")
        if self.threshold is not None and not math.isfinite(self.threshold):
            raise ValueError(f"--threshold must be a finite number, got {self.threshold}")
        if self.recall_target is not None and not 0.0 < self.recall_target <= 1.0:
            raise ValueError(f"--recall-target must be in (0, 1], got {self.recall_target}")
        if self.max_per_doc is not None and self.max_per_doc < 1:
            raise ValueError(f"--max-per-doc must be at least 1, got {self.max_per_doc}")
        if self.calibration is not None and self.recall_target is None:
            raise ValueError("--calibration is only used with --recall-target")
        if self.calibration is not None and self.tune is not None:
            raise ValueError("choose one of --tune (calibrate now) and --calibration (a saved calibration)")
        if self.batch_size < 1:
            raise ValueError("batch_size must be at least 1")


@dataclass
class Stage1Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    output_dir: str = "runs/stage1"

    def __post_init__(self) -> None:
        if self.loss.name == "bce" and self.train.select_metric in ("f1", "ign_f1"):
            raise ValueError(
                "select_metric 'f1'/'ign_f1' needs relation predictions; bce has none (use pair_f1)"
            )


def load_stage1_config(
    path: str | os.PathLike | None = None, overrides: list[str] | tuple = ()
) -> Stage1Config:
    """Defaults <- YAML <- `--set` overrides; an unknown loss name fails here, before anything is loaded."""
    cfg = load_config(Stage1Config, path, overrides)
    check_loss_name(cfg.loss.name, f"{path or 'config'}: loss.name")
    return cfg


def check_loss_name(name: str, where: str) -> None:
    # Imported here, not at the top: the losses import torch, and this module is read by `lmrc --help`'s commands.
    from lmrc.stage1.losses import LOSSES

    if name not in LOSSES and name != AUTO_HEAD:
        known = ", ".join(sorted(LOSSES))
        raise LmrcError(
            f"{where}: unknown loss {name!r} (known: {known}, or {AUTO_HEAD} to choose by corpus size)"
        )
