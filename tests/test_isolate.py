"""lmrc.experiments.isolate: a job run in a spawned child comes back as its value, or as one error a user reads
(an LmrcError as it was, a bug with its traceback, a signal worded as lmrc.machine.crash words it), or as an interrupt."""

from __future__ import annotations

import logging
import os
import signal

import pytest

from lmrc.errors import LmrcError
from lmrc.experiments.isolate import run_isolated
from lmrc.machine.crash import crash_line

# The children's functions: module level, so that spawn finds them by name.


def _answer(x: int) -> dict:
    logging.getLogger("lmrc.test_isolate").info("child log line %d", x)
    return {"doubled": 2 * x, "pid": os.getpid()}


def _raise_lmrc_error() -> None:
    raise LmrcError("data/eval.json: document 3: no relation labels")


def _raise_bug() -> None:
    raise ValueError("a bug")


def _raise_interrupt() -> None:
    raise KeyboardInterrupt


def _kill_self(sig: int) -> None:
    os.kill(os.getpid(), sig)


@pytest.fixture(autouse=True)
def crash_logs(tmp_path, monkeypatch):
    """The crash logs go to a folder of the test's own (lmrc.machine.crash: $LMRC_CACHE/crashes)."""
    monkeypatch.setenv("LMRC_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "crashes"


def test_the_value_comes_back_from_a_child_that_logs_like_this_process(tmp_path, crash_logs):
    log_file = tmp_path / "job.log"
    handler = logging.FileHandler(log_file, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(name)s| %(message)s"))
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.INFO)
    root.addHandler(handler)
    try:
        value = run_isolated("a job", _answer, 21)
    finally:
        root.removeHandler(handler)
        handler.close()
        root.setLevel(level)
    assert value["doubled"] == 42 and value["pid"] != os.getpid()
    assert (
        "lmrc.test_isolate| child log line 21\n" in log_file.read_text()
    )  # the parent's log file, its format
    assert not list(crash_logs.iterdir())  # no crash: the crash log is removed


def test_an_lmrc_error_in_the_child_is_raised_here_as_the_same_one_line(capfd, crash_logs):
    with pytest.raises(LmrcError) as info:
        run_isolated("a job", _raise_lmrc_error)
    assert str(info.value) == "data/eval.json: document 3: no relation labels"
    assert "Traceback" not in capfd.readouterr().err
    assert not list(crash_logs.iterdir())


def test_a_bug_in_the_child_shows_its_traceback_and_names_the_job(capfd):
    with pytest.raises(LmrcError) as info:
        run_isolated("runs/x.json", _raise_bug)
    assert str(info.value) == (
        "runs/x.json: failed in its child process (ValueError: a bug; the traceback is above)"
    )
    err = capfd.readouterr().err
    assert "Traceback" in err and "in _raise_bug" in err


def test_an_interrupted_child_interrupts_the_caller():
    with pytest.raises(KeyboardInterrupt):
        run_isolated("a job", _raise_interrupt)


def test_a_child_killed_by_a_signal_is_one_error_worded_as_lmrc_crash(crash_logs):
    with pytest.raises(LmrcError) as info:
        run_isolated("runs/x.json", _kill_self, signal.SIGKILL)
    assert str(info.value) == "runs/x.json: " + crash_line(signal.SIGKILL, "", None)
    assert "killed (SIGKILL)" in str(info.value)
    assert not list(crash_logs.iterdir())  # no stack to keep


def test_a_native_crash_in_the_child_keeps_its_stack_in_the_crash_log(crash_logs):
    with pytest.raises(LmrcError) as info:
        run_isolated("runs/x.json", _kill_self, signal.SIGSEGV)
    message = str(info.value)
    assert message.startswith("runs/x.json: crashed in native code (SIGSEGV, segmentation fault) at ")
    (kept,) = crash_logs.iterdir()
    assert f"the stack is in {kept}" in message and "_kill_self" in kept.read_text()


def test_a_fault_signal_the_launcher_blocked_still_ends_the_child(crash_logs):
    """A CI runner or job harness may start us with SIGSEGV blocked; the child inherits the mask across exec, and a
    `kill`ed child then ran on and answered "ok" (seen in CI). The child unblocks the fault signals first."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGSEGV})
    try:
        with pytest.raises(LmrcError) as info:
            run_isolated("runs/x.json", _kill_self, signal.SIGSEGV)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
    assert "crashed in native code (SIGSEGV" in str(info.value)
