"""`lmrc data import FORMAT PATH --output docs.json`: annotation tools' exports -> DocRED documents."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lmrc.commands.common import add_command, add_overwrite_arg
from lmrc.data.docred import validate_raw
from lmrc.data.importers import FORMATS, import_file, summary_lines
from lmrc.data.relations import load_relations
from lmrc.errors import LmrcError
from lmrc.io import atomic_write_json
from lmrc.paths import check_paths, named


def register(data_sub: argparse._SubParsersAction) -> None:
    p = add_command(
        data_sub,
        "import",
        cmd_import,
        help="convert annotations (brat, Label Studio, doccano, PubTator, JSON lines) into DocRED documents",
        description="Read what an annotation tool exports and write DocRED documents: lmrc's sentences and "
        "tokens (split where an annotation needs it), mentions grouped into typed entities, relations as labels, "
        "and each document's text and token character offsets. Every problem is one warning line `FILE: PLACE: "
        "PROBLEM` and a count in the closing summary; a file that cannot be read at all exits 2. See docs/DATA.md.",
    )
    p.add_argument("format", choices=sorted(FORMATS), help="the export's format")
    p.add_argument("path", type=Path, help="the export: a file, or for brat a folder of .txt + .ann files")
    p.add_argument("--output", required=True, type=Path, help="DocRED-format JSON file to write")
    p.add_argument(
        "--rel-info", type=Path, metavar="OUT", help="also write the relation inventory found (id -> name)"
    )
    p.add_argument(
        "--relations",
        type=Path,
        metavar="FILE",
        help="an existing rel_info.json: relation labels that are neither its ids nor its names are reported and "
        "skipped, names become ids",
    )
    add_overwrite_arg(p)


def cmd_import(args: argparse.Namespace) -> int:
    files = sorted(p for p in args.path.rglob("*") if p.is_file()) if args.path.is_dir() else []
    check_paths(
        named("PATH", args.path, files) + named("--relations", args.relations),
        named("--output", args.output) + named("--rel-info", args.rel_info),
        overwrite=args.overwrite,
    )
    relations = load_relations(args.relations) if args.relations is not None else None
    result = import_file(args.format, args.path, relations)
    for line in result.problems:
        print(f"lmrc: warning: {line}", file=sys.stderr)
    if not result.documents:
        raise LmrcError(
            f"{args.path}: no document could be converted (see the warnings above); nothing written"
        )
    errors = [p for p in validate_raw(result.documents, relations) if p.severity == "error"]
    if errors:  # the conversion checks each document; this is the last guard before writing
        raise LmrcError(errors[0].format(args.output))
    atomic_write_json(args.output, result.documents)
    print(f"{args.output}: {len(result.documents)} documents from {args.format} {args.path}")
    for line in summary_lines(result):
        print(f"  {line}")
    if args.rel_info is not None:
        if result.relations:
            atomic_write_json(args.rel_info, result.relations, indent=2)
            print(f"{args.rel_info}: {len(result.relations)} relation types")
        else:
            print(f"lmrc: warning: {args.rel_info}: no relation found; not written", file=sys.stderr)
    return 0
