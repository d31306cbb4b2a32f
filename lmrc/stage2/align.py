"""Map parsed `(head, relation, tail)` strings onto document entities and relation ids (LMRC's scoring side).

Entities: thefuzz fuzzy matching (LMRC, footnote 1) of each generated name against every mention name of an
entity and its display name, first among the entities of the pairs the prompt asked about; a triple whose aligned
pair was not asked about, a self-loop, or a name below the score cutoff is dropped and counted.

Relations: strict by default, as the paper's main results ("relations generated not in the predefined relation
set are considered incorrect"); optionally (Appendix B) an out-of-set name is mapped to the relation name with
the highest SBERT cosine similarity when that similarity is at least theta (0.55 peaked in the paper's Figure 3).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file, save
from thefuzz import fuzz, process, utils

from lmrc.data.docred import Document
from lmrc.data.relations import RelationSet
from lmrc.errors import LmrcError
from lmrc.io import atomic_write_bytes
from lmrc.models.store import resolve
from lmrc.stage2.parse import parse_with_stats
from lmrc.stage2.prompts import Prompt

log = logging.getLogger(__name__)

SCORERS: dict[str, Callable[..., int]] = {
    "ratio": fuzz.ratio,
    "partial_ratio": fuzz.partial_ratio,
    "token_sort_ratio": fuzz.token_sort_ratio,
    "token_set_ratio": fuzz.token_set_ratio,
    "partial_token_sort_ratio": fuzz.partial_token_sort_ratio,
    "partial_token_set_ratio": fuzz.partial_token_set_ratio,
    "QRatio": fuzz.QRatio,
    "WRatio": fuzz.WRatio,
}
RELATION_MODES = ("strict", "sbert")
# empty_field: a triple with an empty or "-" field, e.g. the input placeholder echoed as the relation (LMRC App. B).
DROP_REASONS = (
    "unparsed",
    "empty_field",
    "below_cutoff",
    "self_loop",
    "pair_not_asked",
    "out_of_set_relation",
    "duplicate",
)


def get_scorer(name: str) -> Callable[..., int]:
    try:
        return SCORERS[name]
    except KeyError:
        raise LmrcError(f"unknown fuzzy scorer {name!r} (expected one of {', '.join(SCORERS)})") from None


def entity_choices(doc: Document, names: Sequence[str]) -> list[list[str]]:
    """Per entity, the strings a generated name is matched against: display name, then distinct mention names."""
    out = []
    for e in doc.entities:
        strings = [names[e.index]]
        for m in e.mentions:
            if m.name not in strings:
                strings.append(m.name)
        out.append(strings)
    return out


def _scores(
    name: str, entities: Sequence[int], choices: Sequence[Sequence[str]], scorer: str, cutoff: float
) -> dict[int, float]:
    """Each entity's best score (over its strings) for `name`, for entities scoring at least `cutoff`."""
    if not utils.full_process(name) or not entities:
        return {}  # nothing left to compare after thefuzz's normalisation (punctuation-only name)
    # A display name copied verbatim is decisive: thefuzz's normalisation would tie "Tears for Fears" and
    # "Tears For Fears", which a document may hold as two entities.
    exact = {e: 100.0 for e in entities if choices[e][0] == name}
    if exact:
        return exact
    flat = {(e, k): s for e in entities for k, s in enumerate(choices[e])}
    best: dict[int, float] = {}
    for _, score, (e, _k) in process.extractBests(
        name, flat, scorer=get_scorer(scorer), score_cutoff=cutoff, limit=None
    ):
        if score > best.get(e, -1):
            best[e] = score
    return best


def align_entity(
    name: str,
    candidates: Sequence[int],
    doc: Document,
    names: Sequence[str],
    scorer: str = "token_sort_ratio",
    cutoff: float = 80,
    choices: Sequence[Sequence[str]] | None = None,
) -> tuple[int | None, float]:
    """The entity `name` refers to: best among `candidates`, else best among all entities (None below cutoff).

    A verbatim display name wins; otherwise thefuzz `process.extractOne` over every entity's display name and
    mention names, ties going to the lower entity index.
    """
    score_fn = get_scorer(scorer)
    choices = choices if choices is not None else entity_choices(doc, names)
    if not utils.full_process(name):
        return None, 0.0
    for pool in (list(candidates), list(range(len(doc.entities)))):
        exact = [e for e in sorted(set(pool)) if choices[e][0] == name]  # see _scores
        if exact:
            return exact[0], 100.0
        flat = {(e, k): s for e in sorted(set(pool)) for k, s in enumerate(choices[e])}
        if not flat:
            continue
        hit = process.extractOne(name, flat, scorer=score_fn, score_cutoff=cutoff)
        if hit is not None:
            return hit[2][0], float(hit[1])
    return None, 0.0


def _normalise_relation(name: str) -> str:
    return " ".join(name.split()).casefold()


