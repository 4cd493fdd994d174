"""Leakage-safe splitting: fingerprints, duplicate grouping (multi-index hashing), group splits, matching."""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import time
from pathlib import Path

import imagehash
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from PIL import Image

from raytumor import split
from raytumor.groups import components as _components
from raytumor.groups import dense_ids
from raytumor.split import _near_value_pairs, hamming

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
FP_COLS = ["dhash", "thumb", "dhash_crop", "thumb_crop"]


# ----------------------------------------------------------------------------------------------------
# synthetic scans


def _smooth(rng: np.random.Generator, grid: int, size: int) -> np.ndarray:
    field = (rng.random((grid, grid)) * 255).astype(np.uint8)
    return np.asarray(Image.fromarray(field).resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32)


def brain_like(seed: int, size: int = 256, layout_seed: int | None = None) -> np.ndarray:
    """A bright textured oval on black. ``layout_seed`` fixes the coarse intensity layout (what dHash sees)
    while ``seed`` draws the fine 'anatomy', so two images can share a layout yet be different scans."""
    coarse = _smooth(np.random.default_rng(seed if layout_seed is None else layout_seed), 6, size)
    fine = _smooth(np.random.default_rng(10_000 + seed), 40, size)
    yy, xx = np.mgrid[:size, :size]
    oval = ((yy - size / 2) / (0.45 * size)) ** 2 + ((xx - size / 2) / (0.38 * size)) ** 2 <= 1
    return np.where(oval, 0.65 * coarse + 0.35 * fine, 0).astype(np.uint8)


def encode(gray: np.ndarray, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(gray).save(buf, fmt, **kw)
    return buf.getvalue()


def decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("L"))


def row(path: str, data: bytes, label: int = 0, patient_id: str | None = None) -> dict:
    fp = split.fingerprint(decode(data))
    return {
        "path": path,
        "label": label,
        "sha256": hashlib.sha256(data).hexdigest(),
        "patient_id": patient_id,
        **fp,
    }


def variants(gray: np.ndarray) -> dict[str, bytes]:
    """Copies that must group with the original: byte copy, JPEG re-encode, brightness shift, resize."""
    bright = np.clip(gray.astype(np.int16) + 12, 0, 255).astype(np.uint8)
    small = np.asarray(Image.fromarray(gray).resize((200, 200), Image.Resampling.BILINEAR))
    return {
        "copy": encode(gray),
        "jpeg": encode(gray, "JPEG", quality=70),
        "bright": encode(bright, "JPEG", quality=90),
        "resized": encode(small),
    }


def reframe(gray: np.ndarray) -> np.ndarray:
    """Cut 8% off the left and right (background of brain_like's oval) and pad differently: 40 px black
    on top, 10 on the bottom and left, as re-framed copies in scraped datasets are."""
    w = gray.shape[1]
    cut = gray[:, int(0.08 * w) : w - int(0.08 * w)]
    out = np.zeros((cut.shape[0] + 50, cut.shape[1] + 10), np.uint8)
    out[40 : 40 + cut.shape[0], 10:] = cut
    return out


@pytest.fixture(scope="module")
def scans() -> pd.DataFrame:
    """4 originals with 4 copies each (5 files per group) + 12 unrelated scans; two classes."""
    rows = []
    for k in range(4):
        g = brain_like(k)
        rows.append(row(f"orig{k}.png", encode(g), label=k % 2))
        for name, data in variants(g).items():
            rows.append(row(f"orig{k}_{name}", data, label=k % 2))
    for k in range(12):
        rows.append(row(f"other{k}.png", encode(brain_like(100 + k)), label=k % 2))
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------------------------------
# fingerprint


def test_fingerprint_matches_imagehash_and_is_fast() -> None:
    g = brain_like(1)
    fp = split.fingerprint(g)
    assert set(fp) == {"dhash", "thumb", "dhash_crop", "thumb_crop"}
    assert isinstance(fp["dhash"], int) and -(2**63) <= fp["dhash"] < 2**63
    # same bits as imagehash's hex string, packed row-major
    assert f"{fp['dhash'] & (2**64 - 1):016x}" == str(imagehash.dhash(Image.fromarray(g)))
    thumb = np.frombuffer(fp["thumb"], np.uint8)
    assert thumb.size == split.THUMB_SIZE**2 and thumb.min() == 0 and thumb.max() == 255  # min-max stretched
    assert split.fingerprint(g) == fp  # deterministic
    assert len(fp["thumb_crop"]) == split.THUMB_SIZE**2 and isinstance(fp["dhash_crop"], int)
    assert len(split.fingerprint(np.full((5, 7), 9, np.uint8))["thumb"]) == split.THUMB_SIZE**2  # tiny/flat
    t0 = time.perf_counter()
    for _ in range(100):
        split.fingerprint(g)
    assert (time.perf_counter() - t0) / 100 < 0.005  # ~0.3 ms here; loose bound for slow CI
    with pytest.raises(ValueError):
        split.fingerprint(np.zeros((8, 8, 3), np.uint8))


# ----------------------------------------------------------------------------------------------------
# grouping


