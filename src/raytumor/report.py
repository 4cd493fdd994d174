"""``raytumor report``: a self-contained HTML evaluation report of a model bundle on labelled data.

Everything is computed once into one dict (``report.json``); the HTML page and the figures are rendered
from that dict, so the page, ``report.json`` and ``metrics.json`` (written by :func:`evaluate_source`) show
the same numbers. The page embeds its figures as base64 ``data:`` URIs and references no external resource,
so it can be mailed or archived as a single file; the figures are also written next to it as PNG files.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import math
import os
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pandas as pd

REPORT_FILE = "report.html"
REPORT_JSON = "report.json"
N_BINS = 15
RESEARCH_BANNER = "Research use only \u2014 not a medical device. Not for diagnosis or treatment decisions."
KNOWN_LIMITS = [
    "Source confounds: public tumour and no-tumour images often come from different scanners, hospitals "
    "or preprocessing pipelines; a model can learn the scanner, hospital or export format instead of the "
    "tumour, and then fail on data from a new site.",
    "Slice-level 2-D images, not volumes: one slice per case, chosen by whoever assembled the set; a "
    "clinical study is a 3-D series, and a slice without tumour can come from a patient with one.",
    "Duplicates in public sets: the same slice appears several times (exact copies, resized or re-exported "
    "versions), inflating apparent performance when copies land in both training and test data. Files "
    "matching the bundle's training/validation fingerprints are excluded unless --keep-duplicates is given.",
    "Small evaluation sets give wide confidence intervals; the 95% bootstrap intervals on this page "
    "resample patients where the data names them (patient_id) and scans otherwise, treating those as "
    "independent, which near-duplicates that escaped detection make optimistic.",
    "Anatomy coverage: healthy slices at levels the training negatives never showed (skull base, posterior "
    "fossa) are often called tumour. Adding a few healthy scans of the site at every level to training "
    "(raytumor slices) is what removed this on another hospital's data; appearance fixes did not.",
    "Labels are folder names from the data source, not verified against pathology.",
]
INTENDED_USE = (
    "Research on machine-learning methods for brain-MRI tumour classification (slice level). Not a "
    "diagnostic device: not cleared or approved by any regulator, not validated prospectively, and not to "
    "be used for diagnosis, triage or treatment decisions."
)


# ----------------------------------------------------------------------------------------------------------
# Curves and statistics (numpy; scikit-learn-free)


def _cum_counts(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """True/false positives at each distinct score taken as threshold (``score >= t``), highest first."""
    order = np.argsort(-s, kind="stable")
    ys, ss = y[order], s[order]
    last = np.r_[np.flatnonzero(np.diff(ss)), len(ss) - 1]  # last index of each run of tied scores
    tp = np.cumsum(ys)[last].astype(float)
    fp = (last + 1) - tp
    return tp, fp, ss[last]


def roc_curve(y: np.ndarray, s: np.ndarray) -> dict[str, np.ndarray]:
    tp, fp, thr = _cum_counts(y, s)
    p, n = max(1, int(y.sum())), max(1, int((y == 0).sum()))
    return {"fpr": np.r_[0.0, fp / n], "tpr": np.r_[0.0, tp / p], "thresholds": np.r_[np.inf, thr]}


def pr_curve(y: np.ndarray, s: np.ndarray) -> dict[str, np.ndarray]:
    tp, fp, thr = _cum_counts(y, s)
    p = max(1, int(y.sum()))
    return {"precision": tp / (tp + fp), "recall": tp / p, "thresholds": thr}


def average_precision(y: np.ndarray, s: np.ndarray) -> float | None:
    """Step-wise AP (sum of precision x recall increments), as scikit-learn's ``average_precision_score``."""
    if y.sum() == 0:
        return None
    c = pr_curve(y, s)
    recall = np.r_[0.0, c["recall"]]
    return float(np.sum(np.diff(recall) * c["precision"]))


def bootstrap_ap(y: np.ndarray, s: np.ndarray, n_boot: int, seed: int) -> list[float | None]:
    """95% percentile interval for AP with the same resampling stream as ``evaluate.bootstrap_ci``."""
    rng = np.random.default_rng(seed)
    vals = []
    for start in range(0, n_boot, 200):
        idx = rng.integers(0, len(y), size=(min(200, n_boot - start), len(y)))
        for row in idx:
            v = average_precision(y[row], s[row])
            if v is not None:
                vals.append(v)
    if not vals:
        return [None, None]
    return [float(np.quantile(vals, 0.025)), float(np.quantile(vals, 0.975))]


def _rates(y: np.ndarray, s: np.ndarray, thr: float) -> dict[str, float | None]:
    pred = s >= thr
    tp, fp = int((pred & (y == 1)).sum()), int((pred & (y == 0)).sum())
    fn, tn = int((~pred & (y == 1)).sum()), int((~pred & (y == 0)).sum())
    return {
        "threshold": float(thr),
        "sensitivity": _div(tp, tp + fn),
        "specificity": _div(tn, tn + fp),
        "ppv": _div(tp, tp + fp),
        "npv": _div(tn, tn + fn),
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "tn": tn,
    }


def _div(a: float, b: float) -> float | None:
    return float(a / b) if b else None


def per_class_table(labels: np.ndarray, pred: np.ndarray, classes: list[str]) -> list[dict[str, Any]]:
    """One-vs-rest sensitivity (recall), specificity, PPV, NPV and F1 per class."""
    rows = []
    for i, c in enumerate(classes):
        t, p = labels == i, pred == i
        tp, fp = int((t & p).sum()), int((~t & p).sum())
        fn, tn = int((t & ~p).sum()), int((~t & ~p).sum())
        rows.append(
            {
                "class": c,
                "n": int(t.sum()),
                "tp": tp,
                "fp": fp,
                "fn": fn,
                "tn": tn,
                "sensitivity": _div(tp, tp + fn),
                "specificity": _div(tn, tn + fp),
                "ppv": _div(tp, tp + fp),
                "npv": _div(tn, tn + fn),
                "f1": _div(2 * tp, 2 * tp + fp + fn),
            }
        )
    return rows


# ----------------------------------------------------------------------------------------------------------
# Figures (matplotlib, Agg)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    plt = _plt()
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    finally:
        plt.close(fig)
    return buf.getvalue()


