"""Leakage-safe splitting: group exact/near duplicates and same-patient files, then split by group.

Public datasets of brain MRI slices are full of re-saved, resized and re-contrasted copies of the same
scan (br35h-3000 contains most of navoneel-253; a plain 70/15/15 split of br35h puts a near-duplicate of
most test images in train). Every file is therefore fingerprinted once at ingest (:func:`fingerprint`),
files are linked into groups (:func:`find_duplicate_groups`) and whole groups go to one split
(:func:`split_groups`). :func:`match_reference` applies the same rules across datasets, e.g. to drop
evaluation files that duplicate a model's training files.

Near-duplicate search is multi-index hashing on 64-bit dHashes: split the bits into ``d + k`` chunks;
two hashes within Hamming distance ``d`` agree exactly on at least ``k`` chunks (pigeonhole), so exact
lookups on every combination of ``k`` chunks find all candidates without comparing all pairs. Candidates
are then checked exactly (popcount) and, by default, confirmed by the Pearson correlation of the 32x32
thumbnails' gradients, because on small, uniformly framed brain slices dHash alone (and even raw-pixel
correlation) links scans of different people (ixi-t1-nichart-42 vs br35h-3000, IXI subjects among
themselves); see the comment on the defaults below.

Each file is matched in up to four ways ("views"): its whole image (``dhash``/``thumb``), the square around
its head (``dhash_crop``/``thumb_crop``: re-framed, cropped and re-padded copies), and the horizontal mirror
of each (derived from the stored fields at search time: br35h-3000 holds thousands of mirrored copies).
Patient ids (a manifest's ``patient_id``, scoped by its ``source``: ids of different datasets are not
comparable) join groups too, so all scans of one patient land in one split. :func:`holdout_split` is the
leave-one-source-out variant: one source is the whole test split. Cross-validation folds come from
:func:`assign_folds` (whole groups per fold, stratified like the split) or :func:`source_folds` (one source
per fold); each fold is then held out with :func:`holdout_split`.
Pure numpy/pandas: runs on the driver over catalogue columns, no pixels needed after ingest.
"""

from __future__ import annotations

import itertools
import math
import zlib
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import imagehash
import numpy as np
import pandas as pd
from PIL import Image, ImageFilter

from raytumor.groups import (
    components,
    dense_ids,
    equal_value_edges,
    null_strings,
    patient_groups,
    patient_keys,
)

__all__ = [
    "CONFIRM_MEASURES",
    "DEFAULT_CROP_MIN_CORR",
    "DEFAULT_MAX_HAMMING",
    "DEFAULT_MIN_CORR",
    "HOLDOUT_DUPLICATE",
    "SPLIT_NAMES",
    "THUMB_SIZE",
    "assign_folds",
    "duplicate_groups_table",
    "duplicate_report",
    "find_duplicate_groups",
    "fingerprint",
    "hamming",
    "holdout_split",
    "leakage",
    "match_reference",
    "patient_groups",
    "source_folds",
    "split_groups",
    "thumb_features",
]

# Chosen by bench/dup_threshold.py on ../shared/data (navoneel-253 + br35h-3000 + ixi-t1-nichart-42/no_tumor,
# 3673 images). Scored against: md5 or 64x64 fit-to-square pixel r >= 0.90 ("true", Kaggle sets only);
# "true+" = the same check also against the other image's mirror and between foreground crops (the pixel
# check cannot see mirrored or re-framed copies); known-false links (IXI vs Kaggle, two different IXI
# subjects, and Kaggle yes<->no files); 1200 re-saved br35h copies (half size + gamma + JPEG q60, unsharp +
# JPEG q75) plus 600 each mirrored, re-framed and 3%-cut copies that must link to their source.
# - dHash alone is not enough: at d <= 4 it links 209 IXI<->Kaggle pairs (PROVENANCE: 195 with br35h) and
#   2498 known-false pairs in all, merging all 42 IXI subjects into one group.
# - Raw-pixel thumbnail r cannot fix that: different IXI subjects reach r 0.96 (and 64px r 0.95), every
#   slice being a bright oval on black. Gradient r of the 32x32 thumbnail tops out at 0.72 for them
#   (0.51 for IXI<->Kaggle) while 99% of re-saved copies score >= 0.95.
# - Whole image, d <= 8, gradient r >= 0.80 (Table 2): 0 known-false links, Kaggle pair precision 0.99 /
#   recall 0.81, re-saved copies found 0.997. But br35h-3000 is full of mirrored and re-framed copies:
#   after split_groups 43/450 br35h test images (mean of 40 seeds; 38 at seed 0) keep a true duplicate in
#   train and 207/450 a true+ one (plain stratified split: 403 / 429 at seed 0).
# - Adding the mirror views (Table 3; each view also against the other file's mirror image) and the head
#   view (dhash_crop/thumb_crop, confirmed at r >= 0.85): still 0 known-false, IXI<->Kaggle or yes<->no
#   links, 42/42 IXI subjects apart, Kaggle precision vs true+ 0.985 (0.56 vs plain true: mirror copies
#   count as false there), true+ recall 0.46 -> 0.93; mirrored copies found 1.000, re-framed 0.93, 3% cut
#   0.49 (the cut often reaches the skull of these tightly framed scans); br35h leakage 43 -> 11.2 true
#   (14 at seed 0) and 207 -> 12.9 true+. Head view at 0.80 links some different scans (checked by
#   eye at r 0.81-0.84; one yes<->no link, true+ precision 0.983), 0.90 loses re-framed copies (0.89)
#   and leaks more (13.5).
# - What is left is mostly two clusters of heavily sharpened / re-contrasted copies whose thumbnail
#   gradient r tops out at 0.59-0.67 (below the 0.72 of different IXI subjects: no threshold separates
#   them) and edge-enhanced copies at dHash 11..23. d = 10 gains little (9.5/450) while the search cost
#   grows ~5x (C(d+k, k) chunk combinations: 2e5 random hashes take 0.8 s per view at d = 8, 4 s at d = 10;
#   the four views of the default rule 7.2 s at d = 8).
DEFAULT_MAX_HAMMING = 8
DEFAULT_MIN_CORR: float | None = 0.80
DEFAULT_CROP_MIN_CORR: float | None = 0.85  # stricter: cropped to the head, different scans align better

