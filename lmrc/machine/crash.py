"""Native crashes never pass silently: the `lmrc` command runs in a child process that a small parent watches.

Why: a fault in native code (SIGFPE in a oneDNN kernel, SIGSEGV, SIGILL, SIGBUS, SIGABRT) kills Python with no
exception to catch, and the out-of-memory killer's SIGKILL leaves no trace at all; the user saw
`make: *** [demo] Floating point exception` and nothing from lmrc. Here the parent forks before anything heavy is
imported; the child enables `faulthandler` into a crash log and runs the command; if the child dies by a signal, the
parent says in one line what happened, where (the innermost lmrc frame of the stack), and what to do, prints the
stack with `--debug`, and exits 128 + the signal number, as the shell would have.

The parent ignores Ctrl-C (the terminal sends SIGINT to the child too, which stops cleanly) and passes SIGTERM and
SIGHUP on to the child (`kill`, `timeout`, torchrun stopping a rank); if the parent itself is killed, the child gets
SIGTERM (Linux), so no orphaned rank keeps a GPU. `LMRC_SUPERVISE=0` runs the command in this
process instead (no fork), for debuggers and profilers.
"""

from __future__ import annotations

import ctypes
import faulthandler
import os
import re
import signal
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from lmrc.machine.cpu_info import read_cpu
from lmrc.models.store import default_cache_dir

_CHILD_ENV = "LMRC_SUPERVISED"
NATIVE_FAULTS = {
    signal.SIGFPE: "floating-point exception",
    signal.SIGSEGV: "segmentation fault",
    signal.SIGILL: "illegal instruction",
    signal.SIGBUS: "bus error",
    signal.SIGABRT: "abort",
}
_FRAME = re.compile(r'File "(?P<file>[^"]+)", line (?P<line>\d+) in (?P<func>\S+)')


def supervise(main: Callable[[list[str]], int], argv: list[str]) -> int:
    """Run `main(argv)` in a forked child and report how it died; returns the exit code for the shell."""
    if os.environ.get(_CHILD_ENV) or os.environ.get("LMRC_SUPERVISE") == "0" or not hasattr(os, "fork"):
        if not faulthandler.is_enabled():  # unwatched: at least the Python stack of a native crash, on stderr
            faulthandler.enable()
        return main(argv)
    log_path = crash_log_path()
    sys.stdout.flush()
    sys.stderr.flush()
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:  # the child: the command itself
        die_with_parent(parent)
        os.environ[_CHILD_ENV] = "1"
        log = open(log_path, "w", encoding="utf-8")  # noqa: SIM115 (open for the life of the process)
        report_native_faults(log)
        return main(argv)
    return _watch(pid, log_path, debug="--debug" in argv or os.environ.get("LMRC_DEBUG") == "1")


def report_native_faults(log: TextIO) -> None:
    """Write the Python stack of a native fault to `log`, and make sure such a fault ends this process.

    Why the signal mask: a process inherits the signals its launcher blocked (a CI runner or job harness may block
    SIGSEGV and the like). A blocked fault signal sent with `kill` (a watchdog, a runtime aborting) stays pending
    and the process runs on as if nothing happened; faulthandler alone does not change that."""
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, set(NATIVE_FAULTS))
    faulthandler.enable(file=log, all_threads=True)


def die_with_parent(parent: int) -> None:
    """SIGTERM this child when the watching parent dies (SIGKILLed by a launcher after its grace period, say), so no
    orphaned rank keeps running and holding a GPU. Linux only (prctl PR_SET_PDEATHSIG); elsewhere a no-op."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM), 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            return
    if os.getppid() != parent:  # the parent died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def crash_log_path() -> Path:
    for folder in (default_cache_dir() / "crashes", Path(tempfile.gettempdir())):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(prefix="lmrc-crash-", suffix=".log", dir=folder)
            os.close(fd)
            return Path(name)
        except OSError:
            continue
    return Path(os.devnull)


def _watch(pid: int, log_path: Path, debug: bool) -> int:
    def forward(sig: int, _frame) -> None:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, forward)
    _, status = os.waitpid(pid, 0)  # retried by Python on EINTR (PEP 475)
    if os.WIFEXITED(status):
        _remove(log_path)
        return os.WEXITSTATUS(status)
    sig = os.WTERMSIG(status)
    stack = _read(log_path)
    if sig in NATIVE_FAULTS and debug and stack:
        sys.stderr.write(stack if stack.endswith("\n") else stack + "\n")
    print(f"lmrc: error: {crash_line(sig, stack, log_path)}", file=sys.stderr)
    if sig not in NATIVE_FAULTS or not stack:
        _remove(log_path)
    return 128 + sig


def crash_line(sig: int, stack: str, log_path: Path | None) -> str:
    """The one line that tells the user what killed the command and what to do."""
    name = _signal_name(sig)
    if sig in NATIVE_FAULTS:
        where = innermost_lmrc_frame(stack)
        at = f" at {where}" if where else ""
        kept = f"; the stack is in {log_path} (--debug prints it)" if stack and log_path else ""
        return (
            f"crashed in native code ({name}, {NATIVE_FAULTS[sig]}){at}: a bug of torch's CPU kernels on this "
            f"machine that lmrc's CPU check (`lmrc env`) did not catch. The run's files are intact: rerun the same "
            f"command with {_fallback()} to resume it, and please report it{kept}"
        )
    if sig == signal.SIGKILL:
        return (
            "killed (SIGKILL): most often the system ran out of memory (see `dmesg`); the run's files are intact, "
            "the same command resumes it"
        )
    return f"stopped by {name}"


def _fallback() -> str:
    """The setting that avoids the crashing kernels: AMX off where the CPU has it, else float32."""
    try:
        return "LMRC_CPU_GUARD=no-amx (or float32)" if read_cpu().has_amx else "LMRC_CPU_GUARD=float32"
    except Exception:  # the report must not fail
        return "LMRC_CPU_GUARD=float32"


def innermost_lmrc_frame(stack: str) -> str | None:
    """`lmrc/stage1/model.py:71 in forward` for the first (innermost) lmrc frame faulthandler wrote (the CLI's own
    frames aside), else the innermost frame of any file, else None."""
    frames = list(_FRAME.finditer(stack))
    for m in frames:
        path = m.group("file").replace("\\", "/")
        rest = path.rsplit("/lmrc/", 1)[1] if "/lmrc/" in path else ""
        wrapper = rest in (
            "machine/crash.py",
            "experiments/isolate.py",
            "cli.py",
            "__main__.py",
        )  # where every command passes: says nothing
        if rest.endswith(".py") and "site-packages" not in rest and not rest.startswith(".") and not wrapper:
            return f"lmrc/{rest}:{m.group('line')} in {m.group('func')}"
    if frames:
        m = frames[0]
        return f"{m.group('file')}:{m.group('line')} in {m.group('func')}"
    return None


def _signal_name(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"signal {sig}"


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def _remove(path: Path) -> None:
    if str(path) != os.devnull:
        try:
            path.unlink()
        except OSError:
            pass
