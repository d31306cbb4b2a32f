"""`lmrc entities train | evaluate | score`: the entity model of text input, and what it costs end to end."""

from __future__ import annotations

import argparse
from pathlib import Path

from lmrc.commands.common import add_config_args, add_overwrite_arg, log_to_file, sigterm_as_interrupt
from lmrc.io import atomic_write_json
from lmrc.paths import check_paths, check_writable_folder, named


def register(sub) -> None:
    p = sub.add_parser(
        "entities", help="train and measure the entity model that turns plain text into documents"
    )
    e_sub = p.add_subparsers(dest="entities_command", metavar="SUBCOMMAND", required=True)

    t = e_sub.add_parser(
        "train",
        help="train the mention tagger and the coreference scorer on DocRED-format files",
        description="Train a BIO mention tagger (DocRED types) on the encoder, then a mention-pair coreference "
        "scorer on the vertexSet clusters, with the best epoch and the clustering threshold chosen on the tuning "
        "file. The output folder is the checkpoint for `lmrc predict --text --entities DIR`. Resumable: state "
        "after every epoch; continue with --resume.",
    )
    add_config_args(t)
    t.add_argument("--output-dir", type=Path, help="output folder (default: the config's output_dir)")
    t.add_argument(
        "--resume",
        action="store_true",
        help="continue after the last finished epoch (same config; without --config the run's saved config.yaml)",
    )
    t.set_defaults(func=cmd_train)

    ev = e_sub.add_parser(
        "evaluate",
        help="mention, clustering and type scores on a DocRED file turned into plain text",
        description="Turn every document of a DocRED-format file into plain text, build its entities again with "
        "--entities, and score them against the file's: mention P/R/F1 (exact span and type), MUC, B-cubed, "
        "CEAF-e, their average (CoNLL F1), entity exact match, entity type accuracy; time per document, memory.",
    )
    ev.add_argument("--entities", required=True, help="entity checkpoint folder, or spacy:<pipeline>")
    ev.add_argument("--gold", required=True, type=Path, help="DocRED-format file with entities")
    ev.add_argument("--output", type=Path, help="also write the scores as JSON")
    ev.add_argument("--text-output", type=Path, metavar="JSONL", help="also write the texts as JSON lines")
    add_overwrite_arg(ev)
    ev.set_defaults(func=cmd_evaluate)

    sc = e_sub.add_parser(
        "score",
        help="end-to-end relation scores of predictions on built documents against gold documents",
        description="Score a result file of `lmrc predict --text` (whose entities were built from text) against "
        "the gold DocRED file of the same texts: strict (a predicted head or tail counts when its mentions equal "
        "a gold entity's, as JEREX) and lenient (it shares a mention span with the gold entity).",
    )
    sc.add_argument("--result", required=True, type=Path, help="result file of lmrc predict")
    sc.add_argument(
        "--built", required=True, type=Path, help="the built documents (<output stem>.text-docs.json)"
    )
    sc.add_argument("--gold", required=True, type=Path, help="gold DocRED-format file")
    sc.add_argument("--output", type=Path, help="also write the scores as JSON")
    add_overwrite_arg(sc)
    sc.set_defaults(func=cmd_score)


def cmd_train(args: argparse.Namespace) -> int:
    from lmrc.config import load_config
    from lmrc.entities.config import EntitiesConfig
    from lmrc.entities.train import train

    config = args.config
    if args.resume and config is None and args.output_dir and (args.output_dir / "config.yaml").is_file():
        config = args.output_dir / "config.yaml"  # --resume without --config: the run's own saved config
    cfg = load_config(EntitiesConfig, config, args.overrides)
    out = Path(args.output_dir or cfg.output_dir)
    check_writable_folder("--output-dir", out)
    with sigterm_as_interrupt(), log_to_file(out / "train.log"):
        folder = train(cfg, out, resume=args.resume)
    from lmrc.io import read_json

    s = read_json(folder / "train_summary.json")
    t = s["tune"]
    print(
        f"{folder}: entity model (best epoch {s['best_epoch']}, threshold {s['coref_threshold']:.2f}); tuning file: "
        f"mention F1 {100 * t['mention']['f1']:.2f}, CoNLL F1 {100 * t['conll_f1']:.2f}, "
        f"type accuracy {100 * t['type_accuracy']:.2f}  ({s['seconds']:.0f} s)"
    )
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from lmrc.entities.evaluate import evaluate, format_report

    entities = (
        [] if str(args.entities).startswith(("spacy:", "gold:")) else named("--entities", args.entities)
    )
    check_paths(
        entities + named("--gold", args.gold),
        named("--output", args.output) + named("--text-output", args.text_output),
        overwrite=args.overwrite,
    )
    report = evaluate(args.entities, args.gold, text_output=args.text_output)
    if args.output is not None:
        atomic_write_json(args.output, report, indent=2)
    print(format_report(report))
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    from lmrc.entities.e2e import format_scores, score_files

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
