"""Text -> DocRED documents: segment, find the entities, and write them as a `vertexSet`.

Every built document also carries its `text` and the character span of every token (`token_offsets`, per
sentence), extra fields DocRED readers ignore and lmrc keeps: the readable triples and the measurements map tokens
back to the text with them. A text in which no entity is found cannot be a DocRED document (a `vertexSet` needs
one entity); it is reported and left out, never dropped silently.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from lmrc.entities.annotate import TokenMention
from lmrc.entities.model import Annotator
from lmrc.entities.reader import Skipped, TextDoc
from lmrc.entities.segment import Segmented, segment

log = logging.getLogger(__name__)


def to_raw(title: str, seg: Segmented, entities: Sequence[Sequence[TokenMention]], source: str = "") -> dict:
    """A DocRED document (JSON value) of the segmented text and its entities."""
    vertex_set = []
    for ent in entities:
        mentions = []
        for m in ent:
            sent = seg.sents[m.sent]
            a, b = sent[m.start].start, sent[m.end - 1].end
            mentions.append(
                {"name": seg.text[a:b], "sent_id": m.sent, "pos": [m.start, m.end], "type": m.type}
            )
        if mentions:
            vertex_set.append(mentions)
    raw = {
        "title": title,
        "sents": seg.words(),
        "vertexSet": vertex_set,
        "text": seg.text,
        "token_offsets": [[[t.start, t.end] for t in s] for s in seg.sents],
    }
    if source:
        raw["source"] = source
    return raw


@dataclass
class BuildStats:
    documents: int = 0
    seconds: float = 0.0
    entities: int = 0
    mentions: int = 0
    skipped: list[Skipped] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {
            "documents": self.documents,
            "seconds": round(self.seconds, 3),
            "seconds_per_document": round(self.seconds / self.documents, 4) if self.documents else None,
            "entities": self.entities,
            "mentions": self.mentions,
            "skipped": [s.format() for s in self.skipped],
        }


def build_documents(texts: Sequence[TextDoc], annotator: Annotator) -> tuple[list[dict], BuildStats]:
    """The DocRED documents of `texts` in their order; texts without any entity are skipped with a warning."""
    stats = BuildStats()
    out: list[dict] = []
    start = time.perf_counter()
    for t in texts:
        seg = segment(t.text)
        entities = annotator.find(seg) if seg.sents else []
        if not entities:
            s = Skipped(t.source, "no entity found (a DocRED document needs at least one); left out")
            log.warning("%s", s.format())
            stats.skipped.append(s)
            continue
        raw = to_raw(t.title, seg, entities, t.source)
        stats.entities += len(raw["vertexSet"])
        stats.mentions += sum(len(e) for e in raw["vertexSet"])
        out.append(raw)
    stats.documents = len(out)
    stats.seconds = time.perf_counter() - start
    return out, stats
