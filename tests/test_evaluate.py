"""Metrics and bootstrap CIs: point estimates from torchmetrics, vectorised bootstrap agrees with them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchmetrics.functional as tmf

from raytumor.evaluate import _binary_vectorised, bootstrap_ci, compute_metrics, format_table

CLASSES = ["no", "yes"]


def _probs(score: np.ndarray) -> np.ndarray:
    return np.stack([1 - score, score], 1).astype(np.float32)


def test_binary_metrics_by_hand():
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 1])
    s = np.array([0.1, 0.2, 0.6, 0.3, 0.9, 0.8, 0.4, 0.7, 0.95, 0.55])
    m = compute_metrics(y, _probs(s), CLASSES, "no", threshold=0.5)
    # TP: 0.9 0.8 0.7 0.95 0.55 = 5, FN: 0.4 = 1, FP: 0.6 = 1, TN = 3
    assert m["confusion_matrix"] == [[3, 1], [1, 5]]
    assert m["sensitivity"] == pytest.approx(5 / 6)
    assert m["specificity"] == pytest.approx(3 / 4)
    assert m["accuracy"] == pytest.approx(0.8)
    assert m["ppv"] == pytest.approx(5 / 6) and m["npv"] == pytest.approx(3 / 4)
    assert m["f1"] == pytest.approx(2 * 5 / (2 * 5 + 1 + 1))
    # AUC by counting concordant pairs
    pos, neg = s[y == 1], s[y == 0]
    auc = np.mean([(p > q) + 0.5 * (p == q) for p in pos for q in neg])
    assert m["roc_auc"] == pytest.approx(auc)
    # the threshold moves the operating point, not the AUC
    m2 = compute_metrics(y, _probs(s), CLASSES, "no", threshold=0.65)
    assert m2["specificity"] == 1.0 and m2["roc_auc"] == pytest.approx(auc)


def test_negative_class_first_or_second():
    y = np.array([0, 1, 1, 0])
    p = np.array([[0.9, 0.1], [0.2, 0.8], [0.3, 0.7], [0.6, 0.4]], dtype=np.float32)
    a = compute_metrics(y, p, ["no", "yes"], "no")
    # same data with the class order swapped: label 1 is now the negative class
    b = compute_metrics(1 - y, p[:, ::-1].copy(), ["yes", "no"], "no")
    for k in ("accuracy", "roc_auc", "sensitivity", "specificity"):
        assert a[k] == pytest.approx(b[k])


def test_vectorised_matches_torchmetrics_with_ties():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    s = np.round(np.clip(y * 0.3 + rng.normal(0.4, 0.25, 300), 0, 1), 2)  # rounding makes ties
    v = _binary_vectorised(y[None], s[None], 0.5)
    assert v["roc_auc"][0] == pytest.approx(
        float(tmf.auroc(torch.tensor(s), torch.tensor(y), task="binary")), abs=1e-6
    )
    m = compute_metrics(y, _probs(s), CLASSES, "no")
    for k in ("accuracy", "sensitivity", "specificity", "f1"):
        assert v[k][0] == pytest.approx(m[k], abs=1e-6)


def test_bootstrap_ci_brackets_and_shrinks():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 2000)
    s = np.clip(y * 0.35 + rng.normal(0.35, 0.2, 2000), 0, 1)
    m = compute_metrics(y, _probs(s), CLASSES, "no")
    ci = bootstrap_ci(y, _probs(s), CLASSES, "no", n_boot=500, seed=0)
    small = bootstrap_ci(y[:100], _probs(s[:100]), CLASSES, "no", n_boot=500, seed=0)
    for k in ("accuracy", "roc_auc", "sensitivity", "specificity", "f1"):
        lo, hi = ci[k]
        assert lo <= m[k] <= hi
        assert (hi - lo) < (small[k][1] - small[k][0])  # 20x the data, narrower interval
    assert bootstrap_ci(y, _probs(s), CLASSES, "no", n_boot=200, seed=3) == bootstrap_ci(
        y, _probs(s), CLASSES, "no", n_boot=200, seed=3
    )


def test_cluster_bootstrap_counts_duplicate_groups_once():
    """100 scans each copied 10x: resampling scans would claim 1000 independent cases; resampling the
    duplicate groups gives the interval of the 100 distinct scans."""
    rng = np.random.default_rng(2)
    y0 = rng.integers(0, 2, 100)
    s0 = np.clip(y0 * 0.35 + rng.normal(0.35, 0.2, 100), 0, 1)
    y, s, groups = np.repeat(y0, 10), np.repeat(s0, 10), np.repeat(np.arange(100), 10)
    naive = bootstrap_ci(y, _probs(s), CLASSES, "no", n_boot=400, seed=0)
    grouped = bootstrap_ci(y, _probs(s), CLASSES, "no", n_boot=400, seed=0, groups=groups)
    distinct = bootstrap_ci(y0, _probs(s0), CLASSES, "no", n_boot=400, seed=0)
    m = compute_metrics(y, _probs(s), CLASSES, "no")
    for k in ("accuracy", "roc_auc", "sensitivity", "specificity"):
        w_naive, w_grouped = np.diff(naive[k])[0], np.diff(grouped[k])[0]
        w_distinct = np.diff(distinct[k])[0]
        assert w_grouped > 2 * w_naive
        assert w_grouped == pytest.approx(w_distinct, rel=0.35)
        assert grouped[k][0] <= m[k] <= grouped[k][1]


def test_multiclass_metrics():
    classes = ["glioma", "meningioma", "notumor"]
    y = np.array([0, 1, 2, 2, 1, 0])
    p = np.array(
        [
            [0.8, 0.1, 0.1],
            [0.2, 0.7, 0.1],
            [0.1, 0.1, 0.8],
            [0.5, 0.1, 0.4],
            [0.1, 0.8, 0.1],
            [0.6, 0.3, 0.1],
        ],
        dtype=np.float32,
    )
    m = compute_metrics(y, p, classes, "notumor")
    assert m["mc_accuracy"] == pytest.approx(5 / 6)
    assert m["mc_confusion_matrix"][2] == [1, 0, 1]
    # tumour-vs-none: score = 1 - P(notumor); one notumor scan called tumour at 0.5
    assert m["specificity"] == pytest.approx(0.5) and m["sensitivity"] == 1.0
    assert "accuracy" in format_table(m)


def test_single_class_sets_do_not_crash():
    y = np.zeros(5, dtype=int)
    m = compute_metrics(y, _probs(np.array([0.1, 0.2, 0.7, 0.3, 0.1])), CLASSES, "no")
    assert m["roc_auc"] is None and m["sensitivity"] is None and m["specificity"] == pytest.approx(0.8)
