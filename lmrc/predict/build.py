"""What a prediction run will do, resolved and checked before anything is written.

`build_pipeline` loads the models (stage 2's adapter, stage 1's checkpoint), settles the mode, picks the source of
the pairs the LLM is asked about (stage 1 run on the fly, a candidates file, the documents' gold pairs, or all
pairs for a direct adapter), calibrates the refine threshold, reads the documents, and records the run's
fingerprint: the settings a resumed run or a shard must share.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmrc.config import replace_nested, to_dict
from lmrc.data.candidates import DocumentCandidates, load_candidates, match_candidates
from lmrc.data.docred import Document, load_documents, require_labels, restrict_pairs
from lmrc.data.relations import RelationSet
from lmrc.errors import LmrcError
from lmrc.io import file_sha256
from lmrc.predict.config import PredictConfig, Stage1Settings, Stage2Settings
from lmrc.stage1.losses import LOSSES
from lmrc.stage1.predict import Proposer
from lmrc.stage2.modeling import load_adapter_config
from lmrc.stage2.predict import Stage2Runner

log = logging.getLogger(__name__)

# Stage-2 settings that change no answer (the pipeline batches documents itself).
_STAGE2_NEUTRAL = ("docs_per_chunk", "gpu_memory_utilization")
_STAGE1_SOURCES = "--stage1 CHECKPOINT, --candidates FILE or --gold-pairs"


@dataclass
class Pipeline:
    """What a run will do, resolved and checked before anything is written."""

    mode: str
    relations: RelationSet
    proposer: Proposer | None
    candidates: list[DocumentCandidates | None] | None  # from a candidates file, per document
    runner: Stage2Runner | None
    fingerprint: dict[str, Any]
    refine: bool = False  # fusion refine: stage 1 settles its confident pairs, see lmrc.predict.config
    upper: float | None = None  # refine: pairs scored above it keep stage 1's relations, no LLM call
    keep_margin: float | None = None  # refine: stage-1 relations kept in the band above this margin
    # refine.additions calibrated: the LLM's relations that stage 1 does not predict need this stage-1 margin
    # (None: any relation; -inf: none, when no set of near misses raised tuning F1)
    add_margin: float | None = None
    gold_pairs: bool = False  # the LLM is asked about each document's gold relation pairs


def build_pipeline(
    cfg: PredictConfig, docs_path: Path, *, generator: Any = None
) -> tuple[Pipeline, list[Document]]:
    """Load and check the models, the documents and the candidates source; nothing is written."""
    stage1 = cfg.stage1
    runner = _load_runner(cfg, generator)
    has_stage1 = stage1.checkpoint is not None or stage1.candidates is not None or stage1.gold_pairs
    adapter_mode = runner.mode if runner is not None else None
    mode = _infer_mode(cfg, adapter_mode, has_stage1)
    _check_mode(mode, cfg, adapter_mode, has_stage1)
    _check_stage1_options(cfg, runner)
    proposer = _load_proposer(cfg, mode)
    upper, refine_calibration = _refine_threshold(cfg, mode, proposer)
    add_margin = _addition_margin(cfg, refine_calibration)

    relations = _shared_relations(proposer, runner, stage1.checkpoint, cfg.stage2.adapter)
    pair_types = _pair_types(proposer, runner)
    docs = restrict_pairs(load_documents(docs_path, relations), pair_types, docs_path)
    if stage1.gold_pairs:
        require_labels(docs, docs_path, "needed by --gold-pairs")
    candidates = None
    if stage1.candidates is not None and mode == "classifier-llm":
        candidates = match_candidates(
            load_candidates(stage1.candidates), docs, stage1.candidates, docs_path, relation_ids=relations.ids
        )
    fingerprint = _fingerprint(cfg, docs_path, docs, mode, proposer, candidates is not None, runner)
    if cfg.fusion != "none":
        fingerprint["fusion"] = {
            "mode": cfg.fusion,
            "calibration": refine_calibration,
            "keep_margin": cfg.refine.keep_margin,
            "additions": cfg.refine.additions,
        }
    pipeline = Pipeline(
        mode,
        relations,
        proposer,
        candidates,
        runner,
        fingerprint,
        refine=cfg.fusion == "refine",
        upper=upper,
        keep_margin=cfg.refine.keep_margin,
        add_margin=add_margin,
        gold_pairs=stage1.gold_pairs,
    )
    return pipeline, docs


def _addition_margin(cfg: PredictConfig, refine_calibration: dict | None) -> float | None:
    """refine.additions calibrated: the stage-1 margin the LLM's other relations need (-inf: none pass)."""
    if refine_calibration is None or cfg.refine.additions != "calibrated":
        return None
    margin = refine_calibration["additions"]["add_margin"]
    return margin if margin is not None else float("-inf")


