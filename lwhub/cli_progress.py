"""A transfer progress bar on stderr, drawn only for a person watching a terminal.

    pull author/noir-style  [##########..........]  48%  12.0/25.0 MB  31.2 MB/s

It is the ``progress(nbytes)`` callback the client calls as bytes move; downloads call
it from several threads at once, so it counts under a lock. Redrawn at most ten times a
second, and not at all when stderr is not a TTY or the command was given ``--quiet``.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Self, TextIO

WIDTH = 24
INTERVAL = 0.1


def _mb(n: float) -> str:
    return f"{n / 1e6:.1f}"


class Progress:
    def __init__(self, label: str, total: int | None = None, *, enabled: bool = True, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.enabled = enabled and self.stream.isatty()
        self.label, self.total, self.done = label, total, 0
        self.started = self.drawn = time.monotonic()
        self._lock = threading.Lock()

    def __call__(self, nbytes: int) -> None:
        with self._lock:
            self.done += nbytes
            now = time.monotonic()
            if self.enabled and now - self.drawn >= INTERVAL:
                self.drawn = now
                self._draw(now)

    def _draw(self, now: float) -> None:
        rate = self.done / max(now - self.started, 1e-9)
        if self.total:
            share = min(self.done / self.total, 1.0)
            filled = int(share * WIDTH)
            bar = f"[{'#' * filled}{'.' * (WIDTH - filled)}] {share:4.0%}  {_mb(self.done)}/{_mb(self.total)} MB"
        else:
            bar = f"{_mb(self.done)} MB"
        self.stream.write(f"\r{self.label}  {bar}  {_mb(rate)} MB/s\x1b[K")
        self.stream.flush()

    def close(self) -> None:
        """Draw the final state and end the line."""
        with self._lock:
            if self.enabled and self.done:
                self._draw(time.monotonic())
                self.stream.write("\n")
                self.stream.flush()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
