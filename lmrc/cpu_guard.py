"""Keep lmrc off CPU kernels that crash or compute wrong on this machine.

Why: on Intel CPUs with AMX (Sapphire Rapids and newer), torch 2.13's oneDNN AMX bf16 kernel dies by SIGFPE on
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

`LMRC_CPU_GUARD` overrides it: `auto` (default), `off` (no probe, no change), `no-amx`, `float32`.
`LMRC_CPU_PROBE_FAULT` / `LMRC_CPU_PROBE_FAULT_CAPPED` (regular expressions over case names) make the probe child
kill itself by SIGFPE before the matching cases, on the first probe / on the probe with AMX capped: that is how the
guard is tested on machines that cannot meet the real crash.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.metadata
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

PROBE_VERSION = 1
NO_AMX_ISA = "AVX512_CORE_BF16"  # oneDNN's highest ISA below AMX
K_CHUNK = 16384  # the bilinear's K chunk: K <= 32768 never crashed
MODES = ("bf16", "bf16-split-k", "bf16-no-amx", "float32", "not-needed", "off")
OVERRIDES = ("auto", "off", "no-amx", "float32")
# oneDNN's ISA names, lowest first (ONEDNN_MAX_CPU_ISA); bf16 matmuls are native from AVX512_CORE_BF16 on.
_ISA_ORDER = (
    "SSE41",
    "AVX",
    "AVX2",
    "AVX2_VNNI",
    "AVX2_VNNI_2",
    "AVX512_CORE",
    "AVX512_CORE_VNNI",
    "AVX512_CORE_BF16",
    "AVX10_1_512",
    "AVX512_CORE_FP16",
    "AVX10_1_512_AMX",
    "AVX512_CORE_AMX",
    "AVX10_1_512_AMX_FP16",
    "AVX512_CORE_AMX_FP16",
    "DEFAULT",
    "ALL",
)
ISA_ENV = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY")  # how a CPU kind is imitated
_KEY_ENV = (*ISA_ENV, "OMP_NUM_THREADS", "LMRC_CPU_GUARD")
X86 = ("x86_64", "AMD64", "i686")
_FAULT_ENV = ("LMRC_CPU_PROBE_FAULT", "LMRC_CPU_PROBE_FAULT_CAPPED")


# ---------------------------------------------------------------------------------------------------------------
# The CPU
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CpuInfo:
    """What decides the kernels oneDNN picks: the model, the relevant flags and the ISA cap in force."""

    model: str
    flags: frozenset[str]
    machine: str
    isa_cap: str | None

    @property
    def has_amx(self) -> bool:
        return "amx_bf16" in self.flags and "amx_tile" in self.flags

    @property
    def hardware_bf16(self) -> bool:
        """bf16 dot products in hardware (AVX512-BF16 or AMX), whatever the cap."""
        return "avx512_bf16" in self.flags or self.has_amx

    @property
    def native_bf16(self) -> bool:
        """bf16 matmuls run natively: the hardware has them and the ISA cap (if any) lets oneDNN use them.

        Without them torch emulates bf16 (measured on an AVX512 Ice Lake without AVX512-BF16: a bf16 matmul 4.6x
        slower than float32; ~10x on AVX2). Non-x86 CPUs are left to torch's own check (lmrc.hardware)."""
        if self.machine not in X86:
            return False
        if not self.hardware_bf16:
            return False
        return isa_allows(self.isa_cap, "AVX512_CORE_BF16")

    @property
    def amx_in_use(self) -> bool:
        return self.has_amx and isa_allows(self.isa_cap, "AVX512_CORE_AMX")

    def kind(self) -> str:
        """The machine kind in words: "AMX", "AVX512 native bf16", "AVX512 no native bf16", "AVX2"."""
        cap = f", oneDNN capped at {self.isa_cap}" if self.isa_cap else ""
        if self.machine not in X86:
            return self.machine + cap
        if self.has_amx:
            base = "AMX"
        elif "avx512_bf16" in self.flags:
            base = "AVX512 native bf16"
        elif "avx512f" in self.flags:
            base = "AVX512 no native bf16"
        elif "avx2" in self.flags:
            base = "AVX2"
        else:
            base = "pre-AVX2"
        return base + cap


_RELEVANT_FLAGS = (
    "avx2",
    "avx512f",
    "avx512_bf16",
    "avx512_fp16",
    "amx_bf16",
    "amx_tile",
    "amx_int8",
    "amx_fp16",
)


