"""Run one job of an experiment (a training, a prediction row) in a child process of its own, as a function call.

Why a child: the memory a job used goes back to the system when it ends. In one process it would not: the `lmrc`
command keeps freed heap memory for reuse (lmrc.machine.heap.keep_freed_memory; LoRA training in `lmrc compare`
left ~12 GiB of freed buffers behind), torch's CUDA allocator keeps what it reserved, and a vLLM engine holds its
share of the GPU until the process exits; on a 24 GiB machine the next job's LLM would not fit beside that. A
child also measures the job's own peak memory (lmrc.predict.run.peak_rss_gib: the kernel's high-water mark starts
afresh at exec), which a comparison reports per row.

The child is started with `spawn` (a fresh interpreter, nothing inherited from the parent's heap or CUDA state)
and set up as the `lmrc` command sets up its own process: the same log handlers (console, log files), torch
threads, malloc settings and CPU guard. It ends with the parent (SIGTERM when the parent dies, Linux).

What comes back: the function's return value; an `LmrcError` or `OSError` raised in the child is raised again
here (the command prints it as one `lmrc: error:` line); any other exception is printed by the child with its
traceback and becomes one LmrcError naming the job; a child killed by a signal becomes one LmrcError worded as
lmrc.machine.crash words a crashed command (a native fault keeps its stack in a crash log, `--debug` logs it). While the
child runs, this process ignores Ctrl-C (the terminal sends it to the child too, which stops cleanly) and passes
SIGTERM and SIGHUP on to it; an interrupted child is raised here as KeyboardInterrupt.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import sys
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

from lmrc.errors import LmrcError
from lmrc.machine.cpu_guard import ensure as settle_cpu_kernels
from lmrc.machine.crash import (
    NATIVE_FAULTS,
    crash_line,
    crash_log_path,
    die_with_parent,
    report_native_faults,
)
from lmrc.machine.heap import keep_freed_memory

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class _ProcessSetup:
    """What the child takes over from this process: its log handlers (as paths and levels) and torch threads."""

    root_level: int
    console: tuple[int, logging.Formatter | None] | None  # the stderr handler's level and format
    files: tuple[tuple[str, int, logging.Formatter | None], ...]  # log files: path, level, format
    torch_threads: int

    @classmethod
    def of_this_process(cls) -> _ProcessSetup:
        root = logging.getLogger()
        console, files = None, []
        for h in root.handlers:
            if isinstance(h, logging.FileHandler):
                files.append((h.baseFilename, h.level, h.formatter))
            elif isinstance(h, logging.StreamHandler) and h.stream is sys.stderr:
                console = (h.level, h.formatter)
        return cls(root.level, console, tuple(files), torch.get_num_threads())

    def apply(self) -> None:
        root = logging.getLogger()
        root.setLevel(self.root_level)
        handlers: list[tuple[logging.Handler, int, logging.Formatter | None]] = []
        if self.console is not None:
            handlers.append((logging.StreamHandler(sys.stderr), *self.console))
        for path, level, fmt in self.files:
            handlers.append((logging.FileHandler(path, encoding="utf-8"), level, fmt))
        for handler, level, fmt in handlers:
            handler.setLevel(level)
            handler.setFormatter(fmt)
            root.addHandler(handler)
        torch.set_num_threads(self.torch_threads)


def run_isolated(what: str, fn: Callable[..., T], *args: Any) -> T:
    """`fn(*args)` in a spawned child process; its return value, or its error raised here (see the module doc).

    `what` names the job in messages (e.g. the file it writes). `fn` must be a module-level function and `args`
    and the result picklable."""
    context = multiprocessing.get_context("spawn")
    crash_log = crash_log_path()
    receive, send = context.Pipe(duplex=False)
    setup = _ProcessSetup.of_this_process()
    child = context.Process(
        target=_child_main, args=(send, os.getpid(), crash_log, setup, fn, args), name=f"lmrc: {what}"
    )
    sys.stdout.flush()
    sys.stderr.flush()
    child.start()
    send.close()
    with _signals_go_to(child) as forwarded:
        try:
            outcome = receive.recv()
        except EOFError:  # the child died before it could answer
            outcome = None
        child.join()
    receive.close()
    if outcome is None and child.exitcode is not None and -child.exitcode in forwarded:
        _remove(crash_log)  # stopped as asked before it could set up its own handler (while importing)
        raise KeyboardInterrupt
    return _result(what, outcome, child.exitcode, crash_log)


def _result(what: str, outcome: tuple[str, Any] | None, exitcode: int | None, crash_log: Path) -> Any:
    if outcome is None and exitcode is not None and exitcode < 0:
        raise LmrcError(f"{what}: {_crash_report(-exitcode, crash_log)}")
    _remove(crash_log)
    if outcome is None:
        raise LmrcError(f"{what}: its child process ended without a result (exit {exitcode})")
    kind, value = outcome
    if kind == "ok":
        return value
    if kind == "raise":
        raise value
    if kind == "interrupted":
        raise KeyboardInterrupt
    raise LmrcError(f"{what}: failed in its child process ({value}; the traceback is above)")


def _crash_report(sig: int, crash_log: Path) -> str:
    """lmrc.machine.crash's line for a child killed by `sig`; the stack of a native fault stays in the crash log."""
    try:
        stack = crash_log.read_text(encoding="utf-8", errors="replace")
    except OSError:
        stack = ""
    if sig in NATIVE_FAULTS and stack:
        log.debug("the child's stack:\n%s", stack)
    else:
        _remove(crash_log)
    return crash_line(sig, stack, crash_log)


@contextlib.contextmanager
def _signals_go_to(child: multiprocessing.process.BaseProcess) -> Iterator[set[int]]:
    """While the child runs: ignore Ctrl-C here (the child gets it from the terminal too, and stops cleanly) and
    pass SIGTERM and SIGHUP on to the child (a scheduler's stop, the watching `lmrc` parent's); yields the
    signals passed on."""
    forwarded: set[int] = set()

    def forward(sig: int, _frame: Any) -> None:
        forwarded.add(sig)
        if child.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.pid, sig)

    wanted = {signal.SIGINT: signal.SIG_IGN, signal.SIGTERM: forward}
    if hasattr(signal, "SIGHUP"):  # not on Windows
        wanted[signal.SIGHUP] = forward
    try:
        previous = {sig: signal.signal(sig, handler) for sig, handler in wanted.items()}
    except ValueError:  # not the main thread: signals stay as they are
        yield forwarded
        return
    try:
        yield forwarded
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _child_main(
    send: Any, parent: int, crash_log: Path, setup: _ProcessSetup, fn: Callable, args: tuple
) -> None:
    """The child: set up as the `lmrc` command would, run `fn`, send back ("ok", result) or what went wrong."""
    die_with_parent(parent)
    log_file = open(crash_log, "w", encoding="utf-8")  # noqa: SIM115 (open for the life of the process)
    report_native_faults(log_file)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupt)  # as `lmrc` commands do: a stop saves what is finished
    keep_freed_memory()
    settle_cpu_kernels()
    setup.apply()
    try:
        outcome: tuple[str, Any] = ("ok", fn(*args))
    except (LmrcError, OSError) as exc:
        log.debug("%s", "".join(traceback.format_exception(exc)))
        outcome = ("raise", exc)
    except KeyboardInterrupt:
        outcome = ("interrupted", None)
    except Exception as exc:
        traceback.print_exc()
        outcome = ("failed", f"{type(exc).__name__}: {exc}")
    send.send(outcome)
    send.close()


def _interrupt(_sig: int, _frame: Any) -> None:
    raise KeyboardInterrupt


def _remove(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()
