"""Building the report dict: evaluate once, then derive every section from the same prediction rows.

The order of :func:`build_report` is the order of the page. Every number comes from :mod:`raytumor.metrics`
(through ``metrics.json``, written by :func:`raytumor.evaluate.evaluate_source` or ``evaluate_scores``, or
directly from the rows it was computed from), so the page, ``report.json`` and ``metrics.json`` agree.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

# evaluate is used as a module (evaluate.evaluate_source), so a test can stand in for the Ray-backed run.
from raytumor import calibrate, evaluate, metrics
from raytumor.bundle import HISTORY_FILE, BundleMeta, fetch_bundle, read_meta
from raytumor.report import figures
from raytumor.report.card import RESEARCH_BANNER, model_card, threshold_provenance
from raytumor.report.fmt import fmt
from raytumor.report.gallery import gallery_items, render_gallery, render_thumbnails, scope_items
from raytumor.report.render import render_html
from raytumor.results import read_scores
from raytumor.scan import ok_mask
from raytumor.storage import StorageOptions

REPORT_FILE = "report.html"
REPORT_JSON = "report.json"
N_BINS = 15


def build_report(
    bundle_dir: str | os.PathLike,
    data: str | Sequence[str],
    out_dir: str | os.PathLike,
    *,
    target_sensitivity: float = 0.95,
    n_boot: int = 1000,
    gallery: int = 6,
    seed: int = 0,
    s3_endpoint: str | None = None,
    exclude_duplicates: bool = True,
    source_pattern: str | None = None,
    scores: str | None = None,
    localisation: bool = True,
    localisation_tolerance: float = 0.01,
) -> dict[str, Any]:
    """Evaluate ``bundle_dir`` on ``data`` (one or more sources) and write report.html, report.json,
    metrics.json and PNGs.

    Needs Ray (``evaluate_source`` predicts with Ray Data), unless ``scores`` names a finished
    ``raytumor score`` output of the same files: then its rows are the predictions (``evaluate_scores``:
    volume rows judged by their volume score, test-time adaptation as scored) and ``by_kind`` holds the
    slice and volume metrics apart. Returns the report dict (as ``report.json``) with an ``outputs`` entry
    listing the files written. ``by_source`` holds metrics.json's per-source metrics when
    :func:`show_by_source` says they add something (else None). ``scope`` (in and out of scope, by view and
    sequence, thumbnails of refused inputs) and ``localisation`` (the Grad-CAM pointing game on a manifest
    with masks) are metrics.json's, plus the thumbnails.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    storage = StorageOptions.from_env(s3_endpoint)
    local_bundle = fetch_bundle(bundle_dir, storage)
    meta = read_meta(local_bundle)
    exclude_duplicates = exclude_duplicates and not scores  # a score output is taken as it is
    common = dict(n_boot=n_boot, seed=seed, s3_endpoint=s3_endpoint, source_pattern=source_pattern,
                  localisation=localisation, localisation_tolerance=localisation_tolerance)  # fmt: skip
    if scores:
        res = evaluate.evaluate_scores(bundle_dir, data, scores, out, threshold=None, **common)
    else:
        res = evaluate.evaluate_source(
            bundle_dir, data, out, threshold=None, exclude_duplicates=exclude_duplicates, **common
        )
    m = res["metrics"]
    thr = float(m.get("threshold", meta.threshold))
    preds = pd.read_parquet(out / "predictions.parquet")
    rows = Rows.load(preds, meta, thr)
    settings = {
        "target_sensitivity": float(target_sensitivity),
        "n_boot": int(n_boot),
        "seed": int(seed),
        "gallery": int(gallery),
        "exclude_duplicates": bool(exclude_duplicates),
        "source_pattern": res.get("source_pattern"),
        "localisation": bool(localisation),
        "localisation_tolerance": float(localisation_tolerance),
    }
    figs: dict[str, bytes] = {}
    rep = _summary(bundle_dir, meta, res, settings, scores)
    rep["score_output"] = _score_output(scores, res, storage) if scores else None
    rep["curves"] = _discrimination(rows, m, thr, figs) if rows.binary else None
    rep["scope"] = _scope(res, preds, meta, gallery, bundle_dir, storage, figs)
    rep["by_view"], rep["by_sequence"] = res.get("by_view"), res.get("by_sequence")  # all rows
    rep["localisation"] = res.get("localisation")
    rep.update(_per_class(rows, m, thr, figs))
    rep["calibration"] = _calibration(rows, meta, figs)
    prov = threshold_provenance(meta)
    rep["threshold_analysis"] = (
        _threshold_analysis(rows, thr, target_sensitivity, prov, figs) if rows.binary else None
    )
    rep["training"] = _training(local_bundle, meta, figs)
    rep["splits"] = _splits(meta)
    rep["gallery"] = _gallery(rows, thr, gallery, bundle_dir, storage, figs) if rows.binary else None
    rep["model_card"] = model_card(meta, rep["splits"])
    return _write(rep, figs, out)


