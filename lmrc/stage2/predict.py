"""Stage 2 at prediction time: a trained adapter classifies the entity pairs of documents, batch by batch.

`Stage2Runner` renders each document's prompts for the pairs it is given (in canonical row-major order, as in
training), generates all prompts of the batch together, and parses and aligns the answers into predictions and
counts. Which pairs, and the resumable run around it, belong to the one prediction driver (`lmrc.predict.run`,
used by `lmrc predict` and `lmrc stage2 predict`). A document without pairs gets no prompt and costs no LLM call.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lmrc.config import expand_path, replace_nested, to_dict
from lmrc.data.candidates import hint_names
from lmrc.data.docred import Document
from lmrc.data.relations import RelationSet, load_relations
from lmrc.errors import LmrcError
from lmrc.models.store import default_cache_dir
from lmrc.stage2.align import AlignResult, RelationMapper, align_output, entity_choices, get_scorer
from lmrc.stage2.config import Stage2Config
from lmrc.stage2.generate import Generation, Generator, answer_budget, create_generator
from lmrc.stage2.grammar import AnswerSizer, answer_grammar, relation_rule, utf8_bytes
from lmrc.stage2.modeling import (
    RELATIONS_FILE,
    TEMPLATE_FILE,
    load_adapter_config,
    load_tokenizer,
    resolve_model_path,
)
from lmrc.stage2.parse import parse_triples
from lmrc.stage2.prompts import (
    Prompt,
    PromptEncoder,
    entity_names,
    plan_prompts,
)
from lmrc.stage2.templates import PromptTemplate, load_template

log = logging.getLogger(__name__)

# Settings that shape the prompts the adapter learned, or its base model: predicting with others would silently
# mismatch (another base model would load the adapter onto the wrong weights).
_FIXED_BY_TRAINING = (
    "mode", "model", "template", "use_chat_template", "rc_allow_none", "lora", "max_seq_len", "max_pairs",
    "answer_tokens_per_pair", "hints",
)  # fmt: skip


def adapter_relations(adapter_dir: Path, cfg: Stage2Config) -> RelationSet:
    """The relation set the adapter was trained with (its copy), else the configured rel_info."""
    own = adapter_dir / RELATIONS_FILE
    if own.is_file():
        return load_relations(own)
    path = cfg.data.path("rel_info")
    assert path is not None
    return load_relations(path)


def adapter_template(adapter_dir: Path, cfg: Stage2Config) -> PromptTemplate:
    """The template the adapter was trained with, so that inference renders the very same prompts."""
    own = adapter_dir / TEMPLATE_FILE
    path = own if own.is_file() else None
    if path is None and cfg.template:
        path = expand_path(cfg.template, "template")
    return load_template(cfg.mode, path, allow_none=cfg.allow_none, hints=cfg.hints > 0)


def predict_settings(adapter_dir: Path, overrides: Mapping[str, Any]) -> Stage2Config:
    """The adapter's config with this run's `overrides` (through dataclasses.replace), refused where they change a
    setting fixed by training."""
    trained = load_adapter_config(adapter_dir)
    cfg = replace_nested(trained, overrides, "--set")
    for key in _FIXED_BY_TRAINING:
        if getattr(cfg, key) != getattr(trained, key):
            raise LmrcError(
                f"--set {key}: the adapter was trained with {key}={to_dict(getattr(trained, key))!r} "
                f"({adapter_dir}/config.yaml), not {to_dict(getattr(cfg, key))!r}; it cannot change at "
                "predict time (train another adapter)"
            )
    return cfg


class _Aligner:
    """Alignment with the configured relation mapping, plus strict alignment when mapping with SBERT."""

    def __init__(self, cfg: Stage2Config, relations: RelationSet) -> None:
        get_scorer(cfg.align.scorer)  # fail early on a bad scorer name
        self.cfg = cfg.align
        self.relations = relations
        self.strict = RelationMapper(relations, mode="strict")
        self.mapper = self.strict
        if cfg.align.relation_mapping == "sbert":
            self.mapper = RelationMapper(
                relations,
                sbert_path=cfg.align.sbert_model,
                theta=cfg.align.theta,
                mode="sbert",
                cache_dir=default_cache_dir(),
            )

    def align(self, text: str, prompt: Prompt, doc: Document, names, choices, mapper=None) -> AlignResult:
        return align_output(
            text,
            prompt,
            doc,
            names,
            self.relations,
            mapper or self.mapper,
            cutoff=self.cfg.cutoff,
            scorer=self.cfg.scorer,
            choices=choices,
        )


class Stage2Runner:
    """A trained adapter, ready to classify the pairs of documents batch by batch (stage-2 predict and the
    pipeline share it). The generator loads on the first prompt: a batch without pairs costs no model load."""

    def __init__(
        self,
        adapter_dir: str | os.PathLike,
        overrides: Mapping[str, Any] | None = None,
        generator: Generator | None = None,
        device: Any = None,
    ) -> None:
        """`overrides`: settings of the adapter's config to change for this run (a nested mapping, as
        lmrc.predict.config.Stage2Settings.overrides); those fixed by training cannot change."""
        self.adapter_dir = Path(adapter_dir)
        self.cfg = cfg = predict_settings(self.adapter_dir, overrides or {})
        self.relations = adapter_relations(self.adapter_dir, cfg)
        self.template = adapter_template(self.adapter_dir, cfg)
        self.tokenizer = generator.tokenizer if generator is not None else load_tokenizer(self.adapter_dir)
        self.encoder = PromptEncoder(self.tokenizer, cfg.use_chat_template)
        self.aligner = _Aligner(cfg, self.relations)
        self._generator = generator
        self._device = device
        self._context: int | None = None
        self._context_read = False
        self.rel_rule = None
        self._answer_tokens = self._answer_bytes = None
        if cfg.generation.constrained:
            # The relation-set part of every prompt's grammar, rendered once per run.
            self.rel_rule = relation_rule(
                [self.relations.name(r) for r in self.relations.ids],
                cfg.allow_none,
                cfg.generation.max_relations_per_pair,
            )
            # The grammar's bound on an answer: in tokens (what the planner reserves in the context) and in bytes
            # (the generation budget: no token spells less than a byte, so the answer is never cut).
            self._answer_tokens = AnswerSizer(self.rel_rule, self.encoder.count_tokens)
            self._answer_bytes = AnswerSizer(self.rel_rule, utf8_bytes)

    @property
    def mode(self) -> str:
        return self.cfg.mode

    def generator(self) -> Generator:
        if self._generator is None:
            self._generator = create_generator(self.cfg, self.adapter_dir, self._device)
        return self._generator

    def context(self) -> int:
        """Tokens a prompt and its answer may fill: max_seq_len, or the model's window when smaller."""
        if not self._context_read:
            window = _model_context(self.cfg)
            self._context = min(self.cfg.max_seq_len, window) if window else self.cfg.max_seq_len
            self._context_read = True
        assert self._context is not None
        return self._context

    def plan(self, doc: Document, pairs: list[tuple[int, int]], hints=None) -> tuple[list[str], list[Prompt]]:
        return _plan_document(
            doc, pairs, self.relations, self.template, self.encoder, self.cfg, hints, self._answer_tokens
        )

    def hints_for(self, dc) -> dict | None:
        """The hints of a document's candidates (None when the adapter was trained without hints)."""
        if not self.cfg.hints or dc is None:
            return None
        return hint_names(dc, self.relations.names, self.cfg.hints)

    def choices_for(self, dc) -> dict | None:
        """Each candidate pair's allowed relation names for constrained answers (`generation.stage1_choices`:
        stage 1's n best), or None (the whole relation set)."""
        n = self.cfg.generation.stage1_choices
        if not (self.cfg.generation.constrained and n) or dc is None:
            return None
        return hint_names(dc, self.relations.names, n)

    def run(
        self,
        docs: Sequence[Document],
        pairs_by_doc: Sequence[list[tuple[int, int]]],
        hints_by_doc: Sequence[dict | None] | None = None,
        choices_by_doc: Sequence[dict | None] | None = None,
    ) -> list[tuple[dict, dict]]:
        """(progress record, debug record) of every document; all prompts of the batch are generated together,
        so the outputs depend only on the batch, not on what ran before it. `choices_by_doc`: per document, the
        pairs' narrowed relation names for the grammar (choices_for)."""
        t0 = time.perf_counter()
        plans = []
        # (position of the document in docs, prompt number in the document, prompt ids, answer budget)
        jobs: list[tuple[int, int, list[int], int]] = []
        grammars: list[str] | None = [] if self.rel_rule is not None else None
        for position, (doc, pairs) in enumerate(zip(docs, pairs_by_doc)):
            hints = hints_by_doc[position] if hints_by_doc is not None else None
            names, prompts = self.plan(doc, pairs, hints)
            plans.append((names, prompts))
            for number, prompt in enumerate(prompts):
                ids = self.encoder.encode_prompt(prompt.text)
                bound = None
                if grammars is not None:
                    asked = [(names[h], names[t]) for h, t in prompt.pairs]
                    allowed = choices_by_doc[position] if choices_by_doc is not None else None
                    narrowed = [allowed.get(pair) for pair in prompt.pairs] if allowed else None
                    # the bound below stays the whole set's: a narrowed answer is never longer
                    grammars.append(answer_grammar(asked, self.rel_rule, narrowed))
                    bound = self._answer_bytes(asked)
                budget = answer_budget(
                    len(prompt.pairs), self.cfg.generation, len(ids), self.context(), bound
                )
                jobs.append((position, number, ids, budget))
        outputs = []
        if jobs:
            prompts_ids, budgets = [job[2] for job in jobs], [job[3] for job in jobs]
            # A document's prompts share instruction, relation set and text: one group each, so a backend with
            # prefix caching (hf: generation.prefix_cache) prefills that prefix once per document.
            groups = [job[0] for job in jobs]
            outputs = self.generator().generate(prompts_ids, budgets, grammars=grammars, groups=groups)
        if len(outputs) != len(jobs):
            raise RuntimeError(f"generator returned {len(outputs)} outputs for {len(jobs)} prompts")
        by_doc: dict[int, list] = {}
        for (position, number, ids, budget), generation in zip(jobs, outputs):
            by_doc.setdefault(position, []).append((number, ids, budget, generation))
        elapsed = time.perf_counter() - t0
        n_timed = max(1, len(by_doc))
        finished = []
        for position, doc in enumerate(docs):
            record, debug = _finish_document(
                doc, doc.index, plans[position], by_doc.get(position, []), self.aligner
            )
            record["seconds"] = round(elapsed / n_timed, 3) if position in by_doc else 0.0
            finished.append((record, debug))
        return finished