def _fig_roc(roc: dict, auc: float | None, ci: list, op: dict) -> bytes:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.0, 4.4))
    ax.plot([0, 1], [0, 1], ls=":", c="0.6", lw=1)
    label = f"ROC (AUC {_fmt(auc)} {_ci(ci)})"
    ax.plot(roc["fpr"], roc["tpr"], drawstyle="default", c="#1f5fa8", lw=2, label=label)
    if op.get("sensitivity") is not None and op.get("specificity") is not None:
        ax.plot(
            1 - op["specificity"],
            op["sensitivity"],
            "o",
            ms=9,
            c="#d62728",
            label=f"operating point (threshold {_fmt(op['threshold'])})",
        )
    ax.set(xlabel="1 \u2212 specificity (false-positive rate)", ylabel="sensitivity (true-positive rate)")
    ax.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.01), title="ROC curve: tumour vs no tumour")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return _png(fig)


def _fig_pr(pr: dict, ap: float | None, ci: list, prevalence: float, op: dict) -> bytes:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.0, 4.4))
    ax.axhline(prevalence, ls=":", c="0.6", lw=1, label=f"prevalence {_fmt(prevalence)}")
    ax.step(
        np.r_[0.0, pr["recall"]],
        np.r_[pr["precision"][0] if len(pr["precision"]) else 1.0, pr["precision"]],
        where="pre",
        c="#1f5fa8",
        lw=2,
        label=f"PR (AP {_fmt(ap)} {_ci(ci)})",
    )
    if op.get("sensitivity") is not None and op.get("ppv") is not None:
        ax.plot(
            op["sensitivity"],
            op["ppv"],
            "o",
            ms=9,
            c="#d62728",
            label=f"operating point (threshold {_fmt(op['threshold'])})",
        )
    ax.set(xlabel="recall (sensitivity)", ylabel="precision (PPV)", xlim=(-0.01, 1.01), ylim=(-0.01, 1.02))
    ax.set_title("Precision\u2013recall curve")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    return _png(fig)


def _fig_confusion(cm: list[list[int]], names: list[str], title: str) -> bytes:
    plt = _plt()
    a = np.asarray(cm)
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(names), 1.2 + 1.2 * len(names)))
    ax.imshow(a, cmap="Blues")
    vmax = a.max() if a.size else 0
    for (i, j), v in np.ndenumerate(a):
        ax.text(j, i, str(v), ha="center", va="center", fontsize=14, c="white" if v > vmax / 2 else "black")
    ax.set_xticks(range(len(names)), [f"pred {n}" for n in names])
    ax.set_yticks(range(len(names)), [f"true {n}" for n in names])
    ax.set_title(title, fontsize=10)
    return _png(fig)


def _fig_reliability(before: dict, after: dict, t: float, ece_b: float, ece_a: float) -> bytes:
    plt = _plt()
    fig, (ax, axh) = plt.subplots(
        2, 1, figsize=(5.0, 5.2), sharex=True, gridspec_kw={"height_ratios": [3, 1]}
    )
    ax.plot([0, 1], [0, 1], ls=":", c="0.6", lw=1, label="perfect calibration")
    ax.plot(before["confidence"], before["accuracy"], "s--", c="#ff7f0e", label=f"T = 1 (ECE {_fmt(ece_b)})")
    if t != 1.0:
        ax.plot(
            after["confidence"], after["accuracy"], "o-", c="#1f5fa8", label=f"T = {t:g} (ECE {_fmt(ece_a)})"
        )
    ax.set(ylabel="accuracy", ylim=(-0.02, 1.02), title="Reliability (top-label confidence)")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    edges = np.asarray(after["edges"])
    axh.bar(edges[:-1], after["count"], width=np.diff(edges), align="edge", color="#1f5fa8", alpha=0.6)
    axh.set(xlabel="confidence", ylabel="scans", xlim=(0, 1))
    return _png(fig)


def _fig_thresholds(y: np.ndarray, s: np.ndarray, bundle_thr: float, target: dict) -> bytes:
    plt = _plt()
    grid = np.unique(np.r_[np.linspace(0, 1, 201), s[np.isfinite(s)]])
    pos, neg = s[y == 1], s[y == 0]
    sens = [(pos >= t).mean() if len(pos) else np.nan for t in grid]
    spec = [(neg < t).mean() if len(neg) else np.nan for t in grid]
    fig, ax = plt.subplots(figsize=(7.0, 4.0))
    ax.plot(grid, sens, c="#d62728", lw=2, label="sensitivity")
    ax.plot(grid, spec, c="#1f5fa8", lw=2, label="specificity")
    ax.axhline(target["target"], ls=":", c="#d62728", lw=1)
    ax.axvline(bundle_thr, c="k", ls="--", lw=1.5, label=f"bundle threshold {_fmt(bundle_thr)} (validation)")
    if target.get("threshold") is not None and target.get("sensitivity") is not None:
        ax.axvline(
            target["threshold"],
            c="#2ca02c",
            lw=1.5,
            label=f"sensitivity \u2265 {target['target']:g} on this data: {_fmt(target['threshold'])}",
        )
    ax.set(xlabel="threshold on tumour score", ylabel="rate", xlim=(0, 1), ylim=(-0.02, 1.02))
    ax.set_title("Sensitivity and specificity vs threshold")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, fontsize=8, frameon=False)
    return _png(fig)


LOSS_COLS = ("train_loss", "val_loss")
METRIC_COLS = (
    "val_roc_auc",
    "val_accuracy",
    "val_sensitivity",
    "val_specificity",
    "val_f1",
    "val_mc_accuracy",
    "val_mc_balanced_accuracy",
    "val_mc_f1_macro",
)


