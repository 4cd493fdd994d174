"""Volume rules: which slices of a 3-D volume a 2-D model scores, and the sustained volume score."""

from __future__ import annotations

import numpy as np
import pytest

from raytumor.volumes import brain_slice_range, volume_score


def test_slice_range_is_measured_down_from_the_vertex_in_mm():
    z = np.arange(0, 120)  # 2 mm slices, vertex at z=119
    keep = brain_slice_range(z, 2.0, skip_top_mm=10, depth_mm=110)
    assert z[keep].max() == 114 and z[keep].min() == 64  # 10 mm and 110 mm below the vertex
    # Same anatomy at 5 mm: the rule is in millimetres, not slices.
    z5 = np.arange(0, 48)
    k5 = brain_slice_range(z5, 5.0, skip_top_mm=10, depth_mm=110)
    assert z5[k5].max() == 45 and z5[k5].min() == 25


def test_slice_range_keeps_everything_when_it_cannot_apply():
    z = np.arange(10)
    assert brain_slice_range(z, None).all()  # spacing unknown
    assert brain_slice_range(z, 2.0, depth_mm=0).all()  # disabled
    assert brain_slice_range(np.array([3]), 2.0).all()  # the rule would keep nothing: keep the slab


def test_sustained_score_needs_contiguous_slices():
    z = np.arange(20)
    s = np.full(20, 0.1)
    s[[3, 7, 16]] = 0.99  # isolated false positives
    s[10:14] = 0.8  # a 4-slice run
    v, j = volume_score(s, z, 2.0, 10.0)  # k = 5 slices at 2 mm
    assert v == pytest.approx(0.1)
    v, j = volume_score(s, z, 2.0, 8.0)  # k = 4: the run carries the score
    assert v == pytest.approx(0.8) and 10 <= z[j] <= 13
    v, j = volume_score(s, z, 2.0, 0.0)  # k = 1: plain maximum
    assert v == pytest.approx(0.99) and z[j] in (3, 7, 16)
    assert volume_score(s, z, None, 10.0)[0] == pytest.approx(0.99)  # spacing unknown: maximum


def test_sustained_score_respects_gaps_order_and_nan():
    z = np.array([9, 1, 2, 3, 7, 8])  # unsorted, a gap between 3 and 7
    s = np.array([0.9, 0.5, 0.6, 0.7, 0.9, 0.9])
    v, j = volume_score(s, z, 1.0, 3.0)  # k=3: runs (1,2,3) -> 0.5 and (7,8,9) -> 0.9
    assert v == pytest.approx(0.9) and z[j] in (7, 8, 9)
    s2 = s.copy()
    s2[0] = np.nan  # z=9 unscorable: counts as 0, the upper run no longer holds
    assert volume_score(s2, z, 1.0, 3.0)[0] == pytest.approx(0.5)
    # Shorter than k everywhere: k shrinks to the longest run.
    assert volume_score(np.array([0.2, 0.4]), np.array([0, 1]), 1.0, 10.0)[0] == pytest.approx(0.2)
    assert np.isnan(volume_score(np.array([]), np.array([]), 1.0, 10.0)[0])


def test_nifti_spacing_comes_from_the_header(tmp_path):
    import nibabel as nib
    from conftest import write_phantom_volume

    from raytumor.formats import decode_scan

    # a SYNTHETIC 2 mm volume (header facts, not anatomy, are under test): 100 head slices, 200 mm
    path = write_phantom_volume(tmp_path / "phantom_T1.nii.gz", spacing_mm=2.0)
    scan = decode_scan(path.read_bytes())
    assert scan.kind == "volume" and scan.spacing_mm == pytest.approx(2.0)
    # a resampled copy at 3 mm says so, and the brain range then keeps ~1/1.5 as many slices
    img = nib.as_closest_canonical(nib.load(path))
    aff = img.affine.copy()
    aff[:, 2] *= 1.5
    scan3 = decode_scan(nib.Nifti1Image(np.asanyarray(img.dataobj), aff).to_bytes())
    assert scan3.spacing_mm == pytest.approx(3.0)
    n2 = brain_slice_range(scan.slice_index, scan.spacing_mm).sum()
    n3 = brain_slice_range(scan3.slice_index, scan3.spacing_mm).sum()
    assert n3 == pytest.approx(n2 / 1.5, abs=2)