# ----------------------------------------------------------------------------------------------------------
# The evaluated rows


@dataclass
class Rows:
    """The prediction rows the metrics were computed from (``predictions.parquet``) that hold a prediction.

    Rows without finite probabilities (a score output's error rows, files that failed at prediction) are
    left out, as :func:`raytumor.metrics.metrics_with_ci` leaves them out of ``metrics.json``: every count
    and table on the page is over the same rows, so per-class counts add up to ``n``.
    """

    paths: np.ndarray
    labels: np.ndarray
    probs: np.ndarray  # float32, the dtype evaluation computed the metrics with
    is_image: np.ndarray  # single images: volume rows have no one picture for the Grad-CAM gallery
    y: np.ndarray | None  # tumour (1) vs none (0), None when the classes define no tumour score
    s: np.ndarray | None  # tumour score
    pred: np.ndarray  # class index by the predictor's rule at the evaluation threshold
    classes: list[str]
    negative_class: str | None
    failed: int

    @classmethod
    def load(cls, preds: pd.DataFrame, meta: BundleMeta, thr: float) -> Rows:
        classes = list(meta.classes)
        probs = preds[[f"prob_{c}" for c in classes]].to_numpy(dtype=np.float32)
        ok = np.isfinite(probs).all(1)
        kept, probs = preds[ok], probs[ok]
        labels = kept["label"].to_numpy().astype(np.int64)
        is_image = (
            kept["kind"].astype(str).eq("image").to_numpy()
            if "kind" in kept.columns
            else np.ones(len(kept), bool)
        )
        y, s = metrics.tumour_binary(labels, probs, classes, meta.negative_class)
        score = s if s is not None else np.full(len(labels), np.nan)
        pred = metrics.predict_labels(probs, score, classes, meta.negative_class, thr)
        paths = kept["path"].astype(str).to_numpy()
        return cls(paths, labels, probs, is_image, y, s, pred, classes, meta.negative_class, int((~ok).sum()))

    @property
    def binary(self) -> bool:
        return self.y is not None and len(self.y) > 0


# ----------------------------------------------------------------------------------------------------------
# Sections, in the order of the page


def show_by_source(data: str | Sequence[str], by_source: dict[str, Any] | None) -> bool:
    """A by-source breakdown says something new when there are several data arguments or the keys came
    from a manifest's ``source`` column (or ``--source-pattern``); one folder's single key would only
    repeat the pooled numbers."""
    datas = [data] if isinstance(data, str) else list(data)
    return bool(by_source) and (len(datas) > 1 or set(by_source) != set(datas))


def _summary(
    bundle_dir: Any, meta: BundleMeta, res: dict[str, Any], settings: dict[str, Any], scores: str | None
) -> dict[str, Any]:
    m = res["metrics"]
    return {
        "generated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "banner": RESEARCH_BANNER,
        "bundle": {
            "path": str(bundle_dir),
            "bundle_id": meta.bundle_id,
            "backbone": meta.backbone,
            "classes": list(meta.classes),
            "negative_class": meta.negative_class,
            "image_size": meta.image_size,
            "channels": meta.channels,
            "geometry": meta.geometry,
            "threshold": float(meta.threshold),
            "threshold_fitted": threshold_provenance(meta)["fitted"],
            "temperature": float(meta.temperature),
            "created_at": meta.created_at,
        },
        "data": res["data"],
        "settings": settings,
        "files": res["files"],
        "rejected_files": res.get("rejected_files", []),
        "excluded_files": res.get("excluded_files", []),
        "scores": scores,
        "adaptation": res.get("adaptation"),
        "metrics": m,
        "n": int(m.get("n", 0)),
        "by_source": res["by_source"] if show_by_source(res["data"], res.get("by_source")) else None,
        "by_kind": res.get("by_kind") or None,
    }


def _score_output(scores: str, res: dict[str, Any], storage: StorageOptions) -> dict[str, Any]:
    """Error rows of a score output: all of them, and those of the labelled (evaluated) files.

    ``files.score_errors`` only counts labelled files; a file that failed to decode is often one the labels
    do not name (junk next to the scans), so the output's own count is read too.
    """
    f = res["files"]
    errors = read_scores(scores, storage, columns=["error"])
    return {
        "path": scores,
        "error_rows": int((~ok_mask(errors["error"])).sum()) if "error" in errors.columns else 0,
        "error_rows_labelled": int(f.get("score_errors", 0)),
        "rows_of_unlisted_files": int(f.get("scored_rows_ignored", 0)),
    }


