"""Text input: a `.txt` file (one document), a folder of `.txt` files, or JSON lines `{"title", "text"}`.

A bad item (empty, binary, not UTF-8, too large, a malformed line) is reported as one line naming the file and
place and skipped; the others go on. Only when nothing readable is left is the input refused.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from lmrc.errors import LmrcError

log = logging.getLogger(__name__)

MAX_CHARS = 2_000_000  # ~300k words; far beyond any document a relation model reads, still fast to segment


@dataclass(frozen=True)
class TextDoc:
    title: str
    text: str
    source: str  # "file.txt" or "docs.jsonl:3", for messages


@dataclass(frozen=True)
class Skipped:
    source: str
    problem: str

    def format(self) -> str:
        return f"{self.source}: {self.problem}"


def _check_text(text: str) -> str | None:
    if not text.strip():
        return "empty document (no text)"
    if "\x00" in text:
        return "binary data (NUL bytes), not text"
    bad = sum(1 for c in text[:10000] if ord(c) < 32 and c not in "\t\n\r\f\v")
    if bad > max(10, len(text[:10000]) // 100):
        return "binary data (control characters), not text"
    if len(text) > MAX_CHARS:
        return f"too large ({len(text):,} characters; the limit is {MAX_CHARS:,}): split it into smaller documents"
    return None


def _decode(raw: bytes) -> tuple[str | None, str | None]:
    if b"\x00" in raw[:65536]:
        return None, "binary data (NUL bytes), not text"
    try:
        return raw.decode("utf-8-sig"), None
    except UnicodeDecodeError as exc:
        return None, f"byte {exc.start}: not UTF-8 text (re-save it as UTF-8)"


def _read_txt(path: Path, title: str, docs: list[TextDoc], skipped: list[Skipped]) -> None:
    try:
        size = path.stat().st_size
        if size > 4 * MAX_CHARS:
            skipped.append(Skipped(str(path), f"too large ({size:,} bytes): split it into smaller documents"))
            return
        raw = path.read_bytes()
    except OSError as exc:
        skipped.append(Skipped(str(path), f"cannot read: {exc.strerror or exc}"))
        return
    text, problem = _decode(raw)
    problem = problem or _check_text(text or "")
    if problem:
        skipped.append(Skipped(str(path), problem))
    else:
        docs.append(TextDoc(title, text, str(path)))


def _read_jsonl(path: Path, docs: list[TextDoc], skipped: list[Skipped]) -> None:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise LmrcError(f"{path}: cannot read: {exc.strerror or exc}") from None
    text, problem = _decode(raw)
    if problem:
        raise LmrcError(f"{path}: {problem}")
    for no, line in enumerate(text.splitlines(), start=1):
        where = f"{path}: line {no}"
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            skipped.append(Skipped(where, f"malformed JSON: {exc.msg}"))
            continue
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            skipped.append(Skipped(where, 'expected an object with a "text" string'))
            continue
        title = obj.get("title")
        if title is not None and not isinstance(title, str):
            skipped.append(Skipped(where, f'"title" must be a string, got {title!r}'))
            continue
        problem = _check_text(obj["text"])
        if problem:
            skipped.append(Skipped(where, problem))
            continue
        docs.append(TextDoc(title if title else f"{path.stem}:{no}", obj["text"], where))


def read_texts(path: str | os.PathLike) -> tuple[list[TextDoc], list[Skipped]]:
    """The readable documents of `path` (titles made unique) and the skipped ones, each with its problem."""
    path = Path(path)
    docs: list[TextDoc] = []
    skipped: list[Skipped] = []
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() == ".txt")
        if not files:
            raise LmrcError(f"{path}: no .txt files in this folder")
        for f in files:
            _read_txt(f, f.stem, docs, skipped)
    elif not path.exists():
        raise LmrcError(f"{path}: file not found")
    elif path.suffix.lower() in (".jsonl", ".ndjson"):
        _read_jsonl(path, docs, skipped)
    else:
        _read_txt(path, path.stem, docs, skipped)
    seen: dict[str, int] = {}
    unique = []
    for d in docs:
        k = seen.get(d.title, 0)
        seen[d.title] = k + 1
        unique.append(d if k == 0 else TextDoc(f"{d.title} ({k + 1})", d.text, d.source))
    for s in skipped:
        log.warning("%s (skipped)", s.format())
    if not unique:
        first = skipped[0].format() if skipped else f"{path}: no documents"
        raise LmrcError(f"{first} (no readable document left)" if skipped else first)
    return unique, skipped
