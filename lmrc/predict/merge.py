"""`lmrc merge`: join the outputs of `lmrc predict --shard i/n` into the file one unsharded run writes.

Each shard's summary holds the run's fingerprint (input and its hash, models and their weight hashes, settings)
and its shard i/n. Shards merge only when their fingerprints agree apart from i, every i of 0..n-1 is given once,
and each shard finished; the result is the shards' predictions in shard order, which is document order.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lmrc.errors import LmrcError
from lmrc.io import JsonStreamWriter, atomic_write_json, read_json, sidecar
from lmrc.predict.outputs import SUMMARY_FORMAT


def _shard_summary(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise LmrcError(f"{path}: shard result not found")
    summary_path = sidecar(path, ".summary.json")
    if not summary_path.is_file():
        raise LmrcError(
            f"{summary_path}: not found (is {path} the output of a finished `lmrc predict --shard`?)"
        )
    summary = read_json(summary_path)
    if (
        not isinstance(summary, dict)
        or summary.get("format") != SUMMARY_FORMAT
        or "fingerprint" not in summary
    ):
        raise LmrcError(f"{summary_path}: not an lmrc predict summary")
    return summary


def _without_shard(fingerprint: dict) -> dict:
    return {k: v for k, v in fingerprint.items() if k != "shard"}


def merge(shard_outputs: Sequence[str | os.PathLike], output: str | os.PathLike) -> dict[str, Any]:
    """Check the shards, then write the merged result (and strict result) and a merged summary."""
    paths = [Path(p) for p in shard_outputs]
    if not paths:
        raise LmrcError("merge: no shard files given")
    summaries = [_shard_summary(p) for p in paths]
    first = _without_shard(summaries[0]["fingerprint"])
    by_index: dict[int, Path] = {}
    count = summaries[0]["fingerprint"]["shard"][1]
    for path, s in zip(paths, summaries):
        fp = s["fingerprint"]
        i, n = fp["shard"]
        if n != count:
            raise LmrcError(f"{path}: shard {i}/{n}, but {paths[0]} is one of {count} shards")
        other = _without_shard(fp)
        if other != first:
            key = next(k for k in sorted(set(first) | set(other)) if first.get(k) != other.get(k))
            raise LmrcError(
                f"{path}: made with another {key} than {paths[0]} ({other.get(key)!r} vs {first.get(key)!r}): "
                "shards of different runs cannot be merged"
            )
        if i in by_index:
            raise LmrcError(f"{path}: shard {i}/{n} given twice (also {by_index[i]})")
        by_index[i] = path
    missing = [i for i in range(count) if i not in by_index]
    if missing:
        raise LmrcError(f"merge: shard(s) {', '.join(f'{i}/{count}' for i in missing)} missing")

    output = Path(output)
    strict = all(sidecar(p, ".strict.json").is_file() for p in paths)
    writers = [(JsonStreamWriter(output), "")]
    if strict:
        writers.append((JsonStreamWriter(sidecar(output, ".strict.json")), ".strict.json"))
    try:
        for writer, suffix in writers:
            for i in range(count):
                src = by_index[i] if not suffix else sidecar(by_index[i], suffix)
                data = read_json(src)
                if not isinstance(data, list):
                    raise LmrcError(f"{src}: expected a JSON list of predictions")
                for p in data:
                    writer.add(p)
        for writer, _ in writers:
            writer.commit()
    finally:
        for writer, _ in writers:
            writer.discard()

    ordered = [summaries[paths.index(by_index[i])] for i in range(count)]
    merged = _merge_summaries(ordered, first)
    atomic_write_json(sidecar(output, ".summary.json"), merged, indent=2)
    return merged


def _merge_summaries(summaries: list[dict], fingerprint: dict) -> dict[str, Any]:
    """Sums of the shards' counts; scores are not merged (rerun `lmrc evaluate` on the merged file)."""
    out: dict[str, Any] = {
        "format": SUMMARY_FORMAT,
        "mode": summaries[0]["mode"],
        "merged_from_shards": len(summaries),
        "fingerprint": {**fingerprint, "shard": [0, 1]},
        "documents": sum(s["documents"] for s in summaries),
        "predictions": sum(s["predictions"] for s in summaries),
    }
    for section in ("candidates", "llm"):
        parts = [s[section] for s in summaries if section in s]
        if not parts:
            continue
        total: Counter = Counter()
        drops: Counter = Counter()
        for part in parts:
            for k, v in part.items():
                if k == "drops":
                    drops.update(v)
                elif (
                    isinstance(v, (int, float))
                    and not isinstance(v, bool)
                    and not k.endswith(("_per_document", "reduction", "recall", "precision"))
                ):
                    total[k] += v
        merged = dict(total)
        if section == "candidates" and merged.get("pairs"):
            merged["reduction"] = merged["candidates"] / merged["pairs"]
            if merged.get("positive_pairs"):
                merged["recall"] = merged["correct"] / merged["positive_pairs"]
        if section == "llm":
            n = out["documents"] or 1
            for k in ("prompts", "prompt_tokens", "generated_tokens"):
                merged[f"{k}_per_document"] = merged.get(k, 0) / n
            merged["drops"] = dict(sorted(drops.items()))
            for k in ("relation_mapping", "pairs_from"):
                merged[k] = parts[0].get(k)
        out[section] = merged
    secs = [s.get("seconds_per_document") for s in summaries]
    if all(x is not None for x in secs) and out["documents"]:
        out["seconds_per_document"] = round(
            sum(x * s["documents"] for x, s in zip(secs, summaries)) / out["documents"], 3
        )
    out["peak_rss_gib"] = max(s.get("peak_rss_gib", 0.0) for s in summaries)
    return out
