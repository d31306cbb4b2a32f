"""Shared fixtures: where the real data lives, and offline, quiet, single-threaded defaults for tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]


def _data_dir() -> Path:
    env = os.environ.get("LMRC_DATA_DIR")
    return Path(env) if env else REPO.parent / "shared" / "data"


def must_have() -> bool:
    """Missing data or models fail the tests (instead of skipping them) when LMRC_DATA_DIR is set or in CI."""
    return bool(os.environ.get("LMRC_DATA_DIR") or os.environ.get("CI"))


def missing(what: str) -> None:
    """Skip a test for a missing resource on a developer's machine; fail it where the resource is expected."""
    if must_have():
        pytest.fail(f"{what} (LMRC_DATA_DIR or CI is set, so this is an error, not a skip)", pytrace=False)
    pytest.skip(what)


def minilm_dir() -> Path:
    """The packaged MiniLM, found by the model resolver (any Python version or venv layout)."""
    from lmrc.errors import LmrcError
    from lmrc.models.store import resolve

    try:
        return resolve("minilm")
    except LmrcError as exc:
        missing(f"packaged MiniLM not installed: {exc}")
        raise


@pytest.fixture(scope="session")
def data_dir() -> Path:
    d = _data_dir()
    if not (d / "redocred" / "dev_50.json").exists():
        missing(f"real data not found at {d} (set LMRC_DATA_DIR)")
    return d


@pytest.fixture(scope="session")
def redocred_dir(data_dir: Path) -> Path:
    return data_dir / "redocred"


@pytest.fixture(scope="session")
def cdr_dir(data_dir: Path) -> Path:
    return data_dir / "cdr"


@pytest.fixture(scope="session")
def rel_info(redocred_dir: Path):
    from lmrc.data.relations import load_relations

    return load_relations(redocred_dir / "rel_info.json")


@pytest.fixture(scope="session")
def dev_docs(redocred_dir: Path, rel_info):
    from lmrc.data.docred import load_documents

    return load_documents(redocred_dir / "dev_50.json", rel_info)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """A session-wide LMRC_CACHE, so converted models are built once per test run."""
    d = Path(os.environ.get("LMRC_TEST_CACHE") or tmp_path_factory.mktemp("lmrc-cache"))
    os.environ["LMRC_CACHE"] = str(d)
    return d