def _fig_training(hist: pd.DataFrame, best_epoch: Any) -> bytes:
    plt = _plt()
    x = hist["epoch"] if "epoch" in hist.columns else pd.Series(range(len(hist)))
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10.0, 3.8))
    for c in LOSS_COLS:
        if c in hist.columns:
            a1.plot(x, hist[c], "o-", ms=3, label=c)
    for c in METRIC_COLS:
        if c in hist.columns and hist[c].notna().any():
            a2.plot(x, hist[c], "o-", ms=3, label=c)
    for ax, title in ((a1, "loss"), (a2, "validation metrics")):
        if best_epoch is not None:
            ax.axvline(best_epoch, c="0.4", ls="--", lw=1, label=f"best epoch {best_epoch}")
        ax.set(xlabel="epoch", title=title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _png(fig)


# ----------------------------------------------------------------------------------------------------------
# Grad-CAM gallery


def _gallery_items(
    paths: np.ndarray, labels: np.ndarray, pred: np.ndarray, y: np.ndarray, s: np.ndarray, thr: float, k: int
) -> dict[str, list[dict[str, Any]]]:
    """The ``k`` most confident false negatives (lowest score) and false positives (highest score)."""
    out: dict[str, list[dict[str, Any]]] = {}
    ok = np.isfinite(s)
    for kind, mask, conf in (
        ("false_negatives", ok & (y == 1) & (s < thr), 1.0 - s),
        ("false_positives", ok & (y == 0) & (s >= thr), s),
    ):
        rows = np.flatnonzero(mask)
        rows = rows[np.argsort(-conf[rows], kind="stable")][: max(0, k)]
        out[kind] = [
            {
                "path": str(paths[r]),
                "basename": os.path.basename(str(paths[r])),
                "label": int(labels[r]),
                "pred": int(pred[r]),
                "score": float(s[r]),
                "confidence": float(conf[r]),
            }
            for r in rows
        ]
    return out


def _render_gallery(
    bundle_dir: Any, meta: Any, gallery: dict[str, list[dict]], storage: Any
) -> dict[str, bytes]:
    """Grad-CAM overlays (PNG bytes) keyed by file name; sets ``png`` on each item."""
    from raytumor.bundle import load_bundle
    from raytumor.explain import GradCAM, overlay_png
    from raytumor.formats import decode_image
    from raytumor.ingest import read_bytes
    from raytumor.preprocess import to_model_input

    items = [(kind, i, it) for kind in gallery for i, it in enumerate(gallery[kind])]
    if not items:
        return {}
    loaded = load_bundle(bundle_dir, device="cpu")
    cam = GradCAM(loaded.model)
    neg = meta.classes.index(meta.negative_class) if meta.negative_class is not None else None
    pngs: dict[str, bytes] = {}
    for kind, i, it in items:
        try:
            pixels = decode_image(read_bytes(it["path"], storage), draft_size=meta.image_size).pixels
        except Exception as e:  # the file vanished or changed since evaluation: say so, keep going
            it["error"] = f"{type(e).__name__}: {e}"[:200]
            continue
        img = to_model_input(pixels, meta.image_size, meta.preprocess)
        # Tumour class: the true class of a missed tumour, the predicted (or only) tumour class otherwise.
        if neg is None:
            target = 1
        elif kind == "false_negatives":
            target = it["label"]
        else:
            target = it["pred"] if it["pred"] != neg else (1 - neg if meta.num_classes == 2 else it["pred"])
        heat = cam(img[None], [int(target)])[0]
        caption = (
            f"{it['basename']}  true {meta.classes[it['label']]} / pred {meta.classes[it['pred']]}  "
            f"score {it['score']:.3f}"
        )
        name = f"gallery_{'fn' if kind == 'false_negatives' else 'fp'}_{i + 1:02d}.png"
        pngs[name] = overlay_png(img, heat, caption=caption)
        it.update(png=name, cam_target=meta.classes[int(target)])
    return pngs


# ----------------------------------------------------------------------------------------------------------
# Building the report dict


def _history(bundle_dir: Path) -> pd.DataFrame | None:
    from raytumor.bundle import HISTORY_FILE

    f = Path(bundle_dir) / HISTORY_FILE
    if not f.is_file():
        return None
    try:
        h = pd.read_csv(f)
    except (pd.errors.EmptyDataError, pd.errors.ParserError):
        return None
    return h if len(h) else None


def _clean(o: Any) -> Any:
    """JSON-safe copy: numpy scalars/arrays to Python, NaN/inf to None."""
    if isinstance(o, dict):
        return {str(k): _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    if isinstance(o, np.ndarray):
        return [_clean(v) for v in o.tolist()]
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating, float)):
        f = float(o)
        return f if math.isfinite(f) else None
    if isinstance(o, np.bool_):
        return bool(o)
    return o


