"""`lmrc predict | merge`: the two stages end to end over a corpus (the library's one prediction driver,
lmrc.predict.run), and the shards of a run joined into one result file."""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from pathlib import Path

from lmrc.commands.common import (
    add_candidate_args,
    add_command,
    add_config_args,
    add_entities_arg,
    add_overwrite_arg,
    candidate_flags,
    entity_model_path,
    predict_outputs,
    sigterm_as_interrupt,
)
from lmrc.config import load_config, with_flags
from lmrc.errors import LmrcError
from lmrc.io import sidecar
from lmrc.paths import Named, check_paths, check_progress, named
from lmrc.predict.config import PredictConfig


def register(sub: argparse._SubParsersAction) -> None:
    _add_predict_args(
        add_command(
            sub,
            "predict",
            cmd_predict,
            help="run the pipeline over documents: stage-1 candidates -> LLM (or direct, or stage 1 alone)",
            description="Batch inference over a DocRED-format file. Modes: classifier-llm (stage-1 candidates -> "
            "an rc adapter, LMRC), direct (a direct adapter over all pairs, the baseline), stage1-only (the "
            "multi-label head's relations); inferred from the models given. Documents go through in batches "
            "(stage 1, then stage 2 on its candidates); finished batches are appended to "
            "<output>.progress.jsonl, so --resume continues a killed run and gives the same file. Writes the "
            "official result file and <output>.summary.json (models, settings, candidate counts, LLM prompts and "
            "tokens, drop reasons, time, peak memory); prints the official scores when the input is labelled.",
        )
    )
    m = add_command(
        sub,
        "merge",
        cmd_merge,
        help="join the outputs of `lmrc predict --shard i/n` into one result file",
        description="Check that the shard outputs come from one run (same input, models and settings), that "
        "every shard 0..n-1 is there once and finished, then write their predictions in document order: the "
        "same file one unsharded run writes.",
    )
    m.add_argument("shards", nargs="+", type=Path, help="shard result files (e.g. shard_*.json)")
    m.add_argument("--output", required=True, type=Path, help="merged result file to write")
    add_overwrite_arg(m)


