"""formats: content sniffing, robust decoding of every mode, bad input, bombs, geometry."""

from __future__ import annotations

import gzip
import io
import struct
import zipfile
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from raytumor.formats import (
    DECODERS,
    DecodeError,
    decode_image,
    fit_square,
    sniff_format,
    to_gray_uint8,
)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _gradient(h: int = 48, w: int = 64) -> np.ndarray:
    return np.add.outer(np.arange(h) * 2, np.arange(w) * 2).clip(0, 255).astype(np.uint8)


def _png_chunk(tag: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body) & 0xFFFFFFFF)


def _bilevel_png(w: int, h: int) -> bytes:
    """A valid all-black 1-bit PNG, compressed row by row: w*h pixels in a few kB, never held in memory."""
    comp = zlib.compressobj(9)
    row = b"\x00" * (1 + (w + 7) // 8)
    idat = b"".join(comp.compress(row) for _ in range(h)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


# ---------------------------------------------------------------------------------------------------- sniffing


@pytest.mark.parametrize(
    "pil_format,expected",
    [("JPEG", "jpeg"), ("PNG", "png"), ("BMP", "bmp"), ("TIFF", "tiff"), ("GIF", "gif"), ("WEBP", "webp")],
)
def test_raster_formats_sniffed_and_decoded(pil_format, expected):
    arr = _gradient()
    data = _save(Image.fromarray(arr), pil_format, **({"lossless": True} if pil_format == "WEBP" else {}))
    assert sniff_format(data) == expected
    dec = decode_image(data)
    assert dec.format == expected
    assert (dec.width, dec.height) == (64, 48)
    assert dec.pixels.shape == (48, 64) and dec.pixels.dtype == np.uint8
    assert dec.pixels.flags.writeable and dec.pixels.flags.c_contiguous
    tol = 3 if pil_format == "JPEG" else 0
    assert np.abs(dec.pixels.astype(int) - arr).mean() <= tol


def test_png_with_jpg_name_is_sniffed_from_content(tmp_path):
    arr = _gradient()
    path = tmp_path / "scan 1.jpg"
    path.write_bytes(_save(Image.fromarray(arr), "PNG"))
    data = path.read_bytes()
    assert sniff_format(data) == "png"
    dec = decode_image(data)
    assert dec.format == "png"
    np.testing.assert_array_equal(dec.pixels, arr)


def test_sniff_non_images():
    assert sniff_format(b"") == "unknown"
    assert sniff_format(b"%PDF-1.7\n...") == "pdf"
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("a.txt", "x")
    assert sniff_format(buf.getvalue()) == "zip"
    assert sniff_format(gzip.compress(b"hello " * 100)) == "gzip"
    assert sniff_format(b"BMW is not a bitmap header at all" * 3) == "unknown"


def test_dicom_magic_sniffed_and_decoded():
    pydicom = pytest.importorskip("pydicom")
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"  # MR Image Storage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Rows = ds.Columns = 4
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.PixelData = np.arange(16, dtype=np.uint16).tobytes()
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    data = buf.getvalue()
    assert sniff_format(data) == "dicom"
    # a bare preamble + magic is enough too; extension or preamble content must not matter
    assert sniff_format(b"II*\x00" + b"\x00" * 124 + b"DICM" + b"\x00" * 16) == "dicom"
    dec = decode_image(data)
    assert dec.format == "dicom" and dec.pixels.shape == (4, 4)
    assert dec.pixels[0, 0] < dec.pixels[-1, -1]  # a ramp stays a ramp after windowing
    assert "dicom" in DECODERS


def test_nifti_sniffed_plain_and_gzipped():
    nib = pytest.importorskip("nibabel")
    vol = np.arange(4 * 5 * 3, dtype=np.int16).reshape(4, 5, 3)
    n1 = nib.Nifti1Image(vol, np.eye(4)).to_bytes()
    n2 = nib.Nifti2Image(vol, np.eye(4)).to_bytes()
    for data in (n1, n2, gzip.compress(n1), gzip.compress(n2)):
        assert sniff_format(data) == "nifti"
    # a gzip whose payload is not NIfTI stays 'gzip', and a truncated gzip NIfTI does not crash sniffing
    assert sniff_format(gzip.compress(b"\x00" * 600)) == "gzip"
    assert sniff_format(gzip.compress(n1)[:20]) == "gzip"
    # training decodes 2-D images only; volumes are scored by `raytumor score`
    with pytest.raises(DecodeError, match=r"3-D volume \(nifti"):
        decode_image(gzip.compress(n1))


# ---------------------------------------------------------------------------------------------------- modes


def test_mode_l_exact():
    arr = _gradient()
    dec = decode_image(_save(Image.fromarray(arr), "PNG"))
    assert dec.mode == "L"
    np.testing.assert_array_equal(dec.pixels, arr)


def test_mode_rgb_is_luminance():
    rgb = np.zeros((4, 6, 3), dtype=np.uint8)
    rgb[:, :2] = (255, 0, 0)
    rgb[:, 2:4] = (0, 255, 0)
    rgb[:, 4:] = (0, 0, 255)
    dec = decode_image(_save(Image.fromarray(rgb), "PNG"))
    assert dec.mode == "RGB"
    # ITU-R 601-2: 0.299 R + 0.587 G + 0.114 B
    np.testing.assert_allclose(dec.pixels[0, [0, 2, 4]], [76, 150, 29], atol=1)


def test_mode_rgba_transparent_pixels_become_black():
    rgba = np.full((10, 20, 4), 255, dtype=np.uint8)  # white everywhere ...
    rgba[:, :10, 3] = 0  # ... fully transparent on the left
    rgba[:, 10:15, 3] = 128  # half transparent in the middle
    dec = decode_image(_save(Image.fromarray(rgba), "PNG"))
    assert dec.mode == "RGBA"
    assert (dec.pixels[:, :10] == 0).all()
    assert np.abs(dec.pixels[:, 10:15].astype(int) - 128).max() <= 1
    assert (dec.pixels[:, 15:] == 255).all()


def test_mode_la_transparent_pixels_become_black():
    a = np.zeros((4, 8), dtype=np.uint8)
    a[:, 4:] = 255
    la = Image.merge("LA", [Image.new("L", (8, 4), 200), Image.fromarray(a)])
    dec = decode_image(_save(la, "PNG"))
    assert dec.mode == "LA"
    assert (dec.pixels[:, :4] == 0).all() and (dec.pixels[:, 4:] == 200).all()


def test_mode_p_without_transparency_uses_palette_colours():
    p = Image.new("P", (6, 2))
    p.putpalette([0, 0, 0, 255, 255, 255, 255, 0, 0] + [0] * (256 * 3 - 9))
    p.putdata([0, 1, 2, 0, 1, 2] * 2)
    dec = decode_image(_save(p, "PNG"))
    assert dec.mode == "P"
    np.testing.assert_allclose(dec.pixels[0], [0, 255, 76, 0, 255, 76], atol=1)


def test_mode_p_with_transparency_composited_over_black():
    p = Image.new("P", (4, 2))
    p.putpalette([255, 255, 255, 128, 128, 128] + [0] * (256 * 3 - 6))
    p.putdata([0, 1, 0, 1] * 2)
    data = _save(p, "PNG", transparency=0)  # the white palette entry is fully transparent
    assert Image.open(io.BytesIO(data)).info.get("transparency") is not None
    dec = decode_image(data)
    assert dec.mode == "P"
    np.testing.assert_array_equal(dec.pixels[0], [0, 128, 0, 128])
    # the same file read through GIF (single transparent index) behaves the same
    gif = decode_image(_save(p, "GIF", transparency=0))
    np.testing.assert_array_equal(gif.pixels[0], [0, 128, 0, 128])


def test_mode_i16_is_rescaled_not_clipped():
    arr = np.linspace(1000, 3000, 64 * 64).reshape(64, 64).astype(np.uint16)  # all values > 255
    dec = decode_image(_save(Image.fromarray(arr), "PNG"))
    assert dec.mode.startswith("I")
    px = dec.pixels
    assert px.min() == 0 and px.max() == 255
    assert (px == 255).mean() < 0.02  # a naive uint8 cast would make (nearly) everything white
    assert 100 < px.mean() < 155
    assert (np.diff(px.ravel().astype(int)) >= 0).all()  # monotonic ramp stays monotonic


def test_high_depth_constant_and_nan():
    const = Image.fromarray(np.full((8, 8), 4000, dtype=np.uint16))
    assert (to_gray_uint8(const) == 0).all()
    f = np.linspace(-5, 5, 100, dtype=np.float32).reshape(10, 10)
    f[0, 0] = np.nan
    out = to_gray_uint8(Image.fromarray(f))
    assert out.dtype == np.uint8 and out[0, 0] == 0 and out[-1, -1] == 255
    # 16-bit big-endian TIFF goes through the same path
    be = Image.fromarray(np.linspace(0, 60000, 256).reshape(16, 16).astype(np.uint16)).convert("I;16B")
    assert to_gray_uint8(be).max() == 255


def test_mode_1_is_0_or_255():
    arr = np.zeros((8, 8), dtype=bool)
    arr[2:5, 3:7] = True
    dec = decode_image(_save(Image.fromarray(arr), "PNG"))
    assert dec.mode == "1"
    assert set(np.unique(dec.pixels)) == {0, 255}
    np.testing.assert_array_equal(dec.pixels == 255, arr)


def test_mode_cmyk():
    cmyk = Image.new("CMYK", (8, 4), (0, 0, 0, 0))  # no ink = white
    cmyk.paste((0, 0, 0, 255), (0, 0, 4, 4))  # full black ink on the left
    for fmt in ("TIFF", "JPEG"):
        dec = decode_image(_save(cmyk, fmt))
        assert dec.mode == "CMYK"
        assert dec.pixels[:, :3].max() <= 5 and dec.pixels[:, 5:].min() >= 250


def test_multiframe_gif_takes_first_frame():
    f1 = Image.fromarray(np.full((6, 6), 40, dtype=np.uint8))
    f2 = Image.fromarray(np.full((6, 6), 220, dtype=np.uint8))
    data = _save(f1, "GIF", save_all=True, append_images=[f2])
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 2
    assert np.abs(decode_image(data).pixels.astype(int) - 40).max() <= 2


def test_exif_orientation_applied():
    arr = np.zeros((20, 40), dtype=np.uint8)
    arr[:, :20] = 255  # bright left half
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    dec = decode_image(_save(Image.fromarray(arr), "PNG", exif=exif))
    assert (dec.width, dec.height) == (40, 20)  # as stored
    assert dec.pixels.shape == (40, 20)
    np.testing.assert_array_equal(dec.pixels, np.rot90(arr, -1))  # left half now on top
    assert (dec.pixels[:20] == 255).all()


# ---------------------------------------------------------------------------------------------------- bad input


def test_decode_error_is_value_error_with_reason():
    err = DecodeError("empty file")
    assert isinstance(err, ValueError) and err.reason == "empty file" and str(err) == "empty file"


def test_zero_bytes():
    with pytest.raises(DecodeError) as ei:
        decode_image(b"")
    assert ei.value.reason == "empty file"


def test_random_bytes_and_non_images():
    data = np.random.default_rng(7).integers(0, 256, 5000, dtype=np.uint8).tobytes()
    assert sniff_format(data) == "unknown"
    with pytest.raises(DecodeError, match="^unknown format$"):
        decode_image(data)
    with pytest.raises(DecodeError, match=r"not an image \(pdf\)"):
        decode_image(b"%PDF-1.4\n1 0 obj << >> endobj\n%%EOF\n")
    with pytest.raises(DecodeError, match=r"not an image \(gzip\)"):
        decode_image(gzip.compress(b"abc" * 300))


@pytest.mark.parametrize("pil_format", ["JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"])
@pytest.mark.parametrize("keep", [0.5, 0.1])
def test_truncated_images(pil_format, keep):
    rng = np.random.default_rng(0)
    data = _save(Image.fromarray(rng.integers(0, 256, (120, 160), dtype=np.uint8)), pil_format)
    with pytest.raises(DecodeError, match="truncated") as ei:
        decode_image(data[: int(len(data) * keep)])
    assert ei.value.reason in ("truncated image", f"corrupt or truncated {sniff_format(data)} header")
    assert not ImageFile.LOAD_TRUNCATED_IMAGES  # never switched on globally


def test_decompression_bomb_rejected_from_header(monkeypatch):
    # Pillow must never get as far as allocating or decoding pixels for these files
    def no_load(self, *a, **k):
        raise AssertionError("pixels were loaded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_load)
    big = _bilevel_png(20_000, 20_000)  # 400 Mpx in ~50 kB: beyond Pillow's own hard limit too
    assert len(big) < 200_000
    with pytest.raises(DecodeError, match="^decompression bomb: 400000000 pixels > limit"):
        decode_image(big)
    mid = _bilevel_png(8_000, 8_000)  # 64 Mpx: below Pillow's hard limit, above our default
    with pytest.raises(DecodeError) as ei:
        decode_image(mid)
    assert ei.value.reason == "decompression bomb: 64000000 pixels > limit 50000000"
    with pytest.raises(DecodeError, match="^decompression bomb: 10000 pixels > limit 9999$"):
        decode_image(_save(Image.new("L", (100, 100)), "PNG"), max_pixels=9_999)


def test_max_pixels_allows_large_enough():
    dec = decode_image(_bilevel_png(300, 200), max_pixels=60_000)
    assert dec.pixels.shape == (200, 300) and (dec.pixels == 0).all()


# ---------------------------------------------------------------------------------------------------- geometry


def test_fit_square_keeps_aspect_with_padding_bands():
    wide = np.full((100, 300), 255, dtype=np.uint8)  # white rectangle, 3:1
    out = fit_square(wide, 150)
    assert out.shape == (150, 150) and out.dtype == np.uint8
    # 300x300 square with 100 px black bands top and bottom -> 50 px bands at 150
    assert (out[:48] == 0).all() and (out[-48:] == 0).all()
    assert (out[52:98] == 255).all()
    # a tall one pads left/right instead, symmetrically
    tall = fit_square(np.full((300, 100), 255, dtype=np.uint8), 150)
    np.testing.assert_array_equal(tall, out.T)


def test_fit_square_deterministic_and_square_passthrough():
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (37, 53), dtype=np.uint8)
    a, b = fit_square(img, 64), fit_square(img, 64)
    np.testing.assert_array_equal(a, b)
    sq = rng.integers(0, 256, (32, 32), dtype=np.uint8)
    out = fit_square(sq, 32)
    np.testing.assert_array_equal(out, sq)
    out[0, 0] ^= 1
    assert out[0, 0] != sq[0, 0]  # a copy, never a view of the caller's array
    with pytest.raises(ValueError):
        fit_square(np.zeros((0, 5), dtype=np.uint8), 8)


def test_fit_square_antialiases():
    stripes = np.zeros((512, 512), dtype=np.uint8)
    stripes[:, ::2] = 255  # 1-px stripes alias badly without a low-pass filter
    out = fit_square(stripes, 64)
    assert np.abs(out[:, 1:-1].astype(int) - 128).max() <= 2  # border columns see a one-sided kernel
    assert np.abs(out.astype(int) - 128).max() <= 8


def test_jpeg_draft_is_faithful_and_only_when_much_larger():
    yy, xx = np.mgrid[0:1200, 0:1600]
    arr = (127 + 100 * np.sin(xx / 60.0) * np.cos(yy / 45.0)).astype(np.uint8)
    data = _save(Image.fromarray(arr), "JPEG", quality=92)
    full = decode_image(data)
    drafted = decode_image(data, draft_size=224)
    assert full.pixels.shape == (1200, 1600)
    assert max(drafted.pixels.shape) >= 2 * 224 and max(drafted.pixels.shape) < 1600
    assert (drafted.width, drafted.height) == (1600, 1200)  # the stored size is still reported
    diff = np.abs(fit_square(full.pixels, 224).astype(int) - fit_square(drafted.pixels, 224))
    assert diff.mean() < 1.0 and diff.max() <= 8
    assert decode_image(data, draft_size=500).pixels.shape == (1200, 1600)  # 2x500 > 1600/2: no draft


# ---------------------------------------------------------------------------------------------------- real data

PNG_NAMED_JPG = {"no/no 96.jpg", "no/no.jpg", "no/No15.jpg", "no/No17.jpg", "no/No18.jpg", "no/no 98.jpg"}


def test_navoneel_all_decode_and_match_provenance():
    root = SHARED_DATA / "navoneel-253"
    if not root.is_dir():
        pytest.skip(f"real data {root} is absent (expected ../shared/data/navoneel-253 beside the repo)")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name != "PROVENANCE.md")
    assert len(files) == 253
    modes: Counter[str] = Counter()
    png_named_jpg = set()
    for p in files:
        data = p.read_bytes()
        dec = decode_image(data)
        assert dec.pixels.ndim == 2 and dec.pixels.dtype == np.uint8 and dec.pixels.size > 0
        assert dec.pixels.max() > dec.pixels.min()
        modes[dec.mode] += 1
        if dec.format == "png" and p.suffix.lower() in (".jpg", ".jpeg"):
            png_named_jpg.add(p.relative_to(root).as_posix())
    assert png_named_jpg == PNG_NAMED_JPG
    assert modes == Counter({"RGB": 217, "L": 30, "RGBA": 5, "P": 1})
