"""Load the stage-2 LLM, its tokenizer and a trained LoRA adapter (shared by train, predict and export).

A trained adapter folder is self-contained: the adapter weights (safetensors), the tokenizer, the resolved config
(`config.yaml`), the prompt template and the relation set it was trained with, so that predicting renders exactly
the prompts the model was trained on.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import snapshot_download
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from lmrc.errors import LmrcError
from lmrc.io import write_dir_atomically
from lmrc.machine.hardware import cpu_bf16_refused, cpu_supports_bf16, cuda_supports_bf16
from lmrc.models.store import resolve
from lmrc.stage2.adapter import check_adapter_weights
from lmrc.stage2.config import Stage2Config, load_stage2_config

log = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
TEMPLATE_FILE = "prompt_template.txt"
RELATIONS_FILE = "rel_info.json"
ADAPTER_CONFIG = "adapter_config.json"


@contextlib.contextmanager
def quiet_peft():
    """peft calls a transformers method deprecated in v5 on every load; the warning is noise for users."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def pick_device() -> Any:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_dtype(name: str, device: Any) -> Any:
    """The torch dtype for `name`; "auto" is bf16 where the hardware runs it natively; else float16 on CUDA GPUs
    (V100, T4: training adds a loss scaler) and float32 on CPUs."""
    if name == "bfloat16" and device.type == "cpu" and (why := cpu_bf16_refused()):
        log.warning("dtype=bfloat16 turned off on this CPU: %s; float32", why)
        return torch.float32
    if name != "auto":
        return getattr(torch, name)
    if device.type == "cuda":
        return torch.bfloat16 if cuda_supports_bf16(device.index) else torch.float16
    return torch.bfloat16 if cpu_supports_bf16() else torch.float32


def resolve_model_path(name: str) -> Path:
    path = resolve(name)
    if path.exists() and not (path / "config.json").is_file():
        raise LmrcError(f"{path}: not a Hugging Face model folder (no config.json) for model {name!r}")
    return path


def prefetch_model(name: str) -> None:
    """Download a Hugging Face hub model that is not cached yet (weights as safetensors, configs, tokenizer), so
    that rank 0 fetches it once while the other ranks wait, instead of every rank fetching it."""
    path = resolve(name)
    if path.exists():
        return
    log.info("downloading %s", name)
    try:
        snapshot_download(
            str(name), allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.jinja"]
        )
    except Exception as exc:  # gated, offline, unknown: the same error as from_pretrained would give, earlier
        raise LmrcError(f"{name}: cannot download the model: {exc}") from None


def load_tokenizer(path: str | Path) -> Any:
    """The tokenizer, with a pad token (eos when it has none: padding is always masked, never learned)."""
    try:
        tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise LmrcError(f"{path}: cannot load the tokenizer: {exc}") from None
    if tok.eos_token_id is None:
        raise LmrcError(f"{path}: the tokenizer has no end-of-sequence token, needed to end the answers")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_base_model(
    cfg: Stage2Config,
    path: Path,
    device: Any,
    training: bool,
    device_index: int = 0,
    dtype: Any = None,
    place: bool = True,
) -> Any:
    """The base causal LM in the configured dtype (or `dtype`); 4-bit NF4 (QLoRA) when `load_in_4bit`, CUDA only.

    `place=False` leaves the weights where they were loaded: the Trainer moves them (DDP) or shards them (FSDP,
    DeepSpeed), and a full copy on every GPU first would defeat the sharding.
    """
    dtype = dtype or resolve_dtype(cfg.dtype, device)
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": False}
    if cfg.load_in_4bit:
        if device.type != "cuda":
            raise LmrcError("load_in_4bit (QLoRA) needs a CUDA GPU; set load_in_4bit: false to train on CPU")
        try:
            import bitsandbytes  # noqa: F401  (optional: only QLoRA needs it)
        except ImportError:
            raise LmrcError("load_in_4bit needs bitsandbytes: pip install 'lmrc[gpu]'") from None

        compute = dtype if dtype in (torch.bfloat16, torch.float16) else torch.float32
        # QLoRA (Dettmers et al., 2023): NF4 storage, double quantisation, 16-bit compute.
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute,
        )
        kwargs["device_map"] = {"": device_index}
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    except (OSError, ValueError) as exc:
        raise LmrcError(f"{path}: cannot load the model: {exc}") from None
    if place and not cfg.load_in_4bit:
        model.to(device)
    if training:
        model.config.use_cache = False
    log.info("loaded %s (%s, %s)", path, str(dtype).replace("torch.", ""), device)
    return model


