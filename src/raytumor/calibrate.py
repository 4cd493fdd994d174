"""Calibration: temperature scaling, reliability/ECE, and an operating threshold for a target sensitivity.

Model outputs reach us as softmax probabilities computed at some temperature T0 (``BundleMeta.temperature``).
``log(p) * T0`` equals the logits up to a per-row constant, and softmax ignores per-row constants, so the
temperature can be fitted and applied from probabilities alone: ``p_T = softmax(log(p_T0) * T0 / T)``. No
model or logits are needed, which lets calibration run on a stored predictions table.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax

from raytumor.metrics import tumour_binary

T_MIN, T_MAX = 0.05, 100.0
_EPS = 1e-30  # floor before log: a saturated softmax gives exact zeros; float32 keeps ~1e-38, so margins up to ~69 survive
MIN_ROWS = 10  # fewer validation rows than this cannot say anything useful about a temperature


def _logits(probs: np.ndarray, temperature: float) -> np.ndarray:
    """Logits (up to a per-row constant) behind probabilities that were computed at ``temperature``."""
    p = np.clip(np.asarray(probs, dtype=np.float64), _EPS, 1.0)
    return np.log(p) * float(temperature)


def rescale_probs(probs: np.ndarray, from_temperature: float, to_temperature: float) -> np.ndarray:
    """Probabilities computed at ``from_temperature`` re-expressed at ``to_temperature`` (float64)."""
    if not all(math.isfinite(t) and t > 0 for t in (from_temperature, to_temperature)):
        raise ValueError(f"temperatures must be finite and > 0, got {from_temperature} and {to_temperature}")
    z = _logits(probs, from_temperature) / float(to_temperature)
    return np.exp(log_softmax(z, axis=1))


def _nll(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    logp = log_softmax(logits / temperature, axis=1)
    return float(-logp[np.arange(len(labels)), labels].mean())


def fit_temperature(probs: np.ndarray, labels: np.ndarray, current_temperature: float = 1.0) -> float:
    """Temperature minimising the validation NLL (Guo et al. 2017), clamped to [0.05, 100].

    ``probs`` (N, C) were computed at ``current_temperature``. The search runs over log T: the NLL is
    smooth and unimodal there and the bounds are symmetric-ish around 1, so a bounded 1-D Brent search
    is exact enough and needs no gradients. Degenerate validation sets (fewer than 10 rows, or only one
    class present: every T that sharpens towards that class looks better, and the optimum runs to a
    bound) return ``current_temperature`` unchanged.
    """
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if probs.ndim != 2 or len(probs) != len(labels):
        raise ValueError(f"probs must be (N, C) matching labels, got {probs.shape} and {labels.shape}")
    ok = np.isfinite(probs).all(1)  # failed decodes arrive as NaN rows: they carry no evidence
    probs, labels = probs[ok], labels[ok]
    if len(labels) < MIN_ROWS or len(np.unique(labels)) < 2:
        return float(current_temperature)
    z = _logits(probs, current_temperature)
    res = minimize_scalar(
        lambda log_t: _nll(z, labels, math.exp(log_t)),
        bounds=(math.log(T_MIN), math.log(T_MAX)),
        method="bounded",
        options={"xatol": 1e-5},
    )
    return float(np.clip(math.exp(res.x), T_MIN, T_MAX))


def reliability_bins(confidence: np.ndarray, correct: np.ndarray, n_bins: int = 15) -> dict[str, Any]:
    """Equal-width reliability diagram on [0, 1]: bin m holds confidences in ((m-1)/M, m/M] (0 in bin 1).

    Returns edges (M+1), and per bin the mean confidence, the accuracy (mean of ``correct``) and the count;
    empty bins have NaN mean/accuracy so plots leave gaps instead of drawing fake points at 0.
    """
    conf = np.asarray(confidence, dtype=np.float64)
    corr = np.asarray(correct, dtype=np.float64)
    keep = np.isfinite(conf)
    conf, corr = np.clip(conf[keep], 0.0, 1.0), corr[keep]
    idx = np.clip(np.ceil(conf * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    count = np.bincount(idx, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(idx, weights=conf, minlength=n_bins) / count
        acc = np.bincount(idx, weights=corr, minlength=n_bins) / count
    return {
        "edges": np.linspace(0.0, 1.0, n_bins + 1),
        "confidence": mean_conf,
        "accuracy": acc,
        "count": count,
    }


def _ece_from_bins(bins: dict[str, Any]) -> float:
    n = bins["count"].sum()
    if n == 0:
        return float("nan")
    filled = bins["count"] > 0
    gap = np.abs(bins["accuracy"][filled] - bins["confidence"][filled])
    return float((bins["count"][filled] / n * gap).sum())


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> float:
    """Top-label ECE: sum over bins of |accuracy - mean confidence| weighted by the bin's share of rows."""
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels)
    ok = np.isfinite(probs).all(1)
    probs, labels = probs[ok], labels[ok]
    return _ece_from_bins(reliability_bins(probs.max(1), probs.argmax(1) == labels, n_bins))


