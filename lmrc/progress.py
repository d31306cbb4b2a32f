"""Progress of a long loop: a tqdm bar on a terminal, a log line every `every_s` seconds elsewhere.

A bar is useless in a log file or a batch job's output (it is either absent or thousands of carriage returns),
and a log line per step floods a terminal; so exactly one of the two is shown. `show=False` shows neither
(tests); `show=True` forces the bar.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

from tqdm.auto import tqdm


class Progress:
    """`update(n, **postfix)` after each piece of work; `close()` (or the `with` block) at the end.

    The log line reads `<desc>: <done> / <total> <unit>s, <postfix k=v ...>, <rate> <unit>s/s`, counted from
    `initial` (work done by an earlier, resumed run does not count towards the rate).
    """

    def __init__(
        self,
        total: int,
        desc: str,
        unit: str = "it",
        initial: int = 0,
        show: bool | None = None,
        every_s: float = 30.0,
        logger: logging.Logger | None = None,
    ) -> None:
        bar = show is True or (show is None and sys.stderr.isatty())
        self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=not bar)
        self.log_lines = show is not False and not bar
        self.desc, self.unit, self.total, self.done = desc, unit, total, initial
        self.every_s, self.logger = every_s, logger or logging.getLogger(__name__)
        self.start = self.last = time.perf_counter()
        self.new = 0
        self.postfix: dict[str, Any] = {}

    def update(self, n: int = 1, **postfix: Any) -> None:
        self.done += n
        self.new += n
        self.postfix.update(postfix)
        self.bar.update(n)
        if postfix:
            self.bar.set_postfix(self.postfix, refresh=False)
        now = time.perf_counter()
        if self.log_lines and (now - self.last >= self.every_s or self.done >= self.total):
            self.last = now
            self.logger.info(self.line(now))

    def line(self, now: float | None = None) -> str:
        elapsed = (now if now is not None else time.perf_counter()) - self.start
        extra = "".join(f", {k} {v}" for k, v in self.postfix.items())
        rate = self.new / max(elapsed, 1e-9)
        return f"{self.desc}: {self.done} / {self.total} {self.unit}s{extra}, {rate:.2f} {self.unit}s/s"

    def close(self) -> None:
        self.bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
