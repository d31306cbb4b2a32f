"""What this machine runs fast: the CPU's vector capability and native bf16, CUDA devices.

Precision defaults depend on it: bf16 autocast is ~2x faster than float32 on CPUs with AVX512-BF16 or AMX and
~10x slower on AVX2-only CPUs, where torch emulates it. Benchmarks print `describe()` with every number.
"""

from __future__ import annotations

import os
import platform
from typing import Any


def cpu_capability() -> str:
    """torch's CPU kernel level: "AVX512", "AVX2", "DEFAULT", ... (ATEN_CPU_CAPABILITY can lower it)."""
    import torch

    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except (AttributeError, RuntimeError):
        return "unknown"


def cpu_supports_bf16() -> bool:
    """Native bf16 matmuls on this CPU (AVX512-BF16 or AMX); without them bf16 is emulated and slow."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_mixed_precision(name: str, cuda: bool | None = None) -> str:
    """accelerate's mixed_precision for a config value: "auto" is bf16 where the hardware runs it natively
    (a CUDA GPU with bf16, or a CPU with AVX512-BF16 / AMX), fp16 on older CUDA GPUs, else "no" (float32)."""
    import torch

    cuda = torch.cuda.is_available() if cuda is None else cuda
    if name != "auto":
        return name
    if cuda:
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_supports_bf16() else "no"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe() -> dict[str, Any]:
    """The machine, for benchmark reports: CPU model and capability, bf16, cores, threads, torch, GPU."""
    import torch

    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "cpu_capability": cpu_capability(),
        "cpu_native_bf16": cpu_supports_bf16(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": None,
    }
    if torch.cuda.is_available():
        info["cuda"] = torch.cuda.get_device_name(0)
    return info


def describe_line() -> str:
    d = describe()
    bf16 = "native bf16" if d["cpu_native_bf16"] else "no native bf16"
    gpu = f", GPU {d['cuda']}" if d["cuda"] else ", no GPU"
    return (
        f"{d['cpu']} ({d['cpu_capability']}, {bf16}), {d['cores']} cores, {d['torch_threads']} torch threads, "
        f"torch {d['torch']}{gpu}"
    )