def show_by_source(data: str | Sequence[str], by_source: dict[str, Any] | None) -> bool:
    """A by-source breakdown says something new when there are several data arguments or the keys came
    from a manifest's ``source`` column (or ``--source-pattern``); one folder's single key would only
    repeat the pooled numbers."""
    datas = [data] if isinstance(data, str) else list(data)
    return bool(by_source) and (len(datas) > 1 or set(by_source) != set(datas))


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
) -> dict[str, Any]:
    """Evaluate ``bundle_dir`` on ``data`` (one or more sources) and write report.html, report.json,
    metrics.json and PNGs.

    Needs Ray (``evaluate_source`` predicts with Ray Data), unless ``scores`` names a finished
    ``raytumor score`` output of the same files: then its rows are the predictions (``evaluate_scores``:
    volume rows judged by their volume score, test-time adaptation as scored) and ``by_kind`` holds the
    slice and volume metrics apart. Returns the report dict (as ``report.json``) with an ``outputs`` entry
    listing the files written. ``by_source`` holds metrics.json's per-source metrics when
    :func:`show_by_source` says they add something (else None).
    """
    from raytumor import calibrate
    from raytumor.bundle import read_meta
    from raytumor.evaluate import evaluate_scores, evaluate_source, tumour_binary
    from raytumor.ingest import StorageOptions
    from raytumor.predict import predict_labels

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = read_meta(bundle_dir)
    common = dict(
        threshold=None, n_boot=n_boot, seed=seed, s3_endpoint=s3_endpoint, source_pattern=source_pattern
    )
    if scores:
        res = evaluate_scores(bundle_dir, data, scores, out, **common)
        exclude_duplicates = False  # a score output is taken as it is (volumes have no fingerprint)
    else:
        res = evaluate_source(bundle_dir, data, out, exclude_duplicates=exclude_duplicates, **common)
    metrics = res["metrics"]
    preds = pd.read_parquet(out / "predictions.parquet")  # the rows metrics.json was computed from
    classes = list(meta.classes)
    thr = float(metrics.get("threshold", meta.threshold))
    # Same dtype path as evaluate_source: float32 probabilities, tumour score from tumour_binary.
    probs = preds[[f"prob_{c}" for c in classes]].to_numpy(dtype=np.float32)
    labels = preds["label"].to_numpy().astype(np.int64)
    paths = preds["path"].astype(str).to_numpy()
    # Grad-CAM overlays are of single images: a volume row (or an error row) has no picture to explain.
    is_image = (
        preds["kind"].astype(str).eq("image").to_numpy()
        if "kind" in preds.columns
        else np.ones(len(preds), bool)
    )
    y, s = tumour_binary(labels, probs, classes, meta.negative_class)
    score_for_pred = s if s is not None else np.full(len(labels), np.nan)
    # The predictor's labelling rule at the threshold metrics.json used.
    meta_thr = SimpleNamespace(
        num_classes=len(classes), classes=classes, negative_class=meta.negative_class, threshold=thr
    )
    pred = predict_labels(probs, score_for_pred, meta_thr) if len(labels) else np.zeros(0, np.int64)

    figures: dict[str, bytes] = {}
    rep: dict[str, Any] = {
        "generated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "banner": RESEARCH_BANNER,
        "bundle": {
            "path": str(bundle_dir),
            "bundle_id": meta.bundle_id,
            "backbone": meta.backbone,
            "classes": classes,
            "negative_class": meta.negative_class,
            "image_size": meta.image_size,
            "channels": meta.channels,
            "geometry": meta.geometry,
            "threshold": float(meta.threshold),
            "temperature": float(meta.temperature),
            "created_at": meta.created_at,
        },
        "data": res["data"],
        "settings": {
            "target_sensitivity": float(target_sensitivity),
            "n_boot": int(n_boot),
            "seed": int(seed),
            "gallery": int(gallery),
            "exclude_duplicates": bool(exclude_duplicates),
            "source_pattern": res.get("source_pattern"),
        },
        "files": res["files"],
        "rejected_files": res.get("rejected_files", []),
        "excluded_files": res.get("excluded_files", []),
        "scores": scores,
        "adaptation": res.get("adaptation"),
        "metrics": metrics,
        "n": int(metrics.get("n", len(labels))),
        "by_source": res["by_source"] if show_by_source(res["data"], res.get("by_source")) else None,
        "by_kind": res.get("by_kind") or None,
    }
    binary = y is not None and len(y) > 0
    ci = metrics.get("ci95", {})
    if binary:
        op = _rates(y, s, thr)
        fin = np.isfinite(s)  # a file that failed at prediction time has no score: no place on a curve
        roc, pr = roc_curve(y[fin], s[fin]), pr_curve(y[fin], s[fin])
        ap = average_precision(y[fin], s[fin])
        ap_ci = ci.get("average_precision") or bootstrap_ap(y[fin], s[fin], n_boot, seed)
        both = 0 < y.sum() < len(y)
        rep["curves"] = {
            "roc_auc": metrics.get("roc_auc"),
            "roc_auc_ci95": ci.get("roc_auc", [None, None]),
            "average_precision": ap,
            "average_precision_ci95": ap_ci,
            "prevalence": float(y.mean()),
            "operating_point": {k: op[k] for k in ("threshold", "sensitivity", "specificity", "ppv", "npv")},
        }
        if both:
            figures["roc.png"] = _fig_roc(roc, metrics.get("roc_auc"), rep["curves"]["roc_auc_ci95"], op)
            figures["pr.png"] = _fig_pr(pr, ap, ap_ci, float(y.mean()), op)
        cm = metrics["confusion_matrix"]
        figures["confusion.png"] = _fig_confusion(
            cm, ["no tumour", "tumour"], f"Tumour vs no tumour at threshold {_fmt(thr)}"
        )
    if "mc_confusion_matrix" in metrics:
        figures["confusion_multiclass.png"] = _fig_confusion(
            metrics["mc_confusion_matrix"], classes, "All classes (arg-max prediction)"
        )
    rep["per_class"] = per_class_table(labels, pred, classes)
    rep["evaluated_per_class"] = {c: int((labels == i).sum()) for i, c in enumerate(classes)}
    rep["per_class_rule"] = (
        f"tumour score \u2265 {_fmt(thr)}" if len(classes) == 2 else "arg-max class probability"
    )

    # Calibration: predictions were made at the bundle's temperature; T = 1 is recovered from them.
    t = float(meta.temperature)
    ok = np.isfinite(probs).all(1)
    p_after = probs[ok].astype(np.float64)
    p_before = calibrate.rescale_probs(p_after, t, 1.0) if t != 1.0 else p_after
    lab_ok = labels[ok]
    bins_b = calibrate.reliability_bins(p_before.max(1), p_before.argmax(1) == lab_ok, N_BINS)
    bins_a = calibrate.reliability_bins(p_after.max(1), p_after.argmax(1) == lab_ok, N_BINS)
    cal: dict[str, Any] = {
        "temperature": t,
        "calibrated": t != 1.0,
        "n_bins": N_BINS,
        "ece_before": calibrate.expected_calibration_error(p_before, lab_ok, N_BINS),
        "ece_after": calibrate.expected_calibration_error(p_after, lab_ok, N_BINS),
        "temperature_fitted_on_this_data": calibrate.fit_temperature(p_after, lab_ok, t),
        "bins_before": bins_b,
        "bins_after": bins_a,
    }
    if binary:
        yb, sb_before = tumour_binary(lab_ok, p_before, classes, meta.negative_class)
        cal["binary_ece_before"] = calibrate.binary_ece(sb_before, yb, N_BINS)
        cal["binary_ece_after"] = calibrate.binary_ece(s[ok], y[ok], N_BINS)
    rep["calibration"] = cal
    if ok.any():
        figures["reliability.png"] = _fig_reliability(bins_b, bins_a, t, cal["ece_before"], cal["ece_after"])

    if binary:
        target = calibrate.threshold_for_sensitivity(y, s, target_sensitivity)
        at_bundle = _rates(y, s, thr)
        at_target = _rates(y, s, target["threshold"])
        cost = (
            at_bundle["specificity"] - at_target["specificity"]
            if at_bundle["specificity"] is not None and at_target["specificity"] is not None
            else None
        )
        rep["threshold_analysis"] = {
            "target_sensitivity": float(target_sensitivity),
            "search": target,
            "at_bundle_threshold": at_bundle,
            "at_target_threshold": at_target,
            "specificity_cost": cost,
            "bundle_threshold_source": "validation split at training time (stored in the bundle)",
        }
        figures["thresholds.png"] = _fig_thresholds(y, s, thr, target)

    hist = _history(Path(bundle_dir))
    best_epoch = meta.metrics.get("best_epoch")
    if hist is not None:
        show = [c for c in ("epoch", *LOSS_COLS, *METRIC_COLS) if c in hist.columns]
        rep["training"] = {
            "columns": list(hist.columns),
            "epochs": int(len(hist)),
            "best_epoch": best_epoch,
            "shown_columns": show,
            "rows": hist[show].to_dict(orient="records"),
        }
        figures["training.png"] = _fig_training(hist, best_epoch)
    else:
        rep["training"] = None

    rep["splits"] = {
        "source": meta.data.get("source"),
        "split_counts": meta.data.get("split_counts"),
        "duplicate_groups": meta.data.get("duplicate_groups"),
        "split_manifest_sha256": meta.data.get("split_manifest_sha256"),
    }

    if binary:
        gal = _gallery_items(paths, labels, pred, y, np.where(is_image, s, np.nan), thr, gallery)
        storage = StorageOptions.from_env(s3_endpoint)
        figures.update(_render_gallery(bundle_dir, meta, gal, storage))
        rep["gallery"] = gal
    else:
        rep["gallery"] = None

    rep["model_card"] = {
        "intended_use": INTENDED_USE,
        "known_limits": KNOWN_LIMITS,
        "training_data": rep["splits"],
        "train_config": {
            k: meta.train_config.get(k)
            for k in ("epochs", "batch_size", "lr", "freeze_epochs", "augment", "seed", "image_size")
            if k in meta.train_config
        },
        "validation_metrics": meta.metrics.get("val"),
        "test_metrics": {
            k: v
            for k, v in (meta.metrics.get("test") or {}).items()
            if k in ("n", "roc_auc", "sensitivity", "specificity", "accuracy", "f1")
        },
        "versions": meta.versions,
    }

    for name, png in figures.items():
        (out / name).write_bytes(png)
    rep["figures"] = sorted(figures)
    rep = _clean(rep)
    page = render_html(rep, figures)
    (out / REPORT_FILE).write_text(page, encoding="utf-8")
    (out / REPORT_JSON).write_text(json.dumps(rep, indent=2, default=str) + "\n")
    rep["outputs"] = {
        "html": str(out / REPORT_FILE),
        "report_json": str(out / REPORT_JSON),
        "metrics_json": str(out / "metrics.json"),
        "predictions": str(out / "predictions.parquet"),
        "figures": [str(out / n) for n in sorted(figures)],
    }
    return rep


