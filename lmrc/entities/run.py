"""Text input for `lmrc predict --text` and `lmrc data from-text`: build the documents, run, write the triples.

The pipeline itself reads DocRED documents; text is turned into them first and cached next to the output
(`<output stem>.text-docs.json`, with `<output stem>.text-build.json` naming the input and entity model it came
from). Building is deterministic, so `--resume` and `--shard` runs reuse the cache (or rebuild the same file) and
the pipeline's own progress file and shard arithmetic apply unchanged. After the run, the result file and the
built documents give the readable `<output stem>.triples.jsonl`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lmrc.entities.build import BuildStats, build_documents
from lmrc.entities.model import META_FILE, load_annotator
from lmrc.entities.reader import read_texts
from lmrc.errors import LmrcError
from lmrc.io import atomic_write_json, atomic_write_text, file_sha256, read_json, sidecar
from lmrc.predict.config import PredictConfig
from lmrc.predict.run import Shard, batch_ranges, run_pipeline
from lmrc.stage1.checkpoint import META_FILE as STAGE1_META
from lmrc.stage1.checkpoint import resolve_checkpoint_dir

log = logging.getLogger(__name__)

BUILD_FORMAT = "lmrc-text-build"


def docs_path(output: Path) -> Path:
    return sidecar(output, ".text-docs.json")


def triples_path(output: Path) -> Path:
    return sidecar(output, ".triples.jsonl")


def input_fingerprint(path: Path) -> str:
    """sha256 over the input's files (a folder: every .txt name and content, in name order)."""
    digest = hashlib.sha256()
    files = (
        sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() == ".txt")
        if path.is_dir()
        else [path]
    )
    for f in files:
        digest.update(f.name.encode("utf-8") + b"\0" + file_sha256(f).encode("ascii"))
    return digest.hexdigest()


def entities_fingerprint(spec: str) -> str:
    if spec.startswith("spacy:"):
        return spec
    if spec.startswith("gold:"):
        return f"gold:{file_sha256(spec[len('gold:') :])}"
    meta = Path(spec) / META_FILE
    return f"{Path(spec).resolve()}:{file_sha256(meta) if meta.is_file() else 'missing'}"


def build_file(input_path: Path, entities: str, output: Path) -> tuple[list[dict], BuildStats]:
    """Read the text input, build its documents and write them (DocRED JSON) to `output`."""
    if output.resolve() == input_path.resolve() or (
        input_path.is_dir() and input_path.resolve() in output.resolve().parents and output.suffix == ".txt"
    ):
        raise LmrcError(f"{output}: the output would replace the input")
    texts, skipped = read_texts(input_path)
    annotator = load_annotator(entities)
    docs, stats = build_documents(texts, annotator)
    stats.skipped = list(skipped) + stats.skipped
    if not docs:
        raise LmrcError(f"{input_path}: no document with an entity was built (nothing to run)")
    atomic_write_json(output, docs)
    return docs, stats


def prepare(input_path: Path, entities: str, output: Path, resume: bool) -> tuple[Path, dict]:
    """The built documents of the run writing `output` (reused on --resume when input and model are the same)."""
    docs_file, meta_file = docs_path(output), sidecar(output, ".text-build.json")
    if not input_path.exists():
        raise LmrcError(f"{input_path}: file not found")
    if output.resolve() == input_path.resolve():
        raise LmrcError(f"{output}: the output would replace the input")
    fingerprint = {"input": input_fingerprint(input_path), "entities": entities_fingerprint(entities)}
    if resume and docs_file.is_file() and meta_file.is_file():
        meta = read_json(meta_file)
        if meta.get("fingerprint") == fingerprint:
            log.info("%s: reusing the documents built from %s", docs_file, input_path)
            return docs_file, meta
        log.info("%s: input or entity model changed; building again", docs_file)
    _, stats = build_file(input_path, entities, docs_file)
    meta = {"format": BUILD_FORMAT, "input": str(input_path), "entities": entities, "fingerprint": fingerprint,
            "build": stats.as_dict()}  # fmt: skip
    atomic_write_json(meta_file, meta, indent=1)
    return docs_file, meta