def binary_ece(score: np.ndarray, y: np.ndarray, n_bins: int = 15) -> float:
    """ECE of the tumour score read as P(tumour): binned score against the observed tumour fraction.

    Unlike the top-label ECE this is what a radiologist sees: "0.8" should mean tumour 8 times in 10.
    """
    return _ece_from_bins(reliability_bins(score, np.asarray(y) == 1, n_bins))


def threshold_for_sensitivity(y: np.ndarray, score: np.ndarray, target: float = 0.95) -> dict[str, Any]:
    """The highest threshold on ``score`` whose sensitivity on (y, score) is >= ``target``.

    Predicted positive iff ``score >= threshold`` (as ``predict.predict_labels``), so the threshold is always
    one of the positives' scores: the k-th highest, k = ceil(target * n_pos). Choosing the score value
    itself (not a midpoint) keeps every positive tied at it predicted positive, and any higher threshold
    drops at least that positive, so sensitivity falls below target; specificity is then as high as the
    target allows. NaN scores count as -1 (never positive) here; :func:`calibrate_bundle_meta` drops
    non-finite rows first, since the predictor makes them error rows rather than calls.
    """
    if not 0.0 < target <= 1.0:
        raise ValueError(f"target sensitivity must be in (0, 1], got {target}")
    y = np.asarray(y).astype(np.int64)
    s = np.nan_to_num(np.asarray(score), nan=-1.0)
    pos, neg = s[y == 1], s[y != 1]
    out: dict[str, Any] = {"target": float(target), "n_pos": int(len(pos)), "n_neg": int(len(neg))}
    if len(pos) == 0:
        spec = float((neg < 0.5).mean()) if len(neg) else None
        return {
            **out,
            "threshold": 0.5,
            "sensitivity": None,
            "specificity": spec,
            "reason": "no positive (tumour) cases: sensitivity is undefined, default threshold kept",
        }
    # The 1e-9 guards against 0.95 * 20 = 19.000000000000004 asking for a 20th positive.
    k = max(1, math.ceil(target * len(pos) - 1e-9))
    thr = np.sort(pos)[::-1][k - 1]
    return {
        **out,
        "threshold": float(thr),  # exact: float32 scores convert to Python float without rounding
        "sensitivity": float((pos >= thr).mean()),
        "specificity": float((neg < thr).mean()) if len(neg) else None,
        "reason": None,
    }


def calibrate_bundle_meta(
    meta: Any, probs: np.ndarray, labels: np.ndarray, target_sensitivity: float = 0.95
) -> dict[str, Any]:
    """Temperature and operating threshold for a bundle from its validation predictions.

    ``probs`` were computed with ``meta.temperature``. Returns a record for the caller to store (``meta`` is
    not touched): temperature, threshold, target_sensitivity, val_sensitivity, val_specificity, ece_before,
    ece_after (top-label), binary ECE of the tumour score before/after, n. The threshold is chosen on the
    rescaled tumour score, since that is the score the predictor will produce once the temperature is
    stored. Multi-class bundles without a negative class have no tumour score: temperature only.
    """
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    t0 = float(meta.temperature)
    temperature = fit_temperature(probs, labels, t0)
    # float32 like the predictor's softmax and score, so the threshold compares exactly as it will there.
    new = rescale_probs(probs, t0, temperature).astype(np.float32)
    rec: dict[str, Any] = {
        "temperature": temperature,
        "threshold": float(meta.threshold),
        "target_sensitivity": float(target_sensitivity),
        "val_sensitivity": None,
        "val_specificity": None,
        "ece_before": expected_calibration_error(probs, labels),
        "ece_after": expected_calibration_error(new, labels),
        "n": int(len(labels)),
    }
    # Rows without finite probabilities (failed decodes, a NaN forward) are errors, not evidence: a NaN
    # positive counted as missed would pull the threshold down to -1 (every scan a tumour).
    ok = np.isfinite(probs).all(1) & np.isfinite(new).all(1)
    probs, new, labels = probs[ok], new[ok], labels[ok]
    y, s_before = tumour_binary(labels, probs, meta.classes, meta.negative_class)
    if y is None:
        rec["reason"] = "no negative class and more than 2 classes: no tumour score, threshold unchanged"
        return rec
    _, s_after = tumour_binary(labels, new, meta.classes, meta.negative_class)
    s_after = s_after.astype(np.float32)  # tumour_binary works in float64; the predictor's score is float32
    rec["binary_ece_before"] = binary_ece(s_before, y)
    rec["binary_ece_after"] = binary_ece(s_after, y)
    pick = threshold_for_sensitivity(y, s_after, target_sensitivity)
    if pick["reason"] is not None:  # no tumours in validation: keep the bundle's threshold
        rec["reason"] = pick["reason"]
        return rec
    rec.update(threshold=pick["threshold"], val_sensitivity=pick["sensitivity"])
    rec.update(val_specificity=pick["specificity"], reason=None)
    return rec