# ----------------------------------------------------------------------------------------------------------
# HTML


def _fmt(v: Any, digits: int = 3) -> str:
    """The one number format of the page (tests look for these strings)."""
    if v is None:
        return "\u2014"
    if isinstance(v, (bool, np.bool_)):
        return "yes" if v else "no"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        return "\u2014" if not math.isfinite(v) else f"{float(v):.{digits}f}"
    return str(v)


def _ci(ci: Any) -> str:
    if not ci or ci[0] is None or ci[1] is None:
        return ""
    return f"[{_fmt(ci[0])}, {_fmt(ci[1])}]"


def _e(v: Any) -> str:
    return html.escape(_fmt(v))


def _data_text(data: Any) -> str:
    return " + ".join(map(str, data)) if isinstance(data, (list, tuple)) else str(data)


def _img(figures: dict[str, bytes], name: str, alt: str) -> str:
    if name not in figures:
        return ""
    b64 = base64.b64encode(figures[name]).decode("ascii")
    return f'<img src="data:image/png;base64,{b64}" alt="{html.escape(alt)}">'


def _table(head: list[str], rows: list[list[Any]], cls: str = "") -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{_e(v)}</td>" for v in r) + "</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>'


def _kv(rows: list[tuple[str, Any]]) -> str:
    body = "".join(f"<tr><th>{html.escape(k)}</th><td>{_e(v)}</td></tr>" for k, v in rows)
    return f'<table class="kv"><tbody>{body}</tbody></table>'


CSS = """
body{font-family:-apple-system,"Segoe UI",Roboto,"DejaVu Sans",Arial,sans-serif;margin:0;background:#f4f6f8;
color:#1d2733;font-size:14px;line-height:1.45}
main{max-width:1180px;margin:0 auto;padding:16px 24px 48px}
.banner{background:#b00020;color:#fff;font-weight:700;padding:10px 24px;text-align:center;font-size:15px}
h1{font-size:24px;margin:18px 0 4px} h2{font-size:18px;margin:0 0 10px;color:#0b3d6b}
section{background:#fff;border:1px solid #dde3ea;border-radius:8px;padding:16px 20px;margin:16px 0}
.sub{color:#5a6b7d;margin:0 0 8px}
.grid{display:grid;grid-template-columns:1fr 1fr;gap:16px;align-items:start}
img{max-width:100%;height:auto;display:block}
table{border-collapse:collapse;margin:6px 0 10px;font-variant-numeric:tabular-nums}
th,td{border:1px solid #dde3ea;padding:4px 10px;text-align:right}
th{background:#eef2f6;font-weight:600} td:first-child,th:first-child{text-align:left}
table.kv th{text-align:left;width:260px} table.kv td{text-align:left}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(220px,1fr));gap:12px}
.card{border:1px solid #dde3ea;border-radius:6px;padding:6px;background:#fafbfc;font-size:12px}
.card p{margin:4px 2px;word-break:break-all} .card img{width:100%}
.note{color:#5a6b7d;font-style:italic}
.metric{display:inline-block;margin:0 18px 8px 0} .metric b{font-size:20px;display:block}
ul{margin:4px 0 8px 18px;padding:0}
"""


