"""The report's figures: matplotlib (Agg) drawings of numbers already in the report dict, as PNG bytes.

Nothing here computes a metric; every value plotted comes from :mod:`raytumor.metrics` (via
:mod:`raytumor.report.compute`), so the legends show the page's numbers. matplotlib is imported lazily:
importing the report (``raytumor --help``) must not pay for it.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pandas as pd

from raytumor.report.fmt import fmt, fmt_ci

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
OP_STYLE = {"ms": 9, "c": "#d62728"}  # the operating point, the same red dot on both curves


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    finally:
        _plt().close(fig)
    return buf.getvalue()


def roc(curve: dict[str, np.ndarray], auc: float | None, ci: Any, op: dict[str, Any]) -> bytes:
    fig, ax = _plt().subplots(figsize=(5.0, 4.4))
    ax.plot([0, 1], [0, 1], ls=":", c="0.6", lw=1)
    ax.plot(curve["fpr"], curve["tpr"], c="#1f5fa8", lw=2, label=f"ROC (AUC {fmt(auc)} {fmt_ci(ci)})")
    if op.get("sensitivity") is not None and op.get("specificity") is not None:
        label = f"operating point (threshold {fmt(op['threshold'])})"
        ax.plot(1 - op["specificity"], op["sensitivity"], "o", label=label, **OP_STYLE)
    ax.set(xlabel="1 \u2212 specificity (false-positive rate)", ylabel="sensitivity (true-positive rate)")
    ax.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.01), title="ROC curve: tumour vs no tumour")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return _png(fig)


def pr(
    curve: dict[str, np.ndarray], ap: float | None, ci: Any, prevalence: float, op: dict[str, Any]
) -> bytes:
    fig, ax = _plt().subplots(figsize=(5.0, 4.4))
    ax.axhline(prevalence, ls=":", c="0.6", lw=1, label=f"prevalence {fmt(prevalence)}")
    first = curve["precision"][0] if len(curve["precision"]) else 1.0
    ax.step(np.r_[0.0, curve["recall"]], np.r_[first, curve["precision"]], where="pre", c="#1f5fa8", lw=2,
            label=f"PR (AP {fmt(ap)} {fmt_ci(ci)})")  # fmt: skip
    if op.get("sensitivity") is not None and op.get("ppv") is not None:
        label = f"operating point (threshold {fmt(op['threshold'])})"
        ax.plot(op["sensitivity"], op["ppv"], "o", label=label, **OP_STYLE)
    ax.set(xlabel="recall (sensitivity)", ylabel="precision (PPV)", xlim=(-0.01, 1.01), ylim=(-0.01, 1.02))
    ax.set_title("Precision\u2013recall curve")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    return _png(fig)


def confusion(cm: list[list[int]], names: list[str], title: str) -> bytes:
    a = np.asarray(cm)
    fig, ax = _plt().subplots(figsize=(1.6 + 1.3 * len(names), 1.2 + 1.2 * len(names)))
    ax.imshow(a, cmap="Blues")
    vmax = a.max() if a.size else 0
    for (i, j), v in np.ndenumerate(a):
        ax.text(j, i, str(v), ha="center", va="center", fontsize=14, c="white" if v > vmax / 2 else "black")
    ax.set_xticks(range(len(names)), [f"pred {n}" for n in names])
    ax.set_yticks(range(len(names)), [f"true {n}" for n in names])
    ax.set_title(title, fontsize=10)
    return _png(fig)


def reliability(before: dict[str, Any], after: dict[str, Any], t: float, ece_b: float, ece_a: float) -> bytes:
    fig, (ax, axh) = _plt().subplots(
        2, 1, figsize=(5.0, 5.2), sharex=True, gridspec_kw={"height_ratios": [3, 1]}
    )
    ax.plot([0, 1], [0, 1], ls=":", c="0.6", lw=1, label="perfect calibration")
    ax.plot(before["confidence"], before["accuracy"], "s--", c="#ff7f0e", label=f"T = 1 (ECE {fmt(ece_b)})")
    if t != 1.0:
        label = f"T = {t:g} (ECE {fmt(ece_a)})"
        ax.plot(after["confidence"], after["accuracy"], "o-", c="#1f5fa8", label=label)
    ax.set(ylabel="accuracy", ylim=(-0.02, 1.02), title="Reliability (top-label confidence)")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    edges = np.asarray(after["edges"])
    axh.bar(edges[:-1], after["count"], width=np.diff(edges), align="edge", color="#1f5fa8", alpha=0.6)
    axh.set(xlabel="confidence", ylabel="scans", xlim=(0, 1))
    return _png(fig)


def thresholds(y: np.ndarray, s: np.ndarray, bundle_thr: float, bundle_label: str, target: dict) -> bytes:
    """Sensitivity and specificity against the threshold; ``bundle_label`` says where the bundle's
    threshold came from (validation, or the unfitted default)."""
    grid = np.unique(np.r_[np.linspace(0, 1, 201), s[np.isfinite(s)]])
    pos, neg = s[y == 1], s[y == 0]
    sens = [(pos >= t).mean() if len(pos) else np.nan for t in grid]
    spec = [(neg < t).mean() if len(neg) else np.nan for t in grid]
    fig, ax = _plt().subplots(figsize=(7.0, 4.0))
    ax.plot(grid, sens, c="#d62728", lw=2, label="sensitivity")
    ax.plot(grid, spec, c="#1f5fa8", lw=2, label="specificity")
    ax.axhline(target["target"], ls=":", c="#d62728", lw=1)
    ax.axvline(
        bundle_thr, c="k", ls="--", lw=1.5, label=f"bundle threshold {fmt(bundle_thr)} ({bundle_label})"
    )
    if target.get("threshold") is not None and target.get("sensitivity") is not None:
        label = f"sensitivity \u2265 {target['target']:g} on this data: {fmt(target['threshold'])}"
        ax.axvline(target["threshold"], c="#2ca02c", lw=1.5, label=label)
    ax.set(xlabel="threshold on tumour score", ylabel="rate", xlim=(0, 1), ylim=(-0.02, 1.02))
    ax.set_title("Sensitivity and specificity vs threshold")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, fontsize=8, frameon=False)
    return _png(fig)


def training(hist: pd.DataFrame, best_epoch: Any) -> bytes:
    x = hist["epoch"] if "epoch" in hist.columns else pd.Series(range(len(hist)))
    fig, (a1, a2) = _plt().subplots(1, 2, figsize=(10.0, 3.8))
    for c in LOSS_COLS:
        if c in hist.columns:
            a1.plot(x, hist[c], "o-", ms=3, label=c)
    for c in METRIC_COLS:
        if c in hist.columns and hist[c].notna().any():
            a2.plot(x, hist[c], "o-", ms=3, label=c)
    panels = ((a1, "loss", "cross-entropy (per image)"), (a2, "validation metrics", "metric value"))
    for ax, title, ylabel in panels:
        if best_epoch is not None:
            ax.axvline(best_epoch, c="0.4", ls="--", lw=1, label=f"best epoch {best_epoch}")
        ax.set(xlabel="epoch", ylabel=ylabel, title=title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _png(fig)