def test_copies_group_and_unrelated_scans_do_not(scans: pd.DataFrame) -> None:
    groups = split.find_duplicate_groups(scans)
    assert groups.dtype == np.int64 and groups.min() == 0
    for k in range(4):
        members = scans["path"].str.startswith(f"orig{k}")
        assert members.sum() == 5
        assert len(set(groups[members])) == 1, f"copies of orig{k} split across groups"
    assert len(set(groups)) == 4 + 12  # no other merges
    # sorted by first row: group ids are dense and numbered in row order
    assert list(pd.unique(groups)) == sorted(set(groups))
    # an Arrow round trip (how the catalogue arrives) and uint8-array thumbnails give the same groups
    assert (split.find_duplicate_groups(pa.Table.from_pandas(scans).to_pandas()) == groups).all()
    as_arrays = scans.assign(thumb=[np.frombuffer(t, np.uint8) for t in scans.thumb])
    assert (split.find_duplicate_groups(as_arrays) == groups).all()


def test_thumbnail_confirmation_rejects_same_layout_different_scan() -> None:
    """Same coarse layout (close dHash) but different fine anatomy: dHash alone links them, the gradient
    confirmation does not (the ixi-vs-br35h failure mode), while a real re-encode still links."""
    a = brain_like(1, layout_seed=7)
    b = brain_like(2, layout_seed=7)
    df = pd.DataFrame(
        [row("a.png", encode(a)), row("b.png", encode(b)), row("a.jpg", encode(a, "JPEG", quality=60))]
    )
    assert hamming(np.int64(df.dhash[0]), np.int64(df.dhash[1])) <= split.DEFAULT_MAX_HAMMING
    assert len(set(split.find_duplicate_groups(df, min_corr=None))) == 1
    g = split.find_duplicate_groups(df)
    assert g[0] == g[2] != g[1]
    # raw-pixel correlation of two ovals is high anyway: why the default confirms on gradients
    f_pix = split.thumb_features(np.stack([np.frombuffer(t, np.uint8) for t in df.thumb]), "pixel")
    f_grad = split.thumb_features(np.stack([np.frombuffer(t, np.uint8) for t in df.thumb]), "gradient")
    assert f_pix[0] @ f_pix[1] > f_grad[0] @ f_grad[1] + 0.2
    assert f_grad[0] @ f_grad[2] >= split.DEFAULT_MIN_CORR


def test_missing_and_flat_fingerprints_are_singletons_unless_exact(scans: pd.DataFrame) -> None:
    df = scans.iloc[:5].copy()  # orig0 and its four copies
    df = df.astype({"dhash": object, "dhash_crop": object})
    df.loc[2, FP_COLS] = [None] * len(FP_COLS)  # decode error: no fingerprint
    flat = split.fingerprint(np.full((64, 64), 40, np.uint8))
    flat_rows = pd.DataFrame([{"path": f"flat{i}", "sha256": f"f{i}", "label": 0, **flat} for i in range(2)])
    df = pd.concat([df, flat_rows], ignore_index=True)
    g = split.find_duplicate_groups(df)
    assert g[2] not in set(g[[0, 1, 3, 4]])
    assert len(set(g[[0, 1, 3, 4]])) == 1
    assert g[5] != g[6]  # flat images have nothing to compare: not near-duplicates of each other
    assert len(set(split.find_duplicate_groups(df, min_corr=None)[[5, 6]])) == 2  # even on dHash alone
    df.loc[2, "sha256"] = df.loc[0, "sha256"]  # ...but an exact byte copy still groups
    assert split.find_duplicate_groups(df)[2] == g[0]
    with pytest.raises(TypeError, match="float"):
        split.find_duplicate_groups(df.assign(dhash=df["dhash"].astype(float)))


def test_patient_id_groups_and_nulls_do_not(scans: pd.DataFrame) -> None:
    df = scans[scans.path.str.startswith("other")].reset_index(drop=True)
    df["patient_id"] = ["p1", "p1", "p2", None, None, "", "", "p2", "p3", None, "p1", None]
    g = split.find_duplicate_groups(df)
    assert g[0] == g[1] == g[10]
    assert g[2] == g[7] != g[0]
    nulls = [3, 4, 5, 6, 9, 11]
    assert len(set(g[nulls])) == len(nulls)
    table = split.duplicate_groups_table(df, g)
    assert set(table["reason"]) == {"patient"}
    assert len(table) == 5


def test_near_duplicates_never_link_two_named_patients() -> None:
    """Skull-base slices of different patients look alike; the manifest's patient ids are authoritative, so a
    near-duplicate edge between two named patients would chain whole patients (and, left out as one site, drop
    another site's patients from training). A copy of a named patient's slice in a source without patient ids
    (a Kaggle-style folder) still groups with it; an exact copy links patients as before."""
    img = brain_like(1)
    jpeg = encode(img, "JPEG", quality=90)  # near-identical, different bytes
    rows = [
        row("a/p1_01.png", encode(img), patient_id="p1"),
        row("a/p2_01.jpg", jpeg, patient_id="p2"),
        row("a/p2_02.png", encode(brain_like(2)), patient_id="p2"),
        row("b/copy.jpg", encode(img, "JPEG", quality=70)),
        row("a/p3_01.png", encode(brain_like(3)), patient_id="p3"),
        row("a/p4_01.png", encode(brain_like(3)), patient_id="p4"),
    ]
    df = pd.DataFrame(rows)
    df["source"] = ["a", "a", "a", "b", "a", "a"]
    g = split.find_duplicate_groups(df)
    # the copy without a patient id links to both named near-duplicates, so they end in one group through it
    assert g[3] == g[0] == g[1] == g[2]
    g2 = split.find_duplicate_groups(df.drop(index=3).reset_index(drop=True))
    assert g2[0] != g2[1] and g2[1] == g2[2]  # near-duplicates across named patients: no edge
    assert g2[3] == g2[4]  # identical bytes (sha256) still link p3 and p4


