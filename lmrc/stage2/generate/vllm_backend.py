"""The `vllm` backend (optional extra): vLLM serves the base model and loads the adapter through a `LoRARequest`;
its automatic prefix caching reuses a document's shared prefix. vLLM itself is imported only when the backend is
chosen (it is an optional dependency)."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lmrc.errors import LmrcError
from lmrc.machine import hardware
from lmrc.stage2.config import Stage2Config
from lmrc.stage2.generate.base import Generation
from lmrc.stage2.modeling import load_tokenizer, resolve_model_path

log = logging.getLogger(__name__)


class VLLMGenerator:
    """vLLM with the LoRA adapter attached per request; prefix caching reuses a document's shared prefix."""

    name = "vllm"

    def __init__(self, cfg: Stage2Config, base_path: Path, adapter_dir: Path) -> None:
        try:
            from vllm import LLM, SamplingParams
            from vllm.lora.request import LoRARequest
        except ImportError:
            raise LmrcError(
                "generation.backend=vllm needs vLLM, which is not installed: pip install 'lmrc[vllm]' "
                "(or use generation.backend=hf)"
            ) from None
        dtype = _vllm_dtype(cfg, adapter_dir)
        if cfg.load_in_4bit:
            log.info("vllm serves the base model in %s; load_in_4bit applies to training only", dtype)
        self._sampling_params = SamplingParams
        self._structured = _structured_outputs_api()
        gen = cfg.generation
        self.llm = LLM(
            model=str(base_path),
            tokenizer=str(adapter_dir),
            dtype=dtype,
            max_model_len=_vllm_max_model_len(cfg, base_path),
            enable_lora=True,
            max_lora_rank=_vllm_rank(cfg.lora.r),
            enable_prefix_caching=True,
            seed=gen.seed,
            gpu_memory_utilization=_vllm_memory_fraction(
                gen.gpu_memory_utilization, range(gen.tensor_parallel_size)
            ),
            tensor_parallel_size=gen.tensor_parallel_size,
            trust_remote_code=False,
        )
        self.lora = LoRARequest("lmrc-adapter", 1, str(adapter_dir))
        self.cfg = gen
        self.tokenizer = load_tokenizer(adapter_dir)

    @classmethod
    def load(cls, cfg: Stage2Config, adapter_dir: Path, device: Any = None) -> VLLMGenerator:
        return cls(cfg, resolve_model_path(cfg.model), adapter_dir)

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: Sequence[int],
        grammars: Sequence[str] | None = None,
        groups: Sequence[int] | None = None,  # vLLM's automatic prefix caching finds shared prefixes itself
    ) -> list[Generation]:
        structured: list[dict] = [{} for _ in prompts]
        if grammars is not None:
            keyword, params_class = self._structured
            structured = [{keyword: params_class(grammar=g)} for g in grammars]
        params = [
            self._sampling_params(
                max_tokens=int(n),
                temperature=self.cfg.temperature if self.cfg.do_sample else 0.0,
                top_p=self.cfg.top_p if self.cfg.do_sample else 1.0,
                seed=self.cfg.seed if self.cfg.do_sample else None,
                skip_special_tokens=True,
                **extra,
            )
            for n, extra in zip(max_new_tokens, structured)
        ]
        inputs = [{"prompt_token_ids": list(p)} for p in prompts]
        outs = self.llm.generate(inputs, params, lora_request=self.lora, use_tqdm=False)
        results = []
        for o in outs:
            c = o.outputs[0]
            results.append(
                Generation(text=c.text, n_tokens=len(c.token_ids), hit_limit=c.finish_reason == "length")
            )
        return results


# The first vLLM release that installs beside transformers 5 (its metadata: transformers >= 4.56, != 5.0-5.5.0;
# 0.19 and older require transformers < 5); pyproject's vllm extra has the same floor. Every release since 0.10.2
# takes grammars as SamplingParams(structured_outputs=StructuredOutputsParams(...)).
VLLM_MIN = "0.20"


