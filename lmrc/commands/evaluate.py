"""`lmrc evaluate`: score an official-format result file against a gold DocRED file."""

from __future__ import annotations

import argparse
import logging

from lmrc.commands.common import add_command, add_overwrite_arg
from lmrc.data.docred import load_labelled
from lmrc.data.relations import load_relations
from lmrc.eval.metrics import TrainReference, evaluate, load_predictions
from lmrc.eval.report import format_table
from lmrc.io import atomic_write_json
from lmrc.paths import check_paths, named

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(
        sub,
        "evaluate",
        run,
        help="score predictions with the official DocRED metrics (P/R/F1, Ign F1, evidence, intra/inter, ...)",
        description="Score a result file (a JSON list of {title, h_idx, t_idx, r[, evidence]}) against a labelled "
        "DocRED file, with the semantics of the official DocRED evaluation script.",
    )
    p.add_argument("--pred", required=True, metavar="FILE", help="predictions in the official result format")
    p.add_argument(
        "--gold", required=True, metavar="FILE", help="labelled DocRED file (e.g. dev_revised.json)"
    )
    p.add_argument(
        "--train",
        action="extend",
        nargs="+",
        default=[],
        metavar="FILE",
        help="train file(s) for Ign F1 and frequent/long-tail F1 (repeatable); without them Ign equals the "
        "ordinary score",
    )
    p.add_argument(
        "--rel-info", metavar="FILE", help="rel_info.json: checks relation ids, names the per-relation rows"
    )
    p.add_argument("--out", metavar="FILE", help="write all metrics as JSON here")
    p.add_argument("--per-relation", action="store_true", help="also print one row per relation")
    add_overwrite_arg(p)


def run(args: argparse.Namespace) -> int:
    check_paths(
        named("--pred", args.pred)
        + named("--gold", args.gold)
        + named("--train", args.train)
        + named("--rel-info", args.rel_info),
        named("--out", args.out),
        overwrite=args.overwrite,
    )
    relations = load_relations(args.rel_info) if args.rel_info else None
    predictions = load_predictions(args.pred)
    if relations is not None:
        unknown = sorted({p["r"] for p in predictions} - set(relations.ids))
        if unknown:
            log.warning("%s: relation ids not in %s (scored as wrong): %s", args.pred, args.rel_info, unknown)
    gold = load_labelled(args.gold, relations, role="gold")
    train = None
    if args.train:
        train = TrainReference.from_documents(
            doc for path in args.train for doc in load_labelled(path, relations, role="train")
        )
    metrics = evaluate(predictions, gold, train)
    print(format_table(metrics, relations.names if relations else None, per_relation=args.per_relation))
    if args.out:
        result = {
            "inputs": {"pred": str(args.pred), "gold": str(args.gold), "train": [str(t) for t in args.train]},
            **metrics.to_dict(),
        }
        if relations is not None:
            result["relation_names"] = {
                rid: relations.names[rid] for rid in metrics.per_relation if rid in relations
            }
        atomic_write_json(args.out, result, indent=2)
        print(f"\nmetrics written to {args.out}")
    return 0