def test_identical_blank_images_do_not_link_patients() -> None:
    """Many TCGA stacks start with the same all-black JPEG: byte-identical, nothing to leak. Linking on it
    made 46 such slices one group with 1,894 files of 35 patients across two sites."""
    blank = encode(np.zeros((64, 64), np.uint8))
    img = encode(brain_like(4))
    df = pd.DataFrame(
        [
            row("a/p1_01.png", blank, patient_id="p1"),
            row("a/p2_01.png", blank, patient_id="p2"),
            row("a/p3_05.png", img, patient_id="p3"),
            row("a/p4_05.png", img, patient_id="p4"),
        ]
    )
    g = split.find_duplicate_groups(df)
    assert g[0] != g[1]  # same bytes, blank: no edge
    assert g[2] == g[3]  # same bytes with content: still one group


def test_exact_sha_groups_without_fingerprints() -> None:
    df = pd.DataFrame({"path": list("abcde"), "sha256": ["x", "y", "x", None, "y"], "label": 0})
    g = split.find_duplicate_groups(df, min_corr=None)
    assert g[0] == g[2] and g[1] == g[4] and len(set(g)) == 3


def test_components_match_reference_union_find() -> None:
    rng = np.random.default_rng(0)
    n = 3000
    a, b = rng.integers(0, n, 2500), rng.integers(0, n, 2500)
    a = np.r_[a, np.arange(100, 400)]  # plus a long chain
    b = np.r_[b, np.arange(101, 401)]
    parent = list(range(n))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for x, y in zip(a.tolist(), b.tolist(), strict=True):
        parent[find(x)] = find(y)
    ref = np.array([find(x) for x in range(n)])
    got = _components(n, a, b)
    # same partition, and roots are component minima
    assert (
        len(set(zip(ref.tolist(), got.tolist(), strict=True)))
        == len(set(ref.tolist()))
        == len(set(got.tolist()))
    )
    assert all(got[i] <= i for i in range(n))


def test_multi_index_search_equals_brute_force_and_is_fast() -> None:
    rng = np.random.default_rng(0)
    n, d = 50_000, split.DEFAULT_MAX_HAMMING
    base = rng.integers(-(2**63), 2**63 - 1, n, dtype=np.int64, endpoint=True)
    # plant near pairs at distances 0..d+2 so both sides of the radius are exercised
    k = 2000
    src = rng.choice(n, k, replace=False)
    dist = rng.integers(0, d + 3, k)
    near = base[src].view(np.uint64).copy()
    for i, m in enumerate(dist):
        for bit in rng.choice(64, m, replace=False):
            near[i] ^= np.uint64(1) << np.uint64(bit)
    hashes = np.r_[base, near.view(np.int64)]
    df = pd.DataFrame({"dhash": hashes, "sha256": [f"s{i}" for i in range(len(hashes))]})
    t0 = time.perf_counter()
    g = split.find_duplicate_groups(df, max_hamming=d, min_corr=None)
    elapsed = time.perf_counter() - t0
    assert elapsed < 10, f"{elapsed:.1f}s for {len(df)} hashes"  # ~0.5 s here
    planted_close = dist <= d
    assert (g[src[planted_close]] == g[n + np.flatnonzero(planted_close)]).all()
    # exact equality with brute force on a subset that holds planted pairs and random rows
    sub = np.unique(np.r_[src[:600], n + np.arange(600), rng.choice(n, 2400, replace=False)])
    vals = np.unique(hashes[sub].view(np.uint64))
    for radius in (0, 3, d, 12):
        a, b = _near_value_pairs(vals, radius)
        iu = np.triu_indices(len(vals), 1)
        brute = hamming(vals[iu[0]], vals[iu[1]]) <= radius
        assert set(zip(a.tolist(), b.tolist(), strict=True)) == set(
            zip(iu[0][brute].tolist(), iu[1][brute].tolist(), strict=True)
        )
        found = set(zip(vals[a].tolist(), vals[b].tolist(), strict=True))
        planted = [
            tuple(sorted((int(hashes[src[i]].view(np.uint64)), int(hashes[n + i].view(np.uint64)))))
            for i in range(600)
            if 0 < dist[i] <= radius
        ]
        assert (len(planted) > 0 or radius == 0) and all(p in found for p in planted)


# ----------------------------------------------------------------------------------------------------
# views: head crop and mirror images


def _whole_only(df: pd.DataFrame) -> np.ndarray:
    return split.find_duplicate_groups(df, mirror=False, crop_min_corr=None)


