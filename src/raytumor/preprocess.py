"""Source-agnostic slice preprocessing: head mask, crop to the head, intensity standardisation.

Why this exists: a classifier trained on one public dataset learns *where the scan came from* (black
borders, padding, field of view, burnt-in labels, global intensity scaling) as much as anatomy, and then
calls healthy scans from another hospital tumour. These pure functions remove those cues and are shared by
training and scoring, so both sides see the same geometry and intensity distribution.

Everything works on (H, W) uint8 slices as produced by :func:`raytumor.formats.to_gray_uint8` and stays
uint8; the caller still runs :func:`raytumor.formats.fit_square` afterwards (zero-pad to square, resize).
The functions run per image inside Ray Data decode tasks, so they are numpy / ``scipy.ndimage`` only
(scipy already ships with the runtime dependencies via ImageHash) and estimate the mask on a downscaled
copy (long side <= :data:`MASK_SIZE`) so a 256x256 slice costs well under a millisecond or two.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from raytumor.formats import decode_scan, fit_square
from raytumor.medical import decode_dicom_series
from raytumor.scan import DecodedScan
from raytumor.volumes import brain_slice_range

__all__ = [
    "MASK_SIZE",
    "MAX_COVERAGE",
    "MIN_COVERAGE",
    "Z_RANGE",
    "PreprocessConfig",
    "apply",
    "crop_to_head",
    "head_mask",
    "mask_is_plausible",
    "parse_spec",
    "spec_of",
    "standardise_intensity",
    "to_model_input",
]

# Long side (pixels) of the copy the mask is estimated on. The head is a large smooth blob, so ~128 px
# keeps its outline to within ~1 % of the image while making the morphology cost independent of input size.
MASK_SIZE = 128
# A mask covering less/more than this fraction of the image is not a head (blank slice, failed threshold,
# a photo of a film with no black background): callers then leave the image alone.
MIN_COVERAGE = 0.05
MAX_COVERAGE = 0.98
# standardise_intensity maps mean +- Z_RANGE standard deviations (inside the head) to 0..255.
Z_RANGE = 3.0
# Below this grey-level spread (after smoothing) there is no foreground to find.
_MIN_CONTRAST = 8.0
# Fraction of the Otsu threshold used as the foreground cut (see head_mask for the numbers).
_OTSU_FRACTION = 0.5
# Opening radius (fraction of the mask image's long side) applied after hole filling: removes burnt-in
# text, labels and thin bridges the closing made to them, while the filled head blob survives.
_OPEN_FRACTION = 0.03
# Closing radius (fraction of long side) to seal small gaps in the skull/scalp ring before hole filling.
_CLOSE_FRACTION = 0.02
# Width (fraction of long side) of the edge strip treated as "outside" when filling holes (edge frames).
_BORDER_FRACTION = 0.02

# Straight-line removal: runs at least this fraction of the long side long and thinner than _LINE_WIDTH
# pixels (mask scale) are lines, not anatomy.
_LINE_FRACTION = 0.5
_LINE_WIDTH = 3
# Bright bands along the image border (film margins) up to this fraction of the long side wide.
_EDGE_BAND_FRACTION = 0.06

_CROSS = ndi.generate_binary_structure(2, 1)  # 4-connectivity


def _check_gray(gray: np.ndarray) -> np.ndarray:
    gray = np.asarray(gray)
    if gray.ndim != 2 or gray.size == 0:
        raise ValueError(f"expected a non-empty 2-D array, got shape {gray.shape}")
    if gray.dtype != np.uint8:
        raise TypeError(f"expected uint8 (to_gray_uint8 output), got {gray.dtype}")
    return gray


def _downscale(gray: np.ndarray) -> tuple[np.ndarray, int]:
    """Block-mean downscale by an integer factor so the long side is <= MASK_SIZE.

    A block mean is both the cheapest antialiasing filter and a JPEG-noise smoother; the integer factor
    makes mapping the mask back to full resolution exact (``np.repeat``). Returns uint8 (rounded mean, so
    histogram-based percentiles/Otsu stay exact and cheap) and the factor.
    """
    h, w = gray.shape
    f = max(1, -(-max(h, w) // MASK_SIZE))
    if f == 1:
        return gray, 1
    hh, ww = -(-h // f) * f, -(-w // f) * f
    # Edge-pad to a whole number of blocks rather than dropping the last rows: a head touching the bottom
    # or right border must still reach it in the mask.
    padded = np.pad(gray, ((0, hh - h), (0, ww - w)), mode="edge") if (hh, ww) != (h, w) else gray
    sums = padded.reshape(hh // f, f, ww // f, f).sum(axis=3, dtype=np.uint32).sum(axis=1)
    return ((sums + (f * f) // 2) // (f * f)).astype(np.uint8), f


def _otsu(hist: np.ndarray) -> float:
    """Otsu threshold from a 256-bin histogram; foreground is ``> t``."""
    hist = hist.astype(np.float64)
    levels = np.arange(256, dtype=np.float64)
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * levels)
    mu0 = m0 / np.maximum(w0, 1)
    mu1 = (m0[-1] - m0) / np.maximum(w1, 1)
    between = w0 * w1 * (mu0 - mu1) ** 2
    return float(np.argmax(between[:-1]))


def _largest_component(mask: np.ndarray) -> np.ndarray:
    labels, n = ndi.label(mask, structure=_CROSS)
    if n <= 1:
        return mask if n == 1 else np.zeros_like(mask)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(np.argmax(sizes))


def _fill_holes(mask: np.ndarray, border: int = 0) -> np.ndarray:
    """Fill background regions that do not reach the outer ``border``-pixel strip of the image.

    With ``border=0`` this is ``ndi.binary_fill_holes`` but one labelling pass instead of an iterated
    dilation (which costs O(image diameter) dilations and dominated the runtime). A wider strip makes
    thin frames drawn along the image edge harmless: background inside such a frame still reaches the
    strip, so the frame cannot turn the whole image into one filled "head".
    """
    labels, n = ndi.label(~mask, structure=_CROSS)
    if n == 0:
        return mask
    b = border + 1
    strip = np.concatenate(
        [labels[:b].ravel(), labels[-b:].ravel(), labels[:, :b].ravel(), labels[:, -b:].ravel()]
    )
    outside_ids = np.unique(strip)
    keep_out = np.zeros(n + 1, dtype=bool)
    keep_out[outside_ids[outside_ids > 0]] = True
    return ~keep_out[labels]


def _odd(x: float) -> int:
    return int(x) // 2 * 2 + 1


def _open1d(a: np.ndarray, size: int, axis: int) -> np.ndarray:
    # Grey opening along one axis with min/max running filters: O(pixels) whatever ``size`` is, unlike
    # binary_opening with a long structuring element.
    return ndi.maximum_filter1d(ndi.minimum_filter1d(a, size, axis=axis, mode="nearest"), size, axis=axis)


def _straight_lines(fg: np.ndarray, length: int, width: int, edge_width: int) -> np.ndarray:
    """Pixels of horizontal/vertical runs >= ``length`` long and thinner than ``width`` pixels.

    A pixel is on such a line when a 1 x length segment through it fits in the foreground but a
    length x width bar does not: the head (a convex-ish blob much wider than ``width``) fits the bar
    wherever it fits the segment. Within ``edge_width`` of the image border the width limit is
    ``edge_width``: scanned films and screenshots often carry a bright band a few pixels wide along an
    edge (the film margin), thicker than a drawn line but still no anatomy.
    """
    a = fg.view(np.uint8)
    h, w = fg.shape
    line = np.zeros_like(fg)
    for axis in (0, 1):
        seg = _open1d(a, length, axis)
        if not seg.any():
            continue
        other = 1 - axis
        line |= seg > _open1d(seg, width, other)
        # Edge band: only the strip along the two borders parallel to the run direction.
        e = min(edge_width, (h, w)[other] // 2)
        edge = seg > _open1d(seg, edge_width, other)
        if axis == 0:  # vertical runs: left/right strips
            line[:, :e] |= edge[:, :e]
            line[:, -e:] |= edge[:, -e:]
        else:  # horizontal runs: top/bottom strips
            line[:e] |= edge[:e]
            line[-e:] |= edge[-e:]
    return line


def _small_head_mask(small: np.ndarray) -> np.ndarray:
    """The head mask on the downscaled uint8 image (see :func:`head_mask`)."""
    hist = np.bincount(small.ravel(), minlength=256)
    lo, hi = _hist_percentiles(hist, (1.0, 99.5))
    if hi - lo < _MIN_CONTRAST:
        return np.zeros(small.shape, dtype=bool)
    t = max(_OTSU_FRACTION * _otsu(hist), lo + 0.5 * _MIN_CONTRAST)
    fg = small > t
    n = max(small.shape)
    # Long thin straight lines (film edges, frames, rulers, scanner-annotation rules) first, so the
    # closing below cannot bridge them to the head. A plain small opening would also do that, but it
    # breaks the thin bright scalp ring of T2/FLAIR slices; the ring is curved, so it has no straight run
    # of half the image's length and survives this.
    e = max(_LINE_WIDTH, round(_EDGE_BAND_FRACTION * n))
    fg &= ~_straight_lines(fg, _odd(_LINE_FRACTION * n), _LINE_WIDTH, e)
    rc = max(1, round(_CLOSE_FRACTION * n))
    # Closing bridges the dark skull between brain and scalp (T1) and small breaks in the scalp ring, so
    # hole filling then recovers the whole head. Square elements via separable running min/max filters:
    # O(pixels) whatever the radius, ~10x cheaper than binary morphology with a disk, and the head
    # outline only needs to be right to a few pixels. mode="nearest" extends the image past its border,
    # so a head touching the border is neither eroded there nor grown.
    a = fg.view(np.uint8)
    a = ndi.minimum_filter(ndi.maximum_filter(a, 2 * rc + 1, mode="nearest"), 2 * rc + 1, mode="nearest")
    fg = _fill_holes(a.astype(bool), border=max(1, round(_BORDER_FRACTION * n)))
    # Opening after filling: the filled head is a thick blob and survives, while text, small labels and
    # the thin bridges the closing may have made to them are removed.
    ro = max(1, round(_OPEN_FRACTION * n))
    a = fg.view(np.uint8)
    a = ndi.maximum_filter(ndi.minimum_filter(a, 2 * ro + 1, mode="nearest"), 2 * ro + 1, mode="nearest")
    fg = a.astype(bool)
    fg = _largest_component(fg)
    if not fg.any():
        return fg
    return _fill_holes(fg)


def head_mask(gray: np.ndarray) -> np.ndarray:
    """Boolean (H, W) mask of the head (scalp, skull and brain) in a grayscale slice.

    Steps, all on a block-mean copy with long side <= :data:`MASK_SIZE` (the block mean doubles as the
    light smoothing that keeps JPEG noise in black backgrounds below the threshold):

    1. Threshold at half the Otsu threshold. Otsu alone splits *tissue classes* on many slices (dark T1
       CSF/skull or low-contrast FLAIR fall below it and only bright tissue survives); half of it still
       sits well above JPEG background noise (grey levels ~0-10) but below brain and scalp.
    2. Long (>= half the image) straight runs thinner than 3 px, or than 6 % of the image within 6 % of
       its border, are removed: frames, rulers, film margins.
    3. Closing (square, radius 2 % of the long side) bridges the dark T1 skull between brain and scalp;
       holes are filled, treating a 2 % edge strip as outside so edge frames cannot enclose everything.
    4. Opening (radius 3 %) removes text, labels and thin bridges; the largest 4-connected component is
       kept and its holes filled again.

    The mask is mapped back to full resolution by pixel repetition.

    Empty or (near-)constant images (grey-level spread < 8 after smoothing) have no detectable
    foreground: the result is then **all False**, never all True, so a caller that checks coverage
    (:func:`mask_is_plausible`) treats them like any other failed mask and leaves the image alone.
    """
    gray = _check_gray(gray)
    small, f = _downscale(gray)
    m = _small_head_mask(small)
    if f == 1:
        return m
    h, w = gray.shape
    return np.repeat(np.repeat(m, f, axis=0), f, axis=1)[:h, :w]


def mask_is_plausible(mask: np.ndarray) -> bool:
    """True when the mask covers between MIN_COVERAGE and MAX_COVERAGE of the image."""
    cov = float(np.count_nonzero(mask)) / mask.size if mask.size else 0.0
    return MIN_COVERAGE <= cov <= MAX_COVERAGE


def _bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def _crop_box(mask: np.ndarray, margin: float) -> tuple[int, int, int, int]:
    """Mask bounding box grown by ``margin`` x the box's longer side on every side, clipped to the image.

    The margin is isotropic and relative to the *head* size, so after fit_square the head occupies the
    same share of the frame whatever the source's field of view.
    """
    h, w = mask.shape
    y0, y1, x0, x1 = _bbox(mask)
    pad = int(round(margin * max(y1 - y0, x1 - x0)))
    return max(0, y0 - pad), min(h, y1 + pad), max(0, x0 - pad), min(w, x1 + pad)


def crop_to_head(
    gray: np.ndarray, margin: float = 0.05, mask: np.ndarray | None = None
) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """Crop to the head's bounding box plus a relative ``margin``; returns (crop, (y0, y1, x0, x1)).

    The crop is a view into ``gray`` (half-open box). When the mask is implausible (covers < 5 % or
    > 98 % of the image, e.g. blank slices) the image is returned unchanged with the full box. ``mask``
    lets :func:`apply` reuse an already computed :func:`head_mask`. The caller pads to square as before
    (:func:`raytumor.formats.fit_square`).
    """
    gray = _check_gray(gray)
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    if mask is None:
        mask = head_mask(gray)
    elif mask.shape != gray.shape:
        raise ValueError(f"mask shape {mask.shape} != image shape {gray.shape}")
    h, w = gray.shape
    if not mask_is_plausible(mask):
        return gray, (0, h, 0, w)
    y0, y1, x0, x1 = _crop_box(mask, margin)
    return gray[y0:y1, x0:x1], (y0, y1, x0, x1)


def _hist_percentiles(hist: np.ndarray, qs: tuple[float, float]) -> tuple[float, float]:
    """Percentiles of uint8 data from its 256-bin histogram (numpy's method="lower").

    Exact for integer data and O(n) with no sort/partition, which matters per image in decode tasks.
    """
    cdf = np.cumsum(hist)
    n = int(cdf[-1])
    ks = [int(np.floor(q / 100.0 * (n - 1))) for q in qs]  # 0-based ranks
    lo, hi = np.searchsorted(cdf, [ks[0] + 1, ks[1] + 1])
    return float(lo), float(hi)


def standardise_intensity(
    gray: np.ndarray, mask: np.ndarray | None = None, low: float = 1.0, high: float = 99.0
) -> np.ndarray:
    """Robust per-image z-score inside the head, mapped back to uint8; background set to 0.

    Intensities are first winsorised to the ``low``/``high`` percentiles of the pixels inside ``mask``
    (whole image when None), so hot pixels, burnt-in labels and the brightest fat/enhancement cannot
    drive the statistics; then the winsorised mean maps to 127.5 and +-:data:`Z_RANGE` standard
    deviations to 0/255 (clipped). Pixels outside the mask become 0, so padding, background texture and
    JPEG noise stop being source cues.

    Why a z-score rather than a plain percentile-window rescale (p_low -> 0, p_high -> 255): both undo
    gain and offset equally well, but a window pins the ends and lets a gamma/contrast-curve change move
    every mid-tone, while centring on the mean absorbs most of it. On 120 real slices (40 per source)
    with gamma 0.8/1.25 plus gain/offset, the mean |difference| inside the head divided by the output
    std was 0.06-0.09 for this z-score vs 0.24-0.36 for the percentile window; for pure gain/offset
    both were ~0.01. Only ~0.4 % of head pixels end up clipped at 0 or 255.

    An empty mask gives all zeros; so does a constant head (no contrast to standardise).
    """
    gray = _check_gray(gray)
    if not 0.0 <= low < high <= 100.0:
        raise ValueError(f"need 0 <= low < high <= 100, got low={low}, high={high}")
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != gray.shape:
            raise ValueError(f"mask shape {mask.shape} != image shape {gray.shape}")
        inside = gray[mask]
    else:
        inside = gray
    if inside.size == 0:
        return np.zeros_like(gray)
    # All statistics from the 256-bin histogram: exact for uint8 and O(pixels), no float image copies.
    hist = np.bincount(inside.ravel(), minlength=256).astype(np.float64)
    lo, hi = _hist_percentiles(hist, (low, high))
    levels = np.clip(np.arange(256, dtype=np.float64), lo, hi)  # winsorised value of each grey level
    n = hist.sum()
    mean = float(hist @ levels) / n
    std = float(np.sqrt(max(float(hist @ (levels - mean) ** 2) / n, 0.0)))
    if hi <= lo or std <= 1e-6:
        return np.zeros_like(gray)
    # A 256-entry lookup table instead of float maths on every pixel: same result, a fraction of the cost.
    lut = np.clip(np.rint(127.5 + (levels - mean) * (127.5 / (Z_RANGE * std))), 0, 255).astype(np.uint8)
    out = lut[gray]
    if mask is not None:
        out[~mask] = 0
    return out


@dataclass
class PreprocessConfig:
    """Which preprocessing steps :func:`apply` runs; stored in the model bundle via ``to_dict``.

    The defaults are all off, i.e. the historical behaviour (no crop, no intensity change).
    """

    crop: bool = False
    margin: float = 0.05
    standardise: bool = False
    low: float = 1.0
    high: float = 99.0

    def __post_init__(self) -> None:
        if self.margin < 0:
            raise ValueError(f"margin must be >= 0, got {self.margin}")
        if not 0.0 <= self.low < self.high <= 100.0:
            raise ValueError(f"need 0 <= low < high <= 100, got low={self.low}, high={self.high}")

    @property
    def enabled(self) -> bool:
        return self.crop or self.standardise

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> PreprocessConfig:
        """Inverse of ``to_dict``; missing keys take defaults, unknown keys are an error (typos in a
        bundle must not silently change preprocessing). ``None`` gives the all-off config."""
        if d is None:
            return cls()
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown preprocess keys: {sorted(unknown)}")
        kw: dict[str, Any] = {}
        for k, v in d.items():
            kw[k] = bool(v) if k in ("crop", "standardise") else float(v)
        return cls(**kw)


def crop_box(
    gray: np.ndarray, cfg: PreprocessConfig, mask: np.ndarray | None = None
) -> tuple[int, int, int, int]:
    """The half-open box (y0, y1, x0, x1) :func:`apply` crops ``gray`` to under ``cfg``: the whole slice
    without a crop or when the head mask is implausible. Grad-CAM localisation maps points back with it."""
    h, w = gray.shape
    if not cfg.crop:
        return 0, h, 0, w
    if mask is None:
        mask = head_mask(_check_gray(gray))
    return _crop_box(mask, cfg.margin) if mask_is_plausible(mask) else (0, h, 0, w)


def apply(gray: np.ndarray, cfg: PreprocessConfig) -> np.ndarray:
    """Run the enabled steps (crop, then standardise) with one head mask; returns (h, w) uint8.

    With everything off the input array itself is returned (old behaviour, no copy). The mask is
    computed once on the full image and cropped alongside it. When it is implausible (see
    :func:`mask_is_plausible`) the crop is skipped and standardisation uses the whole image without
    zeroing anything, so a slice the mask cannot handle is rescaled but never blanked.
    """
    if not cfg.enabled:
        return gray
    gray = _check_gray(gray)
    mask = head_mask(gray)
    if not mask_is_plausible(mask):
        return standardise_intensity(gray, None, cfg.low, cfg.high) if cfg.standardise else gray
    if cfg.crop:
        y0, y1, x0, x1 = crop_box(gray, cfg, mask)
        gray, mask = gray[y0:y1, x0:x1], mask[y0:y1, x0:x1]
    if cfg.standardise:
        return standardise_intensity(gray, mask, cfg.low, cfg.high)
    return np.ascontiguousarray(gray)


def to_model_input(
    gray: np.ndarray, size: int, cfg: PreprocessConfig | Mapping[str, Any] | None = None
) -> np.ndarray:
    """The one slice -> model-input path shared by training, evaluation and scoring: the bundle's
    preprocessing (:func:`apply`), then :func:`raytumor.formats.fit_square` to (size, size) uint8."""
    if cfg is not None and not isinstance(cfg, PreprocessConfig):
        cfg = PreprocessConfig.from_dict(cfg)
    if cfg is not None and cfg.enabled:
        gray = apply(gray, cfg)
    return fit_square(gray, size)


def parse_spec(spec: str | None) -> PreprocessConfig:
    """``--preprocess`` value -> config: ``none`` or a comma list of ``crop`` and ``zscore``."""
    words = {w.strip().lower() for w in (spec or "none").split(",") if w.strip()}
    unknown = words - {"none", "crop", "zscore"}
    if unknown or ("none" in words and len(words) > 1):
        raise ValueError(f"--preprocess takes 'none' or a comma list of crop,zscore; got {spec!r}")
    return PreprocessConfig(crop="crop" in words, standardise="zscore" in words)


def spec_of(cfg: PreprocessConfig | Mapping[str, Any] | None) -> str:
    """Inverse of :func:`parse_spec` for display (``crop,zscore``, ``crop``, ``zscore`` or ``none``)."""
    if cfg is not None and not isinstance(cfg, PreprocessConfig):
        cfg = PreprocessConfig.from_dict(cfg)
    if cfg is None or not cfg.enabled:
        return "none"
    return ",".join(w for w, on in (("crop", cfg.crop), ("zscore", cfg.standardise)) if on)


def model_inputs(
    data: bytes,
    size: int,
    cfg: PreprocessConfig | Mapping[str, Any] | None = None,
    *,
    volumes: bool = False,
    min_foreground: float = 0.05,
    volume_range: tuple[float, float] = (0.0, 0.0),
) -> tuple[np.ndarray, DecodedScan]:
    """Scan bytes -> (K, size, size) uint8 model inputs and the decoded scan: the one bytes-to-input path of
    training ingest, evaluation, scoring, the report's gallery and the predictor.

    ``volumes=False`` accepts 2-D images only (training data: a volume is refused with a DecodeError);
    ``volumes=True`` keeps a volume's slices in ``volume_range`` (mm below the vertex, see
    :func:`raytumor.volumes.brain_slice_range`) and ``scan.slice_index`` holds the kept slices' indices.
    Raises :class:`raytumor.scan.DecodeError` for input that cannot be decoded.
    """
    if cfg is not None and not isinstance(cfg, PreprocessConfig):
        cfg = PreprocessConfig.from_dict(cfg)
    if volumes:
        scan = decode_scan(data, draft_size=size, min_foreground=min_foreground)
    else:
        scan = decode_scan(data, draft_size=size, require_2d=True)
    return scan_inputs(scan, size, cfg, volume_range)


def series_model_inputs(
    blobs: list[bytes],
    size: int,
    cfg: PreprocessConfig | Mapping[str, Any] | None = None,
    *,
    min_foreground: float = 0.05,
    volume_range: tuple[float, float] = (0.0, 0.0),
) -> tuple[np.ndarray, DecodedScan]:
    """:func:`model_inputs` for the single-frame DICOM files of one series (any order): the series is
    assembled into a volume (:func:`raytumor.medical.decode_dicom_series`) and goes the NIfTI way."""
    scan = decode_dicom_series(blobs, min_foreground=min_foreground)
    return scan_inputs(scan, size, cfg, volume_range)


def scan_inputs(
    scan: DecodedScan,
    size: int,
    cfg: PreprocessConfig | Mapping[str, Any] | None,
    volume_range: tuple[float, float] = (0.0, 0.0),
) -> tuple[np.ndarray, DecodedScan]:
    """A decoded scan's (K, size, size) model inputs: a volume cut axially keeps the slices in
    ``volume_range`` (mm below the vertex); every slice gets the bundle's preprocessing."""
    if cfg is not None and not isinstance(cfg, PreprocessConfig):
        cfg = PreprocessConfig.from_dict(cfg)
    if scan.kind == "volume" and scan.plane == "axial":  # only the slices a 2-D model was trained on
        keep = brain_slice_range(np.asarray(scan.slice_index), scan.spacing_mm, *volume_range)
        scan = dataclasses.replace(
            scan, slices=scan.slices[keep], slice_index=np.asarray(scan.slice_index)[keep]
        )
    return np.stack([to_model_input(s, size, cfg) for s in scan.slices]), scan
