"""`lmrc stage2 train | predict | export`: LoRA-fine-tune the LLM, classify pairs, export a merged model."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from lmrc.commands.common import (
    add_command,
    add_config_args,
    add_overwrite_arg,
    add_run_args,
    add_set_arg,
    log_to_file,
    predict_outputs,
    sigterm_as_interrupt,
)
from lmrc.config import apply_overrides, with_flags
from lmrc.errors import LmrcError
from lmrc.io import sidecar
from lmrc.paths import check_paths, check_progress, check_writable_folder, named
from lmrc.stage2.config import Stage2Config, load_stage2_config


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("stage2", help="stage 2: fine-tune the LLM (LoRA) and classify entity pairs")
    s2 = p.add_subparsers(dest="stage2_command", metavar="SUBCOMMAND", required=True)
    train = add_command(
        s2,
        "train",
        cmd_train,
        help="LoRA fine-tuning (resumable; writes the adapter, metrics.jsonl, last/)",
        description="Fine-tune LoRA adapters on the training documents: mode rc (gold relation pairs, LMRC) or "
        "direct (all pairs, None for pairs without relation). The output folder gets the adapter (safetensors), "
        "tokenizer, resolved config.yaml, the prompt template and relation set, metrics.jsonl, train_summary.json "
        "and last/ (the state --resume continues from, written every train.save_every_steps steps, at the end, "
        "and on Ctrl-C / SIGTERM). Multi-GPU: `accelerate launch -m lmrc stage2 train ...`.",
    )
    add_config_args(train)
    add_run_args(train)
    _add_predict_args(
        add_command(
            s2,
            "predict",
            cmd_predict,
            help="classify entity pairs with a trained adapter; write the official result file",
            description="Render the prompts of each document (stage-1 candidates, its gold relation pairs, or all "
            "pairs for a direct-mode adapter), generate, parse and align the answers, and write the official "
            "result file. This is `lmrc predict` with the adapter alone: finished batches of "
            "generation.docs_per_chunk documents are appended to <output>.progress.jsonl, so --resume continues "
            "an interrupted run; <output>.summary.json (the format of lmrc predict) counts prompts, tokens, drop "
            "reasons and out-of-set relations.",
        )
    )
    export = add_command(
        s2,
        "export",
        cmd_export,
        help="merge the adapter into the base model and save a plain model folder for serving",
        description="Fold the LoRA adapter into the base weights (merge_and_unload) and save safetensors weights "
        "and the tokenizer to a new folder, loadable by transformers or vLLM without peft.",
    )
    export.add_argument("--adapter", required=True, type=Path, help="folder written by `lmrc stage2 train`")
    export.add_argument("--out", required=True, type=Path, help="new folder to write")
    export.add_argument(
        "--dtype",
        choices=("bfloat16", "float16", "float32"),
        help="weights dtype (default: the adapter config's dtype)",
    )


def _add_predict_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--adapter", required=True, type=Path, help="folder written by `lmrc stage2 train`")
    p.add_argument("--input", required=True, type=Path, help="DocRED-format documents")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--candidates", type=Path, help="stage-1 candidates file (rc adapters)")
    source.add_argument(
        "--gold-pairs",
        action="store_true",
        help="ask about each document's gold relation pairs (rc adapters; the LMRC ablation's RC-stage setting)",
    )
    p.add_argument("--output", required=True, type=Path, help="result file to write (official format)")
    p.add_argument("--resume", action="store_true", help="skip the documents already in the progress file")
    add_overwrite_arg(p, "an existing result file and discard an earlier run's progress")
    p.add_argument(
        "--debug-out",
        type=Path,
        metavar="FILE",
        help="JSONL, one line per document: raw outputs, parsed triples, alignment and drop reasons",
    )
    add_set_arg(
        p,
        "override a setting of the adapter's config, e.g. --set generation.batch_size=4 "
        "--set align.relation_mapping=sbert (repeatable)",
    )


def _load_train_config(args: argparse.Namespace) -> Stage2Config:
    config = args.config
    if config is None and args.resume:
        out = Path(args.output_dir) if args.output_dir else None
        if out is None or not (out / "config.yaml").is_file():
            raise LmrcError("--resume without --config needs --output-dir holding the run's config.yaml")
        config = out / "config.yaml"
    return with_flags(load_stage2_config(config, args.overrides), {"output_dir": args.output_dir})


def cmd_train(args: argparse.Namespace) -> int:
    from lmrc.stage2.train import METRICS_FILE, train  # torch: see lmrc.commands

    cfg = _load_train_config(args)
    check_writable_folder("--output-dir", cfg.output_dir)
    with sigterm_as_interrupt(), log_to_file(Path(cfg.output_dir) / "train.log"):
        result = train(cfg, resume=args.resume, stop_after_steps=args.stop_after_steps)
    if int(os.environ.get("RANK", "0") or 0) != 0:  # the summary is printed once, by rank 0
        return 0
    state = "finished" if result.finished else "paused (continue with --resume)"
    last = f", last loss {result.losses[-1]:.4f}" if result.losses else ""
    print(
        f"training {state}: step {result.steps} of {result.total_steps}{last}, {result.seconds / 60:.1f} min, "
        f"{result.tokens / max(result.seconds, 1e-9):.1f} tokens/s"
    )
    print(f"{result.stats.examples} examples from {result.stats.documents} documents")
    if result.finished:
        print(f"adapter: {result.output_dir}")
    print(f"metrics: {result.output_dir / METRICS_FILE}  log: {result.output_dir / 'train.log'}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    """A pipeline run with the adapter alone: one driver, progress file and summary format for both commands."""
    # torch-based library modules: see lmrc.commands
    from lmrc.predict.build import stage2_predict_config
    from lmrc.predict.run import run_pipeline

    output = Path(args.output)
    # a killed run's progress first: its message says what --resume and --overwrite do
    check_progress(sidecar(output, ".progress.jsonl"), resume=args.resume, overwrite=args.overwrite)
    check_paths(
        named("--adapter", args.adapter)
        + named("--input", args.input)
        + named("--candidates", args.candidates),
        named("--output", output) + named("--debug-out", args.debug_out),
        overwrite=args.overwrite,
        resume=args.resume,
        companions=predict_outputs(output),
    )
    overrides = apply_overrides({}, args.overrides)
    cfg = stage2_predict_config(args.adapter, args.candidates, args.gold_pairs, overrides)
    with sigterm_as_interrupt():  # finished batches are already in the progress file; --resume continues
        summary = run_pipeline(cfg, args.input, args.output, resume=args.resume, debug_out=args.debug_out)
    llm = summary["llm"]
    print(
        f"{args.output}: {summary['predictions']:,} predictions for {summary['documents']:,} documents "
        f"({llm['prompts']:,} prompts, {llm['generated_tokens']:,} generated tokens; pairs: {llm['pairs_from']})"
    )
    drops = ", ".join(f"{k} {v}" for k, v in llm["drops"].items()) or "none"
    print(f"dropped triples: {drops}")
    print(
        f"out-of-set relations: {llm['out_of_set_before_mapping']} before mapping, "
        f"{llm['out_of_set_after_mapping']} after ({llm['relation_mapping']})"
    )
    if summary["seconds_per_document_this_run"] is not None:
        print(f"{summary['seconds_per_document_this_run']:.2f} s per document this run")
    print(f"summary: {sidecar(Path(args.output), '.summary.json')}")
    logging.getLogger(__name__).debug("summary: %s", summary)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from lmrc.stage2.modeling import export_merged  # torch: see lmrc.commands

    check_writable_folder("--out", args.out)
    out = export_merged(args.adapter, args.out, dtype=args.dtype)
    print(f"merged model written to {out}")
    return 0
