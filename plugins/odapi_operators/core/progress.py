"""Progress of a long stage: a log line at a steady cadence, and optionally a terminal bar.

The log line (done, failed, images/s, ETA) is what an Airflow task log shows; it comes from a
timer thread, so a stage whose every request hangs still reports that it is alive.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Callable

Log = Callable[..., None]


def _eta(seconds: float) -> str:
    if seconds == float("inf"):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else \
        f"{seconds // 60}m{seconds % 60:02d}s"


class Progress:
    """Thread-safe counters; use as a context manager so the timer and bar are closed."""

    def __init__(self, stage: str, total: int, log: Log | None = None, every: float = 15.0,
                 bar: bool = False):
        self.stage, self.total, self.log, self.every = stage, total, log, every
        self.done = self.failed = self.skipped = 0
        self.start = time.monotonic()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._bar = None
        if bar:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=stage, unit="img", file=sys.stderr,
                             dynamic_ncols=True)
        self._timer = None
        if log is not None:
            self._timer = threading.Thread(target=self._tick, name=f"{stage}-progress",
                                           daemon=True)
            self._timer.start()

    def update(self, ok: bool = True, skipped: bool = False) -> None:
        with self._lock:
            self.done += 1
            self.failed += not ok
            self.skipped += skipped
        if self._bar is not None:
            self._bar.update(1)
            if not ok:
                self._bar.set_postfix(failed=self.failed, refresh=False)

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.start, 1e-9)
        fresh = self.done - self.skipped
        rate = fresh / elapsed
        left = self.total - self.done
        eta = left / rate if rate > 0 else (0.0 if not left else float("inf"))
        return (f"{self.stage}: {self.done}/{self.total} done ({self.skipped} resumed), "
                f"{self.failed} failed, {rate:.1f} images/s, ETA {_eta(eta)}")

    def _tick(self) -> None:
        while not self._stop.wait(self.every):
            self.log(self.line())

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._bar is not None:
            self._bar.close()
        if self.log is not None:
            self.log(self.line())
