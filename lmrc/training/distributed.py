"""Which distributed engine runs this process, read from what `accelerate launch` set in the environment."""

from __future__ import annotations

import os

from accelerate.utils import str_to_bool


def launched_with(var: str) -> bool:
    """Whether `accelerate launch` set the boolean environment variable `var` (e.g. ACCELERATE_USE_FSDP)."""
    return bool(str_to_bool(os.environ.get(var, "false") or "false"))


def distributed_engine() -> str:
    """The engine `accelerate launch` set up for this process: "deepspeed", "fsdp", or "ddp" (also one process)."""
    if launched_with("ACCELERATE_USE_DEEPSPEED"):
        return "deepspeed"
    if launched_with("ACCELERATE_USE_FSDP"):
        return "fsdp"
    return "ddp"
