"""Shared by the pipeline and compare tests: tiny random models (a stage-1 BERT, rc and direct LLM adapters)
trained for a step or two on short real Re-DocRED documents, built once per test process."""

from __future__ import annotations

import functools
import json
import tempfile
from pathlib import Path

from stage1_run_helpers import save_tiny_bert, shortest, tiny_config, write_docs
from stage2_helpers import tiny_model_dir

from lmrc.data.docred import load_documents
from lmrc.data.relations import load_relations

# Stage-2 settings that keep the tiny LLM's noise short: a few new tokens per pair, small prompts.
FAST_GENERATION = {"generation": {"max_new_tokens_per_pair": 4, "max_new_tokens_cap": 12, "batch_size": 4}}


@functools.lru_cache(maxsize=1)
def _root() -> Path:
    return Path(tempfile.mkdtemp(prefix="lmrc-pipeline-models-"))


@functools.lru_cache(maxsize=1)
def data_files(redocred_dir: Path) -> dict[str, Path]:
    """Short real documents: 4 to train on, 2 to tune on, 7 to predict (the 13 shortest labelled dev docs)."""
    rel_info = redocred_dir / "rel_info.json"
    docs = shortest(load_documents(redocred_dir / "dev_50.json", load_relations(rel_info)), 13)
    root = _root()
    return {
        "rel_info": rel_info,
        "train": write_docs(root / "train.json", docs[:4]),
        "tune": write_docs(root / "tune.json", docs[4:6]),
        "test": write_docs(root / "test.json", docs[6:13]),
        "unlabelled": write_docs(root / "unlabelled.json", docs[6:13], labels=False),
    }


@functools.lru_cache(maxsize=1)
def stage1_checkpoint(redocred_dir: Path) -> Path:
    from lmrc.stage1.train import train

    files = data_files(redocred_dir)
    root = _root()
    cfg = tiny_config(
        save_tiny_bert(root / "tiny-bert"), files["train"], files["tune"], files["rel_info"], root / "stage1"
    )
    return train(cfg).best_dir


@functools.lru_cache(maxsize=4)
def adapter(redocred_dir: Path, mode: str, rel_info: Path | None = None, extra: tuple[str, ...] = ()) -> Path:
    """A tiny rc or direct adapter trained for one step (answers are noise: the plumbing is what is tested)."""
    from lmrc.stage2.config import load_stage2_config
    from lmrc.stage2.train import train

    files = data_files(redocred_dir)
    tag = "own" if rel_info is None else Path(rel_info).stem
    out = _root() / f"adapter-{mode}-{tag}-{abs(hash(extra)) if extra else 0}"
    cfg = load_stage2_config(
        None,
        [
            f"mode={mode}",
            f"model={tiny_model_dir()}",
            f"data.train={files['train']}",
            f"data.rel_info={rel_info or files['rel_info']}",
            "data.max_docs=1",
            "max_seq_len=1024",
            "dtype=float32",
            "train.max_steps=1",
            "train.warmup_steps=0",
            *extra,
        ],
    )
    train(cfg, out)
    return out


def other_relation_set(root: Path, redocred_dir: Path) -> Path:
    """rel_info.json with one more relation: another relation set (the documents still fit it)."""
    raw = json.loads((redocred_dir / "rel_info.json").read_text())
    raw["P99999"] = "a relation no one else has"
    path = root / "other_rel_info.json"
    path.write_text(json.dumps(raw))
    return path
