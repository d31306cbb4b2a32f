"""Small file helpers: atomic file and folder writes, sidecar names, progress files, and JSON reads that fail
with a message naming the file and place."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

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


def sidecar(output: str | os.PathLike, suffix: str) -> Path:
    """The name of a file written beside a result file: `result.json` -> `result<suffix>` (e.g.
    `.progress.jsonl`, `.summary.json`, `.strict.json`)."""
    output = Path(output)
    stem = output.name[: -len(output.suffix)] if output.suffix else output.name
    return output.with_name(stem + suffix)


class AtomicFile:
    """A temporary file beside `path`, renamed onto it by `commit()`, so readers never see half a file.

    `discard()` (or leaving the `with` block by an exception) removes the temporary file and leaves `path` as it
    was. The committed file gets the usual 0644 permissions (mkstemp creates 0600).
    """

    def __init__(
        self, path: str | os.PathLike, text: bool = False, suffix: str = ".tmp", encoding: str = "utf-8"
    ) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, self.tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=suffix, dir=self.path.parent)
        self.fh: IO[Any] = os.fdopen(fd, "w", encoding=encoding) if text else os.fdopen(fd, "wb")
        self._done = False

    def commit(self) -> None:
        with naming_os_errors(self.path):
            self.fh.flush()
            os.fsync(self.fh.fileno())
            self.fh.close()
        os.chmod(self.tmp, 0o644)
        os.replace(self.tmp, self.path)
        self._done = True

    def discard(self) -> None:
        if self._done:
            return
        self.fh.close()
        if os.path.exists(self.tmp):
            os.unlink(self.tmp)
        self._done = True

    def __enter__(self) -> IO[Any]:
        return self.fh

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            try:
                self.commit()
            finally:
                self.discard()
        else:
            self.discard()


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
    with naming_os_errors(path), AtomicFile(path) as fh:
        fh.write(data)


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
        self._file = AtomicFile(self.path, text=True)
        self._file.fh.write(opening)
        self._closing = closing
        self._first = True

    def add(self, item: Any) -> None:
        if not self._first:
            self._file.fh.write(", ")
        self._file.fh.write(json.dumps(item, ensure_ascii=False))
        self._first = False

    def commit(self) -> None:
        with naming_os_errors(self.path):
            self._file.fh.write(self._closing + "\n")
            self._file.commit()

    def discard(self) -> None:
        self._file.discard()


# --------------------------------------------------------------------------------------------------- folders


def make_readable(folder: Path) -> None:
    """Give the folder the usual umask permissions (mkdtemp and some writers create private files)."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for p in folder.rglob("*"):
        p.chmod((0o777 if p.is_dir() else 0o666) & ~umask)


def _aside(path: Path) -> Path:
    return path.with_name(f".{path.name}.old")


def replace_dir(new: Path, target: Path) -> None:
    """Swap the fully written folder `new` in for `target`. POSIX cannot rename a folder over a non-empty one, so
    the old folder is first moved aside; for that moment only `.<name>.old` exists, which `recover_dir` restores."""
    old = _aside(target)
    if old.exists():
        shutil.rmtree(old)
    if target.exists():
        os.replace(target, old)
    os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)


def recover_dir(path: Path) -> None:
    """Undo an interrupted swap: put `.<name>.old` back when `path` itself is missing."""
    old = _aside(path)
    if not path.exists() and old.exists():
        os.replace(old, path)


def write_dir_atomically(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Fill a temporary sibling folder (`.<name>.<random>.tmp`) with `write(folder)`, then swap it in for `path`
    (see replace_dir); on any error the temporary folder is removed and `path` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        write(tmp)
        make_readable(tmp)
        replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ----------------------------------------------------------------------------------------------- progress files


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


def move_files_into(src: Path, dest: Path, last: str | None = None) -> None:
    """Move every file of the finished folder `src` into `dest`, `last` (a marker of completeness) after the
    others, then remove `src`. Not write_dir_atomically: `dest` also holds files of its own (a training run's
    metrics.jsonl, last/, train.log) that must stay; each file is renamed atomically, and the marker is only there
    once all others are."""
    names = sorted(p.name for p in src.iterdir())
    names.sort(key=lambda n: n == last)
    for name in names:
        os.replace(src / name, dest / name)
    src.rmdir()
