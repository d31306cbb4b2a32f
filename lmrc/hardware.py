"""What this machine runs fast: the CPU's vector capability and native bf16, CUDA devices.

Precision defaults depend on it: bf16 autocast is ~2x faster than float32 on CPUs with AVX512-BF16 or AMX and
~10x slower on AVX2-only CPUs, where torch emulates it. Benchmarks print `describe()` with every number.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import logging
import os
import platform
import threading
import time
from collections.abc import Iterator
from typing import Any

log = logging.getLogger(__name__)


def cpu_capability() -> str:
    """torch's CPU kernel level: "AVX512", "AVX2", "DEFAULT", ... (ATEN_CPU_CAPABILITY can lower it)."""
    import torch

    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except (AttributeError, RuntimeError):
        return "unknown"


def cpu_supports_bf16() -> bool:
    """Native bf16 matmuls on this CPU that are safe to use: AVX512-BF16 or AMX in hardware, allowed by oneDNN's ISA
    cap, and not ruled out by lmrc's CPU guard (lmrc.cpu_guard, which probes the kernels once per machine).

    torch's own check (`_is_mkldnn_bf16_supported`) also says yes on AVX512 CPUs without AVX512-BF16, where bf16 is
    emulated: measured on an Ice Lake Xeon, a bf16 matmul 4.6x slower than float32. So on x86 the CPU flags decide;
    elsewhere (ARM) torch's check does."""
    from lmrc import cpu_guard

    cpu = cpu_guard.read_cpu()
    if cpu.machine in cpu_guard.X86 and not (cpu.native_bf16 and cpu_guard.ensure().bf16_allowed):
        return False
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def cpu_bf16_refused() -> str | None:
    """Why bf16 must not run on this CPU even when asked for (the CPU guard found its kernels crash or compute
    wrong), or None. An explicit bf16 then falls back to float32 with one warning instead of dying."""
    from lmrc import cpu_guard

    v = cpu_guard.ensure()
    return None if v.bf16_allowed or v.mode == "not-needed" else v.reason


def cuda_supports_bf16(device: int | None = None) -> bool:
    """Native bf16 on a CUDA GPU: compute capability 8.0 or newer (A100, H100, RTX 30xx+).

    `torch.cuda.is_bf16_supported()` also says yes on V100 and T4, where bf16 is emulated (slow); there fp16
    with a loss scaler is the fast choice."""
    import torch

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
    import torch

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
    import torch

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
        import pynvml

        pynvml.nvmlInit()
        try:
            info = pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(_physical_index(index)))
            return int(info.used), int(info.total)
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no pynvml, no driver access: fall back to the CUDA runtime
        pass
    try:
        import torch

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
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def reset_gpu_peaks() -> None:
    import torch

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


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_KEPT = {
    _M_MMAP_THRESHOLD: 2**30,  # buffers below 1 GiB come from the heap (a fixed threshold: no dynamic one)
    _M_TRIM_THRESHOLD: 2**31 - 1,  # never trim the heap top
    _M_TOP_PAD: 256 * 2**20,  # grow the heap in 256 MiB steps
}  # keep_freed_memory's settings


def keep_freed_memory(watch: bool = True) -> bool:
    """Let glibc keep the memory torch frees for reuse instead of returning it to the system at once, and keep
    what that costs bounded (`watch`: see HeapWatch).

    Why: a CPU training step allocates and frees the same large activation buffers every step. With glibc's
    defaults, buffers above the mmap threshold are mapped and unmapped each time, and the heap top is trimmed, so
    every step pays for fresh zeroed pages: a quarter of the CPU time went to the kernel in stage-1 training
    (measured on 2 cores, AVX2 float32: 38.8 s system of 150 s; with this, 7.7 s, and 4.87 -> 3.46 s per step,
    the same losses). This is what PyTorch's CPU tuning guide gets from jemalloc / tcmalloc, done with glibc's
    own mallopt. Kept alone, those settings let the heap fragment without bound over a long run (a full epoch
    of the demo's stage 1 held 13.1 GiB for a ~3 GiB working set): the watch gives the holes back.

    Skipped when the user set any MALLOC_* variable (theirs wins), on other C libraries and on other systems;
    True when applied. The settings are process-wide: lmrc's CLI calls this once at start.
    """
    if any(k.startswith("MALLOC_") for k in os.environ) or platform.system() != "Linux":
        return False
    libc = _glibc()
    if libc is None:
        return False  # not glibc (musl has no mallopt)
    ok = all(libc.mallopt(param, value) for param, value in _KEPT.items())
    running = any(t.name == HeapWatch.NAME for t in threading.enumerate())  # main() may run again (tests)
    if ok and watch and hasattr(libc, "mallinfo2") and not running:
        HeapWatch(libc).start()
    return bool(ok)


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                     "keepcost")
    ]  # fmt: skip


def _glibc() -> Any:
    """glibc with mallopt (and mallinfo2 / malloc_trim where it has them: glibc >= 2.33), typed; None elsewhere."""
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    except (OSError, AttributeError):
        return None
    try:
        libc.mallinfo2.argtypes, libc.mallinfo2.restype = [], _MallInfo2
        libc.malloc_trim.argtypes, libc.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
        libc.malloc.argtypes, libc.malloc.restype = [ctypes.c_size_t], ctypes.c_void_p
        libc.free.argtypes, libc.free.restype = [ctypes.c_void_p], None
    except AttributeError:
        pass
    return libc