def render_html(rep: dict[str, Any], figures: dict[str, bytes]) -> str:
    b, m, f = rep["bundle"], rep["metrics"], rep["files"]
    ci = m.get("ci95", {})
    cls = b["classes"]
    parts: list[str] = []
    add = parts.append

    # 1. header
    add(f'<div class="banner" id="banner">{html.escape(rep["banner"])}</div><main>')
    add(
        f"<h1>Evaluation report \u2014 {html.escape(b['backbone'])} bundle {html.escape(b['bundle_id'])}</h1>"
    )
    add(f'<p class="sub">generated {html.escape(rep["generated_at"])}</p>')
    add('<section id="summary"><h2>Summary</h2>')
    headline = [
        ("n scans", rep["n"]),
        ("ROC AUC", m.get("roc_auc")),
        ("sensitivity", m.get("sensitivity")),
        ("specificity", m.get("specificity")),
    ]
    add("".join(f'<span class="metric"><b>{_e(v)}</b>{html.escape(k)}</span>' for k, v in headline))
    add(
        _kv(
            [
                ("bundle id", b["bundle_id"]),
                ("backbone", b["backbone"]),
                ("classes", ", ".join(cls)),
                ("negative (no-tumour) class", b["negative_class"]),
                ("input", f"{b['image_size']} px, {b['channels']}, {b['geometry']}"),
                ("operating threshold (bundle)", _fmt(b["threshold"])),
                ("temperature (bundle)", _fmt(b["temperature"])),
                ("bundle created", b["created_at"]),
                ("data evaluated", _data_text(rep["data"])),
                ("scans evaluated (n)", rep["n"]),
                ("excluded as duplicates of training data", f.get("excluded_duplicates_of_training")),
                ("rejected files (could not be decoded)", f.get("files_rejected")),
                ("files listed", f.get("files_listed")),
                *(
                    [
                        ("predictions from score output", rep["scores"]),
                        (
                            "test-time adaptation (as scored)",
                            ", ".join(rep.get("adaptation") or []) or "none",
                        ),
                        ("score error rows", f.get("score_errors")),
                    ]
                    if rep.get("scores")
                    else []
                ),
                ("bootstrap resamples (95% CI)", rep["settings"]["n_boot"]),
            ]
        )
    )
    add("</section>")

    # 2. ROC / PR
    add('<section id="curves"><h2>Discrimination: ROC and precision\u2013recall</h2>')
    c = rep.get("curves")
    if c:
        rows = [
            ["ROC AUC", c["roc_auc"], _ci(c["roc_auc_ci95"])],
            ["average precision", c["average_precision"], _ci(c["average_precision_ci95"])],
        ]
        for k in ("accuracy", "sensitivity", "specificity", "ppv", "npv", "f1"):
            rows.append([k, m.get(k), _ci(ci.get(k))])
        add(_table(["metric", "value", "95% CI (bootstrap)"], rows))
        add(
            f'<p class="sub">Tumour score vs tumour label; prevalence {_e(c["prevalence"])}. Red dot: '
            f"operating point at the bundle threshold {_e(b['threshold'])}.</p>"
        )
        add(
            f'<div class="grid">{_img(figures, "roc.png", "ROC curve")}{_img(figures, "pr.png", "PR curve")}</div>'
        )
    else:
        add('<p class="note">No single tumour score (multi-class without a no-tumour class): no ROC/PR.</p>')
    add("</section>")

    # 2b. per source
    bs = rep.get("by_source")
    if bs:
        add('<section id="by-source"><h2>By source</h2>')
        rows = []
        for key, sm in bs.items():
            sci = sm.get("ci95") or {}
            rows.append(
                [key, sm.get("n"), sm.get("positives"), sm.get("roc_auc"), _ci(sci.get("roc_auc")),
                 sm.get("sensitivity"), _ci(sci.get("sensitivity")), sm.get("specificity"),
                 _ci(sci.get("specificity")), sm.get("fp_rate"), sm.get("threshold")]
            )  # fmt: skip
        head = ["source", "n", "positives", "ROC AUC", "AUC 95% CI", "sensitivity", "sensitivity 95% CI",
                "specificity", "specificity 95% CI", "FP rate", "threshold"]  # fmt: skip
        add(_table(head, rows, "by-source"))
        clustered = sum(sm.get("ci95_resampling", "scans") != "scans" for sm in bs.values())
        add(
            '<p class="sub">One row per source key: a manifest\'s <code>source</code> value up to '
            "\u201c via \u201d (or the <code>--source-pattern</code> match), else the data argument. A pooled "
            "metric can hide a source where the model fails; a source holding only no-tumour scans (healthy "
            "controls from a new site) has no sensitivity or AUC, and its specificity is the share of its "
            "scans called no tumour (FP rate = 1 \u2212 specificity). Bootstrap 95% CIs resample whole "
            f"patients where the data names them (patient_id: {clustered} of {len(bs)} sources), else "
            "single scans.</p>"
        )
        add("</section>")

    # 2c. slices vs volumes (a score output with volume rows)
    bk = rep.get("by_kind")
    if bk:
        add('<section id="by-kind"><h2>Slices and volumes</h2>')
        names = {"image": "slices (one image per file)", "volume": "volumes (volume rule)"}
        rows = []
        for key, km in bk.items():
            kci = km.get("ci95") or {}
            rows.append(
                [names.get(key, key), km.get("n"), km.get("positives"), km.get("roc_auc"),
                 km.get("sensitivity"), _ci(kci.get("sensitivity")), km.get("specificity"),
                 _ci(kci.get("specificity")), km.get("false_positives"), km.get("fp_rate")]
            )  # fmt: skip
        head = ["kind", "n", "positives", "ROC AUC", "sensitivity", "sensitivity 95% CI", "specificity",
                "specificity 95% CI", "false positives", "FP rate"]  # fmt: skip
        add(_table(head, rows, "by-kind"))
        add(
            '<p class="sub">A NIfTI or multi-frame DICOM file is one volume row, judged by its volume score '
            "(the tumour score sustained over adjacent slices, see <code>raytumor score --help</code>), not by "
            "its most suspicious slice; every other file is one slice. The volume false-positive rate is the "
            "share of healthy volumes flagged as a whole.</p>"
        )
        add("</section>")

    # 3. confusion + per class
    add('<section id="confusion"><h2>Confusion matrix and per-class metrics</h2><div class="grid"><div>')
    if "confusion_matrix" in m:
        (tn, fp), (fn, tp) = m["confusion_matrix"]
        add(f'<p class="sub">Tumour vs no tumour at the bundle threshold {_e(m.get("threshold"))}.</p>')
        add(
            _table(
                ["truth \\ predicted", "no tumour", "tumour"],
                [["no tumour", tn, fp], ["tumour", fn, tp]],
                "cm",
            )
        )
        add(_kv([("TN", tn), ("FP", fp), ("FN", fn), ("TP", tp), ("n", m["n"])]))
    if "mc_confusion_matrix" in m:
        mc_rows = [[c_, *r] for c_, r in zip(cls, m["mc_confusion_matrix"], strict=True)]
        add(_table(["truth \\ predicted", *cls], mc_rows))
    add(f"</div><div>{_img(figures, 'confusion.png', 'confusion matrix')}")
    add(f"{_img(figures, 'confusion_multiclass.png', 'multi-class confusion matrix')}</div></div>")
    add(f'<p class="sub">One-vs-rest per class; predicted class by {html.escape(rep["per_class_rule"])}.</p>')
    add(
        _table(
            ["class", "n", "sensitivity / recall", "specificity", "PPV", "NPV", "F1"],
            [
                [r["class"], r["n"], r["sensitivity"], r["specificity"], r["ppv"], r["npv"], r["f1"]]
                for r in rep["per_class"]
            ],
        )
    )
    add("</section>")

    # 4. calibration
    cal = rep["calibration"]
    add('<section id="calibration"><h2>Calibration</h2><div class="grid"><div>')
    if not cal["calibrated"]:
        add(
            '<p class="note">The bundle has temperature 1: its probabilities are <b>uncalibrated</b> '
            "(no temperature scaling was fitted).</p>"
        )
    rows = [
        ["top-label ECE", cal["ece_before"], cal["ece_after"]],
    ]
    if "binary_ece_before" in cal:
        rows.append(["tumour-score ECE", cal["binary_ece_before"], cal["binary_ece_after"]])
    add(_table(["", "before (T = 1)", f"after (T = {_fmt(cal['temperature'])})"], rows))
    add(
        _kv(
            [
                ("bundle temperature", cal["temperature"]),
                ("temperature fitted on this data (diagnostic only)", cal["temperature_fitted_on_this_data"]),
                ("bins", cal["n_bins"]),
            ]
        )
    )
    add(
        '<p class="sub">ECE: mean |accuracy \u2212 confidence| over equal-width confidence bins, weighted by '
        "the share of scans per bin. Predictions are made at the bundle temperature; T = 1 is recovered from "
        "them. A temperature fitted on evaluation data must not be used to tune the model.</p>"
    )
    add(f"</div><div>{_img(figures, 'reliability.png', 'reliability diagram')}</div></div></section>")

    # 5. threshold analysis
    add('<section id="threshold"><h2>Threshold analysis</h2>')
    ta = rep.get("threshold_analysis")
    if ta:
        ab, at = ta["at_bundle_threshold"], ta["at_target_threshold"]
        tgt = ta["search"]
        add(
            _table(
                ["threshold", "value", "sensitivity", "specificity", "PPV", "NPV", "FN", "FP"],
                [
                    ["bundle (validation)", ab["threshold"], ab["sensitivity"], ab["specificity"], ab["ppv"],
                     ab["npv"], ab["fn"], ab["fp"]],
                    [f"sensitivity \u2265 {ta['target_sensitivity']:g} on this data", at["threshold"],
                     at["sensitivity"], at["specificity"], at["ppv"], at["npv"], at["fn"], at["fp"]],
                ],
            )
        )  # fmt: skip
        if tgt.get("reason"):
            add(f'<p class="note">{html.escape(tgt["reason"])}</p>')
        else:
            cost = ta["specificity_cost"]
            word = "costs" if cost is not None and cost >= 0 else "gains"
            add(
                f"<p>Reaching sensitivity \u2265 {ta['target_sensitivity']:g} on this data needs threshold "
                f"<b>{_e(at['threshold'])}</b> (sensitivity {_e(at['sensitivity'])}) and {word} "
                f"<b>{_e(abs(cost) if cost is not None else None)}</b> specificity compared with the bundle's "
                f"operating threshold {_e(ab['threshold'])} (specificity {_e(ab['specificity'])} \u2192 "
                f"{_e(at['specificity'])}). The bundle's threshold was chosen on the validation split; a "
                "threshold picked on this evaluation data is optimistic for this data.</p>"
            )
        add(_img(figures, "thresholds.png", "sensitivity and specificity vs threshold"))
    else:
        add('<p class="note">No single tumour score: no threshold analysis.</p>')
    add("</section>")

    # 6. training curves
    add('<section id="training"><h2>Training curves</h2>')
    tr = rep.get("training")
    if tr:
        add(
            f'<p class="sub">{tr["epochs"]} epochs from the bundle\'s history.csv; best epoch '
            f"{_e(tr['best_epoch'])}.</p>"
        )
        add(_img(figures, "training.png", "training curves"))
        cols = tr["shown_columns"]
        add(_table(cols, [[r.get(k) for k in cols] for r in tr["rows"][:60]]))
    else:
        add('<p class="note">The bundle has no history.csv: no per-epoch training curves.</p>')
    add("</section>")

    # 7. splits and duplicates
    sp = rep["splits"]
    add('<section id="splits"><h2>Data splits and duplicates</h2><div class="grid"><div>')
    add(f"<p>Training source: <code>{html.escape(str(sp['source']))}</code></p>")
    counts = sp.get("split_counts") or {}
    if counts:
        names = sorted({k for row in counts.values() for k in row})
        rows = [[s_, *[row.get(k, 0) for k in names], sum(row.values())] for s_, row in counts.items()]
        add(_table(["split", *names, "total"], rows))
    else:
        add('<p class="note">The bundle records no split counts.</p>')
    add(_kv([("duplicate groups in the training source", sp.get("duplicate_groups"))]))
    add("</div><div><p>This evaluation:</p>")
    add(
        _kv(
            [
                ("files listed", f.get("files_listed")),
                ("files decoded", f.get("files_decoded")),
                ("files rejected", f.get("files_rejected")),
                ("excluded as duplicates of training data", f.get("excluded_duplicates_of_training")),
                ("scans evaluated", f.get("evaluated")),
                *[(f"decoded, class {k}", (f.get("per_class") or {}).get(k, 0)) for k in cls],
                *[(f"evaluated, class {k}", v) for k, v in rep["evaluated_per_class"].items()],
            ]
        )
    )
    if rep.get("rejected_files"):
        add(
            _table(
                ["rejected file", "reason"], [[r["path"], r["reason"]] for r in rep["rejected_files"][:20]]
            )
        )
    add("</div></div></section>")

    # 8. gallery
    add('<section id="gallery"><h2>Grad-CAM gallery: most confident errors</h2>')
    add(
        '<p class="sub">Grad-CAM of the tumour class on the model input (the preprocessed scan). For a '
        "missed tumour a faint map means the model found little tumour evidence anywhere; for a false "
        "positive it shows what looked like tumour. Heat maps show where the evidence came from, not "
        "that it is clinically meaningful.</p>"
    )
    if rep.get("scores"):
        add(
            '<p class="sub">Predictions come from a score output: single-image rows only (volumes are not '
            "shown here), and the maps are of the bundle's model as stored, without any test-time "
            "adaptation the scoring run applied.</p>"
        )
    gal = rep.get("gallery")
    if gal is None:
        add('<p class="note">No single tumour score: no error gallery.</p>')
    else:
        for kind, title in (("false_negatives", "False negatives (missed tumours)"),
                            ("false_positives", "False positives")):  # fmt: skip
            items = gal.get(kind) or []
            add(f"<h3>{title} \u2014 {len(items)} shown</h3>")
            if not items:
                add('<p class="note">none</p>')
                continue
            add('<div class="cards">')
            for it in items:
                pic = _img(figures, it.get("png", ""), it["basename"]) or (
                    f'<p class="note">not rendered: {html.escape(it.get("error", ""))}</p>'
                )
                add(
                    f'<div class="card">{pic}<p><b>{html.escape(it["basename"])}</b><br>true '
                    f"{html.escape(cls[it['label']])} / pred {html.escape(cls[it['pred']])}<br>"
                    f"score {_e(it['score'])} \u00b7 Grad-CAM for {html.escape(str(it.get('cam_target', '')))}"
                    "</p></div>"
                )
            add("</div>")
    add("</section>")

    # 9. model card
    mc = rep["model_card"]
    add('<section id="model-card"><h2>Model card</h2>')
    add(f"<h3>Intended use</h3><p>{html.escape(mc['intended_use'])}</p>")
    add(
        "<h3>Known limits</h3><ul>"
        + "".join(f"<li>{html.escape(x)}</li>" for x in mc["known_limits"])
        + "</ul>"
    )
    add("<h3>Data</h3>")
    add(
        _kv(
            [
                ("training source", sp.get("source")),
                ("split manifest sha256", sp.get("split_manifest_sha256")),
                ("duplicate groups", sp.get("duplicate_groups")),
                *[(f"{s_} scans", sum(row.values())) for s_, row in counts.items()],
                ("evaluated here", _data_text(rep["data"])),
            ]
        )
    )
    add("<h3>Metrics summary</h3>")
    keys = ["n", "roc_auc", "sensitivity", "specificity", "accuracy", "f1"]
    val = mc.get("validation_metrics") or {}
    test = mc.get("test_metrics") or {}
    rows = []
    if val:
        rows.append(["validation (training run)", *[val.get(f"val_{k}") for k in keys]])
    if test:
        rows.append(["test split (training run)", *[test.get(k) for k in keys]])
    rows.append(["this evaluation", *[m.get(k) for k in keys]])
    add(_table(["", *keys], rows))
    if mc.get("train_config"):
        add("<h3>Training configuration</h3>" + _kv(list(mc["train_config"].items())))
    add("<h3>Versions</h3>" + _kv(list((mc.get("versions") or {}).items())))
    add("</section>")
    add(f'<p class="sub">{html.escape(rep["banner"])}</p></main>')

    title = f"raytumor report {b['bundle_id']}"
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>\n"
        + "\n".join(parts)
        + "\n</body></html>\n"
    )


