"""Stage-2 configuration: typed sections whose defaults are the LMRC paper's values; YAML files only override.

LoRA fine-tuning follows LMRC (Li et al., 2024) Appendix A, Table 7: batch 4, lr 1e-4, LoRA r 8 / alpha 16, and
per mode 8 epochs / 100 warmup steps for relation classification (`rc`, the "RC stage" columns) and 2 epochs /
200 warmup steps for direct fine-tuning (`direct`, the "Pre" columns). Scoring follows Sec. 3 (footnote 1:
entities aligned with thefuzz, out-of-set relations wrong) and Appendix B (optional SBERT mapping, theta 0.55).

Fields left at None take the mode's value in `__post_init__`, so the saved config always holds the numbers used.
Paths may contain environment variables (`${LMRC_DATA_DIR}/redocred/train_450.json`); they are expanded when
used, so a saved config stays portable.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from lmrc.config import expand_path, load_config

MODES = ("rc", "direct")
DTYPES = ("auto", "bfloat16", "float16", "float32")
BACKENDS = ("hf", "vllm")
RELATION_MAPPINGS = ("strict", "sbert")

# LMRC Table 7: (epochs, warmup steps) per mode.
PAPER_EPOCHS = {"rc": 8, "direct": 2}
PAPER_WARMUP = {"rc": 100, "direct": 200}


@dataclass
class DataConfig:
    train: str = "${LMRC_DATA_DIR}/redocred/train_450.json"
    rel_info: str = "${LMRC_DATA_DIR}/redocred/rel_info.json"
    # rc with `rc_allow_none`: cross-fitted stage-1 candidates of the training documents; their false positives
    # become extra pairs answered None.
    candidates: str | None = None
    max_docs: int | None = None  # train on the first N documents only (CPU budgets); None: all
    pair_types: list[list[str]] | None = (
        None  # typed datasets (CDR): the (head, tail) entity types asked about
    )
    # direct: keep this fraction of the chunks whose pairs are all NA (seeded sample); 1.0 keeps all, as the paper.
    direct_na_chunk_fraction: float = 1.0

    def __post_init__(self) -> None:
        if self.max_docs is not None and self.max_docs < 1:
            raise ValueError("data.max_docs must be at least 1")
        if not 0.0 <= self.direct_na_chunk_fraction <= 1.0:
            raise ValueError("data.direct_na_chunk_fraction must be in [0, 1]")

    def path(self, key: str) -> Path | None:
        value = getattr(self, key)
        return None if value is None else expand_path(value, f"data.{key}")


@dataclass
class LoraConfig:
    r: int = 8  # LMRC Table 7
    alpha: int = 16  # LMRC Table 7
    dropout: float = 0.05  # not in the paper; the usual alpaca-lora value
    # Not in the paper: the attention projections, as in the original LoRA paper (Hu et al., 2022, Sec. 7.1).
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])

    def __post_init__(self) -> None:
        if self.r < 1 or self.alpha <= 0:
            raise ValueError("lora.r and lora.alpha must be positive")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError("lora.dropout must be in [0, 1)")
        if not self.target_modules:
            raise ValueError("lora.target_modules must name at least one module")


@dataclass
class TrainConfig:
    lr: float = 1e-4  # LMRC Table 7
    batch_size: int = 4  # LMRC Table 7 (sequences per optimizer step = batch_size * grad_accum)
    grad_accum: int = 1
    epochs: int | None = None  # None: LMRC Table 7, rc 8 / direct 2
    warmup_steps: int | None = (
        None  # None: LMRC Table 7, rc 100 / direct 200 (linear warmup, then linear decay)
    )
    max_steps: int | None = None  # stop after this many optimizer steps (budgets, smoke tests)
    # Stop at the step where the sequences trained on reach this many tokens (prompt + answer): the same
    # budget for rc and direct adapters makes their comparison fair (lmrc compare). None: no token limit.
    max_tokens: int | None = None
    # Also keep the adapter as it was when the sequences trained on first reached each of these token counts, in
    # <output_dir>/snapshots/tokens-<n> (a folder `lmrc stage2 predict --adapter` reads): a learning curve from
    # one run, where separate runs per budget would cost their tokens again (lmrc compare, learning_curve).
    snapshot_tokens: list[int] = field(default_factory=list)
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # LMRC Table 6 (stage 1); Table 7 gives none for LoRA
    seed: int = 42
    gradient_checkpointing: bool = False
    save_every_steps: int = (
        25  # resumable state in <output_dir>/last every N optimizer steps (and at the end)
    )
    log_every_steps: int = 1
    num_threads: int | None = None  # torch.set_num_threads; None: torch's default
    # Seconds a rank waits at a collective before the run fails (also the Trainer's ddp_timeout). NCCL's default
    # of 10 minutes is shorter than rank 0's download or load of a 13B model while the other ranks wait at the
    # barrier; a generous limit still ends a hung job. Several GPUs only; changing it on --resume is harmless.
    ddp_timeout: int = 3600

    def __post_init__(self) -> None:
        if self.ddp_timeout < 1:
            raise ValueError("train.ddp_timeout must be at least 1 (seconds)")
        for name in ("batch_size", "grad_accum", "log_every_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be at least 1")
        for name in ("epochs", "max_steps", "max_tokens", "num_threads"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ValueError(f"train.{name} must be at least 1")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ValueError("train.warmup_steps must be 0 or more")
        if self.save_every_steps < 0:
            raise ValueError("train.save_every_steps must be 0 or more")
        if any(n < 1 for n in self.snapshot_tokens) or len(set(self.snapshot_tokens)) != len(
            self.snapshot_tokens
        ):
            raise ValueError("train.snapshot_tokens: distinct positive token counts")
        if self.lr <= 0:
            raise ValueError("train.lr must be positive")


@dataclass
class GenerationConfig:
    backend: str = "hf"  # hf (transformers generate) or vllm (optional extra)
    batch_size: int = 8  # prompts per generate call
    do_sample: bool = False  # greedy by default: reproducible
    temperature: float = 1.0  # only when do_sample
    top_p: float = 1.0  # only when do_sample
    seed: int = 42  # only when do_sample
    # Answer budget: pairs in the prompt x tokens per pair, within the room the prompt leaves in max_seq_len (the
    # planner splits pairs over prompts so that each pair's expected answer fits). A pair can hold several
    # relations, so the per-pair budget is larger than the planning estimate (`answer_tokens_per_pair`).
    max_new_tokens_per_pair: int = (
        32  # training answers average ~19 tokens per pair (Re-DocRED, SmolLM2 tokens)
    )
    # An extra hard cap on new tokens per prompt (None: none). A cap below pairs x per-pair budget cuts the answers
    # of the last pairs; such cuts are counted (`pairs_cut`).
    max_new_tokens_cap: int | None = None
    # hf: stop an answer once the same line came this many times in a row (a greedy loop; the copies would be
    # dropped as duplicates anyway). 0: never.
    stop_repeated_lines: int = 3
    # hf: fold the adapter into the base weights before generating. Faster, but in 16-bit weights the small
    # adapter updates are rounded (SmolLM2 bf16, short run: dev answer loss 0.761 unmerged, 0.767 merged).
    merge_adapter: bool = False
    # `lmrc stage2 predict`: documents per batch (generated together, then appended to the progress file as one
    # line); `lmrc predict` uses its own docs_per_batch.
    docs_per_chunk: int = 8
    gpu_memory_utilization: float = 0.85  # vllm only (lowered to what is free when the engine starts)
    tensor_parallel_size: int = (
        1  # vllm only: GPUs one engine shards the model over (vLLM does not by itself)
    )
    # hf: prefill a document's shared prompt prefix (instruction, relation set, text) once and reuse its KV cache
    # for every prompt of the document (direct mode asks ~18 pairs per prompt, so a document has many prompts).
    # vllm does this by itself (automatic prefix caching).
    prefix_cache: bool = True
    # Grammar-constrained answers (lmrc.stage2.grammar): every asked pair answered once, in order, with None or 1
    # to `max_relations_per_pair` relation-set names, so an answer cannot loop. Its length is bounded: the planner
    # reserves the bound in tokens for each prompt (fewer pairs per prompt than the per-pair estimate; with
    # max_new_tokens_cap, a prompt holds only as many pairs as the cap allows), and the generation budget is the
    # bound in bytes (no token spells less than a byte) within the context, so an answer is not cut. Off by
    # default: LMRC generates freely.
    constrained: bool = False
    max_relations_per_pair: int = 4  # constrained only: k, the reference ATLOP's cap on relations per pair
    # Constrained classifier-llm only: a candidate pair's answer may name only stage 1's n best relations for it
    # (by margin, predicted or not), distinct and in the relation set's order, or None. The LLM then chooses among
    # what the classifier finds plausible instead of all 96 names. 0: the whole relation set (LMRC).
    stage1_choices: int = 0

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"generation.backend must be one of {BACKENDS}, got {self.backend!r}")
        for name in (
            "batch_size",
            "max_new_tokens_per_pair",
            "max_new_tokens_cap",
            "docs_per_chunk",
            "tensor_parallel_size",
            "max_relations_per_pair",
        ):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"generation.{name} must be at least 1")
        if self.stage1_choices < 0:
            raise ValueError("generation.stage1_choices must be 0 (the whole relation set) or more")
        if self.stop_repeated_lines < 0 or self.stop_repeated_lines == 1:
            raise ValueError("generation.stop_repeated_lines must be 0 (off) or at least 2")
        if self.temperature <= 0 or not 0 < self.top_p <= 1:
            raise ValueError("generation.temperature must be positive and top_p in (0, 1]")


@dataclass
class AlignConfig:
    cutoff: int = 80  # thefuzz score cutoff for entity names (LMRC Sec. 3, footnote 1 uses thefuzz)
    # A thefuzz.fuzz scorer name (lmrc.stage2.align.SCORERS). token_sort_ratio, unlike extractOne's default
    # WRatio, does not score a short name 90 against any longer name that contains it.
    scorer: str = "token_sort_ratio"
    relation_mapping: str = "strict"  # LMRC main results; "sbert": Appendix B
    theta: float = 0.55  # LMRC Appendix B, Fig. 3: F1 of direct fine-tuning peaks near 0.55
    sbert_model: str = "minilm"

    def __post_init__(self) -> None:
        if self.relation_mapping not in RELATION_MAPPINGS:
            raise ValueError(
                f"align.relation_mapping must be one of {RELATION_MAPPINGS}, got {self.relation_mapping!r}"
            )
        if not 0 <= self.cutoff <= 100:
            raise ValueError("align.cutoff must be in [0, 100]")


@dataclass
class Stage2Config:
    mode: str = "rc"  # rc: classify given pairs (LMRC); direct: all pairs with None answers (baseline)
    model: str = (
        "smollm2-135m"  # a packaged default, a local folder or a Hugging Face id (lmrc.models.store.resolve)
    )
    template: str | None = None  # None: the shipped prompts/<mode>.txt
    use_chat_template: bool = False  # False: the Alpaca frame as plain text (LMRC Tables 11-12)
    rc_allow_none: bool = False  # rc: offer None in the prompt (needed to train on stage-1 false positives)
    # rc: each asked pair carries stage 1's k best relations, `(head| hints: r1; r2| tail)` (0: off, as LMRC).
    # Training takes them from data.candidates, which must be cross-fitted (lmrc stage1 crossfit), so the LLM
    # learns how far to trust them.
    hints: int = 0
    # Tokens per sequence (prompt + answer). The paper's Llama-2 has 4,096; 2,048 keeps CPU training affordable.
    max_seq_len: int = 2048
    # Pairs per prompt at most. None: 18 for direct (the authors' code's k, LMRC Sec. 2) and no cap for rc (LMRC
    # Sec. 3.2: one input per document, "n(n-1)/k -> 1"); either way a prompt is split when it exceeds max_seq_len.
    max_pairs: int | None = None
    answer_tokens_per_pair: int = 24  # answer room reserved per pair when splitting pairs over prompts
    # auto: bfloat16 on a CPU with native bf16 (measured faster than float32 for LoRA training here) or a CUDA
    # GPU that supports it, else float32.
    dtype: str = "auto"
    load_in_4bit: bool = False  # QLoRA (NF4 via bitsandbytes); CUDA only
    output_dir: str = "runs/stage2"
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    align: AlignConfig = field(default_factory=AlignConfig)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.max_pairs is None and self.mode == "direct":
            self.max_pairs = 18
        if (self.max_pairs is not None and self.max_pairs < 1) or self.answer_tokens_per_pair < 1:
            raise ValueError("max_pairs and answer_tokens_per_pair must be at least 1")
        if self.max_seq_len < 64:
            raise ValueError("max_seq_len must be at least 64 tokens")
        if self.hints < 0:
            raise ValueError("hints must be 0 (off) or a number of relations per pair")
        if self.mode == "direct" and self.hints:
            raise ValueError("hints apply to mode rc (direct mode asks about all pairs, without stage 1)")
        if self.mode == "direct" and self.rc_allow_none:
            raise ValueError("rc_allow_none applies to mode rc (direct prompts always offer None)")
        if self.train.epochs is None:
            self.train.epochs = PAPER_EPOCHS[self.mode]
        if self.train.warmup_steps is None:
            self.train.warmup_steps = PAPER_WARMUP[self.mode]

    @property
    def allow_none(self) -> bool:
        """Whether the prompt offers None: always in direct mode, on request in rc mode."""
        return self.mode == "direct" or self.rc_allow_none


def load_stage2_config(
    path: str | os.PathLike | None = None, overrides: list[str] | tuple = ()
) -> Stage2Config:
    """Defaults <- YAML <- `--set` overrides."""
    return load_config(Stage2Config, path, overrides)
