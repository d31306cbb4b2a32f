"""The documents of a comparison, written into its run folder (`data/`): what every row is scored on and, when
the config asks for it, the training / tuning split the models are trained on (so a fresh clone needs no
`lmrc data split`)."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from lmrc.config import expand_path
from lmrc.data.docred import Document, document_to_raw, load_documents, require_labels
from lmrc.data.relations import RelationSet
from lmrc.data.split import split_indices
from lmrc.errors import LmrcError
from lmrc.experiments.config import CompareConfig
from lmrc.io import atomic_write_json, read_json


@dataclass(frozen=True)
class DataFiles:
    """The run folder's document files: `eval` always; `train` and `tune` when compare made the split."""

    eval: Path
    train: Path | None = None
    tune: Path | None = None


def write_if_changed(path: Path, docs: Sequence[Document]) -> Path:
    """Write the documents unless the file already holds exactly them (keeps reruns' fingerprints stable)."""
    raw = [document_to_raw(d) for d in docs]
    if not (path.is_file() and read_json(path) == raw):
        atomic_write_json(path, raw)
    return path


def prepare_data(cfg: CompareConfig, out: Path, relations: RelationSet) -> DataFiles:
    """The evaluation file (its first `eval.max_docs` documents, or `eval.indices`) and, when asked, the train /
    tune split."""
    eval_path = expand_path(cfg.eval.docs, "eval.docs")
    docs = load_documents(eval_path, relations)
    require_labels(docs, eval_path, "compare scores every row")
    if cfg.eval.max_docs is not None:
        docs = docs[: cfg.eval.max_docs]
    if cfg.eval.indices is not None:
        bad = [i for i in cfg.eval.indices if not 0 <= i < len(docs)]
        if bad:
            raise LmrcError(f"eval.indices: {bad[0]} is out of range ({eval_path} has {len(docs)} documents)")
        docs = [docs[i] for i in cfg.eval.indices]
    files = DataFiles(write_if_changed(out / "data" / "eval.json", docs))
    if cfg.data.train is None:
        return files
    train, tune = _split(cfg, relations)
    return DataFiles(
        files.eval,
        write_if_changed(out / "data" / "train.json", train),
        write_if_changed(out / "data" / "tune.json", tune) if tune is not None else None,
    )


def _split(cfg: CompareConfig, relations: RelationSet) -> tuple[list[Document], list[Document] | None]:
    """`data.train`'s documents (`data.max_docs` of them after a seeded shuffle, in file order) cut into training
    and tuning documents (None: `data.tune_fraction` is 0)."""
    docs = load_documents(expand_path(cfg.data.train, "data.train"), relations)  # type: ignore[arg-type]
    if cfg.data.max_docs is not None:
        order = list(range(len(docs)))
        random.Random(cfg.data.seed).shuffle(order)
        docs = [docs[i] for i in sorted(order[: cfg.data.max_docs])]
    if cfg.data.tune_fraction == 0:
        return docs, None
    ratios = (1 - cfg.data.tune_fraction, cfg.data.tune_fraction)
    part_train, part_tune = split_indices(len(docs), ratios, cfg.data.seed)
    return [docs[i] for i in part_train], [docs[i] for i in part_tune]
