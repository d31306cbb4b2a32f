"""What this machine runs fast: the CPU's vector capability and native bf16, CUDA devices.

Precision defaults depend on it: bf16 autocast is ~2x faster than float32 on CPUs with AVX512-BF16 or AMX and
~10x slower on AVX2-only CPUs, where torch emulates it. Benchmarks print `describe()` with every number.
"""

from __future__ import annotations

import gc
import logging
import os
from typing import Any

import torch

from lmrc.machine import cpu_guard, cpu_info

log = logging.getLogger(__name__)


def cpu_capability() -> str:
    """torch's CPU kernel level: "AVX512", "AVX2", "DEFAULT", ... (ATEN_CPU_CAPABILITY can lower it)."""
    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except (AttributeError, RuntimeError):
        return "unknown"


def cpu_supports_bf16() -> bool:
    """Native bf16 matmuls on this CPU that are safe to use: AVX512-BF16 or AMX in hardware, allowed by oneDNN's ISA
    cap, and not ruled out by lmrc's CPU guard (lmrc.machine.cpu_guard, which probes the kernels once per machine).

    torch's own check (`_is_mkldnn_bf16_supported`) also says yes on AVX512 CPUs without AVX512-BF16, where bf16 is
    emulated, several times slower than float32 (docs/PERFORMANCE.md). So on x86 the CPU flags decide; elsewhere
    (ARM) torch's check does."""
    cpu = cpu_info.read_cpu()
    if cpu.machine in cpu_info.X86 and not (cpu.native_bf16 and cpu_guard.ensure().bf16_allowed):
        return False
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def cpu_bf16_refused() -> str | None:
    """Why bf16 must not run on this CPU even when asked for (the CPU guard found its kernels crash or compute
    wrong), or None. An explicit bf16 then falls back to float32 with one warning instead of dying."""
    v = cpu_guard.ensure()
    return None if v.bf16_allowed or v.mode == "not-needed" else v.reason


def cuda_supports_bf16(device: int | None = None) -> bool:
    """Native bf16 on a CUDA GPU: compute capability 8.0 or newer (A100, H100, RTX 30xx+).

    `torch.cuda.is_bf16_supported()` also says yes on V100 and T4, where bf16 is emulated (slow); there fp16
    with a loss scaler is the fast choice."""
    if not torch.cuda.is_available():
        return False
    try:
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    except TypeError:  # torch < 2.3 has no including_emulation
        major, _ = torch.cuda.get_device_capability(device)
        return major >= 8


def resolve_mixed_precision(name: str, cuda: bool | None = None) -> str:
    """accelerate's mixed_precision for a config value: "auto" is bf16 where the hardware runs it natively
    (a CUDA GPU of compute capability >= 8.0, or a CPU with AVX512-BF16 / AMX), fp16 (with a loss scaler) on
    older CUDA GPUs, else "no" (float32)."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if name == "bf16" and not cuda and (why := cpu_bf16_refused()):
        log.warning("mixed_precision=bf16 turned off on this CPU: %s; training in float32", why)
        return "no"
    if name != "auto":
        return name
    if cuda:
        return "bf16" if cuda_supports_bf16() else "fp16"
    return "bf16" if cpu_supports_bf16() else "no"


def gpu_memory() -> list[dict[str, Any]]:
    """Per local CUDA device: peak memory this process allocated and reserved through torch (GiB), and the
    memory in use on the device by every process (an inference engine in another process, e.g. vLLM's, shows
    only there), from NVML when installed, else `torch.cuda.mem_get_info`. Empty without CUDA."""
    if not torch.cuda.is_available():
        return []
    gib = 1024**3
    out = []
    for i in range(torch.cuda.device_count()):
        entry: dict[str, Any] = {
            "device": i,
            "name": torch.cuda.get_device_name(i),
            "peak_allocated_gib": round(torch.cuda.max_memory_allocated(i) / gib, 3),
            "peak_reserved_gib": round(torch.cuda.max_memory_reserved(i) / gib, 3),
        }
        used = device_memory_used(i)
        if used is not None:
            entry["device_used_gib"], entry["device_total_gib"] = (
                round(used[0] / gib, 3),
                round(used[1] / gib, 3),
            )
        out.append(entry)
    return out


def device_memory_used(index: int) -> tuple[int, int] | None:
    """(bytes in use by all processes, total bytes) of CUDA device `index`; None when it cannot be read."""
    try:
        import pynvml  # optional (nvidia-ml-py)

        pynvml.nvmlInit()
        try:
            info = pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(_physical_index(index)))
            return int(info.used), int(info.total)
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no pynvml, no driver access: fall back to the CUDA runtime
        pass
    try:
        free, total = torch.cuda.mem_get_info(index)
        return int(total - free), int(total)
    except Exception:
        return None


def _physical_index(index: int) -> int:
    """NVML numbers all GPUs of the machine; CUDA_VISIBLE_DEVICES renumbers the visible ones from 0."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    ids = [v.strip() for v in visible.split(",") if v.strip()]
    if ids and index < len(ids) and ids[index].isdigit():
        return int(ids[index])
    return index


def release_cuda_cache() -> None:
    """Give the memory torch's caching allocator holds but no tensor uses back to the driver (after
    collecting unreachable tensors), so that another engine in this or another process can take it."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def reset_gpu_peaks() -> None:
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            torch.cuda.reset_peak_memory_stats(i)


def gpu_memory_line(entries: list[dict[str, Any]] | None = None) -> str:
    """ "GPU memory: peak 3.1 GiB allocated / 3.5 GiB reserved (device in use 20.2 of 80.0 GiB)" per device."""
    entries = gpu_memory() if entries is None else entries
    if not entries:
        return "GPU memory: no CUDA device"
    parts = []
    for e in entries:
        text = f"cuda:{e['device']} peak {e['peak_allocated_gib']} GiB allocated / {e['peak_reserved_gib']} GiB reserved"
        if "device_used_gib" in e:
            text += f" (device in use {e['device_used_gib']} of {e['device_total_gib']} GiB)"
        parts.append(text)
    return "GPU memory: " + "; ".join(parts)


def describe() -> dict[str, Any]:
    """The machine, for benchmark reports: CPU model and capability, bf16, cores, threads, torch, GPU."""
    info: dict[str, Any] = {
        "cpu": cpu_info.read_cpu().model,
        "cpu_capability": cpu_capability(),
        "cpu_native_bf16": cpu_supports_bf16(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": None,
    }
    if torch.cuda.is_available():
        info["cuda"] = torch.cuda.get_device_name(0)
        info["cuda_native_bf16"] = cuda_supports_bf16(0)
    return info


def describe_line() -> str:
    d = describe()
    bf16 = "native bf16" if d["cpu_native_bf16"] else "no native bf16"
    gpu = f", GPU {d['cuda']}" if d["cuda"] else ", no GPU"
    return (
        f"{d['cpu']} ({d['cpu_capability']}, {bf16}), {d['cores']} cores, {d['torch_threads']} torch threads, "
        f"torch {d['torch']}{gpu}"
    )
