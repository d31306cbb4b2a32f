"""Seeded document-level splits of a DocRED-format file (`lmrc data split`).

The split works on the raw JSON list, not on `Document` objects, so every field of every document — including
fields lmrc does not model, such as the mentions' `global_pos` and `index` in Re-DocRED — reaches the output
unchanged.

Procedure (so a split can be repeated by hand): the document indices 0..n-1 are shuffled with
`random.Random(seed).shuffle`; part 0 takes the first n_0 shuffled indices, part 1 the next n_1, and so on;
each part then lists its documents in their original file order. Part sizes come from the ratios by the
largest-remainder rule, so they sum to n exactly. With this procedure, `--ratios 0.1,0.9 --seed 13` on Re-DocRED's
`dev_revised.json` gives the `dev_50.json` / `train_450.json` split used on the project machines.

Outputs, for an input `<stem>.json`: `<stem>_split0.json`, `<stem>_split1.json`, ... (one per ratio, in the
order given) and `<stem>_split_manifest.json`, recording the source, its sha256, the seed, the ratios and the
original indices of each part.
"""

from __future__ import annotations

import hashlib
import math
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from lmrc.data.docred import validate_raw
from lmrc.errors import LmrcError
from lmrc.io import atomic_write_json, read_json

RATIO_TOLERANCE = 1e-6


@dataclass(frozen=True)
class SplitPart:
    index: int
    ratio: float
    path: Path
    indices: tuple[int, ...]  # positions in the source file, ascending


def parse_ratios(text: str) -> tuple[float, ...]:
    """'0.9,0.1' -> (0.9, 0.1), checked by `check_ratios`."""
    try:
        ratios = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise LmrcError(f"--ratios {text!r}: expected comma-separated numbers, e.g. 0.9,0.1") from None
    return check_ratios(ratios)


def check_ratios(ratios: Sequence[float]) -> tuple[float, ...]:
    ratios = tuple(float(r) for r in ratios)
    if len(ratios) < 2:
        raise LmrcError(f"ratios {list(ratios)}: need at least two parts")
    if not all(math.isfinite(r) and r > 0 for r in ratios):
        raise LmrcError(f"ratios {list(ratios)}: every ratio must be a positive number")
    if abs(sum(ratios) - 1.0) > RATIO_TOLERANCE:
        raise LmrcError(f"ratios {list(ratios)}: must sum to 1 (they sum to {sum(ratios):.6g})")
    return ratios


def part_sizes(n: int, ratios: Sequence[float]) -> list[int]:
    """Largest-remainder apportionment of n documents to the ratios; ties go to the earlier part."""
    # Normalising absorbs the sum tolerance; rounding to 9 places keeps float noise
    # (0.29 * 100 = 28.999999999999996) out of the floors.
    total = sum(ratios)
    quotas = [round(r / total * n, 9) for r in ratios]
    sizes = [math.floor(q) for q in quotas]
    by_remainder = sorted(range(len(ratios)), key=lambda i: (-(quotas[i] - sizes[i]), i))
    for i in by_remainder[: n - sum(sizes)]:
        sizes[i] += 1
    return sizes


def split_indices(n: int, ratios: Sequence[float], seed: int) -> list[list[int]]:
    """Document indices of each part (ascending); see the module docstring for the procedure."""
    ratios = check_ratios(ratios)
    order = list(range(n))
    random.Random(seed).shuffle(order)
    parts, start = [], 0
    for size in part_sizes(n, ratios):
        parts.append(sorted(order[start : start + size]))
        start += size
    return parts


def split_output_paths(path: str | os.PathLike, out_dir: str | os.PathLike, n_parts: int) -> list[Path]:
    stem = Path(path).stem
    return [Path(out_dir) / f"{stem}_split{i}.json" for i in range(n_parts)]


def split_file(
    path: str | os.PathLike, ratios: Sequence[float], seed: int, out_dir: str | os.PathLike
) -> list[SplitPart]:
    """Split a DocRED-format file into `len(ratios)` files in `out_dir` (written atomically)."""
    path = Path(path)
    ratios = check_ratios(ratios)
    data = read_json(path)
    errors = [p for p in validate_raw(data) if p.severity == "error"]
    if errors:
        more = f" (and {len(errors) - 1} more; run `lmrc data validate {path}`)" if len(errors) > 1 else ""
        raise LmrcError(errors[0].format(path) + more)
    parts = split_indices(len(data), ratios, seed)
    for i, idx in enumerate(parts):
        if not idx:
            raise LmrcError(
                f"{path}: ratio {ratios[i]} of {len(data)} documents leaves part {i} empty; use fewer parts "
                "or larger ratios"
            )
    out_paths = split_output_paths(path, out_dir, len(ratios))
    result = []
    for i, (idx, out) in enumerate(zip(parts, out_paths)):
        atomic_write_json(out, [data[j] for j in idx])
        result.append(SplitPart(index=i, ratio=ratios[i], path=out, indices=tuple(idx)))
    manifest = {
        "source": str(path),
        "source_sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "documents": len(data),
        "seed": seed,
        "ratios": list(ratios),
        "procedure": "random.Random(seed).shuffle(range(n)); consecutive largest-remainder parts; file order",
        "parts": [
            {"file": p.path.name, "ratio": p.ratio, "documents": len(p.indices), "indices": list(p.indices)}
            for p in result
        ],
    }
    atomic_write_json(manifest_path(path, out_dir), manifest, indent=1)
    return result


def manifest_path(path: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    return Path(out_dir) / f"{Path(path).stem}_split_manifest.json"


def fold_indices(n_docs: int, folds: int, seed: int) -> list[list[int]]:
    """Cross-fitting folds: indices 0..n-1 shuffled with `random.Random(seed)`, dealt round-robin into `folds`
    parts, each listed in file order."""
    if folds < 2 or folds > n_docs:
        raise LmrcError(f"cross-fitting: {folds} folds for {n_docs} documents (need 2 <= folds <= documents)")
    order = list(range(n_docs))
    random.Random(seed).shuffle(order)
    return [sorted(order[k::folds]) for k in range(folds)]