def anon_rss_bytes() -> int:
    """This process's resident anonymous memory (heap, mapped buffers; not the file-backed library pages)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as fh:
            fields = fh.read().split()
        return (int(fields[1]) - int(fields[2])) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class HeapWatch(threading.Thread):
    """Gives the heap's free pages back (malloc_trim) when the process holds much more than it recently used.

    Once a second it reads what malloc has in use (mallinfo2: heap chunks + mapped buffers) and the process's
    resident anonymous memory. Kept freed memory is the point of keep_freed_memory, so the steady state of a
    training loop (resident ~ its peak use over the last `window` seconds) is left alone; when resident memory
    exceeds `factor` x that recent peak plus `slack`, it trims, which returns every free page inside the heap and
    costs one round of page faults for the holes reused afterwards. Two cases: the heap has fragmented (holes no
    new buffer fits: 13.1 GiB for a ~3 GiB stage-1 step over an epoch), or a phase has ended (LoRA training in
    `lmrc compare` leaves ~12 GiB of freed buffers while the rows run in other processes): a minute later the
    recent peak is the new phase's, and the old one's memory goes back to the system.
    A daemon thread; malloc_trim and mallinfo2 take malloc's own locks, so it is safe beside torch's threads.
    """

    NAME = "lmrc-heap-watch"

    def __init__(
        self, libc: Any, interval: float = 1.0, factor: float = 1.5, slack: int = 2**30, window: int = 60
    ) -> None:
        super().__init__(name=self.NAME, daemon=True)
        self.libc, self.interval, self.factor, self.slack = libc, interval, factor, slack
        self.recent: collections.deque[int] = collections.deque(maxlen=max(1, int(window / interval)))
        self.trims = 0

    @property
    def peak_in_use(self) -> int:
        return max(self.recent, default=0)

    def check(self) -> bool:
        """One look: trim when the resident memory is far above the recent peak use. True when it trimmed."""
        info = self.libc.mallinfo2()
        self.recent.append(info.uordblks + info.hblkhd)
        if anon_rss_bytes() <= self.factor * self.peak_in_use + self.slack:
            return False
        self.libc.malloc_trim(0)
        self.trims += 1
        return True

    def run(self) -> None:
        while True:
            time.sleep(self.interval)
            self.check()


# ------------------------------------------------------------------------------------- the heap while scoring

# Every lmrc command serves buffers below 1 GiB from glibc's heap and never trims it (keep_freed_memory:
# training steps reuse the same large buffers instead of paying the kernel for fresh pages).
# Scoring a long document breaks that bargain: the model scores its pairs chunk by chunk, each chunk making
# ~200 MB of temporaries ([pairs, heads, length] attention products) and keeping a small logits tensor. The kept
# pieces land inside the freed temporaries' space, the next chunk's temporaries no longer fit there, and the heap
# grows by about a chunk's temporaries per chunk: 19.5 GiB for one 433-entity document (736 chunks), against
# 2.2 GiB with glibc's defaults, whatever the model predicts. So stage-1 scoring runs with glibc's own settings
# at their ceilings (buffers above 32 MiB mapped, more than 64 MiB free at the heap top returned, no padding),
# trims the heap's free pages every TRIM_EVERY_S seconds, and gives keep_freed_memory's settings back afterwards
# (training evaluates mid-run). The heap watch (HeapWatch) bounds the same growth elsewhere, more loosely.
_SCORING = {_M_MMAP_THRESHOLD: 32 * 2**20, _M_TRIM_THRESHOLD: 64 * 2**20, _M_TOP_PAD: 128 * 2**10}
TRIM_EVERY_S = 0.5
# above the ceilings of glibc's dynamic mmap (32 MiB) and trim (64 MiB) thresholds: mapped unless kept
# (the heap top never holds that much free under glibc's defaults)
_PROBE_BYTES = 96 * 2**20


def large_buffers_from_heap() -> bool:
    """True when glibc serves a 96 MiB buffer from its heap instead of mapping it: keep_freed_memory's setting
    (glibc's own dynamic threshold never goes above 32 MiB). Asked of malloc itself: glibc has no getter."""
    libc = _glibc()
    if libc is None:
        return False
    before = libc.mallinfo2().hblks
    ptr = libc.malloc(_PROBE_BYTES)
    if not ptr:
        return False
    try:
        return libc.mallinfo2().hblks == before
    finally:
        libc.free(ptr)


@contextlib.contextmanager
def scoring_heap() -> Iterator[bool]:
    """Within the block glibc manages the heap as by default (at its dynamic thresholds' ceilings) and a thread
    trims it twice a second, even when lmrc's keep_freed_memory keeps freed memory; the block yields whether it
    changed anything. A user's MALLOC_*
    settings are left alone, as keep_freed_memory leaves them."""
    if any(k.startswith("MALLOC_") for k in os.environ) or not large_buffers_from_heap():
        yield False
        return
    libc = _glibc()
    for param, value in _SCORING.items():
        libc.mallopt(param, value)
    stop = threading.Event()
    trimmer = threading.Thread(target=_trim_until, args=(libc, stop), name="lmrc-heap-trim", daemon=True)
    trimmer.start()
    try:
        yield True
    finally:
        stop.set()
        trimmer.join()
        for param, value in _KEPT.items():
            libc.mallopt(param, value)


def _trim_until(libc: Any, stop: threading.Event) -> None:
    """Return the heap's free pages to the system every TRIM_EVERY_S seconds until `stop` (malloc_trim also
    releases the holes inside the heap, which no setting does): the settings alone left the fragmentation
    growing in some runs (4.1 GiB instead of 2.3 for the same document); this bounds it by what one interval
    adds. malloc_trim takes the arena's lock, so it is safe beside the scoring thread."""
    while not stop.wait(TRIM_EVERY_S):
        libc.malloc_trim(0)