def _add_predict_args(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", type=Path, help="DocRED-format documents (labels optional)")
    src.add_argument(
        "--text",
        type=Path,
        metavar="INPUT",
        help="plain text instead: a .txt file, a folder of .txt files or JSON lines {title, text}; the entities "
        "are built with --entities (cached in <output stem>.text-docs.json) and <output stem>.triples.jsonl "
        "shows the triples in the text",
    )
    add_entities_arg(
        p,
        help="with --text: entity checkpoint (lmrc entities train) or spacy:<pipeline>; default: lmrc's default "
        "entity model, trained once into the lmrc cache on the first run",
    )
    p.add_argument(
        "--output",
        type=Path,
        help="result file to write (official format; default: <input stem>.result.json beside the input)",
    )
    p.add_argument("--stage1", metavar="CHECKPOINT", help="stage-1 checkpoint folder")
    p.add_argument("--stage2", metavar="ADAPTER", help="stage-2 adapter folder (rc or direct)")
    p.add_argument("--candidates", metavar="FILE", help="a stage-1 candidates file instead of --stage1")
    p.add_argument(
        "--gold-pairs",
        action="store_true",
        help="ask the LLM about each document's gold relation pairs instead of stage-1 candidates (needs labels)",
    )
    p.add_argument("--mode", help="classifier-llm, direct or stage1-only (default: inferred)")
    add_candidate_args(p)
    p.add_argument("--train", metavar="FILE", help="training documents for Ign F1 (default: the models')")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run (same settings)")
    add_overwrite_arg(p, "an existing result file and discard an earlier run's progress")
    p.add_argument(
        "--shard",
        metavar="I/N",
        help="run shard I of N (I from 0; whole batches in document order), e.g. --shard $SLURM_ARRAY_TASK_ID/8",
    )
    p.add_argument("--save-candidates", type=Path, metavar="FILE", help="also write the candidates file")
    p.add_argument(
        "--show",
        action="store_true",
        help="also write <output stem>.report.html: every document with its entities and relations, marked "
        "against gold when the input is labelled (lmrc show; open it in a browser)",
    )
    add_config_args(p)


def _predict_config(args: argparse.Namespace) -> PredictConfig:
    """The run's PredictConfig: defaults <- --config <- --set <- the flags given."""
    cfg = load_config(PredictConfig, args.config, args.overrides)
    stage1_flags = {
        **candidate_flags(args),
        "checkpoint": args.stage1,
        "candidates": args.candidates,
        "gold_pairs": True if args.gold_pairs else None,
    }
    return with_flags(
        cfg,
        {
            "mode": args.mode,
            "train": args.train,
            "stage1": with_flags(cfg.stage1, stage1_flags),
            "stage2": with_flags(cfg.stage2, {"adapter": args.stage2}),
        },
    )


def _check_predict_paths(args: argparse.Namespace, cfg: PredictConfig, companions: list[Named]) -> None:
    def expand(value: str | None) -> Path | None:
        # Config paths may hold $VARS (expanded where they are used; an unset one is reported there).
        return Path(os.path.expandvars(value)).expanduser() if value else None

    inputs = named("--input", args.input) + named("--config", args.config) + named("--text", args.text)
    inputs += entity_model_path(args.entities)
    for key, value in (
        ("--train", cfg.train),
        ("--stage1", cfg.stage1.checkpoint),
        ("--candidates", cfg.stage1.candidates),
        ("--tune", cfg.stage1.tune),
        ("--calibration", cfg.stage1.calibration),
        ("--stage2", cfg.stage2.adapter),
    ):
        inputs += named(key, expand(value))
    # a killed run's progress first: its message says what --resume and --overwrite do
    check_progress(sidecar(args.output, ".progress.jsonl"), resume=args.resume, overwrite=args.overwrite)
    check_paths(
        inputs,
        named("--output", args.output) + named("--save-candidates", args.save_candidates),
        overwrite=args.overwrite,
        resume=args.resume,
        companions=companions,
    )


def default_output(source: Path) -> Path:
    """`my.txt` -> `my.result.json`, `docs.json` -> `docs.result.json`, `mydocs/` -> `mydocs.result.json`."""
    source = Path(source)
    stem = source.name if source.is_dir() else source.stem
    return source.parent / f"{stem or 'input'}.result.json"


def _no_model_named(cfg: PredictConfig) -> bool:
    s1 = cfg.stage1
    return not (s1.checkpoint or s1.candidates or s1.gold_pairs or cfg.stage2.adapter)


def cmd_predict(args: argparse.Namespace) -> int:
    # torch-based library modules: see lmrc.commands
    from lmrc.entities.run import docs_path, predict_text, triples_path
    from lmrc.predict.default_models import ensure_default_models
    from lmrc.predict.run import Shard, run_pipeline

    started = time.perf_counter()
    shard = Shard.parse(args.shard) if args.shard else None
    cfg = _predict_config(args)
    if args.entities and args.text is None:
        raise LmrcError("--entities goes with --text (DocRED input already has its entities)")
    if args.show and shard is not None:
        raise LmrcError(
            "--show with --shard: merge the shards (lmrc merge), then run `lmrc show` on the result"
        )
    args.output = args.output or default_output(args.text or args.input)
    companions = predict_outputs(args.output)
    if args.show:
        companions.append(Named("--show's page", sidecar(args.output, ".report.html")))
    if args.text is not None:
        companions += [
            Named("the documents built from the text", docs_path(args.output)),
            Named("the readable triples", triples_path(args.output)),
        ]
    _check_predict_paths(args, cfg, companions)
    # plain text and no model named: lmrc's default models (trained once into the cache, then reused)
    need_entities = args.text is not None and not args.entities
    need_stage1 = args.text is not None and _no_model_named(cfg)
    if need_entities or need_stage1:
        defaults = ensure_default_models(need_entities, need_stage1, say=print)
        args.entities = args.entities or (str(defaults.entities) if need_entities else None)
        if need_stage1:
            cfg = dataclasses.replace(
                cfg, stage1=dataclasses.replace(cfg.stage1, checkpoint=str(defaults.stage1))
            )
    run = dict(resume=args.resume, shard=shard, save_candidates=args.save_candidates)
    with sigterm_as_interrupt():  # finished batches are in the progress file; --resume continues
        if args.text is not None:
            summary = predict_text(cfg, args.text, args.output, args.entities, **run)
        else:
            summary = run_pipeline(cfg, args.input, args.output, **run)
    _print_summary(args.output, summary, shard)
    if args.show:
        from lmrc.show import collect, page

        source = collect.from_predict_run(args.output)
        print(f"page: {page.write_page(collect.payload(source), sidecar(args.output, '.report.html'))}")
    print(f"done in {_minutes(time.perf_counter() - started)} (everything this command did)")
    return 0


def _minutes(seconds: float) -> str:
    m, s = divmod(round(seconds), 60)
    return f"{m} min {s} s" if m else f"{s} s"


def _print_summary(output: Path, summary: dict, shard) -> None:
    print(
        f"{output}: {summary['predictions']:,} predictions for {summary['documents']:,} documents "
        f"({summary['mode']}{', shard ' + summary['shard'] if shard else ''})"
    )
    candidates = summary.get("candidates")
    if candidates:
        line = (
            f"stage 1: {candidates['candidates']:,} candidate pairs of {candidates['pairs']:,} "
            f"(reduction ratio {candidates['reduction']:.4f})"
        )
        if "recall" in candidates:
            line += f", pair recall {100 * candidates['recall']:.2f}"
        print(line)
    llm = summary.get("llm")
    if llm:
        print(
            f"LLM: {llm['prompts']:,} prompts, {llm['prompt_tokens_per_document']:,.0f} prompt and "
            f"{llm['generated_tokens_per_document']:,.0f} generated tokens per document; "
            f"dropped: {', '.join(f'{k} {v}' for k, v in llm['drops'].items()) or 'none'}"
        )
    if summary.get("seconds_per_document_this_run") is not None:
        print(
            f"{summary['seconds_per_document_this_run']:.2f} s per document this run, "
            f"peak memory {summary['peak_rss_gib']:.2f} GiB"
        )
    for key, label in (("scores", "scores"), ("scores_strict", "scores (strict relation names)")):
        s = summary.get(key)
        if s:
            print(
                f"{label}: P {100 * s['precision']:.2f}  R {100 * s['recall']:.2f}  F1 {100 * s['f1']:.2f}  "
                f"Ign F1 {100 * s['ign_f1']:.2f}  intra F1 {100 * s['intra_f1']:.2f}  inter F1 {100 * s['inter_f1']:.2f}"
            )
    text_input = summary.get("text_input")
    if text_input:
        built = text_input["build"]
        print(f"text: {built['documents']} documents built ({built['entities']} entities, {built['mentions']} "
              f"mentions, {built['seconds_per_document'] or 0:.2f} s per document), {len(built['skipped'])} "
              f"skipped; triples: {text_input['triples']}")  # fmt: skip
    print(f"summary: {sidecar(output, '.summary.json')}")


def cmd_merge(args: argparse.Namespace) -> int:
    from lmrc.predict.merge import merge  # torch (through the driver's summary module): see lmrc.commands

    shards = [n for shard in args.shards for n in [Named("a shard", shard), *predict_outputs(shard)]]
    check_paths(
        shards,
        named("--output", args.output),
        overwrite=args.overwrite,
        companions=predict_outputs(args.output),
    )
    summary = merge(args.shards, args.output)
    print(
        f"{args.output}: {summary['predictions']:,} predictions for {summary['documents']:,} documents "
        f"from {summary['merged_from_shards']} shards"
    )
    return 0
