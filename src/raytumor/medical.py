"""DICOM and NIfTI decoding from in-memory bytes into stacks of uint8 slices.

Used by :mod:`raytumor.formats`; pydicom/nibabel are imported inside the decoders (heavy, and most Ray tasks only see
rasters). Everything works on bytes: no temp files. Outputs never carry free-text DICOM tags (PHI): only
pixels plus a photometric/bit-depth mode string, the Modality code (only when it is a well-formed code
string) and the view derived from the orientation vectors; error reasons never quote tag values.
"""

from __future__ import annotations

import io
import math
import re
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from raytumor.scan import (
    DEFAULT_LIMITS,
    VIEW_OF_AXIS,
    DecodedScan,
    DecodeError,
    DecodeLimits,
    dicom_start,
    inflate_limited,
    rescale_robust,
    view_from_orientation,
)

__all__ = [
    "SERIES_HEADER_PEEK",
    "NiftiVolume",
    "decode_dicom",
    "decode_dicom_series",
    "dicom_header",
    "series_grid",
    "slice_normal",
    "decode_nifti",
    "decode_nifti_volume",
    "head_slices",
    "plane_slices",
]


def _luma(rgb: np.ndarray) -> np.ndarray:
    """ITU-R 601 luminance (what Pillow's convert('L') uses for rasters), float."""
    rgb = rgb.astype(np.float32, copy=False)
    return rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114


def _scale_range(a: np.ndarray, lo: float, hi: float, *, overwrite: bool = False) -> np.ndarray:
    """Linear map [lo, hi] -> [0, 255], clipped; NaN -> 0. ``overwrite``: ``a`` (float32) is scratch."""
    if not hi > lo:
        return np.zeros(a.shape, dtype=np.uint8)
    # At most one float32 working buffer, updated in place: a whole volume passes through here.
    if overwrite and a.dtype == np.float32:
        out = a
        out -= np.float32(lo)
    else:
        out = np.subtract(a, np.float32(lo), dtype=np.float32)
    out *= np.float32(255.0 / (hi - lo))
    np.nan_to_num(out, copy=False, nan=0.0)
    np.rint(out, out=out)
    np.clip(out, 0, 255, out=out)
    return out.astype(np.uint8)


# ----------------------------------------------------------------------------------------------------
# DICOM


def _dicom_ts_error(ts) -> DecodeError:
    """A reason that names the transfer syntax and, when known, what to install."""
    from pydicom.pixels import get_decoder

    name = getattr(ts, "name", str(ts))
    try:
        dec = get_decoder(ts)
    except NotImplementedError:
        return DecodeError(f"DICOM transfer syntax {name} not supported")
    missing = "; ".join(dec.missing_dependencies)
    if not dec.is_available:
        return DecodeError(f"DICOM transfer syntax {name} not decodable: install {missing}")
    plugins = ", ".join(dec.available_plugins)
    hint = f" (or corrupt); try installing {missing}" if missing else " (or corrupt)"
    return DecodeError(f"DICOM transfer syntax {name} not decodable by {plugins}{hint}")


def _voi_range(ds) -> tuple[float, float]:
    """Output range of pydicom's apply_voi_lut for this dataset (LUT bit depth, or window y-range)."""
    from pydicom.pixels import apply_voi_lut

    if ds.get("VOILUTSequence"):  # apply_voi_lut prefers a (non-empty) LUT over a window
        bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])
        return 0.0, float(2**bits - 1)
    # Windowing maps below/above the window to pydicom's y_min/y_max: probe with extremes rather than
    # re-deriving its rules (BitsStored, PixelRepresentation, rescale, modality LUT depth).
    lo, hi = apply_voi_lut(np.array([-1e300, 1e300]), ds, index=0)
    return float(lo), float(hi)


def _has_voi(ds) -> bool:
    return ("WindowCenter" in ds and "WindowWidth" in ds) or bool(ds.get("VOILUTSequence"))


_DEFLATED = "1.2.840.10008.1.2.1.99"  # Deflated Explicit VR Little Endian: the whole data set is deflated
_HEADER_PEEK = 1 << 20  # inflated bytes searched for the image pixel module before inflating the rest
_LAST_GEOMETRY_TAG = 0x00280100  # BitsAllocated: Rows, Columns, frames and samples all come before it


