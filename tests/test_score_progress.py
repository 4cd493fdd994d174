"""A scoring job says how far it is: rows done/total, rate and ETA from the parts already on storage."""

from __future__ import annotations

import pandas as pd
import pyarrow.fs as pafs

from raytumor.score.progress import PartCounter, ProgressReporter, existing_parts, fmt_duration


def _part(path, n: int) -> None:
    pd.DataFrame({"id": [f"u{i}" for i in range(n)]}).to_parquet(path, index=False)


def test_counter_reads_finished_parts_once_and_skips_old_and_partial_ones(tmp_path):
    fs = pafs.LocalFileSystem()
    _part(tmp_path / "old.parquet", 7)  # a resumed run's earlier part: not this run's progress
    c = PartCounter(fs, str(tmp_path), ignore=existing_parts(fs, str(tmp_path)))
    assert c.count() == 0
    _part(tmp_path / "a.parquet", 5)
    (tmp_path / "b.parquet").write_bytes(b"PAR1 half a part, no footer yet")
    assert c.count() == 5
    _part(tmp_path / "b.parquet", 3)  # the part is finished now
    assert c.count() == 8
    assert PartCounter(fs, str(tmp_path / "missing")).count() == 0


def test_line_has_done_total_rate_and_eta():
    r = ProgressReporter(PartCounter(pafs.LocalFileSystem(), "/nonexistent"), total=1000, period_s=30)
    line = r.line(250, 50.0)
    assert line == "[score] progress: 250/1,000 rows (25.0 %), 5.0 rows/s, 50s elapsed, ETA 2m30s"
    assert r.line(0, 10.0).endswith("ETA -")
    assert "archives held more members" in r.line(1200, 60.0) and "(100.0 %)" in r.line(1200, 60.0)
    assert fmt_duration(3725) == "1h02m"


def test_reporter_prints_while_the_job_runs(tmp_path, monkeypatch):
    import time

    monkeypatch.setenv("RAYTUMOR_PROGRESS_S", "0.05")
    lines: list[str] = []
    fs = pafs.LocalFileSystem()
    with ProgressReporter(PartCounter(fs, str(tmp_path)), total=10, emit=lines.append):
        _part(tmp_path / "a.parquet", 4)
        deadline = time.monotonic() + 5
        while not any("4/10 rows" in ln for ln in lines) and time.monotonic() < deadline:
            time.sleep(0.02)
    n = len(lines)
    time.sleep(0.2)
    assert any("4/10 rows (40.0 %)" in ln for ln in lines)
    assert len(lines) == n  # stopped with the job
    monkeypatch.setenv("RAYTUMOR_PROGRESS_S", "0")
    with ProgressReporter(PartCounter(fs, str(tmp_path)), total=10, emit=lines.append) as r:
        assert r._thread is None  # 0 turns it off