# 32x32 (1 KiB per file): at 16x16 different IXI subjects already reach gradient r 0.89 (0.72 at 32x32).
THUMB_SIZE = 32
SPLIT_NAMES = ("train", "val", "test")
# holdout_split's label for train/val-side files that duplicate a held-out file: used nowhere
HOLDOUT_DUPLICATE = "holdout_duplicate"
_CROP_WORK = 256  # head view from an area-downscaled copy: its hash and thumbnail are 9x8 and 32x32 anyway
_CROP_DETECT = 96  # foreground threshold taken at this size
_MAX_K = 4  # at most C(d+4, 4) chunk combinations per search
_PAIR_BLOCK = 8192  # row pairs per correlation batch: 2 x 8192 x 1984 float32 gradient features = 130 MB
CONFIRM_MEASURES = ("gradient", "pixel")


# ----------------------------------------------------------------------------------------------------
# Fingerprints


def fingerprint(gray: np.ndarray) -> dict:
    """Per-file grouping fields for the ingest catalogue, from a decoded (H, W) uint8 image.

    ``dhash``: imagehash's 64-bit difference hash, bits packed row-major (``hex(dhash & (2**64-1))`` equals
    ``str(imagehash.dhash(img))``) and stored as signed int64 so Arrow keeps it exact. ``thumb``:
    THUMB_SIZE x THUMB_SIZE uint8 bytes, area-averaged (same aspect-ignoring geometry as the dHash) and
    min-max stretched, used to confirm dHash candidates by Pearson correlation.
    ``dhash_crop`` / ``thumb_crop``: the same two fields of the head region (:func:`_head_square`: the
    foreground box, zero-padded to a square), which do not change when a copy is cropped or re-padded. Its
    dHash compares pixels outward from the vertical midline, so a mirrored copy's hash is exactly the
    stored one with each row's bits reversed (the plain dHash's mirror also flips the tied bits of flat
    background; see :func:`_mirror_hashes`).
    """
    gray = np.asarray(gray)
    if gray.ndim != 2 or gray.dtype != np.uint8 or gray.size == 0:
        raise ValueError(f"fingerprint expects a non-empty (H, W) uint8 array, got {gray.dtype} {gray.shape}")
    img = Image.fromarray(np.ascontiguousarray(gray), mode="L")
    bits = imagehash.dhash(img).hash  # (8, 8) bool
    head = Image.fromarray(_head_square(img), mode="L")
    return {
        "dhash": _pack_bits(bits),
        "thumb": _thumb(img),
        "dhash_crop": _pack_bits(_outward_dhash_bits(head)),
        "thumb_crop": _thumb(head),
    }


def _pack_bits(bits: np.ndarray) -> int:
    """(8, 8) bool, row-major, first bit most significant -> signed int64 value as a Python int."""
    return int(np.packbits(np.asarray(bits, dtype=bool).ravel()).view(">i8")[0])


