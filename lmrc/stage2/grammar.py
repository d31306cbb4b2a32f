"""Grammar-constrained answers (`generation.constrained: true`): the LLM can only write what the scorer can use, and
its answer cannot loop or run past its budget.

The answer to a prompt that asks about pairs p_1 .. p_n is, in the order asked, for every pair:
- exactly one line `(head| None| tail)` when the template offers None, or
- 1 to k lines `(head| relation| tail)` (k: `generation.max_relations_per_pair`, default 4, the reference ATLOP's
  cap on relations per pair),
lines joined by newlines, then the end of the answer. A template without None lets a pair have no line at all
(that is how its training answers say "no relation"), so there each pair has 0 to k lines, still in order.
Head and tail are the exact display names of the prompt; relations are names of the relation set, or of the pair's
own narrowed set (`choices`: stage 1's best relations for it, `generation.stage1_choices`). Everything else
(out-of-set names, the `-` placeholder echoed back, unparsable lines, pairs not asked, a pair answered twice or out
of order, a (k+1)-th relation) cannot be generated, so the answer's length is bounded by construction
(`answer_bound`), and the generation budget is sized from that bound.

Distinct relations: a context-free grammar cannot remember which of R names were used without one rule per subset
(or per ordered k-tuple: R^k). The compact exact form is a canonical order: a pair's relations are written in the
order of the relation set (each further one must come later), R x k small rules per pair. It is used for sets of
up to 8 names (narrowed choices, small inventories such as CDR's: an 18-pair prompt compiles in well under a
second). For the whole set (R = 96 on DocRED) it is 6,900 rules per 18-pair prompt, half a minute of xgrammar
compilation per prompt, so there the k lines share one relation rule and a pair may repeat a relation within its
k lines (the scorer reads a pair's relations as a set; a repeat only uses a line).

The grammar is EBNF, built per prompt from its pairs. The `hf` backend enforces it with xgrammar (a grammar engine
that precomputes token masks for the tokenizer; one compiled grammar per batch row), the `vllm` backend with
vLLM's structured outputs (the same EBNF).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from lmrc.errors import LmrcError
from lmrc.stage2.prompts import NONE_ANSWER, triple_line

log = logging.getLogger(__name__)

DEFAULT_MAX_RELATIONS = 4  # the reference ATLOP's cap on relations per pair at prediction time
# Relation sets up to this size get the canonical-order rules (distinct relations); larger ones share one rule.
CANONICAL_ORDER_MAX = 8


def _literal(text: str) -> str:
    """An EBNF string literal (JSON escaping is what xgrammar's EBNF reads)."""
    return json.dumps(text, ensure_ascii=False)


@dataclass(frozen=True)
class AnswerRelations:
    """The relation side of every prompt's grammar in a run: the names in their canonical order (the relation
    set's order, duplicates dropped), whether None is an answer, and the cap k on relations per pair."""

    names: tuple[str, ...]
    allow_none: bool
    max_relations: int = DEFAULT_MAX_RELATIONS

    def __post_init__(self) -> None:
        if not self.names:
            raise ValueError("answer grammar: the relation set is empty")
        if self.max_relations < 1:
            raise ValueError("answer grammar: max_relations must be at least 1")
        if self.allow_none and NONE_ANSWER in self.names:
            raise ValueError(
                f"answer grammar: {NONE_ANSWER!r} is both a relation name and the no-relation answer"
            )


def relation_rule(
    relation_names: Sequence[str], allow_none: bool, max_relations: int = DEFAULT_MAX_RELATIONS
) -> AnswerRelations:
    """The relation side of the grammar, built once per run (the names keep the relation set's order)."""
    return AnswerRelations(tuple(dict.fromkeys(relation_names)), allow_none, max_relations)


def _pair_rules(i: int, head: str, tail: str, rel: AnswerRelations, names: Sequence[str]) -> list[str]:
    """Pair i's whole answer `p<i>`: None, or 1 to k lines. With the whole relation set each line names any
    relation (the shared `rel` rule); with a narrowed set (`choices`) the lines name distinct relations in the
    set's order: `a<i>_<j>_<c>` writes one relation of index >= j, then (with c > 1 lines left) optionally a further line
    whose relation comes later: j * k small rules, each with two choices (take name j, or skip it)."""
    k, m = rel.max_relations, len(names)
    none = f"{_literal(triple_line(head, NONE_ANSWER, tail))} | " if rel.allow_none else ""
    if m > CANONICAL_ORDER_MAX:  # a large set: the shared `rel` rule, k lines (see the module docstring)
        line = f"{_literal(f'({head}| ')} rel {_literal(f'| {tail})')}"
        lines = line
        for _ in range(k - 1):
            lines = f'{line} ("\\n" {lines})?'
        return [f"p{i} ::= {none}{lines}"]
    close, reopen = _literal(f"| {tail})"), _literal(f"\n({head}| ")

    def a(j: int, c: int) -> str:
        return f"a{i}_{j}_{c}"

    rules = []
    for j in range(m):
        for c in range(1, k + 1):
            take = f"{_literal(names[j])} {close}"
            if c > 1 and j + 1 < m:
                take += f" ({reopen} {a(j + 1, c - 1)})?"
            skip = f" | {a(j + 1, c)}" if j + 1 < m else ""
            rules.append(f"{a(j, c)} ::= {take}{skip}")
    rules.insert(0, f"p{i} ::= {none}{_literal(f'({head}| ')} {a(0, k)}")
    return rules


def answer_grammar(
    pairs: Sequence[tuple[str, str]],
    rel: AnswerRelations,
    choices: Sequence[Sequence[str] | None] | None = None,
) -> str:
    """The EBNF of one prompt's answer: every asked (head, tail) in the order asked (pairs asked twice under the
    same names are one pair to the scorer: answered once), as the module docstring says.

    `choices` (one entry per pair, None for the whole set) narrows a pair's relations to a subset of the relation
    set, e.g. stage 1's best relations for it (`generation.stage1_choices`); the subset keeps the set's order."""
    if choices is not None and len(choices) != len(pairs):
        raise ValueError("answer_grammar: one choices entry per pair")
    allowed: dict[tuple[str, str], tuple[str, ...]] = {}
    for n, pair in enumerate(pairs):
        subset = choices[n] if choices is not None else None
        if pair not in allowed:
            wanted = set(subset or ())
            allowed[pair] = tuple(r for r in rel.names if r in wanted) if wanted else rel.names
    if not allowed:
        raise ValueError("answer_grammar: a prompt asks about at least one pair")
    rules: list[str] = []
    for i, ((h, t), names) in enumerate(allowed.items()):
        rules.extend(_pair_rules(i, h, t, rel, names or rel.names))
    if any(len(names or rel.names) > CANONICAL_ORDER_MAX for names in allowed.values()):
        rules.append(
            "rel ::= " + " | ".join(_literal(r) for r in sorted(rel.names, key=lambda r: (-len(r), r)))
        )
    n = len(allowed)
    if rel.allow_none:  # exactly one answer per pair
        root = "root ::= " + ' "\\n" '.join(f"p{i}" for i in range(n))
    else:  # a pair may have no line: `s<i>` is a non-empty answer about pairs i.. (in order)
        for i in range(n):
            rest = f' ("\\n" s{i + 1})?' if i + 1 < n else ""
            skip = f" | s{i + 1}" if i + 1 < n else ""
            rules.append(f"s{i} ::= p{i}{rest}{skip}")
        root = "root ::= s0?"
    return "\n".join([root, *rules]) + "\n"


class AnswerSizer:
    """The longest answer the grammar allows for a list of pairs, measured by `count` (default: characters), plus
    one for the end of the answer; sizes are cached per pair and per relation set, so the prompt planner can ask
    after every pair it adds.

    With `count` = UTF-8 bytes it is a hard bound on tokens for a byte-level tokenizer (every token the grammar
    lets through spells at least one byte), so a generation budget of it can never cut an answer. With `count` =
    the tokenizer's token count it is the length in canonical tokens: what the planner reserves in the context.
    """

    def __init__(self, rel: AnswerRelations, count: Callable[[str], int] = len) -> None:
        self.rel = rel
        self.count = count
        self._longest = sorted((count(r) for r in rel.names), reverse=True)[: rel.max_relations]
        self._newline = count("\n")
        self._pairs: dict[tuple[str, str], int] = {}

    def pair(self, head: str, tail: str) -> int:
        """Characters (or tokens) of one pair's longest answer: its k longest lines, or its None line."""
        size = self._pairs.get((head, tail))
        if size is None:
            frame = self.count(f"({head}| ") + self.count(f"| {tail})")
            size = sum(frame + c for c in self._longest) + self._newline * (len(self._longest) - 1)
            if self.rel.allow_none:
                size = max(size, self.count(triple_line(head, NONE_ANSWER, tail)))
            self._pairs[(head, tail)] = size
        return size

    def __call__(self, pairs: Sequence[tuple[str, str]]) -> int:
        pairs = list(dict.fromkeys(pairs))
        return sum(self.pair(h, t) for h, t in pairs) + self._newline * max(0, len(pairs) - 1) + 1


def answer_bound(
    pairs: Sequence[tuple[str, str]], rel: AnswerRelations, count: Callable[[str], int] = len
) -> int:
    """The longest answer the grammar allows for `pairs` (AnswerSizer, uncached)."""
    return AnswerSizer(rel, count)(pairs)


def utf8_bytes(text: str) -> int:
    return len(text.encode("utf-8"))


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
