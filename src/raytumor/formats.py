"""Robust decoding of scan bytes into single-channel uint8 arrays.

Used inside Ray Data tasks (training ingest, batch scoring), so every failure on bad input must surface
as a :class:`DecodeError` with a short machine-friendly ``reason`` instead of an arbitrary Pillow
exception: callers count and report bad files rather than crash a whole block.

The format is always detected from the content (magic bytes), never from the file name: real
datasets ship PNGs named ``.jpg``.
"""

from __future__ import annotations

import io
import re
import struct
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageMode, ImageOps

from raytumor import medical
from raytumor.scan import (
    DEFAULT_LIMITS,
    DecodedImage,
    DecodedScan,
    DecodeError,
    DecodeLimits,
    rescale_robust,
    sniff_format,
)

__all__ = [
    "DECODERS",
    "RASTER_FORMATS",
    "RESAMPLE",
    "DecodeError",
    "DecodeLimits",
    "DecodedImage",
    "DecodedScan",
    "decode_image",
    "decode_scan",
    "fit_square",
    "sniff_format",
    "to_gray_uint8",
]


# ----------------------------------------------------------------------------------------------------
# Pixel conversion

_LUMA_MODES = {"RGB", "RGBX", "CMYK", "YCbCr", "HSV", "LAB"}
_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}
_HIGH_DEPTH_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I;16S", "I", "F", "I;32", "I;32B", "I;32L"}


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
    and float modes -> robust percentile rescale (see :func:`raytumor.scan.rescale_robust`).
    """
    img = _exif_transpose(img)
    mode = img.mode
    if mode == "L":
        out = np.array(img, dtype=np.uint8)
    elif mode == "1":
        out = np.array(img.convert("L"), dtype=np.uint8)
    elif mode in _HIGH_DEPTH_MODES:
        out = rescale_robust(np.asarray(img))
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


def _raster_bytes(img: Image.Image) -> int:
    """Bytes of the pixel buffer Pillow will allocate for ``img`` (bands x sample size, '1' as bytes)."""
    mode = ImageMode.getmode(img.mode)
    return img.size[0] * img.size[1] * len(mode.bands) * np.dtype(mode.typestr).itemsize


def _decode_raster(data: bytes, fmt: str, limits: DecodeLimits, draft_size: int | None) -> DecodedImage:
    if fmt == "webp" and len(data) < 8 + struct.unpack("<I", data[4:8])[0]:
        # libwebp only says "could not create decoder object"; the RIFF size tells truncation apart.
        raise DecodeError("truncated image")
    try:
        # formats= pins the plugin to the sniffed type, so Pillow does not guess again.
        img = Image.open(io.BytesIO(data), formats=[RASTER_FORMATS[fmt]])
        width, height = img.size
        mode = img.mode
        # Bomb guard from the header alone, before any pixel buffer is allocated.
        limits.check_pixels(width * height)
        if width < 1 or height < 1:
            raise DecodeError(f"invalid size {width}x{height}")
        if draft_size is not None and fmt == "jpeg":
            # fit_square resizes the longer side to the target; DCT-domain downscaling to >= 2x the
            # target leaves the final antialiased resize essentially unchanged and decodes far faster.
            m = max(width, height)
            req = 2 * draft_size
            if m >= 2 * req:
                img.draft(None, (max(1, -(-req * width // m)), max(1, -(-req * height // m))))
        # Decoded bytes and their ratio to the file's size (after any draft reduction): a small PNG or
        # TIFF can declare an RGBA canvas hundreds of MB large that deflates from a few hundred kB.
        limits.check_bytes(fmt.upper(), _raster_bytes(img), len(data))
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
    data: bytes, fmt: str, limits: DecodeLimits, min_foreground: float = 0.05, require_2d: bool = False
) -> DecodedScan:
    # medical imports pydicom/nibabel lazily: most Ray tasks that import formats only see rasters.
    if fmt == "dicom":
        return medical.decode_dicom(data, require_2d=require_2d, limits=limits)
    return medical.decode_nifti(data, min_foreground=min_foreground, require_2d=require_2d, limits=limits)


def _decode_medical_image(
    data: bytes, fmt: str, limits: DecodeLimits, draft_size: int | None
) -> DecodedImage:
    """2-D medical input for decode_image; volumes are refused (callers wanting them use decode_scan)."""
    # A 2-D image has one slice, so max_pixels also bounds its voxels.
    scan = _decode_medical(data, fmt, limits.with_sizes(max_voxels=limits.max_pixels), require_2d=True)
    if scan.num_slices != 1:  # defensive: require_2d already refused volumes from the header
        raise DecodeError(f"3-D volume ({fmt}): not a 2-D image")
    return DecodedImage(
        pixels=scan.slices[0].copy(), format=fmt, mode=scan.mode, width=scan.width, height=scan.height
    )


Decoder = Callable[[bytes, str, DecodeLimits, int | None], DecodedImage]

# Dispatch point by sniffed format for decode_image (2-D only).
DECODERS: dict[str, Decoder] = {fmt: _decode_raster for fmt in RASTER_FORMATS}
DECODERS["dicom"] = _decode_medical_image
DECODERS["nifti"] = _decode_medical_image

_NOT_IMAGES = {"pdf", "zip", "gzip"}


def decode_image(
    data: bytes,
    *,
    max_pixels: int | None = None,
    draft_size: int | None = None,
    limits: DecodeLimits = DEFAULT_LIMITS,
) -> DecodedImage:
    """Decode image bytes to a single-channel uint8 :class:`DecodedImage`.

    Raises :class:`DecodeError` for empty, unknown, non-image, truncated, corrupt or oversized input
    (``limits``, with ``max_pixels`` overriding its slice cap, checked from the header).
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
    return decoder(bytes(data), fmt, limits.with_sizes(max_pixels), draft_size)


def decode_scan(
    data: bytes,
    *,
    max_pixels: int | None = None,
    max_voxels: int | None = None,
    draft_size: int | None = None,
    min_foreground: float = 0.05,
    require_2d: bool = False,
    limits: DecodeLimits = DEFAULT_LIMITS,
) -> DecodedScan:
    """Decode any supported scan (raster, DICOM, NIfTI) to a :class:`DecodedScan` slice stack
    (``require_2d``: one slice, a volume is a DecodeError; the header's view and modality are kept).

    Rasters go through :func:`decode_image` (K = 1). DICOM: every frame. NIfTI: RAS-canonical axial
    slices, anterior up, with one intensity window per volume; slices whose head foreground covers
    less than ``min_foreground`` of the slice are dropped (the middle one is kept if none qualifies).
    ``limits`` bound every decoder from headers, before inflating (:class:`raytumor.scan.DecodeLimits`);
    ``max_pixels`` (one slice) and ``max_voxels`` (the whole volume) override its caps. Errors are
    :class:`DecodeError`.
    """
    if len(data) == 0:
        raise DecodeError("empty file")
    limits = limits.with_sizes(max_pixels, max_voxels)
    fmt = sniff_format(data)
    if fmt in ("dicom", "nifti"):
        if require_2d:  # a 2-D image has one slice, so max_pixels also bounds its voxels
            scan = _decode_medical(
                bytes(data), fmt, limits.with_sizes(max_voxels=limits.max_pixels), require_2d=True
            )
            if scan.num_slices != 1:  # defensive: require_2d already refused volumes from the header
                raise DecodeError(f"3-D volume ({fmt}): not a 2-D image")
            return scan
        return _decode_medical(bytes(data), fmt, limits, min_foreground)
    img = decode_image(data, draft_size=draft_size, limits=limits)
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
