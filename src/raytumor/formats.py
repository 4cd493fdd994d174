"""Robust decoding of scan bytes into single-channel uint8 arrays.

Used inside Ray Data tasks (training ingest, batch scoring), so every failure on bad input must surface
as a :class:`DecodeError` with a short machine-friendly ``reason`` instead of an arbitrary Pillow
exception: callers count and report bad files rather than crash a whole block.

The format is always detected from the content (magic bytes), never from the file name: real
datasets ship PNGs named ``.jpg``.
"""

from __future__ import annotations

import hashlib
import io
import re
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

__all__ = [
    "DECODERS",
    "RASTER_FORMATS",
    "RESAMPLE",
    "DecodeError",
    "DecodedImage",
    "DecodedScan",
    "content_sha256",
    "decode_image",
    "decode_scan",
    "fit_square",
    "sniff_format",
    "to_gray_uint8",
]


class DecodeError(ValueError):
    """Bytes that cannot be turned into an image; ``reason`` is short and machine friendly."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason

    def __str__(self) -> str:
        return self.reason


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
    before slice selection.
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


def _dicom_start(data: bytes) -> int:
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
    if _dicom_start(head) >= 0:  # no-preamble DICOM last: a heuristic, never overrides a real magic
        return "dicom"
    return "unknown"


# ----------------------------------------------------------------------------------------------------
# Pixel conversion

_LUMA_MODES = {"RGB", "RGBX", "CMYK", "YCbCr", "HSV", "LAB"}
_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}
_HIGH_DEPTH_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I;16S", "I", "F", "I;32", "I;32B", "I;32L"}


def _rescale_robust(arr: np.ndarray) -> np.ndarray:
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


def _over_black(img: Image.Image) -> Image.Image:
    """Composite onto black (MRI background is black), so transparent pixels never turn white."""
    rgba = img.convert("RGBA")
    black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
    return Image.alpha_composite(black, rgba).convert("RGB")


def _exif_transpose(img: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(img)
    except (OSError, ValueError, KeyError, TypeError, SyntaxError, struct.error):
        # A broken EXIF block must not make an otherwise fine scan unreadable; keep stored orientation.
        return img


def to_gray_uint8(img: Image.Image) -> np.ndarray:
    """Convert any PIL image to a writable (H, W) uint8 array, after EXIF orientation.

    L as is; RGB/CMYK/YCbCr/... -> ITU-R 601 luminance (Pillow's ``convert('L')``); modes with alpha
    and palettes with transparency are composited over black first; '1' -> 0/255; 16/32-bit integer
    and float modes -> robust percentile rescale (see :func:`_rescale_robust`).
    """
    img = _exif_transpose(img)
    mode = img.mode
    if mode == "L":
        out = np.array(img, dtype=np.uint8)
    elif mode == "1":
        out = np.array(img.convert("L"), dtype=np.uint8)
    elif mode in _HIGH_DEPTH_MODES:
        out = _rescale_robust(np.asarray(img))
    elif mode in _ALPHA_MODES or (mode == "P" and "transparency" in img.info):
        out = np.array(_over_black(img).convert("L"), dtype=np.uint8)
    elif mode == "P":
        out = np.array(img.convert("RGB").convert("L"), dtype=np.uint8)
    elif mode in _LUMA_MODES:
        rgb = img if mode == "RGB" else img.convert("RGB")
        out = np.array(rgb.convert("L"), dtype=np.uint8)
    else:
        raise DecodeError(f"unsupported mode {mode}")
    if out.ndim != 2:
        raise DecodeError(f"unexpected pixel shape {out.shape} for mode {mode}")
    return np.ascontiguousarray(out)


# ----------------------------------------------------------------------------------------------------
# Geometry

# PIL BILINEAR without reducing_gap: when downscaling, Pillow widens the triangle filter by the scale
# factor, so this is a true antialiased bilinear (same definition as torchvision antialias=True). Chosen
# over LANCZOS because it cannot ring (overshoot) at the sharp skull/background edge, and over a
# reducing_gap because the result then does not depend on integer box-reduction steps.
RESAMPLE = Image.Resampling.BILINEAR


def fit_square(gray: np.ndarray, size: int) -> np.ndarray:
    """Zero-pad the shorter side symmetrically to a square (no crop), then resize to (size, size).

    The one geometric preprocessing shared by training and inference. Odd padding puts the extra
    row/column at the bottom/right. Returns a new uint8 array.
    """
    if gray.ndim != 2 or gray.size == 0:
        raise ValueError(f"fit_square expects a non-empty 2-D array, got shape {gray.shape}")
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    if gray.dtype != np.uint8:
        raise TypeError(f"fit_square expects uint8 (to_gray_uint8 output), got {gray.dtype}")
    h, w = gray.shape
    s = max(h, w)
    if h != w:
        top, left = (s - h) // 2, (s - w) // 2
        sq = np.zeros((s, s), dtype=np.uint8)
        sq[top : top + h, left : left + w] = gray
    else:
        sq = np.ascontiguousarray(gray)
    if s == size:
        return sq.copy() if sq is gray else sq
    return np.array(Image.fromarray(sq).resize((size, size), RESAMPLE), dtype=np.uint8)


# ----------------------------------------------------------------------------------------------------
# Decoding

RASTER_FORMATS = {"jpeg": "JPEG", "png": "PNG", "bmp": "BMP", "tiff": "TIFF", "gif": "GIF", "webp": "WEBP"}

_BOMB_RE = re.compile(r"\((\d+) pixels\) exceeds limit of (\d+) pixels")


def _bomb_error(exc: Exception) -> DecodeError:
    m = _BOMB_RE.search(str(exc))
    if m:
        return DecodeError(f"decompression bomb: {m.group(1)} pixels > limit {m.group(2)}")
    return DecodeError(f"decompression bomb: {exc}")


def _classify_pillow_error(exc: Exception, fmt: str) -> DecodeError:
    msg = str(exc).strip() or type(exc).__name__
    low = msg.lower()
    if "truncated" in low or isinstance(exc, EOFError) or "premature end" in low:
        return DecodeError("truncated image")
    if "cannot identify image file" in low:
        return DecodeError(f"corrupt or truncated {fmt} header")
    return DecodeError(f"corrupt image ({fmt}): {msg[:120]}")


def _decode_raster(data: bytes, fmt: str, max_pixels: int, draft_size: int | None) -> DecodedImage:
    if fmt == "webp" and len(data) < 8 + struct.unpack("<I", data[4:8])[0]:
        # libwebp only says "could not create decoder object"; the RIFF size tells truncation apart.
        raise DecodeError("truncated image")
    try:
        # formats= pins the plugin to the sniffed type, so Pillow does not guess again.
        img = Image.open(io.BytesIO(data), formats=[RASTER_FORMATS[fmt]])
        width, height = img.size
        mode = img.mode
        # Bomb guard from the header alone, before any pixel buffer is allocated.
        if width * height > max_pixels:
            raise DecodeError(f"decompression bomb: {width * height} pixels > limit {max_pixels}")
        if width < 1 or height < 1:
            raise DecodeError(f"invalid size {width}x{height}")
        if draft_size is not None and fmt == "jpeg":
            # fit_square resizes the longer side to the target; DCT-domain downscaling to >= 2x the
            # target leaves the final antialiased resize essentially unchanged and decodes far faster.
            m = max(width, height)
            req = 2 * draft_size
            if m >= 2 * req:
                img.draft(None, (max(1, -(-req * width // m)), max(1, -(-req * height // m))))
        img.load()  # Image.open leaves multi-frame GIF/TIFF on the first frame
        pixels = to_gray_uint8(img)
    except DecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        # Pillow's own global guard fires in open() for > 2x Image.MAX_IMAGE_PIXELS (the warning only
        # if a caller promoted warnings to errors); we do not touch the global warning filters, which
        # are not thread safe, and rely on the explicit max_pixels check above instead.
        raise _bomb_error(e) from e
    except MemoryError:
        raise
    except Exception as e:  # Pillow raises a zoo of types on corrupt input (OSError, SyntaxError, ...)
        raise _classify_pillow_error(e, fmt) from e
    return DecodedImage(pixels=pixels, format=fmt, mode=mode, width=width, height=height)


def _decode_medical(
    data: bytes,
    fmt: str,
    max_pixels: int,
    max_voxels: int,
    min_foreground: float = 0.05,
    require_2d: bool = False,
) -> DecodedScan:
    # Lazy: pydicom/nibabel are heavy and most Ray tasks that import formats only see rasters.
    from raytumor import medical

    if fmt == "dicom":
        return medical.decode_dicom(data, max_pixels=max_pixels, max_voxels=max_voxels, require_2d=require_2d)
    return medical.decode_nifti(
        data,
        max_pixels=max_pixels,
        max_voxels=max_voxels,
        min_foreground=min_foreground,
        require_2d=require_2d,
    )


def _decode_medical_image(data: bytes, fmt: str, max_pixels: int, draft_size: int | None) -> DecodedImage:
    """2-D medical input for decode_image; volumes are refused (callers wanting them use decode_scan)."""
    # A 2-D image has one slice, so max_pixels also bounds its voxels.
    scan = _decode_medical(data, fmt, max_pixels, max_pixels, require_2d=True)
    if scan.num_slices != 1:  # defensive: require_2d already refused volumes from the header
        raise DecodeError(f"3-D volume ({fmt}): not a 2-D image")
    return DecodedImage(
        pixels=scan.slices[0].copy(), format=fmt, mode=scan.mode, width=scan.width, height=scan.height
    )


Decoder = Callable[[bytes, str, int, int | None], DecodedImage]

# Dispatch point by sniffed format for decode_image (2-D only).
DECODERS: dict[str, Decoder] = {fmt: _decode_raster for fmt in RASTER_FORMATS}
DECODERS["dicom"] = _decode_medical_image
DECODERS["nifti"] = _decode_medical_image

_NOT_IMAGES = {"pdf", "zip", "gzip"}


def decode_image(data: bytes, *, max_pixels: int = 50_000_000, draft_size: int | None = None) -> DecodedImage:
    """Decode image bytes to a single-channel uint8 :class:`DecodedImage`.

    Raises :class:`DecodeError` for empty, unknown, non-image, truncated, corrupt or oversized input.
    ``draft_size``: the final square size the caller will :func:`fit_square` to; JPEGs may then be
    decoded at a reduced DCT scale that keeps the longer side >= 2 * draft_size.
    """
    if len(data) == 0:
        raise DecodeError("empty file")
    fmt = sniff_format(data)
    decoder = DECODERS.get(fmt)
    if decoder is None:
        if fmt in _NOT_IMAGES:
            raise DecodeError(f"not an image ({fmt})")
        raise DecodeError("unknown format")
    return decoder(bytes(data), fmt, max_pixels, draft_size)


def decode_scan(
    data: bytes,
    *,
    max_pixels: int = 50_000_000,
    max_voxels: int = 400_000_000,
    draft_size: int | None = None,
    min_foreground: float = 0.05,
) -> DecodedScan:
    """Decode any supported scan (raster, DICOM, NIfTI) to a :class:`DecodedScan` slice stack.

    Rasters go through :func:`decode_image` (K = 1). DICOM: every frame. NIfTI: RAS-canonical axial
    slices, anterior up, with one intensity window per volume; slices whose head foreground covers
    less than ``min_foreground`` of the slice are dropped (the middle one is kept if none qualifies).
    ``max_pixels`` bounds one slice, ``max_voxels`` the whole volume; errors are :class:`DecodeError`.
    """
    if len(data) == 0:
        raise DecodeError("empty file")
    fmt = sniff_format(data)
    if fmt in ("dicom", "nifti"):
        return _decode_medical(bytes(data), fmt, max_pixels, max_voxels, min_foreground)
    img = decode_image(data, max_pixels=max_pixels, draft_size=draft_size)
    return DecodedScan(
        slices=img.pixels[None],
        format=img.format,
        mode=img.mode,
        width=img.width,
        height=img.height,
        kind="image",
        slice_index=np.zeros(1, dtype=np.int64),
        num_slices=1,
    )


def content_sha256(data: bytes) -> str:
    """Hex SHA-256 of the raw bytes (exact-duplicate detection and provenance)."""
    return hashlib.sha256(data).hexdigest()
