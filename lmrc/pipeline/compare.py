"""`lmrc compare`: the LMRC comparison on one set of documents — stage 1 alone, direct fine-tuning, classifier-LLM.

A run folder (`--output-dir DIR`) holds everything, and re-running the same config reuses what is finished:

- `data/`: the training / tuning split, when the config asks compare to make one (`data.train`);
- `models/stage1`, `models/rc`, `models/direct`: models trained here (resumable) unless the config names trained
  ones (`stage1.path`, `rc.path`, `direct.path`);
- `runs/<mode>.json` (+ `.summary.json`, `.progress.jsonl`, `.yaml`): each mode run by `lmrc predict` in its own
  process (so that its peak memory is its own), resumable;
- `results.json`, `results.md`: one row per mode and variant (SBERT relation mapping on/off);
- `per_relation.png`, `theta.png`, `candidates.png` when matplotlib is installed (LMRC Figures 2 and 3, and the
  stage-1 threshold trade-off); `theta.png` re-aligns the saved raw LLM answers, without re-running the LLM.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lmrc.config import expand_path, load_config, to_dict
from lmrc.data.docred import Document, document_to_raw, load_documents
from lmrc.data.relations import RelationSet, load_relations
from lmrc.errors import LmrcError
from lmrc.io import atomic_write_json, atomic_write_text, read_json

log = logging.getLogger(__name__)

LLM_MODES = ("direct", "classifier-llm")
ALL_MODES = ("stage1-only", "direct", "classifier-llm")


@dataclass
class ModelSpec:
    path: str | None = None  # a trained model to reuse (stage-1 checkpoint or stage-2 adapter folder)
    config: str | None = None  # its training config, when `path` is not given
    set: list[str] = field(default_factory=list)  # overrides of that config (as --set)


@dataclass
class DataSpec:
    """A training / tuning split that compare makes itself (so a fresh clone needs no `lmrc data split`)."""

    train: str | None = None  # labelled documents; None: the models' configs name their own data
    max_docs: int | None = None  # keep this many documents of it (after the seeded shuffle)
    tune_fraction: float = 0.1  # the tuning split: model selection and the recall-target calibration
    seed: int = 13

    def __post_init__(self) -> None:
        if not 0.0 <= self.tune_fraction < 1.0:
            raise ValueError("data.tune_fraction must be in [0, 1)")
        if self.max_docs is not None and self.max_docs < 2:
            raise ValueError("data.max_docs must be at least 2")


@dataclass
class EvalSpec:
    docs: str = "${LMRC_DATA_DIR}/redocred/dev_50.json"
    max_docs: int | None = None  # the first N documents; None: all
    indices: list[int] | None = None  # or these documents (0-based positions in the file)
    train: str | None = "${LMRC_DATA_DIR}/redocred/train_450.json"  # Ign F1, frequent / long-tail, plot order

    def __post_init__(self) -> None:
        if self.max_docs is not None and self.max_docs < 1:
            raise ValueError("eval.max_docs must be at least 1")
        if self.indices is not None and self.max_docs is not None:
            raise ValueError("eval: give max_docs or indices, not both")


@dataclass
class CandidateSpec:
    """How stage 1 chooses the LLM's candidates (at most one; none: the head's own rule)."""

    threshold: float | None = None
    recall_target: float | None = None  # calibrated on `tune` (default: the tuning split made by `data`)
    tune: str | None = None
    max_per_doc: int | None = None


@dataclass
class Variant:
    """A further row: a mode run with other `lmrc predict` settings (e.g. constrained answers, refine)."""

    name: str
    mode: str = "classifier-llm"
    set: list[str] = field(default_factory=list)  # overrides of the mode's predict config (`--set` keys)

    def __post_init__(self) -> None:
        if self.mode not in LLM_MODES:
            raise ValueError(f"variant {self.name!r}: mode must be one of {', '.join(LLM_MODES)}")
        if not self.name.strip() or "/" in self.name:
            raise ValueError(f"variant name {self.name!r}: a non-empty name without '/'")


@dataclass
class CompareConfig:
    eval: EvalSpec = field(default_factory=EvalSpec)
    data: DataSpec = field(default_factory=DataSpec)
    stage1: ModelSpec = field(default_factory=ModelSpec)
    rc: ModelSpec = field(default_factory=ModelSpec)
    direct: ModelSpec = field(default_factory=ModelSpec)
    candidates: CandidateSpec = field(default_factory=CandidateSpec)
    modes: list[str] = field(default_factory=lambda: list(ALL_MODES))
    variants: list[Variant] = field(default_factory=list)
    # Rows with the LLM's relation names mapped by SBERT (LMRC Appendix B) beside the strict rows.
    sbert: bool = True
    theta: float = 0.55  # LMRC Appendix B
    thetas: list[float] = field(default_factory=lambda: [0.3, 0.4, 0.5, 0.55, 0.6, 0.7, 0.8, 0.9, 1.0])
    stage2_overrides: dict[str, Any] = field(default_factory=dict)  # predict-time settings of both adapters
    docs_per_batch: int = 4
    candidate_points: int = 9  # thresholds on candidates.png

    def __post_init__(self) -> None:
        unknown = [m for m in self.modes if m not in ALL_MODES]
        if unknown:
            raise ValueError(f"modes: unknown mode {unknown[0]!r} (expected {', '.join(ALL_MODES)})")
        if not self.modes:
            raise ValueError("modes: name at least one mode")
        names = [v.name for v in self.variants]
        clash = [n for n in names if n in ALL_MODES or names.count(n) > 1]
        if clash:
            raise ValueError(f"variants: name {clash[0]!r} is taken (a mode or another variant)")
        missing = [v.name for v in self.variants if v.mode not in self.modes]
        if missing:
            raise ValueError(f"variant {missing[0]!r}: its mode is not in modes")


def load_compare_config(path: str | os.PathLike | None, overrides: Sequence[str] = ()) -> CompareConfig:
    return load_config(CompareConfig, path, overrides)


# ------------------------------------------------------------------------------------------------ data


def _write_docs(path: Path, docs: Sequence[Document]) -> None:
    atomic_write_json(path, [document_to_raw(d) for d in docs])


def _same_or_write(path: Path, docs: Sequence[Document]) -> Path:
    """Write the documents unless the file already holds exactly them (keeps reruns' fingerprints stable)."""
    raw = [document_to_raw(d) for d in docs]
    if not (path.is_file() and read_json(path) == raw):
        atomic_write_json(path, raw)
    return path


def prepare_data(cfg: CompareConfig, out: Path, relations: RelationSet) -> dict[str, Path | None]:
    """The evaluation file (its first `eval.max_docs` documents) and, when asked, the train / tune split."""
    from lmrc.data.split import split_indices

    eval_path = expand_path(cfg.eval.docs, "eval.docs")
    docs = load_documents(eval_path, relations)
    for d in docs:
        if not d.labelled:
            raise LmrcError(
                f'{eval_path}: document {d.index} ("{d.title}") has no labels: compare needs labels'
            )
    if cfg.eval.max_docs is not None:
        docs = docs[: cfg.eval.max_docs]
    if cfg.eval.indices is not None:
        bad = [i for i in cfg.eval.indices if not 0 <= i < len(docs)]
        if bad:
            raise LmrcError(f"eval.indices: {bad[0]} is out of range ({eval_path} has {len(docs)} documents)")
        docs = [docs[i] for i in cfg.eval.indices]
    paths: dict[str, Path | None] = {"eval": _same_or_write(out / "data" / "eval.json", docs)}
    paths["train"] = paths["tune"] = None
    if cfg.data.train is not None:
        train_path = expand_path(cfg.data.train, "data.train")
        train_docs = load_documents(train_path, relations)
        if cfg.data.max_docs is not None:
            import random

            order = list(range(len(train_docs)))
            random.Random(cfg.data.seed).shuffle(order)
            train_docs = [train_docs[i] for i in sorted(order[: cfg.data.max_docs])]
        if cfg.data.tune_fraction > 0:
            ratios = (1 - cfg.data.tune_fraction, cfg.data.tune_fraction)
            part_train, part_tune = split_indices(len(train_docs), ratios, cfg.data.seed)
            paths["tune"] = _same_or_write(out / "data" / "tune.json", [train_docs[i] for i in part_tune])
        else:
            part_train = list(range(len(train_docs)))
        paths["train"] = _same_or_write(out / "data" / "train.json", [train_docs[i] for i in part_train])
    return paths


# ---------------------------------------------------------------------------------------------- training


def _data_overrides(kind: str, paths: dict[str, Path | None]) -> list[str]:
    if paths["train"] is None:
        return []
    out = [f"data.train={paths['train']}"]
    if kind == "stage1":
        out.append(f"data.tune={paths['tune'] if paths['tune'] is not None else 'null'}")
    return out


def ensure_stage1(cfg: CompareConfig, out: Path, paths: dict[str, Path | None]) -> Path:
    from lmrc.stage1.config import load_stage1_config
    from lmrc.stage1.train import train

    if cfg.stage1.path is not None:
        return expand_path(cfg.stage1.path, "stage1.path")
    folder = out / "models" / "stage1"
    overrides = [*_data_overrides("stage1", paths), *cfg.stage1.set, f"output_dir={folder}"]
    s1 = load_stage1_config(cfg.stage1.config, overrides)
    log.info("compare: training stage 1 in %s", folder)
    result = train(s1, resume=True)
    if not result.finished:
        raise LmrcError(f"{folder}: stage-1 training did not finish (rerun lmrc compare to continue)")
    return result.best_dir


def ensure_adapter(kind: str, cfg: CompareConfig, out: Path, paths: dict[str, Path | None]) -> Path:
    from lmrc.stage2.config import load_stage2_config
    from lmrc.stage2.modeling import ADAPTER_CONFIG
    from lmrc.stage2.train import train

    spec: ModelSpec = getattr(cfg, kind)
    if spec.path is not None:
        return expand_path(spec.path, f"{kind}.path")
    folder = out / "models" / kind
    overrides = [*_data_overrides(kind, paths), *spec.set, f"mode={kind}", f"output_dir={folder}"]
    s2 = load_stage2_config(spec.config, overrides)
    if (folder / ADAPTER_CONFIG).is_file() and not (folder / "last").exists():
        return folder  # finished earlier
    log.info("compare: training the %s adapter in %s", kind, folder)
    result = train(s2, folder, resume=True)
    if not result.finished:
        raise LmrcError(f"{folder}: {kind} training did not finish (rerun lmrc compare to continue)")
    return folder


# ------------------------------------------------------------------------------------------------ modes


@dataclass
class ModeRun:
    mode: str
    result: Path
    summary: dict[str, Any]
    name: str = ""  # the row label: the mode, or the variant's name

    def __post_init__(self) -> None:
        self.name = self.name or self.mode


def _predict_config(
    cfg: CompareConfig, mode: str, models: dict[str, Path], tune: Path | None, extra: Sequence[str] = ()
) -> dict:
    from lmrc.config import apply_overrides
    from lmrc.pipeline.config import PredictConfig

    overrides = json.loads(json.dumps(cfg.stage2_overrides))
    if cfg.sbert and mode in LLM_MODES:
        overrides.setdefault("align", {}).update({"relation_mapping": "sbert", "theta": cfg.theta})
    c = cfg.candidates
    stage1: dict[str, Any] = {}
    if mode != "direct":
        stage1 = {"checkpoint": str(models["stage1"])}
    if mode == "classifier-llm":
        stage1.update(
            {"threshold": c.threshold, "recall_target": c.recall_target, "max_per_doc": c.max_per_doc}
        )
    stage2: dict[str, Any] = {}
    if mode in LLM_MODES:
        stage2 = {
            "adapter": str(models["rc" if mode == "classifier-llm" else "direct"]),
            "overrides": overrides,
        }
    out = {
        "mode": mode,
        "stage1": {k: v for k, v in stage1.items() if v is not None},
        "stage2": stage2,
        "docs_per_batch": cfg.docs_per_batch,
    }
    apply_overrides(out, list(extra))
    if mode == "classifier-llm" and (c.recall_target is not None or out.get("fusion") == "refine"):
        tune_file = expand_path(c.tune, "candidates.tune") if c.tune else tune
        if tune_file is not None:
            out["stage1"].setdefault("tune", str(tune_file))
    from lmrc.config import from_dict

    from_dict(PredictConfig, json.loads(json.dumps(out)), f"variant of {mode}")  # refuse a bad key now
    return out


def run_mode(
    cfg: CompareConfig,
    mode: str,
    models: dict[str, Path],
    paths: dict[str, Path | None],
    out: Path,
    variant: Variant | None = None,
) -> ModeRun:
    """`lmrc predict` for one mode (or variant) in a child process (its own peak memory), resuming a finished or
    killed run."""
    from lmrc.pipeline.run import sidecar

    runs = out / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    name = variant.name if variant is not None else mode
    slug = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)
    config_path = runs / f"{slug}.yaml"
    predict_cfg = _predict_config(cfg, mode, models, paths["tune"], variant.set if variant else ())
    atomic_write_text(config_path, yaml.safe_dump(predict_cfg, sort_keys=False))
    result = runs / f"{slug}.json"
    cmd = [
        sys.executable,
        "-m",
        "lmrc.cli",
        "predict",
        "--config",
        str(config_path),
        "--input",
        str(paths["eval"]),
    ]
    cmd += ["--output", str(result), "--resume"]
    if cfg.eval.train is not None:
        cmd += ["--train", str(expand_path(cfg.eval.train, "eval.train"))]
    log.info("compare: %s", " ".join(cmd))
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=None, text=True)
    if proc.returncode != 0:
        raise LmrcError(
            f"lmrc predict --config {config_path} failed (exit {proc.returncode}); see the lines above"
        )
    return ModeRun(mode, result, read_json(sidecar(result, ".summary.json")), name)


