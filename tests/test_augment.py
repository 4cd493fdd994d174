"""Tests for raytumor.augment: Ray-Data-style numpy batches in, uint8 (B, size, size) out."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from raytumor.augment import (
    AugmentConfig,
    adjust_brightness,
    adjust_contrast,
    adjust_gamma,
    augment_batch,
    eval_batch,
    store_size,
)

SIZE = 64
S = store_size(SIZE)


# One intra-op thread (see conftest.one_torch_thread).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


# Every op off: tests switch on one at a time.
NOTHING = dict(
    scale=(1.0, 1.0),
    ratio=(1.0, 1.0),
    hflip=0.0,
    vflip=0.0,
    rotate_deg=0.0,
    translate=0.0,
    brightness=0.0,
    contrast=0.0,
    gamma=(1.0, 1.0),
    noise_std=0.0,
    bias_field=0.0,
)


def _batch(b: int = 6, side: int = S, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    # Smooth-ish content plus texture, like an MRI slice on black background.
    yy, xx = np.mgrid[:side, :side] / side
    base = 200 * np.exp(-((xx - 0.5) ** 2 + (yy - 0.5) ** 2) / 0.08)
    imgs = np.clip(base[None] + rng.normal(0, 20, (b, side, side)), 0, 255).astype(np.uint8)
    return {
        "image": imgs,
        "label": np.arange(b, dtype=np.int64) % 2,
        "path": np.array([f"img_{i}.png" for i in range(b)], dtype=object),
    }


def _plain_resize(images: np.ndarray, size: int) -> np.ndarray:
    t = torch.from_numpy(images).unsqueeze(1)
    out = TF.resize(t, [size, size], interpolation=InterpolationMode.BILINEAR, antialias=True)
    return out.squeeze(1).numpy()


def test_store_size():
    assert store_size(160) == 184
    for size in (32, 64, 96, 128, 160, 224, 256):
        s = store_size(size)
        assert s % 8 == 0 and s >= size
        assert abs(s - 1.15 * size) <= 4


def test_shapes_dtypes_and_passthrough():
    batch = _batch()
    out = augment_batch(batch, image_size=SIZE)
    assert out["image"].shape == (6, SIZE, SIZE) and out["image"].dtype == np.uint8
    assert out["label"] is batch["label"] and out["path"] is batch["path"]
    assert batch["image"].shape == (6, S, S)  # input not modified in place
    ev = eval_batch(batch, image_size=SIZE)
    assert ev["image"].shape == (6, SIZE, SIZE) and ev["image"].dtype == np.uint8
    assert ev["label"] is batch["label"] and ev["path"] is batch["path"]
    # a list of 2-D arrays (Ray may hand over object columns) works too
    listed = augment_batch({"image": list(batch["image"])}, image_size=SIZE, seed=0)
    assert np.array_equal(listed["image"], augment_batch(batch, image_size=SIZE, seed=0)["image"])
    with pytest.raises(ValueError, match="uint8"):
        augment_batch({"image": batch["image"].astype(np.float32)}, image_size=SIZE)


def test_read_only_input_arrays():
    # Ray Data hands zero-copy (read-only) numpy views of Arrow buffers to map_batches.
    batch = _batch()
    batch["image"].flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = augment_batch(batch, image_size=SIZE, seed=0)["image"]
        ev = eval_batch(batch, image_size=SIZE)["image"]
    assert out.shape == ev.shape == (6, SIZE, SIZE)


def test_strength_zero_is_plain_resize():
    batch = _batch()
    out = augment_batch(batch, image_size=SIZE, config={"strength": 0.0})
    assert np.array_equal(out["image"], _plain_resize(batch["image"], SIZE))
    # and it is the same as the eval path
    assert np.array_equal(out["image"], eval_batch(batch, image_size=SIZE)["image"])


def test_fresh_randomness_and_seed_reproducibility():
    batch = _batch()
    a = augment_batch(batch, image_size=SIZE)["image"]
    b = augment_batch(batch, image_size=SIZE)["image"]
    assert not np.array_equal(a, b)
    s1 = augment_batch(batch, image_size=SIZE, seed=123)["image"]
    s2 = augment_batch(batch, image_size=SIZE, seed=123)["image"]
    s3 = augment_batch(batch, image_size=SIZE, seed=124)["image"]
    assert np.array_equal(s1, s2) and not np.array_equal(s1, s3)
    # samples in one batch get different parameters
    same = {"image": np.repeat(batch["image"][:1], 4, axis=0)}
    outs = augment_batch(same, image_size=SIZE, seed=5)["image"]
    assert len({o.tobytes() for o in outs}) == 4


def test_flips_really_flip():
    img = np.zeros((SIZE, SIZE), np.uint8)
    img[8:20, 4:30] = 255  # asymmetric in both axes
    img[40:60, 50:54] = 100
    batch = {"image": np.stack([img, img])}
    h = augment_batch(batch, image_size=SIZE, config={**NOTHING, "hflip": 1.0}, seed=0)["image"]
    v = augment_batch(batch, image_size=SIZE, config={**NOTHING, "vflip": 1.0}, seed=0)["image"]
    for i in range(2):
        assert np.array_equal(h[i], img[:, ::-1])
        assert np.array_equal(v[i], img[::-1, :])
    # from the larger store size too: bright block moves from the left to the right half
    left = np.zeros((S, S), np.uint8)
    left[:, : S // 3] = 200
    out = augment_batch({"image": left[None]}, image_size=SIZE, config={**NOTHING, "hflip": 1.0})["image"][0]
    assert out[:, -SIZE // 4 :].mean() > 190 and out[:, : SIZE // 2].mean() < 5


def test_geometry_moves_content_but_keeps_it_centred_on_average():
    img = np.zeros((S, S), np.uint8)
    img[S // 2 - 6 : S // 2 + 6, S // 2 - 6 : S // 2 + 6] = 255  # centred square
    batch = {"image": np.repeat(img[None], 16, axis=0)}
    cfg = {**NOTHING, "scale": (0.6, 1.0), "ratio": (0.8, 1.25), "rotate_deg": 20.0, "translate": 0.1}
    out = augment_batch(batch, image_size=SIZE, config=cfg, seed=3)["image"].astype(float)
    ys, xs = np.mgrid[:SIZE, :SIZE]
    cy = (out * ys).sum((1, 2)) / out.sum((1, 2))
    cx = (out * xs).sum((1, 2)) / out.sum((1, 2))
    assert np.ptp(cx) > 1 and np.ptp(cy) > 1  # content moved per sample
    assert np.all(np.abs(cx - SIZE / 2 + 0.5) < SIZE / 4) and np.all(np.abs(cy - SIZE / 2 + 0.5) < SIZE / 4)


def test_bias_field_is_smooth_and_bounded():
    amp = 0.3
    flat = np.full((8, S, S), 128, np.uint8)
    cfg = {**NOTHING, "bias_field": amp, "p_bias": 1.0}
    out = augment_batch({"image": flat}, image_size=SIZE, config=cfg, seed=0)["image"].astype(float)
    assert np.all(np.abs(out - 128) <= amp * 128 + 1)
    assert np.ptp(out, axis=(1, 2)).max() > 10  # intensity really varies ...
    assert np.abs(np.diff(out, axis=1)).max() <= 3  # ... but only at low frequency
    assert np.abs(np.diff(out, axis=2)).max() <= 3
    # image means stay within the configured amplitude on textured images
    batch = _batch(8)
    base = augment_batch(batch, image_size=SIZE, config=NOTHING)["image"].astype(float)
    biased = augment_batch(batch, image_size=SIZE, config=cfg, seed=1)["image"].astype(float)
    assert not np.array_equal(base, biased)
    m0, m1 = base.mean((1, 2)), biased.mean((1, 2))
    assert np.all(np.abs(m1 - m0) <= amp * m0 + 1)


def test_noise_is_zero_mean_and_bounded():
    flat = np.full((4, SIZE, SIZE), 128, np.uint8)
    cfg = {**NOTHING, "noise_std": 0.05, "p_noise": 1.0}
    out = augment_batch({"image": flat}, image_size=SIZE, config=cfg, seed=0)["image"].astype(float)
    assert np.all(np.abs(out.mean((1, 2)) - 128) < 1.5)
    stds = out.std((1, 2))
    assert stds.max() > 1 and stds.max() <= 0.05 * 255 * 1.1


def test_photometric_ops_match_torchvision():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 1, 16, 16, generator=g)  # float images in 0..1
    factors = torch.tensor([0.7, 1.0, 1.3]).view(3, 1, 1, 1)
    for ours, theirs in (
        (adjust_brightness, TF.adjust_brightness),
        (adjust_contrast, TF.adjust_contrast),
        (adjust_gamma, TF.adjust_gamma),
    ):
        got = ours(x * 255, factors) / 255
        for i in range(3):
            want = theirs(x[i], float(factors[i]))
            torch.testing.assert_close(got[i], want, atol=1e-5, rtol=1e-5)


def test_photometric_defaults_change_intensity_only_modestly():
    batch = _batch(16)
    cfg = {**NOTHING, "brightness": 0.2, "contrast": 0.2, "gamma": (0.8, 1.25)}
    base = augment_batch(batch, image_size=SIZE, config=NOTHING)["image"].astype(float)
    out = augment_batch(batch, image_size=SIZE, config=cfg, seed=0)["image"].astype(float)
    corr = [np.corrcoef(a.ravel(), b.ravel())[0, 1] for a, b in zip(base, out, strict=True)]
    assert min(corr) > 0.95  # same geometry, monotone intensity changes
    assert np.abs(out.mean((1, 2)) - base.mean((1, 2))).max() > 1


def test_eval_batch_is_deterministic_resize():
    batch = _batch(3, side=SIZE)
    out = eval_batch(batch, image_size=SIZE)
    assert np.array_equal(out["image"], batch["image"])  # already at size: untouched
    big = _batch(3, side=S)
    assert np.array_equal(eval_batch(big, image_size=SIZE)["image"], _plain_resize(big["image"], SIZE))
    # non-square: zero-padded to a square (aspect kept), then resized
    rect = {"image": np.full((2, 40, 80), 200, np.uint8)}
    r = eval_batch(rect, image_size=SIZE)["image"]
    assert r.shape == (2, SIZE, SIZE)
    assert r[:, 0].max() == 0 and r[:, SIZE // 2].min() == 200


def test_config_round_trip_and_validation():
    cfg = AugmentConfig(strength=0.5, scale=(0.6, 1.0))
    d = cfg.to_dict()
    assert d["strength"] == 0.5 and d["scale"] == (0.6, 1.0)
    # JSON/YAML/Tune hand tuples back as lists
    again = AugmentConfig.from_dict({**d, "scale": [0.6, 1.0], "gamma": [0.9, 1.1]})
    assert again.scale == (0.6, 1.0) and again.gamma == (0.9, 1.1)
    assert AugmentConfig.from_dict(AugmentConfig().to_dict()) == AugmentConfig()
    with pytest.raises(ValueError, match="unknown"):
        AugmentConfig.from_dict({"strenght": 1.0})
    with pytest.raises(ValueError):
        AugmentConfig(hflip=1.5)
    with pytest.raises(ValueError):
        AugmentConfig(scale=(0.5, 1.2))
    # AugmentConfig instances, dicts and None are all accepted
    batch = _batch(2)
    a = augment_batch(batch, image_size=SIZE, config=AugmentConfig(strength=0.3), seed=9)["image"]
    b = augment_batch(batch, image_size=SIZE, config={"strength": 0.3}, seed=9)["image"]
    assert np.array_equal(a, b)
