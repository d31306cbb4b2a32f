"""Argument helpers shared by subcommands."""

from __future__ import annotations

import argparse
import os
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


def data_dir() -> Path | None:
    """`LMRC_DATA_DIR`, the folder holding local copies of the data (e.g. ../shared/data)."""
    d = os.environ.get("LMRC_DATA_DIR")
    return Path(d) if d else None
