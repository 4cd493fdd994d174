"""Metrics: the tumour-score rule, confusion counts, curves and bootstrap confidence intervals.

One implementation of each number, used by training (validation, the bundle's test metrics), evaluation,
the report and calibration, so the same predictions give the same value everywhere. Point ROC-AUC comes
from torchmetrics; the bootstrap re-computes the metrics with vectorised numpy (1,000 resamples of a few
thousand scans take well under a second), and a test checks both agree. Intervals resample clusters
(duplicate groups, patients: :func:`raytumor.groups.cluster_ids`) whenever the rows say what they are.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import torch

from raytumor.groups import cluster_ids

BINARY_METRICS = ("accuracy", "roc_auc", "sensitivity", "specificity", "ppv", "npv", "f1")
# Undefined (None) on a set holding only tumour or only no-tumour scans, like ROC-AUC and the rate of the
# missing class; accuracy then equals specificity (or sensitivity).
SINGLE_CLASS_UNDEFINED = ("ppv", "npv", "f1", "average_precision")


# ----------------------------------------------------------------------------------------------------------
# The tumour score and labels


def tumour_score(probs: Any, classes: list[str], negative_class: str | None) -> Any:
    """The scalar tumour score per row of class probabilities (N, C): 1 - P(no-tumour class), or P(class 1)
    of a binary set without one; None for more classes without a no-tumour class (no single score).
    Works on numpy arrays and torch tensors alike."""
    if negative_class is not None:
        return 1.0 - probs[:, list(classes).index(negative_class)]
    if len(classes) == 2:
        return probs[:, 1]
    return None


def tumour_binary(labels: np.ndarray, probs: np.ndarray, classes: list[str], negative_class: str | None):
    """Collapse labels/probabilities to tumour (1) vs none (0) and the tumour score; (None, None) when
    the classes define no tumour score."""
    labels = np.asarray(labels)
    s = tumour_score(np.asarray(probs, dtype=np.float64), classes, negative_class)
    if s is None:
        return None, None
    if negative_class is not None:
        return (labels != list(classes).index(negative_class)).astype(np.int64), s
    return (labels == 1).astype(np.int64), s


def nonfinite_rows(probs: np.ndarray, score: np.ndarray | None = None) -> np.ndarray:
    """Rows whose probabilities (or tumour score) are NaN/inf: the model gave no answer for them, which
    is an error, never a class."""
    probs = np.asarray(probs, dtype=np.float64)
    bad = ~np.isfinite(probs).all(1) if probs.ndim == 2 else ~np.isfinite(probs)
    if score is not None:
        bad |= ~np.isfinite(np.asarray(score, dtype=np.float64))
    return bad


def predict_labels(
    probs: np.ndarray, score: np.ndarray, classes: list[str], negative_class: str | None, threshold: float
) -> np.ndarray:
    """Class index per row: binary sets call tumour iff ``score >= threshold``; more classes take the
    arg-max. Rows whose probabilities or score are not finite get -1 (no class): a NaN must never read as
    "no tumour" (callers turn them into error rows)."""
    if len(probs) == 0:
        return np.zeros(0, dtype=np.int64)
    if len(classes) == 2:
        neg = list(classes).index(negative_class) if negative_class is not None else 0
        bad = nonfinite_rows(probs, score)
        with np.errstate(invalid="ignore"):
            called = np.where(np.asarray(score) >= threshold, 1 - neg, neg)
    else:
        bad = nonfinite_rows(probs)
        called = np.nan_to_num(np.asarray(probs, dtype=np.float64), nan=-1.0).argmax(1)
    return np.where(bad, -1, called).astype(np.int64)


# ----------------------------------------------------------------------------------------------------------
# Confusion counts and the rates built on them


def confusion_counts(truth: np.ndarray, called: np.ndarray) -> tuple[Any, Any, Any, Any]:
    """(tp, fp, fn, tn) over the last axis of boolean ``truth``/``called`` arrays of any shape."""
    truth, called = np.asarray(truth, dtype=bool), np.asarray(called, dtype=bool)
    tp = (called & truth).sum(-1)
    fp = (called & ~truth).sum(-1)
    fn = (~called & truth).sum(-1)
    tn = (~called & ~truth).sum(-1)
    return tp, fp, fn, tn


def rates(tp: Any, fp: Any, fn: Any, tn: Any) -> dict[str, Any]:
    """Accuracy, sensitivity, specificity, PPV, NPV, F1 from counts (arrays: NaN where undefined)."""
    tp, fp, fn, tn = (np.asarray(v, dtype=float) for v in (tp, fp, fn, tn))
    with np.errstate(invalid="ignore", divide="ignore"):
        return {
            "accuracy": (tp + tn) / (tp + fp + fn + tn),
            "sensitivity": tp / (tp + fn),
            "specificity": tn / (tn + fp),
            "ppv": tp / (tp + fp),
            "npv": tn / (tn + fn),
            "f1": 2 * tp / (2 * tp + fp + fn),
        }


def _none_if_nan(v: Any) -> float | None:
    v = float(v)
    return None if np.isnan(v) else v


def operating_point(y: np.ndarray, s: np.ndarray, threshold: float) -> dict[str, Any]:
    """Rates and counts of the tumour call ``score >= threshold`` (None where a rate is undefined)."""
    tp, fp, fn, tn = confusion_counts(y == 1, s >= threshold)
    r = rates(tp, fp, fn, tn)
    return {
        "threshold": float(threshold),
        **{k: _none_if_nan(r[k]) for k in ("sensitivity", "specificity", "ppv", "npv")},
        "tp": int(tp),
        "fp": int(fp),
        "fn": int(fn),
        "tn": int(tn),
    }


def per_class_table(labels: np.ndarray, pred: np.ndarray, classes: list[str]) -> list[dict[str, Any]]:
    """One-vs-rest sensitivity (recall), specificity, PPV, NPV and F1 per class."""
    rows = []
    for i, c in enumerate(classes):
        tp, fp, fn, tn = (int(v) for v in confusion_counts(labels == i, pred == i))
        r = rates(tp, fp, fn, tn)
        rows.append(
            {
                "class": c,
                "n": tp + fn,
                "tp": tp,
                "fp": fp,
                "fn": fn,
                "tn": tn,
                **{k: _none_if_nan(r[k]) for k in ("sensitivity", "specificity", "ppv", "npv", "f1")},
            }
        )
    return rows


# ----------------------------------------------------------------------------------------------------------
# Curves (numpy; scikit-learn-free)


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
    if len(y) == 0 or y.sum() == 0:
        return None
    c = pr_curve(y, s)
    recall = np.r_[0.0, c["recall"]]
    return float(np.sum(np.diff(recall) * c["precision"]))


# ----------------------------------------------------------------------------------------------------------
# Point metrics


def compute_metrics(
    labels: np.ndarray,
    probs: np.ndarray,
    classes: list[str],
    negative_class: str | None = None,
    threshold: float = 0.5,
) -> dict[str, Any]:
    """Accuracy, ROC-AUC, sensitivity, specificity, PPV, NPV, F1 and the confusion matrix.

    Binary sets use the tumour score at ``threshold``; sets with more classes add macro metrics on the
    arg-max prediction (and the tumour-vs-none view when a no-tumour class exists).
    """
    labels = np.asarray(labels, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float32)
    out: dict[str, Any] = {"n": int(len(labels)), "threshold": float(threshold)}
    if len(labels) == 0:
        return out
    y, s = tumour_binary(labels, probs, classes, negative_class)
    if y is not None:
        out.update(_binary_point(y, s, threshold))
    if len(classes) > 2:
        out.update(_multiclass(labels, probs, len(classes)))
        if y is None:
            out["accuracy"] = out["mc_accuracy"]
    return out


def _multiclass(labels: np.ndarray, probs: np.ndarray, c: int) -> dict[str, Any]:
    import torchmetrics.functional as tmf  # lazily: ~1.4 s of imports every scoring actor would pay

    p, t = torch.from_numpy(probs), torch.from_numpy(labels)
    return {
        "mc_accuracy": float(tmf.accuracy(p, t, task="multiclass", num_classes=c, average="micro")),
        "mc_balanced_accuracy": float(tmf.recall(p, t, task="multiclass", num_classes=c, average="macro")),
        "mc_f1_macro": float(tmf.f1_score(p, t, task="multiclass", num_classes=c, average="macro")),
        "mc_roc_auc_macro": _safe(
            lambda: float(tmf.auroc(p, t, task="multiclass", num_classes=c, average="macro"))
        ),
        "mc_confusion_matrix": tmf.confusion_matrix(p, t, task="multiclass", num_classes=c).tolist(),
    }


def _safe(fn) -> float | None:
    try:
        v = fn()
        return None if np.isnan(v) else v
    except (ValueError, RuntimeError):
        return None


def _binary_point(y: np.ndarray, s: np.ndarray, threshold: float) -> dict[str, Any]:
    # Threshold metrics from the confusion counts with `score >= threshold` (torchmetrics uses `>`), the
    # same rule as the bootstrap and the predictor; torchmetrics gives the threshold-free ROC-AUC.
    tp, fp, fn, tn = (int(v) for v in confusion_counts(y == 1, s >= threshold))
    v = rates(tp, fp, fn, tn)
    both = 0 < y.sum() < len(y)
    import torchmetrics.functional as tmf

    auc = (
        float(tmf.auroc(torch.from_numpy(s.astype(np.float32)), torch.from_numpy(y), task="binary"))
        if both
        else None
    )
    if not both:  # one class only: PPV/NPV/F1 are trivially 0 or 1, not evidence about the model
        v.update({k: np.nan for k in SINGLE_CLASS_UNDEFINED if k in v})
    return {
        **{k: _none_if_nan(x) for k, x in v.items()},
        "roc_auc": auc,
        "confusion_matrix": [[tn, fp], [fn, tp]],  # rows: truth none/tumour; cols: predicted none/tumour
        "positives": int(y.sum()),
        "negatives": int((y == 0).sum()),
    }


def _binary_vectorised(
    y: np.ndarray, s: np.ndarray, threshold: float, with_auc: bool = True
) -> dict[str, np.ndarray]:
    """Binary metrics for many resamples at once: y, s are (R, N)."""
    pos = y == 1
    out = rates(*confusion_counts(pos, s >= threshold))
    if not with_auc:
        return out
    # ROC-AUC as the Mann-Whitney U statistic with mid-ranks for ties.
    n = y.shape[1]
    order = np.argsort(s, axis=1, kind="stable")
    ss = np.take_along_axis(s, order, 1)
    ranks = np.empty_like(ss, dtype=float)
    for r in range(s.shape[0]):  # rankdata per row
        ranks[r] = _midranks(ss[r])
    inv = np.empty_like(order)
    np.put_along_axis(inv, order, np.arange(n)[None, :].repeat(s.shape[0], 0), 1)
    r_orig = np.take_along_axis(ranks, inv, 1)
    n_pos = pos.sum(1).astype(float)
    n_neg = n - n_pos
    with np.errstate(invalid="ignore", divide="ignore"):
        out["roc_auc"] = ((r_orig * pos).sum(1) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    # Average precision per resample (a loop: each needs its own sort); NaN without positives.
    ap = [average_precision(y[r], s[r]) for r in range(s.shape[0])]
    out["average_precision"] = np.array([np.nan if a is None else a for a in ap], dtype=float)
    return out


def _midranks(sorted_vals: np.ndarray) -> np.ndarray:
    n = len(sorted_vals)
    ranks = np.arange(1, n + 1, dtype=float)
    _, start, counts = np.unique(sorted_vals, return_index=True, return_counts=True)
    for st, c in zip(start[counts > 1], counts[counts > 1], strict=False):
        ranks[st : st + c] = st + (c + 1) / 2
    return ranks


# ----------------------------------------------------------------------------------------------------------
# Confidence intervals


def bootstrap_ci(
    labels: np.ndarray,
    probs: np.ndarray,
    classes: list[str],
    negative_class: str | None = None,
    threshold: float = 0.5,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    groups: np.ndarray | None = None,
) -> dict[str, list[float | None]]:
    """Percentile bootstrap 1-alpha intervals for the binary metrics and average precision.

    Resamples scans with replacement, or with ``groups`` whole duplicate groups (a cluster bootstrap):
    near-duplicates are not independent evidence, and counting them as such narrows the interval.
    """
    y, s = tumour_binary(labels, probs, classes, negative_class)
    if y is None or len(y) == 0:
        return {}
    rng = np.random.default_rng(seed)
    chunks = []
    if groups is not None and len(np.unique(groups)) < len(y):
        _, inverse = np.unique(np.asarray(groups), return_inverse=True)
        members = [np.flatnonzero(inverse == g) for g in range(inverse.max() + 1)]
        for _ in range(n_boot):  # replicates differ in size: one at a time
            idx = np.concatenate([members[g] for g in rng.integers(0, len(members), len(members))])
            chunks.append(_binary_vectorised(y[idx][None], s[idx][None], threshold))
    else:
        for start in range(0, n_boot, 200):  # bounded memory for large test sets
            idx = rng.integers(0, len(y), size=(min(200, n_boot - start), len(y)))
            chunks.append(_binary_vectorised(y[idx], s[idx], threshold))
    single = y.min() == y.max()
    out: dict[str, list[float | None]] = {}
    for k in chunks[0]:
        v = np.concatenate([np.atleast_1d(c[k]) for c in chunks])
        v = v[np.isfinite(v)]
        out[k] = (
            [float(np.quantile(v, alpha / 2)), float(np.quantile(v, 1 - alpha / 2))]
            if len(v) and not (single and k in SINGLE_CLASS_UNDEFINED)
            else [None, None]
        )
    return out


def metrics_with_ci(
    df: pd.DataFrame,
    classes: list[str],
    negative_class: str | None,
    threshold: float,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """:func:`compute_metrics` plus ``ci95`` (cluster bootstrap, see :func:`raytumor.groups.cluster_ids`)
    of prediction rows: ``label`` (index into ``classes``), ``prob_<class>``; optional ``path``,
    ``source``, ``patient_id``, ``group``. Rows without finite probabilities (failed at prediction) are left
    out and counted. Adds ``average_precision`` and ``false_positives``/``fp_rate`` (share of no-tumour
    scans called tumour)."""
    if "path" in df.columns:  # the bootstrap's draws depend on row order: make it the same every run
        df = df.sort_values("path", kind="stable")
    probs = df[[f"prob_{c}" for c in classes]].to_numpy(dtype=np.float32)
    ok = np.isfinite(probs).all(1)
    df, probs = df[ok], probs[ok]
    labels = df["label"].to_numpy().astype(np.int64)
    m = compute_metrics(labels, probs, classes, negative_class, threshold)
    y, s = tumour_binary(labels, probs, classes, negative_class)
    if y is not None:
        m["average_precision"] = average_precision(y, s)
    groups, what = cluster_ids(df)
    m["ci95"] = bootstrap_ci(labels, probs, classes, negative_class, threshold, n_boot, seed, groups=groups)
    m["ci95_resampling"] = what
    if "confusion_matrix" in m:
        (tn, fp), _ = m["confusion_matrix"]
        m["false_positives"] = int(fp)
        m["fp_rate"] = float(fp / (tn + fp)) if tn + fp else None
    if not ok.all():
        m["failed_predictions"] = int((~ok).sum())
    return m


def per_source_metrics(
    df: pd.DataFrame,
    classes: list[str],
    negative_class: str | None,
    threshold: float,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, dict[str, Any]]:
    """{source key: :func:`metrics_with_ci`} over the rows of each value of ``df["source"]``.

    A source holding one class gets the metrics that class defines (a folder of healthy scans: specificity,
    its CI and the false-positive count; sensitivity and ROC-AUC None). Works on any prediction table with a
    ``source`` column: ``raytumor evaluate``'s predictions.parquet, or a leave-one-source-out run's test
    split.
    """
    if "source" not in df.columns:
        raise ValueError(f"per-source metrics need a 'source' column (have {list(df.columns)})")
    src = df["source"].astype(str)
    return {
        key: metrics_with_ci(df[src == key], classes, negative_class, threshold, n_boot, seed)
        for key in sorted(src.unique())
    }
