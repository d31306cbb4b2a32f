"""A training run's folder, written once for the three trainers (stage 1, stage 2, the entity model).

- Starting (`open_run`): a new run refuses a folder that holds one; `--resume` continues the saved state when
  there is one. The saved `config.yaml` is the run's fingerprint: a resumed run must have the same settings,
  except those its trainer names as harmless (where to write, how often to log); `check_same_config` names the
  first setting that differs.
- Interrupts (`StopRequest`): Ctrl-C / SIGTERM set a flag the loop reads at the end of a step, where every
  process can agree on it, save that step and stop.
- The resume state (`ResumeState`): the trainer's position, optimizer, scheduler, every process's RNG states and
  the fp16 loss scaler, as safetensors + JSON (nothing here unpickles), its position file written last.
- Snapshots (`publish`): a folder is filled under a temporary name and swapped in (lmrc.io), so an interruption
  leaves the previous version whole.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import signal
import threading
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from lmrc.config import from_dict, read_yaml, to_dict
from lmrc.errors import LmrcError
from lmrc.io import atomic_write_json, atomic_write_text, read_json, read_jsonl, write_dir_atomically

log = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"  # the resolved config, written when a run starts: the run's fingerprint
POSITION_FILE = (
    "trainer_state.json"  # a resume state's position, written last: its presence marks it complete
)
ConfigT = TypeVar("ConfigT")

# ---------------------------------------------------------------------------------------------- starting a run


def open_run(
    out: Path, resume: bool, *, state_file: Path, markers: Collection[Path] = (), what: str = "a training run"
) -> bool:
    """True when `out` holds a saved state to continue (`state_file`, the file that marks it complete).

    Without `resume`, a folder holding a run (its state, or one of the `markers` of a finished run) is refused;
    with `resume` and nothing saved, a new run starts. Only reads: with several processes, rank 0 first undoes
    an interrupted folder swap (`lmrc.io.recover_dir`) and every rank calls this after the barrier.
    """
    has_state = state_file.is_file()
    if not resume:
        if has_state or any(Path(m).exists() for m in markers):
            raise LmrcError(
                f"{out}: holds {what} already; pass --resume to continue it, or choose another --output-dir"
            )
        return False
    if not has_state:
        log.info("%s: nothing to resume, starting a new run", out)
    return has_state


def read_saved_config(config_type: type[ConfigT], out: Path) -> ConfigT:
    """The resolved config an existing run saved (for `--resume` without `--config`, and its fingerprint)."""
    path = Path(out) / CONFIG_FILE
    if not path.is_file():
        raise LmrcError(f"{path}: not found; is {out} a training folder?")
    return from_dict(config_type, read_yaml(path), str(path))


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


def check_same_config(
    saved: Any, current: Any, where: Path, allowed: Collection[str] = (), keep: Collection[str] = ()
) -> None:
    """Refuse to resume the run whose config is `saved` (a config dataclass, read from `where`) with `current`
    when a setting other than the `allowed` ones differs: the continued run would not be the one started."""
    diff = changed_setting(to_dict(saved), to_dict(current), allowed, keep)
    if diff is not None:
        key, old, new = diff
        raise LmrcError(
            f"{where}: cannot resume with a different config: {key} was {old!r}, now {new!r} "
            "(use the same config, or another --output-dir)"
        )


def forget_records_after(path: Path, keep: Callable[[dict], bool]) -> None:
    """Rewrite a JSON-lines log without the records the restored state has not reached (written after the
    last save; those steps run again), so a resumed run's log reads as the uninterrupted run's would."""
    records = read_jsonl(path)
    kept = [r for r in records if keep(r)]
    if len(kept) != len(records):
        log.info("%s: dropping %d records written after the saved state", path, len(records) - len(kept))
        atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept))


def publish(path: Path, *writers: Callable[[Path], None]) -> None:
    """Write the folder `path` as a whole: every writer fills a temporary sibling folder in turn, which is then
    swapped in for `path` (an interruption leaves the previous version, see lmrc.io.write_dir_atomically)."""

    def write(folder: Path) -> None:
        for fill in writers:
            fill(folder)

    write_dir_atomically(path, write)


# -------------------------------------------------------------------------------------------------- interrupts


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


# --------------------------------------------------------------------------------------------------------- RNG


def capture_rng() -> dict[str, Any]:
    """This process's RNG states (python, numpy, torch CPU, every CUDA device), as lists and tensors (for JSON +
    safetensors)."""
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state()
    return {
        "python": [version, list(internal), gauss],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
        "cuda": list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else [],
    }


def restore_rng(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "numpy" in state:
        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------------------------------ resume state


@dataclass
class ResumeState:
    """What `--resume` restores besides the weights: where the trainer stands and the state of everything that
    decides its next step."""

    position: dict[str, Any]  # the trainer's counters (epoch, step, best value, ...), as JSON
    optimizer: dict[str, Any]  # torch optimizer state_dict
    scheduler: dict[str, Any] | None = None  # learning-rate scheduler state_dict
    rng: list[dict[str, Any]] = field(default_factory=list)  # capture_rng() of every process, by rank
    # fp16 on CUDA: the loss scaler's scale and growth tracker (a fresh scaler would restart at 2**16 and skip
    # steps on overflow until it has shrunk again, so the resumed run would differ). None without fp16.
    scaler: dict[str, Any] | None = None


def write_resume_state(folder: Path, state: ResumeState, position_file: str = POSITION_FILE) -> None:
    """Write the state's files into `folder` (meant for a folder being `publish`ed); the position file last."""
    folder = Path(folder)
    tensors, opt_json = _split_optimizer_state(state.optimizer)
    save_file(tensors, str(folder / "optimizer.safetensors"))
    atomic_write_json(folder / "optimizer.json", opt_json)
    if state.scheduler is not None:
        atomic_write_json(folder / "scheduler.json", jsonable(state.scheduler, "scheduler"))
    if state.rng:
        rng_tensors, rng_json = {}, []
        for rank, rng in enumerate(state.rng):
            rng_tensors[f"{rank}.torch"] = rng["torch"]
            for i, cuda_state in enumerate(rng.get("cuda", [])):
                rng_tensors[f"{rank}.cuda.{i}"] = cuda_state
            rng_json.append(
                {"python": rng["python"], "numpy": rng["numpy"], "n_cuda": len(rng.get("cuda", []))}
            )
        save_file(rng_tensors, str(folder / "rng.safetensors"))
        atomic_write_json(folder / "rng.json", rng_json)
    if state.scaler is not None:
        atomic_write_json(folder / "scaler.json", jsonable(state.scaler, "scaler"))
    atomic_write_json(folder / position_file, state.position, indent=1)


