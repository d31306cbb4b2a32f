"""Label Studio's JSON export: a list of tasks `{id, data: {text}, annotations: [{result: [...]}]}`.

The text is `data.text` (or the one string field of `data` when it has no `text`); the title is `data.title`, else
`task ID`. The first annotation that was not cancelled is read (a task with several is reported). Result items of
type `labels` are the mentions (`value.start`, `value.end`, `value.labels[0]`); Label Studio counts offsets in
UTF-16 code units (JavaScript strings), converted here to characters. Items of type `relation` (`from_id`, `to_id`,
`labels[0]`, `direction`: right = from -> to, left = to -> from, bi = both) are the relations; a relation without
a label is reported and skipped. Coreference: Label Studio has none, so mentions with identical text and label in
a task are one entity, and a relation labelled coref/coreference/equiv/same_as joins the entities of its ends.
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
    same_text_key,
)
from lmrc.errors import LmrcError
from lmrc.io import read_json


def read(path: Path, report: Report) -> list[AnnotatedText]:
    data = read_json(path)
    if isinstance(data, dict):
        data = [data]  # one task
    if not isinstance(data, list):
        raise LmrcError(
            f"{path}: expected a Label Studio JSON export (a list of tasks), got {type(data).__name__}"
        )
    out = []
    for i, task in enumerate(data):
        doc = _task(path, i, task, report)
        if doc is not None:
            out.append(doc)
    return out


def task_text(data: object) -> str | None:
    """`data.text`, else the one string field of `data`."""
    if not isinstance(data, dict):
        return None
    if isinstance(data.get("text"), str):
        return data["text"]
    strings = [v for v in data.values() if isinstance(v, str)]
    return strings[0] if len(strings) == 1 else None


def _task(path: Path, i: int, task: object, report: Report) -> AnnotatedText | None:
    tid = task.get("id", i) if isinstance(task, dict) else i
    where = f"{path}: task {tid}"
    if not isinstance(task, dict):
        report.skip(
            "documents", "not a task", where, f"expected a task object, got {type(task).__name__}; left out"
        )
        return None
    data = task.get("data")
    text = task_text(data)
    if text is None:
        msg = "data has no 'text' (and not exactly one string field); task left out"
        report.skip("documents", "no text", where, msg)
        return None
    annotations = [
        a for a in task.get("annotations") or [] if isinstance(a, dict) and not a.get("was_cancelled")
    ]
    if not annotations:
        report.skip(
            "documents", "no annotation", where, "no annotation (or only cancelled ones); task left out"
        )
        return None
    if len(annotations) > 1:
        report.warn("several annotations", where, f"{len(annotations)} annotations; the first is read")
    title = data.get("title") if isinstance(data.get("title"), str) and data["title"] else f"task {tid}"
    doc = AnnotatedText(title=title, text=text, source=where)
    items = annotations[0].get("result") or []
    items = items if isinstance(items, list) else []
    to_chars = _utf16_to_chars(text)
    entity_of: dict[str, str] = {}
    for k, item in enumerate(items):
        kind = item.get("type") if isinstance(item, dict) else None
        if kind == "labels":
            _mention(doc, k, item, to_chars, entity_of, report)
        elif kind != "relation":
            report.ignored[f"result items of type {kind!r}"] += 1
    for k, item in enumerate(items):
        if isinstance(item, dict) and item.get("type") == "relation":
            _relation(doc, k, item, entity_of, report)
    return doc


def _utf16_to_chars(text: str) -> dict[int, int] | None:
    """UTF-16 offset -> character offset, when the text has characters outside the BMP (else offsets agree)."""
    if all(ord(c) <= 0xFFFF for c in text):
        return None
    out, n = {}, 0
    for i, c in enumerate(text):
        out[n] = i
        n += 2 if ord(c) > 0xFFFF else 1
    out[n] = len(text)
    return out


def _mention(
    doc: AnnotatedText, k: int, item: dict, to_chars: dict[int, int] | None, entity_of: dict[str, str], report
) -> None:
    rid = str(item.get("id", k))
    place = f"result {rid}"
    value = item.get("value") if isinstance(item.get("value"), dict) else {}
    start, end = as_offset(value.get("start")), as_offset(value.get("end"))
    labels = value.get("labels") if isinstance(value.get("labels"), list) else []
    if start is None or end is None or not labels or not isinstance(labels[0], str):
        msg = "a labels item needs integer value.start, value.end and a value.labels label; skipped"
        report.skip("mentions", "malformed item", f"{doc.source}: {place}", msg)
        return
    if len(labels) > 1:
        report.warn(
            "several labels", f"{doc.source}: {place}", f"{len(labels)} labels {labels}; the first is used"
        )
    if to_chars is not None:
        start, end = to_chars.get(start, -1), to_chars.get(end, -1)
    typ = labels[0]
    key = same_text_key(doc.text, start, end, typ)
    entity_of[rid] = key
    text = value.get("text") if isinstance(value.get("text"), str) else None
    doc.mentions.append(Span(start, end, typ, key, place, text))


def _relation(doc: AnnotatedText, k: int, item: dict, entity_of: dict[str, str], report: Report) -> None:
    place = f"result {k} (relation {item.get('from_id')} -> {item.get('to_id')})"
    where = f"{doc.source}: {place}"
    labels = item.get("labels") or []
    ends = [str(item.get("from_id")), str(item.get("to_id"))]
    missing = [e for e in ends if e not in entity_of]
    if missing:
        msg = f"relation names missing entity {missing[0]} (no labels item with that id); skipped"
        report.skip("relations", "names a missing entity", where, msg)
        return
    if not isinstance(labels, list) or not labels or not isinstance(labels[0], str) or not labels[0]:
        report.skip("relations", "unlabelled relation", where, "relation without a label; skipped")
        return
    head, tail = entity_of[ends[0]], entity_of[ends[1]]
    if labels[0].casefold() in COREF_LABELS:
        doc.same.append((head, tail))
        report.notes["coreference links"] += 1
        return
    direction = item.get("direction", "right")
    if direction in ("right", "bi"):
        doc.relations.append(Link(head, tail, labels[0], place))
    if direction in ("left", "bi"):
        doc.relations.append(Link(tail, head, labels[0], place))
