"""`lmrc stage1 train | predict | crossfit`: train the pair classifier, propose candidate pairs."""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path

from lmrc.commands.common import (
    add_batch_size_arg,
    add_candidate_args,
    add_command,
    add_config_args,
    add_overwrite_arg,
    add_run_args,
    candidate_flags,
    fold_count,
    log_to_file,
    sigterm_as_interrupt,
)
from lmrc.config import with_flags
from lmrc.eval.report import format_table
from lmrc.paths import check_paths, check_writable_folder, named
from lmrc.stage1.config import CandidateSettings, Stage1Config, load_stage1_config


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("stage1", help="stage 1: train the pair classifier and propose candidate pairs")
    s1 = p.add_subparsers(dest="stage1_command", metavar="SUBCOMMAND", required=True)
    train = add_command(
        s1,
        "train",
        cmd_train,
        help="train a stage-1 model (resumable; writes best/, last/, metrics.jsonl, train.log)",
        description="Train the ATLOP-style pair classifier with the configured head. The output folder gets the "
        "resolved config, train.log, metrics.jsonl (one line per evaluation on data.tune), best/ (the checkpoint "
        "selected by train.select_metric) and last/ (the state --resume continues from, written every epoch, "
        "every train.save_every_steps steps and on Ctrl-C / SIGTERM).",
    )
    add_config_args(train)
    add_run_args(train)
    train.add_argument(
        "--tune-fraction",
        type=_fraction,
        metavar="F",
        help="carve a seeded tuning split of F (e.g. 0.1) out of data.train, instead of data.tune, into "
        "<output-dir>/data/ (reused on --resume; the saved config names the split files)",
    )
    _add_predict_args(
        add_command(
            s1,
            "predict",
            cmd_predict,
            help="score every entity pair and write the candidates file",
            description="Score every ordered entity pair of the input documents and keep the pairs whose score "
            "is above the threshold (default: the head's own rule, 0.5 for bce, margin 0 for the others). With "
            "gold labels (--gold, or a labelled input) it prints candidate precision / recall / F1 (a pair is "
            "positive when it holds a relation), the reduction ratio (candidates / all pairs) and, for "
            "multi-label heads, relation P / R / F1 / Ign F1.",
        )
    )
    crossfit = add_command(
        s1,
        "crossfit",
        cmd_crossfit,
        help="K-fold candidates for the training file, each from the model that did not see it",
        description="Train K models, model k without fold k of data.train (in <output_dir>/fold<k>, resumable), "
        "and write the candidates of every training document from the model that did not train on it, so that "
        "stage 2 learns from realistic candidates without leakage.",
    )
    add_config_args(crossfit)
    crossfit.add_argument("--folds", type=fold_count, default=5, help="number of folds K (default 5)")
    crossfit.add_argument("--output", required=True, type=Path, help="candidates file to write")
    crossfit.add_argument("--output-dir", help="folder of the fold models (default: the config's output_dir)")
    add_candidate_args(crossfit, tune=False)
    add_batch_size_arg(crossfit)
    add_overwrite_arg(crossfit, "an existing candidates file (the fold models are reused, as with --resume)")


def _add_predict_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, type=Path, help="checkpoint folder (or a training folder)")
    p.add_argument("--input", required=True, type=Path, help="DocRED-format documents (labels optional)")
    p.add_argument("--output", required=True, type=Path, help="candidates file to write")
    p.add_argument(
        "--relations",
        type=Path,
        metavar="RESULT",
        help="also write the head's relation predictions in the official result format (multi-label heads)",
    )
    add_candidate_args(p)
    p.add_argument(
        "--save-calibration",
        type=Path,
        metavar="FILE",
        help="also write the recall-target calibration to FILE (the checkpoint folder is never written)",
    )
    p.add_argument(
        "--gold", type=Path, help="labelled documents for the report (default: the input, if labelled)"
    )
    p.add_argument(
        "--train", type=Path, help="training documents for Ign F1 (default: the checkpoint's data.train)"
    )
    add_batch_size_arg(p)
    add_overwrite_arg(p)
    p.add_argument(
        "--head-param",
        dest="head_params",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="prediction-time head parameter, e.g. threshold_mode=raw (amtl), alpha=0.6 (mdre), top_k=4 (atl)",
    )


def _load_config(args: argparse.Namespace, output_dir: str | None) -> Stage1Config:
    path = args.config
    if path is None and getattr(args, "resume", False) and output_dir:
        path = str(Path(output_dir) / "config.yaml")
    cfg = load_stage1_config(path, args.overrides)
    if output_dir:
        cfg = dataclasses.replace(cfg, output_dir=str(output_dir))
    return cfg


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1, got {text!r}")
    return value