# ----------------------------------------------------------------------------------------------------------
# raytumor report


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Self-contained HTML evaluation report of a model bundle on labelled data",
        add_help=add_help,
    )
    from raytumor.evaluate import add_source_args

    p.add_argument("--bundle", required=True, help="model bundle directory (written by raytumor train)")
    add_source_args(p)
    p.add_argument("--out", required=True, help="output directory for report.html, report.json and PNGs")
    p.add_argument(
        "--target-sensitivity",
        type=float,
        default=0.95,
        help="sensitivity the threshold analysis searches a threshold for",
    )
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples for 95%% CIs")
    p.add_argument("--gallery", type=int, default=6, help="Grad-CAM overlays per error kind (FN, FP)")
    p.add_argument(
        "--s3-endpoint", default=None, help="endpoint of an S3-compatible store (or AWS_ENDPOINT_URL)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--keep-duplicates",
        action="store_true",
        help="do not exclude files that duplicate the bundle's training/validation files",
    )
    p.add_argument(
        "--scores",
        default=None,
        metavar="SCORE_OUTPUT",
        help="report on a finished `raytumor score` output of the same files instead of predicting (no Ray): "
        "volumes (NIfTI, multi-frame DICOM) as volume rows with slice and volume false-positive rates, "
        "test-time adaptation as it was scored. Files are not de-duplicated against the training data",
    )
    return p


def main(args: argparse.Namespace) -> dict[str, Any]:
    from raytumor.evaluate import compile_source_pattern
    from raytumor.runtime import init_ray

    compile_source_pattern(args.source_pattern)  # fail on a bad pattern before starting Ray
    if not args.scores:
        init_ray()
    rep = build_report(
        args.bundle,
        args.data[0] if len(args.data) == 1 else args.data,
        args.out,
        target_sensitivity=args.target_sensitivity,
        n_boot=args.n_boot,
        gallery=args.gallery,
        seed=args.seed,
        s3_endpoint=args.s3_endpoint,
        exclude_duplicates=not args.keep_duplicates,
        source_pattern=args.source_pattern,
        scores=args.scores,
    )
    print(f"report written to {rep['outputs']['html']}")
    print(f"metrics written to {rep['outputs']['metrics_json']}")
    return rep
