"""Stage-1 checkpoints: a folder that rebuilds the trained model with no hub access.

A checkpoint folder holds::

    model.safetensors    Stage1Model weights (encoder included)
    encoder/             the encoder's config.json and tokenizer files (the encoder is rebuilt from this config)
    stage1.json          model shape, loss name + parameters (amtl's relation_counts included), relation set,
                         what the weights were selected on
    config.yaml          the resolved training config
    calibration.json     optional: the recall-target threshold computed by `lmrc stage1 predict`

The training run's `last/` folder is a checkpoint plus what `--resume` needs (lmrc.training.run_folder.ResumeState:
optimizer, scheduler, every process's RNG states, the trainer's position in `trainer_state.json`). Folders are
written under a temporary name and swapped in, so an interruption leaves the previous version intact. Nothing
here unpickles: tensors go through safetensors, the rest is JSON.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModel, AutoTokenizer

from lmrc import __version__
from lmrc.config import from_dict, read_yaml, save_config
from lmrc.data.relations import RelationSet
from lmrc.errors import LmrcError
from lmrc.io import atomic_write_json, read_json
from lmrc.stage1.config import Stage1Config
from lmrc.stage1.features import SpecialTokens, special_tokens
from lmrc.stage1.losses import LOSSES, build_loss
from lmrc.stage1.model import Stage1Model
from lmrc.training.run_folder import (
    ResumeState,
    jsonable,
    publish,
    read_resume_state,
    restore_rng,
    write_resume_state,
)

log = logging.getLogger(__name__)

FORMAT = "lmrc-stage1-checkpoint"
VERSION = 1
META_FILE = "stage1.json"
WEIGHTS_FILE = "model.safetensors"
ENCODER_DIR = "encoder"
CONFIG_FILE = "config.yaml"
CALIBRATION_FILE = "calibration.json"
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


def model_arguments(config: Stage1Config, num_logits: int, tokenizer) -> dict[str, Any]:
    """Stage1Model arguments besides the encoder, as JSON (stored in stage1.json to rebuild the model)."""
    name = config.loss.name
    specials = special_tokens(tokenizer)
    return {
        "num_logits": num_logits,
        "emb_size": config.model.emb_size,
        "block_size": config.model.block_size,
        "bilinear": config.model.resolved_bilinear(name),
        "n_layers_avg": config.model.resolved_layers(name),
        # MD-RE: three discriminators, each its own classifier on the shared pair representation (Sec. 3.3).
        "n_classifiers": 3 if name == "mdre" else 1,
        "window": config.model.window,
        "specials": {"start": list(specials.start), "end": list(specials.end), "sep": list(specials.sep)},
        "separate_extractors": config.model.separate_extractors,
    }


def build_model(encoder, kwargs: dict[str, Any]) -> Stage1Model:
    """Stage1Model from the JSON arguments of `model_arguments` (as stored in stage1.json)."""
    kwargs = dict(kwargs)
    sp = kwargs.pop("specials", None)
    specials = None if sp is None else SpecialTokens(tuple(sp["start"]), tuple(sp["end"]), tuple(sp["sep"]))
    return Stage1Model(encoder, specials=specials, **kwargs)


def save_checkpoint(
    path: str | os.PathLike,
    model: torch.nn.Module,
    tokenizer: Any,
    config: Stage1Config,
    relations: RelationSet,
    loss_params: dict[str, Any],
    model_kwargs: dict[str, Any],
    selection: dict[str, Any] | None = None,
    state: ResumeState | None = None,
) -> Path:
    """Write a complete checkpoint folder atomically (a temporary folder swapped in); with `state`, the folder
    also holds what `--resume` needs (the training run's `last/`).

    `model_kwargs` are the Stage1Model constructor arguments besides the encoder (see `model_arguments`).
    """
    path = Path(path)
    encoder = model.encoder
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "encoder": encoder_record(encoder.config, config.model.encoder),
        "model": dict(model_kwargs),
        "features": {"max_length": config.model.max_length},
        "loss": {"name": config.loss.name, "params": jsonable(loss_params, "loss.params")},
        "relations": {"ids": list(relations.ids), "names": dict(relations.names)},
        "selection": selection or {},
        "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": _versions(),
    }

    def write(folder: Path) -> None:
        weights = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
        save_file(weights, str(folder / WEIGHTS_FILE), metadata={"format": FORMAT})
        encoder.config.save_pretrained(folder / ENCODER_DIR)
        tokenizer.save_pretrained(folder / ENCODER_DIR)
        save_config(config, folder / CONFIG_FILE)
        atomic_write_json(folder / META_FILE, meta, indent=1)
        if state is not None:
            write_resume_state(folder, state)

    publish(path, write)
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
    meta = _read_meta(meta_path)
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
    encoder_config = _load_encoder_config(encoder_dir, recorded)
    tokenizer = _load_tokenizer(encoder_dir)
    try:
        model = build_model(_build_encoder(encoder_config), model_kwargs)
    except TypeError as exc:
        raise LmrcError(f"{meta_path}: model: {exc}") from None
    _load_weights(model, path / WEIGHTS_FILE, encoder_dir)
    model.to(device).eval()
    cfg_path = path / CONFIG_FILE
    config = from_dict(Stage1Config, read_yaml(cfg_path), str(cfg_path))
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
        calibration=read_calibration(path),
    )


def _read_meta(meta_path: Path) -> dict[str, Any]:
    meta = read_json(meta_path)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise LmrcError(f'{meta_path}: not an lmrc stage-1 checkpoint (expected "format": "{FORMAT}")')
    if meta.get("version") != VERSION:
        raise LmrcError(
            f"{meta_path}: unsupported checkpoint version {meta.get('version')!r} (this lmrc reads {VERSION})"
        )
    return meta


def _head_loss(meta_path: Path, loss_name: str, loss_params: dict[str, Any], head_params: dict | None):
    """The checkpoint's loss (its head) with the prediction-time `head_params` applied; `loss_params` is
    updated in place, so the checkpoint records what was used."""
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


def restore_training_state(
    last_dir: Path, model: torch.nn.Module, optimizer, scheduler, scaler, rank: int
) -> dict[str, Any]:
    """Load the training run's `last/` into the (unwrapped) model, optimizer, scheduler and fp16 loss scaler
    (None without fp16), restore this process's RNG states, and return the saved position."""
    state = read_resume_state(last_dir)
    model.load_state_dict(load_file(str(last_dir / WEIGHTS_FILE)), strict=True)
    optimizer.load_state_dict(state.optimizer)
    scheduler.load_state_dict(state.scheduler)
    if scaler is not None and state.scaler is not None:
        scaler.load_state_dict(state.scaler)
    elif scaler is not None:
        log.warning("%s: no loss-scaler state saved (an older run); the fp16 scale restarts", last_dir)
    if rank >= len(state.rng):
        raise LmrcError(f"{last_dir}: saved with {len(state.rng)} processes, cannot resume on more")
    restore_rng(state.rng[rank])
    return state.position


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


# ---------------------------------------------------------------------------------------------------- helpers


def _load_encoder_config(encoder_dir: Path, recorded: dict[str, Any]):
    """The encoder config in `encoder/`, checked against the shapes stage1.json recorded for the weights."""
    config_path = encoder_dir / "config.json"
    if not config_path.is_file():
        raise LmrcError(f"{config_path}: file not found (the checkpoint's encoder config)")
    try:
        encoder_config = AutoConfig.from_pretrained(str(encoder_dir), trust_remote_code=False)
    except (OSError, ValueError, KeyError) as exc:
        raise LmrcError(f"{config_path}: cannot read the encoder config: {exc}") from None
    for key in _SHAPE_FIELDS:
        if recorded.get(key) is not None and getattr(encoder_config, key, None) != recorded[key]:
            raise LmrcError(
                f"{config_path}: encoder config does not match the checkpoint's weights "
                f"({key} = {getattr(encoder_config, key, None)!r}, the model was trained with {recorded[key]!r})"
            )
    return encoder_config


def _build_encoder(encoder_config):
    """The encoder as `lmrc.stage1.encoder.load_encoder` builds it (eager attention, no pooler), untrained."""
    encoder = AutoModel.from_config(encoder_config, attn_implementation="eager", trust_remote_code=False)
    if getattr(encoder, "pooler", None) is not None:
        encoder.pooler = None
    return encoder


def _load_tokenizer(encoder_dir: Path):
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


def _versions() -> dict[str, str]:
    return {"lmrc": __version__, "torch": torch.__version__, "transformers": transformers.__version__}
