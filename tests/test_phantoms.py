"""phantoms: SYNTHETIC brain-MRI phantoms are well-formed, deterministic, and the class signal is local."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from raytumor.formats import DecodeError, decode_image, sniff_format
from raytumor.phantoms import make_phantom, write_phantom_dataset


def _pair(seed: int, size: int = 128):
    """The same random state rendered without and with a tumour."""
    base, _ = make_phantom(np.random.default_rng(seed), size=size, tumour=False, return_mask=True)
    tum, mask = make_phantom(np.random.default_rng(seed), size=size, tumour=True, return_mask=True)
    return base, tum, mask


@pytest.mark.parametrize("size", [64, 128, 256])
def test_shapes_dtypes(size):
    rng = np.random.default_rng(0)
    for tumour in (False, True):
        img = make_phantom(rng, size=size, tumour=tumour)
        assert isinstance(img, np.ndarray) and img.shape == (size, size) and img.dtype == np.uint8
        img, mask = make_phantom(rng, size=size, tumour=tumour, return_mask=True)
        assert mask.shape == (size, size) and mask.dtype == bool
        assert mask.any() == tumour


def test_looks_like_a_head_on_black():
    img = make_phantom(np.random.default_rng(5), size=128)
    border = np.concatenate([img[:4].ravel(), img[-4:].ravel(), img[:, :4].ravel(), img[:, -4:].ravel()])
    assert border.mean() < 20  # dark background (noise floor only)
    centre = img[40:88, 40:88]
    assert centre.mean() > 3 * border.mean() + 20  # bright head in the middle
    assert img.max() > 150  # the bright scalp/skull ring


def test_deterministic_for_a_seed():
    a = [make_phantom(np.random.default_rng(42), 96, tumour=t) for t in (False, True)]
    b = [make_phantom(np.random.default_rng(42), 96, tumour=t) for t in (False, True)]
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(make_phantom(np.random.default_rng(43), 96), a[0])
    rng = np.random.default_rng(1)
    assert not np.array_equal(make_phantom(rng, 96), make_phantom(rng, 96))  # the generator advances


def test_lesion_is_one_local_abnormal_region_inside_the_brain():
    for seed in range(12):
        base, tum, mask = _pair(seed)
        lab, n = ndimage.label(mask)
        assert n == 1
        # size: roughly 4-25 % of the brain diameter (brain ~ 0.7 of a 128 px image across, loosely)
        eq_diam = 2 * np.sqrt(mask.sum() / np.pi)
        assert 1 <= eq_diam <= 0.3 * 128
        # the lesion replaces tissue: it differs clearly from the same pixels without a tumour
        assert np.abs(tum[mask].astype(int) - base[mask]).mean() > 15
        # and every change stays near the lesion (lesion + oedema halo + blur): no global shortcut
        changed = tum != base
        dist = ndimage.distance_transform_edt(~mask)
        assert dist[changed].max() <= 3 + 2.5 * eq_diam / 2
        assert changed.mean() < 0.08
        # inside the head: enclosed by the bright scalp ring of the tumour-free rendering
        head = ndimage.binary_fill_holes(ndimage.gaussian_filter(base.astype(float), 1) > 40)
        assert head[mask].all()


def test_no_lesion_without_tumour():
    for seed in range(5):
        _, mask = make_phantom(np.random.default_rng(seed), 96, tumour=False, return_mask=True)
        assert not mask.any()


def test_lesion_sizes_and_types_vary():
    rng = np.random.default_rng(3)
    diam, contrast = [], []
    for _ in range(40):
        img, mask = make_phantom(rng, 128, tumour=True, return_mask=True)
        diam.append(2 * np.sqrt(mask.sum() / np.pi))
        ring = ndimage.binary_dilation(mask, iterations=3) & ~mask
        contrast.append(img[mask].mean() - img[ring].mean())
    assert min(diam) < 8 and max(diam) > 18  # small and large lesions
    assert max(contrast) > 20  # bright solid lesions ...
    assert min(contrast) < max(contrast) - 25  # ... and others (necrotic cores, small blurred ones)


def test_no_global_brightness_shortcut():
    rng = np.random.default_rng(11)
    m0 = np.array([make_phantom(rng, 96, tumour=False).mean() for _ in range(50)])
    m1 = np.array([make_phantom(rng, 96, tumour=True).mean() for _ in range(50)])
    pooled_std = np.sqrt((m0.var() + m1.var()) / 2)
    assert abs(m0.mean() - m1.mean()) < pooled_std
    assert pooled_std > 5  # and the global look genuinely varies


def test_write_phantom_dataset(tmp_path):
    root = tmp_path / "ph"
    info = write_phantom_dataset(root, n_per_class=20, size=64, seed=7, n_corrupt=6)
    assert info["counts"] == {"no": 20, "yes": 20}
    readme = (root / "SYNTHETIC_README.txt").read_text()
    assert "SYNTHETIC" in readme and "not patient data" in readme.lower() and "clinical" in readme.lower()
    for name in ("no", "yes"):
        written = sorted(p for p in (root / name).iterdir() if "corrupt" not in p.name)
        assert len(written) == 20 == len(info["files"][name])
        assert {Path(p) for p in info["files"][name]} == set(written)
        assert all(p.stem.startswith(f"{name}_") for p in written)
    assert len(info["corrupt"]) == 6
    assert all(Path(p).parent == root / "no" for p in info["corrupt"])

    modes, fmts, mismatched = set(), set(), 0
    for name in ("no", "yes"):
        for p in info["files"][name]:
            data = Path(p).read_bytes()
            dec = decode_image(data)
            assert dec.pixels.shape == (64, 64)
            modes.add(dec.mode)
            fmts.add(dec.format)
            mismatched += dec.format == "png" and p.endswith(".jpg")
    assert {"L", "RGB", "RGBA", "P"} <= modes and fmts == {"png", "jpeg"} and mismatched == 2
    reasons = set()
    for p in info["corrupt"]:
        with pytest.raises(DecodeError) as ei:
            decode_image(Path(p).read_bytes())
        reasons.add(ei.value.reason)
    assert {"empty file", "truncated image", "unknown format", "not an image (pdf)"} <= reasons
    assert sniff_format((root / "no" / "no_corrupt_2_text_as_png.png").read_bytes()) == "unknown"


def test_write_phantom_dataset_deterministic(tmp_path):
    a = write_phantom_dataset(tmp_path / "a", n_per_class=4, size=48, seed=3, n_corrupt=2)
    b = write_phantom_dataset(tmp_path / "b", n_per_class=4, size=48, seed=3, n_corrupt=2)
    c = write_phantom_dataset(tmp_path / "c", n_per_class=4, size=48, seed=4)
    rel = {name: [Path(p).name for p in a["files"][name]] for name in a["files"]}
    assert rel == {name: [Path(p).name for p in b["files"][name]] for name in b["files"]}
    for name, files in a["files"].items():
        for pa, pb, pc in zip(files, b["files"][name], c["files"][name], strict=True):
            assert Path(pa).read_bytes() == Path(pb).read_bytes()
            assert Path(pa).read_bytes() != Path(pc).read_bytes()
    for pa, pb in zip(a["corrupt"], b["corrupt"], strict=True):
        assert Path(pa).read_bytes() == Path(pb).read_bytes()


def test_custom_class_names_and_tumour_class(tmp_path):
    info = write_phantom_dataset(tmp_path, n_per_class=3, size=48, seed=0, class_names=("healthy", "tumour"))
    assert info["counts"] == {"healthy": 3, "tumour": 3}
    assert (tmp_path / "healthy").is_dir() and (tmp_path / "tumour").is_dir()
