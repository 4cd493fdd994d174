"""After training: the bundle (calibrated on validation, measured on the held-out test split, written
once), the split files next to the run, and the HTML report on the test split."""

from __future__ import annotations

import fnmatch
import hashlib
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
from raytumor.ingest import decode_dataset, summary_to_json
from raytumor.metrics import metrics_with_ci, predict_labels, tumour_score
from raytumor.model import normalization
from raytumor.predict import Predictor
from raytumor.preprocess import parse_spec
from raytumor.report import build_report
from raytumor.scan import VIEWS, ok_mask
from raytumor.scope import (
    Heads,
    Scope,
    ViewNet,
    count_scope,
    fit_ood,
    fit_threshold,
    fit_view_net,
    geometry_views,
)
from raytumor.storage import StorageOptions, read_manifest
from raytumor.train.config import TrainConfig, known_views
from raytumor.train.data import SplitData
from raytumor.train.loop import CHECKPOINT_MODEL, CHECKPOINT_PROGRESS, read_progress

TEST_PREDICTIONS_FILE = "test_predictions.parquet"


def load_checkpoint_files(checkpoint: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(model state dict, training state) from a ``ray.train.Checkpoint`` on local or remote storage."""
    with checkpoint.as_directory() as d:
        state_dict = torch.load(Path(d) / CHECKPOINT_MODEL, map_location="cpu", weights_only=True)
        state = read_progress(d)
    return state_dict, state


def run_history(run_path: str, filesystem: Any = None) -> pd.DataFrame | None:
    """A Train run's per-epoch metrics, read from its own checkpoints on local or remote storage: the
    history the latest checkpoint carries, each epoch with ``checkpoint_path`` where that epoch's
    checkpoint is still kept (retention deletes some). None when the run saved no checkpoint.

    Why not Tune's ``result.json``: Tune gets only metrics from ``TuneReportCallback``, so a trial it
    restores has no Tune checkpoint, its ``result.json`` restarts empty, and a finished trial that the
    last state snapshot still called RUNNING comes back with no results at all."""
    from pyarrow import fs as pafs

    fs = filesystem
    if fs is None:
        fs, run_path = (
            pafs.FileSystem.from_uri(run_path) if "://" in run_path else (pafs.LocalFileSystem(), run_path)
        )
    found = fs.get_file_info(pafs.FileSelector(run_path.rstrip("/"), allow_not_found=True))
    by_epoch: dict[int, tuple[str, dict[str, Any]]] = {}
    for info in found:
        if info.type != pafs.FileType.Directory or not info.base_name.startswith("checkpoint_"):
            continue
        try:
            with fs.open_input_stream(f"{info.path}/{CHECKPOINT_PROGRESS}") as f:
                state = json.loads(f.read())
        except (FileNotFoundError, OSError, ValueError):
            continue  # a checkpoint being written or deleted right now, or from an older raytumor
        by_epoch[int(state["epoch"])] = (info.path, state)
    if not by_epoch:
        return None
    _, latest = by_epoch[max(by_epoch)]
    hist = pd.DataFrame(latest["history"])
    if hist.empty:
        return None
    # Paths on ``filesystem``, as Train reports them (``ray.train.Checkpoint(path, filesystem=...)``).
    hist["checkpoint_path"] = [by_epoch[int(e)][0] if int(e) in by_epoch else None for e in hist["epoch"]]
    return hist


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


DESCRIBING = ("source", "patient_id", "view", "sequence", "site", "synthetic")
VIEW_HOLDOUT_EVERY = 5  # every 5th view-data patient (by a stable hash) measures the view net


def _predict_splits(bundle_dir: Path, data: SplitData, cfg: TrainConfig) -> pd.DataFrame:
    """Train, validation and test predictions with pooled features, through the Predictor path
    ``raytumor score`` uses (the train split's features fit the OOD reference and count the scope)."""
    carry = ["path", "group", "split"] + [c for c in DESCRIBING if c in data.manifest.columns]
    files = data.manifest.loc[data.manifest["split"].isin(["train", "val", "test"]), carry + ["label"]]
    if files.empty:
        return pd.DataFrame(columns=["path", "split"])
    preds = predict_files(
        bundle_dir, files[["path", "label"]], storage=StorageOptions.from_env(cfg.s3_endpoint), features=True
    )
    # The manifest's view (or --known-view's) is ground truth; the predictions' `view` is the Predictor's call.
    files = files.assign(view=declared_views(files, cfg))
    carry = carry if "view" in carry else carry + ["view"]
    return preds.merge(files[carry].rename(columns={"view": "known_view"}), on="path", how="left")


def declared_views(man: pd.DataFrame, cfg: TrainConfig) -> pd.Series:
    """Each file's known view: its manifest's ``view``, else the first ``--known-view`` pattern its source
    matches, else None."""
    given = man["view"] if "view" in man.columns else [None] * len(man)
    # manifests of several sources mix views with missing values (NaN, pd.NA): only names count
    views = pd.Series(
        [v if isinstance(v, str) and v in VIEWS else None for v in given], index=man.index, dtype=object
    )
    if cfg.known_view and "source" in man.columns:
        src = man["source"].astype(str)
        for pattern, view in known_views(cfg.known_view):
            hit = views.isna() & src.map(lambda s, p=pattern: fnmatch.fnmatchcase(s, p)).astype(bool)
            views[hit] = view
    return views


def _features(rows: pd.DataFrame) -> np.ndarray:
    return np.stack([np.asarray(f, dtype=np.float32) for f in rows["features"]])


def _stable_bucket(key: str, n: int) -> int:
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) % n


VIEW_KNOWN_PER_SOURCE = 2000  # training examples with a manifest/header view, per source, for the view net


def _view_net(data: SplitData, cfg: TrainConfig, meta: BundleMeta) -> tuple[ViewNet | None, dict[str, Any]]:
    """Train the view net on ``--view-data`` (slices whose view geometry gave) and on the training split's
    examples whose manifest gives the view; measure it on held-out ``--view-data`` patients' slices (every
    VIEW_HOLDOUT_EVERY-th patient): the shipped net is the measured one."""
    if not cfg.view_data:
        return None, {}
    storage = StorageOptions.from_env(cfg.s3_endpoint)
    df = pd.concat([read_manifest(m, storage, required=("path", "view")) for m in cfg.view_data])
    # axial cuts far below the vertex (``raytumor slices --depth-mm 0``) teach the net "not brain"
    below = df["mm_below_vertex"].tolist() if "mm_below_vertex" in df.columns else None
    df["view"] = geometry_views(df["view"].tolist(), below)
    df = df[df["view"].notna()].reset_index(drop=True)
    pid = df["patient_id"].astype(str) if "patient_id" in df.columns else df["path"].astype(str)
    df["held"] = [_stable_bucket(p, VIEW_HOLDOUT_EVERY) == 0 for p in pid]
    man = data.manifest.assign(view=declared_views(data.manifest, cfg))
    known = man[(man["split"] == "train") & man["view"].isin(VIEWS)]
    if len(known):
        if "source" in known.columns:  # no single source's look may teach what "axial" is
            known = known.groupby("source", group_keys=False).apply(
                lambda g: g.sample(min(len(g), VIEW_KNOWN_PER_SOURCE), random_state=cfg.seed)
            )
        df = pd.concat([df, known[["path", "view"]].assign(held=False)], ignore_index=True)
    df = df.drop_duplicates("path").reset_index(drop=True)
    rows = decode_dataset(
        df[["path"]],
        storage=storage,
        image_size=meta.image_size,
        fingerprints=False,
        preprocess=meta.preprocess,
    ).to_pandas()
    rows = rows[ok_mask(rows["error"])].merge(df, on="path", how="inner")
    fit = rows[~rows["held"].to_numpy(dtype=bool)]
    if fit["view"].nunique() < 2:
        raise ValueError(f"--view-data needs slices of at least 2 views, got {sorted(fit['view'].unique())}")
    images = lambda r: np.stack([np.asarray(a, dtype=np.uint8) for a in r["image"]])  # noqa: E731
    net = fit_view_net(images(fit), fit["view"].tolist(), seed=cfg.seed)
    report: dict[str, Any] = {
        "model": "view net (64 px CNN, raytumor.scope.ViewNet)",
        "train_slices": int(len(fit)),
        "train_per_view": {str(k): int(v) for k, v in fit["view"].value_counts().items()},
        "held_out_slices": int((rows["held"]).sum()),
    }
    held = rows[rows["held"].to_numpy(dtype=bool)]
    if len(held):
        called = net.predict(images(held))
        truth = held["view"].to_numpy()
        report["held_out_accuracy"] = float((called == truth).mean())
        report["held_out_per_view"] = {
            v: {"n": int((truth == v).sum()), "accuracy": float((called[truth == v] == v).mean())}
            for v in net.views
            if (truth == v).any()
        }
    return net, report


def _scope_and_heads(
    cfg: TrainConfig, meta: BundleMeta, preds: pd.DataFrame, staging: Path, heads: Heads
) -> dict[str, Any]:
    """The OOD reference (train features; threshold from validation) into ``heads``, and the scope counts
    over the real training examples; sets ``meta.scope`` and returns the heads' metrics."""
    ok = ok_mask(preds["error"])
    split = preds["split"].to_numpy()
    train, val = preds[ok & (split == "train")], preds[ok & (split == "val")]
    layout = Predictor.from_bundle(staging, device="cpu").feature_layout()
    ood = fit_ood(_features(train), train["label"].to_numpy(), layout)
    val_scores = ood.score(_features(val)) if len(val) else ood.score(_features(train))
    ood.threshold = fit_threshold(val_scores, cfg.ood_quantile)
    heads.ood = ood
    # A training example's view: the manifest's, else its file's geometry (DICOM), else the view net's.
    n = len(train)
    views = np.full(n, None, dtype=object)
    for col in ("known_view", "view_header", "model_view"):
        if col in train.columns:
            v = train[col].to_numpy(dtype=object)
            fill = np.array(
                [x is None and isinstance(y, str) and bool(y) for x, y in zip(views, v, strict=True)]
            )
            views[fill] = v[fill]
    seqs = train["sequence"].tolist() if "sequence" in train.columns else None
    synthetic = (
        train["synthetic"].fillna(False).astype(bool).tolist()
        if "synthetic" in train.columns
        else [False] * n
    )
    names = [meta.classes[int(i)] for i in train["label"]]
    counts, n_syn = count_scope(names, views.tolist(), seqs, synthetic)
    scope = Scope(
        classes=list(meta.classes), counts=counts, synthetic=n_syn, min_examples=cfg.scope_min_examples,
        ood_threshold=ood.threshold, ood_quantile=cfg.ood_quantile, view_head=heads.view is not None,
    )  # fmt: skip
    meta.scope = scope.to_dict()
    # Say what the bundle will refuse, so a view net that misreads the training data shows at once.
    print(
        f"[raytumor] scope: views in scope {scope.views or 'none'} (>= {scope.min_examples} real examples of "
        "every class); real training examples per view: "
        + ("; ".join(f"{v} {dict(sorted(c.items()))}" for v, c in sorted(counts["view"].items())) or "none")
        + (f"; {n_syn} synthetic (not counted)" if n_syn else "")
    )
    metrics = {
        "ood": {
            "method": "mahalanobis per feature layer (class means, tied Ledoit-Wolf covariance; pooled final "
            "features and tapped stages' channel mean/std), max of median-scaled distances",
            "layout": layout,
            "threshold": ood.threshold,
            "quantile": cfg.ood_quantile,
            "fitted_on": {"reference": "train", "threshold": "val" if len(val) else "train"},
            "val_flagged": float((val_scores > ood.threshold).mean()) if len(val_scores) else None,
        },
    }
    return metrics


def _assess(staging: Path, rows: pd.DataFrame) -> pd.DataFrame:
    """The score rows' view/OOD/scope columns for predicted rows, by the staging bundle's Predictor (the
    same rules ``raytumor score`` applies), from the features already computed."""
    if rows.empty or "features" not in rows.columns:
        return rows.copy()
    pr = Predictor.from_bundle(staging, device="cpu")
    ok = ok_mask(rows["error"])
    feats = np.zeros((len(rows), 0), np.float32)
    if ok.any():
        f = _features(rows[ok])
        feats = np.zeros((len(rows), f.shape[1]), np.float32)
        feats[ok] = f
    ood = pr.ood_scores(feats) if feats.shape[1] else np.full(len(rows), np.nan, np.float32)
    mv = rows["model_view"].tolist() if "model_view" in rows.columns else None
    hv = rows["view_header"].tolist() if "view_header" in rows.columns else None
    mods = rows["modality"].tolist() if "modality" in rows.columns else None
    a = pr.assess(ood, mv, hv, mods, ok)
    out = rows.copy()
    for k, v in a.columns().items():
        out[k] = v
    return out


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
    # The view net needs no classifier features: trained first, it calls every split's views below.
    net, view_report = _view_net(data, cfg, meta)
    heads: Heads | None = Heads(view=net)
    if view_report:
        meta.metrics["view_head"] = view_report
    save_bundle(staging, state_dict, meta, heads=heads)
    preds = _predict_splits(staging, data, cfg)
    val = preds[preds["split"] == "val"]
    if cfg.target_sensitivity and len(val):
        _calibrate(meta, val, cfg.target_sensitivity)
    if (ok_mask(preds["error"]) & (preds["split"] == "train").to_numpy()).any():
        meta.metrics.update(_scope_and_heads(cfg, meta, preds, staging, heads))
        save_bundle(staging, state_dict, meta, heads=heads)
    elif net is None:
        heads = None
    test_preds = _assess(staging, preds[preds["split"] == "test"]).drop(columns=["features"], errors="ignore")
    prob_cols = [f"prob_{c}" for c in meta.classes]
    if len(test_preds) and meta.temperature != 1.0:
        tp = test_preds[prob_cols].to_numpy(dtype=np.float64)
        test_preds[prob_cols] = rescale_probs(tp, 1.0, meta.temperature).astype(np.float32)
    if len(test_preds) and "score" in test_preds.columns:  # score/pred at the calibrated bundle
        probs = test_preds[prob_cols].to_numpy(dtype=np.float64)
        score = tumour_score(probs, meta.classes, meta.negative_class)
        if score is not None:
            test_preds["score"] = np.asarray(score, dtype=np.float32)
            labels = predict_labels(probs, score, meta.classes, meta.negative_class, meta.threshold)
            test_preds["pred"] = np.where(np.isfinite(probs).all(1), labels, -1).astype(np.int64)
    test = measure(test_preds, meta, cfg.seed)
    meta.metrics["test"] = test
    if "in_scope" in test_preds.columns and heads is not None:
        inside = test_preds[test_preds["in_scope"].fillna(False).astype(bool)]
        meta.metrics["test_in_scope"] = {
            **measure(inside, meta, cfg.seed),
            "out_of_scope": int(len(test_preds) - len(inside)),
            "reasons": {
                str(k): int(v) for k, v in test_preds["scope_reason"].dropna().value_counts().items()
            },
        }
    # The calibrated test-split predictions: what `raytumor cv` pools into out-of-fold predictions.
    test_preds.to_parquet(bundle_dir.parent / TEST_PREDICTIONS_FILE, index=False)
    if cfg.test_data:
        save_bundle(staging, state_dict, meta, fingerprints)  # calibrated, with the duplicate filter
        ext = evaluate_source(
            staging, cfg.test_data, bundle_dir.parent / "external_test", s3_endpoint=cfg.s3_endpoint,
            seed=cfg.seed,
        )  # fmt: skip
        meta.metrics["external_test"] = {"data": cfg.test_data, **ext["metrics"], "files": ext["files"]}
    meta.created_at = ""  # stamped by save_bundle
    save_bundle(bundle_dir, state_dict, meta, fingerprints, history, heads=heads)
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
