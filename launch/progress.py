"""The progress display of a run, shared by `eosrl train` and the local launcher:
tqdm's bar when stderr is a terminal, and plain lines when it is not (CI, a log file
of `make train`), since a bar's carriage-return redraws would fill a file with
thousands of lines.

In a file a line comes every 10 s at first; the gap grows to a twentieth of the time
elapsed (at most 5 min), so a run of minutes writes a few dozen lines and one of a
day a few hundred. A closing line gives the final count.
"""
from __future__ import annotations

import sys
import time
from typing import Any, Callable, Dict, Optional, TextIO

MIN_INTERVAL_S = 10.0
MAX_INTERVAL_S = 300.0
INTERVAL_FRACTION = 1 / 20  # of the time elapsed: the gap between lines of a long run


def progress_bar(total: int, initial: int = 0, unit: str = "step", stream: Optional[TextIO] = None):
    """A progress display with tqdm's `n`, `update(k)`, `set_postfix(**values)` and `close()`
    on `stream` (the current sys.stderr by default: route_native_logs replaces it)."""
    stream = sys.stderr if stream is None else stream
    if _is_terminal(stream):
        from tqdm import tqdm
        return tqdm(total=total, initial=initial, unit=unit, dynamic_ncols=True, file=stream)
    return LineProgress(total, initial, unit, stream)


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class LineProgress:
    """tqdm's interface, written as one plain line per interval; set the postfix before
    `update` (as with tqdm's `refresh=False`), so a line carries the newest values."""

    def __init__(self, total: int, initial: int, unit: str, stream: TextIO,
                 clock: Callable[[], float] = time.monotonic):
        self.total, self.n, self.unit, self.stream, self.clock = total, initial, unit, stream, clock
        self.initial = initial  # a resumed run's count: the time left is from this run's rate
        self.start = clock()
        self._last = (self.start, initial)  # (time, count) of the last line: the rate since it
        self._postfix: Dict[str, Any] = {}
        self._closed = False

    def update(self, k: int = 1) -> None:
        self.n += k
        now = self.clock()
        gap = min(MAX_INTERVAL_S, max(MIN_INTERVAL_S, (now - self.start) * INTERVAL_FRACTION))
        if now - self._last[0] >= gap:
            self._write(now)

    def set_postfix(self, refresh: bool = True, **values: Any) -> None:
        del refresh  # a line is written by `update`, when one is due
        self._postfix = values

    def close(self) -> None:
        if not self._closed and self.n != self._last[1]:
            self._write(self.clock())
        self._closed = True

    def _write(self, now: float) -> None:
        elapsed = now - self.start
        # The rate since the last line; over the whole run when that was a moment ago (close).
        since = self._last if now - self._last[0] >= 1.0 else (self.start, self.initial)
        rate = (self.n - since[1]) / max(now - since[0], 1e-9)
        parts = [f"{self.n}/{self.total} {self.unit}s"
                 + (f" ({100 * self.n / self.total:.0f}%)" if self.total > 0 else ""),
                 f"{rate:.0f} {self.unit}/s", f"{_clock_time(elapsed)} elapsed"]
        done = self.n - self.initial
        if 0 < done and self.n < self.total:
            parts.append(f"{_clock_time((self.total - self.n) * elapsed / done)} left")
        if self._postfix:
            parts.append(" ".join(f"{k}={v}" for k, v in self._postfix.items()))
        print("progress: " + ", ".join(parts), file=self.stream, flush=True)
        self._last = (now, self.n)


def _clock_time(seconds: float) -> str:
    """h:mm:ss, as tqdm shows times."""
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
