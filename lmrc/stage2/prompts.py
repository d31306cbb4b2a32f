"""Stage 2's prompts: a document rendered into its prompts with a template (lmrc.stage2.templates), split so that
each fits the model's context with room for its answer, the training answers, and the token ids of a prompt.

A prompt is the document's shared prefix (instruction, relation set, text: reusable across that document's
prompts) and a suffix that asks about some of its entity pairs. Entities are named by their first mention, made
unique within the document (`entity_names`). Training and inference use the same rendering; training appends
`render_answer(...)` and EOS.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from lmrc.data.docred import Document
from lmrc.data.relations import RelationSet
from lmrc.errors import LmrcError
from lmrc.stage2.templates import PromptTemplate, fill_slots

log = logging.getLogger(__name__)

NONE_ANSWER = "None"  # the answer for a pair without relations (LMRC: "we use None to represent NA")
# The relation field of an input pair, as in the paper's '(head entity| -| tail entity)'.
PAIR_PLACEHOLDER = "-"
HINT_PREFIX = "hints: "  # the relation field of an input pair that carries stage 1's best relations


def triple_line(head: str, relation: str, tail: str) -> str:
    """The one line format shared by the input pairs and the answers (parse.py reads it back)."""
    return f"({head}| {relation}| {tail})"


def _clean_name(name: str) -> str:
    # A '|' or a line break inside a name would break the one-line `(head| relation| tail)` format.
    return " ".join(name.replace("|", "/").split())


def entity_names(doc: Document) -> list[str]:
    """One display name per entity: its first mention's name, made unique within the document.

    Entities sharing a name get their type appended (`Paris (LOC)`, `Paris (ORG)`), then a number when the type
    does not separate them (`Paris (LOC 1)`, `Paris (LOC 2)`), so no pair has to be dropped as ambiguous.
    """
    base = [_clean_name(e.name) or f"entity {e.index}" for e in doc.entities]
    counts = Counter(base)
    names = list(base)
    taken = {n for n, c in counts.items() if c == 1}
    groups: dict[str, list[int]] = {}
    for i, n in enumerate(base):
        if counts[n] > 1:
            groups.setdefault(n, []).append(i)
    for name, idxs in groups.items():
        by_type: dict[str, list[int]] = {}
        for i in idxs:
            by_type.setdefault(_clean_name(doc.entities[i].type), []).append(i)
        for i in idxs:
            etype = _clean_name(doc.entities[i].type)
            same = by_type[etype]
            number = same.index(i) + 1 if len(same) > 1 or not etype else None
            candidate = _disambiguated(name, etype, number)
            while candidate in taken:
                number = (number or 1) + 1
                candidate = _disambiguated(name, etype, number)
            taken.add(candidate)
            names[i] = candidate
    return names


def _disambiguated(name: str, etype: str, number: int | None) -> str:
    tag = " ".join(x for x in (etype, str(number) if number is not None else "") if x)
    return f"{name} ({tag})"


def _relation_lines(relations: RelationSet) -> str:
    return "\n".join(relations.name(rid) for rid in relations.ids)


def truncate_words(words: Sequence[str], max_tokens: int, count_tokens: Callable[[str], int]) -> int:
    """The largest k such that the first k words, joined by spaces, count at most `max_tokens` tokens."""
    lo, hi = 0, len(words)
    while lo < hi:  # binary search: token counts grow with the number of words
        mid = (lo + hi + 1) // 2
        if count_tokens(" ".join(words[:mid])) <= max_tokens:
            lo = mid
        else:
            hi = mid - 1
    return lo


def render_prefix(
    template: PromptTemplate,
    doc: Document,
    relations: RelationSet,
    max_doc_tokens: int | None = None,
    count_tokens: Callable[[str], int] | None = None,
) -> tuple[str, bool]:
    """The document's shared prefix (instruction, relation set, text) and whether the text was truncated.

    With `max_doc_tokens` (and `count_tokens`), the text is cut to its longest word prefix within that budget.
    """
    words = doc.words
    truncated = False
    if max_doc_tokens is not None:
        if count_tokens is None:
            raise ValueError("render_prefix: max_doc_tokens needs count_tokens")
        text = " ".join(words)
        if count_tokens(text) > max_doc_tokens:
            keep = truncate_words(words, max(max_doc_tokens, 0), count_tokens)
            log.warning(
                'document %d ("%s"): text truncated from %d to %d words to fit the context',
                doc.index,
                doc.title,
                len(words),
                keep,
            )
            words = words[:keep]
            truncated = True
    values = {
        "title": _clean_name(doc.title),
        "relations": _relation_lines(relations),
        "text": " ".join(words),
    }
    return fill_slots(template.prefix_text, values), truncated


Hints = Mapping[tuple[int, int], Sequence[str]]  # pair -> stage 1's best relation names, best first


def render_pairs(pairs: Sequence[tuple[int, int]], names: Sequence[str], hints: Hints | None = None) -> str:
    """`(head| -| tail)` per pair, or `(head| hints: r1; r2| tail)` for a pair with hints."""

    def field_(pair: tuple[int, int]) -> str:
        rels = hints.get(pair) if hints else None
        return HINT_PREFIX + "; ".join(_clean_name(r) for r in rels) if rels else PAIR_PLACEHOLDER

    return "\n".join(triple_line(names[h], field_((h, t)), names[t]) for h, t in pairs)


def render_suffix(
    template: PromptTemplate,
    pairs: Sequence[tuple[int, int]],
    names: Sequence[str],
    hints: Hints | None = None,
) -> str:
    """The per-prompt part: number of pairs, the pairs as `(head| -| tail)`, and the response header."""
    return fill_slots(
        template.suffix_text, {"n_pairs": str(len(pairs)), "pairs": render_pairs(pairs, names, hints)}
    )


def render_answer(
    pairs: Sequence[tuple[int, int]],
    names: Sequence[str],
    relations_by_pair: dict[tuple[int, int], list[str]],
    relations: RelationSet,
    template: PromptTemplate,
) -> str:
    """The gold answer: one `(head| relation| tail)` line per relation, pairs in the order asked.

    A pair without relations answers `(head| None| tail)` when the template allows None, else it gets no line.
    No trailing newline; the training code appends EOS.
    """
    lines = []
    for h, t in pairs:
        rids = relations_by_pair.get((h, t), [])
        if rids:
            lines.extend(triple_line(names[h], relations.name(r), names[t]) for r in rids)
        elif template.allow_none:
            lines.append(triple_line(names[h], NONE_ANSWER, names[t]))
    return "\n".join(lines)


@dataclass(frozen=True)
class Prompt:
    title: str
    prefix: str
    suffix: str
    pairs: tuple[tuple[int, int], ...]
    truncated_doc: bool = False

    @property
    def text(self) -> str:
        return self.prefix + self.suffix


@dataclass(frozen=True)
class _Room:
    """What one prompt of a document may hold: its text plus the room reserved for its answer within
    `max_context`, and (constrained answers) an answer no longer than `answer_cap`."""

    template: PromptTemplate
    names: Sequence[str]
    hints: Hints | None
    count_tokens: Callable[[str], int]
    max_context: int
    answer_room: Callable[[Sequence[tuple[int, int]]], int]
    answer_cap: int | None

    def suffix(self, chunk: Sequence[tuple[int, int]]) -> str:
        return render_suffix(self.template, chunk, self.names, self.hints)

    def fits(self, prefix_tokens: int, chunk: Sequence[tuple[int, int]]) -> bool:
        """The prefix (counted apart) and the chunk's suffix, with the chunk's answer, fit; one pair always may
        exceed the answer cap."""
        used = prefix_tokens + self.count_tokens(self.suffix(chunk))
        capped = self.answer_cap is not None and len(chunk) > 1 and self.answer_room(chunk) > self.answer_cap
        return used + self.answer_room(chunk) <= self.max_context and not capped

    def fits_joined(self, prefix: str, chunk: Sequence[tuple[int, int]]) -> bool:
        """The same on the joined text: the seam between prefix and suffix may cost a token."""
        total = self.count_tokens(prefix + self.suffix(chunk))
        return total + self.answer_room(chunk) <= self.max_context


def plan_prompts(
    doc: Document,
    relations: RelationSet,
    pairs: Sequence[tuple[int, int]],
    template: PromptTemplate,
    count_tokens: Callable[[str], int],
    max_context: int,
    max_pairs: int | None = 18,
    answer_tokens_per_pair: int = 24,
    names: Sequence[str] | None = None,
    hints: Hints | None = None,
    answer_tokens: Callable[[Sequence[tuple[int, int]]], int] | None = None,
    answer_cap: int | None = None,
) -> list[Prompt]:
    """Split `pairs` (kept in order) into prompts of at most `max_pairs` pairs that fit `max_context` tokens.

    A prompt fits when its tokens plus the room reserved for its answer are within `max_context`: by default
    `answer_tokens_per_pair` per pair (the expected answer), or `answer_tokens(chunk)` when the answer's length is
    known (constrained answers: the grammar's bound), in which case a chunk grows only while that stays within
    `answer_cap` (the generation's hard cap on new tokens), so no planned answer is cut. This is
    `max_context` - the paper's k "maximum number of entity pairs that can be accommodated in each input", capped
    at 18 as the authors' code does for direct fine-tuning (`max_pairs=None`: no cap, only the context limits a
    prompt, as LMRC's rc stage with one input per document). If the prefix leaves no room for even one pair, the
    document text is truncated (logged, and flagged on every prompt of the document). No pairs: no prompts.
    """
    if not pairs:
        return []
    if max_pairs is None:
        max_pairs = len(pairs)
    if max_pairs < 1:
        raise LmrcError(f"max_pairs must be at least 1, got {max_pairs}")
    names = list(names) if names is not None else entity_names(doc)
    pairs = [(int(h), int(t)) for h, t in pairs]
    room = _Room(
        template,
        names,
        hints,
        count_tokens,
        max_context,
        answer_tokens or (lambda chunk: answer_tokens_per_pair * len(chunk)),
        answer_cap,
    )
    prefix, truncated = render_prefix(template, doc, relations)
    prefix_tokens = count_tokens(prefix)
    if not room.fits(prefix_tokens, pairs[:1]):
        prefix, prefix_tokens = _truncated_prefix(doc, relations, room, pairs[0])
        truncated = True
    return [
        Prompt(doc.title, prefix, room.suffix(chunk), tuple(chunk), truncated)
        for chunk in _chunks(pairs, max_pairs, room, prefix, prefix_tokens)
    ]


def _chunks(
    pairs: Sequence[tuple[int, int]], max_pairs: int, room: _Room, prefix: str, prefix_tokens: int
) -> list[list[tuple[int, int]]]:
    """The pairs cut, in order, into the largest chunks that fit after `prefix`."""
    chunks = []
    i = 0
    while i < len(pairs):
        chunk = [pairs[i]]
        # Grow the chunk one pair at a time: token counts of the suffix are not exactly additive.
        while (
            i + len(chunk) < len(pairs)
            and len(chunk) < max_pairs
            and room.fits(prefix_tokens, [*chunk, pairs[i + len(chunk)]])
        ):
            chunk.append(pairs[i + len(chunk)])
        # The prefix and suffix were counted apart; check the joined text and shrink if the seam cost a token.
        while len(chunk) > 1 and not room.fits_joined(prefix, chunk):
            chunk.pop()
        chunks.append(chunk)
        i += len(chunk)
    return chunks


def _truncated_prefix(
    doc: Document, relations: RelationSet, room: _Room, first_pair: tuple[int, int]
) -> tuple[str, int]:
    """Cut the document text so that the prefix plus one pair and its answer fit; the prefix and its tokens."""
    template, count_tokens, max_context = room.template, room.count_tokens, room.max_context
    answer_room = room.answer_room([first_pair])
    suffix = room.suffix([first_pair])
    fixed = fill_slots(
        template.prefix_text,
        {"title": _clean_name(doc.title), "relations": _relation_lines(relations), "text": ""},
    )
    budget = max_context - count_tokens(fixed + suffix) - answer_room
    if budget < 0:
        raise LmrcError(
            f"max_context={max_context} tokens is too small for the {template.mode} prompt template "
            f"({template.source}): the instruction, relation set and one entity pair alone need "
            f"{count_tokens(fixed + suffix) + answer_room} tokens"
        )
    while True:
        prefix, _ = render_prefix(template, doc, relations, max_doc_tokens=budget, count_tokens=count_tokens)
        if count_tokens(prefix + suffix) + answer_room <= max_context or budget == 0:
            return prefix, count_tokens(prefix)
        budget = max(0, budget - max(1, budget // 50))


class PromptEncoder:
    """Prompt text -> input ids, identical for training and generation; counts tokens for prompt planning.

    Plain mode tokenises the Alpaca-framed text with the tokenizer's own special tokens (e.g. Llama's BOS). Chat
    mode wraps the text as one user turn of the tokenizer's chat template, with the assistant header appended.
    """

    def __init__(self, tokenizer: Any, use_chat_template: bool = False) -> None:
        self.tokenizer = tokenizer
        self.use_chat_template = use_chat_template
        if use_chat_template and not getattr(tokenizer, "chat_template", None):
            raise LmrcError(
                f"use_chat_template: the tokenizer of {tokenizer.name_or_path} has no chat template "
                "(set use_chat_template: false for the plain Alpaca frame)"
            )
        self.eos_id: int = tokenizer.eos_token_id
        # Tokens the encoding adds around the text (BOS, chat headers); prompt planning leaves room for them.
        self.overhead = len(self.encode_prompt(""))

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def prompt_text(self, text: str) -> str:
        """The exact string fed to the model (the chat-templated text in chat mode)."""
        if not self.use_chat_template:
            return text
        return self.tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )

    def encode_prompt(self, text: str) -> list[int]:
        if self.use_chat_template:
            # The chat template already holds any BOS; adding special tokens again would double it.
            return list(self.tokenizer(self.prompt_text(text), add_special_tokens=False)["input_ids"])
        return list(self.tokenizer(text, add_special_tokens=True)["input_ids"])

    def encode_answer(self, answer: str) -> list[int]:
        """Answer tokens followed by EOS: the model learns to stop after the last line."""
        return list(self.tokenizer(answer, add_special_tokens=False)["input_ids"]) + [self.eos_id]

    def max_context(self, max_seq_len: int) -> int:
        """The token budget `plan_prompts` may fill with prompt text and estimated answer (EOS excluded)."""
        return max_seq_len - self.overhead - 1
