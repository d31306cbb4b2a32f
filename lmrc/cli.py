"""The `lmrc` command: parse arguments, call one library function per subcommand, print the result.

Subcommands live in `lmrc/commands/<group>.py`, imported below; each module has `register(subparsers)`, and the
handlers it sets return an exit code. Library errors (`LmrcError`) and operating-system errors (a read-only folder, a full
disk, permission denied: `OSError`) become one line `lmrc: error: ...` with exit 2; `--debug` adds the
traceback above that line and changes nothing else (the exit code stays 2). The console command (`run`) watches
for native crashes from a parent process (lmrc.machine.crash), and settles this CPU's kernels before any command runs
(lmrc.machine.cpu_guard).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback

from lmrc import __version__
from lmrc.commands import compare, data, entities, env, evaluate, models, predict, show, stage1, stage2
from lmrc.errors import LmrcError
from lmrc.machine.cpu_guard import ensure
from lmrc.machine.crash import supervise
from lmrc.machine.heap import keep_freed_memory

# In the order of `lmrc --help`.
COMMANDS = (data, evaluate, models, stage1, stage2, predict, compare, show, entities, env)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lmrc",
        description="Document-level relation extraction: a relation classifier proposes entity pairs, an LLM "
        "classifies their relations (LMRC-style two-stage pipeline).",
    )
    parser.add_argument("--version", action="version", version=f"lmrc {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        command.register(sub)
    return parser


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is at the time of the record (it may be replaced, e.g. under pytest)."""

    @property  # type: ignore[override]
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _configure_logging(console_level: int) -> None:
    """Console at the asked level; the root stays at INFO or lower so a run's log file (train.log) is complete."""
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "_lmrc_console", False)]:
        root.removeHandler(old)  # main() may run several times in one process (tests)
    handler = _StderrHandler()
    handler._lmrc_console = True  # type: ignore[attr-defined]
    handler.setLevel(console_level)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(min(console_level, logging.INFO))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv or os.environ.get("LMRC_DEBUG") == "1"
    keep_freed_memory()
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        level = logging.DEBUG if args.debug else logging.WARNING if args.quiet else logging.INFO
        _configure_logging(level)
        if not getattr(args, "func", None):
            parser.print_help()
            return 0 if args.command is None else 2
        # Before any kernel runs: oneDNN fixes its ISA at its first use, and the guard may cap it. The commands
        # import torch inside their handlers, after this line (lmrc.commands).
        ensure()
        return int(args.func(args) or 0)
    except LmrcError as exc:
        return _error(str(exc), debug)
    except BrokenPipeError:
        # Output piped into e.g. `head`: stop quietly, as Unix tools do.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
    except OSError as exc:
        return _error(os_error_line(exc), debug)
    except KeyboardInterrupt:
        print("lmrc: interrupted", file=sys.stderr)
        return 130


def run(argv: list[str] | None = None) -> int:
    """The `lmrc` console command: `main` in a child process watched for native crashes (lmrc.machine.crash)."""
    return supervise(main, sys.argv[1:] if argv is None else argv)


def os_error_line(exc: OSError) -> str:
    """`<path>: <problem>` for an operating-system error (`<problem>` alone when it names no file)."""
    problem = exc.strerror or str(exc) or type(exc).__name__
    if exc.filename is not None:
        other = f" -> {exc.filename2}" if exc.filename2 is not None else ""
        return f"{os.fsdecode(exc.filename)}{other}: {problem}"
    return problem


def _error(line: str, debug: bool) -> int:
    if debug:
        traceback.print_exc()
    print(f"lmrc: error: {line}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(run())