# --------------------------------------------------------------------------------------------- scoring


def _row(label: str, mode: str, metrics, summary: dict, variant: str) -> dict[str, Any]:
    s = metrics.summary()
    llm = summary.get("llm") or {}
    row = {
        "label": label,
        "mode": mode,
        "variant": variant,
        "precision": s["precision"],
        "recall": s["recall"],
        "f1": s["f1"],
        "ign_f1": s["ign_f1"],
        "intra_f1": s["intra_f1"],
        "inter_f1": s["inter_f1"],
        "frequent_f1": s["frequent_f1"],
        "long_tail_f1": s["long_tail_f1"],
        "predicted": metrics.relation.predicted,
        "llm_prompts_per_doc": llm.get("prompts_per_document", 0.0),
        "prompt_tokens_per_doc": llm.get("prompt_tokens_per_document", 0.0),
        "generated_tokens_per_doc": llm.get("generated_tokens_per_document", 0.0),
        "seconds_per_doc": summary.get("seconds_per_document"),
        "peak_rss_gib": summary.get("peak_rss_gib"),
    }
    if llm:
        drops = llm.get("drops") or {}
        cand = summary.get("candidates") or {}
        row["out_of_set_relations"] = llm.get("out_of_set_before_mapping")
        row["parse_failures"] = drops.get("unparsed", 0)
        row["placeholder_echoes"] = drops.get("empty_field", 0)  # a `-` (or empty) relation field
        row["triples_parsed"] = llm.get("triples_parsed")
        row["none_answers"] = llm.get("none_answers")
        row["pairs_asked"] = llm.get("pairs_asked")
        row["pairs_kept_by_stage1"] = llm.get("pairs_kept_by_stage1", 0)
        row["pairs_cut"] = llm.get("pairs_cut", 0)
        # refine sends only the uncertain band of the candidates to the LLM
        row["share_of_candidates_to_llm"] = (
            llm["pairs_asked"] / cand["candidates"] if cand.get("candidates") else None
        )
    return row


