"""Exporters for the `lmrc data import` round trips: a DocRED document as plain text with character-span
entities (`Gold`), written in each annotation format the importers read, and what each format can express."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from lmrc.data.docred import Document
from lmrc.entities.detok import detokenize

Mention = tuple[int, int, str]  # start, end, type
Cluster = frozenset  # of Mention


@dataclass(frozen=True)
class Gold:
    title: str
    text: str
    entities: tuple[tuple[Mention, ...], ...]  # each entity's distinct mentions, in order
    relations: tuple[tuple[int, int, str], ...]  # distinct (h, t, r)
    first_sentence_end: int  # character offset where the first sentence ends (PubTator's title)


def gold_of(doc: Document) -> Gold:
    det = detokenize(doc)
    entities = tuple(
        tuple(dict.fromkeys((*det.char_span(m.sent_id, m.pos), m.type) for m in e.mentions))
        for e in doc.entities
    )
    relations = tuple(dict.fromkeys((f.h, f.t, f.r) for f in doc.facts or ()))
    return Gold(doc.title, det.text, entities, relations, det.spans[0][-1][1])


# ------------------------------------------------------------------------------------------------ expectations


def clusters_and_triples(entities, relations) -> tuple[set, set]:
    clusters = [Cluster(e) for e in entities]
    triples = {(clusters[h], clusters[t], r) for h, t, r in relations if clusters[h] != clusters[t]}
    return set(clusters), triples


def expected(gold: Gold, same_text_joins: bool) -> tuple[set, set]:
    """The entity clusters (sets of (start, end, type)) and relation triples the import should give back.

    `same_text_joins`: the format has no coreference of its own (Label Studio, doccano), so mentions with identical
    text and type are one entity, joining the gold entities that share such a mention; links between mentions of
    one entity (coref relations) keep the other joins."""
    n = len(gold.entities)
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            i = parent[i]
        return i

    if same_text_joins:
        owner: dict[tuple[str, str], int] = {}
        for i, ent in enumerate(gold.entities):
            for s, e, typ in ent:
                key = (typ, " ".join(gold.text[s:e].split()))
                if key in owner and find(owner[key]) != find(i):
                    parent[find(i)] = find(owner[key])
                owner.setdefault(key, i)
    groups: dict[int, set] = {}
    for i, ent in enumerate(gold.entities):
        groups.setdefault(find(i), set()).update(ent)
    merged = {i: Cluster(groups[find(i)]) for i in range(n)}
    triples = {(merged[h], merged[t], r) for h, t, r in gold.relations if merged[h] != merged[t]}
    return set(merged.values()), triples


def imported(raw: dict) -> tuple[set, set]:
    """Clusters and triples of an imported document, in character spans (through its token_offsets)."""
    offsets = raw["token_offsets"]
    entities = [
        [
            (offsets[m["sent_id"]][m["pos"][0]][0], offsets[m["sent_id"]][m["pos"][1] - 1][1], m["type"])
            for m in e
        ]
        for e in raw["vertexSet"]
    ]
    return clusters_and_triples(entities, [(x["h"], x["t"], x["r"]) for x in raw["labels"]])


# --------------------------------------------------------------------------------------------------- exporters


def to_brat(docs: list[Gold], folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, g in enumerate(docs):
        lines, first, k = [], [], 0
        for ent in g.entities:
            ids = []
            for s, e, typ in ent:
                k += 1
                lines.append(f"T{k}\t{typ} {s} {e}\t{g.text[s:e]}")
                ids.append(f"T{k}")
            first.append(ids[0])
            if len(ids) > 1:
                lines.append("*\tCoref " + " ".join(ids))
        for j, (h, t, r) in enumerate(g.relations, start=1):
            lines.append(f"R{j}\t{r} Arg1:{first[h]} Arg2:{first[t]}")
        (folder / f"doc{i:02d}.txt").write_text(g.text, encoding="utf-8")
        (folder / f"doc{i:02d}.ann").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def to_labelstudio(docs: list[Gold], path: Path) -> Path:
    tasks = []
    for i, g in enumerate(docs):
        result, first = [], []
        for ei, ent in enumerate(g.entities):
            ids = [f"e{ei}m{mi}" for mi in range(len(ent))]
            for mid, (s, e, typ) in zip(ids, ent):
                value = {"start": s, "end": e, "text": g.text[s:e], "labels": [typ]}
                result.append(
                    {"id": mid, "type": "labels", "from_name": "label", "to_name": "text", "value": value}
                )
            result += [_ls_relation(a, b, "coref") for a, b in zip(ids, ids[1:])]
            first.append(ids[0])
        result += [_ls_relation(first[h], first[t], r) for h, t, r in g.relations]
        tasks.append(
            {"id": i + 1, "data": {"text": g.text, "title": g.title}, "annotations": [{"result": result}]}
        )
    path.write_text(json.dumps(tasks), encoding="utf-8")
    return path


def _ls_relation(a: str, b: str, label: str) -> dict:
    return {"from_id": a, "to_id": b, "type": "relation", "direction": "right", "labels": [label]}


def to_doccano(docs: list[Gold], path: Path) -> Path:
    lines = []
    for g in docs:
        entities, relations, first = [], [], []
        for ent in g.entities:
            ids = list(range(len(entities), len(entities) + len(ent)))
            entities += [
                {"id": k, "label": t, "start_offset": s, "end_offset": e} for k, (s, e, t) in zip(ids, ent)
            ]
            relations += [{"from_id": a, "to_id": b, "type": "same_as"} for a, b in zip(ids, ids[1:])]
            first.append(ids[0])
        relations += [{"from_id": first[h], "to_id": first[t], "type": r} for h, t, r in g.relations]
        for k, rel in enumerate(relations):
            rel["id"] = k
        lines.append(
            json.dumps({"title": g.title, "text": g.text, "entities": entities, "relations": relations})
        )
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def to_pubtator(docs: list[Gold], path: Path) -> Path:
    """Title: the first sentence; abstract: the rest (PubTator's text is title + " " + abstract)."""
    blocks = []
    for i, g in enumerate(docs):
        pmid = str(1000 + i)
        cut = g.first_sentence_end
        lines = [f"{pmid}|t|{g.text[:cut]}", f"{pmid}|a|{g.text[cut + 1 :]}"]
        assert g.text[cut : cut + 1] in (" ", "")
        for ei, ent in enumerate(g.entities):
            lines += [f"{pmid}\t{s}\t{e}\t{g.text[s:e]}\t{typ}\tE{ei}" for s, e, typ in ent]
        lines += [f"{pmid}\t{r}\tE{h}\tE{t}" for h, t, r in g.relations]
        blocks.append("\n".join(lines))
    path.write_text("\n\n".join(blocks) + "\n", encoding="utf-8")
    return path


def to_jsonl(docs: list[Gold], path: Path) -> Path:
    lines = []
    for g in docs:
        entities = [
            {"type": ent[0][2], "mentions": [{"start": s, "end": e, "type": t} for s, e, t in ent]}
            for ent in g.entities
        ]
        relations = [{"head": h, "tail": t, "type": r} for h, t, r in g.relations]
        lines.append(
            json.dumps({"title": g.title, "text": g.text, "entities": entities, "relations": relations})
        )
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


EXPORTERS = {
    "brat": (to_brat, "export"),
    "labelstudio": (to_labelstudio, "export.json"),
    "doccano": (to_doccano, "export.jsonl"),
    "pubtator": (to_pubtator, "export.txt"),
    "jsonl": (to_jsonl, "export.jsonl"),
}
SAME_TEXT_JOINS = {"labelstudio", "doccano"}  # no coreference of their own: identical text and type join
