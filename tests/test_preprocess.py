"""Tests for raytumor.preprocess: head mask, crop to head, intensity standardisation, config.

Real-data tests use ~40 slices from each shared source (br35h-3000, navoneel-253, ixi-t1-nichart-42) and
skip with a reason when ../shared/data is absent. No Ray, no timing assertions.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from raytumor.formats import decode_image, fit_square
from raytumor.preprocess import (
    Z_RANGE,
    PreprocessConfig,
    apply,
    crop_to_head,
    head_mask,
    mask_is_plausible,
    parse_spec,
    spec_of,
    standardise_intensity,
    to_model_input,
)

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
N_PER_SOURCE = 40
SOURCES = {
    "br35h": ("br35h-3000", "*/*.jpg"),
    "navoneel": ("navoneel-253", "*/*"),
    "ixi": ("ixi-t1-nichart-42", "no_tumor/*.png"),
}
_cache: dict[str, list[tuple[str, np.ndarray]]] = {}


def real_slices(source: str) -> list[tuple[str, np.ndarray]]:
    """~40 decoded slices spread evenly over the sorted file list (deterministic); skip if absent."""
    if source not in _cache:
        folder, pattern = SOURCES[source]
        root = SHARED / folder
        if not root.is_dir():
            pytest.skip(f"real data {root} is absent (expected ../shared/data/{folder} beside the repo)")
        files = sorted(p for p in root.glob(pattern) if p.is_file() and p.suffix.lower() != ".md")
        if len(files) < N_PER_SOURCE:
            pytest.skip(f"only {len(files)} files under {root}, need {N_PER_SOURCE}")
        step = len(files) / N_PER_SOURCE
        picked = [files[int(i * step)] for i in range(N_PER_SOURCE)]
        _cache[source] = [(p.name, decode_image(p.read_bytes()).pixels) for p in picked]
    return _cache[source]


def coverage(mask: np.ndarray) -> float:
    return float(mask.mean())


def square_fraction(mask: np.ndarray, size: int = 128) -> float:
    """Share of the model's square input frame covered by the head (after fit_square's zero padding)."""
    return float((fit_square(mask.astype(np.uint8) * 255, size) > 127).mean())


# ----------------------------------------------------------------------------------------------------
# Synthetic phantoms


def phantom(size: int = 256, seed: int = 0, noise: float = 4.0, scale: float = 1.0) -> np.ndarray:
    """An axial-slice-like head: bright scalp ring, dark skull gap, textured brain, noisy black background."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:size, :size].astype(np.float64)
    cy, cx, ry, rx = size / 2, size / 2, 0.36 * size, 0.30 * size
    r = np.sqrt(((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2)
    img = np.zeros((size, size))
    img[r <= 1.0] = 180  # scalp
    img[r <= 0.94] = 25  # skull (dark on T1)
    brain = r <= 0.90
    img[brain] = 110 + 25 * np.sin(x[brain] / 5.0) * np.cos(y[brain] / 7.0)
    img[(r <= 0.25)] = 60  # ventricles
    img = img * scale + rng.normal(0, noise, img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def head_box(size: int = 256) -> tuple[int, int, int, int]:
    cy, cx, ry, rx = size / 2, size / 2, 0.36 * size, 0.30 * size
    return int(cy - ry), int(np.ceil(cy + ry)), int(cx - rx), int(np.ceil(cx + rx))


def burn_text(img: np.ndarray, xy: tuple[int, int], text: str) -> np.ndarray:
    pil = Image.fromarray(img)
    ImageDraw.Draw(pil).text(xy, text, fill=255)
    return np.array(pil)


# ----------------------------------------------------------------------------------------------------
# head_mask / crop_to_head on synthetic cases


def test_mask_ignores_corner_text_and_white_frame() -> None:
    img = phantom()
    img = burn_text(img, (4, 4), "SE:4 IM:18")
    img = burn_text(img, (190, 236), "512x512 R")
    img = burn_text(img, (200, 6), "TR 5800")
    img[:3, :] = img[-3:, :] = 255  # 3-pixel white frame
    img[:, :3] = img[:, -3:] = 255
    mask = head_mask(img)
    y0, y1, x0, x1 = head_box()
    assert mask.dtype == bool and mask.shape == img.shape
    assert 0.2 < coverage(mask) < 0.5
    assert not mask[:3].any() and not mask[-3:].any() and not mask[:, :3].any() and not mask[:, -3:].any()
    _, (by0, by1, bx0, bx1) = crop_to_head(img, margin=0.0)
    # The box is the head's, within a few pixels; the corner text lies outside it.
    assert abs(by0 - y0) <= 4 and abs(by1 - y1) <= 4 and abs(bx0 - x0) <= 4 and abs(bx1 - x1) <= 4
    assert by0 > 16 and by1 < 236  # text rows: 4..16 (top corners) and 236..248 (bottom right)
    # Standardised output: the text and the frame are background (0).
    out = standardise_intensity(img, mask)
    assert out[:20, :80].max() == 0 and out[-20:, 180:].max() == 0 and out[:3].max() == 0


def test_mask_ignores_annotation_bar_and_jpeg_noise() -> None:
    img = phantom(noise=6.0)
    img[236:250, 10:246] = 140  # scanner annotation bar below the head, with text on it
    img = burn_text(img, (20, 238), "W 953 : L 437")
    mask = head_mask(img)
    assert not mask[236:250].any()
    assert 0.2 < coverage(mask) < 0.5


def test_mask_tightly_cropped_head_touching_border() -> None:
    img = phantom()[40:216, 70:186]  # the head fills the frame and touches all four borders
    mask = head_mask(img)
    assert 0.6 < coverage(mask) <= 0.98
    assert mask[0].any() and mask[-1].any() and mask[:, 0].any() and mask[:, -1].any()
    crop, box = crop_to_head(img)
    assert box[0] == 0 and box[2] == 0 and crop.shape[0] >= img.shape[0] - 2


def test_mask_low_contrast_flair_like() -> None:
    img = phantom(scale=0.25, noise=2.0)  # head grey levels ~6..45 over a 0..8 noise floor
    mask = head_mask(img)
    y0, y1, x0, x1 = head_box()
    ellipse_area = np.pi * (y1 - y0) * (x1 - x0) / 4
    assert abs(mask.sum() / ellipse_area - 1) < 0.1


@pytest.mark.parametrize("value", [0, 1, 128, 255])
def test_constant_image_gives_empty_mask_and_identity_crop(value: int) -> None:
    img = np.full((64, 80), value, dtype=np.uint8)
    mask = head_mask(img)
    assert mask.shape == img.shape and not mask.any()  # documented: all False, never all True
    crop, box = crop_to_head(img)
    assert box == (0, 64, 0, 80) and np.array_equal(crop, img)
    np.testing.assert_array_equal(apply(img, PreprocessConfig(crop=True)), img)
    out = apply(img, PreprocessConfig(crop=True, standardise=True))
    assert out.shape == img.shape and out.dtype == np.uint8 and not out.any()


def test_tiny_and_noise_only_images() -> None:
    assert not head_mask(np.zeros((1, 1), dtype=np.uint8)).any()
    noise = np.random.default_rng(1).integers(0, 6, (200, 300)).astype(np.uint8)  # empty JPEG background
    assert not head_mask(noise).any()
    with pytest.raises(TypeError):
        head_mask(np.zeros((8, 8), dtype=np.float32))
    with pytest.raises(ValueError):
        head_mask(np.zeros((0, 8), dtype=np.uint8))


def test_implausible_mask_leaves_image_unchanged() -> None:
    img = phantom()
    small = np.zeros(img.shape, dtype=bool)
    small[:5, :5] = True  # < 5 % coverage
    crop, box = crop_to_head(img, mask=small)
    assert crop is img and box == (0, 256, 0, 256)
    assert not mask_is_plausible(np.ones(img.shape, dtype=bool))


def test_crop_margin_and_large_input_downscaled() -> None:
    big = np.array(Image.fromarray(phantom(size=256)).resize((1024, 1024), Image.Resampling.BILINEAR))
    y0, y1, x0, x1 = (4 * v for v in head_box())
    _, (by0, by1, bx0, bx1) = crop_to_head(big, margin=0.0)
    assert abs(by0 - y0) <= 12 and abs(by1 - y1) <= 12 and abs(bx0 - x0) <= 12 and abs(bx1 - x1) <= 12
    crop, (my0, my1, mx0, mx1) = crop_to_head(big, margin=0.05)
    pad = round(0.05 * max(by1 - by0, bx1 - bx0))
    assert (my0, my1, mx0, mx1) == (by0 - pad, by1 + pad, bx0 - pad, bx1 + pad)
    assert crop.shape == (my1 - my0, mx1 - mx0)


# ----------------------------------------------------------------------------------------------------
# Real slices


@pytest.mark.parametrize("source", list(SOURCES))
def test_real_masks_plausible_and_box_contains_mask(source: str) -> None:
    for name, g in real_slices(source):
        mask = head_mask(g)
        cov = coverage(mask)
        assert 0.10 <= cov <= 0.97, f"{source}/{name}: coverage {cov:.3f}"
        crop, (y0, y1, x0, x1) = crop_to_head(g)
        inside = mask[y0:y1, x0:x1].sum() / mask.sum()
        assert inside >= 0.97, f"{source}/{name}: box holds {inside:.3f} of the mask"
        assert crop.shape == (y1 - y0, x1 - x0)


def black_border(g: np.ndarray, frac: float = 0.10) -> bool:
    """A visible black border: some whole side strip of ``frac`` of the image holds no tissue
    (99th percentile below grey level 40, so JPEG noise and a few label pixels do not count)."""
    h, w = g.shape
    k, j = max(1, int(frac * h)), max(1, int(frac * w))
    return any(float(np.percentile(s, 99)) < 40 for s in (g[:k], g[-k:], g[:, :j], g[:, -j:]))


@pytest.mark.parametrize("source", list(SOURCES))
def test_real_crop_shrinks_images_with_black_border(source: str) -> None:
    bordered = [(n, g) for n, g in real_slices(source) if black_border(g)]
    assert len(bordered) >= 10, f"{source}: only {len(bordered)} slices with a black border"
    for name, g in bordered:
        crop, _ = crop_to_head(g)
        # A 10 % black strip minus the 5 % (of head size) margin: at least ~3 % of the area goes.
        assert crop.size < 0.97 * g.size, f"{source}/{name}: crop {crop.shape} vs {g.shape}"


def source_stats(cfg: PreprocessConfig | None) -> dict[str, tuple[float, float]]:
    """Per source: mean head share of the square model frame, mean fraction of zero pixels in it."""
    stats = {}
    for source in SOURCES:
        heads, zeros = [], []
        for _, g in real_slices(source):
            mask = head_mask(g)
            out = g
            if cfg is not None:
                out = apply(g, cfg)
                _, (y0, y1, x0, x1) = crop_to_head(g, cfg.margin, mask=mask)
                mask = mask[y0:y1, x0:x1]
            heads.append(square_fraction(mask))
            zeros.append(float((fit_square(out, 128) == 0).mean()))
        stats[source] = (float(np.mean(heads)), float(np.mean(zeros)))
    return stats


def test_real_sources_converge_after_apply() -> None:
    before = source_stats(None)
    after = source_stats(PreprocessConfig(crop=True, standardise=True))
    for s in SOURCES:
        print(
            f"{s:9s} head share {before[s][0]:.3f} -> {after[s][0]:.3f}   "
            f"zero fraction {before[s][1]:.3f} -> {after[s][1]:.3f}"
        )

    def spread(st: dict[str, tuple[float, float]], i: int) -> float:
        vals = [v[i] for v in st.values()]
        return max(vals) - min(vals)

    # The head's share of the square frame and the zero (background/padding) fraction become similar
    # across sources: the spread between source means at least halves, and ends up small.
    for i in (0, 1):
        assert spread(after, i) < 0.5 * spread(before, i)
        assert spread(after, i) < 0.08
    for s in SOURCES:
        assert 0.45 < after[s][0] < 0.8


@pytest.mark.parametrize("source", list(SOURCES))
def test_real_standardisation_invariant_to_gamma_contrast_offset(source: str) -> None:
    rs, mads = [], []
    for name, g in real_slices(source)[:10]:
        x = g.astype(np.float64) / 255.0
        other = np.clip(np.rint(255.0 * (0.6 * x**1.3) + 40.0), 0, 255).astype(np.uint8)
        mask = head_mask(g)
        a = standardise_intensity(g, mask).astype(np.float64)
        b = standardise_intensity(other, mask).astype(np.float64)
        assert a[~mask].max(initial=0) == 0 and b[~mask].max(initial=0) == 0
        raw_mad = np.abs(other.astype(np.float64) - g)[mask].mean()
        rs.append(np.corrcoef(a[mask], b[mask])[0, 1])
        mads.append(np.abs(a[mask] - b[mask]).mean())
        # Not trivially satisfied: the raw pair differs far more than the standardised one.
        assert mads[-1] < 0.5 * raw_mad, f"{source}/{name}: {mads[-1]:.1f} vs raw {raw_mad:.1f}"
    assert min(rs) > 0.95, rs
    assert max(mads) < 15.0, mads  # grey levels, out of an in-head std of ~42 (127.5 / Z_RANGE)


# ----------------------------------------------------------------------------------------------------
# standardise_intensity


def test_standardise_background_zero_and_gain_offset_invariance() -> None:
    img = phantom()
    mask = head_mask(img)
    shifted = np.clip(img.astype(np.int32) // 2 + 60, 0, 255).astype(np.uint8)
    a, b = standardise_intensity(img, mask), standardise_intensity(shifted, mask)
    assert a.dtype == np.uint8 and a.shape == img.shape
    assert not a[~mask].any() and not b[~mask].any()
    assert np.abs(a[mask].astype(int) - b[mask].astype(int)).mean() < 2.0
    inside = a[mask].astype(np.float64)
    # Winsorised mean -> 127.5 and one std -> 127.5 / Z_RANGE grey levels (clipping shifts both a little).
    assert abs(inside.mean() - 127.5) < 8
    assert abs(inside.std() - 127.5 / Z_RANGE) < 6


def test_standardise_whole_image_and_edge_cases() -> None:
    img = phantom()
    out = standardise_intensity(img)  # no mask: statistics over the whole image, nothing zeroed by mask
    assert out.dtype == np.uint8 and out.shape == img.shape
    assert not standardise_intensity(img, np.zeros(img.shape, dtype=bool)).any()
    assert not standardise_intensity(np.full((10, 10), 77, np.uint8)).any()
    with pytest.raises(ValueError):
        standardise_intensity(img, low=50, high=10)
    with pytest.raises(ValueError):
        standardise_intensity(img, np.ones((3, 3), dtype=bool))


# ----------------------------------------------------------------------------------------------------
# PreprocessConfig / apply


def test_config_off_is_identity() -> None:
    img = phantom()
    cfg = PreprocessConfig()
    assert not cfg.enabled
    assert apply(img, cfg) is img
    assert apply(img, PreprocessConfig(crop=False, standardise=False, margin=0.3, low=5, high=90)) is img


def test_config_round_trip_and_validation() -> None:
    cfg = PreprocessConfig(crop=True, margin=0.1, standardise=True, low=0.5, high=99.5)
    d = cfg.to_dict()
    assert d == {"crop": True, "margin": 0.1, "standardise": True, "low": 0.5, "high": 99.5}
    assert PreprocessConfig.from_dict(d) == cfg
    assert PreprocessConfig.from_dict(None) == PreprocessConfig()
    assert PreprocessConfig.from_dict({"crop": True}) == PreprocessConfig(crop=True)
    with pytest.raises(ValueError):
        PreprocessConfig.from_dict({"crop": True, "marign": 0.1})
    with pytest.raises(ValueError):
        PreprocessConfig(margin=-0.1)
    with pytest.raises(ValueError):
        PreprocessConfig(low=99, high=1)


def test_apply_runs_steps_in_order() -> None:
    img = phantom()
    img = burn_text(img, (4, 4), "L")
    mask = head_mask(img)
    crop, (y0, y1, x0, x1) = crop_to_head(img, 0.05, mask=mask)
    only_crop = apply(img, PreprocessConfig(crop=True))
    np.testing.assert_array_equal(only_crop, crop)
    only_std = apply(img, PreprocessConfig(standardise=True))
    np.testing.assert_array_equal(only_std, standardise_intensity(img, mask))
    both = apply(img, PreprocessConfig(crop=True, standardise=True))
    np.testing.assert_array_equal(both, standardise_intensity(crop, mask[y0:y1, x0:x1]))
    assert both.dtype == np.uint8 and both.ndim == 2


def test_spec_parsing_round_trip() -> None:
    assert parse_spec("none") == PreprocessConfig() and parse_spec(None) == PreprocessConfig()
    assert parse_spec("crop,zscore") == PreprocessConfig(crop=True, standardise=True)
    assert spec_of(parse_spec("zscore, crop")) == "crop,zscore" and spec_of({}) == "none"
    for bad in ("crop,blur", "none,crop"):
        with pytest.raises(ValueError, match="--preprocess"):
            parse_spec(bad)


def test_one_preprocessing_path_for_training_evaluation_and_scoring(phantoms: Path, tmp_path) -> None:
    """The bundle records the steps; ingest (training/evaluation) and score decode through the same
    function, so a scan reaches the model identically on every path. All off is the old fit_square.
    (SYNTHETIC phantoms: the paths must agree on any scan.)"""
    from raytumor.bundle import BundleMeta, read_meta, save_bundle
    from raytumor.ingest import decode_batch
    from raytumor.score.decode import decoded_row as _decoded_row

    # one period of the phantoms' file-type schedule: JPEG, grey/RGB/RGBA/palette PNG, PNG named .jpg
    files = sorted(str(p) for p in (phantoms / "yes").iterdir() if int(p.stem.split("_")[1]) < 20)
    assert len(files) == 20
    cfg = parse_spec("crop,zscore")
    size = 96
    batch = decode_batch({"path": np.array(files, dtype=object)}, image_size=size, preprocess=cfg.to_dict())
    plain = decode_batch({"path": np.array(files, dtype=object)}, image_size=size, fingerprints=False)
    for i, f in enumerate(files):
        pixels = decode_image(Path(f).read_bytes(), draft_size=size).pixels
        expect = to_model_input(pixels, size, cfg)
        np.testing.assert_array_equal(batch["image"][i], expect)
        np.testing.assert_array_equal(plain["image"][i], fit_square(pixels, size))
        np.testing.assert_array_equal(to_model_input(pixels, size, None), fit_square(pixels, size))
        row = _decoded_row(f, size, Path(f).read_bytes(), None, 0.05, cfg)
        np.testing.assert_array_equal(np.frombuffer(row["pixels"], np.uint8).reshape(size, size), expect)
        assert not np.array_equal(expect, plain["image"][i])  # the steps really ran
    # fingerprints (duplicate grouping) stay those of the unprocessed scan
    assert (batch["dhash"] == decode_batch({"path": np.array(files, dtype=object)})["dhash"]).all()
    meta = BundleMeta("efficientnet_lite0", ["no", "yes"], "no", size, [0.5] * 3, [0.5] * 3)
    meta.preprocess = cfg.to_dict()
    save_bundle(tmp_path / "b", {}, meta)
    assert PreprocessConfig.from_dict(read_meta(tmp_path / "b").preprocess) == cfg