def stage2_predict_config(
    adapter: str | os.PathLike,
    candidates: str | os.PathLike | None = None,
    gold_pairs: bool = False,
    overrides: Mapping[str, Any] | None = None,
) -> PredictConfig:
    """`lmrc stage2 predict` as a pipeline run: the adapter alone, its pairs from a candidates file, the gold
    relation pairs or (a direct adapter) all pairs; `overrides` change the adapter's settings (a nested mapping,
    as Stage2Settings.overrides), and batches hold the adapter's `generation.docs_per_chunk` documents."""
    if candidates is not None and gold_pairs:
        raise LmrcError("choose one of --candidates and --gold-pairs")
    overrides = dict(overrides or {})
    adapter_cfg = replace_nested(load_adapter_config(adapter), overrides, "--set")
    return PredictConfig(
        stage1=Stage1Settings(
            candidates=str(candidates) if candidates is not None else None, gold_pairs=gold_pairs
        ),
        stage2=Stage2Settings(adapter=str(adapter), overrides=overrides),
        docs_per_batch=adapter_cfg.generation.docs_per_chunk,
    )


# ------------------------------------------------------------------------------------------------ the mode


def _infer_mode(cfg: PredictConfig, adapter_mode: str | None, has_stage1: bool) -> str:
    if cfg.mode is not None:
        return cfg.mode
    if adapter_mode == "direct":
        if has_stage1:
            raise LmrcError(
                "a direct-mode adapter asks about all pairs and uses no stage 1: drop --stage1/--candidates/"
                "--gold-pairs, or give an rc adapter for --mode classifier-llm"
            )
        return "direct"
    if adapter_mode == "rc":
        return "classifier-llm"
    if has_stage1:
        return "stage1-only"
    raise LmrcError(
        "nothing to run: give --stage1 CHECKPOINT and/or --stage2 ADAPTER (see lmrc predict --help)"
    )


# The adapter each LLM mode needs, and what to say when another one is given.
_ADAPTER_FOR_MODE = {
    "classifier-llm": (
        "rc",
        "an rc adapter",
        "{adapter}: a {kind}-mode adapter cannot classify stage-1 candidates; --mode classifier-llm needs an rc "
        "adapter (or use --mode direct)",
    ),
    "direct": (
        "direct",
        "a direct adapter",
        "{adapter}: an {kind}-mode adapter classifies given pairs; --mode direct needs a direct adapter (or use "
        "--mode classifier-llm with --stage1)",
    ),
}


def _check_mode(mode: str, cfg: PredictConfig, adapter_mode: str | None, has_stage1: bool) -> None:
    if mode == "stage1-only":
        if cfg.stage1.checkpoint is None:
            raise LmrcError("--mode stage1-only needs --stage1 CHECKPOINT (a multi-label head)")
        if adapter_mode is not None:
            raise LmrcError("--mode stage1-only runs no LLM: drop --stage2")
        return
    wanted, what, wrong = _ADAPTER_FOR_MODE[mode]
    if adapter_mode is None:
        raise LmrcError(f"--mode {mode} needs --stage2 ADAPTER ({what})")
    if adapter_mode != wanted:
        raise LmrcError(wrong.format(adapter=cfg.stage2.adapter, kind=adapter_mode))
    if mode == "classifier-llm" and not has_stage1:
        raise LmrcError(f"--mode classifier-llm needs stage-1 candidates: {_STAGE1_SOURCES}")
    if mode == "direct" and has_stage1:
        raise LmrcError("--mode direct asks the LLM about all pairs: drop --stage1/--candidates/--gold-pairs")


