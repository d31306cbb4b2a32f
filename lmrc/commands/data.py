"""`lmrc data validate | stats | split | fetch`: check, describe, split and obtain DocRED-format data."""

from __future__ import annotations

import argparse
from pathlib import Path

from lmrc.commands import data_import
from lmrc.commands.common import (
    add_command,
    add_entities_arg,
    add_overwrite_arg,
    entity_model_path,
    non_negative_int,
    positive_float,
)
from lmrc.data.docred import load_documents, validate_raw
from lmrc.data.fetch import fetch_redocred
from lmrc.data.relations import RelationSet, load_relations
from lmrc.data.split import manifest_path, parse_ratios, split_file, split_output_paths
from lmrc.data.stats import document_stats
from lmrc.errors import LmrcError
from lmrc.io import atomic_write_json, read_json
from lmrc.paths import check_paths, check_writable_folder, named, same_file


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="validate, describe, split and fetch DocRED-format data")
    data_sub = p.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)
    validate = add_command(
        data_sub,
        "validate",
        cmd_validate,
        help="check a DocRED-format file; exit 0 when clean, 1 with a report of its problems",
        description='Check a DocRED-format file. Each problem is one line `FILE: document I ("TITLE"): FIELD: '
        "MESSAGE`. Exit 0 when there are no errors, 1 otherwise; duplicate facts are warnings (exit 0) unless "
        "--strict. Unreadable or malformed JSON exits 2.",
    )
    validate.add_argument("file", type=Path, help="DocRED-format JSON file")
    validate.add_argument(
        "--rel-info", type=Path, help="relation inventory (rel_info.json): also check relation ids"
    )
    validate.add_argument(
        "--max-problems",
        type=non_negative_int,
        default=100,
        metavar="N",
        help="list at most N problems (0: all; default 100)",
    )
    validate.add_argument("--strict", action="store_true", help="treat warnings (duplicate facts) as errors")
    stats = add_command(data_sub, "stats", cmd_stats, help="corpus statistics of a DocRED-format file")
    stats.add_argument("file", type=Path, help="DocRED-format JSON file")
    stats.add_argument(
        "--rel-info", type=Path, help="relation inventory: check relation ids and show their names"
    )
    stats.add_argument(
        "--top", type=non_negative_int, default=10, metavar="N", help="show the N most frequent relations"
    )
    stats.add_argument("--json", type=Path, metavar="OUT", help="also write the statistics as JSON to OUT")
    add_overwrite_arg(stats)
    _register_split(data_sub)
    _register_from_text(data_sub)
    _register_fetch(data_sub)
    data_import.register(data_sub)


def _register_split(data_sub: argparse._SubParsersAction) -> None:
    split = add_command(
        data_sub,
        "split",
        cmd_split,
        help="seeded document-level split into <stem>_split0.json, <stem>_split1.json, ...",
        description="Shuffle the documents with the seed and cut them into parts of the given ratios; each part "
        "keeps the original file order and every field of every document. Writes <stem>_split<i>.json per "
        "ratio and <stem>_split_manifest.json (seed, ratios, source sha256, indices).",
    )
    split.add_argument("file", type=Path, help="DocRED-format JSON file")
    split.add_argument(
        "--ratios", required=True, help="comma-separated part sizes summing to 1, e.g. 0.9,0.1"
    )
    split.add_argument("--seed", type=int, required=True)
    split.add_argument("--out-dir", type=Path, required=True)
    add_overwrite_arg(split, "existing split files")


def _register_fetch(data_sub: argparse._SubParsersAction) -> None:
    fetch = add_command(
        data_sub,
        "fetch",
        cmd_fetch,
        help="get the official Re-DocRED train/dev/test files (sha256-verified, atomic)",
        description="Download the official Re-DocRED files into $LMRC_CACHE/redocred (default "
        "~/.cache/lmrc/redocred), or copy them from a local copy (--from DIR, or LMRC_DATA_DIR) that holds "
        "redocred/<file>. Files the local copy lacks are reported with their download URL (exit 1).",
    )
    fetch.add_argument("dataset", choices=["redocred"])
    fetch.add_argument("--to", type=Path, metavar="DIR", help="output folder (default $LMRC_CACHE/redocred)")
    fetch.add_argument("--from", dest="from_dir", type=Path, metavar="DIR", help="copy from this local copy")
    fetch.add_argument(
        "--url", help="download from this base URL (default $LMRC_REDOCRED_URL, else the official)"
    )
    fetch.add_argument("--files", default="train,dev,test", help="which files (default train,dev,test)")
    fetch.add_argument(
        "--force", action="store_true", help="fetch again even when a good copy is already there"
    )
    fetch.add_argument(
        "--timeout", type=positive_float, default=60.0, help="network timeout in seconds (default 60)"
    )


def _register_from_text(data_sub: argparse._SubParsersAction) -> None:
    from_text = add_command(
        data_sub,
        "from-text",
        cmd_from_text,
        help="build DocRED documents (entities, coreference) from plain text",
        description="Read a .txt file, a folder of .txt files or JSON lines {title, text}; cut sentences and "
        "tokens (spaCy), find and group the entity mentions with --entities, and write DocRED documents (with "
        "their text and token character offsets) for inspection or `lmrc predict --input`. Unreadable, empty or "
        "binary texts are reported one line each and skipped.",
    )
    from_text.add_argument("input", type=Path, help=".txt file, folder of .txt files, or .jsonl")
    add_entities_arg(from_text, required=True)
    from_text.add_argument("--output", required=True, type=Path, help="DocRED-format JSON file to write")
    add_overwrite_arg(from_text)