def score_runs(
    runs: Sequence[ModeRun], docs: Sequence[Document], ref, relations: RelationSet
) -> tuple[list[dict], dict[str, Any]]:
    """Rows of the table, and per-relation F1 of every row (for the plot)."""
    from lmrc.eval.metrics import evaluate, load_predictions
    from lmrc.pipeline.run import sidecar

    rows, per_relation = [], {}
    for run in runs:
        variants = [("strict", run.result)]
        strict = sidecar(run.result, ".strict.json")
        if strict.is_file():  # the result is SBERT-mapped, the strict names beside it
            variants = [("strict", strict), ("sbert", run.result)]
        for variant, path in variants:
            metrics = evaluate(load_predictions(path), docs, ref)
            label = run.name if variant == "strict" else f"{run.name} + SBERT"
            rows.append(_row(label, run.mode, metrics, run.summary, variant))
            per_relation[label] = {rid: sc.f1 for rid, sc in metrics.per_relation.items()}
    return rows, per_relation


def theta_curves(
    runs: Sequence[ModeRun], docs: Sequence[Document], ref, relations: RelationSet, thetas: Sequence[float]
) -> dict[str, list[float]]:
    """F1 against the SBERT threshold theta (LMRC Fig. 3), re-aligning the saved raw answers (no LLM run)."""
    from lmrc.eval.metrics import evaluate
    from lmrc.model_store import default_cache_dir
    from lmrc.pipeline.run import iter_progress, sidecar
    from lmrc.stage2.align import RelationMapper, align_output, entity_choices
    from lmrc.stage2.modeling import load_adapter_config
    from lmrc.stage2.prompts import Prompt, entity_names

    by_title = {d.title: d for d in docs}
    curves: dict[str, list[float]] = {}
    for run in runs:
        if run.mode not in LLM_MODES:
            continue
        adapter = run.summary["fingerprint"]["stage2"]["adapter"]
        align = load_adapter_config(adapter).align
        mapper = RelationMapper(
            relations, sbert_path=align.sbert_model, mode="sbert", cache_dir=default_cache_dir()
        )
        records = list(iter_progress(sidecar(run.result, ".progress.jsonl")))
        prepared = []
        for r in records:
            doc = by_title[r["title"]]
            names = entity_names(doc)
            prepared.append((doc, names, entity_choices(doc, names), r.get("raw", [])))
        f1s = []
        for theta in thetas:
            mapper.theta = float(theta)
            preds: list[dict] = []
            for doc, names, choices, raws in prepared:
                seen = set()
                for raw in raws:
                    prompt = Prompt(doc.title, "", "", tuple(tuple(p) for p in raw["pairs"]))
                    res = align_output(
                        raw["text"],
                        prompt,
                        doc,
                        names,
                        relations,
                        mapper,
                        align.cutoff,
                        align.scorer,
                        choices,
                    )
                    for p in res.predictions:
                        key = (p["h_idx"], p["t_idx"], p["r"])
                        if key not in seen:
                            seen.add(key)
                            preds.append(p)
            f1s.append(evaluate(preds, docs, ref).relation.f1)
        curves[run.name] = f1s
    return curves


