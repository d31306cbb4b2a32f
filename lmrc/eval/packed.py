"""Official-format predictions held as an array per document: what stage 1 hands to the result file and the
scorer when a noisy head predicts far more triples than dicts could hold."""

from __future__ import annotations

import base64
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lmrc.errors import LmrcError


@dataclass(frozen=True)
class PackedPredictions:
    """One document's official-format predictions as an int32 array [n, 3] of (h_idx, t_idx, index into
    `relations`), in their order: 12 bytes a prediction where a list of dicts costs ~400.

    Why: a noisy stage-1 head (an early checkpoint, a low threshold) predicts hundreds of thousands of triples on
    one long document, up to pairs x relations (18 million for 433 entities); as dicts they would need more memory
    than the model. `records()` gives the dicts one at a time, in order, for the result file; `evaluate` scores
    the array as it is.
    """

    title: str
    relations: tuple[str, ...]
    triples: np.ndarray = field(repr=False)

    def __len__(self) -> int:
        return len(self.triples)

    @classmethod
    def from_columns(cls, title: str, h: np.ndarray, t: np.ndarray, r: np.ndarray, ids: Sequence[str]):
        """From (h, t, relation column) arrays, where `ids[column]` names the relation; only the relations used
        are kept, in the order of `ids`."""
        used, index = np.unique(np.asarray(r, dtype=np.int64), return_inverse=True)
        triples = np.empty((len(index), 3), dtype=np.int32)
        triples[:, 0], triples[:, 1], triples[:, 2] = h, t, index.reshape(-1)
        return cls(title, tuple(ids[c] for c in used.tolist()), triples)

    def records(self, block: int = 1 << 16) -> Iterator[dict[str, Any]]:
        """The predictions as official-format dicts, in order (a block of rows converted at a time)."""
        for s in range(0, len(self.triples), block):
            for h, t, k in self.triples[s : s + block].tolist():
                yield {"title": self.title, "h_idx": h, "t_idx": t, "r": self.relations[k]}

    def to_raw(self) -> dict[str, Any]:
        """JSON form (progress files): the relations used and the array, little-endian int32 in base64."""
        data = np.ascontiguousarray(self.triples, dtype="<i4").tobytes()
        return {"relations": list(self.relations), "triples": base64.b64encode(data).decode("ascii")}

    @classmethod
    def from_raw(cls, title: str, raw: Any, where: str) -> PackedPredictions:
        """Read `to_raw`'s form back, refusing a malformed one with a message naming `where`."""
        if not isinstance(raw, dict) or not isinstance(raw.get("triples"), str):
            raise LmrcError(f"{where}: expected an object with 'relations' and base64 'triples'")
        relations = raw.get("relations")
        if not isinstance(relations, list) or not all(isinstance(r, str) for r in relations):
            raise LmrcError(f"{where}.relations: expected a list of relation ids")
        try:
            data = base64.b64decode(raw["triples"], validate=True)
        except ValueError:
            raise LmrcError(f"{where}.triples: not base64") from None
        if len(data) % 12:
            raise LmrcError(f"{where}.triples: {len(data)} bytes, not whole (h, t, r) int32 rows")
        triples = np.frombuffer(data, dtype="<i4").astype(np.int32).reshape(-1, 3)
        if len(triples) and (triples[:, 2].min() < 0 or triples[:, 2].max() >= len(relations)):
            raise LmrcError(f"{where}.triples: a relation index outside its {len(relations)} relations")
        return cls(title, tuple(relations), triples)
