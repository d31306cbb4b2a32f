"""`lmrc entities train | evaluate | score`: the entity model of text input, and what it costs end to end."""

from __future__ import annotations

import argparse
from pathlib import Path

from lmrc.commands.common import (
    add_command,
    add_config_args,
    add_entities_arg,
    add_overwrite_arg,
    entity_model_path,
    log_to_file,
    sigterm_as_interrupt,
)
from lmrc.config import load_config
from lmrc.entities.config import EntitiesConfig
from lmrc.entities.e2e import format_scores, score_files
from lmrc.io import atomic_write_json, read_json
from lmrc.paths import check_paths, check_writable_folder, named


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "entities", help="train and measure the entity model that turns plain text into documents"
    )
    e_sub = p.add_subparsers(dest="entities_command", metavar="SUBCOMMAND", required=True)
    train = add_command(
        e_sub,
        "train",
        cmd_train,
        help="train the mention tagger and the coreference scorer on DocRED-format files",
        description="Train a BIO mention tagger (DocRED types) on the encoder, then a mention-pair coreference "
        "scorer on the vertexSet clusters, with the best epoch and the clustering threshold chosen on the tuning "
        "file. The output folder is the checkpoint for `lmrc predict --text --entities DIR`. Resumable: state "
        "after every epoch; continue with --resume.",
    )
    add_config_args(train)
    train.add_argument("--output-dir", type=Path, help="output folder (default: the config's output_dir)")
    train.add_argument(
        "--resume",
        action="store_true",
        help="continue after the last finished epoch (same config; without --config the run's saved config.yaml)",
    )
    evaluate = add_command(
        e_sub,
        "evaluate",
        cmd_evaluate,
        help="mention, clustering and type scores on a DocRED file turned into plain text",
        description="Turn every document of a DocRED-format file into plain text, build its entities again with "
        "--entities, and score them against the file's: mention P/R/F1 (exact span and type), MUC, B-cubed, "
        "CEAF-e, their average (CoNLL F1), entity exact match, entity type accuracy; time per document, memory.",
    )
    add_entities_arg(evaluate, required=True)
    evaluate.add_argument("--gold", required=True, type=Path, help="DocRED-format file with entities")
    evaluate.add_argument("--output", type=Path, help="also write the scores as JSON")
    evaluate.add_argument(
        "--text-output", type=Path, metavar="JSONL", help="also write the texts as JSON lines"
    )
    add_overwrite_arg(evaluate)
    score = add_command(
        e_sub,
        "score",
        cmd_score,
        help="end-to-end relation scores of predictions on built documents against gold documents",
        description="Score a result file of `lmrc predict --text` (whose entities were built from text) against "
        "the gold DocRED file of the same texts: strict (a predicted head or tail counts when its mentions equal "
        "a gold entity's, as JEREX) and lenient (it shares a mention span with the gold entity).",
    )
    score.add_argument("--result", required=True, type=Path, help="result file of lmrc predict")
    score.add_argument(
        "--built", required=True, type=Path, help="the built documents (<output stem>.text-docs.json)"
    )
    score.add_argument("--gold", required=True, type=Path, help="gold DocRED-format file")
    score.add_argument("--output", type=Path, help="also write the scores as JSON")
    add_overwrite_arg(score)


def cmd_train(args: argparse.Namespace) -> int:
    from lmrc.entities.train import train  # torch: see lmrc.commands

    config = args.config
    if args.resume and config is None and args.output_dir and (args.output_dir / "config.yaml").is_file():
        config = args.output_dir / "config.yaml"  # --resume without --config: the run's own saved config
    cfg = load_config(EntitiesConfig, config, args.overrides)
    out = Path(args.output_dir or cfg.output_dir)
    check_writable_folder("--output-dir", out)
    with sigterm_as_interrupt(), log_to_file(out / "train.log"):
        folder = train(cfg, out, resume=args.resume)
    summary = read_json(folder / "train_summary.json")
    tune = summary["tune"]
    print(
        f"{folder}: entity model (best epoch {summary['best_epoch']}, threshold {summary['coref_threshold']:.2f}); "
        f"tuning file: mention F1 {100 * tune['mention']['f1']:.2f}, CoNLL F1 {100 * tune['conll_f1']:.2f}, "
        f"type accuracy {100 * tune['type_accuracy']:.2f}  ({summary['seconds']:.0f} s)"
    )
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from lmrc.entities.evaluate import evaluate, format_report  # torch: see lmrc.commands

    check_paths(
        entity_model_path(args.entities) + named("--gold", args.gold),
        named("--output", args.output) + named("--text-output", args.text_output),
        overwrite=args.overwrite,
    )
    report = evaluate(args.entities, args.gold, text_output=args.text_output)
    if args.output is not None:
        atomic_write_json(args.output, report, indent=2)
    print(format_report(report))
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    check_paths(
        named("--result", args.result) + named("--built", args.built) + named("--gold", args.gold),
        named("--output", args.output),
        overwrite=args.overwrite,
    )
    scores = score_files(args.result, args.built, args.gold)
    if args.output is not None:
        atomic_write_json(args.output, scores, indent=2)
    print(format_scores(scores))
    return 0