def _check_stage1_options(cfg: PredictConfig, runner: Stage2Runner | None) -> None:
    """Options that apply to one source of pairs only."""
    stage1 = cfg.stage1
    if stage1.tune is not None and stage1.recall_target is None and cfg.fusion != "refine":
        raise LmrcError("--tune (stage1.tune) is used by --recall-target or fusion refine")
    given = (stage1.candidates is not None or stage1.gold_pairs) and stage1.checkpoint is None
    if given and any(v is not None for v in (stage1.threshold, stage1.recall_target, stage1.max_per_doc)):
        source = "--gold-pairs" if stage1.gold_pairs else "a candidates file"
        raise LmrcError(f"{source} is used as it is: the threshold options apply to --stage1 CHECKPOINT")
    if stage1.gold_pairs and runner is not None and runner.cfg.hints:
        raise LmrcError(
            f"{cfg.stage2.adapter}: the adapter was trained with stage-1 hints, which gold pairs do not have: "
            "give --candidates FILE (or --stage1 CHECKPOINT)"
        )


# ------------------------------------------------------------------------------------------------ the models


def _load_runner(cfg: PredictConfig, generator: Any) -> Stage2Runner | None:
    if cfg.stage2.adapter is None:
        return None
    return Stage2Runner(cfg.stage2.adapter, cfg.stage2.overrides, generator=generator)


def _load_proposer(cfg: PredictConfig, mode: str) -> Proposer | None:
    stage1 = cfg.stage1
    if stage1.checkpoint is None:
        return None
    # The tuning file also serves fusion refine; the candidate rule reads it only for a recall target.
    rule = stage1 if stage1.recall_target is not None else dataclasses.replace(stage1, tune=None)
    proposer = Proposer(stage1.checkpoint, rule)
    if mode == "stage1-only" and not proposer.per_relation:
        raise LmrcError(
            f"{stage1.checkpoint}: the {proposer.checkpoint.loss_name!r} head predicts no relations, only "
            f"candidate pairs; stage1-only needs a multi-label head ({', '.join(_multi_label_heads())})"
        )
    return proposer


def _multi_label_heads() -> list[str]:
    return [name for name, head in LOSSES.items() if head.per_relation]


def _refine_threshold(
    cfg: PredictConfig, mode: str, proposer: Proposer | None
) -> tuple[float | None, dict | None]:
    """Refine's upper threshold and how it was chosen (None, None without fusion refine)."""
    if cfg.fusion != "refine":
        return None, None
    if mode != "classifier-llm" or proposer is None:
        raise LmrcError(
            "fusion refine needs --mode classifier-llm with --stage1 CHECKPOINT (a multi-label head)"
        )
    if not proposer.per_relation:
        raise LmrcError(
            f"fusion refine keeps stage 1's relations: the {proposer.checkpoint.loss_name!r} head has none"
        )
    additions = cfg.refine.additions == "calibrated"
    if cfg.refine.upper is not None and not additions:
        return cfg.refine.upper, {"method": "manual", "upper": cfg.refine.upper}
    if cfg.stage1.tune is None:
        raise LmrcError("fusion refine calibrates its thresholds on a labelled file: set stage1.tune")
    calibration = proposer.calibrate_upper(cfg.stage1.tune, cfg.refine.precision, additions, cfg.refine.upper)
    if additions:
        gate = calibration["additions"]
        log.info(
            "refine: the LLM's additions need a stage-1 margin of at least %s (tuning file: %d near misses, "
            "adding the %d above it (%d right) takes stage 1's F1 from %.4f to %.4f)",
            gate["add_margin"], gate["near_misses"], gate["added"], gate["right"], gate["stage1_f1"], gate["f1"],
        )  # fmt: skip
    if calibration["upper"] is None:
        log.warning(
            "refine: no stage-1 threshold reaches precision %.2f: every candidate goes to the LLM",
            cfg.refine.precision,
        )
    return calibration["upper"], calibration


