"""Grammar-constrained answers (`generation.constrained: true`): the LLM can only write what the scorer can use.

An answer is zero or more lines `(head| relation| tail)` joined by newlines, then end of answer, where (head, tail)
is one of the pairs the prompt asked about, written with the exact display names of the prompt, and the relation
is a name of the relation set (or `None` where the template offers it). Everything else (out-of-set relation
names, the `-` placeholder echoed back, unparsable lines, pairs that were not asked) cannot be generated.

The grammar is EBNF, built per prompt from its pairs; the relation-set rule is rendered once per run. The `hf`
backend enforces it with xgrammar (a grammar engine that precomputes token masks for the tokenizer; one compiled
grammar per batch row), the `vllm` backend with vLLM's structured outputs (the same EBNF).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any

from lmrc.errors import LmrcError
from lmrc.stage2.prompts import NONE_ANSWER

log = logging.getLogger(__name__)


def _literal(text: str) -> str:
    """An EBNF string literal (JSON escaping is what xgrammar's EBNF reads)."""
    return json.dumps(text, ensure_ascii=False)


def relation_rule(relation_names: Sequence[str], allow_none: bool) -> str:
    """`rel ::= "country" | ... [| "None"]`, longest names first (no name is cut short by a prefix of it)."""
    names = sorted(set(relation_names) | ({NONE_ANSWER} if allow_none else set()), key=lambda n: (-len(n), n))
    return "rel ::= " + " | ".join(_literal(n) for n in names)


def answer_grammar(pairs: Sequence[tuple[str, str]], rel_rule: str) -> str:
    """The EBNF of one prompt's answer: lines for the asked (head, tail) names only, then the end."""
    if not pairs:
        raise ValueError("answer_grammar: a prompt asks about at least one pair")
    lines = " | ".join(f'"(" {_literal(h)} "| " rel "| " {_literal(t)} ")"' for h, t in dict.fromkeys(pairs))
    return f'root ::= (line ("\\n" line)*)?\nline ::= {lines}\n{rel_rule}\n'


class GrammarCompiler:
    """xgrammar's compiler for one tokenizer, built once per run (the token tables are the costly part; a prompt's
    grammar then compiles in ~15 ms)."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_ids: Sequence[int]) -> None:
        try:
            import xgrammar as xgr
        except ImportError:
            raise LmrcError(
                "generation.constrained needs xgrammar, which is not installed: pip install xgrammar"
            ) from None
        self._xgr = xgr
        info = xgr.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=vocab_size, stop_token_ids=list(stop_ids)
        )
        self._compiler = xgr.GrammarCompiler(info, max_threads=1)

    def compile(self, ebnf: str) -> Any:
        try:
            return self._compiler.compile_grammar(ebnf)
        except RuntimeError as exc:
            raise LmrcError(f"constrained decoding: the answer grammar does not compile: {exc}") from None

    def matcher(self, compiled: Any) -> Any:
        return self._xgr.GrammarMatcher(compiled)


class GrammarLogitsProcessor:
    """A transformers logits processor: row i may only continue as grammar i allows.

    Rows that stopped (their own token budget, a repeated-line loop: `stopped(i)` is true) or that ended their
    answer are padded by `generate`; their matchers are left alone. Unlike xgrammar's own processor, a token the
    grammar did not allow (impossible unless the mask was bypassed) ends masking for that row instead of failing.
    """

    def __init__(self, compiler: GrammarCompiler, grammars: Sequence[Any], stopped) -> None:
        self._xgr = compiler._xgr
        self.matchers = [compiler.matcher(g) for g in grammars]
        self.broken = [False] * len(self.matchers)
        self.stopped = stopped
        self.started = False
        self.bitmask = self._xgr.allocate_token_bitmask(
            len(self.matchers), grammars[0].tokenizer_info.vocab_size
        )

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        if self.started:
            for i, m in enumerate(self.matchers):
                if self._active(i) and not m.accept_token(int(input_ids[i, -1])):
                    log.warning("constrained decoding: row %d left its grammar; masking stops for it", i)
                    self.broken[i] = True
        self.started = True
        rows = []
        for i, m in enumerate(self.matchers):
            if self._active(i):
                m.fill_next_token_bitmask(self.bitmask, i)
                rows.append(i)
        if rows:
            self._xgr.apply_token_bitmask_inplace(scores, self.bitmask.to(scores.device), indices=rows)
        return scores

    def _active(self, i: int) -> bool:
        return not (self.broken[i] or self.matchers[i].is_terminated() or self.stopped(i))