def _relations(path: Path | None) -> RelationSet | None:
    return load_relations(path) if path is not None else None


def cmd_validate(args: argparse.Namespace) -> int:
    relations = _relations(args.rel_info)
    data = read_json(args.file)
    problems = validate_raw(data, relations)
    n_errors = sum(p.severity == "error" for p in problems)
    n_warnings = len(problems) - n_errors
    limit = args.max_problems if args.max_problems > 0 else len(problems)
    for p in problems[:limit]:
        if p.severity == "warning":
            print(f"{args.file}: {p.where}: warning: {p.message}")
        else:
            print(p.format(args.file))
    if len(problems) > limit:
        print(f"... and {len(problems) - limit} more problems (--max-problems 0 lists all)")
    n_docs = len(data) if isinstance(data, list) else 0
    failed = n_errors > 0 or (args.strict and n_warnings > 0)
    verdict = "FAILED" if failed else "OK"
    print(f"{args.file}: {verdict}: {n_docs} documents, {n_errors} errors, {n_warnings} warnings")
    if relations is None:
        print("(relation ids not checked: pass --rel-info rel_info.json)")
    return 1 if failed else 0


def cmd_stats(args: argparse.Namespace) -> int:
    check_paths(
        named("the input", args.file) + named("--rel-info", args.rel_info),
        named("--json", args.json),
        overwrite=args.overwrite,
    )
    relations = _relations(args.rel_info)
    stats = document_stats(load_documents(args.file, relations), relations)
    if args.json is not None:
        atomic_write_json(args.json, stats, indent=2)
    print(format_stats(stats, str(args.file), args.top))
    return 0


def format_stats(stats: dict, title: str, top: int = 10) -> str:
    def count(key: str, per: str | None = None) -> str:
        value, n = stats[key], stats[per] if per else None
        if value is None:
            return "-"
        return f"{value:,}" + (f"  ({value / n:.1f} per document)" if n else "")

    def share(key: str) -> str:
        if stats[key] is None:
            return "-"
        return f"{stats[key]:,}  ({stats[key] / stats['facts']:.1%})" if stats["facts"] else f"{stats[key]:,}"

    na = "-" if stats["na_ratio"] is None else f"{stats['na_ratio']:.4f}"
    rows = [
        ("documents", count("documents")),
        ("labelled documents", count("labelled_documents")),
        ("sentences", count("sentences", "documents")),
        ("tokens", count("tokens", "documents")),
        ("entities", count("entities", "documents")),
        ("mentions", count("mentions", "documents")),
        ("entity pairs", count("entity_pairs", "documents")),
        ("facts", count("facts", "labelled_documents")),
        ("pairs with >= 1 relation", count("pairs_with_relation")),
        ("NA ratio (pairs without relation)", na),
        ("intra-sentence facts", share("intra_sentence_facts")),
        ("inter-sentence facts", share("inter_sentence_facts")),
        ("relation types", count("relation_types")),
    ]
    width = max(len(k) for k, _ in rows)
    lines = [title] + [f"  {k:<{width}}  {v}" for k, v in rows]
    ranked = stats["relations"][: max(top, 0)]
    if ranked:
        lines.append(f"top {len(ranked)} relations by count:")
        id_width = max(len(r["id"]) for r in ranked)
        for r in ranked:
            name = f"  {r['name']}" if r["name"] else ""
            lines.append(f"  {r['count']:>7,}  {r['id']:<{id_width}}{name}")
    return "\n".join(lines)


def cmd_split(args: argparse.Namespace) -> int:
    ratios = parse_ratios(args.ratios)
    parts = split_output_paths(args.file, args.out_dir, len(ratios))
    check_paths(
        named("the input", args.file),
        named("a split part", parts) + named("the manifest", manifest_path(args.file, args.out_dir)),
        overwrite=args.overwrite,
    )
    parts = split_file(args.file, ratios, args.seed, args.out_dir)
    for p in parts:
        print(f"{p.path}: {len(p.indices)} documents (ratio {p.ratio:g})")
    print(f"{manifest_path(args.file, args.out_dir)}: seed {args.seed}, source indices of each part")
    return 0


def cmd_fetch(args: argparse.Namespace) -> int:
    if args.to is not None and args.from_dir is not None:
        for source in (args.from_dir, args.from_dir / "redocred"):
            if same_file(args.to, source):
                raise LmrcError(f"{args.to}: --to is the local copy read with --from; choose another folder")
    check_writable_folder("--to", args.to)
    results = fetch_redocred(
        args.to,
        files=args.files,
        from_dir=args.from_dir,
        base_url=args.url,
        timeout=args.timeout,
        force=args.force,
    )
    for r in results:
        if r.status == "missing":
            print(f"{r.name}: missing from the local copy; get it from {r.source}")
            continue
        check = "sha256 verified" if r.verified else f"sha256 {r.sha256} (no published hash)"
        print(f"{r.name}: {r.status} -> {r.path}  [{check}]")
    return 1 if any(r.status == "missing" for r in results) else 0


def cmd_from_text(args: argparse.Namespace) -> int:
    from lmrc.entities.run import build_file  # torch: see lmrc.commands

    check_paths(
        named("INPUT", args.input) + entity_model_path(args.entities),
        named("--output", args.output),
        overwrite=args.overwrite,
    )
    docs, stats = build_file(args.input, args.entities, args.output)  # skipped texts: one warning line each
    print(
        f"{args.output}: {len(docs)} documents, {stats.entities} entities, {stats.mentions} mentions "
        f"({stats.seconds / max(len(docs), 1):.2f} s per document); {len(stats.skipped)} skipped"
    )
    return 0
