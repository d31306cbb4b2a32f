"""Shared by the stage-1 training / prediction tests: a tiny random BERT with the real MiniLM tokenizer, a few
short real documents written to files, and configs that train on them in about a second."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import minilm_dir

from lmrc.data.docred import Document, document_to_raw
from lmrc.stage1.config import Stage1Config, load_stage1_config


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """One torch thread: on a shared 2-core machine, tiny models run ~100x slower with 2 contending threads."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def save_tiny_bert(folder: Path, dropout: float = 0.1, layers: int = 2, hidden: int = 32) -> Path:
    """A random 2-layer, 32-d BERT on MiniLM's vocabulary, saved with MiniLM's tokenizer."""
    MINILM = minilm_dir()
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    tokenizer = AutoTokenizer.from_pretrained(MINILM)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=2 * hidden,
        max_position_embeddings=512,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def shortest(docs: list[Document], n: int) -> list[Document]:
    """The n shortest documents that have at least one fact (fast to encode, and something to learn)."""
    labelled = [d for d in docs if d.facts]
    return sorted(labelled, key=lambda d: (len(d.words), d.index))[:n]


def write_docs(path: Path, docs: list[Document], labels: bool = True) -> Path:
    raws = []
    for d in docs:
        raw = document_to_raw(d)
        if not labels:
            raw.pop("labels", None)
        raws.append(raw)
    path.write_text(json.dumps(raws), encoding="utf-8")
    return path


def one_entity_doc(doc: Document) -> dict:
    """A real document cut down to its first entity (no pairs at all)."""
    raw = document_to_raw(doc)
    raw["title"] = raw["title"] + " (one entity)"
    raw["vertexSet"] = raw["vertexSet"][:1]
    raw["labels"] = []
    return raw


def tiny_config(
    encoder: Path, train: Path, tune: Path | None, rel_info: Path, out: Path, *overrides: str
) -> Stage1Config:
    base = [
        f"model.encoder={encoder}",
        "model.emb_size=64",
        "model.block_size=16",
        f"data.train={train}",
        f"data.tune={tune if tune is not None else 'null'}",
        f"data.rel_info={rel_info}",
        "train.epochs=2",
        "train.batch_size=2",
        "train.lr_encoder=1e-3",
        "train.lr_head=1e-3",
        "train.log_every_steps=0",
        "train.mixed_precision=no",  # float32: the tests recompute losses and scores in float32
        f"output_dir={out}",
    ]
    return load_stage1_config(None, base + list(overrides))


def train_roberta_tokenizer(docs: list[Document]):
    """A byte-level BPE (vocab 600) trained here on the documents' text, wrapped as a RoBERTa tokenizer."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import RobertaTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        [d.text() for d in docs],
        vocab_size=600,
        special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
        show_progress=False,
    )
    return RobertaTokenizerFast(tokenizer_object=bpe._tokenizer)
