"""The relation inventory (`rel_info.json`: relation id -> readable name)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from lmrc.errors import LmrcError
from lmrc.io import read_json

NA = "Na"  # column 0 of every multi-hot label vector: "no relation"


@dataclass(frozen=True)
class RelationSet:
    """Relation ids in file order; label column i+1 is ids[i] (column 0 is NA)."""

    ids: tuple[str, ...]
    names: dict[str, str]

    def __post_init__(self) -> None:
        object.__setattr__(self, "_column", {rid: i + 1 for i, rid in enumerate(self.ids)})

    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, rid: object) -> bool:
        return rid in self._column  # type: ignore[attr-defined]

    def column(self, rid: str) -> int:
        """Label column of a relation id (1-based; 0 is NA)."""
        return self._column[rid]  # type: ignore[attr-defined]

    def name(self, rid: str) -> str:
        return self.names[rid]


def load_relations(path: str | os.PathLike) -> RelationSet:
    raw = read_json(path)
    if not isinstance(raw, dict) or not raw:
        raise LmrcError(f"{path}: expected a non-empty JSON object mapping relation id to name")
    for rid, name in raw.items():
        if not isinstance(name, str) or not name.strip():
            raise LmrcError(f"{path}: relation {rid!r}: name must be a non-empty string, got {name!r}")
    names = list(raw.values())
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise LmrcError(f"{path}: relation names must be unique; repeated: {sorted(dup)}")
    if NA in raw:
        raise LmrcError(f"{path}: relation id {NA!r} is reserved for 'no relation'")
    return RelationSet(ids=tuple(raw), names=dict(raw))
