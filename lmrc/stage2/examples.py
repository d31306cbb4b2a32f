"""Training examples for stage 2: prompt token ids + answer token ids, loss on the answer only.

- `rc` (LMRC's relation classification): each training document's gold relation pairs (optionally plus stage-1
  false positives answered None, `rc_allow_none`), answer lines in the order the pairs were asked, then EOS.
- `direct` (the paper's direct fine-tuning baseline): all ordered pairs of the document in chunks, `None` for
  pairs without a relation; optionally only a sampled fraction of the chunks whose pairs are all NA.

The prompt is tokenised on its own, exactly as at generation time (`PromptEncoder` is shared with predict), and
the answer tokens are appended, so the prompt/answer boundary is exact and the labels mask the prompt precisely.
Pairs are split over prompts by `plan_prompts`; a prompt whose real answer still overflows `max_seq_len` is
split again, and only a single pair that cannot fit has its answer cut (counted and logged).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from lmrc.data.docred import Document
from lmrc.data.relations import RelationSet
from lmrc.stage2.prompts import (
    Prompt,
    PromptEncoder,
    entity_names,
    plan_prompts,
    render_answer,
)
from lmrc.stage2.templates import PromptTemplate

log = logging.getLogger(__name__)

IGNORE_INDEX = -100  # labels with this value are left out of the loss (torch cross_entropy's ignore_index)


@dataclass
class TrainExample:
    title: str
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX on prompt tokens
    pairs: tuple[tuple[int, int], ...]
    answer_cut: bool = False

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def n_answer_tokens(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE_INDEX)


@dataclass
class ExampleStats:
    """What building the training set did, for the run's summary (and for spotting silent data loss)."""

    documents: int = 0
    documents_without_pairs: int = 0
    examples: int = 0
    pairs: int = 0
    none_pairs: int = 0  # pairs answered None (direct NA pairs, rc false positives)
    false_positive_pairs: int = 0  # rc_allow_none: stage-1 candidates without a gold relation
    documents_missing_candidates: int = 0
    truncated_documents: int = 0  # document text cut so that the prompt fits
    resplit_prompts: int = 0  # prompts split again because their real answer did not fit
    answers_cut: int = 0  # single-pair examples whose answer was cut at max_seq_len
    examples_dropped: int = 0  # prompt alone longer than max_seq_len (cannot happen with planned prompts)
    na_chunks: int = 0  # direct: examples whose pairs are all NA
    na_chunks_dropped: int = 0  # ... of which left out by direct_na_chunk_fraction
    prompt_tokens: int = 0
    answer_tokens: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    def count_kept(self, example: TrainExample, gold: Mapping[tuple[int, int], Any]) -> None:
        """Add a kept example's pairs and tokens."""
        self.pairs += len(example.pairs)
        self.none_pairs += sum(1 for p in example.pairs if p not in gold)
        self.answer_tokens += example.n_answer_tokens
        self.prompt_tokens += len(example) - example.n_answer_tokens


def training_pairs(
    doc: Document, mode: str, candidate_pairs: Sequence[tuple[int, int]] | None = None
) -> list[tuple[int, int]]:
    """The pairs a training document asks about, in the canonical (row-major) pair order.

    rc: the gold relation pairs, plus `candidate_pairs` (stage-1 false positives) when given; direct: all pairs.
    """
    if mode == "direct":
        return doc.pairs()
    wanted = set(doc.relations_by_pair())
    if candidate_pairs:
        wanted.update((int(h), int(t)) for h, t in candidate_pairs if h != t)
    return sorted(wanted)


