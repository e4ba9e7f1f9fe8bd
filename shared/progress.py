"""Progress of long byte-counting work (downloads, quantization) for a person at a terminal.

On a terminal (stderr is a TTY) it redraws one line: done / total, rate, ETA. Anywhere else
(logs, CI, Flower's log capture) it prints nothing: the callers log what finished.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    """One progress line: ``label  12.0/98.0 MB  8.1 MB/s  ETA 11 s``."""

    def __init__(self, label: str, total: int, start: int = 0, stream: TextIO | None = None, unit: str = "MB") -> None:
        self.label, self.total, self.start = label, total, start
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty()
        self.scale = 1e6 if unit == "MB" else 1.0
        self.unit = unit
        self._t0 = time.monotonic()
        self._last = 0.0
        self.done = start

    def update(self, done: int) -> None:
        """Record progress; redraw at most 10 times a second."""
        self.done = done
        now = time.monotonic()
        if self.enabled and (now - self._last >= 0.1 or done >= self.total):
            self._last = now
            self.stream.write("\r" + self.line(now) + "\033[K")
            self.stream.flush()

    def line(self, now: float | None = None) -> str:
        """Return the progress line as it would be drawn."""
        elapsed = max(1e-9, (now or time.monotonic()) - self._t0)
        rate = (self.done - self.start) / elapsed
        eta = f"ETA {(self.total - self.done) / rate:.0f} s" if rate > 0 and self.done < self.total else "done"
        s, u = self.scale, self.unit
        return f"{self.label}  {self.done / s:.1f}/{self.total / s:.1f} {u}  {rate / s:.1f} {u}/s  {eta}"

    def close(self) -> None:
        """End the line (terminal only)."""
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()
