"""Scan types and format sniffing: what every decoder returns, and which decoder a file needs.

The shared base of ``formats`` (rasters, dispatch) and ``medical`` (DICOM, NIfTI): the format is always
detected from the content (magic bytes), never from the file name; real datasets ship PNGs named ``.jpg``.
"""

from __future__ import annotations

import math
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

__all__ = [
    "DEFAULT_LIMITS",
    "MAX_DECODED_BYTES",
    "MAX_PIXELS",
    "MAX_RATIO",
    "MAX_VOXELS",
    "RATIO_FLOOR_BYTES",
    "VIEWS",
    "VIEW_OF_AXIS",
    "DecodeError",
    "DecodeLimits",
    "DecodedImage",
    "DecodedScan",
    "dicom_start",
    "has_error",
    "inflate_limited",
    "ok_mask",
    "rescale_robust",
    "sniff_format",
    "view_from_orientation",
]

# Default size (bomb) guards of every decoder, sized for the largest real MRI we expect: a 512x512x400
# 16-bit volume is 105 M voxels and 200 MiB decoded (its .nii.gz decodes at a 1.0 GB peak), 400 MiB as float32. One slice;
# a whole volume (512^3: volumes are windowed in float32); the bytes a decoder may produce (pixel
# buffers, inflated streams); and decoded/stored bytes, checked only above RATIO_FLOOR_BYTES (tiny
# black images compress far better than any real scan, and cost nothing).
MAX_PIXELS = 50_000_000
MAX_VOXELS = 512**3
MAX_DECODED_BYTES = 512 << 20  # that volume as float32 (400 MiB), as processed NIfTI often is
MAX_RATIO = 100.0
RATIO_FLOOR_BYTES = 32 << 20

# Anatomical planes (a scan's view may also be "oblique"), and the plane normal to each patient axis of
# RAS/LPS space: x (left-right) sagittal, y (anterior-posterior) coronal, z (inferior-superior) axial.
VIEWS = ("axial", "coronal", "sagittal")
VIEW_OF_AXIS = ("sagittal", "coronal", "axial")