def read_resume_state(
    folder: Path, position_file: str = POSITION_FILE, parts: Collection[str] = ("scheduler", "rng")
) -> ResumeState:
    """The state `write_resume_state` wrote; `parts`: what the trainer saves besides its position and optimizer
    ("scheduler", "rng"), refused when missing."""
    folder = Path(folder)
    needed = [position_file, "optimizer.json", "optimizer.safetensors"] + [f"{p}.json" for p in parts]
    for name in needed:
        if not (folder / name).is_file():
            raise LmrcError(f"{folder / name}: missing; {folder} is not a resumable training state")
    optimizer = _join_optimizer_state(
        load_file(str(folder / "optimizer.safetensors")), read_json(folder / "optimizer.json")
    )
    scheduler = read_json(folder / "scheduler.json") if (folder / "scheduler.json").is_file() else None
    rng = []
    if (folder / "rng.json").is_file():
        rng_tensors = load_file(str(folder / "rng.safetensors"))
        for rank, item in enumerate(read_json(folder / "rng.json")):
            rng.append(
                {
                    "python": item["python"],
                    "numpy": item["numpy"],
                    "torch": rng_tensors[f"{rank}.torch"],
                    "cuda": [rng_tensors[f"{rank}.cuda.{i}"] for i in range(item["n_cuda"])],
                }
            )
    scaler = read_json(folder / "scaler.json") if (folder / "scaler.json").is_file() else None
    position = read_json(folder / position_file)
    return ResumeState(position=position, optimizer=optimizer, scheduler=scheduler, rng=rng, scaler=scaler)


def _split_optimizer_state(sd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """torch optimizer state_dict -> (tensors for safetensors, the JSON rest)."""
    tensors: dict[str, torch.Tensor] = {}
    state_json: dict[str, dict[str, Any]] = {}
    for pid, entries in sd["state"].items():
        state_json[str(pid)] = {}
        for key, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"{pid}.{key}"] = value.detach().to("cpu").contiguous()
                state_json[str(pid)][key] = {"tensor": f"{pid}.{key}"}
            else:
                state_json[str(pid)][key] = {"value": value}
    return tensors, {
        "state": state_json,
        "param_groups": jsonable(sd["param_groups"], "optimizer.param_groups"),
    }


def _join_optimizer_state(tensors: dict[str, torch.Tensor], data: dict[str, Any]) -> dict[str, Any]:
    state = {}
    for pid, entries in data["state"].items():
        state[int(pid)] = {
            k: tensors[v["tensor"]] if "tensor" in v else v["value"] for k, v in entries.items()
        }
    return {"state": state, "param_groups": data["param_groups"]}


def jsonable(value: Any, where: str) -> Any:
    """Lists/dicts/numbers/strings only (tuples become lists); anything else is a programming error."""
    if isinstance(value, dict):
        return {str(k): jsonable(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return jsonable(to_dict(value), where)
    if torch.is_tensor(value) and value.numel() == 1:
        return value.item()
    raise TypeError(f"{where}: cannot store {type(value).__name__} as JSON")