def _pair_types(proposer, runner) -> list | None:
    """The typed-pair constraint of the models (stage 1's and stage 2's must agree)."""
    found = []
    if proposer is not None:
        found.append(("stage-1 checkpoint", proposer.checkpoint.config.data.pair_types))
    if runner is not None:
        found.append(("adapter", runner.cfg.data.pair_types))
    norm = {name: sorted(map(tuple, v)) if v else None for name, v in found}
    if len(set(map(str, norm.values()))) > 1:
        raise LmrcError(f"the models ask about different entity pairs: pair_types {norm}")
    return found[0][1] if found else None


def _shared_relations(proposer, runner, checkpoint, adapter) -> RelationSet:
    sets = []
    if proposer is not None:
        sets.append((proposer.relations, f"stage-1 checkpoint {checkpoint}"))
    if runner is not None:
        sets.append((runner.relations, f"adapter {adapter}"))
    if not sets:
        raise LmrcError("nothing to run: give --stage1 CHECKPOINT and/or --stage2 ADAPTER")
    (first, where), *rest = sets
    for other, other_where in rest:
        if set(other.ids) != set(first.ids):
            extra = sorted(set(other.ids) - set(first.ids)) or sorted(set(first.ids) - set(other.ids))
            raise LmrcError(
                f"{other_where} and {where} use different relation sets ({len(other)} vs {len(first)} relations; "
                f"e.g. {extra[0]!r} is in only one): train both on the same rel_info.json"
            )
    return first


# ------------------------------------------------------------------------------------------- the fingerprint


def _weights_sha(folder: Path, names: Sequence[str]) -> str | None:
    for name in names:
        if (folder / name).is_file():
            return file_sha256(folder / name)
    return None


def _fingerprint(
    cfg: PredictConfig,
    docs_path: Path,
    docs: list[Document],
    mode: str,
    proposer: Proposer | None,
    from_file: bool,
    runner: Stage2Runner | None,
) -> dict[str, Any]:
    """The settings a resumed run or a shard must share with the run it continues."""
    return {
        "input": str(docs_path.resolve()),
        "input_sha256": file_sha256(docs_path),
        "documents": len(docs),
        "mode": mode,
        "docs_per_batch": cfg.docs_per_batch,
        "stage1": _stage1_fingerprint(cfg, mode, proposer, from_file),
        "stage2": _stage2_fingerprint(cfg, runner),
    }


def _stage1_fingerprint(
    cfg: PredictConfig, mode: str, proposer: Proposer | None, from_file: bool
) -> dict | None:
    """Where the pairs come from: the checkpoint and its threshold, the candidates file, or the gold pairs."""
    stage1 = cfg.stage1
    if proposer is not None and mode != "direct":
        choice = proposer.choice
        return {
            "checkpoint": str(Path(proposer.checkpoint.path).resolve()),
            "weights_sha256": _weights_sha(Path(proposer.checkpoint.path), ("model.safetensors",)),
            "head": proposer.checkpoint.loss_name,
            "head_params": dict(stage1.head_params),
            "threshold": choice.threshold,
            "max_per_doc": choice.max_per_doc,
            "threshold_method": choice.calibration.get("method"),
            "batch_size": stage1.batch_size,
        }
    if from_file:
        assert stage1.candidates is not None
        return {
            "candidates": str(Path(stage1.candidates).resolve()),
            "sha256": file_sha256(stage1.candidates),
        }
    if stage1.gold_pairs:
        return {"gold_pairs": True}
    return None


def _stage2_fingerprint(cfg: PredictConfig, runner: Stage2Runner | None) -> dict | None:
    """The adapter and every stage-2 setting that can change an answer."""
    if runner is None:
        return None
    adapter = Path(cfg.stage2.adapter or "")
    settings = runner.cfg
    return {
        "adapter": str(adapter.resolve()),
        "weights_sha256": _weights_sha(adapter, ("adapter_model.safetensors",)),
        "model": settings.model,
        "mode": settings.mode,
        "max_seq_len": settings.max_seq_len,
        "max_pairs": settings.max_pairs,
        "answer_tokens_per_pair": settings.answer_tokens_per_pair,
        "dtype": settings.dtype,
        "generation": {k: v for k, v in to_dict(settings.generation).items() if k not in _STAGE2_NEUTRAL},
        "align": to_dict(settings.align),
    }
