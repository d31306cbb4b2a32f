"""Argument helpers shared by subcommands: one parser per subcommand (`add_command`), the flag groups that
several commands share (config, run folder, overwrite, stage 1's candidate rule), checked numbers, and the log
file and SIGTERM handling of long runs."""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from lmrc.errors import LmrcError
from lmrc.io import sidecar
from lmrc.paths import Named


def add_command(
    sub: argparse._SubParsersAction,
    name: str,
    func: Callable[[argparse.Namespace], int],
    help: str,
    description: str | None = None,
) -> argparse.ArgumentParser:
    """A subcommand whose handler is `func` (it returns the exit code)."""
    p = sub.add_parser(name, help=help, description=description)
    p.set_defaults(func=func)
    return p


def add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config file (defaults are the papers' values)")
    add_set_arg(p, "override a config value, e.g. --set train.epochs=3 (repeatable)")


def add_set_arg(p: argparse.ArgumentParser, help: str) -> None:
    """`--set KEY=VALUE`, repeatable: the YAML override syntax (lmrc.config.apply_overrides), in `args.overrides`."""
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=help)


def add_run_args(p: argparse.ArgumentParser) -> None:
    """--output-dir / --resume / --stop-after-steps, shared by the long-running `train` commands."""
    p.add_argument("--output-dir", help="output folder (default: the config's output_dir)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in the output folder exactly; without --config its saved config.yaml is used",
    )
    p.add_argument(
        "--stop-after-steps",
        type=positive_int,
        metavar="N",
        help="save the resumable state and exit after N optimizer steps (time-box long runs; then --resume)",
    )


def add_overwrite_arg(p: argparse.ArgumentParser, what: str = "existing output files") -> None:
    p.add_argument(
        "--overwrite",
        action="store_true",
        help=f"replace {what} (without it an existing output is an error, never silently replaced)",
    )


def add_candidate_args(p: argparse.ArgumentParser, tune: bool = True) -> None:
    """Stage 1's candidate rule (lmrc.stage1.config.CandidateSettings): one of --threshold, --recall-target and
    --max-per-doc, and (`tune`) where the recall target's calibration comes from."""
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
        p.add_argument("--tune", type=Path, metavar="FILE", help="labelled tuning file for --recall-target")
        p.add_argument(
            "--calibration",
            type=Path,
            metavar="FILE",
            help="a calibration saved earlier with --save-calibration",
        )


def add_batch_size_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--batch-size", type=positive_int, default=8, help="documents per forward pass (default 8)"
    )


def candidate_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The candidate-rule flags of `add_candidate_args` (and --batch-size, --head-param) as CandidateSettings
    fields; None where a flag was not given, so that a config's value stays (lmrc.config.with_flags)."""
    tune, calibration = getattr(args, "tune", None), getattr(args, "calibration", None)
    return {
        "threshold": args.threshold,
        "recall_target": args.recall_target,
        "max_per_doc": args.max_per_doc,
        "tune": str(tune) if tune is not None else None,
        "calibration": str(calibration) if calibration is not None else None,
        "batch_size": getattr(args, "batch_size", None),
        "head_params": head_params(getattr(args, "head_params", None) or []) or None,
    }


def head_params(items: list[str]) -> dict[str, Any]:
    """`--head-param KEY=VALUE` flags (values read as YAML) as a dict."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise LmrcError(f"--head-param {item}: expected KEY=VALUE")
        out[key.strip()] = yaml.safe_load(value)
    return out


def add_entities_arg(p: argparse.ArgumentParser, required: bool = False, help: str | None = None) -> None:
    p.add_argument(
        "--entities",
        required=required,
        metavar="CKPT",
        help=help or "entity checkpoint (lmrc entities train) or spacy:<pipeline>",
    )


def entity_model_path(entities: str | None) -> list[Named]:
    """--entities as an input path to check: a checkpoint folder (spacy:<pipeline> and gold: name no file)."""
    if entities is None or str(entities).startswith(("spacy:", "gold:")):
        return []
    return [Named("--entities", Path(entities))]


def predict_outputs(output: Path) -> list[Named]:
    """The files a prediction run (`lmrc predict`, `lmrc stage2 predict`, `lmrc merge`) writes beside its result."""
    return [
        Named("the summary", sidecar(output, ".summary.json")),
        Named("the strict-names result", sidecar(output, ".strict.json")),
        Named("the progress file", sidecar(output, ".progress.jsonl")),
    ]


# Numeric options are checked here, where the arguments are parsed, so a bad value is one usage line at once
# (argparse: `lmrc ...: error: argument --batch-size: ...`, exit 2) rather than a traceback deep in a run.


def _number(kind: Callable[[str], float], test: Callable[[float], bool], what: str):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if isinstance(value, float) and not math.isfinite(value) or not test(value):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    parse.__name__ = what  # argparse names the type in some messages
    return parse


positive_int = _number(int, lambda v: v >= 1, "an integer >= 1")
non_negative_int = _number(int, lambda v: v >= 0, "an integer >= 0")
positive_float = _number(float, lambda v: v > 0, "a number > 0")
finite_float = _number(float, lambda v: True, "a finite number")
recall_fraction = _number(float, lambda v: 0 < v <= 1, "a fraction in (0, 1]")
fold_count = _number(int, lambda v: v >= 2, "an integer >= 2")


def data_dir() -> Path | None:
    """`LMRC_DATA_DIR`, the folder holding local copies of the data (e.g. ../shared/data)."""
    d = os.environ.get("LMRC_DATA_DIR")
    return Path(d) if d else None


@contextlib.contextmanager
def log_to_file(path: Path):
    """Also append the log to `path` (long background runs are followed there), at INFO whatever the console.
    Under several processes (torchrun, accelerate launch) only rank 0 writes it, so lines are not doubled."""
    if int(os.environ.get("RANK", "0") or 0) != 0:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
        handler.close()


@contextlib.contextmanager
def sigterm_as_interrupt():
    """SIGTERM (`kill`, a scheduler's time limit) saves the resumable state, as Ctrl-C does."""

    def handler(signum, frame):
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