def candidate_curve(
    stage1: Path, rc: Path | None, docs: Sequence[Document], points: int
) -> list[dict[str, float]]:
    """Stage-1 pair recall and LLM prompt tokens per document against the candidate threshold."""
    from lmrc.data.docred import restrict_pairs
    from lmrc.stage1.inference import gold_pair_flags, pair_scores
    from lmrc.stage1.predict import Proposer

    proposer = Proposer(stage1)
    docs = restrict_pairs(docs, proposer.checkpoint.config.data.pair_types)
    scores = pair_scores(proposer.checkpoint.loss, proposer.logits(docs))
    flat = sorted((s for doc in scores for s in doc), reverse=True)
    if not flat:
        return []
    runner = None
    if rc is not None:
        from lmrc.stage2.predict import Stage2Runner

        runner = Stage2Runner(rc)
    gold = [gold_pair_flags(d) for d in docs]
    n_pos = sum(sum(g) for g in gold)
    out = []
    for k in range(points):
        keep = max(1, round(len(flat) * (k + 1) / points))
        threshold = flat[keep - 1] - 1e-9
        kept = [[i for i, s in enumerate(doc_s) if s > threshold] for doc_s in scores]
        hit = sum(doc_g[i] for doc_g, doc_k in zip(gold, kept) for i in doc_k)
        point = {
            "threshold": threshold,
            "share_of_pairs": sum(map(len, kept)) / len(flat),
            "recall": hit / n_pos if n_pos else 0.0,
        }
        if runner is not None:
            tokens = 0
            for doc, idx in zip(docs, kept):
                pairs = [doc.pairs()[i] for i in idx]
                _, prompts = runner.plan(doc, sorted(pairs))
                tokens += sum(len(runner.encoder.encode_prompt(p.text)) for p in prompts)
            point["prompt_tokens_per_doc"] = tokens / len(docs)
        out.append(point)
    return out


