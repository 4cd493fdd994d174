"""Progress of a scoring job: a line at least every ``RAYTUMOR_PROGRESS_S`` seconds (20) with rows
done/total, rate and ETA of the rows written so far.

Ray Data's own progress bars are off (they garble logs of unattended runs). The model actors write each
batch's Parquet part themselves and stream back its row count, so what a line reports is what is safely on
storage: the same rows a rerun would skip.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import Any

PROGRESS_ENV = "RAYTUMOR_PROGRESS_S"
DEFAULT_PERIOD_S = 20.0  # "at least every 30 s" with room for a busy machine's timer jitter


def fmt_duration(seconds: float) -> str:
    s = int(max(0, round(seconds)))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


class RowCounter:
    """Rows on storage so far: the driver adds each part's row count as the actors report it."""

    def __init__(self) -> None:
        self._rows = 0
        self._lock = threading.Lock()

    def add(self, n: int) -> None:
        with self._lock:
            self._rows += n

    def count(self) -> int:
        with self._lock:
            return self._rows


class ProgressReporter:
    """Prints ``[score] progress: done/total rows (pct), rate, ETA`` every ``period_s`` while running.

    ``total`` is the units to score; tar archives count one until their members are read, so the total
    may grow (the line then says so)."""

    def __init__(
        self,
        counter: RowCounter,
        total: int,
        period_s: float | None = None,
        emit: Callable[[str], Any] | None = None,
    ):
        self.counter, self.total = counter, max(0, int(total))
        env = os.environ.get(PROGRESS_ENV)
        self.period_s = float(env) if period_s is None and env else period_s or DEFAULT_PERIOD_S
        self.emit = emit or (lambda line: print(line, flush=True))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.t0 = time.monotonic()

    def line(self, done: int, elapsed: float) -> str:
        total = max(self.total, done)
        rate = done / elapsed if elapsed > 0 else 0.0
        pct = 100.0 * done / total if total else 100.0
        eta = f"ETA {fmt_duration((total - done) / rate)}" if rate > 0 and done < total else "ETA -"
        grown = " (archives held more members than listed)" if done > self.total else ""
        return (
            f"[score] progress: {done:,}/{total:,} rows ({pct:.1f} %), {rate:.1f} rows/s, "
            f"{fmt_duration(elapsed)} elapsed, {eta}{grown}"
        )

    def poll(self) -> str:
        return self.line(self.counter.count(), time.monotonic() - self.t0)

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            self.emit(self.poll())

    def __enter__(self) -> ProgressReporter:
        if self.period_s > 0:
            self._thread = threading.Thread(target=self._run, name="raytumor-progress", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