def _plan_document(
    doc: Document,
    pairs: list[tuple[int, int]],
    relations: RelationSet,
    template: PromptTemplate,
    encoder: PromptEncoder,
    cfg: Stage2Config,
    hints=None,
    answer_sizer=None,
) -> tuple[list[str], list[Prompt]]:
    """Display names and prompts of one document, planned as for training; no pairs, no prompt. With constrained
    answers (`answer_sizer`: the grammar's bound in tokens) each prompt reserves its answer's longest length
    instead of the per-pair estimate, within the cap on new tokens, so a constrained answer is never cut."""
    names = entity_names(doc)
    if not pairs:
        return names, []
    answer_tokens = None
    if answer_sizer is not None:

        def answer_tokens(chunk):
            return answer_sizer([(names[h], names[t]) for h, t in chunk])

    prompts = plan_prompts(
        doc,
        relations,
        pairs,
        template,
        encoder.count_tokens,
        encoder.max_context(cfg.max_seq_len),
        max_pairs=cfg.max_pairs,
        answer_tokens_per_pair=cfg.answer_tokens_per_pair,
        names=names,
        hints=hints,
        answer_tokens=answer_tokens,
        answer_cap=cfg.generation.max_new_tokens_cap,
    )
    return names, prompts


def _model_context(cfg: Stage2Config) -> int | None:
    """The base model's context window (from its config), to keep prompt + answer inside it."""
    try:
        path = resolve_model_path(cfg.model) / "config.json"
        return int(json.loads(path.read_text(encoding="utf-8")).get("max_position_embeddings")) or None
    except (OSError, LmrcError, TypeError, ValueError):
        return None