# ----------------------------------------------------------------------------------------------- tables


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.2f}"


def _num(x: float | None, fmt: str = "{:,.0f}") -> str:
    return "–" if x is None else fmt.format(x)


TABLE_COLUMNS = (
    ("mode", lambda r: r["label"]),
    ("P", lambda r: _pct(r["precision"])),
    ("R", lambda r: _pct(r["recall"])),
    ("F1", lambda r: _pct(r["f1"])),
    ("Ign F1", lambda r: _pct(r["ign_f1"])),
    ("intra F1", lambda r: _pct(r["intra_f1"])),
    ("inter F1", lambda r: _pct(r["inter_f1"])),
    ("freq. F1", lambda r: _pct(r["frequent_f1"])),
    ("LT F1", lambda r: _pct(r["long_tail_f1"])),
    ("#pred", lambda r: f"{r['predicted']:,}"),
    ("LLM prompts/doc", lambda r: _num(r["llm_prompts_per_doc"], "{:,.1f}")),
    ("prompt tok/doc", lambda r: _num(r["prompt_tokens_per_doc"])),
    ("gen. tok/doc", lambda r: _num(r["generated_tokens_per_doc"])),
    ("s/doc", lambda r: _num(r["seconds_per_doc"], "{:.2f}")),
    ("peak GiB", lambda r: _num(r["peak_rss_gib"], "{:.2f}")),
)