def _discrimination(rows: Rows, m: dict[str, Any], thr: float, figs: dict[str, bytes]) -> dict[str, Any]:
    """ROC and PR curves with the operating point. AUC, AP and their 95% CIs are metrics.json's: the
    bootstrap there resamples duplicate groups and patients, not single scans."""
    y, s = rows.y, rows.s
    ci = m.get("ci95", {})
    op = metrics.operating_point(y, s, thr)
    ap = m["average_precision"] if "average_precision" in m else metrics.average_precision(y, s)
    curves = {
        "roc_auc": m.get("roc_auc"),
        "roc_auc_ci95": ci.get("roc_auc", [None, None]),
        "average_precision": ap,
        "average_precision_ci95": ci.get("average_precision", [None, None]),
        "ci95_resampling": m.get("ci95_resampling"),
        "prevalence": float(y.mean()),
        "operating_point": {k: op[k] for k in ("threshold", "sensitivity", "specificity", "ppv", "npv")},
    }
    if 0 < y.sum() < len(y):  # a curve needs both classes
        figs["roc.png"] = figures.roc(metrics.roc_curve(y, s), curves["roc_auc"], curves["roc_auc_ci95"], op)
        figs["pr.png"] = figures.pr(
            metrics.pr_curve(y, s), ap, curves["average_precision_ci95"], curves["prevalence"], op
        )
    return curves


def _per_class(rows: Rows, m: dict[str, Any], thr: float, figs: dict[str, bytes]) -> dict[str, Any]:
    if "confusion_matrix" in m:
        title = f"Tumour vs no tumour at threshold {fmt(thr)}"
        figs["confusion.png"] = figures.confusion(m["confusion_matrix"], ["no tumour", "tumour"], title)
    if "mc_confusion_matrix" in m:
        title = "All classes (arg-max prediction)"
        figs["confusion_multiclass.png"] = figures.confusion(m["mc_confusion_matrix"], rows.classes, title)
    return {
        "per_class": metrics.per_class_table(rows.labels, rows.pred, rows.classes),
        "evaluated_per_class": {c: int((rows.labels == i).sum()) for i, c in enumerate(rows.classes)},
        "per_class_rule": (
            f"tumour score \u2265 {fmt(thr)}" if len(rows.classes) == 2 else "arg-max class probability"
        ),
    }


def _calibration(rows: Rows, meta: BundleMeta, figs: dict[str, bytes]) -> dict[str, Any]:
    """Reliability before/after the bundle's temperature. Predictions were made at that temperature; T = 1
    is recovered from them (:func:`raytumor.calibrate.rescale_probs`)."""
    t = float(meta.temperature)
    p_after = rows.probs.astype(np.float64)
    p_before = calibrate.rescale_probs(p_after, t, 1.0) if t != 1.0 else p_after
    lab = rows.labels
    bins_b = calibrate.reliability_bins(p_before.max(1), p_before.argmax(1) == lab, N_BINS)
    bins_a = calibrate.reliability_bins(p_after.max(1), p_after.argmax(1) == lab, N_BINS)
    cal: dict[str, Any] = {
        "temperature": t,
        "calibrated": t != 1.0,
        "n_bins": N_BINS,
        "ece_before": calibrate.expected_calibration_error(p_before, lab, N_BINS),
        "ece_after": calibrate.expected_calibration_error(p_after, lab, N_BINS),
        "temperature_fitted_on_this_data": calibrate.fit_temperature(p_after, lab, t),
        "bins_before": bins_b,
        "bins_after": bins_a,
    }
    if rows.binary:
        yb, sb_before = metrics.tumour_binary(lab, p_before, rows.classes, rows.negative_class)
        cal["binary_ece_before"] = calibrate.binary_ece(sb_before, yb, N_BINS)
        cal["binary_ece_after"] = calibrate.binary_ece(rows.s, rows.y, N_BINS)
    if len(lab):
        figs["reliability.png"] = figures.reliability(bins_b, bins_a, t, cal["ece_before"], cal["ece_after"])
    return cal