def test_reframed_copy_groups_via_head_view_and_different_scans_do_not() -> None:
    a = brain_like(3)
    copy = encode(reframe(a), "JPEG", quality=80)  # cropped + re-padded + re-saved
    df = pd.DataFrame(
        [
            row("a.png", encode(a)),
            row("a_reframed.jpg", copy),
            row("b.png", encode(brain_like(4))),
            # same coarse layout as c: close whole-image dHash, different anatomy
            row("c.png", encode(brain_like(1, layout_seed=7))),
            row("d.png", encode(brain_like(2, layout_seed=7))),
        ]
    )
    # the whole-image view cannot see it: padding moves a dozen dHash bits and misaligns the thumbnail
    assert hamming(np.int64(df.dhash[0]), np.int64(df.dhash[1])) > split.DEFAULT_MAX_HAMMING
    assert len(set(_whole_only(df))) == 5
    # the head view: same box, same square
    assert hamming(np.int64(df.dhash_crop[0]), np.int64(df.dhash_crop[1])) <= 2
    g = split.find_duplicate_groups(df)
    assert g[0] == g[1] and len(set(g)) == 4
    # match_reference uses the same views
    assert split.match_reference(df.iloc[[1, 2, 4]], df.iloc[[0, 3]]).tolist() == [True, False, False]
    # catalogues/bundles written before the head view existed: whole view only, no error
    old = df.drop(columns=["dhash_crop", "thumb_crop"])
    assert (split.find_duplicate_groups(old) == _whole_only(df)).all()
    assert not split.match_reference(df.iloc[[1]], old.iloc[[0]]).any()
    assert not split.match_reference(old.iloc[[1]], df.iloc[[0]]).any()
    assert split.match_reference(df.iloc[[1]], df.iloc[[0]], crop_min_corr=None).tolist() == [False]


def test_mirrored_copy_groups_and_mirror_hashes_are_exact() -> None:
    a = brain_like(5)
    mirrored = np.ascontiguousarray(a[:, ::-1])
    df = pd.DataFrame(
        [
            row("a.png", encode(a)),
            row("a_mirror.jpg", encode(mirrored, "JPEG", quality=85)),
            row("b.png", encode(brain_like(6))),
            row("b_mirror_of_other.png", encode(np.ascontiguousarray(brain_like(7)[:, ::-1]))),
        ]
    )
    assert len(set(split.find_duplicate_groups(df, mirror=False))) == 4
    g = split.find_duplicate_groups(df)
    assert g[0] == g[1] and len(set(g)) == 3
    assert split.match_reference(df.iloc[[1, 3]], df.iloc[[0, 2]]).tolist() == [True, False]
    assert split.match_reference(df.iloc[[1, 3]], df.iloc[[0, 2]], mirror=False).tolist() == [False, False]
    # the stored fields give the mirror image's: exactly for the head view (outward-compared bits), up to
    # tied (flat background) bits for imagehash's dHash (5 of them here)
    fa, fm = split.fingerprint(a), split.fingerprint(mirrored)
    for view, tol in ((split._CROP, 0), (split._FULL, split.DEFAULT_MAX_HAMMING)):
        h = np.array([fa[view.hash_col]], np.int64).view(np.uint64)
        got = split._mirror_hashes(h, view.mirror_inverts).view(np.int64)[0]
        assert hamming(got, np.int64(fm[view.hash_col])) <= tol, view
        assert (
            split._mirror_hashes(split._mirror_hashes(h, view.mirror_inverts), view.mirror_inverts) == h
        ).all()
    t = np.frombuffer(fa["thumb"], np.uint8).reshape(split.THUMB_SIZE, -1)
    assert (t[:, ::-1].tobytes()) == fm["thumb"]


def test_head_square_ignores_padding_specks_and_flat_images() -> None:
    a = brain_like(8, size=200)
    base = split._head_square(Image.fromarray(a))
    padded = np.zeros((250, 230), np.uint8)  # at most _CROP_WORK: same scale
    padded[45:245, 5:205] = a
    padded[3, 225] = 255  # a hot pixel in the background must not stretch the box
    padded[246:248, 100:102] = 120  # nor a small speck
    got = split._head_square(Image.fromarray(padded))
    assert got.shape == base.shape
    f = split.thumb_features(
        np.stack([np.frombuffer(split._thumb(Image.fromarray(x)), np.uint8) for x in (base, got)])
    )
    assert f[0] @ f[1] > 0.97
    # larger inputs are worked on at _CROP_WORK pixels; flat and tiny images are kept whole
    assert (
        split._head_square(Image.fromarray(np.kron(a, np.ones((3, 3), np.uint8)))).shape[0]
        <= split._CROP_WORK
    )
    assert split._head_square(Image.fromarray(np.full((5, 7), 9, np.uint8))).shape == (7, 7)


# ----------------------------------------------------------------------------------------------------
# splitting


def _grouped_frame(rng: np.random.Generator, n_groups: int = 900) -> tuple[pd.DataFrame, np.ndarray]:
    sizes = np.where(rng.random(n_groups) < 0.8, 1, rng.integers(2, 9, n_groups))
    groups = np.repeat(np.arange(n_groups), sizes)
    labels = np.repeat(rng.random(n_groups) < 0.35, sizes).astype(np.int64)
    sha = [hashlib.sha256(f"file{i}".encode()).hexdigest() for i in range(len(groups))]
    return pd.DataFrame(
        {"path": [f"f{i}" for i in range(len(groups))], "sha256": sha, "label": labels}
    ), groups