class ExampleBuilder:
    """Renders, tokenises and fits the training examples of documents (see the module docstring)."""

    def __init__(
        self,
        relations: RelationSet,
        template: PromptTemplate,
        encoder: PromptEncoder,
        max_seq_len: int,
        max_pairs: int | None = 18,
        answer_tokens_per_pair: int = 24,
    ) -> None:
        self.relations = relations
        self.template = template
        self.encoder = encoder
        self.max_seq_len = max_seq_len
        self.max_pairs = max_pairs
        self.answer_tokens_per_pair = answer_tokens_per_pair
        self.max_context = encoder.max_context(max_seq_len)

    def plan(
        self,
        doc: Document,
        pairs: Sequence[tuple[int, int]],
        names: Sequence[str],
        max_pairs: int | None = None,
        hints=None,
    ) -> list[Prompt]:
        return plan_prompts(
            doc,
            self.relations,
            pairs,
            self.template,
            self.encoder.count_tokens,
            self.max_context,
            max_pairs=max_pairs or self.max_pairs,
            answer_tokens_per_pair=self.answer_tokens_per_pair,
            names=names,
            hints=hints,
        )

    def document_examples(
        self, doc: Document, pairs: Sequence[tuple[int, int]], stats: ExampleStats, hints=None
    ) -> list[TrainExample]:
        names = entity_names(doc)
        gold = doc.relations_by_pair()
        out: list[TrainExample] = []
        prompts = self.plan(doc, pairs, names, hints=hints)
        if any(p.truncated_doc for p in prompts):
            stats.truncated_documents += 1
        self._fit(doc, prompts, names, gold, out, stats, hints)
        return out

    def _fit(self, doc, prompts, names, gold, out, stats, hints=None) -> None:
        for prompt in prompts:
            prompt_ids = self.encoder.encode_prompt(prompt.text)
            answer = render_answer(prompt.pairs, names, gold, self.relations, self.template)
            answer_ids = self.encoder.encode_answer(answer)
            if len(prompt_ids) + len(answer_ids) > self.max_seq_len and len(prompt.pairs) > 1:
                # The answer was longer than planned (pairs with several relations): halve the chunk.
                stats.resplit_prompts += 1
                smaller = self.plan(
                    doc, prompt.pairs, names, max_pairs=max(1, len(prompt.pairs) // 2), hints=hints
                )
                self._fit(doc, smaller, names, gold, out, stats, hints)
                continue
            cut = False
            room = self.max_seq_len - len(prompt_ids)
            if room < 1:
                stats.examples_dropped += 1
                log.warning(
                    'document %d ("%s"): a prompt of %d tokens exceeds max_seq_len=%d; example dropped',
                    doc.index,
                    doc.title,
                    len(prompt_ids),
                    self.max_seq_len,
                )
                continue
            if len(answer_ids) > room:
                answer_ids = answer_ids[:room]
                cut = True
                stats.answers_cut += 1
            out.append(
                TrainExample(
                    title=doc.title,
                    input_ids=prompt_ids + answer_ids,
                    labels=[IGNORE_INDEX] * len(prompt_ids) + answer_ids,
                    pairs=tuple(prompt.pairs),
                    answer_cut=cut,
                )
            )

    def build(
        self,
        docs: Sequence[Document],
        mode: str,
        candidates: dict[str, Sequence[tuple[int, int]]] | None = None,
        na_chunk_fraction: float = 1.0,
        seed: int = 0,
        hints: dict[str, dict] | None = None,
    ) -> tuple[list[TrainExample], ExampleStats]:
        """All training examples of `docs`, in document order, and what was done to build them.

        `candidates` (rc with None answers): title -> stage-1 candidate pairs of that training document.
        `na_chunk_fraction` (direct): keep each all-NA example with this probability (seeded, reproducible).
        `hints` (rc with hints): title -> the stage-1 hints of that document's pairs (cross-fitted candidates).
        """
        if candidates is not None and not self.template.allow_none:
            raise ValueError("candidate pairs need a template that offers None (rc_allow_none)")
        stats = ExampleStats()
        rng = random.Random(seed)
        examples: list[TrainExample] = []
        for doc in docs:
            stats.documents += 1
            gold = doc.relations_by_pair()
            pairs = _document_pairs(doc, mode, candidates, gold, stats)
            if not pairs:
                continue
            doc_hints = hints.get(doc.title) if hints is not None else None
            for ex in self.document_examples(doc, pairs, stats, doc_hints):
                if mode == "direct" and not any(p in gold for p in ex.pairs):
                    stats.na_chunks += 1
                    if na_chunk_fraction < 1.0 and rng.random() >= na_chunk_fraction:
                        stats.na_chunks_dropped += 1
                        continue
                stats.count_kept(ex, gold)
                examples.append(ex)
        stats.examples = len(examples)
        self._log_losses(stats, na_chunk_fraction)
        return examples, stats

    def _log_losses(self, stats: ExampleStats, na_chunk_fraction: float) -> None:
        """Warn about what building the examples cut or dropped."""
        if stats.truncated_documents:
            log.warning(
                "%d training documents were truncated to fit max_seq_len=%d",
                stats.truncated_documents,
                self.max_seq_len,
            )
        if stats.answers_cut:
            log.warning(
                "%d training answers were cut at max_seq_len=%d (a single pair's answer did not fit)",
                stats.answers_cut,
                self.max_seq_len,
            )
        if stats.na_chunks_dropped:
            log.info(
                "direct_na_chunk_fraction=%.3g: kept %d of %d all-NA chunks",
                na_chunk_fraction,
                stats.na_chunks - stats.na_chunks_dropped,
                stats.na_chunks,
            )


def _document_pairs(
    doc: Document,
    mode: str,
    candidates: dict[str, Sequence[tuple[int, int]]] | None,
    gold: dict[tuple[int, int], list[str]],
    stats: ExampleStats,
) -> list[tuple[int, int]]:
    """The pairs a training document asks about (with its stage-1 candidates, when given), counted in `stats`."""
    extra = None
    if candidates is not None:
        if doc.title in candidates:
            extra = candidates[doc.title]
        else:
            stats.documents_missing_candidates += 1
    pairs = training_pairs(doc, mode, extra)
    if not pairs:
        stats.documents_without_pairs += 1
    elif extra is not None:
        stats.false_positive_pairs += sum(1 for p in pairs if p not in gold)
    return pairs
