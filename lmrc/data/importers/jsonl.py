"""lmrc's plain JSON lines: `{"title"?, "text", "entities": [{"type", "mentions": [{"start", "end", "type"?}]}],
"relations": [{"head": i, "tail": j, "type"}]}`, `head` and `tail` indexing `entities`.

Each item of `entities` is one entity (its mentions are coreferent); a mention may carry its own `type`. The title
is `title`, else `FILE:LINE`.
"""

from __future__ import annotations

from pathlib import Path

from lmrc.data.importers.common import (
    AnnotatedText,
    Link,
    Report,
    Span,
    as_offset,
    json_line_records,
)


def read(path: Path, report: Report) -> list[AnnotatedText]:
    out = []
    for no, obj in json_line_records(path, report):
        title = obj.get("title")
        title = title if isinstance(title, str) and title else f"{path.stem}:{no}"
        doc = AnnotatedText(title=title, text=obj["text"], source=f"{path}: line {no}")
        entities = obj.get("entities", [])
        relations = obj.get("relations", [])
        for key, value in (("entities", entities), ("relations", relations)):
            if not isinstance(value, list):
                kind = "mentions" if key == "entities" else "relations"
                msg = f'"{key}" must be a list, got {type(value).__name__}; ignored'
                report.skip(kind, f"malformed {key}", doc.source, msg)
        for i, ent in enumerate(entities if isinstance(entities, list) else []):
            _entity(doc, i, ent, report)
        n = len(entities) if isinstance(entities, list) else 0
        for k, rel in enumerate(relations if isinstance(relations, list) else []):
            _relation(doc, k, rel, n, report)
        out.append(doc)
    return out


def _entity(doc: AnnotatedText, i: int, ent: object, report: Report) -> None:
    ent = ent if isinstance(ent, dict) else {}
    mentions = ent.get("mentions")
    typ = ent.get("type") if isinstance(ent.get("type"), str) else ""
    if not isinstance(mentions, list) or not mentions:
        msg = 'an entity needs a non-empty "mentions" list; skipped'
        report.skip("mentions", "malformed item", f"{doc.source}: entities[{i}]", msg)
        return
    for j, m in enumerate(mentions):
        place = f"entities[{i}].mentions[{j}]"
        m = m if isinstance(m, dict) else {}
        start, end = as_offset(m.get("start")), as_offset(m.get("end"))
        mtype = m.get("type") if isinstance(m.get("type"), str) and m.get("type") else typ
        if start is None or end is None or not mtype:
            msg = (
                'a mention needs integer "start" and "end", and a "type" (its own or its entity\'s); skipped'
            )
            report.skip("mentions", "malformed item", f"{doc.source}: {place}", msg)
            continue
        text = m.get("text") if isinstance(m.get("text"), str) else None
        doc.mentions.append(Span(start, end, mtype, f"entities[{i}]", place, text))


def _relation(doc: AnnotatedText, k: int, rel: object, n: int, report: Report) -> None:
    rel = rel if isinstance(rel, dict) else {}
    place = f"relations[{k}]"
    where = f"{doc.source}: {place}"
    head, tail, typ = as_offset(rel.get("head")), as_offset(rel.get("tail")), rel.get("type")
    bad = [x for x in (head, tail) if x is None or not 0 <= x < n]
    if bad:
        shown = rel.get("head") if head in bad else rel.get("tail")
        msg = f"relation names missing entity {shown!r} (the line has {n} entities); skipped"
        report.skip("relations", "names a missing entity", where, msg)
    elif not isinstance(typ, str) or not typ:
        report.skip("relations", "unlabelled relation", where, 'relation without a "type"; skipped')
    else:
        doc.relations.append(Link(f"entities[{head}]", f"entities[{tail}]", typ, place))