def _finish_document(doc: Document, index: int, plan, generated, aligner: _Aligner) -> tuple[dict, dict]:
    """A document's progress record (its predictions, counts and drops) and debug record, from the answers to its
    prompts (`generated`: (prompt number, prompt ids, budget, Generation) rows)."""
    names, prompts = plan
    choices = entity_choices(doc, names)
    predictions: dict[tuple, dict] = {}
    strict: dict[tuple, dict] = {}
    drops: Counter = Counter()
    counts: Counter = Counter()
    debug_prompts = []
    for number, ids, budget, gen in sorted(generated, key=lambda row: row[0]):
        prompt = prompts[number]
        aligned = aligner.align(gen.text, prompt, doc, names, choices)
        for p in aligned.predictions:
            predictions.setdefault((p["h_idx"], p["t_idx"], p["r"]), p)
        if aligner.mapper is not aligner.strict:
            for p in aligner.align(gen.text, prompt, doc, names, choices, mapper=aligner.strict).predictions:
                strict.setdefault((p["h_idx"], p["t_idx"], p["r"]), p)
        drops.update(aligned.drops)
        counts.update(_prompt_counts(prompt, ids, gen, aligned))
        debug_prompts.append(_prompt_debug(prompt, ids, budget, gen, aligned))
    record = {
        "title": doc.title,
        "index": index,
        "n_entities": len(doc.entities),
        "truncated": any(p.truncated_doc for p in prompts),
        "counts": dict(counts),
        "drops": dict(drops),
        "predictions": list(predictions.values()),
    }
    if aligner.mapper is not aligner.strict:
        record["strict_predictions"] = list(strict.values())
    debug = {
        "title": doc.title,
        "index": index,
        "prompts": debug_prompts,
        "predictions": record["predictions"],
    }
    return record, debug