def _threshold_analysis(
    rows: Rows, thr: float, target_sensitivity: float, prov: dict[str, Any], figs: dict[str, bytes]
) -> dict[str, Any]:
    """The bundle's threshold against the one that reaches ``target_sensitivity`` on this data."""
    y, s = rows.y, rows.s
    target = calibrate.threshold_for_sensitivity(y, s, target_sensitivity)
    at_bundle = metrics.operating_point(y, s, thr)
    at_target = metrics.operating_point(y, s, target["threshold"])
    both = at_bundle["specificity"] is not None and at_target["specificity"] is not None
    figs["thresholds.png"] = figures.thresholds(y, s, thr, prov["label"], target)
    return {
        "target_sensitivity": float(target_sensitivity),
        "search": target,
        "at_bundle_threshold": at_bundle,
        "at_target_threshold": at_target,
        "specificity_cost": at_bundle["specificity"] - at_target["specificity"] if both else None,
        "bundle_threshold_fitted": prov["fitted"],
        "bundle_threshold_source": prov["source"],
    }


def _training(bundle: Path, meta: BundleMeta, figs: dict[str, bytes]) -> dict[str, Any] | None:
    """Per-epoch curves from the bundle's history.csv (None without one)."""
    f = Path(bundle) / HISTORY_FILE
    if not f.is_file():
        return None
    try:
        hist = pd.read_csv(f)
    except (pd.errors.EmptyDataError, pd.errors.ParserError):
        return None
    if not len(hist):
        return None
    best_epoch = meta.metrics.get("best_epoch")
    show = [c for c in ("epoch", *figures.LOSS_COLS, *figures.METRIC_COLS) if c in hist.columns]
    figs["training.png"] = figures.training(hist, best_epoch)
    return {
        "columns": list(hist.columns),
        "epochs": int(len(hist)),
        "best_epoch": best_epoch,
        "shown_columns": show,
        "rows": hist[show].to_dict(orient="records"),
    }


def _splits(meta: BundleMeta) -> dict[str, Any]:
    keys = ("source", "split_counts", "duplicate_groups", "split_manifest_sha256")
    return {k: meta.data.get(k) for k in keys}


def _gallery(
    rows: Rows, thr: float, k: int, bundle_dir: Any, storage: StorageOptions, figs: dict[str, bytes]
) -> dict[str, list[dict[str, Any]]]:
    score = np.where(rows.is_image, rows.s, np.nan)  # volume rows have no single picture to explain
    gal = gallery_items(rows.paths, rows.labels, rows.pred, rows.y, score, thr, k)
    figs.update(render_gallery(bundle_dir, gal, storage))
    return gal


def _scope(
    res: dict[str, Any],
    preds: pd.DataFrame,
    meta: BundleMeta,
    k: int,
    bundle_dir: Any,
    storage: StorageOptions,
    figs: dict[str, bytes],
) -> dict[str, Any] | None:
    """metrics.json's scope (counts and reasons, the in-scope rows' metrics and breakdowns) and thumbnails
    of up to ``k`` refused inputs (one per reason in turn). None when the evaluation has no scope record at
    all (a metrics.json written before bundles knew their scope)."""
    sc = res.get("scope")
    if sc is None:
        return None
    oos = evaluate.out_of_scope_rows(preds, list(meta.classes))
    sel = preds[oos]
    reasons = sel["scope_reason"].tolist() if "scope_reason" in sel.columns else [None] * len(sel)
    views = sel["view"].tolist() if "view" in sel.columns else [None] * len(sel)
    scores = sel["score"].tolist() if "score" in sel.columns else [None] * len(sel)
    items = scope_items(sel["path"].astype(str).tolist(), reasons, views, scores, k)
    figs.update(render_thumbnails(bundle_dir, items, storage))
    return {**sc, "thumbnails": items}


# ----------------------------------------------------------------------------------------------------------
# Output


def _clean(o: Any) -> Any:
    """JSON-safe copy: numpy scalars/arrays to Python, NaN/inf to None."""
    if isinstance(o, dict):
        return {str(k): _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    if isinstance(o, np.ndarray):
        return [_clean(v) for v in o.tolist()]
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, (np.floating, float)):
        f = float(o)
        return f if math.isfinite(f) else None
    if isinstance(o, np.bool_):
        return bool(o)
    return o


def _write(rep: dict[str, Any], figs: dict[str, bytes], out: Path) -> dict[str, Any]:
    """PNGs, report.html and report.json (the page is rendered from the JSON-clean dict it sits beside)."""
    for name, png in figs.items():
        (out / name).write_bytes(png)
    rep["figures"] = sorted(figs)
    rep = _clean(rep)
    (out / REPORT_FILE).write_text(render_html(rep, figs), encoding="utf-8")
    (out / REPORT_JSON).write_text(json.dumps(rep, indent=2, default=str) + "\n")
    rep["outputs"] = {
        "html": str(out / REPORT_FILE),
        "report_json": str(out / REPORT_JSON),
        "metrics_json": str(out / "metrics.json"),
        "predictions": str(out / "predictions.parquet"),
        "figures": [str(out / n) for n in sorted(figs)],
    }
    return rep
