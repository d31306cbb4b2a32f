"""`lmrc predict | merge | compare`: the two stages end to end, shards, and the LMRC comparison."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from lmrc.commands.common import (
    add_config_args,
    add_overwrite_arg,
    finite_float,
    log_to_file,
    positive_int,
    recall_fraction,
    sigterm_as_interrupt,
)
from lmrc.errors import LmrcError
from lmrc.paths import Named, check_paths, check_progress, check_writable_folder, named


def register(sub) -> None:
    p = sub.add_parser(
        "predict",
        help="run the pipeline over documents: stage-1 candidates -> LLM (or direct, or stage 1 alone)",
        description="Batch inference over a DocRED-format file. Modes: classifier-llm (stage-1 candidates -> an "
        "rc adapter, LMRC), direct (a direct adapter over all pairs, the baseline), stage1-only (the multi-label "
        "head's relations); inferred from the models given. Documents go through in batches (stage 1, then "
        "stage 2 on its candidates); finished batches are appended to <output>.progress.jsonl, so --resume "
        "continues a killed run and gives the same file. Writes the official result file and "
        "<output>.summary.json (models, settings, candidate counts, LLM prompts and tokens, drop reasons, "
        "time, peak memory); prints the official scores when the input is labelled.",
    )
    _add_input_args(p)
    p.add_argument("--output", required=True, type=Path, help="result file to write (official format)")
    p.add_argument("--stage1", metavar="CHECKPOINT", help="stage-1 checkpoint folder")
    p.add_argument("--stage2", metavar="ADAPTER", help="stage-2 adapter folder (rc or direct)")
    p.add_argument("--candidates", metavar="FILE", help="a stage-1 candidates file instead of --stage1")
    p.add_argument(
        "--gold-pairs",
        action="store_true",
        help="ask the LLM about each document's gold relation pairs instead of stage-1 candidates (needs labels)",
    )
    p.add_argument("--mode", help="classifier-llm, direct or stage1-only (default: inferred)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--threshold", type=finite_float, help="stage-1 candidate threshold")
    g.add_argument(
        "--recall-target", type=recall_fraction, metavar="R", help="calibrate the threshold to pair recall R"
    )
    g.add_argument(
        "--max-per-doc", type=positive_int, metavar="K", help="the K best-scored pairs of every document"
    )
    p.add_argument("--tune", metavar="FILE", help="labelled tuning file for --recall-target")
    p.add_argument("--calibration", metavar="FILE", help="a saved calibration for --recall-target")
    p.add_argument("--train", metavar="FILE", help="training documents for Ign F1 (default: the models')")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run (same settings)")
    add_overwrite_arg(p, "an existing result file and discard an earlier run's progress")
    p.add_argument(
        "--shard",
        metavar="I/N",
        help="run shard I of N (I from 0; whole batches in document order), e.g. --shard $SLURM_ARRAY_TASK_ID/8",
    )
    p.add_argument("--save-candidates", type=Path, metavar="FILE", help="also write the candidates file")
    add_config_args(p)
    p.set_defaults(func=cmd_predict)

    m = sub.add_parser(
        "merge",
        help="join the outputs of `lmrc predict --shard i/n` into one result file",
        description="Check that the shard outputs come from one run (same input, models and settings), that "
        "every shard 0..n-1 is there once and finished, then write their predictions in document order: the "
        "same file one unsharded run writes.",
    )
    m.add_argument("shards", nargs="+", type=Path, help="shard result files (e.g. shard_*.json)")
    m.add_argument("--output", required=True, type=Path, help="merged result file to write")
    add_overwrite_arg(m)
    m.set_defaults(func=cmd_merge)

    c = sub.add_parser(
        "compare",
        help="the LMRC comparison: stage 1 alone vs direct fine-tuning vs classifier-LLM on the same documents",
        description="Train what the config does not name (stage 1, an rc adapter, a direct adapter; resumable), "
        "run every mode with `lmrc predict` on the same evaluation documents, and write results.md / "
        "results.json (P, R, F1, Ign F1, intra / inter, frequent / long-tail F1, predictions, LLM prompts and "
        "tokens, time and peak memory per document) and the pictures per_relation.png, theta.png and "
        "candidates.png (with matplotlib). Re-running with the same config reuses finished parts.",
    )
    add_config_args(c)
    c.add_argument("--output-dir", required=True, type=Path, help="folder for models, runs, tables, pictures")
    c.set_defaults(func=cmd_compare)


def _add_input_args(p: argparse.ArgumentParser) -> None:
    """Where the documents come from: DocRED-format documents, or plain text with an entity model."""
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
    p.add_argument(
        "--entities",
        metavar="CKPT",
        help="with --text: entity checkpoint (lmrc entities train) or spacy:<pipeline>",
    )


def _predict_config(args: argparse.Namespace):
    from lmrc.config import load_config
    from lmrc.predict.config import PredictConfig

    overrides = list(args.overrides)
    flags = {
        "mode": args.mode,
        "stage1.checkpoint": args.stage1,
        "stage1.candidates": args.candidates,
        "stage1.gold_pairs": True if args.gold_pairs else None,
        "stage1.threshold": args.threshold,
        "stage1.recall_target": args.recall_target,
        "stage1.max_per_doc": args.max_per_doc,
        "stage1.tune": args.tune,
        "stage1.calibration": args.calibration,
        "stage2.adapter": args.stage2,
        "train": args.train,
    }
    import json

    overrides += [f"{k}={json.dumps(v)}" for k, v in flags.items() if v is not None]
    return load_config(PredictConfig, args.config, overrides)


def _companions(output: Path, text: bool = False) -> list[Named]:
    """The files `lmrc predict` / `lmrc merge` write beside a result file (with --text, also the documents built
    from the text and the readable triples)."""
    from lmrc.io import sidecar

    companions = [
        Named("the summary", sidecar(output, ".summary.json")),
        Named("the strict-names result", sidecar(output, ".strict.json")),
        Named("the progress file", sidecar(output, ".progress.jsonl")),
    ]
    if text:
        from lmrc.entities.run import docs_path, triples_path

        companions += [
            Named("the documents built from the text", docs_path(Path(output))),
            Named("the readable triples", triples_path(Path(output))),
        ]
    return companions


def _check_predict_paths(args: argparse.Namespace, cfg) -> None:
    from lmrc.io import sidecar

    def expand(value: str | None) -> Path | None:
        # Config paths may hold $VARS (expanded where they are used; an unset one is reported there).
        return Path(os.path.expandvars(value)).expanduser() if value else None

    inputs = named("--input", args.input) + named("--config", args.config) + named("--text", args.text)
    if args.entities and not str(args.entities).startswith(("spacy:", "gold:")):
        inputs += named("--entities", args.entities)
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
        companions=_companions(args.output, text=args.text is not None),
    )


def cmd_predict(args: argparse.Namespace) -> int:
    from lmrc.io import sidecar
    from lmrc.predict.run import Shard, run_pipeline

    shard = Shard.parse(args.shard) if args.shard else None
    cfg = _predict_config(args)
    if args.text is not None and not args.entities:
        raise LmrcError("--text needs --entities CKPT (an entity checkpoint, or spacy:<pipeline>)")
    if args.entities and args.text is None:
        raise LmrcError("--entities goes with --text (DocRED input already has its entities)")
    _check_predict_paths(args, cfg)
    with sigterm_as_interrupt():  # finished batches are in the progress file; --resume continues
        if args.text is not None:
            from lmrc.entities.run import predict_text

            summary = predict_text(
                cfg,
                args.text,
                args.output,
                args.entities,
                resume=args.resume,
                shard=shard,
                save_candidates=args.save_candidates,
            )
        else:
            summary = run_pipeline(
                cfg,
                args.input,
                args.output,
                resume=args.resume,
                shard=shard,
                save_candidates=args.save_candidates,
            )
    print(
        f"{args.output}: {summary['predictions']:,} predictions for {summary['documents']:,} documents "
        f"({summary['mode']}{', shard ' + summary['shard'] if shard else ''})"
    )
    c = summary.get("candidates")
    if c:
        line = f"stage 1: {c['candidates']:,} candidate pairs of {c['pairs']:,} (reduction ratio {c['reduction']:.4f})"
        if "recall" in c:
            line += f", pair recall {100 * c['recall']:.2f}"
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
    t = summary.get("text_input")
    if t:
        b = t["build"]
        print(f"text: {b['documents']} documents built ({b['entities']} entities, {b['mentions']} mentions, "
              f"{b['seconds_per_document'] or 0:.2f} s per document), {len(b['skipped'])} skipped; "
              f"triples: {t['triples']}")  # fmt: skip
    print(f"summary: {sidecar(args.output, '.summary.json')}")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from lmrc.predict.merge import merge

    shards = [n for shard in args.shards for n in [Named("a shard", shard), *_companions(shard)]]
    check_paths(
        shards, named("--output", args.output), overwrite=args.overwrite, companions=_companions(args.output)
    )
    summary = merge(args.shards, args.output)
    print(
        f"{args.output}: {summary['predictions']:,} predictions for {summary['documents']:,} documents "
        f"from {summary['merged_from_shards']} shards"
    )
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from lmrc.experiments.compare import compare, load_compare_config
    from lmrc.experiments.report import (
        ANSWER_COLUMNS,
        LEARNING_COLUMNS,
        NOISE_COLUMNS,
        answer_rows,
        learning_curve_rows,
        noise_rows,
        text_table,
    )

    cfg = load_compare_config(args.config, args.overrides)
    check_writable_folder("--output-dir", args.output_dir)
    with sigterm_as_interrupt(), log_to_file(args.output_dir / "compare.log"):
        result = compare(cfg, args.output_dir, on_stage=lambda msg: print(f"== {msg}", flush=True))
    print()
    print(text_table(result.rows))
    if any("delta_interval" in r for r in result.rows):
        print("\nnoise (paired bootstrap over the documents, 95% intervals):")
        print(text_table(noise_rows(result.rows), NOISE_COLUMNS))
    if answer_rows(result.rows):
        print("\nLLM answers (totals):")
        print(text_table(answer_rows(result.rows), ANSWER_COLUMNS))
    if result.candidates:
        c = result.candidates
        recall = f", pair recall {100 * c['recall']:.2f}%" if "recall" in c else ""
        print(
            f"\nstage-1 candidates for the LLM: {c['candidates']:,} of {c['pairs']:,} pairs "
            f"(reduction ratio {c['reduction']:.4f}){recall}"
        )
    if result.learning_curve:
        print("\nlearning curve (relation F1 against LLM training tokens, constrained answers):")
        print(text_table(learning_curve_rows(result.learning_curve), LEARNING_COLUMNS))
    print(f"\nmachine: {result.machine}")
    print(f"tables: {result.results_md}  {result.results_json}")
    if result.pictures:
        print("pictures: " + "  ".join(str(p) for p in result.pictures))
    if result.skipped_pictures:
        print(
            "pictures skipped (no matplotlib: pip install 'lmrc[plot]', or nothing to draw): "
            + ", ".join(map(str, result.skipped_pictures))
        )
    return 0
