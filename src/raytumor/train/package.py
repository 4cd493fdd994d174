"""After training: the bundle (calibrated on validation, measured on the held-out test split, written
once), the split files next to the run, and the HTML report on the test split."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from raytumor.bundle import BundleMeta, file_sha256, save_bundle
from raytumor.calibrate import calibrate_bundle_meta, rescale_probs
from raytumor.evaluate import evaluate_source, predict_files
from raytumor.ingest import summary_to_json
from raytumor.metrics import metrics_with_ci
from raytumor.model import normalization
from raytumor.preprocess import parse_spec
from raytumor.report import build_report
from raytumor.storage import StorageOptions
from raytumor.train.config import TrainConfig
from raytumor.train.data import SplitData
from raytumor.train.loop import CHECKPOINT_MODEL, CHECKPOINT_STATE


def load_checkpoint_files(checkpoint: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(model state dict, training state) from a ``ray.train.Checkpoint`` on local or remote storage."""
    with checkpoint.as_directory() as d:
        state_dict = torch.load(Path(d) / CHECKPOINT_MODEL, map_location="cpu", weights_only=True)
        state = torch.load(Path(d) / CHECKPOINT_STATE, map_location="cpu", weights_only=False)["state"]
    return state_dict, state


def bundle_meta(
    cfg: TrainConfig, data: SplitData, best_metrics: dict[str, Any], metric: str, split_sha: str,
    extra_meta: dict[str, Any] | None = None,
) -> BundleMeta:  # fmt: skip
    """What the bundle says about itself before calibration: model, preprocessing, data, validation."""
    mean, std = normalization(cfg.backbone)
    counts = data.counts()
    return BundleMeta(
        backbone=cfg.backbone,
        classes=data.classes,
        negative_class=data.negative_class,
        image_size=cfg.image_size,
        mean=list(mean),
        std=list(std),
        preprocess=parse_spec(cfg.preprocess).to_dict(),
        metrics={
            "val": {k: v for k, v in best_metrics.items() if k.startswith("val_")},
            "best_epoch": best_metrics["epoch"],
            "selection_metric": metric,
            **(extra_meta or {}),
        },
        train_config=asdict(cfg),
        data={
            "source": " + ".join(cfg.data),
            "sources": {
                str(k): {str(s): int(v) for s, v in row.items()} for k, row in data.source_counts().iterrows()
            },
            "holdout": data.holdout,
            "split_manifest_sha256": split_sha,
            "split_counts": {s: {c: int(v) for c, v in row.items()} for s, row in counts.iterrows()},
            "duplicate_groups": data.duplicates["groups_with_duplicates"],
        },
    )


def measure(preds: pd.DataFrame, meta: BundleMeta, seed: int) -> dict[str, Any]:
    """Test metrics with 95 % CIs: the same function, clusters (duplicate groups + patients) and seed as
    ``raytumor evaluate``/``report`` on the same split, so the bundle's and the report's numbers agree."""
    if preds.empty:
        return {"n": 0}
    return metrics_with_ci(preds, meta.classes, meta.negative_class, meta.threshold, seed=seed)


def _predict_val_test(bundle_dir: Path, data: SplitData, cfg: TrainConfig) -> pd.DataFrame:
    """Validation and test predictions through the Predictor path ``raytumor score`` uses."""
    carry = ["path", "group", "split"] + [c for c in ("source", "patient_id") if c in data.manifest.columns]
    files = data.manifest.loc[data.manifest["split"].isin(["val", "test"]), carry + ["label"]]
    if files.empty:
        return pd.DataFrame(columns=["path", "split"])
    preds = predict_files(
        bundle_dir, files[["path", "label"]], storage=StorageOptions.from_env(cfg.s3_endpoint)
    )
    return preds.merge(files[carry], on="path", how="left")


def _calibrate(meta: BundleMeta, val: pd.DataFrame, target: float) -> None:
    """Temperature scaling on validation, then the threshold that reaches ``target`` sensitivity there."""
    vp = val[[f"prob_{c}" for c in meta.classes]].to_numpy(dtype=np.float64)
    ok = np.isfinite(vp).all(1)
    cal = calibrate_bundle_meta(meta, vp[ok], val["label"].to_numpy()[ok], target)
    meta.temperature, meta.threshold = float(cal["temperature"]), float(cal["threshold"])
    meta.metrics["calibration"] = {**cal, "fitted_on": "val"}


def staging_dir(bundle_dir: Path) -> Path:
    return bundle_dir.parent / f".{bundle_dir.name}-staging"


def discard_staging(bundle_dir: Path) -> None:
    """Remove :func:`export_bundle`'s staging copy. Callers do it at the end of the run, not right after
    predicting: a Ray Data predictor actor still starting up when its dataset finished would otherwise find
    the files gone and log a spurious error."""
    shutil.rmtree(staging_dir(bundle_dir), ignore_errors=True)


