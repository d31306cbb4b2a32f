"""What every generation backend returns and is asked for: one `Generation` per prompt, from prompts given as
token ids and a per-prompt budget of new tokens (`answer_budget`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from lmrc.stage2.config import GenerationConfig


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
