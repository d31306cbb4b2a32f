"""`lmrc stage1 train | predict | crossfit`: train the pair classifier, propose candidate pairs."""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path

from lmrc.commands.common import (
    add_config_args,
    add_overwrite_arg,
    add_run_args,
    finite_float,
    fold_count,
    log_to_file,
    positive_int,
    recall_fraction,
    sigterm_as_interrupt,
)
from lmrc.errors import LmrcError
from lmrc.paths import check_paths, check_writable_folder, named


def register(sub) -> None:
    p = sub.add_parser("stage1", help="stage 1: train the pair classifier and propose candidate pairs")
    s1 = p.add_subparsers(dest="stage1_command", metavar="SUBCOMMAND", required=True)

    t = s1.add_parser(
        "train",
        help="train a stage-1 model (resumable; writes best/, last/, metrics.jsonl, train.log)",
        description="Train the ATLOP-style pair classifier with the configured head. The output folder gets the "
        "resolved config, train.log, metrics.jsonl (one line per evaluation on data.tune), best/ (the checkpoint "
        "selected by train.select_metric) and last/ (the state --resume continues from, written every epoch, "
        "every train.save_every_steps steps and on Ctrl-C / SIGTERM).",
    )
    add_config_args(t)
    add_run_args(t)
    t.set_defaults(func=cmd_train)

    pr = s1.add_parser(
        "predict",
        help="score every entity pair and write the candidates file",
        description="Score every ordered entity pair of the input documents and keep the pairs whose score is "
        "above the threshold (default: the head's own rule, 0.5 for bce, margin 0 for the others). With gold "
        "labels (--gold, or a labelled input) it prints candidate precision / recall / F1 (a pair is positive "
        "when it holds a relation), the reduction ratio (candidates / all pairs) and, for multi-label heads, "
        "relation P / R / F1 / Ign F1.",
    )
    pr.add_argument("--checkpoint", required=True, type=Path, help="checkpoint folder (or a training folder)")
    pr.add_argument("--input", required=True, type=Path, help="DocRED-format documents (labels optional)")
    pr.add_argument("--output", required=True, type=Path, help="candidates file to write")
    pr.add_argument(
        "--relations",
        type=Path,
        metavar="RESULT",
        help="also write the head's relation predictions in the official result format (multi-label heads)",
    )
    _add_threshold_args(pr)
    pr.add_argument(
        "--gold", type=Path, help="labelled documents for the report (default: the input, if labelled)"
    )
    pr.add_argument(
        "--train", type=Path, help="training documents for Ign F1 (default: the checkpoint's data.train)"
    )
    pr.add_argument(
        "--batch-size", type=positive_int, default=8, help="documents per forward pass (default 8)"
    )
    add_overwrite_arg(pr)
    pr.add_argument(
        "--head-param",
        dest="head_params",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="prediction-time head parameter, e.g. threshold_mode=raw (amtl), alpha=0.6 (mdre), top_k=4 (atl)",
    )
    pr.set_defaults(func=cmd_predict)

    c = s1.add_parser(
        "crossfit",
        help="K-fold candidates for the training file, each from the model that did not see it",
        description="Train K models, model k without fold k of data.train (in <output_dir>/fold<k>, resumable), "
        "and write the candidates of every training document from the model that did not train on it, so that "
        "stage 2 learns from realistic candidates without leakage.",
    )
    add_config_args(c)
    c.add_argument("--folds", type=fold_count, default=5, help="number of folds K (default 5)")
    c.add_argument("--output", required=True, type=Path, help="candidates file to write")
    c.add_argument("--output-dir", help="folder of the fold models (default: the config's output_dir)")
    _add_threshold_args(c, tune=False)
    c.add_argument(
        "--batch-size", type=positive_int, default=8, help="documents per forward pass (default 8)"
    )
    add_overwrite_arg(c, "an existing candidates file (the fold models are reused, as with --resume)")
    c.set_defaults(func=cmd_crossfit)


