"""What this CPU is, as far as bf16 kernels go: its model, its instruction-set flags and the oneDNN ISA cap in force,
and the CPU kinds it can imitate by capping that ISA (how the CPU-kind tests cover machines lmrc runs on).
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass

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
NO_AMX_ISA = "AVX512_CORE_BF16"  # oneDNN's highest ISA below AMX
ISA_ENV = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY")  # how a CPU kind is imitated
X86 = ("x86_64", "AMD64", "i686")


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

        Without them torch emulates bf16, several times slower than float32 (docs/PERFORMANCE.md). Non-x86 CPUs
        are left to torch's own check (lmrc.machine.hardware)."""
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
    # Only where /proc/cpuinfo is missing; read_cpu runs on the CLI's light path, which must not load torch.
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
