"""Progress inside a long phase: "module i of N" with the time spent, on stderr.

On a real checkpoint one phase (the truth at float64, the bundle's write, the runtime's forward) can run for
minutes; a line per phase is then silence. On a terminal the count is redrawn in place (a bar, at most five
times a second); anywhere else (a CI log, a file) a plain line is printed at most every EVERY seconds, so a
tiny model's phases, over in a second or two, print nothing more than their one line.
"""

from __future__ import annotations

import os
import sys
import time

# seconds between plain progress lines off a terminal; MMLORA_PROGRESS_EVERY overrides it (0: every step)
EVERY = float(os.environ.get("MMLORA_PROGRESS_EVERY", "10"))
_REDRAW = 0.2  # seconds between redraws of the bar on a terminal
_BAR = 24


class Progress:
    """`with Progress("llava: truth at float64", total, "module") as p: ... p.step()`; total None: counted only."""

    def __init__(self, label: str, total: int | None, unit: str = "module", stream=None):
        self.label, self.total, self.unit = label, total, unit
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.done, self.t0 = 0, time.monotonic()
        self._last = self.t0
        self._drawn = False

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        if self.tty and self._drawn:
            self._draw(final=True)
            self.stream.write("\n")
            self.stream.flush()

    def step(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if self.tty:
            if now - self._last >= _REDRAW:
                self._last = now
                self._draw()
        elif now - self._last >= EVERY:
            self._last = now
            print(f"  {self.label}: {self._count()}, {now - self.t0:.0f} s", file=self.stream, flush=True)

    def _count(self) -> str:
        if self.total:
            return f"{self.unit} {min(self.done, self.total)} of {self.total} ({100 * self.done // self.total}%)"
        return f"{self.done} {self.unit}s"

    def _draw(self, final: bool = False) -> None:
        frac = min(self.done / self.total, 1.0) if self.total else 0.0
        bar = "#" * round(frac * _BAR) + "." * (_BAR - round(frac * _BAR)) if self.total else ""
        self.stream.write(f"\r  {self.label}: [{bar}] {self._count()}, {time.monotonic() - self.t0:.0f} s\033[K"
                          if bar else f"\r  {self.label}: {self._count()}, {time.monotonic() - self.t0:.0f} s\033[K")
        self.stream.flush()
        self._drawn = True


def counting(sink, progress: Progress):
    """A capture sink (name, key, tensor) that also steps `progress` once per module output it receives."""
    def put(name: str, key: str, t) -> None:
        sink(name, key, t)
        if key == "out":
            progress.step()
    return put
