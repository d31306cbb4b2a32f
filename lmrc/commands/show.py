"""`lmrc show`: one offline HTML page of what a run found, per document, against gold where there is gold."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from lmrc.commands.common import add_command, add_overwrite_arg
from lmrc.io import sidecar
from lmrc.paths import check_paths, named

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(
        sub,
        "show",
        run,
        help="write one HTML page of documents, entities and relations (a predict result or a compare folder)",
        description="Write ONE self-contained HTML file (no network, open it by double-click): every document "
        "with its mentions coloured per entity, its relations marked right / wrong / missed against gold, "
        "filters, search, the LLM's raw answers and what became of them, and the scores of lmrc's scorer at the "
        "top. RESULT is a `lmrc predict` result file (its documents are found from its summary, or `--text`'s "
        "documents beside it) or a `lmrc compare` output folder (every row side by side).",
    )
    p.add_argument("result", metavar="RESULT", help="a `lmrc predict` result file or a `lmrc compare` folder")
    p.add_argument(
        "--output",
        "-o",
        metavar="FILE",
        help="the page to write (default: RESULT's .report.html beside it, or report.html in the folder)",
    )
    p.add_argument("--docs", metavar="FILE", help="the documents the run read, when its summary cannot say")
    p.add_argument(
        "--gold",
        metavar="FILE",
        help="a labelled DocRED file with the same titles: mark and score against it",
    )
    p.add_argument(
        "--rel-info", metavar="FILE", help="relation names (default: those the run's summary kept)"
    )
    add_overwrite_arg(p)


def default_output(result: Path) -> Path:
    return result / "report.html" if result.is_dir() else sidecar(result, ".report.html")


def run(args: argparse.Namespace) -> int:
    from lmrc.show import collect, page  # handlers import heavy modules inside (lmrc.commands)

    result = Path(args.result)
    output = Path(args.output) if args.output else default_output(result)
    check_paths(
        named("RESULT", result if result.is_file() else None)
        + named("--docs", args.docs)
        + named("--gold", args.gold)
        + named("--rel-info", args.rel_info),
        named("--output", output),
        overwrite=args.overwrite,
    )
    gold = Path(args.gold) if args.gold else None
    rel_info = Path(args.rel_info) if args.rel_info else None
    if result.is_dir():
        source = collect.from_compare_folder(result, gold, rel_info)
    else:
        docs = Path(args.docs) if args.docs else None
        source = collect.from_predict_run(result, docs, gold, rel_info)
    page.write_page(collect.payload(source), output)
    print(f"{output}: {len(source.docs)} documents, {len(source.methods)} method(s); open it in a browser")
    return 0
