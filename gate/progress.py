"""A tiny progress reporter for stderr: a bar with ETA on a terminal, log lines in CI.

On a TTY the bar is redrawn in place (``\\r``) at most every 0.1 s. Otherwise (CI logs) a
plain line is printed every ``interval`` seconds (default 10, or ``GATE_PROGRESS_INTERVAL``)
and, if any was, once at the end: a job shorter than the interval prints nothing, so its
stderr stays a single line when it fails. With ``quiet`` nothing is printed. No dependency
beyond the standard library.
"""

from __future__ import annotations

import os
import sys
import time
from typing import TextIO

BAR_WIDTH = 24
LOG_INTERVAL = 10.0


class Progress:
    def __init__(
        self,
        total: int,
        label: str,
        unit: str = "items",
        quiet: bool = False,
        stream: TextIO | None = None,
        interval: float | None = None,
        tty: bool | None = None,
    ) -> None:
        self.total = max(int(total), 0)
        self.label = label
        self.unit = unit
        self.quiet = quiet
        self.stream = stream if stream is not None else sys.stderr
        self.interval = _interval() if interval is None else interval
        isatty = getattr(self.stream, "isatty", None)
        self.tty = tty if tty is not None else bool(isatty and isatty())
        self.done = 0
        self._start = time.monotonic()
        self._last = self._start
        self._logged = False
        self._closed = False

    def update(self, n: int = 1) -> None:
        self.done = min(self.done + n, self.total) if self.total else self.done + n
        if self.quiet:
            return
        now = time.monotonic()
        if self.tty:
            if now - self._last >= 0.1 or self.done >= self.total:
                self._last = now
                self.stream.write("\r" + self.line(now))
                self.stream.flush()
        elif now - self._last >= self.interval and self.done < self.total:
            self._last = now
            self._log(now)

    def close(self) -> None:
        if self._closed or self.quiet:
            self._closed = True
            return
        self._closed = True
        now = time.monotonic()
        if self.tty:
            self.stream.write("\r" + self.line(now) + "\n")
        elif self._logged or now - self._start >= self.interval:
            self._log(now)
        self.stream.flush()

    def line(self, now: float | None = None) -> str:
        now = time.monotonic() if now is None else now
        elapsed = now - self._start
        frac = self.done / self.total if self.total else 1.0
        filled = round(frac * BAR_WIDTH)
        bar = "#" * filled + "-" * (BAR_WIDTH - filled)
        return (
            f"{self.label} [{bar}] {self.done}/{self.total} {self.unit} "
            f"{frac:4.0%} {_clock(elapsed)} elapsed, ETA {self._eta(elapsed)}"
        )

    def _eta(self, elapsed: float) -> str:
        if self.done >= self.total:
            return "0s"
        if self.done == 0:
            return "?"
        return _clock(elapsed / self.done * (self.total - self.done))

    def _log(self, now: float) -> None:
        self._logged = True
        elapsed = now - self._start
        frac = self.done / self.total if self.total else 1.0
        self.stream.write(
            f"gate: {self.label}: {self.done}/{self.total} {self.unit} ({frac:.0%}), "
            f"{_clock(elapsed)} elapsed, ETA {self._eta(elapsed)}\n"
        )
        self.stream.flush()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _interval() -> float:
    try:
        return max(float(os.environ.get("GATE_PROGRESS_INTERVAL", LOG_INTERVAL)), 0.0)
    except ValueError:
        return LOG_INTERVAL


def _clock(seconds: float) -> str:
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    m, s = divmod(s, 60)
    if m < 60:
        return f"{m}m{s:02d}s"
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m"