class RelationMapper:
    """Relation name -> relation id: exact (case-insensitive) name match, then optionally SBERT (Appendix B).

    `mode` "strict" (default when no `sbert_path` is given) accepts exact names only; "sbert" maps an out-of-set
    name to the most similar relation name when cosine similarity >= `theta`. The SBERT model (`sbert_path`:
    "minilm" by default, resolved by `lmrc.models.store.resolve`) loads on the first out-of-set name; the relation-set
    embeddings are computed once per mapper, and reused across runs when `cache_dir` is given.
    """

    def __init__(
        self,
        relations: RelationSet,
        sbert_path: str | os.PathLike | None = None,
        theta: float = 0.55,  # LMRC Figure 3: F1 of the directly fine-tuned model peaks near 0.55
        mode: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        device: str = "cpu",
    ) -> None:
        mode = mode or ("sbert" if sbert_path is not None else "strict")
        if mode not in RELATION_MODES:
            raise LmrcError(
                f"unknown relation mapping mode {mode!r} (expected one of {', '.join(RELATION_MODES)})"
            )
        self.relations = relations
        self.mode = mode
        self.theta = float(theta)
        self.sbert_path = str(sbert_path) if sbert_path is not None else "minilm"
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.device = device
        self._ids = list(relations.ids)
        self._by_name = {_normalise_relation(relations.name(rid)): rid for rid in self._ids}
        self._model: Any = None
        self._model_dir: Path | None = None
        self._relation_embeddings: np.ndarray | None = None
        self._memo: dict[str, tuple[str | None, float]] = {}

    def exact(self, name: str) -> str | None:
        return self._by_name.get(_normalise_relation(name))

    def map(self, name: str) -> tuple[str | None, float]:
        """(relation id or None, similarity); an exact name match has similarity 1.0."""
        rid = self.exact(name)
        if rid is not None:
            return rid, 1.0
        if self.mode == "strict":
            return None, 0.0
        key = _normalise_relation(name)
        if key not in self._memo:
            self._memo[key] = self._nearest([name])[0]
        rid, score = self._memo[key]
        # theta is applied here, not when memoising: a theta sweep (lmrc compare) reuses the embeddings
        return (rid, score) if score >= self.theta else (None, score)

    def map_many(self, names: Sequence[str]) -> list[tuple[str | None, float]]:
        """`map` for many names, encoding all unseen out-of-set names in one batch."""
        if self.mode == "sbert":
            todo = sorted({_normalise_relation(n) for n in names if self.exact(n) is None} - set(self._memo))
            if todo:
                self._memo.update(zip(todo, self._nearest(todo)))
        return [self.map(n) for n in names]

    def _nearest(self, names: Sequence[str]) -> list[tuple[str, float]]:
        """The most similar relation of each name and its cosine similarity (theta not applied)."""
        rel = self.relation_embeddings()
        query = self._encode(list(names))
        sims = query @ rel.T  # rows are unit-normalised, so this is cosine similarity
        return [(self._ids[int(np.argmax(row))], float(row.max())) for row in sims]

    def _load(self) -> None:
        if self._model is not None:
            return
        from sentence_transformers import SentenceTransformer  # an optional dependency, heavy

        self._model_dir = resolve(self.sbert_path)
        try:
            self._model = SentenceTransformer(
                str(self._model_dir), device=self.device, trust_remote_code=False
            )
        except (OSError, ValueError) as exc:
            raise LmrcError(f"{self._model_dir}: cannot load the SBERT model: {exc}") from None

    def _encode(self, texts: list[str]) -> np.ndarray:
        self._load()
        emb = self._model.encode(
            texts, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False, batch_size=64
        )
        return np.asarray(emb, dtype=np.float32)

    def relation_embeddings(self) -> np.ndarray:
        """Unit-normalised embeddings of the relation names, in `relations.ids` order (computed once)."""
        if self._relation_embeddings is not None:
            return self._relation_embeddings
        names = [self.relations.name(rid) for rid in self._ids]
        path = self._cache_path(names)
        if path is not None and path.is_file():
            try:
                emb = load_file(str(path))["embeddings"]
                if emb.shape[0] == len(names):
                    self._relation_embeddings = emb
                    return emb
            except Exception as exc:  # a torn or foreign file: recompute and overwrite
                log.warning("%s: ignoring unreadable embedding cache (%s)", path, exc)
        emb = self._encode(names)
        if path is not None:
            _atomic_save_embeddings(path, emb)
        self._relation_embeddings = emb
        return emb

    def _cache_path(self, names: list[str]) -> Path | None:
        if self.cache_dir is None:
            return None
        self._load()
        assert self._model_dir is not None
        stamp = [
            (p.name, p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(self._model_dir.glob("*"))
            if p.is_file()
        ]
        key = json.dumps({"model": str(self._model_dir), "files": stamp, "names": names}, sort_keys=True)
        digest = hashlib.sha256(key.encode()).hexdigest()[:20]
        return self.cache_dir / "relation-embeddings" / f"{digest}.safetensors"


def _atomic_save_embeddings(path: Path, emb: np.ndarray) -> None:
    atomic_write_bytes(path, save({"embeddings": np.ascontiguousarray(emb)}))


@dataclass
class AlignResult:
    predictions: list[dict]  # official result format: {title, h_idx, t_idx, r}
    drops: Counter = field(default_factory=Counter)  # reason -> count (see DROP_REASONS)
    n_out_of_set_before_mapping: int = 0  # parsed relations not in the relation set by exact name
    n_out_of_set_after_mapping: int = 0  # ... still unmapped after SBERT (equal to before in strict mode)
    n_triples: int = 0  # parsed triples (None answers and empty fields excluded)
    n_none: int = 0  # pairs answered None
    n_lines: int = 0
    details: list[dict] = field(default_factory=list)  # one record per parsed triple, for --debug-out


def align_output(
    text: str,
    prompt: Prompt,
    doc: Document,
    names: Sequence[str],
    relations: RelationSet,
    mapper: RelationMapper,
    cutoff: float = 80,
    scorer: str = "token_sort_ratio",
    choices: Sequence[Sequence[str]] | None = None,
) -> AlignResult:
    """Parse one generated answer and align it to `doc`; only pairs asked about in `prompt` are kept.

    A triple's entities are aligned among the asked pairs' entities first; when the best-scoring head and tail
    (ties included) form an asked pair, that pair is taken. Drop reasons, first that applies: below_cutoff
    (a name matches no entity), self_loop, pair_not_asked, out_of_set_relation; a triple that repeats an earlier
    prediction counts as duplicate.
    """
    get_scorer(scorer)
    parsed = parse_with_stats(text)
    choices = choices if choices is not None else entity_choices(doc, names)
    asked = list(dict.fromkeys(prompt.pairs))
    asked_set = set(asked)
    asked_entities = sorted({e for pair in asked for e in pair})
    everyone = list(range(len(doc.entities)))
    result = AlignResult(
        predictions=[], n_triples=len(parsed.triples), n_none=parsed.n_none, n_lines=parsed.n_lines
    )
    if parsed.n_unparsed:
        result.drops["unparsed"] += parsed.n_unparsed
    if parsed.n_empty:
        result.drops["empty_field"] += parsed.n_empty
    mapped = mapper.map_many([r for _, r, _ in parsed.triples])
    seen: set[tuple[int, int, str]] = set()
    for (head, rel, tail), (rid, rel_score) in zip(parsed.triples, mapped):
        in_set = mapper.exact(rel) is not None
        result.n_out_of_set_before_mapping += not in_set
        result.n_out_of_set_after_mapping += rid is None
        h, t, hs, ts = _align_pair(head, tail, asked, asked_entities, everyone, choices, scorer, cutoff)
        reason = _drop_reason(h, t, rid, asked_set, seen)
        if reason == "kept":
            seen.add((h, t, rid))
            result.predictions.append({"title": prompt.title, "h_idx": h, "t_idx": t, "r": rid})
        else:
            result.drops[reason] += 1
        result.details.append(
            {
                "head": head,
                "relation": rel,
                "tail": tail,
                "h_idx": h,
                "t_idx": t,
                "h_score": hs,
                "t_score": ts,
                "r": rid,
                "r_score": round(rel_score, 4),
                "status": reason,
            }
        )
    return result


def _drop_reason(
    h: int | None,
    t: int | None,
    rid: str | None,
    asked: set[tuple[int, int]],
    seen: set[tuple[int, int, str]],
) -> str:
    """Why an aligned triple is dropped, the first reason that applies, or "kept"."""
    if h is None or t is None:
        return "below_cutoff"
    if h == t:
        return "self_loop"
    if (h, t) not in asked:
        return "pair_not_asked"
    if rid is None:
        return "out_of_set_relation"
    if (h, t, rid) in seen:
        return "duplicate"
    return "kept"


def _align_pair(
    head: str,
    tail: str,
    asked: list[tuple[int, int]],
    asked_entities: list[int],
    everyone: list[int],
    choices: Sequence[Sequence[str]],
    scorer: str,
    cutoff: float,
) -> tuple[int | None, int | None, float, float]:
    h_scores = _scores(head, asked_entities, choices, scorer, cutoff)
    t_scores = _scores(tail, asked_entities, choices, scorer, cutoff)
    if h_scores and t_scores:
        best_h = _argmax_set(h_scores)
        best_t = _argmax_set(t_scores)
        # Entities sharing a mention name tie; the asked pair among the tied ones is the one meant.
        for h, t in asked:
            if h in best_h and t in best_t:
                return h, t, h_scores[h], t_scores[t]
        h = min(best_h)
        t = min((e for e in best_t if e != h), default=h)
        return h, t, h_scores[h], t_scores[t]
    # Not both among the asked entities: look at the whole document to tell a hallucinated pair from noise.
    if not h_scores:
        h_scores = _scores(head, everyone, choices, scorer, cutoff)
    if not t_scores:
        t_scores = _scores(tail, everyone, choices, scorer, cutoff)
    h = min(_argmax_set(h_scores)) if h_scores else None
    t = min(_argmax_set(t_scores)) if t_scores else None
    return (
        h,
        t,
        h_scores.get(h, 0.0) if h is not None else 0.0,
        t_scores.get(t, 0.0) if t is not None else 0.0,
    )


def _argmax_set(scores: dict[int, float]) -> set[int]:
    top = max(scores.values())
    return {e for e, s in scores.items() if s == top}
