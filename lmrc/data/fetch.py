"""Getting the official Re-DocRED files (`lmrc data fetch redocred`).

Two sources, chosen in this order:
1. a local copy — `from_dir` (`--from DIR`), else the `LMRC_DATA_DIR` environment variable, unless a download
   URL is given explicitly. A file is taken from `<dir>/redocred/<name>`, or `<dir>/<name>` when the folder
   holds the files directly. Nothing is downloaded in this mode: a file the copy lacks (on the project
   machines, `train_revised.json` and `test_revised.json`) is reported as missing, with the URL to get it from,
   and the other files are still copied.
2. a download over HTTP(S) from `base_url` (`--url`), else `LMRC_REDOCRED_URL`, else the official repository
   (`REDOCRED_URL`).

Files land in `to` (`--to DIR`), else `$LMRC_CACHE/redocred` (default `~/.cache/lmrc/redocred`). Every file is
written to a temporary file in that folder while its sha256 is computed, checked against the known hash
(dev and test; the train file has no published hash and is only recorded), and renamed into place: an
interrupted or corrupted transfer never leaves a file under the final name. A file already there with the
right hash is kept (status "cached") unless `force`.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from lmrc import __version__
from lmrc.errors import LmrcError
from lmrc.io import AtomicFile

log = logging.getLogger(__name__)

REDOCRED_URL = "https://raw.githubusercontent.com/tonytan48/Re-DocRED/main/data"
REDOCRED_FILES = {"train": "train_revised.json", "dev": "dev_revised.json", "test": "test_revised.json"}
REDOCRED_SHA256 = {
    "dev_revised.json": "051ee1d057204a5d08ef5502beacdadf191245b5eaf0e29ec2c607cf002c016f",
    "test_revised.json": "ea673b7ef91e16510d7eb88863d3903e47318dc5653ef361266f27ae3b84723c",
}
CHUNK = 1 << 20


@dataclass(frozen=True)
class FetchResult:
    name: str  # file name, e.g. "dev_revised.json"
    status: str  # "downloaded" | "copied" | "cached" | "missing"
    source: str  # URL or local path it came from (or should come from, when missing)
    path: Path | None  # where it is now; None when missing
    sha256: str | None
    verified: bool  # sha256 matched a known hash


def cache_root() -> Path:
    """`$LMRC_CACHE`, default `~/.cache/lmrc`."""
    env = os.environ.get("LMRC_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lmrc"


def parse_file_selection(selection: str | Iterable[str] | None) -> list[str]:
    """'dev,test' (or ["dev", "test"], or None for all) -> file names, in train/dev/test order."""
    if selection is None:
        keys = list(REDOCRED_FILES)
    else:
        items = selection.split(",") if isinstance(selection, str) else list(selection)
        keys = [k.strip() for k in items if k.strip()]
        unknown = [k for k in keys if k not in REDOCRED_FILES]
        if unknown or not keys:
            raise LmrcError(f"--files {','.join(keys)!r}: choose from {', '.join(REDOCRED_FILES)}")
    return [REDOCRED_FILES[k] for k in REDOCRED_FILES if k in keys]


def fetch_redocred(
    to: str | os.PathLike | None = None,
    *,
    files: str | Iterable[str] | None = None,
    from_dir: str | os.PathLike | None = None,
    base_url: str | None = None,
    timeout: float = 60.0,
    force: bool = False,
) -> list[FetchResult]:
    """Fetch the selected Re-DocRED files (see the module docstring for sources and guarantees)."""
    names = parse_file_selection(files)
    if from_dir is not None and base_url is not None:
        raise LmrcError("give either a local copy (--from) or a download URL (--url), not both")
    if from_dir is None and base_url is None:
        from_dir = os.environ.get("LMRC_DATA_DIR") or None
    url = (base_url or os.environ.get("LMRC_REDOCRED_URL") or REDOCRED_URL).rstrip("/")
    dest = Path(to).expanduser() if to is not None else cache_root() / "redocred"
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LmrcError(f"{dest}: cannot create the output folder: {exc}") from None

    results = []
    for name in names:
        target = dest / name
        expected = REDOCRED_SHA256.get(name)
        cached = None if force else _cached(target, expected)
        if cached is not None:
            results.append(FetchResult(name, "cached", str(target), target, cached, expected is not None))
        elif from_dir is not None:
            results.append(_copy_local(Path(from_dir).expanduser(), name, target, expected, f"{url}/{name}"))
        else:
            results.append(_download(f"{url}/{name}", target, expected, timeout))
    return results


def _cached(target: Path, expected: str | None) -> str | None:
    """The sha256 of an existing good file at `target`, or None when it must be fetched."""
    if not target.is_file():
        return None
    digest = _sha256_file(target)
    if expected is not None and digest != expected:
        log.warning("%s: sha256 %s does not match the known %s; fetching it again", target, digest, expected)
        return None
    return digest


def _copy_local(from_dir: Path, name: str, target: Path, expected: str | None, url: str) -> FetchResult:
    for src in (from_dir / "redocred" / name, from_dir / name):
        if src.is_file():
            break
    else:
        log.warning(
            "%s is not in the local copy %s (looked in %s and %s); download it from %s",
            name,
            from_dir,
            from_dir / "redocred",
            from_dir,
            url,
        )
        return FetchResult(name, "missing", url, None, None, False)
    log.info("copying %s -> %s", src, target)
    try:
        with open(src, "rb") as fh:
            digest = _write_verified(fh, target, expected, source=str(src))
    except OSError as exc:
        raise LmrcError(f"{src}: cannot copy to {target}: {exc}") from None
    return FetchResult(name, "copied", str(src), target, digest, expected is not None)


def _download(url: str, target: Path, expected: str | None, timeout: float) -> FetchResult:
    scheme = urllib.parse.urlsplit(url).scheme
    if scheme not in ("http", "https"):
        raise LmrcError(f"{url}: only http(s) URLs can be downloaded; use --from DIR for a local copy")
    log.info("downloading %s -> %s", url, target)
    request = urllib.request.Request(url, headers={"User-Agent": f"lmrc/{__version__}"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            length = resp.headers.get("Content-Length")
            digest = _write_verified(
                resp,
                target,
                expected,
                source=url,
                length=int(length) if length and length.isdigit() else None,
            )
    except urllib.error.HTTPError as exc:
        raise LmrcError(f"{url}: download failed: HTTP {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        raise LmrcError(
            f"{url}: cannot download: {exc.reason} (no internet? point --from or LMRC_DATA_DIR at a local copy)"
        ) from None
    except TimeoutError:
        raise LmrcError(f"{url}: download timed out after {timeout:g} s") from None
    except (http.client.HTTPException, ConnectionError) as exc:
        raise LmrcError(f"{url}: download interrupted: {exc!r}") from None
    return FetchResult(target.name, "downloaded", url, target, digest, expected is not None)


def _write_verified(
    src: BinaryIO, target: Path, expected: str | None, source: str, length: int | None = None
) -> str:
    """Stream `src` into a temporary file beside `target`, check size and sha256, then rename into place."""
    sha, size = hashlib.sha256(), 0
    with AtomicFile(target, suffix=".part") as out:
        while chunk := src.read(CHUNK):
            sha.update(chunk)
            out.write(chunk)
            size += len(chunk)
        if length is not None and size != length:
            raise LmrcError(f"{source}: transfer incomplete: got {size} of {length} bytes; nothing was saved")
        digest = sha.hexdigest()
        if expected is not None and digest != expected:
            raise LmrcError(
                f"{source}: sha256 mismatch: expected {expected}, got {digest}; the file was discarded"
            )
    if expected is None:
        log.info("%s: sha256 %s (no published hash to check against)", target.name, digest)
    return digest


def _sha256_file(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            sha.update(chunk)
    return sha.hexdigest()
