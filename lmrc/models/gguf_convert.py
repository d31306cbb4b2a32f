"""GGUF -> a plain Hugging Face folder: dequantised float32 weights that reproduce the GGUF model's logits.

transformers reads GGUF files with the `gguf` package (`from_pretrained(dir, gguf_file=...)`); under transformers 5
the loaded model is rebuilt from its config and state dict, so that it trains and saves as any plain model.
lmrc.models.gguf decides when to convert and where the result goes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from lmrc.errors import LmrcError


def convert_gguf(gguf: Path, out_dir: Path) -> None:
    """Write a plain float32 Llama checkpoint, tokenizer and generation config for a GGUF file to `out_dir`.

    transformers' GGUF loader dequantises the weights but leaves the model flagged as GGUF-quantised (it then
    refuses training and `save_pretrained`), so the weights are moved into a fresh model built from the config.
    """
    gguf = Path(gguf)
    config, state, buffers = _dequantised(gguf)
    plain = _plain_model(config, state, buffers, gguf)
    tokenizer = _gguf_tokenizer(gguf, config)
    plain.config.pad_token_id = tokenizer.pad_token_id
    plain.config.eos_token_id = tokenizer.eos_token_id
    if tokenizer.bos_token_id is not None:
        plain.config.bos_token_id = tokenizer.bos_token_id
    plain.generation_config = GenerationConfig(
        bos_token_id=plain.config.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    plain.save_pretrained(Path(out_dir))
    tokenizer.save_pretrained(Path(out_dir))


def _dequantised(gguf: Path) -> tuple[Any, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The model's plain config (quantisation removed), its float32 state dict and its buffers."""
    quantised = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config_dict = quantised.config.to_dict()
    config_dict.pop("quantization_config", None)
    for key in ("_name_or_path", "_model_name_or_path", "transformers_version"):
        config_dict.pop(key, None)
    config_dict["dtype"] = "float32"
    if isinstance(config_dict.get("rms_norm_eps"), float):
        # GGUF stores it as float32 (9.9999997e-06); 7 significant digits give back the release's 1e-05.
        config_dict["rms_norm_eps"] = float(f"{config_dict['rms_norm_eps']:.7g}")
    model_type = config_dict.pop("model_type")
    config = AutoConfig.for_model(model_type, **config_dict)
    state = quantised.state_dict()
    # Non-persistent buffers (e.g. rotary inv_freq) are not in the state dict; the meta-built model needs them.
    buffers = dict(quantised.named_buffers())
    return config, state, buffers


def _plain_model(config: Any, state: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor], gguf: Path):
    """A fresh model of `config` holding `state` and `buffers`, in eval mode."""
    # Built on the meta device: random initialisation of 135M parameters would cost seconds for nothing.
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    if tied:
        # With tied embeddings the GGUF stores one matrix; the lm_head entry is that same tensor.
        state.pop("lm_head.weight", None)
    result = plain.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in result.missing_keys if not (tied and k == "lm_head.weight")]
    if missing or result.unexpected_keys:
        raise LmrcError(
            f"{gguf}: cannot rebuild a plain model from the GGUF weights "
            f"(missing {missing[:5]}, unexpected {result.unexpected_keys[:5]})"
        )
    for qualified, tensor in list(plain.named_buffers()):
        if tensor.is_meta and qualified in buffers:
            owner, _, leaf = qualified.rpartition(".")
            plain.get_submodule(owner)._buffers[leaf] = buffers[qualified]
    if tied:
        plain.tie_weights()
    meta = [n for n, p in list(plain.named_parameters()) + list(plain.named_buffers()) if p.is_meta]
    if meta:
        raise LmrcError(f"{gguf}: these tensors were not filled from the GGUF file: {meta[:5]}")
    plain.eval()
    return plain


def _gguf_tokenizer(gguf: Path, config: Any):
    """The GGUF file's tokenizer, with a pad token and the model's context window as its length limit."""
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if tokenizer.eos_token is None:
        raise LmrcError(f"{gguf}: the GGUF tokenizer has no end-of-sequence token")
    if tokenizer.pad_token is None:
        # Same choice as the upstream SmolLM2 release (pad = <|im_end|>): adding a new token would resize the
        # embeddings. Training code must therefore mask labels by attention mask, not by pad id.
        tokenizer.pad_token = tokenizer.eos_token
    if not tokenizer.chat_template:
        raise LmrcError(f"{gguf}: the GGUF file carries no chat template")
    # The GGUF tokenizer has no length limit; the model's context window is the honest one.
    tokenizer.model_max_length = config.max_position_embeddings
    return tokenizer


def library_versions() -> dict[str, str]:
    """The transformers and torch that wrote a conversion (recorded in its provenance)."""
    return {"transformers_version": transformers.__version__, "torch_version": torch.__version__}
