"""Where a command may write: checked once, before any work, so a long run never ends in a lost file.

Every command names its inputs and outputs here (with the flag that gave each). `check_paths` then refuses, with
one line naming the path:
- an output that is one of the inputs, or another output, compared as files (`Path.resolve()` follows symlinks
  and makes relative spellings absolute; `os.path.samefile` catches hard links), not as strings;
- an output that is a folder, or whose folder cannot be created or written (read-only, permission denied): found
  now, not after the whole run;
- an output that exists already, unless `--overwrite` (or `--resume`, which continues the run that wrote it).

`check_progress` guards a resumable run's progress file: a rerun without `--resume` would start over and discard
the finished work of a killed run, so that needs `--overwrite`.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from lmrc.errors import LmrcError

PathArg = str | os.PathLike | None


@dataclass(frozen=True)
class Named:
    """A path and the option (or role) that gave it, for messages."""

    flag: str
    path: Path


def named(flag: str, *paths: PathArg | Iterable[PathArg]) -> list[Named]:
    """`Named` entries for the given paths, skipping unset ones (None, empty); lists are flattened."""
    out: list[Named] = []
    for p in paths:
        if p is None or p == "":
            continue
        if isinstance(p, (str, os.PathLike)):
            out.append(Named(flag, Path(p)))
        else:
            out.extend(named(flag, *p))
    return out


def same_file(a: Path, b: Path) -> bool:
    """True when `a` and `b` are (or would be) one file: resolved paths, or one inode when both exist."""
    try:
        if os.path.samefile(a, b):
            return True
    except OSError:
        pass  # one of them does not exist yet
    return Path(os.path.abspath(a)).resolve() == Path(os.path.abspath(b)).resolve()


def _existing_ancestor(path: Path) -> Path:
    p = Path(os.path.abspath(path))
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_writable_folder(flag: str, folder: PathArg) -> None:
    """`folder` is a folder, or can be created, and a file can be created in it (probed with a temporary file)."""
    if folder is None:
        return
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise LmrcError(f"{folder}: not a folder ({flag})")
    base = _existing_ancestor(folder)
    if not base.is_dir():
        raise LmrcError(f"{base}: not a folder, cannot create {folder} ({flag})")
    try:
        fd, probe = tempfile.mkstemp(prefix=".lmrc-write-check.", dir=base)
    except OSError as exc:
        raise LmrcError(f"{base}: cannot write here ({flag}): {exc.strerror or exc}") from None
    os.close(fd)
    os.unlink(probe)


def check_paths(
    inputs: Iterable[Named],
    outputs: Iterable[Named],
    *,
    overwrite: bool = False,
    resume: bool = False,
    companions: Iterable[Named] = (),
) -> None:
    """Refuse, before any work, outputs that would replace an input or each other, or that cannot be written.

    An existing output is refused unless `overwrite`, or `resume` (the run continues what it wrote).
    `companions` are files written beside an output (its summary, its strict-names copy, the documents built from
    text): checked like outputs, also when the output itself is gone (an earlier run's summary is not replaced
    without --overwrite either). Inputs are not checked for existence here: their readers name a missing file
    with the right message.
    """
    inputs, outputs = list(inputs), list(outputs)
    outputs += list(companions)
    for i, out in enumerate(outputs):
        for src in inputs:
            if same_file(out.path, src.path):
                raise LmrcError(
                    f"{out.path}: {out.flag} is the same file as {src.flag} {src.path}; an output never "
                    "replaces an input"
                )
        for other in outputs[:i]:
            if same_file(out.path, other.path):
                raise LmrcError(f"{out.path}: {other.flag} and {out.flag} name the same file")
    for out in outputs:
        if out.path.is_dir():
            raise LmrcError(f"{out.path}: is a folder; {out.flag} names a file to write")
        check_writable_folder(out.flag, out.path.parent)
        if out.path.exists() and not (overwrite or resume):
            raise LmrcError(f"{out.path}: exists ({out.flag}); pass --overwrite to replace it")


def check_progress(progress: Path, *, resume: bool, overwrite: bool) -> None:
    """A progress file left by an earlier run is continued with --resume and discarded only with --overwrite."""
    if progress.exists() and not resume and not overwrite:
        raise LmrcError(
            f"{progress}: progress of an earlier run; --resume continues it, --overwrite discards it and "
            "starts over"
        )
