"""Stage-1 checkpoints: a folder that rebuilds the trained model with no hub access, and the resumable state.

A checkpoint folder holds::

    model.safetensors    Stage1Model weights (encoder included)
    encoder/             the encoder's config.json and tokenizer files (the encoder is rebuilt from this config)
    stage1.json          model shape, loss name + parameters (amtl's relation_counts included), relation set,
                         what the weights were selected on
    config.yaml          the resolved training config
    calibration.json     optional: the recall-target threshold computed by `lmrc stage1 predict`

The training run's `last/` folder is a checkpoint plus what `--resume` needs: optimizer tensors
(`optimizer.safetensors` + `optimizer.json`), scheduler state, every process's RNG states and the trainer's
position (`trainer_state.json`). Folders are written under a temporary name and swapped in, so an interruption
leaves the previous version intact. Nothing here unpickles: tensors go through safetensors, the rest is JSON.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from lmrc.config import from_dict, read_yaml, save_config, to_dict
from lmrc.data.relations import RelationSet
from lmrc.errors import LmrcError
from lmrc.io import atomic_write_json, read_json, write_dir_atomically
from lmrc.stage1.config import Stage1Config

log = logging.getLogger(__name__)

FORMAT = "lmrc-stage1-checkpoint"
VERSION = 1
META_FILE = "stage1.json"
WEIGHTS_FILE = "model.safetensors"
ENCODER_DIR = "encoder"
CONFIG_FILE = "config.yaml"
CALIBRATION_FILE = "calibration.json"
STATE_FILE = "trainer_state.json"
# Encoder config fields that decide the shapes of the weights; checked against stage1.json on load.
_SHAPE_FIELDS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")


@dataclass
class Checkpoint:
    """A loaded checkpoint: everything prediction needs."""

    path: Path
    model: torch.nn.Module  # Stage1Model, in eval mode, on the CPU
    tokenizer: Any
    loss: torch.nn.Module
    loss_name: str
    loss_params: dict[str, Any]
    relations: RelationSet
    config: Stage1Config
    meta: dict[str, Any]
    calibration: dict[str, Any] | None

    @property
    def max_length(self) -> int | None:
        return self.meta.get("features", {}).get("max_length")


def encoder_record(encoder_config: Any, name: str) -> dict[str, Any]:
    record = {"name": name}
    for key in _SHAPE_FIELDS:
        record[key] = getattr(encoder_config, key, None)
    return record


def save_checkpoint(
    path: str | os.PathLike,
    model: torch.nn.Module,
    tokenizer: Any,
    config: Stage1Config,
    relations: RelationSet,
    loss_name: str,
    loss_params: dict[str, Any],
    model_kwargs: dict[str, Any],
    max_length: int | None = None,
    selection: dict[str, Any] | None = None,
    extra_files: dict[str, Any] | None = None,
) -> Path:
    """Write a complete checkpoint folder atomically (a temporary folder swapped in).

    `model_kwargs` are the Stage1Model constructor arguments besides the encoder; `extra_files` maps file
    names to callables `fn(folder)` that add files (the training state of `last/`) before the swap.
    """
    path = Path(path)
    encoder = model.encoder
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "encoder": encoder_record(encoder.config, config.model.encoder),
        "model": dict(model_kwargs),
        "features": {"max_length": max_length},
        "loss": {"name": loss_name, "params": _jsonable(loss_params, "loss.params")},
        "relations": {"ids": list(relations.ids), "names": dict(relations.names)},
        "selection": selection or {},
        "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": _versions(),
    }

    def write(folder: Path) -> None:
        state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(folder / WEIGHTS_FILE), metadata={"format": FORMAT})
        encoder.config.save_pretrained(folder / ENCODER_DIR)
        tokenizer.save_pretrained(folder / ENCODER_DIR)
        save_config(config, folder / CONFIG_FILE)
        atomic_write_json(folder / META_FILE, meta, indent=1)
        for fn in (extra_files or {}).values():
            fn(folder)

    write_dir_atomically(path, write)
    return path


# Head parameters that only change prediction, so a trained checkpoint may be predicted with other values
# (AMTL's combined/raw thresholds, MD-RE's fusion alpha, ATLOP's top-k, the BCE probability cut).
INFERENCE_PARAMS = {
    "amtl": ("threshold_mode",),
    "mdre": ("alpha",),
    "atl": ("top_k",),
    "atgl": ("top_k",),
    "atsl": ("top_k",),
    "bce": ("threshold",),
}


def load_checkpoint(
    path: str | os.PathLike, device: str | torch.device = "cpu", head_params: dict[str, Any] | None = None
) -> Checkpoint:
    """Rebuild the model from the saved encoder config (AutoModel.from_config: no hub access) and weights.

    `head_params` overrides prediction-only head parameters (INFERENCE_PARAMS), e.g. {"threshold_mode": "raw"}.

    Refuses, with one line naming the file, a folder that is not a checkpoint, a loss this lmrc does not know,
    and weights that do not fit the encoder config (e.g. `encoder/` taken from another model).
    """
    path = resolve_checkpoint_dir(path)
    meta_path = path / META_FILE
    meta = read_json(meta_path)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise LmrcError(f'{meta_path}: not an lmrc stage-1 checkpoint (expected "format": "{FORMAT}")')
    if meta.get("version") != VERSION:
        raise LmrcError(
            f"{meta_path}: unsupported checkpoint version {meta.get('version')!r} (this lmrc reads {VERSION})"
        )
    try:
        loss_name = meta["loss"]["name"]
        loss_params = dict(meta["loss"]["params"])
        rel_ids = tuple(meta["relations"]["ids"])
        relations = RelationSet(ids=rel_ids, names={r: meta["relations"]["names"][r] for r in rel_ids})
        model_kwargs = dict(meta["model"])
        recorded = dict(meta["encoder"])
    except (KeyError, TypeError) as exc:
        raise LmrcError(f"{meta_path}: missing or malformed field {exc}") from None
    loss = _head_loss(meta_path, loss_name, loss_params, head_params)

    encoder_dir = path / ENCODER_DIR
    encoder_config = _load_encoder_config(encoder_dir)
    for key in _SHAPE_FIELDS:
        if recorded.get(key) is not None and getattr(encoder_config, key, None) != recorded[key]:
            raise LmrcError(
                f"{encoder_dir / 'config.json'}: encoder config does not match the checkpoint's weights "
                f"({key} = {getattr(encoder_config, key, None)!r}, the model was trained with {recorded[key]!r})"
            )
    encoder = _build_encoder(encoder_config)
    tokenizer = _load_tokenizer(encoder_dir)
    try:
        model = build_model(encoder, model_kwargs)
    except TypeError as exc:
        raise LmrcError(f"{meta_path}: model: {exc}") from None
    _load_weights(model, path / WEIGHTS_FILE, encoder_dir)
    model.to(device).eval()

    cfg_path = path / CONFIG_FILE
    config = from_dict(Stage1Config, read_yaml(cfg_path), str(cfg_path))
    calibration = read_calibration(path)
    return Checkpoint(
        path=path,
        model=model,
        tokenizer=tokenizer,
        loss=loss,
        loss_name=loss_name,
        loss_params=loss_params,
        relations=relations,
        config=config,
        meta=meta,
        calibration=calibration,
    )


def _head_loss(meta_path: Path, loss_name: str, loss_params: dict[str, Any], head_params: dict | None):
    """The checkpoint's loss (its head) with the prediction-time `head_params` applied; `loss_params` is
    updated in place, so the checkpoint records what was used."""
    from lmrc.stage1.losses import LOSSES, build_loss

    if loss_name not in LOSSES:
        raise LmrcError(
            f"{meta_path}: loss.name: unknown loss {loss_name!r} (known: {', '.join(sorted(LOSSES))})"
        )
    for key, value in (head_params or {}).items():
        if key not in INFERENCE_PARAMS.get(loss_name, ()):
            allowed = ", ".join(INFERENCE_PARAMS.get(loss_name, ())) or "none"
            raise LmrcError(
                f"--head-param {key}: not a prediction-time parameter of the {loss_name!r} head (allowed: {allowed})"
            )
        loss_params[key] = value
    try:
        return build_loss(loss_name, **loss_params)
    except LmrcError as exc:
        raise LmrcError(f"{meta_path}: loss.params: {exc}") from None


def _load_weights(model, weights_path: Path, encoder_dir: Path) -> None:
    if not weights_path.is_file():
        raise LmrcError(f"{weights_path}: file not found")
    try:
        state = load_file(str(weights_path))
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise LmrcError(f"{weights_path}: cannot read weights: {exc}") from None
    _check_state_matches(model, state, weights_path, encoder_dir)
    model.load_state_dict(state, strict=True)


def build_model(encoder, kwargs: dict[str, Any]):
    """Stage1Model from the JSON arguments of `lmrc.stage1.train.model_kwargs` (as stored in stage1.json)."""
    from lmrc.stage1.features import SpecialTokens
    from lmrc.stage1.model import Stage1Model

    kwargs = dict(kwargs)
    sp = kwargs.pop("specials", None)
    specials = None if sp is None else SpecialTokens(tuple(sp["start"]), tuple(sp["end"]), tuple(sp["sep"]))
    return Stage1Model(encoder, specials=specials, **kwargs)


def resolve_checkpoint_dir(path: str | os.PathLike) -> Path:
    """A checkpoint folder, or a training output folder (its `best/` checkpoint is used)."""
    path = Path(path)
    if (path / META_FILE).is_file():
        return path
    if (path / "best" / META_FILE).is_file():
        return path / "best"
    if not path.exists():
        raise LmrcError(f"{path}: checkpoint folder not found")
    raise LmrcError(f"{path}: not a stage-1 checkpoint (no {META_FILE}, nor best/{META_FILE})")


def read_calibration(path: Path) -> dict[str, Any] | None:
    cal_path = Path(path) / CALIBRATION_FILE
    if not cal_path.is_file():
        return None
    cal = read_json(cal_path)
    if not isinstance(cal, dict) or not isinstance(cal.get("threshold"), (int, float)):
        raise LmrcError(f"{cal_path}: expected an object with a numeric 'threshold'")
    return cal


def write_calibration(path: Path, calibration: dict[str, Any]) -> None:
    try:
        atomic_write_json(Path(path) / CALIBRATION_FILE, calibration, indent=1)
    except OSError as exc:
        raise LmrcError(f"{Path(path) / CALIBRATION_FILE}: cannot write the calibration: {exc}") from None


# ------------------------------------------------------------------------------------------ training state


@dataclass
class TrainingState:
    """What `--resume` restores besides the weights (see train.py for the meaning of the counters)."""

    trainer: dict[str, Any]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    rng: list[dict[str, Any]]  # one per process
    # fp16 on CUDA: the loss scaler's scale and growth tracker (a fresh scaler would restart at 2**16 and skip
    # steps on overflow until it has shrunk again, so the resumed run would differ). None without fp16.
    scaler: dict[str, Any] | None = None


def training_state_writer(state: TrainingState):
    """A `save_checkpoint(extra_files=...)` callable that writes the resumable state into the folder."""

    def write(folder: Path) -> None:
        tensors, opt_json = _split_optimizer_state(state.optimizer)
        save_file(tensors, str(folder / "optimizer.safetensors"))
        atomic_write_json(folder / "optimizer.json", opt_json)
        atomic_write_json(folder / "scheduler.json", _jsonable(state.scheduler, "scheduler"))
        rng_tensors, rng_json = {}, []
        for rank, rng in enumerate(state.rng):
            rng_tensors[f"{rank}.torch"] = rng["torch"]
            for i, cuda_state in enumerate(rng.get("cuda", [])):
                rng_tensors[f"{rank}.cuda.{i}"] = cuda_state
            rng_json.append(
                {"python": rng["python"], "numpy": rng["numpy"], "n_cuda": len(rng.get("cuda", []))}
            )
        save_file(rng_tensors, str(folder / "rng.safetensors"))
        atomic_write_json(folder / "rng.json", rng_json)
        if state.scaler is not None:
            atomic_write_json(folder / "scaler.json", _jsonable(state.scaler, "scaler"))
        atomic_write_json(folder / STATE_FILE, state.trainer, indent=1)

    return write


def load_training_state(path: Path) -> TrainingState:
    path = Path(path)
    for name in (STATE_FILE, "optimizer.json", "optimizer.safetensors", "scheduler.json", "rng.json"):
        if not (path / name).is_file():
            raise LmrcError(f"{path / name}: missing; {path} is not a resumable training state")
    trainer = read_json(path / STATE_FILE)
    optimizer = _join_optimizer_state(
        load_file(str(path / "optimizer.safetensors")), read_json(path / "optimizer.json")
    )
    scheduler = read_json(path / "scheduler.json")
    rng_tensors = load_file(str(path / "rng.safetensors"))
    rng = []
    for rank, item in enumerate(read_json(path / "rng.json")):
        rng.append(
            {
                "python": item["python"],
                "numpy": item["numpy"],
                "torch": rng_tensors[f"{rank}.torch"],
                "cuda": [rng_tensors[f"{rank}.cuda.{i}"] for i in range(item["n_cuda"])],
            }
        )
    scaler = read_json(path / "scaler.json") if (path / "scaler.json").is_file() else None
    return TrainingState(trainer=trainer, optimizer=optimizer, scheduler=scheduler, rng=rng, scaler=scaler)


# ---------------------------------------------------------------------------------------------------- helpers


def _load_encoder_config(encoder_dir: Path):
    from transformers import AutoConfig

    if not (encoder_dir / "config.json").is_file():
        raise LmrcError(f"{encoder_dir / 'config.json'}: file not found (the checkpoint's encoder config)")
    try:
        return AutoConfig.from_pretrained(str(encoder_dir), trust_remote_code=False)
    except (OSError, ValueError, KeyError) as exc:
        raise LmrcError(f"{encoder_dir / 'config.json'}: cannot read the encoder config: {exc}") from None


def _build_encoder(encoder_config):
    """The encoder as `lmrc.stage1.encoder.load_encoder` builds it (eager attention, no pooler), untrained."""
    from transformers import AutoModel

    encoder = AutoModel.from_config(encoder_config, attn_implementation="eager", trust_remote_code=False)
    if getattr(encoder, "pooler", None) is not None:
        encoder.pooler = None
    return encoder


def _load_tokenizer(encoder_dir: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(encoder_dir), trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise LmrcError(f"{encoder_dir}: cannot load the tokenizer: {exc}") from None


def _check_state_matches(
    model: torch.nn.Module, state: dict[str, torch.Tensor], weights: Path, enc: Path
) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if not (missing or unexpected or wrong):
        return
    if wrong:
        k = wrong[0]
        detail = f"{k} has shape {list(state[k].shape)}, the config gives {list(expected[k].shape)}"
    elif missing:
        detail = f"{len(missing)} tensors missing, e.g. {missing[0]}"
    else:
        detail = f"{len(unexpected)} unexpected tensors, e.g. {unexpected[0]}"
    raise LmrcError(f"{weights}: weights do not match the encoder config in {enc / 'config.json'} ({detail})")


def _split_optimizer_state(sd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """torch optimizer state_dict -> (tensors for safetensors, the JSON rest)."""
    tensors: dict[str, torch.Tensor] = {}
    state_json: dict[str, dict[str, Any]] = {}
    for pid, entries in sd["state"].items():
        state_json[str(pid)] = {}
        for key, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"{pid}.{key}"] = value.detach().to("cpu").contiguous()
                state_json[str(pid)][key] = {"tensor": f"{pid}.{key}"}
            else:
                state_json[str(pid)][key] = {"value": value}
    return tensors, {
        "state": state_json,
        "param_groups": _jsonable(sd["param_groups"], "optimizer.param_groups"),
    }


def _join_optimizer_state(tensors: dict[str, torch.Tensor], data: dict[str, Any]) -> dict[str, Any]:
    state = {}
    for pid, entries in data["state"].items():
        state[int(pid)] = {
            k: tensors[v["tensor"]] if "tensor" in v else v["value"] for k, v in entries.items()
        }
    return {"state": state, "param_groups": data["param_groups"]}


def _jsonable(value: Any, where: str) -> Any:
    """Lists/dicts/numbers/strings only (tuples become lists); anything else is a programming error."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if dataclasses.is_dataclass(value):
        return _jsonable(to_dict(value), where)
    if torch.is_tensor(value) and value.numel() == 1:
        return value.item()
    raise TypeError(f"{where}: cannot store {type(value).__name__} as JSON")


def _versions() -> dict[str, str]:
    import transformers

    from lmrc import __version__

    return {"lmrc": __version__, "torch": torch.__version__, "transformers": transformers.__version__}
