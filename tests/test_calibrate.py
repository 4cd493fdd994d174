"""Calibration: temperature scaling recovers a known temperature, ECE, threshold search, and real data."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.special import softmax

from raytumor.bundle import BundleMeta
from raytumor.calibrate import (
    T_MAX,
    binary_ece,
    calibrate_bundle_meta,
    expected_calibration_error,
    fit_temperature,
    reliability_bins,
    rescale_probs,
    threshold_for_sensitivity,
)


def _synthetic(n: int = 4000, c: int = 4, scale: float = 3.0, seed: int = 0):
    """True logits, labels drawn from their softmax (so softmax(z) is calibrated), and reported logits."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 1.5, size=(n, c))
    p_true = softmax(z, axis=1)
    labels = (rng.random(n)[:, None] > np.cumsum(p_true, axis=1)).sum(1)
    return z, p_true, labels, z * scale


def _meta(classes: list[str], negative: str | None, threshold: float = 0.5, temperature: float = 1.0):
    return BundleMeta(
        backbone="efficientnet_lite0",
        classes=classes,
        negative_class=negative,
        image_size=96,
        mean=[0.5],
        std=[0.25],
        threshold=threshold,
        temperature=temperature,
    )


# ---------------------------------------------------------------------------------------------------------
# Temperature scaling


@pytest.mark.parametrize("t0", [1.0, 2.0])
def test_fit_temperature_recovers_known_overconfidence(t0):
    _, p_true, labels, raw = _synthetic()
    # The model's raw logits are 3x the true ones; its probabilities were computed at temperature t0.
    reported = softmax(raw / t0, axis=1)
    t = fit_temperature(reported, labels, current_temperature=t0)
    assert abs(t - 3.0) / 3.0 < 0.15
    fixed = rescale_probs(reported, t0, t)
    before, after = expected_calibration_error(reported, labels), expected_calibration_error(fixed, labels)
    assert before > 0.05  # reported at 3/t0 x the true sharpness: over-confident
    assert after < before / 3
    assert after < 0.04
    # Rescaling to the fitted T lands close to the truth itself.
    assert np.abs(fixed - p_true).max() < 0.1


def test_fit_temperature_underconfident_goes_below_one():
    z, _, labels, _ = _synthetic(scale=1.0)
    t = fit_temperature(softmax(z / 2.0, axis=1), labels)  # reported too soft by 2x
    assert 0.5 * 0.85 < t < 0.5 * 1.15


def test_fit_temperature_degenerate_inputs_keep_current():
    z, _, labels, _ = _synthetic(n=200)
    p = softmax(z, axis=1)
    assert fit_temperature(p[:9], labels[:9], current_temperature=1.7) == 1.7  # too few rows
    one = labels == labels[0]
    assert fit_temperature(p[one], labels[one], current_temperature=1.3) == 1.3  # a single class


def test_fit_temperature_is_clamped():
    # Random probabilities with hard 0/1 predictions unrelated to labels: the NLL wants T -> infinity.
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 500)
    p = np.eye(2)[rng.integers(0, 2, 500)]
    assert fit_temperature(p, labels) == pytest.approx(T_MAX, rel=1e-3)


def test_rescale_round_trip_and_safety():
    z, p, _, _ = _synthetic(n=300)
    sharp = rescale_probs(p, 1.0, 0.5)  # twice as sharp; no probability below the 1e-12 floor here
    np.testing.assert_allclose(sharp, softmax(z * 2, axis=1), atol=1e-9)
    np.testing.assert_allclose(rescale_probs(sharp, 0.5, 1.0), p, atol=1e-9)
    np.testing.assert_allclose(rescale_probs(p, 1.0, 1.0), p, atol=1e-12)
    hard = rescale_probs(np.array([[1.0, 0.0], [0.0, 1.0]]), 1.0, 10.0)  # exact zeros: log clipped
    assert np.isfinite(hard).all() and np.allclose(hard.sum(1), 1.0)
    assert 0.5 < hard[0, 0] < 1.0


# ---------------------------------------------------------------------------------------------------------
# Reliability and ECE


def test_ece_small_for_calibrated_and_matches_definition():
    _, p_true, labels, _ = _synthetic(n=20000, seed=3)
    assert expected_calibration_error(p_true, labels) < 0.02
    # Hand-computed: confidences 0.9 (two right) and 0.6 (one right of two), 15 bins.
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.4, 0.6], [0.4, 0.6]])
    labels = np.array([0, 0, 1, 0])
    assert expected_calibration_error(probs, labels) == pytest.approx(0.5 * 0.1 + 0.5 * 0.1)