def relation_names(cfg: PredictConfig) -> dict[str, str]:
    """Relation id -> name from the models of the run (stage-1 checkpoint, else the adapter)."""
    try:
        if cfg.stage1.checkpoint:
            meta = read_json(resolve_checkpoint_dir(cfg.stage1.checkpoint) / STAGE1_META)
            return dict(meta["relations"]["names"])
        if cfg.stage2.adapter and (Path(cfg.stage2.adapter) / "rel_info.json").is_file():
            return dict(read_json(Path(cfg.stage2.adapter) / "rel_info.json"))
    except (LmrcError, KeyError, TypeError) as exc:
        log.warning("relation names not found (%s); the triples show relation ids only", exc)
    return {}


def _mention(raw: dict, m: dict) -> dict:
    offs = raw["token_offsets"][m["sent_id"]]
    a, b = m["pos"]
    return {"text": raw["text"][offs[a][0] : offs[b - 1][1]], "start": offs[a][0], "end": offs[b - 1][1],
            "sentence": m["sent_id"]}  # fmt: skip


def document_triples(raw: dict, predictions: Sequence[dict], names: dict[str, str]) -> dict:
    """One line of the triples file: the document's predicted triples in terms of its text."""
    text, offsets = raw["text"], raw["token_offsets"]

    def entity(i: int) -> dict:
        ms = [_mention(raw, m) for m in raw["vertexSet"][i]]
        return {"index": i, "name": ms[0]["text"], "type": raw["vertexSet"][i][0]["type"], "mentions": ms}

    out = []
    for p in sorted(predictions, key=lambda p: (p["h_idx"], p["t_idx"], p["r"])):
        h, t = entity(p["h_idx"]), entity(p["t_idx"])
        both = sorted({m["sentence"] for m in h["mentions"]} & {m["sentence"] for m in t["mentions"]})
        sents = [{"id": s, "start": offsets[s][0][0], "end": offsets[s][-1][1],
                  "text": text[offsets[s][0][0] : offsets[s][-1][1]]} for s in both]  # fmt: skip
        row = {
            "head": h,
            "tail": t,
            "relation": p["r"],
            "relation_name": names.get(p["r"], p["r"]),
            "sentences": sents,
        }
        if "score" in p:
            row["score"] = p["score"]
        out.append(row)
    return {
        "title": raw["title"],
        "source": raw.get("source", ""),
        "entities": len(raw["vertexSet"]),
        "triples": out,
    }


def write_triples(
    result: Path, docs_file: Path, titles: Sequence[str] | None, names: dict[str, str], out: Path
) -> int:
    """`out`: one JSON line per document (those named in `titles`, else all), in document order."""
    preds = read_json(result)
    by_title: dict[str, list[dict]] = {}
    for p in preds:
        by_title.setdefault(p["title"], []).append(p)
    docs = read_json(docs_file)
    keep = set(titles) if titles is not None else None
    lines = [
        json.dumps(document_triples(d, by_title.get(d["title"], []), names), ensure_ascii=False)
        for d in docs
        if keep is None or d["title"] in keep
    ]
    atomic_write_text(out, "".join(line + "\n" for line in lines))
    return sum(len(v) for v in by_title.values())


def shard_titles(docs_file: Path, docs_per_batch: int, shard: Shard | None) -> list[str] | None:
    """Titles of the shard's documents (the pipeline's shards are whole batches in document order)."""
    if shard is None:
        return None
    titles = [d["title"] for d in read_json(docs_file)]
    batches = batch_ranges(len(titles), docs_per_batch)
    return [titles[i] for b in shard.batches(len(batches)) for i in batches[b]]


def predict_text(cfg: PredictConfig, input_path: str | os.PathLike, output: str | os.PathLike, entities: str, *,
                 resume: bool = False, shard: Shard | None = None, save_candidates: Any = None, **kwargs: Any) -> dict:  # fmt: skip
    """Text in, relations out: build (or reuse) the documents, run the pipeline on them, write the triples."""
    input_path, output = Path(input_path), Path(output)
    docs_file, meta = prepare(input_path, entities, output, resume)
    summary = run_pipeline(
        cfg, docs_file, output, resume=resume, shard=shard, save_candidates=save_candidates, **kwargs
    )
    tp = triples_path(output)
    write_triples(
        output, docs_file, shard_titles(docs_file, cfg.docs_per_batch, shard), relation_names(cfg), tp
    )
    summary["text_input"] = {"input": str(input_path), "entities": entities, "documents_file": str(docs_file),
                             "triples": str(tp), "build": meta["build"]}  # fmt: skip
    atomic_write_json(sidecar(output, ".summary.json"), summary, indent=2)
    return summary