def _structured_outputs_api() -> tuple[str, type]:
    """The SamplingParams keyword and class for grammar-constrained outputs."""
    try:
        from vllm.sampling_params import StructuredOutputsParams
    except ImportError:
        raise LmrcError(
            f"generation.backend=vllm needs vLLM >= {VLLM_MIN} (transformers 5, structured outputs): "
            "pip install -U 'lmrc[vllm]'"
        ) from None
    return "structured_outputs", StructuredOutputsParams


def _vllm_dtype(cfg: Stage2Config, adapter_dir: Path) -> str:
    """The dtype the adapter was trained in: the config's, or for "auto" the one training resolved (recorded in
    the adapter's train_summary.json), else what "auto" resolves to on this GPU as training does.

    vLLM's own "auto" is the base model's config dtype, and float16 when that says float32: an adapter trained in
    bf16 would be served in fp16 (or a float32 tiny model in fp16)."""
    if cfg.dtype != "auto":
        return cfg.dtype
    summary = adapter_dir / "train_summary.json"
    if summary.is_file():
        try:
            trained = json.loads(summary.read_text(encoding="utf-8")).get("dtype")
        except (OSError, ValueError):
            trained = None
        if trained in ("bfloat16", "float16", "float32"):
            if trained == "bfloat16" and not _cuda_native_bf16():
                log.warning("vllm: the adapter was trained in bfloat16, this GPU has no native bf16: float16")
                return "float16"
            return trained
    return "bfloat16" if _cuda_native_bf16() else "float16"


def _cuda_native_bf16() -> bool:
    return hardware.cuda_supports_bf16(0)


def _vllm_max_model_len(cfg: Stage2Config, base_path: Path) -> int:
    """The longest prompt + answer the planner makes: max_seq_len, or the model's window when smaller.

    vLLM otherwise sizes its KV cache for the model's whole window (131,072 tokens for Llama-3.1) and refuses to
    start when one such sequence does not fit the memory it was given."""
    try:
        window = json.loads((base_path / "config.json").read_text(encoding="utf-8")).get(
            "max_position_embeddings"
        )
    except (OSError, ValueError):
        window = None
    return min(cfg.max_seq_len, int(window)) if window else cfg.max_seq_len


def _vllm_memory_fraction(asked: float, devices: Sequence[int] = (0,)) -> float:
    """vLLM's gpu_memory_utilization, after giving back what this process's torch cache holds (a stage-1 model
    ran on the same GPU before the engine starts) and capped by what is free on every device the engine uses
    (tensor_parallel_size of them): vLLM takes the same fraction of each and refuses to start when the asked
    fraction of a whole GPU is not free on one of them."""
    hardware.release_cuda_cache()
    worst: tuple[float, int, int, int] | None = None  # (free fraction, device, in use, total)
    for index in devices:
        used = hardware.device_memory_used(index)
        if used is None:
            continue
        in_use, total = used
        free_fraction = (total - in_use) / total
        if worst is None or free_fraction < worst[0]:
            worst = (free_fraction, index, in_use, total)
    if worst is None:
        return asked
    free_fraction, index, in_use, total = worst
    if asked <= free_fraction - 0.02:
        return asked
    fraction = max(0.05, round(free_fraction - 0.02, 3))
    log.warning(
        "vllm: %.1f GiB of %.1f GiB on GPU %d are in use by other models or processes; "
        "gpu_memory_utilization %.2f lowered to %.2f",
        in_use / 1024**3,
        total / 1024**3,
        index,
        asked,
        fraction,
    )
    return fraction


def _vllm_rank(r: int) -> int:
    """vLLM allocates LoRA slots for a fixed set of ranks; the smallest one that holds r."""
    for size in (8, 16, 32, 64, 128, 256, 320, 512):
        if r <= size:
            return size
    raise LmrcError(f"lora.r={r} is larger than vLLM supports (512)")
