"""A scoring job says how far it is: rows done/total, rate and ETA of the rows already on storage."""

from __future__ import annotations

import threading

import pyarrow.parquet as pq

from raytumor.results import part_name, read_scores, scored_ids, write_part
from raytumor.score.progress import ProgressReporter, RowCounter, fmt_duration


def test_row_counter_adds_from_several_threads():
    c = RowCounter()
    threads = [threading.Thread(target=lambda: [c.add(1) for _ in range(1000)]) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert c.count() == 4000


def test_parts_are_named_by_their_rows_so_a_rerun_batch_overwrites_its_part(tmp_path):
    import pyarrow as pa

    scores = tmp_path / "out" / "scores"
    scores.mkdir(parents=True)
    t = pa.table({"path": ["a.jpg", "b.jpg"], "label": ["yes", "no"]})
    p1 = write_part(t, str(scores), None)
    p2 = write_part(t, str(scores), None)  # the same batch again (its actor died after writing)
    assert p1 == p2 and len(list(scores.iterdir())) == 1
    assert part_name(["a.jpg", "b.jpg"]) != part_name(["a.jpg", "c.jpg"])
    write_part(pa.table({"path": ["c.jpg"], "label": ["no"]}), str(scores), None)
    assert sorted(read_scores(str(tmp_path / "out"))["path"]) == ["a.jpg", "b.jpg", "c.jpg"]
    assert pq.read_table(p1).num_rows == 2
    (scores / "part-half.parquet").write_bytes(b"PAR1 a killed write, no footer")
    ids, removed = scored_ids(str(tmp_path / "out"), None)
    assert ids == {"a.jpg", "b.jpg", "c.jpg"} and removed == 1


def test_line_has_done_total_rate_and_eta():
    r = ProgressReporter(RowCounter(), total=1000, period_s=30)
    line = r.line(250, 50.0)
    assert line == "[score] progress: 250/1,000 rows (25.0 %), 5.0 rows/s, 50s elapsed, ETA 2m30s"
    assert r.line(0, 10.0).endswith("ETA -")
    assert "archives held more members" in r.line(1200, 60.0) and "(100.0 %)" in r.line(1200, 60.0)
    assert fmt_duration(3725) == "1h02m"


def test_reporter_prints_while_the_job_runs(monkeypatch):
    import time

    monkeypatch.setenv("RAYTUMOR_PROGRESS_S", "0.05")
    lines: list[str] = []
    c = RowCounter()
    with ProgressReporter(c, total=10, emit=lines.append):
        c.add(4)
        deadline = time.monotonic() + 5
        while not any("4/10 rows" in ln for ln in lines) and time.monotonic() < deadline:
            time.sleep(0.02)
    n = len(lines)
    time.sleep(0.2)
    assert any("4/10 rows (40.0 %)" in ln for ln in lines)
    assert len(lines) == n  # stopped with the job
    monkeypatch.setenv("RAYTUMOR_PROGRESS_S", "0")
    with ProgressReporter(c, total=10, emit=lines.append) as r:
        assert r._thread is None  # 0 turns it off