def test_split_groups_stratified_no_straddling_and_deterministic() -> None:
    rng = np.random.default_rng(3)
    df, groups = _grouped_frame(rng)
    s = split.split_groups(df, groups, seed=5)
    assert set(s) == {"train", "val", "test"}
    assert split.leakage(df, s, groups)["straddling_groups"] == 0
    for label in (0, 1):
        m = df["label"].to_numpy() == label
        for name, frac in zip(split.SPLIT_NAMES, (0.7, 0.15, 0.15), strict=True):
            assert abs((s[m] == name).mean() - frac) < 0.01, (label, name)
    # row order does not matter, group ids may be relabelled; the seed does matter
    perm = rng.permutation(len(df))
    relabel = rng.permutation(groups.max() + 1)
    s2 = split.split_groups(df.iloc[perm].reset_index(drop=True), relabel[groups[perm]], seed=5)
    assert (s2 == s[perm]).all()
    assert (split.split_groups(df, groups, seed=5) == s).all()
    assert (split.split_groups(df, groups, seed=6) != s).any()


def test_assign_folds_like_split_groups_whole_groups_per_class_and_seeded() -> None:
    """Cross-validation folds follow split_groups' rules: whole groups, every class in proportion, the
    same folds for any row order, other folds for another seed; a fold held out by holdout_split leaks
    nothing into its training."""
    rng = np.random.default_rng(3)
    df, groups = _grouped_frame(rng)
    folds = split.assign_folds(df, groups, 5, seed=5)
    assert (pd.Series(folds).groupby(groups).nunique() == 1).all() and set(folds) == set(range(5))
    for label in (0, 1):
        m = df["label"].to_numpy() == label
        for k in range(5):
            assert abs((folds[m] == k).mean() - 0.2) < 0.02, (label, k)
    perm = rng.permutation(len(df))
    again = split.assign_folds(df.iloc[perm].reset_index(drop=True), groups[perm], 5, seed=5)
    assert (again == folds[perm]).all() and (split.assign_folds(df, groups, 5, seed=6) != folds).any()
    s, dropped = split.holdout_split(df, groups, folds == 2, seed=5)
    assert dropped == 0 and split.leakage(df, s, groups)["straddling_groups"] == 0
    assert set(s[folds == 2]) == {"test"} and set(s[folds != 2]) == {"train", "val"}


def test_split_groups_stratified_by_source() -> None:
    """A second source's patient groups reach every split in proportion, however its group sizes compare
    with the first source's (before: a site's 20 healthy patients of 17 slices all landed in train, behind
    the first source's big near-duplicate groups), and the first source's split does not change."""
    rng = np.random.default_rng(1)
    a, ga = _grouped_frame(rng)
    a = a.assign(source="hospital_a")
    b = pd.DataFrame(
        {"sha256": [f"b{i:05d}" for i in range(340)], "label": 0, "source": "site_b",
         "patient_id": [f"p{i // 17}" for i in range(340)]}
    )  # fmt: skip
    df = pd.concat([a, b], ignore_index=True)
    groups = np.r_[ga, ga.max() + 1 + np.arange(340)]  # patient ids merge each site-b patient's 17 slices
    s = split.split_groups(df, groups, seed=0)
    assert split.leakage(df, s, split.patient_groups(df, groups))["straddling_groups"] == 0
    per_patient = pd.Series(s[len(a) :]).groupby(b["patient_id"].to_numpy()).agg(set)
    assert per_patient.map(len).eq(1).all()
    site = per_patient.map(lambda x: next(iter(x))).value_counts()
    assert site["train"] == 14 and site["val"] == 3 and site["test"] == 3, site.to_dict()
    for label in (0, 1):  # the first source is still split 70/15/15 per class
        m = (df["source"] == "hospital_a").to_numpy() & (df["label"] == label).to_numpy()
        for name, frac in zip(split.SPLIT_NAMES, (0.7, 0.15, 0.15), strict=True):
            assert abs((s[m] == name).mean() - frac) < 0.02, (label, name)
    # adding a source leaves the first source's split as it was alone (comparable test sets), and one
    # source is the class-only split
    alone = split.split_groups(a, ga, seed=0)
    assert (s[: len(a)] == alone).all()
    assert (alone == split.split_groups(a.drop(columns="source"), ga, seed=0)).all()


def test_split_groups_majority_label_and_custom_fractions() -> None:
    df = pd.DataFrame({"sha256": [f"{i:04d}" for i in range(40)], "label": [0] * 20 + [1] * 20})
    groups = np.arange(40)
    groups[[0, 1, 2, 20]] = 0  # three 0s and one 1: a class-0 group
    s = split.split_groups(df, groups, fractions=(0.5, 0.5, 0.0))
    assert "test" not in set(s)
    assert len(set(s[[0, 1, 2, 20]])) == 1
    assert (s[df.label == 1] == "train").sum() in (9, 10, 11)


def test_split_groups_tiny_data_gets_every_split_per_class() -> None:
    df = pd.DataFrame({"sha256": list("abcdef"), "label": [0, 0, 0, 1, 1, 1]})
    s = split.split_groups(df, np.arange(6))
    for label in (0, 1):
        assert sorted(s[df.label == label]) == ["test", "train", "val"]
    # two groups: the largest split and one more; one group: train
    s = split.split_groups(df.iloc[:2], np.arange(2))
    assert sorted(s) == ["train", "val"]
    assert list(split.split_groups(df.iloc[:1], np.arange(1))) == ["train"]
    # a big group never lands in a small split just to fill it
    big = pd.DataFrame({"sha256": [f"{i:03d}" for i in range(102)], "label": 0})
    g = np.r_[np.zeros(100, int), 1, 2]
    s = split.split_groups(big, g)
    assert (s[:100] == "train").all() and sorted(s[100:]) == ["test", "val"]


