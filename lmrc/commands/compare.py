"""`lmrc compare`: the LMRC comparison (stage 1 alone, direct fine-tuning, classifier-LLM on the same documents),
an experiment above the library (lmrc.experiments)."""

from __future__ import annotations

import argparse
from pathlib import Path

from lmrc.commands.common import add_command, add_config_args, log_to_file, sigterm_as_interrupt
from lmrc.paths import check_writable_folder


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(
        sub,
        "compare",
        cmd_compare,
        help="the LMRC comparison: stage 1 alone vs direct fine-tuning vs classifier-LLM on the same documents",
        description="Train what the config does not name (stage 1, an rc adapter, a direct adapter; resumable), "
        "run every mode with `lmrc predict` on the same evaluation documents, and write results.md / "
        "results.json (P, R, F1, Ign F1, intra / inter, frequent / long-tail F1, predictions, LLM prompts and "
        "tokens, time and peak memory per document) and the pictures per_relation.png, theta.png and "
        "candidates.png (with matplotlib). Re-running with the same config reuses finished parts.",
    )
    add_config_args(p)
    p.add_argument("--output-dir", required=True, type=Path, help="folder for models, runs, tables, pictures")


def cmd_compare(args: argparse.Namespace) -> int:
    # torch-based library modules: see lmrc.commands
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
    candidates = result.candidates
    if candidates:
        recall = f", pair recall {100 * candidates['recall']:.2f}%" if "recall" in candidates else ""
        print(
            f"\nstage-1 candidates for the LLM: {candidates['candidates']:,} of {candidates['pairs']:,} pairs "
            f"(reduction ratio {candidates['reduction']:.4f}){recall}"
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
