"""GGUF -> a plain Hugging Face folder, converted once per GGUF file into the model cache (lmrc.models.gguf_convert does
the conversion itself); a conversion records where it came from, so a changed source or transformers major version
converts again.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import shutil
import time
from pathlib import Path

from filelock import FileLock

from lmrc.io import atomic_write_json, file_sha256, write_dir_atomically

logger = logging.getLogger(__name__)

# Bump when the conversion itself changes, so every cached conversion is rebuilt once.
CONVERSION_FORMAT = 1
PROVENANCE_FILE = "lmrc_provenance.json"


def _source_stamp(gguf: Path) -> dict:
    """Cheap identity of the GGUF file (checked on every resolve); the sha256 is recorded at conversion."""
    st = gguf.stat()
    return {"path": str(gguf.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _transformers_major() -> str:
    """Read from the package metadata: importing transformers just to compare versions costs seconds."""
    return importlib.metadata.version("transformers").split(".")[0]


def is_current(target: Path, gguf: Path) -> bool:
    """The conversion exists, came from this very GGUF file, and was written by a compatible transformers.

    Only the transformers major version triggers a rebuild: the saved folder format is stable within one.
    """
    record_path = target / PROVENANCE_FILE
    if not record_path.is_file():
        return False
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    stamp = _source_stamp(gguf)
    source = record.get("source", {})
    return (
        record.get("format") == CONVERSION_FORMAT
        and all(source.get(k) == stamp[k] for k in ("path", "size", "mtime_ns"))
        and str(record.get("transformers_version", "")).split(".")[0] == _transformers_major()
        and (target / "model.safetensors").is_file()
        and (target / "config.json").is_file()
    )


def _write_provenance(folder: Path, gguf: Path, versions: dict[str, str]) -> None:
    """Record where the conversion came from, so `is_current` can tell a stale one."""
    atomic_write_json(
        folder / PROVENANCE_FILE,
        {
            "format": CONVERSION_FORMAT,
            "source": {**_source_stamp(gguf), "sha256": file_sha256(gguf)},
            "dtype": "float32",
            **versions,
            "converted_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        },
        indent=2,
    )


def ensure_converted(gguf: Path, target: Path, name: str) -> Path:
    """`target` holds the GGUF file converted to a plain HF folder: converted once (under a file lock, so that
    concurrent processes wait for one conversion instead of each converting), reconverted when the source or the
    conversion changed."""
    if is_current(target, gguf):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(target.parent / f".{name}.lock"):
        if is_current(target, gguf):  # another process finished the conversion while we waited
            return target
        # Only the lock holder makes temporary folders, so any found now were left by a killed process.
        for leftover in target.parent.glob(f".{target.name}.*.tmp"):
            shutil.rmtree(leftover, ignore_errors=True)
        logger.info("converting %s to a Hugging Face folder in %s (once)", gguf, target)
        start = time.perf_counter()

        # torch and transformers only when a conversion runs: this module is on the CLI's light path.
        from lmrc.models import gguf_convert

        def write(folder: Path) -> None:
            gguf_convert.convert_gguf(gguf, folder)
            _write_provenance(folder, gguf, gguf_convert.library_versions())

        write_dir_atomically(target, write)
        logger.info("converted %s in %.1f s", name, time.perf_counter() - start)
    return target