def export_bundle(
    cfg: TrainConfig,
    data: SplitData,
    state_dict: dict[str, torch.Tensor],
    best_metrics: dict[str, Any],
    history: pd.DataFrame,
    metric: str,
    split_sha: str,
    bundle_dir: Path,
    extra_meta: dict[str, Any] | None = None,
) -> tuple[BundleMeta, dict[str, Any]]:
    """Write the bundle: predictions need a model on disk, so a staging copy (temperature 1) predicts the
    validation and test splits; validation calibrates; the test split is measured at that calibration (and
    an external test source by ``raytumor evaluate`` on a calibrated staging copy); then the final bundle is
    written once, complete, atomically (the staging copy is removed by :func:`discard_staging`)."""
    meta = bundle_meta(cfg, data, best_metrics, metric, split_sha, extra_meta)
    fingerprints = data.fingerprints()
    staging = staging_dir(bundle_dir)
    shutil.rmtree(staging, ignore_errors=True)  # left by a crashed run
    save_bundle(staging, state_dict, meta)
    preds = _predict_val_test(staging, data, cfg)
    val = preds[preds["split"] == "val"]
    if cfg.target_sensitivity and len(val):
        _calibrate(meta, val, cfg.target_sensitivity)
    test_preds = preds[preds["split"] == "test"].copy()
    prob_cols = [f"prob_{c}" for c in meta.classes]
    if len(test_preds) and meta.temperature != 1.0:
        tp = test_preds[prob_cols].to_numpy(dtype=np.float64)
        test_preds[prob_cols] = rescale_probs(tp, 1.0, meta.temperature).astype(np.float32)
    test = measure(test_preds, meta, cfg.seed)
    meta.metrics["test"] = test
    if cfg.test_data:
        save_bundle(staging, state_dict, meta, fingerprints)  # calibrated, with the duplicate filter
        ext = evaluate_source(
            staging, cfg.test_data, bundle_dir.parent / "external_test", s3_endpoint=cfg.s3_endpoint,
            seed=cfg.seed,
        )  # fmt: skip
        meta.metrics["external_test"] = {"data": cfg.test_data, **ext["metrics"], "files": ext["files"]}
    meta.created_at = ""  # stamped by save_bundle
    save_bundle(bundle_dir, state_dict, meta, fingerprints, history)
    return meta, test


def write_split(data: SplitData, run_dir: Path) -> tuple[str, dict[str, Any]]:
    """Write the split manifest, ingest summary and duplicate groups next to the run; print the summary."""
    manifest_path = run_dir / "split_manifest.parquet"
    drop = [c for c in ("thumb", "thumb_crop") if c in data.manifest.columns]
    data.manifest.drop(columns=drop).to_parquet(manifest_path, index=False)
    summary_ingest = summary_to_json(data.catalogue.summary())
    summary_ingest["duplicates"] = {k: v for k, v in data.duplicates.items() if k != "groups"}
    if data.holdout:
        summary_ingest["holdout"] = data.holdout
    (run_dir / "ingest_summary.json").write_text(json.dumps(summary_ingest, indent=2) + "\n")
    data.duplicate_table.to_csv(run_dir / "duplicate_groups.csv", index=False)
    print(
        f"[raytumor] {summary_ingest['files_listed']} files listed, {summary_ingest['files_decoded']} decoded, "
        f"{summary_ingest['files_rejected']} rejected {summary_ingest['rejected_reasons']}, "
        f"{summary_ingest['files_ignored']} ignored; duplicate groups "
        f"{data.duplicates['groups_with_duplicates']} ({data.duplicates['redundant_files']} redundant files)"
    )
    print("[raytumor] split (files per class):\n" + data.counts().to_string())
    if "source" in data.manifest.columns and data.manifest["source"].nunique() > 1:
        print("[raytumor] split (files per source):\n" + data.source_counts().to_string())
    return file_sha256(manifest_path), summary_ingest


def write_test_report(run_dir: Path, data: SplitData, s3_endpoint: str | None, seed: int) -> str | None:
    """``raytumor report`` on the held-out test split (a manifest written next to the run)."""
    # source/patient_id travel with the manifest so the report breaks metrics down by source (LOSO runs)
    # and resamples patients as the bundle's test CI does.
    cols = ["path", "class_name"] + [c for c in ("source", "patient_id") if c in data.manifest.columns]
    test = data.manifest.loc[data.manifest["split"] == "test", cols]
    if test.empty:
        return None
    manifest = run_dir / "test_manifest.csv"
    test.rename(columns={"class_name": "label"}).to_csv(manifest, index=False)
    build_report(run_dir / "bundle", str(manifest), run_dir / "report", s3_endpoint=s3_endpoint, seed=seed)
    path = str(run_dir / "report" / "report.html")
    print(f"[raytumor] report: {path}")
    return path
