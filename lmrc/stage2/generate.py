"""Generation backends behind one interface, chosen by name (`generation.backend`).

- `hf` (default): transformers `generate` on the base model with the LoRA adapter, batched with LEFT padding (a
  decoder continues from the last position, so every prompt must end at the same column), greedy by default.
- `vllm` (optional extra): vLLM serves the base model and loads the adapter through a `LoRARequest`; imported only
  when chosen.

Both take token ids from `PromptEncoder` (so the prompt tokens match training exactly) and a per-prompt budget of
new tokens (`answer_budget`), and stop at EOS or at the budget, whichever comes first; `hf` also stops an answer
that repeats one line over and over (`generation.stop_repeated_lines`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from lmrc.errors import LmrcError
from lmrc.stage2.config import GenerationConfig, Stage2Config

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Generation:
    text: str
    n_tokens: int  # new tokens, EOS excluded
    hit_limit: bool  # stopped by the token budget, not by EOS (endless or cut-off output)
    stopped_on_repeat: bool = False  # stopped after the same line came `stop_repeated_lines` times in a row
    prefill_tokens: int | None = (
        None  # prompt tokens computed for it (a shared prefix counted once per group)
    )


class Generator(Protocol):
    name: str
    tokenizer: Any

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: Sequence[int],
        grammars: Sequence[str] | None = None,
        groups: Sequence[int] | None = None,
    ) -> list[Generation]:
        """`grammars`: one EBNF per prompt (lmrc.stage2.grammar) that its answer must follow, or None.
        `groups`: a group id per prompt; prompts of one group share a prefix (backends may reuse its KV cache)."""
        ...


def answer_budget(
    n_pairs: int,
    cfg: GenerationConfig,
    prompt_len: int = 0,
    context: int | None = None,
    bound: int | None = None,
) -> int:
    """New-token budget of a prompt: pairs x per-pair budget, or with constrained answers the grammar's bound on
    the answer's length (`bound`, lmrc.stage2.grammar.answer_bound: the grammar ends the answer by itself, so a
    budget of the bound never cuts it); within the room left by the prompt in `context` (max_seq_len, or the
    model's window when smaller) and the optional hard cap."""
    budget = bound if bound is not None else n_pairs * cfg.max_new_tokens_per_pair
    if cfg.max_new_tokens_cap is not None:
        budget = min(budget, cfg.max_new_tokens_cap)
    if context is not None:
        budget = min(budget, context - prompt_len)
    return max(1, budget)


def _eos_ids(tokenizer: Any, model: Any | None) -> list[int]:
    """EOS ids of the tokenizer and the model's generation config (Llama-3 ends turns with a second EOS)."""
    ids = {tokenizer.eos_token_id}
    gen = getattr(model, "generation_config", None)
    extra = getattr(gen, "eos_token_id", None)
    if isinstance(extra, int):
        ids.add(extra)
    elif isinstance(extra, (list, tuple)):
        ids.update(int(x) for x in extra)
    return sorted(i for i in ids if i is not None)


_MIN_SHARED_PREFIX = 32  # tokens; a shorter common prefix is not worth a separate prefill

# transformers 5 names the cache argument `cache` (`past_key_values` is deprecated there); 4.x only knows the latter.
_CACHE_ARG = "past_key_values"
try:  # pragma: no cover - depends on the installed transformers
    import inspect

    from transformers import LlamaForCausalLM

    if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters:
        _CACHE_ARG = "cache"
except ImportError:  # pragma: no cover
    pass


def _common_prefix(seqs: Sequence[Sequence[int]]) -> list[int]:
    """The longest common leading run of token ids, minus one token: each prompt keeps at least one token of
    its own for generate to compute (and the seam token is never shared when the tokenizer merged across it)."""
    first = list(seqs[0])
    n = min(len(s) for s in seqs)
    k = 0
    while k < n and all(s[k] == first[k] for s in seqs):
        k += 1
    return first[: max(0, min(k, n - 1) - 1)]


class HFGenerator:
    """Batched transformers `generate`; prompts are sorted by length so that a batch pads little."""

    name = "hf"

    def __init__(self, model: Any, tokenizer: Any, cfg: GenerationConfig) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.eos_ids = _eos_ids(tokenizer, model)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_ids[0]
        self.device = next(model.parameters()).device
        self._compiler = None  # xgrammar's, built on the first constrained batch

    @classmethod
    def load(cls, cfg: Stage2Config, adapter_dir: Path, device: Any = None) -> HFGenerator:
        from lmrc.stage2.modeling import load_adapter

        # A merged adapter runs as fast as the base model; a 4-bit base cannot absorb it.
        merge = cfg.generation.merge_adapter and not cfg.load_in_4bit
        loaded = load_adapter(adapter_dir, cfg, device=device, merge=merge)
        return cls(loaded.model, loaded.tokenizer, cfg.generation)

    def _grammar_compiler(self):
        if self._compiler is None:
            from lmrc.stage2.grammar import GrammarCompiler

            vocab = int(getattr(self.model.config, "vocab_size", 0) or len(self.tokenizer))
            self._compiler = GrammarCompiler(self.tokenizer, vocab, self.eos_ids)
        return self._compiler

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: Sequence[int],
        grammars: Sequence[str] | None = None,
        groups: Sequence[int] | None = None,
    ) -> list[Generation]:
        """`groups`: prompts with the same group id (a document's prompts) share a prefix (instruction, relation
        set, text); with `generation.prefix_cache` it is prefilled once per group and its KV cache reused by
        every batch of the group, which then holds only that group's prompts."""
        import torch

        if len(prompts) != len(max_new_tokens):
            raise ValueError("one max_new_tokens per prompt")
        if grammars is not None and len(grammars) != len(prompts):
            raise ValueError("one grammar per prompt")
        results: list[Generation | None] = [None] * len(prompts)
        if self.cfg.do_sample:
            torch.manual_seed(self.cfg.seed)
        bs = self.cfg.batch_size
        plan: list[tuple[list[int], list[int]]] = []  # (prompt indices, shared prefix ids) per batch
        share: dict[int, int] = {}  # prompt -> how many prompts share its prefix (prefilled once for all)
        if groups is not None and self.cfg.prefix_cache:
            members: dict[int, list[int]] = {}
            for i, g in enumerate(groups):
                members.setdefault(g, []).append(i)
            for g in sorted(members):
                idx = sorted(members[g], key=lambda i: -len(prompts[i]))
                prefix = _common_prefix([prompts[i] for i in idx]) if len(idx) > 1 else []
                if len(prefix) < _MIN_SHARED_PREFIX:
                    prefix = []
                share.update({i: len(idx) for i in idx})
                plan.extend((idx[k : k + bs], prefix) for k in range(0, len(idx), bs))
        else:
            order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
            plan = [(order[k : k + bs], []) for k in range(0, len(order), bs)]
        caches: dict[tuple[int, ...], Any] = {}
        for idx, prefix in plan:
            cache = None
            if prefix:
                key = tuple(prefix)
                if key not in caches:
                    caches.clear()  # one group at a time: the previous group's cache is done
                    caches[key] = self._prefill(prefix)
                cache = caches[key]
            batch = self._generate_batch(prompts, max_new_tokens, grammars, idx, prefix, cache)
            for i, gen in zip(idx, batch):
                if prefix:  # the prefix is prefilled once for the whole group
                    own = len(prompts[i]) - len(prefix)
                    gen = dataclasses.replace(gen, prefill_tokens=round(own + len(prefix) / share[i]))
                results[i] = gen
        return [r for r in results if r is not None]

    def _prefill(self, prefix: Sequence[int]) -> Any:
        """The KV cache of a shared prefix (batch 1)."""
        import torch
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        with torch.inference_mode():
            self.model(
                input_ids=torch.tensor([list(prefix)], device=self.device),
                **{_CACHE_ARG: cache},
                use_cache=True,
            )
        return cache

    def _generate_batch(
        self, prompts, max_new_tokens, grammars, idx, prefix, prefix_cache
    ) -> list[Generation]:
        """One left-padded batch; with a shared prefix the padding sits between the prefix and each suffix (the
        attention mask hides it and positions stay contiguous), so every row continues the same cached prefix."""
        import copy

        import torch
        from transformers import GenerationConfig as HFGenerationConfig
        from transformers import LogitsProcessorList, StoppingCriteriaList

        p = len(prefix)
        width = p + max(len(prompts[i]) - p for i in idx)
        ids = torch.full((len(idx), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            x = list(prompts[i])
            if p:
                ids[row, :p] = torch.tensor(x[:p], dtype=torch.long)
                mask[row, :p] = 1
            ids[row, width - (len(x) - p) :] = torch.tensor(x[p:], dtype=torch.long)
            mask[row, width - (len(x) - p) :] = 1
        budget = max(max_new_tokens[i] for i in idx)
        sampling = (
            {"temperature": self.cfg.temperature, "top_p": self.cfg.top_p} if self.cfg.do_sample else {}
        )
        gen_cfg = HFGenerationConfig(
            max_new_tokens=budget,
            do_sample=self.cfg.do_sample,
            eos_token_id=self.eos_ids,
            pad_token_id=self.pad_id,
            **sampling,
        )
        stopper = _RowStopper(
            width, [max_new_tokens[i] for i in idx], self.tokenizer, self.cfg.stop_repeated_lines
        )
        processors = LogitsProcessorList()
        if grammars is not None:
            from lmrc.stage2.grammar import GrammarLogitsProcessor

            compiler = self._grammar_compiler()
            compiled = [compiler.compile(grammars[i]) for i in idx]
            processors.append(
                GrammarLogitsProcessor(
                    compiler, compiled, lambda row, s=stopper: s.stopped_at[row] is not None
                )
            )
        extra = {}
        if prefix_cache is not None:
            cache = copy.deepcopy(prefix_cache)
            cache.batch_repeat_interleave(len(idx))
            extra[_CACHE_ARG] = cache
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=ids.to(self.device),
                attention_mask=mask.to(self.device),
                generation_config=gen_cfg,
                stopping_criteria=StoppingCriteriaList([stopper]),
                logits_processor=processors,
                **extra,
            )
        new = out[:, width:].tolist()
        return [
            dataclasses.replace(
                self._finish(new[row], max_new_tokens[i], stopper.stopped_at[row]),
                prefill_tokens=len(prompts[i]),
            )
            for row, i in enumerate(idx)
        ]

    def _finish(self, tokens: list[int], limit: int, stopped_at: int | None) -> Generation:
        """Cut at the first EOS (finished rows are padded), at this prompt's own budget, or where it looped."""
        eos = set(self.eos_ids)
        end = next((k for k, t in enumerate(tokens) if t in eos), None)
        # Positions from `stopped_at` on are padding (pad may equal EOS), so only an earlier EOS is the model's.
        if end is not None and end < min(limit, stopped_at if stopped_at is not None else limit):
            kept, hit, looped = tokens[:end], False, False
        elif stopped_at is not None and stopped_at < limit:
            kept, hit, looped = tokens[:stopped_at], False, True
        else:
            kept, hit, looped = tokens[:limit], True, False
        text = self.tokenizer.decode(kept, skip_special_tokens=True)
        return Generation(text=text, n_tokens=len(kept), hit_limit=hit, stopped_on_repeat=looped)


class _RowStopper:
    """Stops each row of a batch at its own token budget, or after `repeat` identical complete lines.

    A greedy decoder that writes the same line `repeat` times in a row is in a loop: the copies would be dropped
    as duplicates anyway, and on a CPU the rest of the budget costs minutes. Called once per generated token.
    """

    def __init__(self, width: int, budgets: Sequence[int], tokenizer: Any, repeat: int) -> None:
        self.width = width
        self.budgets = list(budgets)
        self.tokenizer = tokenizer
        self.repeat = repeat
        self.window = 64 * max(repeat, 1)
        self.stopped_at: list[int | None] = [None] * len(self.budgets)

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        n_new = input_ids.shape[1] - self.width
        for r in range(input_ids.shape[0]):
            if self.stopped_at[r] is not None:
                continue
            if n_new >= self.budgets[r] or (self.repeat and self._looping(input_ids[r, self.width :])):
                self.stopped_at[r] = n_new
        return torch.tensor(
            [s is not None for s in self.stopped_at], dtype=torch.bool, device=input_ids.device
        )

    def _looping(self, new_ids: Any) -> bool:
        if "\n" not in self.tokenizer.decode(new_ids[-1:].tolist()):
            return False
        text = self.tokenizer.decode(new_ids[-self.window :].tolist(), skip_special_tokens=True)
        lines = [line.strip() for line in text.split("\n")[:-1]][-self.repeat :]
        return len(lines) == self.repeat and lines[0] != "" and len(set(lines)) == 1


class VLLMGenerator:
    """vLLM with the LoRA adapter attached per request; prefix caching reuses a document's shared prefix."""

    name = "vllm"

    def __init__(self, cfg: Stage2Config, base_path: Path, adapter_dir: Path) -> None:
        from lmrc.stage2.modeling import load_tokenizer

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
        from lmrc.stage2.modeling import resolve_model_path

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
    import json

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
    from lmrc.hardware import cuda_supports_bf16

    return cuda_supports_bf16(0)


def _vllm_max_model_len(cfg: Stage2Config, base_path: Path) -> int:
    """The longest prompt + answer the planner makes: max_seq_len, or the model's window when smaller.

    vLLM otherwise sizes its KV cache for the model's whole window (131,072 tokens for Llama-3.1) and refuses to
    start when one such sequence does not fit the memory it was given."""
    import json

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
    from lmrc.hardware import device_memory_used, release_cuda_cache

    release_cuda_cache()
    worst: tuple[float, int, int, int] | None = None  # (free fraction, device, in use, total)
    for index in devices:
        used = device_memory_used(index)
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


BACKENDS: dict[str, type] = {"hf": HFGenerator, "vllm": VLLMGenerator}


def create_generator(cfg: Stage2Config, adapter_dir: Path, device: Any = None) -> Generator:
    """The backend named by `generation.backend`, loaded with the trained adapter."""
    try:
        backend = BACKENDS[cfg.generation.backend]
    except KeyError:
        raise LmrcError(
            f"unknown generation backend {cfg.generation.backend!r} (expected one of {', '.join(BACKENDS)})"
        ) from None
    return backend.load(cfg, Path(adapter_dir), device)