class DecodeError(ValueError):
    """Bytes that cannot be turned into an image; ``reason`` is short and machine friendly."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason

    def __str__(self) -> str:
        return self.reason


@dataclass(frozen=True)
class DecodeLimits:
    """The one place the decoders' size (bomb) rules live; every check happens on sizes read from a
    header (or while inflating, with output capped) before the big buffer exists.

    ``max_pixels`` bounds one slice/frame, ``max_voxels`` a whole volume, ``max_decoded_bytes`` what a
    decoder produces (the pixel payload at its stored depth, an inflated stream), ``max_ratio`` decoded
    bytes per stored byte once more than ``ratio_floor_bytes`` are decoded (a deflate stream reaches
    ~1000x on zeros, a real MRI ~2-10x).
    """

    max_pixels: int = MAX_PIXELS
    max_voxels: int = MAX_VOXELS
    max_decoded_bytes: int = MAX_DECODED_BYTES
    max_ratio: float = MAX_RATIO
    ratio_floor_bytes: int = RATIO_FLOOR_BYTES

    def with_sizes(self, max_pixels: int | None = None, max_voxels: int | None = None) -> DecodeLimits:
        """These limits with a caller's pixel/voxel caps (the decoders' keyword arguments)."""
        return replace(
            self,
            max_pixels=self.max_pixels if max_pixels is None else int(max_pixels),
            max_voxels=self.max_voxels if max_voxels is None else int(max_voxels),
        )

    def check_pixels(self, pixels: int) -> None:
        if pixels > self.max_pixels:
            raise DecodeError(f"decompression bomb: {pixels} pixels > limit {self.max_pixels}")

    def check_voxels(self, voxels: int) -> None:
        if voxels > self.max_voxels:
            raise DecodeError(f"decompression bomb: {voxels} voxels > limit {self.max_voxels}")

    def check_bytes(self, what: str, decoded: int, stored: int, *, at_least: bool = False) -> None:
        """Refuse ``decoded`` bytes (a lower bound when ``at_least``: inflation stopped at the cap) of
        ``what`` from ``stored`` input bytes."""
        over = "over " if at_least else ""
        if decoded > self.max_decoded_bytes:
            raise DecodeError(
                f"decompression bomb: {what} decodes to {over}{decoded} bytes"
                f" > max_decoded_bytes {self.max_decoded_bytes}"
            )
        if decoded > self.ratio_floor_bytes and decoded > self.max_ratio * max(1, stored):
            raise DecodeError(
                f"decompression bomb: {what} decodes to {over}{decoded} bytes from {stored}"
                f" ({decoded / max(1, stored):.0f}x) > max_ratio {self.max_ratio:g}x"
            )

    def inflate_cap(self, stored: int) -> int:
        """The most bytes ``stored`` compressed bytes may inflate to and still pass :meth:`check_bytes`."""
        ratio_cap = max(self.ratio_floor_bytes, int(self.max_ratio * max(1, stored)))
        return min(self.max_decoded_bytes, ratio_cap)

    def peak_bytes(self) -> int:
        """A rough upper bound of one decode's working memory within these limits, input bytes aside (for
        sizing workers): the decoded payload, plus ~10 bytes a voxel (the float32 volume, the window's
        masks and sample, the uint8 result), as measured on a 512x512x400 int16 .nii.gz (1.0 GB)."""
        return self.max_decoded_bytes + 10 * self.max_voxels


DEFAULT_LIMITS = DecodeLimits()


def inflate_limited(data: bytes, wbits: int, cap: int, what: str) -> tuple[bytes, bool]:
    """Inflate a zlib/gzip/raw-deflate stream chunk by chunk, never past ``cap`` output bytes.

    Returns (the first ``cap`` bytes at most, whether the stream holds more): the caller decides whether
    more is a bomb (:meth:`DecodeLimits.check_bytes`) or trailing bytes to ignore. A stream cut short
    returns what it held (callers compare with the size they expect); a corrupt one is a DecodeError.
    """
    d = zlib.decompressobj(wbits)
    out = bytearray()
    view = memoryview(data)
    pos, step = 0, 1 << 16
    try:
        while not d.eof:
            if d.unconsumed_tail:
                chunk: bytes | memoryview = d.unconsumed_tail
            elif pos < len(view):
                chunk, pos = view[pos : pos + step], pos + step
            else:
                break
            # max_length cap + 1 - len: one byte past the cap tells "more" from "exactly cap"
            out += d.decompress(chunk, min(step, cap + 1 - len(out)))
            if len(out) > cap:
                del out[cap:]
                return bytes(out), True
    except zlib.error as e:
        raise DecodeError(f"corrupt {what}: bad deflate stream") from e
    return bytes(out), False


@dataclass
class DecodedImage:
    """A decoded scan.

    ``pixels`` is (H, W) uint8 after EXIF orientation (and JPEG draft reduction when requested).
    ``format``/``mode``/``width``/``height`` describe the source as stored in the file, before
    orientation and draft, which is what provenance reports need.
    """

    pixels: np.ndarray
    format: str
    mode: str
    width: int
    height: int


@dataclass
class DecodedScan:
    """A decoded scan as a stack of slices (rasters and single-frame DICOM: one slice).

    ``slices`` is (K, H, W) uint8, K >= 1. ``mode``: the PIL mode for rasters, e.g. 'MONOCHROME2/16'
    (photometric interpretation / bits allocated) for DICOM, the stored dtype ('int16') for NIfTI.
    ``width``/``height`` are those of one source slice/frame. ``kind`` is 'image' (2-D source) or
    'volume' (3-D NIfTI, multi-frame DICOM). ``slice_index`` (K,) int64 is each kept slice's index in
    the source (NIfTI: canonical RAS z; DICOM: frame number) and ``num_slices`` the source's count
    before slice selection. ``view``: the plane of the slices ('axial', 'coronal', 'sagittal' or
    'oblique'), None when the source does not say (rasters, DICOM without orientation). ``modality``:
    the DICOM Modality ('MR', 'CT', ...), None when the format does not carry one (rasters, NIfTI).
    """

    slices: np.ndarray
    format: str
    mode: str
    width: int
    height: int
    kind: str
    slice_index: np.ndarray
    num_slices: int
    spacing_mm: float | None = None  # distance between adjacent slices (NIfTI), None when not known
    view: str | None = None
    modality: str | None = None
    plane: str = "axial"  # volumes: the canonical plane the slices were cut along ('axial' unless a series
    # of thick coronal/sagittal slices is scored in its own plane; the slice-range rule is axial only)


# ----------------------------------------------------------------------------------------------------
# Geometry


def view_from_orientation(iop: Sequence[float], oblique_cos: float = 0.8) -> str:
    """The plane of a DICOM image from its ImageOrientationPatient (row then column direction cosines,
    patient LPS axes): the slice normal row x column points along x for sagittal, y for coronal and z for
    axial. 'oblique' when the normal's largest direction cosine is below ``oblique_cos`` (0.8: tilted
    more than ~37 degrees from the nearest plane). ValueError for anything that is not two finite,
    non-zero, non-parallel 3-vectors.
    """
    if not 0.0 <= oblique_cos <= 1.0:
        raise ValueError(f"oblique_cos must be in [0, 1], got {oblique_cos}")
    try:
        v = np.asarray([float(c) for c in iop], dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError("ImageOrientationPatient must be 6 numbers") from e
    if v.shape != (6,):
        raise ValueError(f"ImageOrientationPatient must be 6 numbers, got {v.size}")
    if not np.isfinite(v).all():
        raise ValueError("ImageOrientationPatient is not finite")
    row, col = v[:3], v[3:]
    nr, nc = float(np.linalg.norm(row)), float(np.linalg.norm(col))
    if nr == 0.0 or nc == 0.0:
        raise ValueError("ImageOrientationPatient has a zero direction")
    normal = np.cross(row / nr, col / nc)
    sin = float(np.linalg.norm(normal))  # sine of the angle between row and column
    if sin < math.sin(math.radians(1.0)):  # (near) parallel: no plane; DICOM requires orthogonal
        raise ValueError("ImageOrientationPatient row and column are parallel")
    cos = np.abs(normal) / sin
    axis = int(np.argmax(cos))
    return VIEW_OF_AXIS[axis] if cos[axis] >= oblique_cos else "oblique"


# ----------------------------------------------------------------------------------------------------
# Sniffing

_NIFTI1_MAGICS = (b"n+1\x00", b"ni1\x00")
_NIFTI2_MAGICS = (b"n+2\x00\r\n\x1a\n", b"ni2\x00\r\n\x1a\n")
# NIfTI-2 headers are 540 bytes; NIfTI-1 needs 348 (magic at 344..348), 352 with the extension flag.
_NIFTI_PEEK = 540


def _is_nifti_header(head: bytes) -> bool:
    if len(head) >= 348:
        size_le, size_be = struct.unpack("<i", head[:4])[0], struct.unpack(">i", head[:4])[0]
        if 348 in (size_le, size_be) and head[344:348] in _NIFTI1_MAGICS:
            return True
    if len(head) >= 12:
        size_le, size_be = struct.unpack("<i", head[:4])[0], struct.unpack(">i", head[:4])[0]
        if 540 in (size_le, size_be) and head[4:12] in _NIFTI2_MAGICS:
            return True
    return False


def _gunzip_head(data: bytes, n: int) -> bytes:
    """First ``n`` decompressed bytes of a gzip stream, feeding input in chunks (no full inflate)."""
    d = zlib.decompressobj(16 + zlib.MAX_WBITS)
    out = b""
    try:
        for start in range(0, len(data), 1 << 14):
            out += d.decompress(data[start : start + (1 << 14)], n - len(out))
            if len(out) >= n or d.eof:
                break
    except zlib.error:
        pass
    return out[:n]


# DICOM without the 128-byte preamble + "DICM" (raw data sets, e.g. pydicom's ExplVR_LitEndNoMeta.dcm):
# recognised by two consecutive plausible data elements starting in group 0002 (meta) or 0008.
_DICOM_VRS = frozenset(
    b"AE AS AT CS DA DS DT FD FL IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI UL UN UR US UT UV".split()
)
_DICOM_LONG_VRS = frozenset(b"OB OD OF OL OV OW SQ SV UC UN UR UT UV".split())  # 2 reserved + 4-byte length
_DICOM_MAX_SKIP = 4  # stray leading bytes tolerated (pydicom's no_meta.dcm starts with one)


def _dicom_element(head: bytes, pos: int, endian: str) -> tuple[int, int] | None:
    """(tag, position of the next element) of a plausible defined-length element at ``pos``."""
    if pos + 8 > len(head):
        return None
    group, elem = struct.unpack_from(endian + "HH", head, pos)
    vr = head[pos + 4 : pos + 6]
    if vr in _DICOM_VRS:
        if vr in _DICOM_LONG_VRS:
            if head[pos + 6 : pos + 8] != b"\x00\x00" or pos + 12 > len(head):
                return None
            length, hdr = struct.unpack_from(endian + "I", head, pos + 8)[0], 12
        else:
            length, hdr = struct.unpack_from(endian + "H", head, pos + 6)[0], 8
    elif endian == "<":  # implicit VR exists in little endian only
        length, hdr = struct.unpack_from("<I", head, pos + 4)[0], 8
    else:
        return None
    if length == 0xFFFFFFFF or length % 2:  # undefined or odd lengths: too weak / invalid to chain on
        return None
    return (group << 16) | elem, pos + hdr + length


def dicom_start(data: bytes) -> int:
    """Offset where pydicom should start reading: 0 with a preamble, else after any stray bytes.

    Returns -1 when the bytes do not look like DICOM.
    """
    head = bytes(data[:_NIFTI_PEEK])
    if head[128:132] == b"DICM":
        return 0
    for skip in range(_DICOM_MAX_SKIP):
        for endian in "<>":
            first = _dicom_element(head, skip, endian)
            if first is None or first[0] >> 16 not in (0x0002, 0x0008):
                continue
            second = _dicom_element(head, first[1], endian)
            # Tags ascend; the second element is still in the meta/identifying groups.
            if second is not None and first[0] < second[0] and (second[0] >> 16) in (0x0002, 0x0008):
                return skip
    return -1


def sniff_format(data: bytes) -> str:
    """Detect the real format from magic bytes.

    Returns one of 'jpeg', 'png', 'bmp', 'tiff', 'gif', 'webp', 'dicom', 'nifti', 'gzip', 'zip',
    'pdf', 'unknown'. Gzip streams whose payload starts with a NIfTI header (``.nii.gz``) are 'nifti'.
    """
    head = bytes(data[:_NIFTI_PEEK])
    # DICOM first: its 128-byte preamble is free-form and may itself look like e.g. a TIFF header.
    if head[128:132] == b"DICM":
        return "dicom"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "gif"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "tiff"
    # "BM" alone is weak: also require a known DIB header size (when enough bytes are there to check).
    if head.startswith(b"BM") and (
        len(head) < 18 or struct.unpack("<I", head[14:18])[0] in (12, 16, 40, 52, 56, 64, 108, 124)
    ):
        return "bmp"
    if head.startswith(b"%PDF-"):
        return "pdf"
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06", b"PK\x07\x08"):
        return "zip"
    if head.startswith(b"\x1f\x8b"):
        return "nifti" if _is_nifti_header(_gunzip_head(data, _NIFTI_PEEK)) else "gzip"
    if _is_nifti_header(head):
        return "nifti"
    if dicom_start(head) >= 0:  # no-preamble DICOM last: a heuristic, never overrides a real magic
        return "dicom"
    return "unknown"


# ----------------------------------------------------------------------------------------------------
# Pixel conversion


def rescale_robust(arr: np.ndarray) -> np.ndarray:
    """Map a high-bit-depth array to uint8 via the 0.5th-99.5th percentiles (clipped).

    Scanner exports rarely use the full 16-bit range, so a fixed /256 would leave them near black; a
    percentile window is robust to a few hot pixels. Constant images become zeros.
    """
    a = arr.astype(np.float32, copy=False)
    finite = np.isfinite(a)
    if not finite.all():
        a = np.where(finite, a, np.nan)
    if not finite.any():
        return np.zeros(a.shape, dtype=np.uint8)
    lo, hi = np.nanpercentile(a, [0.5, 99.5])
    if not hi > lo:  # mostly constant with rare outliers: fall back to the full range
        lo, hi = np.nanmin(a), np.nanmax(a)
    if not hi > lo:
        return np.zeros(a.shape, dtype=np.uint8)
    scaled = (a - lo) * (255.0 / (hi - lo))
    scaled = np.nan_to_num(scaled, nan=0.0)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------------------
# Error cells of decoded rows


def has_error(value: Any) -> bool:
    """True if an ``error`` cell holds a reason. Ray Data turns an all-null column into NaN floats."""
    return isinstance(value, str) and value != ""


def ok_mask(errors: Any) -> np.ndarray:
    return np.array([not has_error(e) for e in errors], dtype=bool)