# What the LLM was asked and what became of its answers (issue 8: format failures should vanish with
# constrained decoding; refine sends only part of the candidates). One row per LLM run (strict names).
ANSWER_COLUMNS = (
    ("mode", lambda r: r["label"]),
    ("pairs asked", lambda r: _num(r["pairs_asked"])),
    ("share of cand.", lambda r: _pct(r["share_of_candidates_to_llm"])),
    ("kept by stage 1", lambda r: _num(r["pairs_kept_by_stage1"])),
    ("triples", lambda r: _num(r["triples_parsed"])),
    ("None", lambda r: _num(r["none_answers"])),
    ("unparsed lines", lambda r: _num(r["parse_failures"])),
    ("'-' echoes", lambda r: _num(r["placeholder_echoes"])),
    ("out-of-set names", lambda r: _num(r["out_of_set_relations"])),
    ("pairs cut", lambda r: _num(r["pairs_cut"])),
)


def answer_rows(rows: Sequence[dict]) -> list[dict]:
    return [r for r in rows if r["mode"] in LLM_MODES and r["variant"] == "strict" and "pairs_asked" in r]


def markdown_table(rows: Sequence[dict], columns=TABLE_COLUMNS) -> str:
    head = "| " + " | ".join(name for name, _ in columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(get(r) for _, get in columns) + " |" for r in rows]
    return "\n".join([head, rule, *body])