def _pixel_bytes(rows: int, cols: int, frames: int, samples: int, bits: int) -> int:
    """Bytes of the decoded pixel payload at its stored depth (8 bits assumed when not given)."""
    return -(-rows * cols * frames * samples * (bits if bits > 0 else 8) // 8)


def _check_geometry(
    ds, limits: DecodeLimits, stored: int, require_2d: bool
) -> tuple[int, int, int, int, str, int]:
    """(rows, cols, frames, samples, photometric, bits) from the header, with the size (bomb) guards
    applied before any pixel buffer exists; ``stored``: the bytes the pixels are decoded from."""
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        frames = int(ds.get("NumberOfFrames") or 1)
        samples = int(ds.get("SamplesPerPixel") or 1)
        pi = str(ds.get("PhotometricInterpretation") or "MONOCHROME2").strip().upper()
        bits = int(ds.get("BitsAllocated") or 0)
    except (AttributeError, TypeError, ValueError) as e:
        raise DecodeError("corrupt DICOM: bad image pixel module") from e
    if rows < 1 or cols < 1 or frames < 1 or samples not in (1, 3) or bits < 0:
        raise DecodeError(f"corrupt DICOM: invalid size {cols}x{rows}x{frames}x{samples}")
    limits.check_pixels(rows * cols)
    limits.check_voxels(rows * cols * frames)
    limits.check_bytes("DICOM pixel data", _pixel_bytes(rows, cols, frames, samples, bits), stored)
    if require_2d and frames > 1:
        raise DecodeError(f"3-D volume (dicom, {frames} frames): not a 2-D image")
    return rows, cols, frames, samples, pi, bits


def _inflate_dicom(deflated: bytes, limits: DecodeLimits, require_2d: bool) -> bytes:
    """The data set of a Deflated Explicit VR Little Endian file, inflated with a hard cap on output.

    pydicom inflates the whole stream at once (1 MB of zeros -> 1 GB); here the image pixel module is
    read from the first inflated MiB and checked first, and the rest never inflates past the limits."""
    from pydicom.filereader import read_dataset

    stored = len(deflated)
    cap = limits.inflate_cap(stored)
    head, _ = inflate_limited(deflated, -zlib.MAX_WBITS, min(cap, _HEADER_PEEK), "deflated DICOM")
    try:
        peek = read_dataset(
            io.BytesIO(head), False, True, stop_when=lambda tag, vr, length: tag > _LAST_GEOMETRY_TAG
        )
        known = "Rows" in peek and "Columns" in peek
    except MemoryError:
        raise
    except Exception:  # a header longer than the peek, or garbage: the capped inflate below still holds
        known = False
    if known:
        _check_geometry(peek, limits, stored, require_2d)
    body, more = inflate_limited(deflated, -zlib.MAX_WBITS, cap, "deflated DICOM")
    if more:
        limits.check_bytes("deflated DICOM", cap + 1, stored, at_least=True)
    return body


def _read_dicom(data: bytes, limits: DecodeLimits, require_2d: bool) -> tuple[object, int]:
    """(the parsed data set with a transfer syntax, the bytes its pixels are stored in), or a DecodeError.

    Pixels are not decoded yet; a deflated data set is inflated here, within ``limits``."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.filereader import _read_file_meta_info, read_preamble
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    # pydicom's read-time validation warns and logs the offending values (names, IDs, UIDs: PHI) into
    # every worker's log; a value we use is checked where we use it, so none of it is needed.
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE

    body = data[max(0, dicom_start(data)) :]
    stored = len(body)
    try:
        # The file meta exactly as dcmread reads it, to see a deflated transfer syntax before dcmread
        # would inflate it whole (the private reader is the one dcmread itself calls).
        fp = io.BytesIO(body)
        read_preamble(fp, True)
        meta = _read_file_meta_info(fp)
        if meta.get("TransferSyntaxUID") == _DEFLATED:
            start = fp.tell()
            stored = len(body) - start
            inflated = _inflate_dicom(body[start:], limits, require_2d)
            ds = pydicom.dcmread(io.BytesIO(inflated), force=True)
            meta.TransferSyntaxUID = ExplicitVRLittleEndian  # what the inflated data set is
            ds.file_meta = meta
        else:
            ds = pydicom.dcmread(io.BytesIO(body), force=True)
        has_pixels = any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"))
    except EOFError as e:
        raise DecodeError("truncated DICOM") from e
    except (MemoryError, DecodeError):
        raise
    except Exception as e:  # pydicom raises many types on garbage; type only (messages may quote values)
        raise DecodeError(f"corrupt DICOM: {type(e).__name__}") from e
    if not has_pixels:
        raise DecodeError("DICOM without pixel data")
    meta = getattr(ds, "file_meta", None)
    if meta is None or "TransferSyntaxUID" not in meta:
        # No meta header (raw data set): pixel decoding needs a syntax, take the one the parser found.
        implicit, little = ds.original_encoding
        meta = meta if meta is not None else FileMetaDataset()
        meta.TransferSyntaxUID = (
            ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian if little else ExplicitVRBigEndian
        )
        ds.file_meta = meta
    return ds, stored


# Start-of-frame markers whose segment gives a JPEG codestream's size: SOF0-15 but DHT (C4), JPG (C8)
# and DAC (CC), plus JPEG-LS SOF55 (F7).
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC} | {0xF7}
_JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  \r\n\x87\n"
_CODESTREAM_PEEK = 1 << 16


def _codestream_size(head: bytes) -> tuple[int, int, int, int] | None:
    """(width, height, components, bits) a JPEG / JPEG-LS / JPEG 2000 frame declares, None if unknown."""
    if head[:2] == b"\xff\xd8":
        i = 2
        while i + 4 <= len(head) and head[i] == 0xFF:
            marker = head[i + 1]
            if marker == 0xFF:  # fill byte
                i += 1
                continue
            if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # no length
                i += 2
                continue
            if marker in _SOF and i + 10 <= len(head):
                bits, height, width, comps = struct.unpack_from(">BHHB", head, i + 4)
                return width, height, comps, bits
            if marker == 0xDA:  # scan data before any frame header
                return None
            i += 2 + struct.unpack_from(">H", head, i + 2)[0]
        return None
    if head[:4] == b"\xff\x4f\xff\x51" or head.startswith(_JP2_SIGNATURE):
        at = head.find(b"\xff\x4f\xff\x51")  # SOC then SIZ (inside the jp2c box for JP2)
        if at < 0 or at + 43 > len(head):
            return None
        xsiz, ysiz, xo, yo = struct.unpack_from(">IIII", head, at + 8)
        comps, ssiz = struct.unpack_from(">HB", head, at + 40)
        return max(0, xsiz - xo), max(0, ysiz - yo), comps, (ssiz & 0x7F) + 1
    return None


def _encapsulated_heads(ds, frames: int) -> Iterator[bytes]:
    """The first bytes of each encapsulated frame (as pydicom will split them); stops early where the
    encapsulation does not parse (pydicom's decoder then reports it)."""
    from pydicom.encaps import generate_fragmented_frames

    try:
        eot = ds.get("ExtendedOffsetTable"), ds.get("ExtendedOffsetTableLengths")
        split = generate_fragmented_frames(
            ds.PixelData, number_of_frames=frames, extended_offsets=eot if all(eot) else None
        )
        for i, fragments in enumerate(split):
            if i >= frames or not fragments:
                return
            yield bytes(fragments[0][:_CODESTREAM_PEEK])
    except MemoryError:
        raise
    except Exception:
        return


def _check_frames(
    ds, limits: DecodeLimits, rows: int, cols: int, frames: int, samples: int, bits: int
) -> None:
    """Compressed frames decode to the size their own codestream header declares, whatever the DICOM
    header says: refuse one that would decode to more than the header's frame before it is decoded."""
    ts = ds.file_meta.TransferSyntaxUID
    if not getattr(ts, "is_encapsulated", False) or "PixelData" not in ds:
        return
    frame_bytes = _pixel_bytes(rows, cols, 1, samples, bits)
    for i, head in enumerate(_encapsulated_heads(ds, frames)):
        size = _codestream_size(head)
        if size is None:
            continue
        width, height, comps, depth = size
        limits.check_pixels(width * height)
        if _pixel_bytes(height, width, 1, comps, -(-depth // 8) * 8) > frame_bytes:
            raise DecodeError(
                f"decompression bomb: frame {i} codestream is {width}x{height}x{comps} ({depth}-bit),"
                f" larger than the DICOM header's {cols}x{rows}x{samples} ({bits}-bit)"
            )


def _dicom_pixels(ds) -> np.ndarray:
    try:
        return ds.pixel_array  # YBR is converted to RGB by pydicom (as_rgb default)
    except MemoryError:
        raise
    except ValueError as e:
        if "less than expected" in str(e):
            raise DecodeError("truncated DICOM") from e
        raise DecodeError(f"corrupt DICOM: {type(e).__name__}") from e
    except (RuntimeError, NotImplementedError) as e:  # no plugin, or every plugin failed
        raise _dicom_ts_error(ds.file_meta.TransferSyntaxUID) from e
    except Exception as e:
        raise DecodeError(f"corrupt DICOM: {type(e).__name__}") from e


def _dicom_uint8(ds, arr: np.ndarray, pi: str, samples: int) -> np.ndarray:
    """Monochrome: modality LUT, then the file's VOI LUT/window (else the robust window), MONOCHROME1
    inverted; colour: luminance."""
    from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut

    if pi == "PALETTE COLOR":
        rgb = apply_color_lut(arr, ds)
        # LUT entries are 8 or 16 bit; scale by the full entry range, not the content.
        return _scale_range(_luma(rgb), 0, 255 if rgb.dtype.itemsize == 1 else 65535)
    if samples == 3:
        lum = _luma(arr)
        return _scale_range(lum, 0, 255) if arr.dtype.itemsize == 1 else rescale_robust(lum)
    arr = apply_modality_lut(arr, ds)  # RescaleSlope/Intercept or Modality LUT Sequence
    u8 = None
    if _has_voi(ds):
        try:
            lo, hi = _voi_range(ds)
            u8 = _scale_range(apply_voi_lut(arr, ds, index=0), lo, hi)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            u8 = None  # invalid window (e.g. width < 1): fall back to the robust window
    if u8 is None:
        u8 = rescale_robust(arr)
    return 255 - u8 if pi == "MONOCHROME1" else u8  # MONOCHROME1: low values are white


# A Modality value is a code string (CS: upper case, digits, space, underscore; 16 characters at most);
# anything else is not reported, so a malformed header can never smuggle free text into the outputs.
_CODE_STRING = re.compile(r"[A-Z0-9_ ]{1,16}")


def _dicom_modality(ds) -> str | None:
    """Modality ('MR', 'CT', ...) stripped and upper case; None when absent or not a code string."""
    try:
        value = ds.get("Modality")
    except MemoryError:
        raise
    except Exception:  # a malformed element fails lazily, on access
        return None
    if not isinstance(value, str):  # absent, or several values (VM is 1)
        return None
    code = value.strip().upper()
    return code if _CODE_STRING.fullmatch(code) else None


def _dicom_orientations(ds):
    """ImageOrientationPatient candidates, in order: the top level (classic images), then the enhanced
    multi-frame functional groups (shared, else the first frame's)."""
    yield ds.get("ImageOrientationPatient")
    for groups in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        seq = ds.get(groups)
        if seq:
            planes = seq[0].get("PlaneOrientationSequence")
            if planes:
                yield planes[0].get("ImageOrientationPatient")


def _dicom_view(ds) -> str | None:
    """The plane of the frames from the first usable ImageOrientationPatient; None when there is none
    (a missing or malformed orientation is no reason to refuse pixels that decode)."""
    try:
        for iop in _dicom_orientations(ds):
            if iop is None:
                continue
            try:
                return view_from_orientation(iop)
            except ValueError:
                continue
    except MemoryError:
        raise
    except Exception:  # malformed sequences / values fail lazily, on access
        return None
    return None


def decode_dicom(
    data: bytes,
    *,
    max_pixels: int | None = None,
    max_voxels: int | None = None,
    require_2d: bool = False,
    limits: DecodeLimits = DEFAULT_LIMITS,
) -> DecodedScan:
    """Decode DICOM bytes (with or without preamble/meta) to a (frames, H, W) uint8 stack.

    Monochrome: modality LUT, then the file's VOI LUT/window (else a 0.5-99.5 % window over all
    frames), MONOCHROME1 inverted. Colour (RGB/YBR/palette): luminance. One window per file so frames
    of a volume stay comparable. ``modality`` and ``view`` come from the header (None when it lacks them).
    ``limits`` (``max_pixels``/``max_voxels`` override its caps) are checked from headers: the data
    set's (a deflated one while it inflates) and each compressed frame's, before pixels are decoded.
    """
    limits = limits.with_sizes(max_pixels, max_voxels)
    ds, stored = _read_dicom(data, limits, require_2d)
    rows, cols, frames, samples, pi, bits = _check_geometry(ds, limits, stored, require_2d)
    _check_frames(ds, limits, rows, cols, frames, samples, bits)
    arr = _dicom_pixels(ds)
    try:
        u8 = _dicom_uint8(ds, arr, pi, samples)
    except (MemoryError, DecodeError):
        raise
    except Exception as e:
        raise DecodeError(f"corrupt DICOM: {type(e).__name__} in pixel transform") from e
    return DecodedScan(
        slices=np.ascontiguousarray(u8.reshape(frames, rows, cols)),
        format="dicom",
        mode=f"{pi}/{bits}",
        width=cols,
        height=rows,
        kind="volume" if frames > 1 else "image",
        slice_index=np.arange(frames, dtype=np.int64),
        num_slices=frames,
        view=_dicom_view(ds),
        modality=_dicom_modality(ds),
    )


# ----------------------------------------------------------------------------------------------------
# NIfTI

_GZIP = b"\x1f\x8b"
# Bytes allowed beyond header + declared voxels when inflating: extensions (vox_offset may be 0).
_EXT_SLACK = 1 << 20
_FOREGROUND_LEVEL = round(0.05 * 255)  # uint8 level above which a voxel counts as head


def _gunzip_limited(data: bytes, limit: int) -> bytes:
    """The first ``limit`` inflated bytes at most (whatever follows them is never inflated)."""
    return inflate_limited(data, 16 + zlib.MAX_WBITS, limit, "NIfTI gzip")[0]


def _volume_window(vol: np.ndarray) -> tuple[float, float]:
    """0.5-99.5 % of finite non-zero voxels (zero is padding/background in most NIfTI volumes)."""
    v = vol[np.isfinite(vol) & (vol != 0)]
    if v.size == 0:
        return 0.0, 0.0
    if v.size > 4_000_000:  # percentiles of a strided sample: same window, far less time
        v = v[:: v.size // 4_000_000]
    lo, hi = np.percentile(v, [0.5, 99.5])
    if not hi > lo:
        lo, hi = float(v.min()), float(v.max())
    if not hi > lo:  # constant non-zero volume: show it as white, background black
        lo = min(0.0, float(lo) - 1.0)
    return float(lo), float(hi)


def _nifti_header(data: bytes, gz: bool):
    """(header, image class, header size) from the first bytes, without inflating the payload."""
    import nibabel as nib

    head = _gunzip_limited(data, 540) if gz else bytes(data[:540])
    if len(head) < 348:
        raise DecodeError("truncated NIfTI header")
    n2 = int.from_bytes(head[:4], "little") == 540 or int.from_bytes(head[:4], "big") == 540
    hdr_cls, img_cls = (nib.Nifti2Header, nib.Nifti2Image) if n2 else (nib.Nifti1Header, nib.Nifti1Image)
    size = 540 if n2 else 348
    if len(head) < size:
        raise DecodeError("truncated NIfTI header")
    try:
        hdr = hdr_cls(binaryblock=head[:size], check=False)  # endianness guessed from sizeof_hdr
        hdr.get_data_shape(), hdr.get_data_dtype(), int(hdr["vox_offset"])  # noqa: B018 - parse or fail here
    except MemoryError:
        raise
    except Exception as e:
        raise DecodeError(f"corrupt NIfTI header: {type(e).__name__}") from e
    return hdr, img_cls, size


def _nifti_shape(hdr, limits: DecodeLimits, require_2d: bool) -> list[int]:
    """The 3-D shape the header declares, with the size (bomb) guards applied before reading voxels."""
    shape = [int(s) for s in hdr.get_data_shape()]
    if bytes(hdr["magic"]).startswith((b"ni1", b"ni2")):
        raise DecodeError("NIfTI .hdr/.img pair: single-file .nii needed")
    if not shape or min(shape) < 1:
        raise DecodeError(f"corrupt NIfTI header: shape {tuple(shape)}")
    while len(shape) > 3 and shape[-1] == 1:  # trailing singleton dims carry no data
        shape.pop()
    if len(shape) > 3:
        raise DecodeError(f"4-D NIfTI ({math.prod(shape[3:])} volumes): score 3-D structural volumes")
    shape += [1] * (3 - len(shape))  # 2-D NIfTI -> one slice
    limits.check_voxels(math.prod(shape))
    two = sorted(shape)[1:]  # largest possible slice, whatever axis ends up axial
    limits.check_pixels(two[0] * two[1])
    if require_2d and sum(s > 1 for s in shape) > 2:
        raise DecodeError(f"3-D volume (nifti, {'x'.join(map(str, shape))}): not a 2-D image")
    return shape


@dataclass
class NiftiVolume:
    """A NIfTI volume in RAS+ voxel order after the volume's intensity window (what decode_nifti slices).

    ``voxels`` (X, Y, Z) uint8: the index grows towards the patient's right, anterior and superior.
    ``spacing_mm``: the voxel size along each axis (None where the header's is not positive and finite).
    ``mode``: the stored dtype, e.g. 'int16'.
    """

    voxels: np.ndarray
    spacing_mm: tuple[float | None, float | None, float | None]
    mode: str


def _nifti_canonical(
    raw: bytes, img_cls, shape: list[int], nbytes: int
) -> tuple[np.ndarray, tuple[float | None, float | None, float | None]]:
    """The volume in RAS+ voxel order (axis 2 inferior -> superior) and its voxel size per axis."""
    import nibabel as nib

    try:
        img = img_cls.from_bytes(raw)
        if len(raw) < img.dataobj.offset + nbytes:
            raise DecodeError("truncated NIfTI")
        vol = img.get_fdata(dtype=np.float32).reshape(shape)  # applies scl_slope/inter
        affine = img.affine
    except (DecodeError, MemoryError):
        raise
    except Exception as e:
        raise DecodeError(f"corrupt NIfTI: {type(e).__name__}") from e
    if affine is None or not np.isfinite(affine).all():
        raise DecodeError("corrupt NIfTI: non-finite affine")
    try:
        can = nib.as_closest_canonical(img_cls(vol, affine))  # flips/transposes only
        zooms = [abs(float(z)) for z in can.header.get_zooms()[:3]]
    except Exception as e:
        raise DecodeError(f"corrupt NIfTI: orientation {type(e).__name__}") from e
    zooms += [0.0] * (3 - len(zooms))
    sx, sy, sz = (z if math.isfinite(z) and z > 0 else None for z in zooms)
    return np.asanyarray(can.dataobj), (sx, sy, sz)


def _nifti_volume(data: bytes, limits: DecodeLimits, require_2d: bool) -> NiftiVolume:
    gz = data[:2] == _GZIP
    hdr, img_cls, size = _nifti_header(data, gz)
    shape = _nifti_shape(hdr, limits, require_2d)
    nbytes = math.prod(shape) * hdr.get_data_dtype().itemsize
    need = max(int(hdr["vox_offset"]), size + 4) + nbytes
    # Header, extensions and voxels as declared, against the stored size: refused before inflating.
    limits.check_bytes("NIfTI", need, len(data))
    # The header bounded the payload: never inflate more than it declared (gzip bombs).
    raw = _gunzip_limited(data, need + _EXT_SLACK) if gz else bytes(data)
    if len(raw) < need:
        raise DecodeError("truncated NIfTI")
    vol, spacing = _nifti_canonical(raw, img_cls, shape, nbytes)
    del raw  # the float32 volume is all that is needed now (peak memory: a 512x512x400 MRI ~1 GB)
    lo, hi = _volume_window(vol)
    return NiftiVolume(
        voxels=_scale_range(vol, lo, hi, overwrite=True),
        spacing_mm=spacing,
        mode=hdr.get_data_dtype().newbyteorder("=").name,
    )


def decode_nifti_volume(
    data: bytes,
    *,
    max_pixels: int | None = None,
    max_voxels: int | None = None,
    limits: DecodeLimits = DEFAULT_LIMITS,
) -> NiftiVolume:
    """Decode .nii / .nii.gz bytes to the whole RAS-canonical uint8 volume (no slice selection), with the
    intensity window and size guards of :func:`decode_nifti`; cut it with :func:`plane_slices`."""
    return _nifti_volume(data, limits.with_sizes(max_pixels, max_voxels), require_2d=False)


# view -> (transpose of the (X, Y, Z) volume to (slice, row, column), reverse the rows, reverse the columns)
_PLANE_LAYOUT = {
    "axial": ((2, 1, 0), True, False),
    "coronal": ((1, 2, 0), True, True),
    "sagittal": ((0, 2, 1), True, True),
}


def plane_slices(voxels: np.ndarray, view: str) -> np.ndarray:
    """All slices of a RAS-canonical (X, Y, Z) volume along ``view``'s axis (sagittal: x, coronal: y,
    axial: z), as a contiguous (K, H, W) stack in index order (left -> right, posterior -> anterior,
    inferior -> superior).

    Image orientation:

    * axial: anterior up, the patient's right on the image right (the orientation scoring has always
      decoded volumes in; left/right flips are a training augmentation anyway);
    * coronal: superior up, the patient's right on the image left (radiological convention);
    * sagittal: superior up, anterior (the face) on the image left.
    """
    if view not in _PLANE_LAYOUT:
        raise ValueError(f"unknown view {view!r}: expected one of {sorted(_PLANE_LAYOUT)}")
    axes, flip_rows, flip_cols = _PLANE_LAYOUT[view]
    stack = np.transpose(voxels, axes)
    return np.ascontiguousarray(stack[:, :: -1 if flip_rows else 1, :: -1 if flip_cols else 1])


def head_slices(stack: np.ndarray, min_foreground: float) -> np.ndarray:
    """Positions (int64) of the slices of a (K, H, W) uint8 stack whose head foreground covers at least
    ``min_foreground`` of the slice; the middle slice when none does (a volume always yields one)."""
    # Head foreground: above 5 % of the volume window. Low on purpose: dim edge slices and dark
    # tissue still count, while zero padding and MR background noise (well under 5 % of the
    # 99.5th percentile) do not. Otsu was tried and dropped dim-but-real slices.
    frac = (stack > _FOREGROUND_LEVEL).mean(axis=(1, 2))
    keep = np.flatnonzero(frac >= min_foreground)
    if keep.size == 0:
        keep = np.array([len(stack) // 2])
    return keep.astype(np.int64)


def decode_nifti(
    data: bytes,
    *,
    max_pixels: int | None = None,
    max_voxels: int | None = None,
    min_foreground: float = 0.05,
    require_2d: bool = False,
    limits: DecodeLimits = DEFAULT_LIMITS,
) -> DecodedScan:
    """Decode .nii / .nii.gz (NIfTI-1 or -2) bytes to RAS-canonical axial uint8 slices, anterior up.

    One intensity window for the whole volume; slices whose head foreground covers less than
    ``min_foreground`` of the slice are dropped (at least the middle slice is kept) and
    ``slice_index`` records the canonical z of each kept slice. A single-plane image keeps its plane
    whole (its ``view`` says which: the singleton axis), a volume's view is axial. ``limits``
    (``max_pixels``/``max_voxels`` override its caps) are checked from the header before inflating.
    """
    vol = _nifti_volume(data, limits.with_sizes(max_pixels, max_voxels), require_2d)
    u8, view, spacing = vol.voxels, "axial", vol.spacing_mm[2]
    if u8.shape[2] != 1 and sum(s > 1 for s in u8.shape) == 2:
        axis = u8.shape.index(1)  # a single (e.g. sagittal) plane: keep it whole, its view is its normal
        u8, view = np.moveaxis(u8, axis, 2), VIEW_OF_AXIS[axis]
    if require_2d and u8.shape[2] > 1:
        raise DecodeError(f"3-D volume (nifti, {u8.shape[2]} slices): not a 2-D image")
    return _volume_scan(u8, "axial", spacing, min_foreground, "nifti", vol.mode, view)


def _volume_scan(
    voxels: np.ndarray,
    plane: str,
    spacing: float | None,
    min_foreground: float,
    fmt: str,
    mode: str,
    view: str,
    modality: str | None = None,
) -> DecodedScan:
    """The slices of a RAS-canonical uint8 volume along ``plane`` that hold head: the one way NIfTI
    volumes and DICOM series become slice stacks, so both score the same voxels the same way."""
    stack = plane_slices(voxels, plane)
    nz = stack.shape[0]
    keep = head_slices(stack, min_foreground)
    return DecodedScan(
        slices=stack[keep] if keep.size < nz else stack,
        format=fmt,
        mode=mode,
        width=int(stack.shape[2]),
        height=int(stack.shape[1]),
        kind="volume" if nz > 1 else "image",
        slice_index=keep,
        num_slices=nz,
        spacing_mm=spacing if nz > 1 else None,
        view=view,
        modality=modality,
        plane=plane,
    )


# ----------------------------------------------------------------------------------------------------
# DICOM series: single-frame files that together form a volume

# Header bytes read per file by the series header pass; a header longer than this is read whole.
SERIES_HEADER_PEEK = 64 << 10
# Slices whose normal is this far from a near-isotropic volume's are reformatted to axial like a NIfTI
# volume; a series with slices thicker than this many times its pixel size is scored in its own plane
# (axial slices cut from 5 mm coronal slices would be 10x blurred along one axis).
REFORMAT_MAX_ANISOTROPY = 1.5


def _floats(value, n: int) -> tuple[float, ...] | None:
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return out if len(out) == n and all(math.isfinite(v) for v in out) else None


def _text(ds, keyword: str) -> str | None:
    try:
        value = ds.get(keyword)
    except MemoryError:
        raise
    except Exception:
        return None
    if value is None:
        return None
    value = str(value).strip()
    return value or None


def dicom_header(data: bytes, complete: bool = True) -> dict | None:
    """The series-assembly fields of a DICOM file's header (pixels never read), as plain types.

    ``data`` may be the file's first bytes (``complete=False``): None means the header did not fit and
    the whole file is needed. A file that is not DICOM gives ``{"dicom": False}``; one whose header does
    not parse ``{"dicom": True, "header_error": reason}``. UIDs and descriptions are returned for the
    driver to hash or drop: callers never write them out unless asked to (they identify a patient)."""
    import pydicom
    from pydicom.filereader import _read_file_meta_info, read_preamble

    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    start = dicom_start(data)
    if start < 0:
        return {"dicom": False}
    body = data[start:]
    try:
        fp = io.BytesIO(body)
        read_preamble(fp, True)
        meta = _read_file_meta_info(fp)
        if meta.get("TransferSyntaxUID") == _DEFLATED:  # header inside the deflated stream: a lone file
            return {"dicom": True, "header_error": "deflated data set"}
        ds = pydicom.dcmread(io.BytesIO(body), force=True, stop_before_pixels=True)
        rows, cols = ds.get("Rows"), ds.get("Columns")
        if not complete and ("BitsAllocated" not in ds or rows is None):
            return None  # the peek ended inside the header
    except MemoryError:
        raise
    except Exception as e:
        if not complete:
            return None
        return {"dicom": True, "header_error": f"corrupt DICOM header: {type(e).__name__}"}
    try:
        frames = int(ds.get("NumberOfFrames") or 1)
        rows, cols = int(rows or 0), int(cols or 0)
    except (TypeError, ValueError):
        frames, rows, cols = 1, 0, 0
    try:
        image_type = [str(v).strip().upper() for v in (ds.get("ImageType") or [])]
    except Exception:  # noqa: BLE001 - malformed value: no type
        image_type = []
    instance = _text(ds, "InstanceNumber")
    thickness = _floats([ds.get("SliceThickness")], 1) if ds.get("SliceThickness") is not None else None
    return {
        "dicom": True,
        "header_error": None,
        "study_uid": _text(ds, "StudyInstanceUID"),
        "series_uid": _text(ds, "SeriesInstanceUID"),
        "sop_uid": _text(ds, "SOPInstanceUID"),
        "sop_class": _text(ds, "SOPClassUID"),
        "frame_of_reference": _text(ds, "FrameOfReferenceUID"),
        "modality": _dicom_modality(ds),
        "image_type": "\\".join(image_type),
        "iop": _floats(ds.get("ImageOrientationPatient") or (), 6),
        "ipp": _floats(ds.get("ImagePositionPatient") or (), 3),
        "pixel_spacing": _floats(ds.get("PixelSpacing") or (), 2),
        "slice_thickness": thickness[0] if thickness else None,
        "instance_number": int(float(instance)) if instance and _floats([instance], 1) else None,
        "rows": rows,
        "cols": cols,
        "frames": frames,
        "series_description": _text(ds, "SeriesDescription"),
    }


def slice_normal(iop) -> np.ndarray:
    """The unit normal (row x column) of an ImageOrientationPatient, LPS axes."""
    v = np.asarray(iop, dtype=np.float64)
    row, col = v[:3] / np.linalg.norm(v[:3]), v[3:] / np.linalg.norm(v[3:])
    n = np.cross(row, col)
    return n / np.linalg.norm(n)


def series_grid(positions: np.ndarray, iop) -> tuple[np.ndarray, np.ndarray, float | None]:
    """Slice order and place of a series: (order of the files along the slice normal, each sorted file's
    index on the regular slice grid (gaps where slices are missing), spacing in mm). Spacing is the median
    step between neighbours along the normal, None for one file. ValueError for slices at the same
    position (several echoes or repeats in one series) or an irregular grid."""
    along = np.asarray(positions, dtype=np.float64) @ slice_normal(iop)
    order = np.argsort(along, kind="stable")
    z = along[order]
    if len(z) < 2:
        return order, np.zeros(len(z), dtype=np.int64), None
    steps = np.diff(z)
    if (steps < 1e-3).any():
        raise ValueError(f"{int((steps < 1e-3).sum())} slices share a position (several echoes or repeats)")
    spacing = float(np.median(steps))
    grid = np.rint((z - z[0]) / spacing).astype(np.int64)
    if np.abs((z - z[0]) / spacing - grid).max() > 0.25 or grid[-1] + 1 > 2 * len(z):
        raise ValueError("irregular slice positions (not one regular stack)")
    return order, grid, spacing


def decode_dicom_series(
    blobs: list[bytes],
    *,
    min_foreground: float = 0.05,
    limits: DecodeLimits = DEFAULT_LIMITS,
) -> DecodedScan:
    """Single-frame DICOM files of one series (any order) -> the slices to score, like a NIfTI volume.

    Each file's pixels go through its modality LUT (RescaleSlope/Intercept); the files are placed on a
    regular grid along the slice normal from ImagePositionPatient (a missing slice stays a gap: the
    sustained-score rule sees it), the volume gets the affine the headers give and is brought to the
    RAS-canonical order of NIfTI volumes, with one intensity window for the whole volume. A near-isotropic
    series (slice step <= 1.5x its pixel size) is cut into axial slices exactly as a NIfTI volume is; a
    series of thick slices is scored in its own plane. ``view``: the plane of the slices scored ('oblique'
    for a tilted stack)."""
    import nibabel as nib
    from pydicom.pixels import apply_modality_lut

    if not blobs:
        raise DecodeError("empty series")
    planes, positions, spacing_px, mode, modality, shape, iop0 = [], [], None, "", None, None, None
    for data in blobs:
        ds, stored = _read_dicom(data, limits, require_2d=True)
        rows, cols, _, samples, pi, bits = _check_geometry(ds, limits, stored, True)
        if samples != 1 or pi not in ("MONOCHROME1", "MONOCHROME2"):
            raise DecodeError(f"series of {pi} images: monochrome slices expected")
        iop = _floats(ds.get("ImageOrientationPatient") or (), 6)
        ipp = _floats(ds.get("ImagePositionPatient") or (), 3)
        if iop is None or ipp is None:
            raise DecodeError("series slice without ImageOrientationPatient/ImagePositionPatient")
        if shape is None:
            shape, iop0, mode, modality = (rows, cols), iop, f"{pi}/{bits}", _dicom_modality(ds)
            spacing_px = _floats(ds.get("PixelSpacing") or (), 2) or (1.0, 1.0)
            limits.check_voxels(rows * cols * len(blobs))
        elif (rows, cols) != shape:
            raise DecodeError("series slices of different sizes")
        elif np.abs(np.subtract(iop, iop0)).max() > 1e-3:
            raise DecodeError("series slices of different orientations")
        _check_frames(ds, limits, rows, cols, 1, samples, bits)
        try:
            arr = apply_modality_lut(_dicom_pixels(ds), ds).astype(np.float32, copy=False)
        except (MemoryError, DecodeError):
            raise
        except Exception as e:
            raise DecodeError(f"corrupt DICOM: {type(e).__name__} in pixel transform") from e
        planes.append(-arr if pi == "MONOCHROME1" else arr)  # MONOCHROME1: low values are white
        positions.append(ipp)
    try:
        order, grid, step = series_grid(np.asarray(positions), iop0)
    except ValueError as e:
        raise DecodeError(f"series geometry: {e}") from None
    rows, cols = shape
    vol = np.zeros((cols, rows, int(grid[-1]) + 1), dtype=np.float32)  # (i: column, j: row, k: slice)
    for g, f in zip(grid, order, strict=True):
        vol[:, :, g] = planes[f].T
    del planes
    # Voxel (i, j, k) -> patient LPS: IPP of the first slice + i steps along the row direction (PixelSpacing
    # [1], between columns), j along the column direction (PixelSpacing[0], between rows), k along the normal.
    r, c = np.asarray(iop0[:3]), np.asarray(iop0[3:])
    r, c = r / np.linalg.norm(r), c / np.linalg.norm(c)
    affine = np.eye(4)
    affine[:3, 0] = r * spacing_px[1]
    affine[:3, 1] = c * spacing_px[0]
    affine[:3, 2] = slice_normal(iop0) * (step or max(spacing_px))
    affine[:3, 3] = positions[order[0]]
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine  # LPS -> RAS, as NIfTI
    try:
        can = nib.as_closest_canonical(nib.Nifti1Image(vol, affine))  # flips/transposes only
    except Exception as e:
        raise DecodeError(f"series geometry: orientation {type(e).__name__}") from e
    voxels = np.asanyarray(can.dataobj)
    zooms = [abs(float(z)) for z in can.header.get_zooms()[:3]]
    lo, hi = _volume_window(voxels)
    u8 = _scale_range(np.array(voxels, dtype=np.float32), lo, hi, overwrite=True)
    view = view_from_orientation(iop0)
    # The canonical axis the acquired slices are stacked along (the normal's largest RAS component).
    axis = int(np.argmax(np.abs(np.linalg.inv(can.affine[:3, :3]) @ (affine[:3, :3] @ [0, 0, 1]))))
    thick = step is not None and step > REFORMAT_MAX_ANISOTROPY * max(spacing_px)
    plane = VIEW_OF_AXIS[axis] if thick else "axial"
    # The view of the slices the model sees: axial reformats are axial unless the stack was oblique
    # (the canonical reorientation only permutes axes, so its "axial" slices stay tilted).
    seen = view if thick or view == "oblique" else "axial"
    return _volume_scan(u8, plane, zooms[_AXIS_OF_VIEW[plane]], min_foreground, "dicom", mode, seen, modality)


_AXIS_OF_VIEW = {v: i for i, v in enumerate(VIEW_OF_AXIS)}
