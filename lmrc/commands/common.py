"""Argument helpers shared by subcommands."""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import signal
from collections.abc import Callable
from pathlib import Path


def add_config_args(p: argparse.ArgumentParser, default: str | None = None) -> None:
    p.add_argument("--config", default=default, help="YAML config file (defaults are the papers' values)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set train.epochs=3 (repeatable)",
    )


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
