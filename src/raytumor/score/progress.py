"""Progress of a scoring job: a line at least every ``RAYTUMOR_PROGRESS_S`` seconds (20) with rows
done/total, rate and ETA, read from the Parquet parts the pipeline has written so far.

Ray Data's own progress bars are off (they garble logs of unattended runs) and ``write_parquet`` blocks
until the end, so a watcher thread counts the rows in the parts' footers instead: what it reports is what
is safely on storage, the same rows a rerun would skip.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import Any

import pyarrow.fs as pafs
import pyarrow.parquet as pq

PROGRESS_ENV = "RAYTUMOR_PROGRESS_S"
DEFAULT_PERIOD_S = 20.0  # "at least every 30 s" with room for a busy machine's timer jitter


def fmt_duration(seconds: float) -> str:
    s = int(max(0, round(seconds)))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


class PartCounter:
    """Rows in the Parquet parts under a folder, reading each finished part's footer once."""

    def __init__(self, fs: pafs.FileSystem, path: str, ignore: set[str] | None = None):
        self.fs, self.path = fs, path
        self.ignore = set(ignore or ())  # parts that were there before this run (a resumed job)
        self.rows: dict[str, int] = {}

    def count(self) -> int:
        try:
            infos = self.fs.get_file_info(pafs.FileSelector(self.path, allow_not_found=True))
        except OSError:  # storage hiccup: report what is known, the next poll catches up
            return sum(self.rows.values())
        for info in infos:
            name = info.path
            if info.type != pafs.FileType.File or not name.endswith(".parquet"):
                continue
            if name in self.rows or name in self.ignore:
                continue
            try:
                with self.fs.open_input_file(name) as f:
                    self.rows[name] = pq.ParquetFile(f).metadata.num_rows
            except Exception:  # noqa: BLE001 - a part still being written has no footer yet
                continue
        return sum(self.rows.values())


def existing_parts(fs: pafs.FileSystem, path: str) -> set[str]:
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    except OSError:
        return set()
    return {i.path for i in infos if i.type == pafs.FileType.File}


class ProgressReporter:
    """Prints ``[score] progress: done/total rows (pct), rate, ETA`` every ``period_s`` while running.

    ``total`` is the units to score; tar archives count one until their members are read, so the total
    may grow (the line then says so)."""

    def __init__(
        self,
        counter: PartCounter,
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