def cmd_train(args: argparse.Namespace) -> int:
    from lmrc.stage1.train import train  # torch: see lmrc.commands

    if args.tune_fraction is not None:  # replaces data.tune (lmrc/stage1/small_corpus.py)
        args.overrides = [*args.overrides, "data.tune=null", f"data.tune_fraction={args.tune_fraction}"]
    cfg = _load_config(args, args.output_dir)
    out = Path(cfg.output_dir)
    check_writable_folder("--output-dir", out)
    with sigterm_as_interrupt(), log_to_file(out / "train.log"):
        result = train(cfg, resume=args.resume, stop_after_steps=args.stop_after_steps)
    if int(os.environ.get("RANK", "0") or 0) != 0:  # the summary is printed once, by rank 0
        return 0
    state = "finished" if result.finished else "paused (continue with --resume)"
    if result.stopped_early:
        state = "stopped early (patience)"
    value = "n/a" if result.best_value is None else f"{result.best_value:.4f}"
    print(
        f"training {state}: step {result.global_step} of {result.total_steps}, {result.elapsed_s / 60:.1f} min"
    )
    print(f"best {result.select_metric} = {value} (step {result.best_step}) -> {result.best_dir}")
    metrics = out / "metrics.jsonl"  # written only when there is a tuning file to evaluate on
    print(
        f"metrics: {metrics}  log: {out / 'train.log'}" if metrics.is_file() else f"log: {out / 'train.log'}"
    )
    for warning in result.warnings:  # also in the log and in train_summary.json
        print(f"warning: {warning}")
    return 0


def _print_report(report, metrics) -> None:
    if report is not None:
        print(
            f"candidates: {report.candidates:,} of {report.pairs:,} pairs (reduction ratio {report.reduction:.4f}) "
            f"in {report.documents:,} documents"
        )
        print(
            f"candidate pairs: P {100 * report.precision:.2f}  R {100 * report.recall:.2f}  "
            f"F1 {100 * report.f1:.2f}  ({report.correct:,} of {report.positive_pairs:,} positive pairs kept)"
        )
    if metrics is not None:
        print()
        print(format_table(metrics, None))


def cmd_predict(args: argparse.Namespace) -> int:
    from lmrc.stage1.predict import predict  # torch: see lmrc.commands

    check_paths(
        named("--checkpoint", args.checkpoint)
        + named("--input", args.input)
        + named("--tune", args.tune)
        + named("--calibration", args.calibration)
        + named("--gold", args.gold)
        + named("--train", args.train),
        named("--output", args.output)
        + named("--relations", args.relations)
        + named("--save-calibration", args.save_calibration),
        overwrite=args.overwrite,
    )
    result = predict(
        args.checkpoint,
        args.input,
        args.output,
        with_flags(CandidateSettings(), candidate_flags(args)),
        relations_output=args.relations,
        save_calibration_path=args.save_calibration,
        gold_path=args.gold,
        train_path=args.train,
    )
    header = result.candidates.header
    n = sum(len(d.pairs) for d in result.candidates.documents)
    threshold = "none" if header.threshold is None else f"{header.threshold:.6g}"
    print(f"{args.output}: {n:,} candidate pairs in {len(result.candidates.documents):,} documents")
    print(f"head {header.head}, threshold {threshold} ({header.calibration.get('method')})")
    if args.relations:
        print(f"{args.relations}: {len(result.relation_predictions or []):,} relation predictions")
    _print_report(result.report, result.relation_metrics)
    return 0


def cmd_crossfit(args: argparse.Namespace) -> int:
    from lmrc.stage1.crossfit import crossfit  # torch: see lmrc.commands

    cfg = _load_config(args, args.output_dir)
    check_paths(
        [n for key in ("train", "tune", "rel_info") for n in named(f"data.{key}", cfg.data.path(key))],
        named("--output", args.output),
        overwrite=args.overwrite,
    )
    check_writable_folder("--output-dir", cfg.output_dir)
    rule = with_flags(CandidateSettings(), candidate_flags(args))
    with sigterm_as_interrupt(), log_to_file(Path(cfg.output_dir) / "crossfit.log"):
        result = crossfit(cfg, args.folds, args.output, rule)
    n = sum(len(d.pairs) for d in result.candidates.documents)
    print(
        f"{args.output}: {n:,} candidate pairs in {len(result.candidates.documents):,} documents from "
        f"{args.folds} fold models"
    )
    _print_report(result.report, None)
    return 0
