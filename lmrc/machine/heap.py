"""glibc's heap under lmrc: keep the memory torch frees for reuse (training steps reuse the same large buffers),
bound what that costs (HeapWatch), and manage the heap as glibc does by default while stage 1 scores a document
(scoring_heap). No torch here: the CLI calls keep_freed_memory before it imports anything heavy.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import ctypes.util
import os
import platform
import threading
import time
from collections.abc import Iterator
from typing import Any

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
    every step pays for fresh zeroed pages: a quarter of stage-1 training's CPU time went to the kernel, and a
    step took 40% longer, for the same losses (docs/PERFORMANCE.md). This is what PyTorch's CPU tuning guide gets
    from jemalloc / tcmalloc, done with glibc's own mallopt. Kept alone, those settings let the heap fragment
    without bound over a long run (a full epoch of the demo's stage 1 held four times its working set): the
    watch gives the holes back.

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
    new buffer fits, over an epoch of stage 1), or a phase has ended (LoRA training in `lmrc compare` leaves its
    freed buffers while the rows run in other processes): a minute later the recent peak is the new phase's, and
    the old one's memory goes back to the system.
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
# grows by about a chunk's temporaries per chunk: tens of GiB for a document of a few hundred entities, against
# about 2 GiB with glibc's defaults, whatever the model predicts. So stage-1 scoring runs with glibc's own settings
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
    growing in some runs (nearly twice the memory for the same document); this bounds it by what one interval
    adds. malloc_trim takes the arena's lock, so it is safe beside the scoring thread."""
    while not stop.wait(TRIM_EVERY_S):
        libc.malloc_trim(0)