def _add_threshold_args(p: argparse.ArgumentParser, tune: bool = True) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--threshold", type=finite_float, help="keep pairs whose score is above this value")
    g.add_argument(
        "--recall-target",
        type=recall_fraction,
        metavar="R",
        help="the highest threshold whose pair recall on the tuning file is >= R"
        + (" (--tune FILE, or a saved --calibration FILE)" if tune else " (data.tune of the config)"),
    )
    g.add_argument(
        "--max-per-doc", type=positive_int, metavar="K", help="keep the K best-scored pairs of every document"
    )
    if tune:
        p.add_argument("--tune", type=Path, help="labelled tuning file for --recall-target")
        p.add_argument(
            "--calibration",
            type=Path,
            metavar="FILE",
            help="a calibration saved earlier with --save-calibration",
        )
        p.add_argument(
            "--save-calibration",
            type=Path,
            metavar="FILE",
            help="also write the recall-target calibration to FILE (the checkpoint folder is never written)",
        )


def _load_config(args, output_dir: str | None):
    from lmrc.stage1.config import load_stage1_config

    path = args.config
    if path is None and getattr(args, "resume", False) and output_dir:
        path = str(Path(output_dir) / "config.yaml")
    cfg = load_stage1_config(path, args.overrides)
    if output_dir:
        cfg = dataclasses.replace(cfg, output_dir=str(output_dir))
    return cfg


def cmd_train(args) -> int:
    from lmrc.stage1.train import train

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
    return 0


def _print_report(report, metrics, relation_names) -> None:
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
        from lmrc.eval.report import format_table

        print()
        print(format_table(metrics, relation_names))


def _head_params(items: list[str]) -> dict:
    import yaml

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise LmrcError(f"--head-param {item}: expected KEY=VALUE")
        out[key.strip()] = yaml.safe_load(value)
    return out


def cmd_predict(args) -> int:
    from lmrc.stage1.predict import predict

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
        relations_output=args.relations,
        threshold=args.threshold,
        recall_target=args.recall_target,
        tune_path=args.tune,
        calibration_path=args.calibration,
        save_calibration_path=args.save_calibration,
        max_per_doc=args.max_per_doc,
        gold_path=args.gold,
        train_path=args.train,
        batch_size=args.batch_size,
        head_params=_head_params(args.head_params),
    )
    h = result.candidates.header
    n = sum(len(d.pairs) for d in result.candidates.documents)
    thr = "none" if h.threshold is None else f"{h.threshold:.6g}"
    print(f"{args.output}: {n:,} candidate pairs in {len(result.candidates.documents):,} documents")
    print(f"head {h.head}, threshold {thr} ({h.calibration.get('method')})")
    if args.relations:
        print(f"{args.relations}: {len(result.relation_predictions or []):,} relation predictions")
    _print_report(result.report, result.relation_metrics, None)
    return 0


def cmd_crossfit(args) -> int:
    from lmrc.stage1.crossfit import crossfit

    cfg = _load_config(args, args.output_dir)
    check_paths(
        [n for key in ("train", "tune", "rel_info") for n in named(f"data.{key}", cfg.data.path(key))],
        named("--output", args.output),
        overwrite=args.overwrite,
    )
    check_writable_folder("--output-dir", cfg.output_dir)
    with sigterm_as_interrupt(), log_to_file(Path(cfg.output_dir) / "crossfit.log"):
        result = crossfit(
            cfg,
            args.folds,
            args.output,
            threshold=args.threshold,
            recall_target=args.recall_target,
            max_per_doc=args.max_per_doc,
            batch_size=args.batch_size,
        )
    n = sum(len(d.pairs) for d in result.candidates.documents)
    print(
        f"{args.output}: {n:,} candidate pairs in {len(result.candidates.documents):,} documents from {args.folds} fold models"
    )
    _print_report(result.report, None, None)
    return 0