def test_real_groups_end_to_end_report_and_leakage(scans: pd.DataFrame) -> None:
    groups = split.find_duplicate_groups(scans)
    s = split.split_groups(scans, groups, seed=0)
    leak = split.leakage(scans, s, groups)
    assert leak["straddling_groups"] == 0 and leak["test_rows_with_train_duplicate"] == 0
    plain = np.array(["train", "test"] * (len(scans) // 2))  # a split that ignores groups
    bad = split.leakage(scans, plain, groups)
    assert bad["straddling_groups"] == 4 and bad["test_rows_with_train_duplicate"] > 0
    rep = split.duplicate_report(scans, groups)
    assert rep["groups_with_duplicates"] == 4
    assert rep["redundant_files"] == 16
    assert rep["largest_group"] == 5
    assert rep["label_conflict_groups"] == 0
    assert sorted(len(g) for g in rep["groups"]) == [5, 5, 5, 5] and not rep["groups_truncated"]
    assert rep["n_groups"] == 16 and rep["files"] == len(scans)
    assert json.loads(json.dumps(rep)) == rep
    assert {"orig0.png", "orig0_jpeg"} <= {p for g in rep["groups"] for p in g}
    capped = split.duplicate_report(scans, groups, max_listed=2)
    assert len(capped["groups"]) == 2 and capped["groups_truncated"]
    table = split.duplicate_groups_table(scans, groups)
    assert list(table.columns) == ["group_id", "path", "label", "sha256", "reason"]
    assert len(table) == 20
    copies = table[table.path.str.endswith(("_copy", ".png")) & table.path.str.startswith("orig")]
    assert set(copies["reason"]) == {"exact"}  # the byte copy and its original
    assert set(table.loc[table.path.str.endswith("_jpeg"), "reason"]) == {"near"}
    conflict = scans.assign(label=np.where(scans.path == "orig0_jpeg", 1, scans.label))
    assert split.duplicate_report(conflict, groups)["label_conflict_groups"] == 1


# ----------------------------------------------------------------------------------------------------
# cross-dataset matching


def test_match_reference(scans: pd.DataFrame) -> None:
    reference = scans[scans.path.isin(["orig0.png", "orig1.png", "other0.png"])]
    query = scans[scans.path.isin(["orig0_copy", "orig0_jpeg", "orig1_resized", "orig2.png", "other1.png"])]
    got = split.match_reference(query, reference)
    assert got.tolist() == [True, True, True, False, False]
    # exact-only when the reference carries no fingerprints
    got = split.match_reference(query, reference[["sha256"]], min_corr=None)
    assert got.tolist() == [True, False, False, False, False]
    # patient ids match only when asked (ids from different datasets are not comparable)
    q = query.assign(patient_id="p9")
    r = reference.assign(patient_id=["p9", None, None])
    assert split.match_reference(q, r).tolist() == [True, True, True, False, False]
    assert split.match_reference(q, r, match_patient_id=True).all()
    assert split.match_reference(query.iloc[:0], reference).shape == (0,)


def test_match_reference_equals_brute_force_on_hashes() -> None:
    rng = np.random.default_rng(1)
    ref = rng.integers(-(2**63), 2**63 - 1, 3000, dtype=np.int64, endpoint=True)
    q = np.r_[
        ref[:200] ^ np.int64(0b1011), rng.integers(-(2**63), 2**63 - 1, 800, dtype=np.int64, endpoint=True)
    ]
    q[5] = ref[7]  # exact hash match counts as distance 0
    mirror_ref = split._mirror_hashes(ref.view(np.uint64), True).view(np.int64)
    q[300:320] = mirror_ref[1000:1020] ^ np.int64(0b110)  # mirrored copies
    qd, rd = pd.DataFrame({"dhash": q}), pd.DataFrame({"dhash": ref})
    got = split.match_reference(qd, rd, max_hamming=4, min_corr=None, mirror=False)
    brute = (hamming(q[:, None], ref[None, :]) <= 4).any(axis=1)
    assert (got == brute).all() and got[:200].all() and not got[300:320].any()
    got = split.match_reference(qd, rd, max_hamming=4, min_corr=None)
    brute |= (hamming(q[:, None], mirror_ref[None, :]) <= 4).any(axis=1)
    assert (got == brute).all() and got[300:320].all()


# ----------------------------------------------------------------------------------------------------
# real data


def test_navoneel_exact_groups_found_and_not_split() -> None:
    root = DATA / "navoneel-253"
    if not root.is_dir():
        pytest.skip(f"shared data not found at {root} (needs ../shared/data/navoneel-253)")
    rows = []
    for cls, label in (("yes", 1), ("no", 0)):
        for p in sorted((root / cls).iterdir()):
            data = p.read_bytes()
            rows.append(row(f"{cls}/{p.name}", data, label) | {"md5": hashlib.md5(data).hexdigest()})
    df = pd.DataFrame(rows)
    assert len(df) == 253
    md5_sizes = df.groupby("md5").size()
    assert (md5_sizes > 1).sum() == 22 and (md5_sizes - 1).sum() == 25  # PROVENANCE.md
    groups = split.find_duplicate_groups(df)
    for _, members in df.groupby("md5").groups.items():
        assert len(set(groups[members])) == 1
    rep = split.duplicate_report(df, groups)
    assert rep["redundant_files"] >= 25 and rep["groups_with_duplicates"] >= 22
    assert rep["label_conflict_groups"] == 0  # PROVENANCE: no md5 under both yes and no
    table = split.duplicate_groups_table(df, groups)
    assert table["reason"].str.contains("exact").sum() == 22 + 25
    s = split.split_groups(df, groups, seed=0)
    assert split.leakage(df, s, groups)["straddling_groups"] == 0
    for label in (0, 1):
        frac = pd.Series(s[df.label == label]).value_counts(normalize=True)
        assert abs(frac["train"] - 0.7) < 0.05 and frac["val"] > 0.1 and frac["test"] > 0.1


def test_parameter_validation() -> None:
    df = pd.DataFrame({"dhash": [1, 2], "sha256": ["a", "b"], "label": [0, 1]})
    with pytest.raises(ValueError, match="thumb"):
        split.find_duplicate_groups(df, min_corr=0.8)
    with pytest.raises(ValueError, match="max_hamming"):
        split.find_duplicate_groups(df, max_hamming=-1, min_corr=None)
    with pytest.raises(ValueError, match="confirm_on"):
        split.find_duplicate_groups(df, confirm_on="ssim")
    with pytest.raises(ValueError, match="fractions"):
        split.split_groups(df, np.arange(2), fractions=(0.5, 0.5))
    assert split.find_duplicate_groups(df.iloc[:0]).shape == (0,)
    assert list(itertools.chain(split.split_groups(df.iloc[:0], np.zeros(0, int)))) == []


# ----------------------------------------------------------------------------------------------------
# patients, sources and leave-one-source-out


def test_patient_groups_union_duplicates_and_patients_per_source() -> None:
    df = pd.DataFrame(
        {
            "path": [f"f{i}" for i in range(9)],
            "label": 0,
            "patient_id": [None, "p1", None, "p2", "", "p1", "p1", "p2", None],
            "source": ["A", "A", "A", "A", "A", "A", "B", "B", "B"],
        }
    )
    dup = np.array([0, 0, 1, 2, 3, 4, 5, 6, 6])  # duplicate groups: {0,1}, {7,8}
    g = split.patient_groups(df, dup)
    # row 5 joins {0,1} through patient A/p1; B/p1 (row 6) and B/p2 (7, 8) are other patients
    assert g[0] == g[1] == g[5] and len({g[0], g[6], g[7], g[3]}) == 4 and g[7] == g[8]
    assert g[2] != g[4] and g[4] not in (g[0], g[3])  # blank / null ids link nothing
    assert (split.patient_groups(df.drop(columns="patient_id"), dup) == dense_ids(dup)).all()
    # without a source column the ids are global: B/p1 joins A/p1
    g2 = split.patient_groups(df.drop(columns="source"), dup)
    assert g2[6] == g2[1] and g2[3] == g2[7] == g2[8]
    # find_duplicate_groups scopes patient ids by source the same way
    fd = split.find_duplicate_groups(df.assign(sha256=None), min_corr=None)
    assert fd[1] == fd[5] and fd[6] != fd[1] and fd[3] != fd[7]
    assert set(split.duplicate_groups_table(df, fd)["reason"]) == {"patient"}


def test_split_groups_keeps_patients_together_with_duplicates() -> None:
    rng = np.random.default_rng(7)
    rows = []
    for p in range(60):  # 60 patients x 5 slices; patient label decides the class
        for k in range(5):
            rows.append({"path": f"p{p}_{k}", "patient_id": f"P{p}", "label": p % 2})
    for i in range(120):  # files without a patient id
        rows.append({"path": f"x{i}", "patient_id": None, "label": i % 2})
    df = pd.DataFrame(rows).assign(sha256=lambda d: d["path"])
    dup = np.arange(len(df))
    # duplicates: some id-less files copy a patient's slice (must follow the patient), some pair up
    for i in range(0, 40, 2):
        dup[300 + i] = dup[int(rng.integers(0, 300))]
    dup[380:400] = dup[360:380]
    s = split.split_groups(df, dup, seed=1)
    assert (df.assign(s=s).groupby("patient_id")["s"].nunique() == 1).all()
    merged = split.patient_groups(df, dup)
    assert split.leakage(df, s, merged)["straddling_groups"] == 0
    assert split.leakage(df, s, dup)["straddling_groups"] == 0
    frac = pd.Series(s).value_counts(normalize=True)
    assert abs(frac["train"] - 0.7) < 0.05 and frac["val"] > 0.1 and frac["test"] > 0.1
    # ignoring patients (no column) does split them: the grouping is what keeps them together
    s0 = split.split_groups(df.drop(columns="patient_id"), dup, seed=1)
    assert (df.assign(s=s0).groupby("patient_id")["s"].nunique() > 1).any()


def test_ixi_manifest_patients_never_straddle_splits() -> None:
    from raytumor.ingest import list_labelled

    manifest = DATA / "ixi-t1-nichart-42" / "manifest.csv"
    if not manifest.is_file():
        pytest.skip(f"shared data not found at {manifest}")
    files = list_labelled(str(manifest)).files
    png = files[files["path"].str.endswith(".png")].reset_index(drop=True)
    assert len(png) == 420 and png["patient_id"].nunique() == 42
    assert set(png["source"]) == {"IXI T1 (2mm, uint8 downsampled)"}  # "NAME via ..." counts as NAME
    rows = [
        row(p, Path(p).read_bytes(), label=0, patient_id=pid)
        for p, pid in zip(png["path"], png["patient_id"], strict=True)
    ]
    df = pd.DataFrame(rows).assign(source=png["source"])
    groups = split.find_duplicate_groups(df)
    assert len(set(groups)) == 42  # one group per subject: slices join by patient, subjects stay apart
    for g in (groups, np.arange(len(df))):  # split_groups merges patients itself, too
        s = split.split_groups(df, g, seed=0)
        per_patient = df.assign(s=s).groupby("patient_id")["s"]
        assert (per_patient.nunique() == 1).all() and (per_patient.size() == 10).all()
        assert set(s) == {"train", "val", "test"}


def test_source_key() -> None:
    from raytumor.ingest import source_key

    ixi = "IXI T1 (2mm, uint8 downsampled) via github:CBICA/NiChart_Project@e69:test_data/x.nii.gz"
    assert source_key(ixi, "data/m.csv") == "IXI T1 (2mm, uint8 downsampled)"
    assert source_key("br35h-3000", "d") == "br35h-3000"
    assert source_key("  Kaggle set  via  x via y", "d") == "Kaggle set"
    for missing in (None, float("nan"), pd.NA, "", "   ", " via somewhere"):
        assert source_key(missing, "../shared/data/navoneel-253") == "../shared/data/navoneel-253"


def test_list_labelled_several_sources(tmp_path: Path) -> None:
    from raytumor.ingest import list_labelled

    for root, classes in (("a", ("no", "yes")), ("b", ("no_tumor",))):
        for c in classes:
            (tmp_path / root / c).mkdir(parents=True)
            for i in range(3):
                (tmp_path / root / c / f"{c}{i}.png").write_bytes(b"x")
    (tmp_path / "c").mkdir()
    pd.DataFrame(
        {
            "path": ["s1.png", "s2.png", "s3.png"],
            "label": ["yes", "no", "yes"],
            "patient_id": ["7", None, "7"],
            "source": ["Site X via scanner 1", None, "Site X via scanner 2"],
        }
    ).to_csv(tmp_path / "c" / "m.csv", index=False)
    a, b, c = str(tmp_path / "a"), str(tmp_path / "b"), str(tmp_path / "c" / "m.csv")
    lst = list_labelled([a, b, c])
    f = lst.files.set_index(lst.files["path"].map(lambda p: Path(p).name))
    assert f.loc["no0.png", "source"] == a and f.loc["no_tumor0.png", "source"] == b
    assert list(f.loc[["s1.png", "s2.png", "s3.png"], "source"]) == ["Site X", c, "Site X"]
    assert lst.class_aliases == {"no_tumor": "no"} and set(f["class_name"]) == {"no", "yes"}
    assert f.loc["s1.png", "patient_id"] == "7" and f["patient_id"].isna().sum() == len(f) - 2
    assert lst.summary()["per_source"] == {a: 6, b: 3, "Site X": 2, c: 1}
    assert list_labelled([a]).files["source"].eq(a).all()  # one source: the data argument
    with pytest.raises(ValueError, match="more than one data argument"):
        list_labelled([a, a])


def test_holdout_split_one_source_is_the_test_split() -> None:
    rng = np.random.default_rng(0)
    n_a, n_c = 200, 40
    df = pd.DataFrame(
        {
            "path": [f"r{i}" for i in range(n_a + n_c)],
            "label": np.r_[rng.integers(0, 2, n_a), np.zeros(n_c, int)],  # held-out C: negatives only
            "source": ["A"] * (n_a // 2) + ["B"] * (n_a // 2) + ["C"] * n_c,
            "patient_id": [None] * n_a + [f"c{i // 4}" for i in range(n_c)],
        }
    )
    groups = np.arange(len(df))
    groups[[3, 150]] = groups[n_a + 1]  # A and B files duplicating a held-out file
    groups[[10, 11]] = 10  # a duplicate pair inside A, away from the boundary
    groups[12] = groups[n_a + 6]  # duplicates another slice of held-out patient c1
    held = (df["source"] == "C").to_numpy()
    s, dropped = split.holdout_split(df, groups, held, fractions=(0.7, 0.15, 0.15), seed=0)
    assert dropped == 3 and set(s[[3, 150, 12]]) == {split.HOLDOUT_DUPLICATE}
    assert (s[held] == "test").all() and set(s[~held]) == {"train", "val", split.HOLDOUT_DUPLICATE}
    assert s[10] == s[11]
    used = s[~held & (s != split.HOLDOUT_DUPLICATE)]
    assert abs((used == "train").mean() - 0.7 / 0.85) < 0.03  # train:val ratio kept
    for src in ("A", "B"):
        assert set(s[(df["source"] == src).to_numpy()]) >= {"train", "val"}
    assert split.holdout_split(df, groups, held, seed=0)[0].tolist() == s.tolist()  # deterministic
    with pytest.raises(ValueError, match="train \\+ val"):
        split.holdout_split(df, groups, held, fractions=(0, 0, 1))
    with pytest.raises(ValueError, match="shape"):
        split.holdout_split(df, groups, held[:-1])
