"""Check a stage-2 adapter's weights file before anything heavy is loaded.

A truncated or damaged `adapter_model.safetensors` (an interrupted copy, a full disk) is otherwise found by peft
only after the base model has been loaded, as a `SafetensorError` traceback. The safetensors layout is simple
enough to check in full without reading the tensors: an 8-byte little-endian header length, a JSON header naming
each tensor's dtype, shape and byte range, then the data, which the ranges must tile exactly.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

from lmrc.errors import LmrcError

ADAPTER_WEIGHTS = "adapter_model.safetensors"
_MAX_HEADER = 100_000_000  # the safetensors reader's own limit
_ITEM_BYTES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}


def check_safetensors(path: str | os.PathLike) -> None:
    """Raise `LmrcError` naming `path` unless it is a complete safetensors file (header and every byte range)."""
    path = Path(path)

    def bad(problem: str) -> LmrcError:
        return LmrcError(f"{path}: damaged or truncated safetensors file: {problem}")

    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise bad(f"{size} bytes, shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER or 8 + n > size:
                raise bad(f"header of {n:,} bytes in a file of {size:,} bytes")
            raw = fh.read(n)
    except FileNotFoundError:
        raise LmrcError(f"{path}: file not found") from None
    except OSError as exc:
        raise LmrcError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise bad("the header is not JSON") from None
    if not isinstance(header, dict):
        raise bad("the header is not a JSON object")
    data_size = size - 8 - n
    ranges = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
            want = math.prod(int(d) for d in shape) * _ITEM_BYTES[dtype]
        except (KeyError, TypeError, ValueError):
            raise bad(f"tensor {name!r}: malformed entry") from None
        if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end):
            raise bad(f"tensor {name!r}: malformed byte range")
        if end > data_size:
            raise bad(
                f"tensor {name!r} ends at byte {end:,} of {data_size:,} data bytes (the file is cut short)"
            )
        if end - begin != want:
            raise bad(f"tensor {name!r}: {end - begin:,} bytes for shape {shape} of {dtype}")
        ranges.append((begin, end))
    covered = 0
    for begin, end in sorted(ranges):
        if begin != covered:
            raise bad("tensor byte ranges overlap or leave gaps")
        covered = end
    if covered != data_size:
        raise bad(f"{data_size - covered:,} bytes after the last tensor")


def check_adapter_weights(adapter_dir: str | os.PathLike) -> None:
    """The adapter folder's weights file, when it has one, is complete (see `check_safetensors`)."""
    path = Path(adapter_dir) / ADAPTER_WEIGHTS
    if path.is_file():
        check_safetensors(path)