def test_reliability_bins_edges_and_counts():
    b = reliability_bins(np.array([0.0, 0.1, 0.2, 0.5, 1.0]), np.array([1, 0, 1, 1, 1]), n_bins=5)
    np.testing.assert_allclose(b["edges"], [0, 0.2, 0.4, 0.6, 0.8, 1.0])
    # Right-closed bins: 0.2 falls in (0, 0.2], 0 joins the first bin, 1.0 the last.
    assert b["count"].tolist() == [3, 0, 1, 0, 1]
    assert b["confidence"][0] == pytest.approx(0.1) and b["accuracy"][0] == pytest.approx(2 / 3)
    assert np.isnan(b["accuracy"][1])


def test_binary_ece_is_about_the_tumour_score():
    rng = np.random.default_rng(0)
    s = rng.random(20000)
    y = (rng.random(20000) < s).astype(int)  # P(tumour | s) = s: calibrated
    assert binary_ece(s, y) < 0.02
    assert binary_ece(np.sqrt(s), y) > 0.1  # systematically too high


# ---------------------------------------------------------------------------------------------------------
# Threshold for a target sensitivity


def _sens(y, s, t):
    return float((s[y == 1] >= t).mean())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_threshold_meets_target_and_is_highest(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 301)
    s = np.round(np.clip(rng.normal(0.3 + 0.4 * y, 0.2), 0, 1), 2)  # rounded: plenty of ties
    r = threshold_for_sensitivity(y, s, 0.95)
    t = r["threshold"]
    assert r["reason"] is None and r["n_pos"] == int(y.sum()) and r["n_neg"] == int((y == 0).sum())
    assert r["sensitivity"] == pytest.approx(_sens(y, s, t)) and r["sensitivity"] >= 0.95
    assert r["specificity"] == pytest.approx(float((s[y == 0] < t).mean()))
    higher = np.unique(s[s > t])
    assert len(higher) and _sens(y, s, higher[0]) < 0.95  # the next distinct score drops below target
    assert t in s[y == 1]


def test_threshold_ties_keep_all_tied_positives():
    y = np.array([1, 1, 1, 1, 0, 0])
    s = np.array([0.9, 0.7, 0.7, 0.3, 0.7, 0.1])
    r = threshold_for_sensitivity(y, s, 0.5)  # 2 of 4 needed; the tie at 0.7 brings in 3 (and a negative)
    assert r["threshold"] == 0.7 and r["sensitivity"] == 0.75 and r["specificity"] == 0.5
    assert threshold_for_sensitivity(y, s, 0.25)["threshold"] == 0.9
    exact = threshold_for_sensitivity(np.ones(20, int), np.linspace(0, 1, 20), 0.95)
    assert exact["sensitivity"] == 0.95  # 0.95 * 20 is 19 positives, not 20 by floating-point noise


def test_threshold_one_class_inputs():
    r = threshold_for_sensitivity(np.zeros(5, int), np.array([0.1, 0.2, 0.6, 0.7, 0.8]))
    assert r["threshold"] == 0.5 and r["sensitivity"] is None and r["reason"]
    assert r["specificity"] == pytest.approx(0.4) and r["n_pos"] == 0
    r = threshold_for_sensitivity(np.ones(4, int), np.array([0.2, 0.4, 0.6, 0.8]), 0.75)
    assert r["threshold"] == 0.4 and r["sensitivity"] == 0.75 and r["specificity"] is None
    nan = threshold_for_sensitivity(np.array([1, 1, 0]), np.array([np.nan, 0.5, 0.2]), 1.0)
    assert nan["threshold"] == -1.0  # a NaN score is never positive, so only -1 catches it
    with pytest.raises(ValueError):
        threshold_for_sensitivity(np.ones(3, int), np.ones(3), 0.0)


# ---------------------------------------------------------------------------------------------------------
# Bundle-level record


def test_calibrate_bundle_meta_binary_does_not_mutate():
    z, _, labels, raw = _synthetic(c=2, seed=5)
    meta = _meta(["no_tumor", "tumor"], "no_tumor", threshold=0.5, temperature=1.0)
    rec = calibrate_bundle_meta(meta, softmax(raw, axis=1), labels, target_sensitivity=0.9)
    assert meta.temperature == 1.0 and meta.threshold == 0.5
    assert abs(rec["temperature"] - 3.0) / 3.0 < 0.15
    assert rec["ece_after"] < rec["ece_before"] and rec["binary_ece_after"] < rec["binary_ece_before"]
    assert rec["n"] == len(labels) and rec["target_sensitivity"] == 0.9
    # The threshold found on validation reaches the target there, on the score the predictor will produce.
    new = softmax((raw / rec["temperature"]).astype(np.float32), axis=1).astype(np.float32)
    score = 1.0 - new[:, 0]
    assert rec["val_sensitivity"] >= 0.9 and rec["val_sensitivity"] == pytest.approx(
        _sens(labels, score, rec["threshold"]), abs=2 / labels.sum()
    )
    assert set(rec) >= {"temperature", "threshold", "val_specificity", "ece_before", "ece_after"}