def text_table(rows: Sequence[dict], columns=TABLE_COLUMNS) -> str:
    """The table for a terminal: aligned columns."""
    cells = [[name for name, _ in columns]] + [[get(r) for _, get in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = []
    for k, row in enumerate(cells):
        lines.append(
            "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
        )
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- compare


@dataclass
class CompareResult:
    rows: list[dict]
    results_md: Path
    results_json: Path
    pictures: list[Path]
    skipped_pictures: list[str]
    candidates: dict[str, Any] | None


def compare(
    cfg: CompareConfig, output_dir: str | os.PathLike, on_stage: Callable[[str], None] | None = None
) -> CompareResult:
    """Train what is missing, run every mode on the same documents, score, tabulate and plot."""
    from lmrc.eval.metrics import TrainReference
    from lmrc.pipeline import plots

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    say = on_stage or (lambda msg: log.info("%s", msg))
    relations = _relation_set(cfg)
    paths = prepare_data(cfg, out, relations)
    docs = load_documents(paths["eval"], relations)  # type: ignore[arg-type]
    ref = None
    if cfg.eval.train is not None:
        ref = TrainReference.from_documents(
            load_documents(expand_path(cfg.eval.train, "eval.train"), relations)
        )

    models: dict[str, Path] = {}
    if "stage1-only" in cfg.modes or "classifier-llm" in cfg.modes:
        say("stage 1: training or reusing the pair classifier")
        models["stage1"] = ensure_stage1(cfg, out, paths)
    for kind, mode in (("rc", "classifier-llm"), ("direct", "direct")):
        if mode in cfg.modes:
            say(f"stage 2: training or reusing the {kind} adapter")
            models[kind] = ensure_adapter(kind, cfg, out, paths)

    runs = []
    for mode in [m for m in ALL_MODES if m in cfg.modes]:
        if mode == "stage1-only" and not _multi_label(models["stage1"]):
            log.warning("stage1-only skipped: the stage-1 head predicts no relations (bce)")
            continue
        say(f"predict: {mode} on {len(docs)} documents")
        runs.append(run_mode(cfg, mode, models, paths, out))
        for v in cfg.variants:
            if v.mode == mode:
                say(f"predict: {v.name} ({mode} with {' '.join(v.set) or 'the same settings'})")
                runs.append(run_mode(cfg, mode, models, paths, out, v))

    say("scoring")
    rows, per_relation = score_runs(runs, docs, ref, relations)
    cand = next((r.summary.get("candidates") for r in runs if r.name == "classifier-llm"), None)
    thetas = theta_curves(runs, docs, ref, relations, cfg.thetas) if cfg.sbert else {}
    curve = []
    if "stage1" in models:
        curve = candidate_curve(models["stage1"], models.get("rc"), docs, cfg.candidate_points)
    results = {
        "config": to_dict(cfg),
        "documents": len(docs),
        "eval": str(paths["eval"]),
        "models": {k: str(v) for k, v in models.items()},
        "rows": rows,
        "stage1_candidates": cand,
        "theta": {"thetas": list(cfg.thetas), "f1": thetas},
        "candidate_curve": curve,
        "per_relation_f1": per_relation,
        "relation_train_counts": ref.relation_counts if ref is not None else None,
    }
    results_json = out / "results.json"
    atomic_write_json(results_json, results, indent=2)
    results_md = out / "results.md"
    atomic_write_text(results_md, _markdown(rows, cand, len(docs), paths["eval"]))
    pictures, skipped = plots.draw_all(out, results, relations)
    return CompareResult(rows, results_md, results_json, pictures, skipped, cand)


def _relation_set(cfg: CompareConfig) -> RelationSet:
    """The relation set of the models: a trained model's copy, else the stage-1 training config's rel_info."""
    from lmrc.stage1.config import load_stage1_config

    if cfg.rc.path is not None or cfg.direct.path is not None:
        from lmrc.stage2.modeling import load_adapter_config
        from lmrc.stage2.predict import adapter_relations

        path = expand_path(cfg.rc.path or cfg.direct.path, "rc.path")  # type: ignore[arg-type]
        return adapter_relations(path, load_adapter_config(path))
    if cfg.stage1.path is not None:
        from lmrc.stage1.checkpoint import load_checkpoint

        return load_checkpoint(expand_path(cfg.stage1.path, "stage1.path")).relations
    s1 = load_stage1_config(cfg.stage1.config, cfg.stage1.set)
    return load_relations(s1.data.path("rel_info"))


def _multi_label(checkpoint: Path) -> bool:
    from lmrc.stage1.checkpoint import load_checkpoint

    return bool(load_checkpoint(checkpoint).loss.per_relation)


def _markdown(rows: Sequence[dict], cand: dict | None, n_docs: int, eval_path: Path | None) -> str:
    lines = [
        "# lmrc compare",
        "",
        f"{n_docs} evaluation documents ({eval_path}). Scores: official DocRED F1 / Ign F1 (%); frequent = the 10 "
        "relations with most training facts, LT = the others. Token and time columns are per document.",
        "",
        markdown_table(rows),
        "",
    ]
    answers = answer_rows(rows)
    if answers:
        lines += [
            "What the LLM was asked and what became of its answers (totals over the documents; share of cand.: "
            "the candidates that reached the LLM, below 100% with refine; '-' echoes: the prompt's placeholder "
            "written as the relation; pairs cut: answers lost to the token budget):",
            "",
            markdown_table(answers, ANSWER_COLUMNS),
            "",
        ]
    if cand:
        line = (
            f"Stage-1 candidates for the LLM: {cand['candidates']:,} of {cand['pairs']:,} pairs "
            f"(reduction ratio {cand['reduction']:.4f})"
        )
        if "recall" in cand:
            line += f", pair recall {100 * cand['recall']:.2f}%"
        lines += [line + ".", ""]
    return "\n".join(lines)