def _thumb(img: Image.Image) -> bytes:
    # BOX = exact area average: antialiased and the fastest PIL filter for large downscales.
    t = np.asarray(img.resize((THUMB_SIZE, THUMB_SIZE), Image.Resampling.BOX), dtype=np.float32)
    lo, hi = float(t.min()), float(t.max())
    t = (t - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(t)
    return np.rint(t).astype(np.uint8).tobytes()


def _outward_dhash_bits(img: Image.Image) -> np.ndarray:
    """dHash bits (imagehash's 9x8 Lanczos grid) with the left half compared right-to-left: every bit
    says "brighter towards the image edge", so mirroring the image only reverses each row's bits (ties
    stay 0 on both sides)."""
    p = np.asarray(img.resize((9, 8), Image.Resampling.LANCZOS), dtype=np.int16)
    inc = p[:, 1:] > p[:, :-1]
    dec = p[:, :-1] > p[:, 1:]
    return np.concatenate([dec[:, :4], inc[:, 4:]], axis=1)


def _fit_within(img: Image.Image, side: int) -> Image.Image:
    """Area-downscale so that the longer side is at most ``side`` (aspect kept)."""
    w, h = img.size
    if max(w, h) <= side:
        return img
    s = side / max(w, h)
    return img.resize((max(1, round(w * s)), max(1, round(h * s))), Image.Resampling.BOX)


def _otsu(x: np.ndarray) -> int | None:
    """Otsu's threshold of a uint8 array (value t splits x <= t from x > t); None when x is flat."""
    hist = np.bincount(x.ravel(), minlength=256).astype(np.float64)
    p = hist / hist.sum()
    w = np.cumsum(p)
    mu = np.cumsum(p * np.arange(256))
    between = w * (1 - w)
    ok = between > 1e-12
    if not ok.any():
        return None
    score = np.zeros(256)
    score[ok] = (mu[-1] * w[ok] - mu[ok]) ** 2 / between[ok]
    return int(score.argmax())


def _head_square(img: Image.Image) -> np.ndarray:
    """The foreground box of an image, zero-padded (centred) to a square, at most _CROP_WORK pixels.

    Foreground = brighter than half of Otsu's threshold (taken on a _CROP_DETECT-pixel area average, where
    noise has averaged out): half of Otsu keeps dark tissue and the skull inside the box while a black or
    noisy background stays out. The box is found at the working resolution (a box snapped to a coarse
    grid misaligns copies of different sizes by a thumbnail pixel, which the gradient confirmation
    punishes), on a 3x3-blurred copy, over the rows/columns holding at least 1.5% as many foreground pixels
    as the widest one, so that JPEG specks and isolated noise pixels do not stretch it. Padding with the aspect kept (rather than stretching) makes
    a crop that cuts into the head change the view only locally.
    """
    work = _fit_within(img, _CROP_WORK)
    pix = np.asarray(work)
    t = _otsu(np.asarray(_fit_within(work, _CROP_DETECT)))
    if t is not None:
        fg = np.asarray(work.filter(ImageFilter.BoxBlur(1))) > t // 2
        across, down = fg.sum(axis=1), fg.sum(axis=0)  # relative to the head's extent, not the padding's
        rows = np.flatnonzero(across >= max(1.0, 0.015 * across.max()))
        cols = np.flatnonzero(down >= max(1.0, 0.015 * down.max()))
        if len(rows) and len(cols):
            pix = pix[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    h, w = pix.shape
    side = max(h, w)
    out = np.zeros((side, side), dtype=np.uint8)
    out[(side - h) // 2 : (side - h) // 2 + h, (side - w) // 2 : (side - w) // 2 + w] = pix
    return out


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Elementwise Hamming distance between two arrays of 64-bit hashes (int64 or uint64)."""
    x = np.bitwise_xor(np.asarray(a).view(np.uint64), np.asarray(b).view(np.uint64))
    if hasattr(np, "bitwise_count"):  # numpy >= 2.0
        return np.bitwise_count(x).astype(np.int64)
    return _POPCOUNT8[x.reshape(-1, 1).view(np.uint8)].sum(axis=1).reshape(x.shape).astype(np.int64)


_U64 = (1 << 64) - 1
_POPCOUNT8 = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


# ----------------------------------------------------------------------------------------------------
# Column access


def _hash_array(df: pd.DataFrame, col: str = "dhash") -> tuple[np.ndarray, np.ndarray]:
    """(valid mask, uint64 hashes) from df[col]; missing hashes (decode errors) are invalid."""
    if col not in df.columns:
        return np.zeros(len(df), dtype=bool), np.zeros(len(df), dtype=np.uint64)
    s = df[col]
    if pd.api.types.is_float_dtype(s.dtype):
        # Arrow int64 columns with nulls become float64 in to_pandas(): the low bits are already gone.
        raise TypeError(
            f"{col} column is float (int64 with nulls converted by to_pandas?); read it as an integer "
            "column, e.g. to_pandas(types_mapper=pd.ArrowDtype) or integer_object_nulls=True"
        )
    valid = s.notna().to_numpy()
    if pd.api.types.is_integer_dtype(s.dtype) and valid.all():
        return valid, s.to_numpy(dtype=np.int64).view(np.uint64)
    out = np.zeros(len(df), dtype=np.uint64)
    if valid.any():  # object/nullable columns: Python ints, possibly given unsigned
        out[valid] = np.array([int(v) & _U64 for v in s[valid]], dtype=np.uint64)
    return valid, out


def _thumb_array(
    df: pd.DataFrame, need: bool, col_name: str = "thumb"
) -> tuple[np.ndarray, np.ndarray | None]:
    """(usable mask, (N, P) uint8 thumbnails or None). Flat thumbnails are unusable: no content to match."""
    n = len(df)
    if col_name not in df.columns:
        if need:
            raise ValueError(
                f"min_corr is set but df has no {col_name!r} column (pass min_corr=None for dHash only)"
            )
        return np.ones(n, dtype=bool), None
    # bytes from the catalogue; uint8 arrays also accepted (some Arrow/pandas round trips produce them)
    col = [t.astype(np.uint8).tobytes() if isinstance(t, np.ndarray) else t for t in df[col_name].tolist()]
    sizes = [len(t) if isinstance(t, (bytes, bytearray, memoryview)) else 0 for t in col]
    p = max(sizes, default=0)
    ok = np.array([s == p and s > 0 for s in sizes], dtype=bool)
    thumbs = np.zeros((n, max(p, 1)), dtype=np.uint8)
    if ok.any():
        thumbs[ok] = np.frombuffer(
            b"".join(bytes(col[i]) for i in np.flatnonzero(ok)), dtype=np.uint8
        ).reshape(-1, p)
    ok &= thumbs.max(axis=1) > thumbs.min(axis=1)
    return ok, thumbs


# ----------------------------------------------------------------------------------------------------
# Views


class _View(NamedTuple):
    """A fingerprint pair and how its hash maps under a horizontal mirror."""

    hash_col: str
    thumb_col: str
    mirror_inverts: bool  # plain dHash: mirrored bits also flip (p[c+1] > p[c] becomes p[c] > p[c+1])


_FULL = _View("dhash", "thumb", True)
_CROP = _View("dhash_crop", "thumb_crop", False)
_REVERSE8 = np.array([int(f"{i:08b}"[::-1], 2) for i in range(256)], dtype=np.uint8)


def _mirror_hashes(h: np.ndarray, invert: bool) -> np.ndarray:
    """Hashes of the horizontally mirrored images: one byte per hash row, so reverse the bits of every
    byte (and invert them for the plain dHash, whose flat-background ties then come out 1 instead of 0:
    a few bits of extra distance, median 2 on the shared data)."""
    b = _REVERSE8[np.ascontiguousarray(h, dtype=np.uint64).view(np.uint8)]
    out = b.view(np.uint64).reshape(h.shape)
    return ~out if invert else out


def _present(df: pd.DataFrame, view: _View, need_thumb: bool) -> bool:
    return view.hash_col in df.columns and (view.thumb_col in df.columns or not need_thumb)


# ----------------------------------------------------------------------------------------------------
# Multi-index hashing


def _chunk_masks(max_hamming: int, n: int) -> list[int]:
    """64-bit masks, one per combination of k of (max_hamming + k) chunks, with k picked for size n.

    k = 1 is the classic pigeonhole (one chunk equal); larger k gives longer keys (fewer random
    collisions at large n) at the price of more combinations. Cost model: combos x (n + expected
    colliding pairs n^2 / 2^bits).
    """
    d = max_hamming
    best: tuple[float, list[int]] | None = None
    for k in range(1, _MAX_K + 1):
        m = d + k
        if m > 64:
            break
        edges = [round(64 * i / m) for i in range(m + 1)]
        chunk = [((1 << (edges[i + 1] - edges[i])) - 1) << edges[i] for i in range(m)]
        combos = math.comb(m, k)
        bits = 64 * k / m
        cost = combos * (n + n * n / 2.0**bits)
        if best is None or cost < best[0]:
            masks = [sum(chunk[i] for i in c) for c in itertools.combinations(range(m), k)]
            best = (cost, masks)
    assert best is not None
    return best[1]


def _equal_key_pairs(keys: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """All index pairs (i, j), i != j unordered, with keys[i] == keys[j], in bounded-size blocks.

    Sort once; pass s pairs each sorted position with the one s further on while both are in one run
    of equal keys. Positions whose run has ended drop out, so total work ~ number of pairs.
    """
    order = np.argsort(keys)  # introsort: ~6x faster than stable here; pairs are deduplicated later
    sk = keys[order]
    n = len(sk)
    if n < 2:
        return
    starts = np.flatnonzero(np.r_[True, sk[1:] != sk[:-1]])
    run_end = np.repeat(np.r_[starts[1:], n], np.diff(np.r_[starts, n]))  # exclusive end per position
    pos = np.flatnonzero(run_end - np.arange(n) > 1)
    s = 1
    while len(pos):
        yield order[pos], order[pos + s]
        s += 1
        pos = pos[run_end[pos] - pos > s]


def _near_value_pairs(
    vals: np.ndarray, max_hamming: int, ref: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Pairs of indices into distinct uint64 ``vals`` within ``max_hamming`` (i < j), or with ``ref``
    given, pairs (i into vals, j into ref) including equal values."""
    both = vals if ref is None else np.concatenate([vals, ref])
    nq = len(vals)
    out_a: list[np.ndarray] = []
    out_b: list[np.ndarray] = []
    if len(both) < 2 or (ref is not None and (nq == 0 or len(ref) == 0)):
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    for mask in _chunk_masks(max_hamming, len(both)):
        keys = both & np.uint64(mask)
        for a, b in _equal_key_pairs(keys):
            if ref is not None:
                cross = (a < nq) != (b < nq)
                a, b = a[cross], b[cross]
                a, b = np.minimum(a, b), np.maximum(a, b)
            close = hamming(both[a], both[b]) <= max_hamming
            if close.any():
                out_a.append(a[close])
                out_b.append(b[close])
    if not out_a:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    a, b = np.concatenate(out_a), np.concatenate(out_b)
    if ref is None:
        a, b = np.minimum(a, b), np.maximum(a, b)
    code = np.unique(a.astype(np.int64) * len(both) + b)  # a pair collides on several chunk combos
    a, b = code // len(both), code % len(both)
    if ref is not None:
        b = b - nq
    return a, b


class _ValueIndex:
    """Rows grouped by distinct hash value: value v owns rows[start[v]:start[v] + count[v]]."""

    def __init__(self, rows: np.ndarray, hashes: np.ndarray) -> None:
        self.vals, inv, self.count = np.unique(hashes, return_inverse=True, return_counts=True)
        order = np.argsort(inv, kind="stable")
        self.rows = rows[order]
        self.start = np.r_[0, np.cumsum(self.count)[:-1]]
        self.inv = inv


def _expand_row_pairs(
    ia: _ValueIndex, ib: _ValueIndex, va: np.ndarray, vb: np.ndarray, same_side: bool
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Row pairs for value pairs (va[p] in ia, vb[p] in ib): their rows' cross product, in blocks.

    With ``same_side`` (one index, va == vb allowed) each unordered row pair is produced once.
    """
    ca, cb = ia.count[va], ib.count[vb]
    cnt = ca.astype(np.int64) * cb
    cum = np.cumsum(cnt)
    total = int(cum[-1]) if len(cum) else 0
    for k0 in range(0, total, _PAIR_BLOCK):
        k = np.arange(k0, min(total, k0 + _PAIR_BLOCK), dtype=np.int64)
        p = np.searchsorted(cum, k, side="right")
        local = k - (cum[p] - cnt[p])
        la, lb = local // cb[p], local % cb[p]
        ra = ia.rows[ia.start[va[p]] + la]
        rb = ib.rows[ib.start[vb[p]] + lb]
        if same_side:
            keep = (va[p] != vb[p]) | (la < lb)
            ra, rb = ra[keep], rb[keep]
        yield ra, rb


def thumb_features(thumbs: np.ndarray, confirm_on: str = "gradient") -> np.ndarray:
    """Zero-mean, unit-norm confirmation features of (N, P) uint8 thumbnails: the dot product of two rows
    is the Pearson r that :func:`find_duplicate_groups` compares with ``min_corr`` (for analysis, small N)."""
    thumbs = np.asarray(thumbs, dtype=np.uint8)
    return _Corr(thumbs, measure=confirm_on).unit(thumbs)


class _Corr:
    """Pearson correlation between thumbnail rows ``ta[a]`` and ``tb[b]``, computed per pair batch.

    ``gradient`` (default) correlates the thumbnails' horizontal and vertical finite differences rather
    than the pixels: every axial brain slice is a bright oval on black, which alone gives raw-pixel
    r ~0.9 between different people (different IXI subjects reach 0.96 at 32x32), whereas edges carry the
    individual anatomy (different IXI subjects <= 0.72; 99% of re-saved copies >= 0.95).
    """

    def __init__(
        self, ta: np.ndarray, tb: np.ndarray | None = None, measure: str = "gradient", mirror_b: bool = False
    ) -> None:
        if measure not in CONFIRM_MEASURES:
            raise ValueError(f"confirm_on must be one of {CONFIRM_MEASURES}, got {measure!r}")
        self.ta, self.tb = ta, ta if tb is None else tb
        self.mirror_b = mirror_b  # compare ta rows with horizontally mirrored tb rows
        self.gradient = measure == "gradient"
        if self.ta.shape[1] != self.tb.shape[1]:
            raise ValueError(f"thumbnail sizes differ: {self.ta.shape[1]} vs {self.tb.shape[1]} bytes")
        self.side = math.isqrt(ta.shape[1])
        if (self.gradient or mirror_b) and self.side**2 != ta.shape[1]:
            raise ValueError(
                f"gradient or mirror confirmation needs square thumbnails, got {ta.shape[1]} bytes"
            )

    def unit(self, t: np.ndarray) -> np.ndarray:
        """Features of uint8 thumbnails, centred and scaled to unit norm (flat rows stay zero)."""
        x = t.astype(np.float32)
        if self.gradient:
            x = x.reshape(len(x), self.side, self.side)
            x = np.concatenate(
                [np.diff(x, axis=2).reshape(len(x), -1), np.diff(x, axis=1).reshape(len(x), -1)], 1
            )
        x -= x.mean(axis=1, keepdims=True)
        norm = np.linalg.norm(x, axis=1, keepdims=True)
        return x / np.where(norm > 1e-3, norm, np.inf)

    def __call__(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        # Features once per distinct row of the batch: duplicate clusters repeat rows many times.
        ua, ia = np.unique(a, return_inverse=True)
        ub, ib = np.unique(b, return_inverse=True)
        tb = self.tb[ub]
        if self.mirror_b:
            tb = tb.reshape(len(tb), self.side, self.side)[:, :, ::-1].reshape(len(tb), -1)
        fa, fb = self.unit(self.ta[ua]), self.unit(tb)
        return np.einsum("ij,ij->i", fa[ia.reshape(-1)], fb[ib.reshape(-1)])


def _near_row_pairs(
    hashes: np.ndarray,
    rows: np.ndarray,
    max_hamming: int,
    corr: _Corr | None,
    min_corr: float | None,
    ref_hashes: np.ndarray | None = None,
    ref_rows: np.ndarray | None = None,
    ordered: bool = False,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Confirmed near-duplicate row pairs; within ``rows`` or, with ``ref_*``, between rows and ref rows.

    ``ordered``: keep only pairs with row < ref row, for a search of rows against their own mirror images
    (each unordered pair is found in both orders, with the same correlation; a row against itself is
    just a symmetric image).
    """
    ia = _ValueIndex(rows, hashes)
    if ref_hashes is None:
        ib = ia
        va, vb = _near_value_pairs(ia.vals, max_hamming)
        multi = np.flatnonzero(ia.count > 1)  # identical hashes: distance 0 within one value
        va, vb = np.r_[va, multi], np.r_[vb, multi]
    else:
        assert ref_rows is not None
        ib = _ValueIndex(ref_rows, ref_hashes)
        va, vb = _near_value_pairs(ia.vals, max_hamming, ib.vals)
    if min_corr is None:
        # Unconfirmed: linking one row of each value pair (plus all rows of a value) is enough.
        if ref_hashes is None:
            yield rows, ia.rows[ia.start[ia.inv]]
            yield ia.rows[ia.start[va]], ia.rows[ia.start[vb]]
        else:
            for ra, rb in _expand_row_pairs(ia, ib, va, vb, same_side=False):
                keep = ra < rb if ordered else slice(None)
                yield ra[keep], rb[keep]
        return
    assert corr is not None
    for ra, rb in _expand_row_pairs(ia, ib, va, vb, same_side=ref_hashes is None):
        if ordered:
            keep = ra < rb
            ra, rb = ra[keep], rb[keep]
        ok = corr(ra, rb) >= min_corr
        yield ra[ok], rb[ok]


# ----------------------------------------------------------------------------------------------------
# Union-find


# ----------------------------------------------------------------------------------------------------
# Public API: grouping and matching


def _check_params(
    max_hamming: int, min_corr: float | None, confirm_on: str, crop_min_corr: float | None = None
) -> None:
    if confirm_on not in CONFIRM_MEASURES:
        raise ValueError(f"confirm_on must be one of {CONFIRM_MEASURES}, got {confirm_on!r}")
    if not 0 <= int(max_hamming) <= 32:
        raise ValueError(f"max_hamming must be in 0..32, got {max_hamming}")
    for name, c in (("min_corr", min_corr), ("crop_min_corr", crop_min_corr)):
        if c is not None and not -1.0 <= float(c) <= 1.0:
            raise ValueError(f"{name} must be in [-1, 1] or None, got {c}")


def _views(
    frames: Sequence[pd.DataFrame], min_corr: float | None, crop_min_corr: float | None
) -> list[tuple[_View, float | None]]:
    """(view, confirmation threshold) for the views every frame has. The head view needs its columns
    (catalogues and bundles written before it existed have only the whole-image view) and is confirmed
    at ``crop_min_corr`` (None: off) unless everything is unconfirmed (``min_corr=None``)."""
    out: list[tuple[_View, float | None]] = [(_FULL, min_corr)]
    c = None if min_corr is None else crop_min_corr
    if crop_min_corr is not None and all(_present(f, _CROP, c is not None) for f in frames):
        out.append((_CROP, c))
    return out


def find_duplicate_groups(
    df: pd.DataFrame,
    max_hamming: int = DEFAULT_MAX_HAMMING,
    min_corr: float | None = DEFAULT_MIN_CORR,
    *,
    confirm_on: str = "gradient",
    mirror: bool = True,
    crop_min_corr: float | None = DEFAULT_CROP_MIN_CORR,
) -> np.ndarray:
    """An int64 group id per row (0..G-1, numbered by first row): connected components of

    (a) identical non-null ``sha256`` (not for blank images: a flat thumbnail); (b) near-duplicates (never between two rows whose manifest names
    different patients: those ids are authoritative, and low slices of different patients — near-empty
    skull-base images — would otherwise chain whole patients together): ``dhash`` within ``max_hamming`` bits, confirmed
    by ``thumb`` Pearson correlation >= ``min_corr`` (``None``: dHash only) of the thumbnails' gradients
    (``confirm_on="gradient"``, see :class:`_Corr`) or raw pixels (``"pixel"``); likewise the head view
    ``dhash_crop``/``thumb_crop`` at ``crop_min_corr`` (used when the columns exist; ``None``: off); with
    ``mirror`` also each view against the horizontal mirror of the other file's; (c) identical non-null
    ``patient_id`` (within one ``source`` when the column exists).
    Rows without a fingerprint (null dhash or thumb, e.g. decode errors) and rows with a flat thumbnail
    take part only in (a) and (c) (per view: a flat head thumbnail only drops the head view).
    """
    _check_params(max_hamming, min_corr, confirm_on, crop_min_corr)
    n = len(df)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    edges_a: list[np.ndarray] = []
    edges_b: list[np.ndarray] = []
    if "sha256" in df.columns:
        null = null_strings(df["sha256"])
        if "thumb" in df.columns:
            # A blank image (constant pixels, e.g. the empty first slice of many TCGA stacks) has nothing to
            # leak, and identical blank files of different patients would chain those patients together.
            present, _ = _thumb_array(df, False)
            sizes = np.array([isinstance(t, (bytes, bytearray, memoryview, np.ndarray)) for t in df["thumb"]])
            null = null | (sizes & ~present)
        a, b = equal_value_edges(df["sha256"], null)
        edges_a.append(a)
        edges_b.append(b)
    patients = patient_keys(df)
    if patients is not None:
        a, b = equal_value_edges(*patients)
        edges_a.append(a)
        edges_b.append(b)
    for view, c in _views([df], min_corr, crop_min_corr):
        valid, hashes = _hash_array(df, view.hash_col)
        usable, thumbs = _thumb_array(df, c is not None, view.thumb_col)
        rows = np.flatnonzero(valid & usable)
        if len(rows) == 0:
            continue
        confirm = c is not None and thumbs is not None
        h = hashes[rows]
        searches = [(_Corr(thumbs, measure=confirm_on) if confirm else None, None)]
        if mirror:
            mcorr = _Corr(thumbs, measure=confirm_on, mirror_b=True) if confirm else None
            searches.append((mcorr, _mirror_hashes(h, view.mirror_inverts)))
        for corr, ref_h in searches:
            mirrored = ref_h is not None
            ref_rows = rows if mirrored else None
            for a, b in _near_row_pairs(
                h, rows, int(max_hamming), corr, c, ref_h, ref_rows, ordered=mirrored
            ):
                if patients is not None:
                    key, null = patients[0].to_numpy(dtype=object), patients[1]
                    keep = null[a] | null[b] | (key[a] == key[b])
                    a, b = a[keep], b[keep]
                edges_a.append(a)
                edges_b.append(b)
    a = np.concatenate(edges_a) if edges_a else np.zeros(0, np.int64)
    b = np.concatenate(edges_b) if edges_b else np.zeros(0, np.int64)
    return dense_ids(components(n, a, b))


def match_reference(
    query: pd.DataFrame,
    reference: pd.DataFrame,
    max_hamming: int = DEFAULT_MAX_HAMMING,
    min_corr: float | None = DEFAULT_MIN_CORR,
    match_patient_id: bool = False,
    *,
    confirm_on: str = "gradient",
    mirror: bool = True,
    crop_min_corr: float | None = DEFAULT_CROP_MIN_CORR,
) -> np.ndarray:
    """Boolean per query row: it duplicates some reference row (same sha256, or near-duplicate by the
    rules of :func:`find_duplicate_groups`; with ``match_patient_id`` also same non-null patient_id).

    Direct matches only (no chaining through other query rows): used to drop evaluation files that
    duplicate a model's training files. Patient ids are off by default because ids from different
    datasets are not comparable. The head view is used only when both frames carry its columns.
    """
    _check_params(max_hamming, min_corr, confirm_on, crop_min_corr)
    out = np.zeros(len(query), dtype=bool)
    if len(query) == 0 or len(reference) == 0:
        return out
    cols = ["sha256"] + (["patient_id"] if match_patient_id else [])
    for col in cols:
        if col in query.columns and col in reference.columns:
            ref_vals = set(reference.loc[~null_strings(reference[col]), col].astype(str))
            qnull = null_strings(query[col])
            out |= ~qnull & query[col].astype(str).isin(ref_vals).to_numpy()
    for view, c in _views([query, reference], min_corr, crop_min_corr):
        need = c is not None
        qvalid, qh = _hash_array(query, view.hash_col)
        rvalid, rh = _hash_array(reference, view.hash_col)
        qok, qt = _thumb_array(query, need, view.thumb_col)
        rok, rt = _thumb_array(reference, need, view.thumb_col)
        qrows = np.flatnonzero(qvalid & qok)
        rrows = np.flatnonzero(rvalid & rok)
        if len(qrows) == 0 or len(rrows) == 0:
            continue
        for flip in (False, True) if mirror else (False,):
            corr = None
            if need:
                assert qt is not None and rt is not None
                corr = _Corr(qt, rt, measure=confirm_on, mirror_b=flip)
            ref_h = _mirror_hashes(rh[rrows], view.mirror_inverts) if flip else rh[rrows]
            for a, _ in _near_row_pairs(qh[qrows], qrows, int(max_hamming), corr, c, ref_h, rrows):
                out[a] = True
    return out


# ----------------------------------------------------------------------------------------------------
# Splitting


def _group_keys(df: pd.DataFrame, gid: np.ndarray, ngroups: int) -> np.ndarray:
    """Per group, the rank of the min over its rows of sha256 (else path, else index label).

    Sorting groups by it before the seeded shuffle makes the split independent of row order.
    """
    key = pd.Series(df.index.astype(str).to_numpy(), dtype=object)
    for col in ("path", "sha256"):  # later columns take precedence
        if col in df.columns:
            ok = ~null_strings(df[col])
            key[ok] = df[col].astype(str).to_numpy()[ok]
    rank = pd.factorize(key, sort=True)[0]  # integer ranks: a string groupby-min would run in Python
    out = np.full(ngroups, len(rank), dtype=np.int64)
    np.minimum.at(out, gid, rank)
    return out


def _water_fill(deficit: np.ndarray, r: int, priority: np.ndarray) -> np.ndarray:
    """Integer additions (sum r) over the splits with a finite deficit: the outcome of handing r single
    files one by one to the split furthest below its target (ties: larger fraction first)."""
    add = np.zeros(len(deficit), dtype=np.int64)
    act = np.flatnonzero(np.isfinite(deficit))
    if r <= 0 or len(act) == 0:
        return add
    d = deficit[act]
    lo, hi = float(d.min()) - r - 1, float(d.max())  # water level: sum(max(d - level, 0)) == r
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if np.maximum(d - mid, 0).sum() > r else (lo, mid)
    add[act] = np.floor(np.maximum(d - hi, 0)).astype(np.int64)
    for _ in range(r - int(add.sum())):  # rounding leftovers (fewer than the number of splits)
        j = max(act, key=lambda s: (deficit[s] - add[s], -priority[s]))
        add[j] += 1
    return add


def _strata(
    df: pd.DataFrame, gid: np.ndarray, ngroups: int, seed: int, label_col: str
) -> Iterator[tuple[int, np.ndarray]]:
    """(class index, group ids) per (class, source) stratum, the groups in a seeded order that does not
    depend on row order: the one stratification rule of :func:`split_groups` and :func:`assign_folds`.

    A group's class is its majority label (ties: the smallest label); with several sources its source is
    its majority source (ties: the smallest key). Groups are sorted by a content key (min sha256), then
    shuffled by a generator seeded by (seed, class) only: a source's groups get the order they get alone,
    so adding a source leaves the others' assignment as it was (comparable runs) unless duplicates join
    them."""
    # labels compared as str: one stable order for ties and mixed types
    lab, cols = pd.factorize(pd.Series(df[label_col].to_numpy(), dtype=object).astype(str), sort=True)
    counts = np.bincount(gid * len(cols) + lab, minlength=ngroups * len(cols)).reshape(ngroups, len(cols))
    major = counts.argmax(axis=1)
    present = counts.sum(axis=1) > 0  # a group may have no row in df (rows outside a fold scope)
    n_src, gsrc = 1, np.zeros(ngroups, dtype=np.int64)  # one stratum per class when a single source
    if "source" in df.columns:
        src, names = pd.factorize(pd.Series(df["source"].to_numpy(), dtype=object).astype(str), sort=True)
        if len(names) > 1:
            sc = np.bincount(gid * len(names) + src, minlength=ngroups * len(names))
            n_src, gsrc = len(names), sc.reshape(ngroups, len(names)).argmax(axis=1)
    key = _group_keys(df, gid, ngroups)
    for (c, cls), si in itertools.product(enumerate(cols), range(n_src)):
        g = np.flatnonzero(present & (major == c) & (gsrc == si))
        if not len(g):
            continue
        g = g[np.argsort(key[g], kind="stable")]
        rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, zlib.crc32(str(cls).encode())])
        yield c, g[rng.permutation(len(g))]


def split_groups(
    df: pd.DataFrame,
    groups: np.ndarray,
    fractions: Sequence[float] = (0.7, 0.15, 0.15),
    seed: int = 0,
    label_col: str = "label",
) -> np.ndarray:
    """'train'/'val'/'test' per row; every group lands in one split, stratified by class (and by source).

    Rows with the same non-null ``patient_id`` (per ``source``) are merged into one group first
    (:func:`patient_groups`), so one patient's scans never straddle splits.
    A group's class is its majority label (ties: smallest label); with several sources (a ``source``
    column), its source is its majority source and each (class, source) is split on its own, so every
    source reaches validation and test in proportion (not, say, a whole site's healthy scans in train
    because its patient groups happened to come first). Per stratum, groups are sorted by a content key
    (min sha256) and shuffled with a generator seeded by (seed, class), so the result does not depend on
    row order, and a source's split is the one it gets alone (adding a source changes no other source's
    split unless a duplicate group joins them). Groups larger than one file go first, largest first, each to the split furthest below
    its target image count; single files then fill the remaining targets. Every split with a non-zero
    fraction gets at least one group of each class when the class has enough groups.
    """
    frac = np.asarray(list(fractions), dtype=np.float64)
    if frac.shape != (3,) or (frac < 0).any() or frac.sum() <= 0:
        raise ValueError(f"fractions must be three non-negative numbers (train, val, test), got {fractions}")
    frac = frac / frac.sum()
    groups = np.asarray(groups)
    n = len(df)
    if groups.shape != (n,):
        raise ValueError(f"groups has shape {groups.shape}, expected ({n},)")
    out = np.empty(n, dtype=object)
    if n == 0:
        return out.astype(str)
    gid = patient_groups(df, groups)
    ng = int(gid.max()) + 1
    active = np.flatnonzero(frac > 0)
    priority = np.argsort(np.argsort(-frac, kind="stable"), kind="stable")  # 0 = largest fraction
    assign = np.full(ng, -1, dtype=np.int64)
    size = np.bincount(gid, minlength=ng)
    for _, g in _strata(df, gid, ng, seed, label_col):
        target = frac * size[g].sum()
        current = np.zeros(3, dtype=np.float64)
        # Every active split gets a group when possible: the smaller splits are seeded with the smallest
        # groups (at least one group is left for the largest split, which the greedy fills first).
        small = sorted(active, key=lambda s: priority[s])[1:][: max(len(g) - 1, 0)]
        for s, grp in zip(small, g[np.argsort(size[g], kind="stable")], strict=False):
            assign[grp] = s
            current[s] += size[grp]
        rest = g[assign[g] < 0]
        rest = rest[np.argsort(-size[rest], kind="stable")]
        multi = rest[size[rest] > 1]
        for grp in multi:
            deficit = np.where(frac > 0, target - current, -np.inf)
            s = max(active, key=lambda s: (deficit[s], -priority[s]))
            assign[grp] = s
            current[s] += size[grp]
        single = rest[size[rest] == 1]
        deficit = np.where(frac > 0, target - current, -np.inf)
        add = _water_fill(deficit, len(single), priority)
        assign[single] = np.repeat(np.arange(3), add)
    return np.array(SPLIT_NAMES, dtype=object)[assign[gid]].astype(str)


def holdout_split(
    df: pd.DataFrame,
    groups: np.ndarray,
    holdout: np.ndarray,
    fractions: Sequence[float] = (0.7, 0.15, 0.15),
    seed: int = 0,
    label_col: str = "label",
) -> tuple[np.ndarray, int]:
    """Leave-one-source-out: (split per row, files dropped). Rows in ``holdout`` (one source) are the
    whole test split; the others are split train/val by :func:`split_groups` with the train and val
    fractions renormalised. A train/val-side row in the same group (duplicate or patient) as a held-out
    row would leak the held-out source into training: it is labelled :data:`HOLDOUT_DUPLICATE` and used
    nowhere; their number is returned. The held-out rows may be of one class (e.g. only healthy scans).
    """
    frac = np.asarray(list(fractions), dtype=np.float64)
    if frac.shape != (3,) or (frac < 0).any() or frac[:2].sum() <= 0:
        raise ValueError(
            f"fractions must be three non-negative numbers with train + val > 0, got {fractions}"
        )
    held = np.asarray(holdout, dtype=bool)
    n = len(df)
    if held.shape != (n,):
        raise ValueError(f"holdout has shape {held.shape}, expected ({n},)")
    gid = patient_groups(df, groups)
    tainted = np.zeros(int(gid.max()) + 1 if n else 0, dtype=bool)
    tainted[gid[held]] = True
    drop = ~held & tainted[gid]
    rest = ~held & ~drop
    out = np.full(n, HOLDOUT_DUPLICATE, dtype=object)
    out[held] = "test"
    if rest.any():
        out[rest] = split_groups(df[rest], gid[rest], (frac[0], frac[1], 0.0), seed=seed, label_col=label_col)
    return out.astype(str), int(drop.sum())


def assign_folds(
    df: pd.DataFrame,
    groups: np.ndarray,
    n_folds: int,
    seed: int = 0,
    label_col: str = "label",
    scope: np.ndarray | None = None,
) -> np.ndarray:
    """Cross-validation fold (0..n_folds-1) per row; -1 for rows outside ``scope`` (never held out).

    Whole groups (duplicates merged with patients, :func:`patient_groups`) go to one fold, so a group never
    straddles folds; groups are taken per (class, source) stratum in :func:`split_groups`' seeded order,
    largest first, each to the fold holding the fewest files of its stratum (then of its class, then in
    all): every fold gets each class and source in proportion where there are enough groups. Only rows in
    ``scope`` count and get a fold; a group with rows on both sides takes its in-scope rows' fold, and a
    fold's training then drops the group's other rows (:func:`holdout_split`).
    """
    n = len(df)
    groups = np.asarray(groups)
    if groups.shape != (n,):
        raise ValueError(f"groups has shape {groups.shape}, expected ({n},)")
    keep = np.ones(n, dtype=bool) if scope is None else np.asarray(scope, dtype=bool)
    if keep.shape != (n,):
        raise ValueError(f"scope has shape {keep.shape}, expected ({n},)")
    out = np.full(n, -1, dtype=np.int64)
    if not keep.any():
        return out
    gid = patient_groups(df, groups)
    ng = int(gid.max()) + 1
    n_groups = len(np.unique(gid[keep]))
    if n_folds < 2 or n_folds > n_groups:
        raise ValueError(f"need 2 <= folds <= {n_groups} (the groups to share out), got {n_folds}")
    inside = df[keep]
    size = np.bincount(gid[keep], minlength=ng)
    n_classes = int(inside[label_col].astype(str).nunique())
    files = np.zeros(n_folds, dtype=np.int64)
    per_class = np.zeros((n_folds, n_classes), dtype=np.int64)
    assign = np.full(ng, -1, dtype=np.int64)
    for c, g in _strata(inside, gid[keep], ng, seed, label_col):
        per_stratum = np.zeros(n_folds, dtype=np.int64)
        for grp in g[np.argsort(-size[g], kind="stable")]:
            f = min(range(n_folds), key=lambda f: (per_stratum[f], per_class[f, c], files[f], f))
            assign[grp] = f
            per_stratum[f] += size[grp]
            per_class[f, c] += size[grp]
            files[f] += size[grp]
    out[keep] = assign[gid[keep]]
    return out


def source_folds(df: pd.DataFrame, sources: Sequence[str]) -> np.ndarray:
    """Leave-one-source-out folds: fold i is every row of ``sources[i]``, -1 the rows of other sources
    (never held out). A group spanning sources is not split here: each fold's :func:`holdout_split` drops
    the group's rows outside the held-out source from its training."""
    if "source" not in df.columns:
        raise ValueError("leave-one-source-out folds need a 'source' column")
    src = df["source"].astype(str).to_numpy()
    out = np.full(len(df), -1, dtype=np.int64)
    for i, name in enumerate(sources):
        out[src == str(name)] = i
    return out


# ----------------------------------------------------------------------------------------------------
# Reports


def _paths(df: pd.DataFrame) -> pd.Series:
    return df["path"].astype(str) if "path" in df.columns else pd.Series(df.index.astype(str), index=df.index)


def duplicate_groups_table(df: pd.DataFrame, groups: np.ndarray) -> pd.DataFrame:
    """One row per file in a group with more than one member: group_id, path, label, sha256, reason.

    ``reason`` says why the file is in its group: 'exact' (another member has the same sha256),
    'patient' (another member has the same patient_id), both joined with '+', else 'near' (linked by a
    confirmed dHash near-duplicate). Sorted by group size (largest first), then group id and path.
    """
    n = len(df)
    t = pd.DataFrame(
        {
            "group_id": np.asarray(groups).astype(np.int64),
            "path": _paths(df).to_numpy(),
            "label": df["label"].to_numpy() if "label" in df.columns else np.full(n, None),
            "sha256": df["sha256"].to_numpy() if "sha256" in df.columns else np.full(n, None),
        }
    )
    reason = np.full(n, "", dtype=object)
    keyed = []
    if "sha256" in df.columns:
        keyed.append((df["sha256"].astype(str).reset_index(drop=True), null_strings(df["sha256"]), "exact"))
    patients = patient_keys(df)
    if patients is not None:
        keyed.append((*patients, "patient"))
    for values, null, name in keyed:
        pair = pd.DataFrame({"g": t["group_id"], "v": values.to_numpy()})
        hit = ~null & pair.duplicated(keep=False).to_numpy()
        reason = np.where(hit, np.where(reason == "", name, reason + "+" + name), reason)
    t["reason"] = np.where(reason == "", "near", reason)
    t["_size"] = t.groupby("group_id")["path"].transform("size")
    t = t[t["_size"] > 1].sort_values(["_size", "group_id", "path"], ascending=[False, True, True])
    return t.drop(columns="_size").reset_index(drop=True)


def duplicate_report(df: pd.DataFrame, groups: np.ndarray, max_listed: int = 200) -> dict:
    """Summary of duplicate groups for the ingest summary (JSON-safe).

    ``groups``: member paths of the groups with more than one file, largest first, at most ``max_listed``
    (``groups_truncated`` says whether more exist; :func:`duplicate_groups_table` has them all).
    """
    groups = np.asarray(groups)
    sizes = pd.Series(groups).value_counts()
    multi = sizes[sizes > 1]
    conflicts = 0
    if "label" in df.columns and len(df):
        nlab = pd.Series(df["label"].astype(str).to_numpy()).groupby(groups).nunique()
        conflicts = int((nlab > 1).sum())
    table = duplicate_groups_table(df, groups)
    listed = [
        g["path"].tolist() for _, g in itertools.islice(table.groupby("group_id", sort=False), max_listed)
    ]
    return {
        "files": int(len(groups)),
        "n_groups": int(len(sizes)),
        "groups_with_duplicates": int(len(multi)),
        "redundant_files": int((multi - 1).sum()),
        "label_conflict_groups": conflicts,
        "largest_group": int(sizes.max()) if len(sizes) else 0,
        "groups": listed,
        "groups_truncated": bool(len(multi) > max_listed),
    }


def leakage(df: pd.DataFrame, splits: np.ndarray, groups: np.ndarray) -> dict:
    """Groups that straddle splits (0 after :func:`split_groups`) and rows exposed by them.

    ``{val,test}_rows_with_train_duplicate``: rows of that split whose group also has a train row, i.e.
    evaluation files with a duplicate (or same-patient file) seen in training.
    """
    g = pd.factorize(np.asarray(groups))[0]
    s = np.asarray(splits).astype(str)
    names = list(SPLIT_NAMES) + sorted(set(s.tolist()) - set(SPLIT_NAMES))
    code = pd.Categorical(s, categories=names).codes.astype(np.int64)
    ng = int(g.max()) + 1 if len(g) else 0
    present = np.bincount(g * len(names) + code, minlength=ng * len(names)).reshape(ng, len(names)) > 0
    straddle = present.sum(axis=1) > 1
    out: dict = {
        "straddling_groups": int(straddle.sum()),
        "rows_in_straddling_groups": int(straddle[g].sum()),
    }
    for (i, a), (j, b) in itertools.combinations(enumerate(SPLIT_NAMES), 2):
        out[f"groups_{a}_{b}"] = int((present[:, i] & present[:, j]).sum())
    in_train = present[:, 0][g]
    for name in ("val", "test"):
        out[f"{name}_rows_with_train_duplicate"] = int(((s == name) & in_train).sum())
    return out
