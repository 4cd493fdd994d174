"""Ctrl-C stops a search cleanly: Tune saves its state, nothing is exported, the run says how to resume and
exits 130, unfinished trials are `interrupted` (not `stopped_early`), and the same command resumes."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

from raytumor.tune import (
    RESUME_HINT,
    SearchInterrupted,
    _tune_signals,
    leaderboard,
)
from tests.conftest import run_env, stop_group

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _trial(path: str, epochs: int) -> SimpleNamespace:
    hist = pd.DataFrame(
        {"val_roc_auc": [0.7] * epochs, "epoch": range(epochs), "epochs_done": range(1, epochs + 1)}
    )
    return SimpleNamespace(metrics={"trial_id": Path(path).name}, path=path, config={}, error=None,
                           metrics_dataframe=hist)  # fmt: skip


def test_unfinished_trials_are_interrupted_not_stopped_early():
    results = [_trial("/s/done", 3), _trial("/s/asha", 1), _trial("/s/cut", 1), _trial("/s/queued", 0)]
    board = leaderboard(results, "val_roc_auc", "max", 3, frozenset({"cut", "queued"})).set_index("trial_id")
    assert board["status"].to_dict() == {
        "done": "completed",
        "asha": "stopped_early",
        "cut": "interrupted",
        "queued": "interrupted",
    }


def test_tune_leaves_no_sigint_handler_and_no_restore_hint(caplog):
    """Tune installs its own SIGINT handler for the search and never removes it after a normal finish: later
    Ctrl-Cs (the demo's training) would be swallowed. Its `Tuner.restore(...)` epilogue is dropped."""
    before = signal.getsignal(signal.SIGINT)
    with caplog.at_level(logging.WARNING, logger="ray.tune.tune"), _tune_signals():
        signal.signal(signal.SIGINT, lambda *_: None)  # what Tune's fit does
        log = logging.getLogger("ray.tune.tune")
        log.warning('Experiment has been interrupted, but the most recent state was saved.\nResume experiment with: Tuner.restore(path="x", trainable=...)')  # fmt: skip
        log.warning("Stop signal received (e.g. via SIGINT/Ctrl+C), ending Ray Tune run.")
    assert signal.getsignal(signal.SIGINT) is before
    assert "Tuner.restore" not in caplog.text and "Stop signal received" in caplog.text


@pytest.mark.parametrize("stage", ["tune", "demo", "cv"])
def test_an_interrupted_search_exits_130_and_exports_nothing(stage, monkeypatch, capsys):
    import importlib

    mod = importlib.import_module(f"raytumor.{stage}")
    summary = {"interrupted": True, "trial_status": {"interrupted": 2, "completed": 1}}

    def interrupted(*_: object) -> None:
        raise SearchInterrupted(summary)

    runner = {"tune": "run_search", "demo": "run_demo", "cv": "run_cv"}[stage]
    monkeypatch.setattr(mod, runner, interrupted)
    monkeypatch.setattr(mod, "config_from_args", lambda a: a, raising=False)
    monkeypatch.setattr(mod, "from_args", lambda _cls, a: a, raising=False)
    with pytest.raises(SystemExit) as e:
        mod.main(SimpleNamespace())
    assert e.value.code == 130
    out = capsys.readouterr().out
    assert RESUME_HINT in out and "nothing exported" in out


# ----------------------------------------------------------------------------------------------------------
# The real thing: SIGINT to `raytumor tune`


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_ctrl_c_stops_the_search_and_the_same_command_resumes(tmp_path):
    from raytumor.phantoms import write_phantom_dataset

    data = tmp_path / "phantoms"
    write_phantom_dataset(data, n_per_class=24, size=64, seed=4)
    out = tmp_path / "runs"
    cmd = [
        str(BIN / "raytumor"), "tune", "--data", str(data), "--out", str(out), "--name", "s",
        "--backbones", "efficientnet_lite0", "--num-samples", "2", "--max-epochs", "3",
        "--set", "image_size=64", "--set", "batch_size=8", "--set", "weights=none", "--no-report",
    ]  # fmt: skip
    raytmp = tempfile.mkdtemp(prefix="rtint", dir="/tmp")  # short: Ray's socket paths
    try:
        _interrupt_then_resume(cmd, out, tmp_path, raytmp)
    finally:
        shutil.rmtree(raytmp, ignore_errors=True)


def _interrupt_then_resume(cmd: list[str], out: Path, tmp_path: Path, raytmp: str) -> None:
    first_log = tmp_path / "first.log"
    with open(first_log, "w") as log:
        first = subprocess.Popen(
            cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=run_env(raytmp), start_new_session=True
        )
        try:
            deadline = time.time() + 900
            # The first trial has reported (Tune syncs result.json to storage only now and then).
            while "[raytumor] epoch 0:" not in first_log.read_text():
                assert first.poll() is None, first_log.read_text()[-4000:]
                assert time.time() < deadline, "no trial reported before the deadline"
                time.sleep(1)
            os.kill(first.pid, signal.SIGINT)  # Ctrl-C (Ray's own processes block SIGINT)
            rc = first.wait(timeout=300)
        finally:
            stop_group(first)
    text = first_log.read_text()
    assert rc == 130, text[-6000:]
    assert RESUME_HINT in text and "Tuner.restore" not in text
    assert not (out / "s" / "bundle").exists(), "an interrupted search exported a winner"
    summary = json.loads((out / "s" / "summary.json").read_text())
    assert summary["interrupted"] and summary["trial_status"].get("interrupted", 0) >= 1
    assert "stopped_early" not in summary["trial_status"]
    board = pd.read_csv(out / "s" / "leaderboard.csv")
    assert "interrupted" in set(board["status"])

    second_log = tmp_path / "second.log"
    with open(second_log, "w") as log:
        second = subprocess.Popen(
            cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=run_env(raytmp), start_new_session=True
        )
        try:
            rc = second.wait(timeout=1200)
        finally:
            stop_group(second)
    text = second_log.read_text()
    assert rc == 0, text[-6000:]
    assert "resuming search" in text
    assert "resuming from checkpoint after epoch" in text  # the cut trial goes on from its last epoch
    summary = json.loads((out / "s" / "summary.json").read_text())
    assert summary["trials"] == 2 and "interrupted" not in summary["trial_status"]
    assert (out / "s" / "bundle" / "model.pt").exists()


# Ctrl-C to `raytumor score`: one line saying what is kept, exit 130, the same command finishes the job


@pytest.mark.ray
@pytest.mark.timeout(900)
def test_ctrl_c_stops_scoring_cleanly_and_the_same_command_finishes(head_bundle, tmp_path):
    from raytumor.results import read_scores

    src = tmp_path / "in"
    src.mkdir()
    blobs = [(Path(p).suffix, Path(p).read_bytes()) for p in head_bundle.eval["path"]]
    n = 4000  # distinct names, the same bytes: long enough to be cut mid-way
    for i in range(n):
        suffix, data = blobs[i % len(blobs)]
        (src / f"{i:05d}{suffix}").write_bytes(data)
    out = tmp_path / "out"
    cmd = [str(BIN / "raytumor"), "score", "--bundle", str(head_bundle.bundle), "--input", str(src),
           "--output", str(out)]  # fmt: skip
    raytmp = tempfile.mkdtemp(prefix="rtint", dir="/tmp")
    try:
        first_log = tmp_path / "first.log"
        with open(first_log, "w") as log:
            first = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, env=run_env(raytmp), start_new_session=True
            )
            try:
                deadline = time.time() + 300
                while not list((out / "scores").glob("*.parquet")):  # scoring has begun
                    assert first.poll() is None, first_log.read_text()[-4000:]
                    assert time.time() < deadline, "no part written before the deadline"
                    time.sleep(0.2)
                os.kill(first.pid, signal.SIGINT)
                rc = first.wait(timeout=120)
            finally:
                stop_group(first)
        text = first_log.read_text()
        assert rc == 130, text[-6000:]
        assert "[score] interrupted:" in text and "run the same command again" in text, text[-3000:]
        assert "Traceback" not in text and "KeyboardInterrupt" not in text, text[-6000:]
        # the driver never joins another cluster once its own session is gone
        assert "Connecting to existing Ray cluster" not in text, text[-6000:]
        kept = len(read_scores(str(out), skip_unreadable=True))
        assert 0 < kept < n, kept

        second = subprocess.run(cmd, capture_output=True, text=True, env=run_env(raytmp), timeout=600)
        assert second.returncode == 0, (second.stdout + second.stderr)[-6000:]
        assert "already scored" in second.stdout
        rows = read_scores(str(out))
        assert len(rows) == n and rows["path"].nunique() == n
    finally:
        shutil.rmtree(raytmp, ignore_errors=True)
