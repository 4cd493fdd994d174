"""Slow end-to-end checks (``pytest -m slow``; .ci/run runs them after the default suite if time allows)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def test_demo_job_end_to_end(tmp_path):
    """The README's main command, as a separate process with its own in-process Ray (SYNTHETIC data)."""
    env = {**os.environ, "RAY_ADDRESS": ""}
    env.pop("RAY_ADDRESS")
    r = subprocess.run(
        [
            sys.executable,
            str(REPO / "jobs" / "demo.py"),
            "--out",
            str(tmp_path),
            "--n-per-class",
            "60",
            "--epochs",
            "2",
            "--tune-epochs",
            "1",
            "--image-size",
            "64",
            "--num-workers",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    summary = json.loads((tmp_path / "demo_summary.json").read_text())
    assert Path(summary["bundle"], "bundle.json").is_file()
    assert len(summary["corrupt_files"]) == 3
    ingest = json.loads((Path(summary["run_dir"]) / "ingest_summary.json").read_text())
    assert ingest["files_rejected"] == 3 and ingest["files_decoded"] == 120
    assert "SYNTHETIC" in r.stdout
    # the whole pipeline: a 2-backbone search, the winner trained, a folder scored, reports written
    import pandas as pd

    board = pd.read_csv(summary["search"]["leaderboard"])
    assert len(board) == 2 and set(board["config/backbone"]) == {"efficientnet_lite0", "efficientnet_lite1"}
    # the retrained winner's bundle records what the search chose (the model card's "tuned by search")
    meta = json.loads(Path(summary["bundle"], "bundle.json").read_text())
    assert sorted(meta["metrics"]["search"]["config"]) == ["backbone", "lr"]
    assert meta["metrics"]["search"]["config"]["backbone"] == meta["backbone"]
    assert meta["metrics"]["search"]["trial_id"] == summary["search"]["best_trial"]
    assert meta["metrics"]["search"]["trial_id"] in set(board["trial_id"])
    inbox = [p for p in (tmp_path / "inbox").rglob("*") if p.is_file()]
    assert summary["score_summary"]["rows"] == len(inbox) and summary["score_summary"]["errors"] >= 3
    assert (
        Path(summary["report"]).is_file() and (Path(summary["run_dir"]) / "report" / "report.html").is_file()
    )
    for line in ("search leaderboard:", "bundle:", "scores:", "holdout report:"):
        assert line in r.stdout
    from tests.conftest import log_warnings

    warned = log_warnings(r.stdout + r.stderr)  # the README's first command prints a warning-free log
    assert not warned, "\n".join(warned[:20])


def test_br35h_split_removes_leakage(ray_session, br35h):
    """Grouped split of all 3000 br35h files: no duplicate group straddles, far fewer test near-copies."""
    from raytumor import split
    from raytumor.ingest import build_catalogue

    cat = build_catalogue(str(br35h))
    ok = cat.ok.reset_index(drop=True)
    assert len(ok) == 3000 and cat.summary()["modes"] == {"RGB": 2891, "L": 105, "RGBA": 3, "P": 1}
    groups = split.find_duplicate_groups(ok)
    splits = split.split_groups(ok, groups, seed=0)
    leak = split.leakage(ok, splits, groups)
    assert leak["straddling_groups"] == 0
    # the exact duplicate pair no355/no532 lands in one split
    idx = {Path(p).name: i for i, p in enumerate(ok["path"])}
    assert splits[idx["no355.jpg"]] == splits[idx["no532.jpg"]]
    # stratified: each split keeps ~50/50 classes
    for s in ("train", "val", "test"):
        frac = ok.loc[splits == s, "label"].mean()
        assert 0.45 < frac < 0.55, (s, frac)
    # a plain stratified split leaks hundreds of test images with a near-copy in train; grouped, none by rule
    rng = np.random.default_rng(0)
    plain = np.empty(len(ok), dtype=object)
    for lab in (0, 1):
        ids = rng.permutation(np.flatnonzero(ok["label"].to_numpy() == lab))
        n = len(ids)
        plain[ids[: int(0.7 * n)]], plain[ids[int(0.7 * n) : int(0.85 * n)]], plain[ids[int(0.85 * n) :]] = (
            "train",
            "val",
            "test",
        )
    test_plain = ok[plain == "test"]
    hits_plain = split.match_reference(test_plain, ok[plain == "train"]).sum()
    hits_grouped = split.match_reference(ok[splits == "test"], ok[splits == "train"]).sum()
    assert hits_plain > 300 and hits_grouped == 0, (hits_plain, hits_grouped)


def test_gpu_check_script_runs_on_cpu():
    """bench/gpu_check.py imports no Ray and runs the shared train step; on CPU as a smoke test."""
    r = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench" / "gpu_check.py"),
            "--backbones",
            "resnet18,efficientnet_lite0",
            "--image-size",
            "64",
            "--batch-size",
            "8",
            "--steps",
            "2",
            "--warmup",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("train img/s") == 2
