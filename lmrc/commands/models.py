"""`lmrc models list` and `lmrc models prepare NAME`: the packaged default models and where they resolve."""

from __future__ import annotations

import argparse
from pathlib import Path

from lmrc.models import store as models


def register(subparsers) -> None:
    p = subparsers.add_parser("models", help="list or prepare the packaged default models")
    sub = p.add_subparsers(dest="models_command", metavar="SUBCOMMAND")

    ls = sub.add_parser("list", help="show each default model, where it resolves and whether it is ready")
    _add_cache_arg(ls)
    ls.set_defaults(func=cmd_list)

    prep = sub.add_parser(
        "prepare", help="resolve a model name (converting a packaged GGUF once) and print its local folder"
    )
    prep.add_argument("name", help="a default (minilm, smollm2-135m), a model folder or a Hugging Face id")
    _add_cache_arg(prep)
    prep.set_defaults(func=cmd_prepare)

    def show_help(args) -> int:
        p.print_help()
        return 0

    p.set_defaults(func=show_help)


def _add_cache_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="where converted models live (default: $LMRC_CACHE or ~/.cache/lmrc)",
    )


def cmd_list(args) -> int:
    infos = models.list_models(args.cache_dir)
    rows = [("NAME", "PRESENT", "READY", "RESOLVES TO", "DESCRIPTION")]
    for info in infos:
        ready = "yes" if info.converted else f"no (lmrc models prepare {info.name})" if info.present else "no"
        where = str(info.resolves_to) if info.resolves_to else f"- ({info.pip_command})"
        rows.append((info.name, "yes" if info.present else "no", ready, where, info.description))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    return 0


def cmd_prepare(args) -> int:
    print(models.resolve(args.name, args.cache_dir))
    return 0
