"""glibc's heap under lmrc (lmrc.machine.heap): freed memory kept for reuse unless the user tunes malloc, and the watch that
gives a fragmented heap's pages back."""

from __future__ import annotations

import ctypes
import platform
import subprocess
import sys
from types import SimpleNamespace

from lmrc.machine import heap


def test_the_heap_watch_trims_only_a_fragmented_heap(monkeypatch):
    gib = 2**30
    state = {"in_use": 3 * gib, "rss": 3 * gib, "trims": 0}

    class Libc:
        def mallinfo2(self):
            return SimpleNamespace(uordblks=state["in_use"], hblkhd=0)

        def malloc_trim(self, pad):
            state["trims"] += 1
            state["rss"] = state["in_use"]

    monkeypatch.setattr(heap, "anon_rss_bytes", lambda: state["rss"])
    watch = heap.HeapWatch(Libc(), window=3)
    assert watch.check() is False  # a training step's buffers kept for the next step: the point
    state["in_use"], state["rss"] = 0.5 * gib, 3.2 * gib  # between steps: freed, still resident
    assert watch.check() is False and watch.peak_in_use == 3 * gib
    state["rss"] = 6 * gib  # grown past 1.5 x the peak use + 1 GiB: holes no buffer fits
    assert watch.check() is True and state["trims"] == 1 and state["rss"] == 0.5 * gib
    # a phase ends (training done, rows run elsewhere): its freed buffers go back once its peak leaves the window
    state["in_use"] = state["rss"] = 3 * gib
    assert watch.check() is False
    state["in_use"] = 0.3 * gib
    assert [watch.check() for _ in range(2)] == [False, False]  # the training peak is still recent
    assert watch.check() is True and state["rss"] == 0.3 * gib and state["trims"] == 2


def test_malloc_trim_gives_a_fragmented_heaps_pages_back():
    """The real allocator, in a child process with keep_freed_memory's settings: holes left by freed buffers stay
    resident until the watch trims them."""
    code = """
import ctypes
from lmrc.machine import heap
assert heap.keep_freed_memory(watch=False)
libc = heap._glibc()
libc.malloc.argtypes, libc.malloc.restype = [ctypes.c_size_t], ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
blocks = [libc.malloc(8 << 20) for _ in range(48)]
for b in blocks:
    ctypes.memset(b, 1, 8 << 20)
for b in blocks[:-1]:  # the last one pins the heap top: everything below is holes
    libc.free(b)
before = heap.anon_rss_bytes()
watch = heap.HeapWatch(libc, slack=0)
watch.recent.append(16 << 20)
assert watch.check()
print(before >> 20, heap.anon_rss_bytes() >> 20)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    before, after = map(int, out.split())
    assert before - after >= 300, (before, after)  # ~376 MiB of holes returned


def test_freed_memory_is_kept_unless_the_user_tunes_malloc(monkeypatch):
    monkeypatch.setenv("MALLOC_ARENA_MAX", "2")
    assert heap.keep_freed_memory() is False  # the user's own malloc settings win
    monkeypatch.delenv("MALLOC_ARENA_MAX")
    calls = []

    class Mallopt:  # records the calls instead of changing this process's allocator
        def __call__(self, param, value):
            calls.append((param, value))
            return 1

    class FakeLibc:
        mallopt = Mallopt()

    monkeypatch.setattr(ctypes, "CDLL", lambda name: FakeLibc())
    if platform.system() != "Linux":
        assert heap.keep_freed_memory() is False
        return
    assert heap.keep_freed_memory() is True
    params = dict(calls)
    assert params[-3] >= 2**30 and params[-1] == 2**31 - 1 and params[-2] > 0  # mmap, trim, top pad
    monkeypatch.setattr(ctypes, "CDLL", lambda name: (_ for _ in ()).throw(OSError("no libc")))
    assert heap.keep_freed_memory() is False
