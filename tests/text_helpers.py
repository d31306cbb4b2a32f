"""Shared by the text-input tests: spaCy required (skipped only outside CI), and a tiny entity model trained once
per test process on a few short real documents."""

from __future__ import annotations

import functools
import os
import tempfile
from pathlib import Path

import pytest


def need_spacy() -> None:
    try:
        import spacy  # noqa: F401
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail(
                "spaCy is not installed (pip install 'lmrc[text]'); CI must test text input", pytrace=False
            )
        pytest.skip("spaCy not installed (pip install 'lmrc[text]'): text input is not tested here")


@functools.lru_cache(maxsize=1)
def tiny_entity_model(train: Path, tune: Path) -> Path:
    """A tiny random BERT tagger and a pair scorer trained for one epoch on `train` (its scores are noise: the
    plumbing is what is tested)."""
    from stage1_run_helpers import save_tiny_bert

    from lmrc.config import load_config
    from lmrc.entities.config import EntitiesConfig
    from lmrc.entities.train import train as train_entities

    root = Path(tempfile.mkdtemp(prefix="lmrc-text-models-"))
    cfg = load_config(
        EntitiesConfig,
        None,
        [f"model.encoder={save_tiny_bert(root / 'tiny-bert')}", f"data.train={train}", f"data.tune={tune}",
         "train.epochs=1", "train.max_tokens=64", "coref.steps=20"],
    )  # fmt: skip
    return train_entities(cfg, root / "entities")