def isa_allows(cap: str | None, isa: str) -> bool:
    """Whether oneDNN capped at `cap` may use `isa` (an unknown cap name is taken as no cap, as oneDNN does)."""
    if not cap:
        return True
    cap = cap.strip().upper()
    if cap not in _ISA_ORDER:
        return True
    return _ISA_ORDER.index(cap) >= _ISA_ORDER.index(isa)


def imitable_levels(cpu: CpuInfo) -> list[tuple[str, dict[str, str]]]:
    """The CPU kinds this machine can run as (name, environment): itself; AMX off on an AMX CPU; AVX512 without
    bf16 on a CPU with it; AVX2 on an AVX512 CPU (what the CPU-kind tests and benchmarks/cpu_kinds.py cover)."""
    levels: list[tuple[str, dict[str, str]]] = [("native", {})]
    if cpu.has_amx:
        levels.append(("amx-off", {"ONEDNN_MAX_CPU_ISA": NO_AMX_ISA}))
    if cpu.hardware_bf16:
        levels.append(("avx512-no-bf16", {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE"}))
    if "avx512f" in cpu.flags:
        levels.append(("avx2", {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}))
    return levels


def level_environment(level_env: dict[str, str]) -> dict[str, str]:
    """This process's environment with the ISA settings of one of imitable_levels() in place of its own."""
    env = {k: v for k, v in os.environ.items() if k not in ISA_ENV}
    env.update(level_env)
    return env


def read_cpu(cpuinfo: str = "/proc/cpuinfo") -> CpuInfo:
    """This CPU, from /proc/cpuinfo (Linux); elsewhere from torch's cpuinfo-based checks, which query no kernel."""
    import platform

    model, flags = "", set()
    try:
        with open(cpuinfo, encoding="utf-8") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and not model:
                    model = value.strip()
                elif key in ("flags", "Features") and not flags:
                    flags = set(value.split())
    except OSError:
        flags = _torch_flags()
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or None
    return CpuInfo(
        model=model or platform.processor() or platform.machine(),
        flags=frozenset(f for f in flags if f in _RELEVANT_FLAGS),
        machine=platform.machine(),
        isa_cap=cap,
    )


def _torch_flags() -> set[str]:
    try:
        import torch
    except ImportError:
        return set()
    checks = {
        "avx2": "_is_avx2_supported",
        "avx512f": "_is_avx512_supported",
        "avx512_bf16": "_is_avx512_bf16_supported",
        "amx_tile": "_is_amx_tile_supported",
    }
    flags = {flag for flag, fn in checks.items() if getattr(torch.cpu, fn, lambda: False)()}
    if "amx_tile" in flags:
        flags.add("amx_bf16")
    return flags


# ---------------------------------------------------------------------------------------------------------------
# The probe: lmrc's matmul shapes, each tried in a child process
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One product lmrc computes in bf16: `op` on [m, k] x [k, n] ("linear": F.linear forward and backward, as in
    the encoder, the extractor and the LLM; "mm": stage 1's bilinear forward `g @ w.t()`, summed over K chunks of
    `k_chunk` when set; "sdpa": attention [m heads... ] with `k` = head size and `n` = key length)."""

    name: str
    family: str
    op: str
    m: int
    k: int
    n: int
    k_chunk: int | None = None


def probe_cases() -> tuple[Case, ...]:
    """The shapes and ops lmrc runs in bf16 on a CPU: stage 1's encoder (MiniLM, RoBERTa-large), its extractor and
    grouped bilinear (emb 768 x block 64 = 49,152 inputs; tails of every size class, 2 or 97 relations), LoRA
    training and generation of SmolLM2 and a Llama-7B-wide layer, and attention (training and one-token decoding)."""
    cases: list[Case] = []
    bilinear_k = 768 * 64
    for n in (97, 2):
        for m in (1, 8, 16, 31, 32, 33, 48, 63, 64, 96, 128, 200, 512):
            cases.append(
                Case(f"stage1-bilinear m={m} k={bilinear_k} n={n}", "stage1-bilinear", "mm", m, bilinear_k, n)
            )
            cases.append(
                Case(
                    f"stage1-bilinear-split m={m} k={bilinear_k} n={n}",
                    "stage1-bilinear-split",
                    "mm",
                    m,
                    bilinear_k,
                    n,
                    K_CHUNK,
                )
            )
    for m in (32, 512):  # the bilinear's backward: d(outer) = dlogits @ W, dW = dlogits^T @ outer
        cases.append(
            Case(f"stage1-bilinear-backward m={m}", "stage1-bilinear-backward", "linear", m, bilinear_k, 97)
        )
    for m in (37, 512):
        for k, n in ((384, 384), (384, 1536), (1536, 384), (768, 768), (1024, 4096), (4096, 1024)):
            cases.append(Case(f"encoder m={m} k={k} n={n}", "encoder", "linear", m, k, n))
        for k in (768, 2048):
            cases.append(Case(f"stage1-extractor m={m} k={k} n=768", "encoder", "linear", m, k, 768))
    for m in (1, 8, 24, 512):
        for k, n in ((576, 576), (576, 1536), (1536, 576), (4096, 4096)):
            if not (m == 512 and k == 4096):  # a 7B-wide layer at 512 tokens costs more than it teaches
                cases.append(Case(f"llm m={m} k={k} n={n}", "llm", "linear", m, k, n))
    cases.append(Case("llm-lm-head m=24 k=576 n=49152", "llm", "linear", 24, 576, 49152))
    for k, r in ((576, 8), (576, 64), (4096, 16)):
        cases.append(Case(f"lora-a m=512 k={k} r={r}", "lora", "linear", 512, k, r))
        cases.append(Case(f"lora-b m=512 r={r} n={k}", "lora", "linear", 512, r, k))
    cases.append(Case("attention-train heads=9 d=64 len=512", "attention", "sdpa", 9, 64, 512))
    cases.append(Case("attention-encoder heads=12 d=32 len=512", "attention", "sdpa", 12, 32, 512))
    cases.append(
        Case("attention-decode batch=24 heads=9 d=64 len=600", "attention", "sdpa-decode", 24 * 9, 64, 600)
    )
    return tuple(cases)


def _rel_err(got, ref) -> float:
    import torch

    got, ref = got.float(), ref.float()
    if not torch.isfinite(got).all():
        return float("inf")
    return float((got - ref).norm() / ref.norm().clamp_min(1e-30))


def run_case(case: Case) -> float:
    """Run one case in bf16 and return its largest relative error against float32 on the same bf16 inputs
    (outputs and, for "linear" and "sdpa", gradients): a broken kernel gives O(1) errors or non-finite values."""
    import torch
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen).bfloat16()

    if case.op == "mm":
        a, w = rnd(case.m, case.k), rnd(case.n, case.k)
        if case.k_chunk:
            out = torch.zeros(case.m, case.n)
            for s in range(0, case.k, case.k_chunk):
                out += (a[:, s : s + case.k_chunk] @ w[:, s : s + case.k_chunk].t()).float()
        else:
            out = a @ w.t()
        return _rel_err(out, a.float() @ w.float().t())
    if case.op == "linear":
        x, w, b = rnd(case.m, case.k), rnd(case.n, case.k), rnd(case.n)
        grad = rnd(case.m, case.n)
        errs = []
        outs = []
        for dtype in (torch.bfloat16, torch.float32):
            xx, ww = (t.detach().to(dtype).clone().requires_grad_() for t in (x, w))
            y = F.linear(xx, ww, b.to(dtype))
            y.backward(grad.to(dtype))
            outs.append((y.detach(), xx.grad, ww.grad))
        for got, ref in zip(*outs):
            errs.append(_rel_err(got, ref))
        return max(errs)
    if case.op in ("sdpa", "sdpa-decode"):
        decode = case.op == "sdpa-decode"
        q_len = 1 if decode else case.n
        q, k, v = (
            rnd(1, case.m, q_len, case.k),
            rnd(1, case.m, case.n, case.k),
            rnd(1, case.m, case.n, case.k),
        )
        grad = rnd(1, case.m, q_len, case.k)
        outs = []
        for dtype in (torch.bfloat16, torch.float32):
            qq, kk, vv = (t.detach().to(dtype).clone().requires_grad_(not decode) for t in (q, k, v))
            y = F.scaled_dot_product_attention(qq, kk, vv, is_causal=not decode)
            if decode:
                outs.append((y.detach(),))
            else:
                y.backward(grad.to(dtype))
                outs.append((y.detach(), qq.grad, kk.grad, vv.grad))
        # attention's softmax runs in bf16 too: a few percent off float32 is normal, a broken kernel is not
        return max(_rel_err(g, r) for g, r in zip(*outs)) / 2.5
    raise ValueError(f"unknown probe op {case.op!r}")


MAX_REL_ERR = 0.02  # bf16 output rounding is ~0.4%; a wrong kernel is off by O(1)


def _child_main(indices: list[int]) -> int:
    """The probe child: run the cases of probe_cases() at `indices`, one line per case on stdout ("start i" before
    it, "done i <error>" after it), so that the parent knows which case a crash happened in."""
    import torch

    cases = probe_cases()
    capped = os.environ.get("LMRC_CPU_PROBE_LEVEL") == "capped"
    fault = os.environ.get("LMRC_CPU_PROBE_FAULT_CAPPED" if capped else "LMRC_CPU_PROBE_FAULT")
    torch.manual_seed(0)
    for i in indices:
        print(f"start {i}", flush=True)
        if fault and re.search(fault, cases[i].name):
            os.kill(os.getpid(), signal.SIGFPE)  # the test hook: dies as the AMX kernel does
        err = run_case(cases[i])
        print(f"done {i} {err!r}", flush=True)
    return 0


@dataclass(frozen=True)
class ProbeResult:
    """Failed cases (name -> why) of one probe run under one ISA cap."""

    isa_cap: str | None
    failures: dict[str, str]
    seconds: float


_CHILD = "import sys, lmrc.cpu_guard as g; sys.exit(g._child_main([int(i) for i in sys.argv[1].split(',')]))"


def run_probe(isa_cap: str | None = None, only: str | None = None, timeout: float = 300.0) -> ProbeResult:
    """The cases of probe_cases() (those whose name matches the regular expression `only`, if given) in child
    processes under `isa_cap`: a new child after each crash, going on with the next case."""
    cases = probe_cases()
    todo = [i for i, c in enumerate(cases) if only is None or re.search(only, c.name)]
    env = dict(os.environ, LMRC_CPU_PROBE_LEVEL="capped" if isa_cap else "native")
    if isa_cap:
        env["ONEDNN_MAX_CPU_ISA"] = isa_cap
    failures: dict[str, str] = {}
    t0 = time.monotonic()
    while todo:
        cmd = [sys.executable, "-c", _CHILD, ",".join(map(str, todo))]
        stderr = ""
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
            out, code, stderr = proc.stdout, proc.returncode, proc.stderr or ""
        except subprocess.TimeoutExpired as exc:
            out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
            code = None
        current = None
        for line in out.splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[0] == "start":
                current = int(parts[1])
            elif len(parts) == 3 and parts[0] == "done":
                i, err = int(parts[1]), float(parts[2])
                if not err <= MAX_REL_ERR:  # also catches nan
                    failures[cases[i].name] = f"wrong results (relative error {err:.3g})"
                todo.remove(i)
                current = None
        if code == 0 or not todo:
            break
        blamed = current if current is not None else todo[0]
        if code is None:
            why = f"hung past {timeout:.0f} s"
        elif code < 0:
            why = f"crashed ({_signal_name(-code)})"
        else:
            tail = stderr.strip().splitlines()[-1:] or [f"exit {code}"]
            why = f"failed: {tail[0][:200]}"
        failures[cases[blamed].name] = why
        todo.remove(blamed)
    return ProbeResult(isa_cap, failures, round(time.monotonic() - t0, 2))


def _signal_name(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"signal {sig}"


# ---------------------------------------------------------------------------------------------------------------
# The verdict
# ---------------------------------------------------------------------------------------------------------------


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
        from lmrc.errors import LmrcError

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
        "env": {k: os.environ.get(k) for k in _KEY_ENV + _FAULT_ENV},
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def _cache_dir() -> Path:
    from lmrc.model_store import default_cache_dir

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
            from lmrc.io import atomic_write_json

            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(path, dataclasses.asdict(result), indent=2)
        except OSError as exc:
            log.warning("cannot cache the CPU guard's verdict in %s: %s", path, exc)
    return result


@functools.cache
def ensure() -> Verdict:
    """Decide once per process and apply it: cap oneDNN's ISA when the verdict says so. Must run before oneDNN's
    first kernel (it fixes its ISA then): lmrc's CLI calls it first thing, `lmrc.hardware` before it asks torch
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