def _prompt_counts(prompt: Prompt, ids: list[int], gen: Generation, aligned: AlignResult) -> dict[str, int]:
    """What one prompt adds to its document's counts (summed into the run summary's `llm` section)."""
    answered = {(p["h_idx"], p["t_idx"]) for p in aligned.predictions}
    answered |= {(d["h_idx"], d["t_idx"]) for d in aligned.details if d["h_idx"] is not None}
    return {
        "prompts": 1,
        "pairs": len(prompt.pairs),
        # pairs left without any line in an answer the token budget cut: their relations may be lost
        "pairs_cut": sum(p not in answered for p in set(prompt.pairs)) if gen.hit_limit else 0,
        "prompt_tokens": len(ids),
        "prefill_tokens": gen.prefill_tokens if gen.prefill_tokens is not None else len(ids),
        "generated_tokens": gen.n_tokens,
        "hit_token_limit": int(gen.hit_limit),
        "stopped_on_repeat": int(gen.stopped_on_repeat),
        "empty_outputs": int(not gen.text.strip()),
        "triples": aligned.n_triples,
        "none_answers": aligned.n_none,
        "out_of_set_before_mapping": aligned.n_out_of_set_before_mapping,
        "out_of_set_after_mapping": aligned.n_out_of_set_after_mapping,
    }


def _prompt_debug(
    prompt: Prompt, ids: list[int], budget: int, gen: Generation, aligned: AlignResult
) -> dict[str, Any]:
    """One prompt's line of the debug record: its raw answer, parsed triples, alignment and drops."""
    return {
        "pairs": [list(p) for p in prompt.pairs],
        "prompt_tokens": len(ids),
        "max_new_tokens": budget,
        "raw_output": gen.text,
        "generated_tokens": gen.n_tokens,
        "hit_token_limit": gen.hit_limit,
        "stopped_on_repeat": gen.stopped_on_repeat,
        "parsed": [list(t) for t in parse_triples(gen.text)],
        "alignment": aligned.details,
        "drops": dict(aligned.drops),
    }