def wrap_lora(model: Any, cfg: Stage2Config) -> Any:
    """Add fresh LoRA adapters (Hu et al., 2022) to the attention projections (or `lora.target_modules`)."""
    if cfg.load_in_4bit:
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=cfg.train.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    elif cfg.train.gradient_checkpointing:
        # Non-reentrant checkpointing needs no input gradients, so frozen embeddings are fine.
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [m for m in cfg.lora.target_modules if m not in present]
    if missing:
        raise LmrcError(
            f"lora.target_modules: {missing} not found in model {cfg.model!r} "
            f"(its linear layers include: {', '.join(sorted(_linear_names(model)))})"
        )
    lora = LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=list(cfg.lora.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    # peft keeps the adapter weights in float32 over a bf16 base (autocast_adapter_dtype), so AdamW updates
    # are not rounded away.
    with quiet_peft():
        return get_peft_model(model, lora)


def _linear_names(model: Any) -> set[str]:
    return {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


@dataclass
class LoadedAdapter:
    cfg: Stage2Config
    model: Any
    tokenizer: Any
    adapter_dir: Path
    base_path: Path


def check_adapter_dir(adapter_dir: str | Path) -> Path:
    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise LmrcError(f"{adapter_dir}: adapter folder not found (train one with `lmrc stage2 train`)")
    for name in (ADAPTER_CONFIG, CONFIG_FILE):
        if not (adapter_dir / name).is_file():
            raise LmrcError(
                f"{adapter_dir}: not a finished lmrc stage-2 adapter (no {name}); "
                "an interrupted training run continues with `lmrc stage2 train --resume`"
            )
    return adapter_dir


def load_adapter_config(adapter_dir: str | Path, overrides: list[str] | tuple = ()) -> Stage2Config:
    return load_stage2_config(check_adapter_dir(adapter_dir) / CONFIG_FILE, overrides)


def load_adapter(
    adapter_dir: str | Path, cfg: Stage2Config | None = None, device: Any = None, merge: bool = False
) -> LoadedAdapter:
    """Base model + trained LoRA adapter in eval mode; `merge` folds the adapter into the base weights."""
    adapter_dir = check_adapter_dir(adapter_dir)
    check_adapter_weights(adapter_dir)  # a damaged file: one error line, before the base model loads
    cfg = cfg or load_adapter_config(adapter_dir)
    device = device or pick_device()
    base_path = resolve_model_path(cfg.model)
    base = load_base_model(cfg, base_path, device, training=False)
    try:
        with quiet_peft():
            model = PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=False)
    except (OSError, ValueError) as exc:
        raise LmrcError(f"{adapter_dir}: cannot load the LoRA adapter: {exc}") from None
    if merge:
        model = model.merge_and_unload()
    model.eval()
    tokenizer = load_tokenizer(adapter_dir)
    return LoadedAdapter(cfg, model, tokenizer, adapter_dir, base_path)


def export_merged(adapter_dir: str | Path, out_dir: str | Path, dtype: str | None = None) -> Path:
    """Fold the adapter into the base model and save a plain model folder (safetensors + tokenizer) for serving.

    The lmrc files (config, template, relation set) are copied too, so the folder can be passed as `model:`.
    """
    adapter_dir = check_adapter_dir(adapter_dir)
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise LmrcError(f"{out_dir}: output folder exists and is not empty")
    overrides = [f"dtype={dtype}"] if dtype else []
    cfg = load_adapter_config(adapter_dir, overrides)
    if cfg.load_in_4bit:
        # Merging into 4-bit weights would round the adapter away; merge into 16-bit weights instead.
        cfg.load_in_4bit = False
    if resolve_dtype(cfg.dtype, torch.device("cpu")) != torch.float32:
        log.warning(
            "merging into 16-bit weights rounds the adapter's updates; --dtype float32 keeps them exact"
        )
    loaded = load_adapter(adapter_dir, cfg, device=torch.device("cpu"), merge=True)

    def write(folder: Path) -> None:
        loaded.model.save_pretrained(str(folder))
        loaded.tokenizer.save_pretrained(str(folder))
        for name in (CONFIG_FILE, TEMPLATE_FILE, RELATIONS_FILE):
            if (adapter_dir / name).is_file():
                shutil.copyfile(adapter_dir / name, folder / name)

    write_dir_atomically(out_dir, write)
    return out_dir
