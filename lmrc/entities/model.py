"""The entity model: a mention tagger and a mention-pair coreference scorer in one checkpoint folder.

Layout of a checkpoint folder:
  entities.json          format, version, labels, window size, coreference threshold and features, provenance
  tagger/                the token-classification model and its tokenizer (Hugging Face folder, safetensors)
  coref.safetensors      the pair scorer's weights
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForTokenClassification, AutoTokenizer

from lmrc.data.docred import load_documents
from lmrc.entities.annotate import TokenMention, align_span, gold_of
from lmrc.entities.coref import FEATURES, MentionInfo, PairScorer, cluster
from lmrc.entities.mentions import decode_bio, tag_document
from lmrc.entities.metrics import majority_type
from lmrc.entities.segment import Segmented, require_spacy
from lmrc.errors import LmrcError
from lmrc.io import atomic_write_json, read_json

log = logging.getLogger(__name__)

FORMAT = "lmrc-entities-checkpoint"
VERSION = 1
META_FILE = "entities.json"
TAGGER_DIR = "tagger"
COREF_FILE = "coref.safetensors"


class Annotator(Protocol):
    """Finds the entities of a segmented text: clusters of mentions, in order of their first mention."""

    name: str

    def find(self, seg: Segmented) -> list[list[TokenMention]]: ...


def mention_infos(seg: Segmented, mentions: list[TokenMention], word_vectors) -> list[MentionInfo]:
    """Text, type, place and unit-length mean word vector of each mention (the coreference model's input)."""
    offsets, n = [], 0
    for s in seg.sents:
        offsets.append(n)
        n += len(s)
    out = []
    for m in mentions:
        sent = seg.sents[m.sent]
        v = torch.stack([word_vectors[m.sent][t] for t in range(m.start, m.end)]).mean(0)
        v = v / v.norm().clamp(min=1e-8)
        out.append(
            MentionInfo(
                seg.text[sent[m.start].start : sent[m.end - 1].end],
                m.type,
                m.sent,
                offsets[m.sent] + m.start,
                v,
            )
        )
    return out


def typed_clusters(mentions: list[TokenMention], groups: list[list[int]]) -> list[list[TokenMention]]:
    """Clusters of mentions, every mention given its cluster's majority type (DocRED types whole entities)."""
    out = []
    for g in groups:
        t = majority_type([mentions[i].type for i in g])
        out.append([TokenMention(mentions[i].sent, mentions[i].start, mentions[i].end, t) for i in g])
    return out


@dataclass
class EntityModel:
    tagger: Any  # AutoModelForTokenClassification, eval mode
    tokenizer: Any
    labels: list[str]
    max_tokens: int
    scorer: PairScorer
    threshold: float
    path: Path | None = None
    meta: dict | None = None

    @property
    def name(self) -> str:
        return str(self.path) if self.path else "entity model"

    def find(self, seg: Segmented) -> list[list[TokenMention]]:
        words = seg.words()
        if not words:
            return []
        logp, vecs = tag_document(self.tagger, self.tokenizer, words, self.max_tokens)
        mentions: list[TokenMention] = []
        for si, row in enumerate(logp):
            labels = [self.labels[int(x.argmax())] for x in row]
            mentions.extend(decode_bio(labels, si))
        infos = mention_infos(seg, mentions, vecs)
        groups = cluster(self.scorer, infos, self.threshold) if infos else []
        return typed_clusters(mentions, groups)

    def save(self, folder: Path, extra: dict | None = None) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.tagger.save_pretrained(folder / TAGGER_DIR, safe_serialization=True)
        self.tokenizer.save_pretrained(folder / TAGGER_DIR)
        save_file({k: v.contiguous() for k, v in self.scorer.state_dict().items()}, str(folder / COREF_FILE))
        meta = {
            "format": FORMAT,
            "version": VERSION,
            "labels": self.labels,
            "max_tokens": self.max_tokens,
            "coref": {
                "features": list(FEATURES),
                "hidden": self.scorer.net[0].out_features,
                "threshold": self.threshold,
            },
            **(extra or {}),
        }
        atomic_write_json(folder / META_FILE, meta, indent=1)

    @classmethod
    def load(cls, path: str | os.PathLike) -> EntityModel:
        path = Path(path)
        if not (path / META_FILE).is_file():
            raise LmrcError(
                f"{path}: not an entity checkpoint (no {META_FILE}; train one with `lmrc entities train`)"
            )
        meta = read_json(path / META_FILE)
        if meta.get("format") != FORMAT or meta.get("version") != VERSION:
            raise LmrcError(f"{path / META_FILE}: not a version-{VERSION} {FORMAT} file")
        if list(meta["coref"]["features"]) != list(FEATURES):
            raise LmrcError(
                f"{path / META_FILE}: coref.features: written by another lmrc version (features differ); retrain"
            )
        tagger = AutoModelForTokenClassification.from_pretrained(path / TAGGER_DIR, trust_remote_code=False)
        tagger.eval()
        tokenizer = AutoTokenizer.from_pretrained(path / TAGGER_DIR, trust_remote_code=False)
        scorer = PairScorer(len(FEATURES), int(meta["coref"]["hidden"]))
        scorer.load_state_dict(load_file(str(path / COREF_FILE)))
        scorer.eval()
        return cls(tagger, tokenizer, list(meta["labels"]), int(meta["max_tokens"]), scorer,
                   float(meta["coref"]["threshold"]), path, meta)  # fmt: skip


# OntoNotes (spaCy's English pipelines) -> DocRED types. Lost: NORP (nationalities, religious and political groups)
# is no DocRED organisation but is the nearest; LAW, LANGUAGE, EVENT, PRODUCT and WORK_OF_ART become MISC; DocRED's
# NUM covers what OntoNotes splits into five types.
ONTONOTES_TO_DOCRED = {
    "PERSON": "PER", "ORG": "ORG", "NORP": "ORG", "GPE": "LOC", "LOC": "LOC", "FAC": "LOC", "DATE": "TIME",
    "TIME": "TIME", "CARDINAL": "NUM", "QUANTITY": "NUM", "MONEY": "NUM", "PERCENT": "NUM", "ORDINAL": "NUM",
}  # fmt: skip


@dataclass
class SpacyAnnotator:
    """Mentions from an installed spaCy pipeline's named entities (types mapped to DocRED's), grouped by exact
    (case-insensitive) string match: spaCy pipelines do not annotate coreference."""

    nlp: Any
    name: str

    @classmethod
    def load(cls, spec: str) -> SpacyAnnotator:
        spacy = require_spacy()
        try:
            nlp = spacy.load(spec)
        except OSError as exc:
            raise LmrcError(f"spacy:{spec}: cannot load this spaCy pipeline: {exc}") from None
        if "ner" not in nlp.pipe_names and "entity_ruler" not in nlp.pipe_names:
            raise LmrcError(f"spacy:{spec}: the pipeline has no 'ner' (or 'entity_ruler') component")
        return cls(nlp, f"spacy:{spec}")

    def find(self, seg: Segmented) -> list[list[TokenMention]]:
        self.nlp.max_length = max(self.nlp.max_length, len(seg.text) + 1)
        doc = self.nlp(seg.text)
        by_name: dict[str, list[TokenMention]] = {}
        for ent in doc.ents:
            al = align_span(seg, (ent.start_char, ent.end_char))
            if al is None:
                continue
            m = TokenMention(al[0], al[1], al[2], ONTONOTES_TO_DOCRED.get(ent.label_, "MISC"))
            by_name.setdefault(ent.text.lower(), []).append(m)
        groups = sorted(by_name.values(), key=lambda ms: (ms[0].sent, ms[0].start))
        out = []
        for ms in groups:
            t = majority_type([m.type for m in ms])
            out.append([TokenMention(m.sent, m.start, m.end, t) for m in ms])
        return out


@dataclass
class GoldAnnotator:
    """The oracle: the entities a DocRED file gives the same text (its documents turned into text by `detok`).

    For the round trip and for upper bounds: a text the file does not hold gets no entities. Mentions are mapped
    to the tokens that overlap them (exactly when they start and end on token boundaries)."""

    by_text: dict[str, list[list[tuple[tuple[int, int], str]]]]
    name: str = "gold"

    @classmethod
    def from_documents(cls, docs, name: str = "gold") -> GoldAnnotator:
        out = {}
        for d in docs:
            g = gold_of(d)
            out[g.text] = [[(m.span, m.type) for m in e] for e in g.entities]
        return cls(out, name)

    def find(self, seg: Segmented) -> list[list[TokenMention]]:
        out = []
        for ent in self.by_text.get(seg.text, []):
            ms = []
            for span, typ in ent:
                al = align_span(seg, span)
                if al is not None and TokenMention(al[0], al[1], al[2], typ) not in ms:
                    ms.append(TokenMention(al[0], al[1], al[2], typ))
            if ms:
                out.append(ms)
        return out


def load_annotator(spec: str) -> Annotator:
    """`--entities`: an entity checkpoint folder, `spacy:<pipeline name or folder>`, or `gold:<DocRED file>` (the
    oracle: that file's entities for its own texts, for upper bounds and checks)."""
    if spec.startswith("spacy:"):
        return SpacyAnnotator.load(spec[len("spacy:") :])
    if spec.startswith("gold:"):
        return GoldAnnotator.from_documents(load_documents(spec[len("gold:") :]), spec)
    return EntityModel.load(spec)
