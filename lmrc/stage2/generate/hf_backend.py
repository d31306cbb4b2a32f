"""The `hf` backend: transformers `generate` on the base model with the LoRA adapter, batched with LEFT padding
(a decoder continues from the last position, so every prompt must end at the same column); a document's shared
prompt prefix is prefilled once and its KV cache reused by every batch of the document."""

from __future__ import annotations

import copy
import dataclasses
import inspect
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import DynamicCache, LlamaForCausalLM, LogitsProcessorList, StoppingCriteriaList
from transformers import GenerationConfig as HFGenerationConfig

from lmrc.stage2.config import GenerationConfig, Stage2Config
from lmrc.stage2.generate.base import Generation
from lmrc.stage2.grammar import GrammarCompiler, GrammarLogitsProcessor
from lmrc.stage2.modeling import load_adapter

_MIN_SHARED_PREFIX = 32  # tokens; a shorter common prefix is not worth a separate prefill

# transformers 5 names the cache argument `cache` (`past_key_values` is deprecated there); 4.x only knows the latter.
_CACHE_ARG = (
    "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"
)


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


def _common_prefix(seqs: Sequence[Sequence[int]]) -> list[int]:
    """The longest common leading run of token ids, minus one token: each prompt keeps at least one token of
    its own for generate to compute (and the seam token is never shared when the tokenizer merged across it)."""
    first = list(seqs[0])
    n = min(len(s) for s in seqs)
    k = 0
    while k < n and all(s[k] == first[k] for s in seqs):
        k += 1
    return first[: max(0, min(k, n - 1) - 1)]


def _plan_batches(
    prompts: Sequence[Sequence[int]], groups: Sequence[int] | None, batch_size: int
) -> tuple[list[tuple[list[int], list[int]]], dict[int, int]]:
    """The batches, longest prompts first: (prompt indices, shared prefix ids) each, and per prompt how many prompts
    share its prefix (it is prefilled once for all of them). With `groups`, a batch holds one group's prompts."""
    if groups is None:
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        return [(order[k : k + batch_size], []) for k in range(0, len(order), batch_size)], {}
    plan: list[tuple[list[int], list[int]]] = []
    share: dict[int, int] = {}
    members: dict[int, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    for g in sorted(members):
        idx = sorted(members[g], key=lambda i: -len(prompts[i]))
        prefix = _common_prefix([prompts[i] for i in idx]) if len(idx) > 1 else []
        if len(prefix) < _MIN_SHARED_PREFIX:
            prefix = []
        share.update({i: len(idx) for i in idx})
        plan.extend((idx[k : k + batch_size], prefix) for k in range(0, len(idx), batch_size))
    return plan, share


def _left_padded(
    prompts: Sequence[Sequence[int]], idx: Sequence[int], prefix_len: int, pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Input ids and attention mask of a batch, padded on the left; with a shared prefix the padding sits between
    the prefix and each suffix (the mask hides it and positions stay contiguous)."""
    p = prefix_len
    width = p + max(len(prompts[i]) - p for i in idx)
    ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(idx), width), dtype=torch.long)
    for row, i in enumerate(idx):
        x = list(prompts[i])
        if p:
            ids[row, :p] = torch.tensor(x[:p], dtype=torch.long)
            mask[row, :p] = 1
        ids[row, width - (len(x) - p) :] = torch.tensor(x[p:], dtype=torch.long)
        mask[row, width - (len(x) - p) :] = 1
    return ids, mask


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
        # A merged adapter runs as fast as the base model; a 4-bit base cannot absorb it.
        merge = cfg.generation.merge_adapter and not cfg.load_in_4bit
        loaded = load_adapter(adapter_dir, cfg, device=device, merge=merge)
        return cls(loaded.model, loaded.tokenizer, cfg.generation)

    def _grammar_compiler(self):
        if self._compiler is None:
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
        if len(prompts) != len(max_new_tokens):
            raise ValueError("one max_new_tokens per prompt")
        if grammars is not None and len(grammars) != len(prompts):
            raise ValueError("one grammar per prompt")
        results: list[Generation | None] = [None] * len(prompts)
        if self.cfg.do_sample:
            torch.manual_seed(self.cfg.seed)
        plan, share = _plan_batches(prompts, groups if self.cfg.prefix_cache else None, self.cfg.batch_size)
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
        cache = DynamicCache(config=self.model.config)
        with torch.inference_mode():
            self.model(
                input_ids=torch.tensor([list(prefix)], device=self.device),
                **{_CACHE_ARG: cache},
                use_cache=True,
            )
        return cache

    def _generation_config(self, budget: int) -> HFGenerationConfig:
        sampling = (
            {"temperature": self.cfg.temperature, "top_p": self.cfg.top_p} if self.cfg.do_sample else {}
        )
        return HFGenerationConfig(
            max_new_tokens=budget,
            do_sample=self.cfg.do_sample,
            eos_token_id=self.eos_ids,
            pad_token_id=self.pad_id,
            **sampling,
        )

    def _grammar_processors(
        self, grammars: Sequence[str] | None, idx: Sequence[int], stopper: _RowStopper
    ) -> LogitsProcessorList:
        """The logits processors of a batch: each row's grammar, when answers are constrained."""
        processors = LogitsProcessorList()
        if grammars is not None:
            compiler = self._grammar_compiler()
            compiled = [compiler.compile(grammars[i]) for i in idx]
            processors.append(
                GrammarLogitsProcessor(
                    compiler, compiled, lambda row, s=stopper: s.stopped_at[row] is not None
                )
            )
        return processors

    def _generate_batch(
        self, prompts, max_new_tokens, grammars, idx, prefix, prefix_cache
    ) -> list[Generation]:
        """One left-padded batch; with a shared prefix every row continues the same cached prefix."""
        ids, mask = _left_padded(prompts, idx, len(prefix), self.pad_id)
        width = ids.shape[1]
        stopper = _RowStopper(
            width, [max_new_tokens[i] for i in idx], self.tokenizer, self.cfg.stop_repeated_lines
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
                generation_config=self._generation_config(max(max_new_tokens[i] for i in idx)),
                stopping_criteria=StoppingCriteriaList([stopper]),
                logits_processor=self._grammar_processors(grammars, idx, stopper),
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
