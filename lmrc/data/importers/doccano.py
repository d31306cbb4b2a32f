"""doccano's relation-extraction export: JSON lines `{text, entities: [{id, label, start_offset, end_offset}],
relations: [{id, from_id, to_id, type}]}`.

The title is the line's `title`, else its `id`, else `FILE:LINE`. Offsets count characters. Coreference: doccano has
none, so (as for Label Studio) mentions with identical text and label on one line are one entity, and a relation
of type coref/coreference/equiv/same_as joins the entities of its ends.
"""

from __future__ import annotations

from pathlib import Path

from lmrc.data.importers.common import (
    COREF_LABELS,
    AnnotatedText,
    Link,
    Report,
    Span,
    as_offset,
    json_line_records,
    same_text_key,
)


def read(path: Path, report: Report) -> list[AnnotatedText]:
    out = []
    for no, obj in json_line_records(path, report):
        title = obj.get("title") or obj.get("id")
        title = str(title) if isinstance(title, (str, int)) and title != "" else f"{path.stem}:{no}"
        doc = AnnotatedText(title=title, text=obj["text"], source=f"{path}: line {no}")
        entity_of: dict[str, str] = {}
        for k, ent in enumerate(_list(obj, "entities", doc, report)):
            _mention(doc, k, ent, entity_of, report)
        for k, rel in enumerate(_list(obj, "relations", doc, report)):
            _relation(doc, k, rel, entity_of, report)
        out.append(doc)
    return out


def _list(obj: dict, key: str, doc: AnnotatedText, report: Report) -> list:
    value = obj.get(key, [])
    if isinstance(value, list):
        return value
    kind = "mentions" if key == "entities" else "relations"
    report.skip(
        kind, f"malformed {key}", doc.source, f'"{key}" must be a list, got {type(value).__name__}; ignored'
    )
    return []


def _mention(doc: AnnotatedText, k: int, ent: object, entity_of: dict[str, str], report: Report) -> None:
    ent = ent if isinstance(ent, dict) else {}
    eid = str(ent.get("id", f"#{k}"))
    place = f"entity {eid}"
    start, end = as_offset(ent.get("start_offset")), as_offset(ent.get("end_offset"))
    label = ent.get("label")
    if start is None or end is None or not isinstance(label, str) or not label:
        msg = "an entity needs integer start_offset, end_offset and a label; skipped"
        report.skip("mentions", "malformed item", f"{doc.source}: {place}", msg)
        return
    key = same_text_key(doc.text, start, end, label)
    entity_of[eid] = key
    doc.mentions.append(Span(start, end, label, key, place))


def _relation(doc: AnnotatedText, k: int, rel: object, entity_of: dict[str, str], report: Report) -> None:
    rel = rel if isinstance(rel, dict) else {}
    place = f"relation {rel.get('id', f'#{k}')}"
    where = f"{doc.source}: {place}"
    ends = [str(rel.get("from_id")), str(rel.get("to_id"))]
    missing = [e for e in ends if e not in entity_of]
    typ = rel.get("type")
    if missing:
        report.skip(
            "relations",
            "names a missing entity",
            where,
            f"relation names missing entity {missing[0]}; skipped",
        )
    elif not isinstance(typ, str) or not typ:
        report.skip("relations", "unlabelled relation", where, "relation without a type; skipped")
    elif typ.casefold() in COREF_LABELS:
        doc.same.append((entity_of[ends[0]], entity_of[ends[1]]))
        report.notes["coreference links"] += 1
    else:
        doc.relations.append(Link(entity_of[ends[0]], entity_of[ends[1]], typ, place))
