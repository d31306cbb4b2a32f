"""Training plumbing shared by both stages: RNG snapshots, length-grouped batches, the warmup schedule, and the check that a resumed run has the settings of the interrupted one."""

from __future__ import annotations

import logging
import os
import random
import signal
import threading
from collections.abc import Collection, Sequence
from typing import Any

log = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------------------- RNG


def capture_rng() -> dict[str, Any]:
    """This process's RNG states (python, numpy, torch CPU, every CUDA device), as lists and tensors (safe for
    `torch.load(weights_only=True)` and for JSON + safetensors)."""
    import numpy as np
    import torch

    version, internal, gauss = random.getstate()
    np_state = np.random.get_state()
    return {
        "python": [version, list(internal), gauss],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
        "cuda": list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else [],
    }


def restore_rng(state: dict[str, Any]) -> None:
    import numpy as np
    import torch

    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "numpy" in state:
        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------------------------------- processes


def distributed_engine() -> str:
    """The engine `accelerate launch` set up for this process: "deepspeed", "fsdp", or "ddp" (also one process)."""
    from accelerate.utils import str_to_bool

    if str_to_bool(os.environ.get("ACCELERATE_USE_DEEPSPEED", "false")):
        return "deepspeed"
    if str_to_bool(os.environ.get("ACCELERATE_USE_FSDP", "false")):
        return "fsdp"
    return "ddp"


def process_rank() -> int:
    """This process's global rank under torchrun / accelerate launch (0 when run alone), from the environment,
    so that it is known before any process group exists (e.g. to open train.log on rank 0 only)."""
    return int(os.environ.get("RANK", "0") or 0)


def is_main_process() -> bool:
    return process_rank() == 0


# --------------------------------------------------------------------------------------------------- batches


def length_grouped_batches(
    lengths: Sequence[int], batch_size: int, seed: int, shuffle: bool = True, group: int = 50
) -> list[list[int]]:
    """Batches of indices of similar lengths, to cut padding.

    Without shuffling: sorted by length (longest first). With shuffling (as Hugging Face's LengthGroupedSampler):
    a seeded permutation is cut into mega-batches of `group` batches, each sorted by length and cut into batches,
    and the batch order is shuffled; pass a different seed per epoch.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    n = len(lengths)
    if not shuffle:
        order = sorted(range(n), key=lambda i: (-lengths[i], i))
        return [order[i : i + batch_size] for i in range(0, n, batch_size)]
    rng = random.Random(seed)
    perm = list(range(n))
    rng.shuffle(perm)
    mega = group * batch_size
    batches: list[list[int]] = []
    for m in range(0, n, mega):
        chunk = sorted(perm[m : m + mega], key=lambda i: -lengths[i])
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    rng.shuffle(batches)
    return batches


def linear_schedule(optimizer: Any, warmup: int, total: int) -> Any:
    """Linear warmup from 0 over `warmup` steps, then linear decay to 0 at `total` (ATLOP Sec. 4.1; LMRC)."""
    from transformers import get_linear_schedule_with_warmup

    return get_linear_schedule_with_warmup(optimizer, warmup, total)


# ---------------------------------------------------------------------------------------------------- resume


def flatten(d: dict, prefix: str = "", keep: Collection[str] = ()) -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; sections named in `keep` stay whole (free-form parameter dicts)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and key not in keep:
            out.update(flatten(v, key + ".", keep))
        else:
            out[key] = v
    return out


def changed_setting(
    saved: dict, current: dict, allowed: Collection[str] = (), keep: Collection[str] = ()
) -> tuple[str, Any, Any] | None:
    """The first setting (a dotted key) that differs between two configs as dicts, ignoring `allowed` keys and
    the sections below them; None when a run may resume with `current`."""
    a, b = flatten(saved, keep=keep), flatten(current, keep=keep)
    for key in sorted(set(a) | set(b)):
        if any(key == p or key.startswith(p + ".") for p in allowed):
            continue
        if a.get(key) != b.get(key):
            return key, a.get(key), b.get(key)
    return None


# --------------------------------------------------------------------------------------------------- interrupts


class StopRequest:
    """Ctrl-C / SIGTERM during training set `requested`; the training loop stops at the end of the step, where all
    processes agree on it (one rank's signal stops every rank at the same step, which saves and exits). A second
    Ctrl-C raises KeyboardInterrupt at once. Signal handlers can only be set in the main thread; elsewhere it is a
    flag nobody sets."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        log.warning("interrupted: finishing the current step, then saving the state (Ctrl-C again aborts)")

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
