"""A dependency-free progress bar on stderr (one line, redrawn), with elapsed time and a naive ETA."""
from __future__ import annotations

import sys
import time


def _fmt(sec: float) -> str:
    sec = int(max(sec, 0))
    return f"{sec // 60}:{sec % 60:02d}"


class Progress:
    def __init__(self, total: int, stream=None, width: int = 24, enabled: bool | None = None, clock=time.monotonic):
        self.total, self.width, self.clock = max(total, 1), width, clock
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.t0 = clock()
        self._last_len = 0
        self._last_line = None

    def line(self, done: int, label: str) -> str:
        frac = min(done / self.total, 1.0)
        fill = int(round(frac * self.width))
        el = self.clock() - self.t0
        eta = el / done * (self.total - done) if done else 0.0
        return (f"[{'#' * fill}{'.' * (self.width - fill)}] {done}/{self.total} {_fmt(el)} elapsed"
                f"{f', ~{_fmt(eta)} left' if done and done < self.total else ''}  {label}")

    def update(self, done: int, label: str = "") -> None:
        text = self.line(done, label)
        if self.enabled:
            pad = max(self._last_len - len(text), 0)
            self.stream.write("\r" + text + " " * pad)
            self._last_len = len(text)
            if done >= self.total:
                self.stream.write("\n")
        elif done != self._last_line:  # not a terminal (log file, CI): one line per case
            self.stream.write(text + "\n")
            self._last_line = done
        self.stream.flush()
