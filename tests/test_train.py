"""Ray Train end to end on real data: 2-worker DDP on CPU (gloo), fault tolerance, resume, bundle, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from raytumor.bundle import load_bundle, read_meta
from raytumor.train import TrainConfig, get_args_parser, run_training

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def ddp_run(ray_session, navoneel, tmp_path_factory):
    """One real 2-worker DDP run on navoneel-253 where a worker dies in epoch 1 and the run recovers."""
    out = tmp_path_factory.mktemp("runs")
    cfg = TrainConfig(
        data=str(navoneel),
        out=str(out),
        name="ddp",
        backbone="efficientnet_lite0",
        weights="imagenet",
        image_size=64,
        epochs=3,
        batch_size=16,
        num_workers=2,
        patience=5,
        max_failures=1,
        fail_at_epoch=1,
        seed=0,
    )
    return cfg, run_training(cfg)


def test_ddp_run_writes_a_loadable_bundle(ddp_run):
    cfg, summary = ddp_run
    assert summary["workers"] == 2 and not summary["use_gpu"]
    assert summary["epochs_run"] == 3
    bundle = load_bundle(summary["bundle"], device="cpu")
    meta = bundle.meta
    assert meta.backbone == "efficientnet_lite0" and meta.classes == ["no", "yes"] and meta.image_size == 64
    assert meta.data["split_manifest_sha256"] and meta.versions["ray"]
    # transfer learning on real data learns something even at 64 px in 3 short epochs
    test = meta.metrics["test"]
    assert test["n"] > 20 and test["roc_auc"] > 0.7
    assert (
        set(test["ci95"]["roc_auc"])
        and test["ci95"]["roc_auc"][0] <= test["roc_auc"] <= test["ci95"]["roc_auc"][1]
    )
    fp = bundle.train_fingerprints()
    assert len(fp) > 100 and {"sha256", "dhash", "thumb"} <= set(fp.columns)
    # calibrated on validation: temperature fitted, threshold reaches the target sensitivity there,
    # and the test metrics are measured at that operating point
    cal = meta.metrics["calibration"]
    assert cal["fitted_on"] == "val" and cal["n"] > 20 and 0.05 <= meta.temperature <= 100
    assert meta.threshold == cal["threshold"] and cal["val_sensitivity"] >= cfg.target_sensitivity
    # the run ends with the HTML report on the test split
    assert summary["report"] and Path(summary["report"]).is_file()
    assert (Path(summary["report"]).parent / "report.json").is_file()
    (tn, fp_), (fn, tp) = test["confusion_matrix"]
    assert test["sensitivity"] == pytest.approx(tp / (tp + fn))


def test_worker_failure_recovered_from_checkpoint(ddp_run):
    cfg, summary = ddp_run
    assert (cfg.run_dir / ".failed_once").exists()  # a worker really died in epoch 1
    assert summary["resumed_at_epochs"] == [1]  # restarted from epoch 0's checkpoint, not from scratch
    hist = pd.read_csv(Path(summary["bundle"]) / "history.csv")
    assert hist["epoch"].tolist() == [0, 1, 2]  # epoch 0 not redone, nothing skipped


def test_split_manifest_is_leakage_safe(ddp_run):
    cfg, _ = ddp_run
    m = pd.read_parquet(cfg.run_dir / "split_manifest.parquet")
    assert len(m) == 253
    used = m[m["split"] != "rejected"]
    # exact duplicates (22 groups) and near-duplicates never straddle splits
    assert (used.groupby("sha256")["split"].nunique() == 1).all()
    assert (used.groupby("group")["split"].nunique() == 1).all()
    counts = used["split"].value_counts(normalize=True)
    assert 0.6 < counts["train"] < 0.8 and counts["test"] > 0.08
    ingest = json.loads((cfg.run_dir / "ingest_summary.json").read_text())
    assert ingest["files_decoded"] == 253 and ingest["duplicates"]["redundant_files"] >= 25


def test_evaluate_cli_excludes_training_duplicates(ddp_run, navoneel, tmp_path):
    from raytumor.cli import main

    _, summary = ddp_run
    out = tmp_path / "ev"
    main(
        [
            "evaluate",
            "--bundle",
            summary["bundle"],
            "--data",
            str(navoneel),
            "--out",
            str(out),
            "--n-boot",
            "200",
        ]
    )
    res = json.loads((out / "metrics.json").read_text())
    # evaluating on the training folder itself: everything seen in train/val is dropped, the test split remains
    files = res["files"]
    assert files["excluded_duplicates_of_training"] + files["evaluated"] == 253
    assert files["evaluated"] <= read_meta(summary["bundle"]).metrics["test"]["n"] + 5
    preds = pd.read_parquet(out / "predictions.parquet")
    assert len(preds) == files["evaluated"] and np.isfinite(preds["score"]).all()


def test_resume_after_interrupted_run_three_classes(ray_session, tmp_path):
    """A run that dies (no retries left) resumes from its last checkpoint when rerun with the same name.

    Three classes (no-tumour + two tumour folders) exercise the multi-class path at the same time.
    """
    from raytumor.phantoms import write_phantom_dataset

    write_phantom_dataset(
        tmp_path / "data", n_per_class=40, size=96, seed=3, class_names=("notumor", "glioma")
    )
    (tmp_path / "data" / "meningioma").mkdir()
    for f in sorted((tmp_path / "data" / "glioma").iterdir())[::2]:
        f.rename(tmp_path / "data" / "meningioma" / f.name)
    base = dict(
        data=str(tmp_path / "data"),
        out=str(tmp_path / "runs"),
        name="resume",
        backbone="efficientnet_lite0",
        weights="none",
        image_size=48,
        epochs=3,
        batch_size=16,
        num_workers=1,
        patience=5,
        seed=1,
    )
    with pytest.raises(Exception):  # noqa: B017 - Ray wraps the worker death in its own error types
        run_training(TrainConfig(**base, max_failures=0, fail_at_epoch=1))
    summary = run_training(TrainConfig(**base, max_failures=0))
    assert summary["resumed_at_epochs"] == [1]
    hist = pd.read_csv(Path(summary["bundle"]) / "history.csv")
    assert hist["epoch"].tolist() == [0, 1, 2]
    meta = read_meta(summary["bundle"])
    assert meta.classes == ["glioma", "meningioma", "notumor"] and meta.negative_class == "notumor"
    assert meta.metrics["selection_metric"] == "val_roc_auc"
    assert len(meta.metrics["test"]["mc_confusion_matrix"]) == 3 and "mc_f1_macro" in meta.metrics["test"]


def test_args_parser_round_trip():
    args = get_args_parser().parse_args(["--data", "d", "--split", "0.8,0.1,0.1", "--class-order", "no,yes"])
    cfg = TrainConfig.from_args(args)
    assert (
        cfg.split == (0.8, 0.1, 0.1)
        and cfg.class_order == ["no", "yes"]
        and cfg.backbone == "efficientnet_lite0"
    )
