"""GGUF -> a plain Hugging Face folder: dequantised float32 weights that reproduce the GGUF model's logits.

transformers reads GGUF files with the `gguf` package (`from_pretrained(dir, gguf_file=...)`); under transformers 5
the loaded model is rebuilt from its config and state dict, so that it trains and saves as any plain model.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import shutil
import time
from pathlib import Path

from lmrc.errors import LmrcError
from lmrc.io import atomic_write_json, file_sha256, write_dir_atomically

logger = logging.getLogger(__name__)

# Bump when the conversion itself changes, so every cached conversion is rebuilt once.
CONVERSION_FORMAT = 1
PROVENANCE_FILE = "lmrc_provenance.json"


def _source_stamp(gguf: Path) -> dict:
    """Cheap identity of the GGUF file (checked on every resolve); the sha256 is recorded at conversion."""
    st = gguf.stat()
    return {"path": str(gguf.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _transformers_major() -> str:
    """Read from the package metadata: importing transformers just to compare versions costs seconds."""
    return importlib.metadata.version("transformers").split(".")[0]


def is_current(target: Path, gguf: Path) -> bool:
    """The conversion exists, came from this very GGUF file, and was written by a compatible transformers.

    Only the transformers major version triggers a rebuild: the saved folder format is stable within one.
    """
    record_path = target / PROVENANCE_FILE
    if not record_path.is_file():
        return False
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    stamp = _source_stamp(gguf)
    source = record.get("source", {})
    return (
        record.get("format") == CONVERSION_FORMAT
        and all(source.get(k) == stamp[k] for k in ("path", "size", "mtime_ns"))
        and str(record.get("transformers_version", "")).split(".")[0] == _transformers_major()
        and (target / "model.safetensors").is_file()
        and (target / "config.json").is_file()
    )


def convert_gguf(gguf: Path, out_dir: Path) -> None:
    """Write a plain float32 Llama checkpoint, tokenizer and generation config for a GGUF file to `out_dir`.

    transformers' GGUF loader dequantises the weights but leaves the model flagged as GGUF-quantised (it then
    refuses training and `save_pretrained`), so the weights are moved into a fresh model built from the config.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    gguf = Path(gguf)
    out_dir = Path(out_dir)
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
    del quantised

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
    _check_no_meta(plain, gguf)
    plain.eval()

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

    plain.config.pad_token_id = tokenizer.pad_token_id
    plain.config.eos_token_id = tokenizer.eos_token_id
    if tokenizer.bos_token_id is not None:
        plain.config.bos_token_id = tokenizer.bos_token_id
    plain.generation_config = GenerationConfig(
        bos_token_id=plain.config.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    plain.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def _write_provenance(folder: Path, gguf: Path) -> None:
    """Record where the conversion came from, so `is_current` can tell a stale one."""
    import torch
    import transformers

    atomic_write_json(
        folder / PROVENANCE_FILE,
        {
            "format": CONVERSION_FORMAT,
            "source": {**_source_stamp(gguf), "sha256": file_sha256(gguf)},
            "dtype": "float32",
            "transformers_version": transformers.__version__,
            "torch_version": torch.__version__,
            "converted_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        },
        indent=2,
    )


def _check_no_meta(model, gguf: Path) -> None:
    meta = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.is_meta]
    if meta:
        raise LmrcError(f"{gguf}: these tensors were not filled from the GGUF file: {meta[:5]}")


def ensure_converted(gguf: Path, target: Path, name: str) -> Path:
    """`target` holds the GGUF file converted to a plain HF folder: converted once (under a file lock, so that
    concurrent processes wait for one conversion instead of each converting), reconverted when the source or the
    conversion changed."""
    from filelock import FileLock

    if is_current(target, gguf):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(target.parent / f".{name}.lock"):
        if is_current(target, gguf):  # another process finished the conversion while we waited
            return target
        # Only the lock holder makes temporary folders, so any found now were left by a killed process.
        for leftover in target.parent.glob(f".{target.name}.*.tmp"):
            shutil.rmtree(leftover, ignore_errors=True)
        logger.info("converting %s to a Hugging Face folder in %s (once)", gguf, target)
        start = time.perf_counter()

        def write(folder: Path) -> None:
            convert_gguf(gguf, folder)
            _write_provenance(folder, gguf)

        write_dir_atomically(target, write)
        logger.info("converted %s in %.1f s", name, time.perf_counter() - start)
    return target
