"""Keep lmrc off CPU kernels that crash or compute wrong on this machine.

Why: on Intel CPUs with AMX (Sapphire Rapids and newer), oneDNN's AMX bf16 kernel (torch 2.13) dies by SIGFPE on
`[32, 49152] @ [49152, 97]`, the tail chunk of stage 1's grouped bilinear, while 64 or 128 rows, K <= 32768 and
AMX turned off (`ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16`) are fine. A fault in native code kills the process with no
Python error, so the only safe way to know whether this machine's kernels work is to try lmrc's own matmul shapes
in a child process. That probe runs once per (CPU, torch build, kernel settings) and its verdict is cached under
the lmrc cache (`<cache>/cpu_guard/<key>.json`); every later run reads the verdict in microseconds.

The verdict keeps AMX's speed wherever that is safe (AMX trains the demo's LoRA adapters ~1.5-2x faster):
- `bf16`: every shape passed; nothing changes.
- `bf16-split-k`: only stage 1's large-K bilinear failed, and the same product summed over K chunks of
  `k_chunk` columns passed: stage 1 computes it that way (lmrc.stage1.model), AMX stays on everywhere.
- `bf16-no-amx`: other shapes failed too, and all pass with oneDNN capped below AMX: lmrc sets
  `ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16` for this process and its children (before oneDNN first runs).
- `float32`: bf16 fails even without AMX: CPU precision "auto" becomes float32, and an explicit bf16 falls back to
  float32 with a warning.
- `not-needed`: the CPU has no native bf16, so lmrc runs float32 on it and never meets a bf16 kernel by default.

`LMRC_CPU_GUARD` overrides it: `auto` (default), `off` (no probe, no change), `no-amx`, `float32`. What the CPU
is lives in lmrc.machine.cpu_info, the probe in lmrc.machine.cpu_probe (its child in lmrc.machine.cpu_probe_child).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.metadata
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from lmrc.errors import LmrcError
from lmrc.io import atomic_write_json
from lmrc.machine.cpu_info import ISA_ENV, NO_AMX_ISA, CpuInfo, read_cpu
from lmrc.machine.cpu_probe import K_CHUNK, probe_cases, run_probe
from lmrc.models.store import default_cache_dir

log = logging.getLogger(__name__)

PROBE_VERSION = 1
MODES = ("bf16", "bf16-split-k", "bf16-no-amx", "float32", "not-needed", "off")
OVERRIDES = ("auto", "off", "no-amx", "float32")
# Everything in the environment that changes which kernels run (or which fault the probe child injects).
_KEY_ENV = (
    *ISA_ENV,
    "OMP_NUM_THREADS",
    "LMRC_CPU_GUARD",
    "LMRC_CPU_PROBE_FAULT",
    "LMRC_CPU_PROBE_FAULT_CAPPED",
)


@dataclass(frozen=True)
class Verdict:
    """What lmrc does on this CPU, and why (see the module docstring for the modes)."""

    mode: str
    reason: str
    cpu_kind: str
    failures: dict[str, str] = dataclasses.field(default_factory=dict)
    isa_cap: str | None = None
    k_chunk: int | None = None
    probe_seconds: float = 0.0
    key: str = ""

    @property
    def bf16_allowed(self) -> bool:
        return self.mode in ("bf16", "bf16-split-k", "bf16-no-amx", "off")

    def line(self) -> str:
        return f"CPU guard: {self.mode} ({self.reason})"


def decide(cpu: CpuInfo, probe=run_probe) -> Verdict:
    """The verdict for `cpu`, probing as needed: native kernels first, then (AMX machines) oneDNN capped below AMX."""
    kind = cpu.kind()
    override = os.environ.get("LMRC_CPU_GUARD", "auto").strip().lower() or "auto"
    if override not in OVERRIDES:
        raise LmrcError(f"LMRC_CPU_GUARD: must be one of {', '.join(OVERRIDES)}, got {override!r}")
    if override == "off":
        return Verdict("off", "LMRC_CPU_GUARD=off: no probe, kernels as torch picks them", kind)
    if override == "float32":
        return Verdict("float32", "LMRC_CPU_GUARD=float32", kind)
    if override == "no-amx":
        if not cpu.amx_in_use:
            return Verdict(
                "bf16" if cpu.native_bf16 else "not-needed", "LMRC_CPU_GUARD=no-amx, no AMX in use", kind
            )
        return Verdict("bf16-no-amx", "LMRC_CPU_GUARD=no-amx", kind, isa_cap=NO_AMX_ISA)
    if not cpu.native_bf16:
        return Verdict("not-needed", "no native bf16: lmrc runs float32 on this CPU", kind)
    first = probe(cpu.isa_cap)
    if not first.failures:
        return Verdict(
            "bf16", f"all {len(probe_cases())} bf16 shapes pass", kind, probe_seconds=first.seconds
        )
    failed = sorted(first.failures)
    summary = f"{len(failed)} bf16 shapes fail, first {failed[0]}: {first.failures[failed[0]]}"
    families = {c.family for c in probe_cases() if c.name in first.failures}
    if families == {"stage1-bilinear"}:
        return Verdict(
            "bf16-split-k",
            f"{summary}; stage 1's bilinear runs in K chunks of {K_CHUNK} (they pass), AMX kept",
            kind,
            first.failures,
            k_chunk=K_CHUNK,
            probe_seconds=first.seconds,
        )
    seconds = first.seconds
    if cpu.amx_in_use:
        capped = probe(NO_AMX_ISA)
        seconds += capped.seconds
        if not capped.failures:
            return Verdict(
                "bf16-no-amx",
                f"{summary}; all pass with ONEDNN_MAX_CPU_ISA={NO_AMX_ISA} (AMX off)",
                kind,
                first.failures,
                isa_cap=NO_AMX_ISA,
                probe_seconds=seconds,
            )
    return Verdict(
        "float32", f"{summary}; bf16 on the CPU turned off", kind, first.failures, probe_seconds=seconds
    )


def cache_key(cpu: CpuInfo) -> str:
    """Everything the kernels oneDNN picks depend on: the CPU, the torch build, the threads and the settings."""
    try:
        torch_version = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        torch_version = "none"
    parts = {
        "probe": PROBE_VERSION,
        "cpu": cpu.model,
        "flags": sorted(cpu.flags),
        "torch": torch_version,
        "cores": os.cpu_count(),
        "env": {k: os.environ.get(k) for k in _KEY_ENV},
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def _cache_dir() -> Path:
    return default_cache_dir() / "cpu_guard"


def verdict(refresh: bool = False, cache: Path | None = None) -> Verdict:
    """This machine's verdict: from the cache, else probed (and cached)."""
    cpu = read_cpu()
    key = cache_key(cpu)
    path = (cache or _cache_dir()) / f"{key}.json"
    if not refresh and path.is_file():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return Verdict(**data)
        except (OSError, ValueError, TypeError):
            pass  # unreadable: probe again
    if cpu.native_bf16 and os.environ.get("LMRC_CPU_GUARD", "auto") == "auto":
        log.info("checking this CPU's bf16 kernels once (%s; cached in %s)", cpu.kind(), path.parent)
    result = dataclasses.replace(decide(cpu), key=key)
    if result.mode not in ("not-needed", "off"):  # the cheap verdicts are recomputed, not cached
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(path, dataclasses.asdict(result), indent=2)
        except OSError as exc:
            log.warning("cannot cache the CPU guard's verdict in %s: %s", path, exc)
    return result