def test_calibrate_bundle_meta_multiclass_without_negative_keeps_threshold():
    _, _, labels, raw = _synthetic(c=3, seed=6)
    meta = _meta(["glioma", "meningioma", "pituitary"], None, threshold=0.42, temperature=2.0)
    rec = calibrate_bundle_meta(meta, softmax(raw / 2.0, axis=1), labels)
    assert rec["threshold"] == 0.42 and rec["val_sensitivity"] is None
    assert abs(rec["temperature"] - 3.0) / 3.0 < 0.15 and rec["ece_after"] < rec["ece_before"]


# ---------------------------------------------------------------------------------------------------------
# Real data: navoneel-253 (no 98, yes 155) with ImageNet EfficientNet-Lite0 features


@pytest.fixture(scope="module")
def navoneel_features(navoneel: Path):
    from raytumor.formats import decode_image, fit_square
    from raytumor.model import create_model

    images, labels, groups = [], [], []
    for label, cls in enumerate(["no", "yes"]):
        for f in sorted((navoneel / cls).iterdir()):
            data = f.read_bytes()
            images.append(fit_square(decode_image(data, draft_size=96).pixels, 96))
            labels.append(label)
            groups.append(hashlib.sha256(data).hexdigest())
    assert labels.count(0) == 98 and labels.count(1) == 155
    model = create_model("efficientnet_lite0", 2, weights="imagenet", dropout=0.0).eval()
    with torch.no_grad():
        feats = model.forward_features(torch.from_numpy(np.stack(images))).double().numpy()
    return feats, np.array(labels), np.unique(groups, return_inverse=True)[1]


def _overconfident_split(feats, labels, groups, seed):
    """Group-wise halves (exact duplicates never straddle), an over-confident head on the first half."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(groups.max() + 1)
    n = len(order)
    part = np.empty(n, dtype=np.int64)
    part[order[: n // 2]], part[order[n // 2 : 3 * n // 4]], part[order[3 * n // 4 :]] = 0, 1, 2
    part = part[groups]
    train = part == 0
    x = torch.from_numpy((feats - feats[train].mean(0)) / (feats[train].std(0) + 1e-6))
    y = torch.from_numpy(labels)
    torch.manual_seed(seed)
    head = torch.nn.Linear(x.shape[1], 2).double()
    # Unregularised logistic regression, large steps, far past separation: logits grow to tens, so the
    # probabilities on unseen scans are 0/1 while the head is right only ~3 times in 4.
    opt = torch.optim.Adam(head.parameters(), lr=0.1)
    for _ in range(300):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(head(x[train]), y[train]).backward()
        opt.step()
    with torch.no_grad():
        probs = torch.softmax(head(x).float(), 1).double().numpy()  # float32 softmax, as the predictor
    return probs, part


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_calibration_lowers_ece_on_held_out_real_split(navoneel_features, seed):
    feats, labels, groups = navoneel_features
    probs, part = _overconfident_split(feats, labels, groups, seed)
    cal, held = part == 1, part == 2
    for a in (0, 1):  # the split is by duplicate group
        assert not set(groups[part == a]) & set(groups[part == a + 1])
    t = fit_temperature(probs[cal], labels[cal])
    assert t > 1.0
    before = expected_calibration_error(probs[held], labels[held])
    after = expected_calibration_error(rescale_probs(probs[held], 1.0, t), labels[held])
    assert after < 0.75 * before, (t, before, after)  # seeds 0..9 all give after/before <= 0.57
    # Bundle-level: the threshold picked on the calibration half reaches the target there.
    meta = _meta(["no", "yes"], "no")
    rec = calibrate_bundle_meta(meta, probs[cal], labels[cal], target_sensitivity=0.95)
    assert rec["temperature"] == pytest.approx(t) and rec["ece_after"] < rec["ece_before"]
    score = 1.0 - rescale_probs(probs[cal], 1.0, t).astype(np.float32)[:, 0]
    assert rec["val_sensitivity"] >= 0.95
    assert _sens(labels[cal], score, rec["threshold"]) >= 0.95
    assert math.isfinite(rec["val_specificity"])
