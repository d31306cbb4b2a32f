"""Small file helpers: atomic writes and JSON reads that fail with a message naming the file and place."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lmrc.errors import LmrcError


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise LmrcError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise LmrcError(f"{path}: is a directory, expected a JSON file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise LmrcError(f"{path}: cannot read: {exc}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise LmrcError(f"{path}: line {exc.lineno}, column {exc.colno}: malformed JSON: {exc.msg}") from None


@contextlib.contextmanager
def naming_os_errors(path: str | os.PathLike):
    """Give an `OSError` that names no file (a full disk on write or fsync) the path being written, so the CLI's
    one-line message says which output failed."""
    try:
        yield
    except OSError as exc:
        if exc.filename is not None or exc.errno is None:
            raise
        raise OSError(exc.errno, exc.strerror, str(path)) from exc


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write via a temporary file in the same folder and rename, so readers never see half a file."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write via a temporary file in the same folder and rename, so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with naming_os_errors(path), os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = None) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


def append_jsonl(path: str | os.PathLike, record: dict) -> None:
    """Append one JSON line with a single write + fsync; a reader drops a torn last line (see read_jsonl)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(record, ensure_ascii=False) + "\n"
    with naming_os_errors(path), open(path, "a", encoding="utf-8") as fh:
        fh.write(line)
        fh.flush()
        os.fsync(fh.fileno())


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Read a JSON-lines file, ignoring a torn final line left by an interrupted append."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise LmrcError(f"{path}: line {i + 1}: malformed JSON line") from None
    return records


def file_sha256(path: str | os.PathLike) -> str:
    """Content hash of a file (feature caches, run fingerprints, provenance)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class JsonStreamWriter:
    """Write a JSON list item by item into a temporary file, renamed into place by `commit()`.

    The bytes equal `json.dumps(items, ensure_ascii=False)` plus a newline (as `atomic_write_json` writes), so a
    list written in pieces is identical to one written at once; `opening`/`closing` wrap the list (e.g. an object
    holding it). `discard()` removes an uncommitted file: readers never see half a file.
    """

    def __init__(self, path: str | os.PathLike, opening: str = "[", closing: str = "]") -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, self._tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        self._fh = os.fdopen(fd, "w", encoding="utf-8")
        self._fh.write(opening)
        self._closing = closing
        self._first = True
        self._done = False

    def add(self, item: Any) -> None:
        if not self._first:
            self._fh.write(", ")
        self._fh.write(json.dumps(item, ensure_ascii=False))
        self._first = False

    def commit(self) -> None:
        with naming_os_errors(self.path):
            self._fh.write(self._closing + "\n")
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()
        os.chmod(self._tmp, 0o644)
        os.replace(self._tmp, self.path)
        self._done = True

    def discard(self) -> None:
        if self._done:
            return
        self._fh.close()
        if os.path.exists(self._tmp):
            os.unlink(self._tmp)
        self._done = True


def open_progress(
    path: str | os.PathLike, fmt: str, fingerprint: dict, resume: bool, keep: Callable[[dict], Any]
) -> list[Any]:
    """A long run's progress file (JSON lines: a header naming `fmt` and the run's `fingerprint`, then records).

    Resuming: refuses a run with another fingerprint (naming the first setting that differs), drops a torn last
    line left by a killed append (the file is truncated after the last whole line, so the next append starts a
    clean line) and returns `keep(record)` of every record, reading one line at a time. Otherwise: a new file
    holding the header only, and [].
    """
    path = Path(path)
    if resume and path.exists():
        kept: list[Any] = []
        good_end = 0
        with open(path, "rb") as fh:
            lines = iter(fh)
            for n, line in enumerate(lines):
                try:
                    record = json.loads(line) if line.endswith(b"\n") else None
                except (json.JSONDecodeError, UnicodeDecodeError):
                    record = None
                if record is None:
                    if next(lines, None) is not None:
                        raise LmrcError(f"{path}: line {n + 1}: malformed JSON line")
                    break  # a torn last line
                if n == 0:
                    if not isinstance(record, dict) or record.get("format") != fmt:
                        raise LmrcError(f"{path}: not an lmrc progress file of this kind (expected {fmt})")
                    old = record.get("fingerprint", {})
                    for key in sorted(set(old) | set(fingerprint)):
                        if old.get(key) != fingerprint.get(key):
                            raise LmrcError(
                                f"{path}: cannot resume: {key} was {json.dumps(old.get(key))}, now "
                                f"{json.dumps(fingerprint.get(key))} (run without --resume to start over)"
                            )
                else:
                    kept.append(keep(record))
                good_end += len(line)
        if good_end:
            os.truncate(path, good_end)
            return kept
    if path.exists():
        path.unlink()
    append_jsonl(path, {"format": fmt, "fingerprint": fingerprint})
    return []