@functools.cache
def ensure() -> Verdict:
    """Decide once per process and apply it: cap oneDNN's ISA when the verdict says so. Must run before oneDNN's
    first kernel (it fixes its ISA then): lmrc's CLI calls it first thing, `lmrc.machine.hardware` before it asks torch
    about bf16. Logs one line when it changes anything."""
    result = verdict()
    if result.isa_cap and os.environ.get("ONEDNN_MAX_CPU_ISA") != result.isa_cap:
        os.environ["ONEDNN_MAX_CPU_ISA"] = result.isa_cap  # children (rows, workers) inherit it
    if result.mode in ("bf16-split-k", "bf16-no-amx", "float32"):
        log.warning("%s", result.line())
    return result


def bilinear_k_chunk() -> int | None:
    """The K chunk stage 1's grouped bilinear must use for bf16 on this CPU (None: one product)."""
    return ensure().k_chunk


def describe() -> dict:
    """For `lmrc env`: the CPU, its kind and the verdict."""
    cpu = read_cpu()
    v = ensure()
    return {
        "cpu": cpu.model,
        "kind": cpu.kind(),
        "flags": sorted(cpu.flags),
        "isa_cap": os.environ.get("ONEDNN_MAX_CPU_ISA"),
        "guard": dataclasses.asdict(v),
    }
