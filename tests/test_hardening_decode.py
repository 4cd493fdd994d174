"""Decoders are bounded by decoded bytes and compression ratio read from headers (issue 14, defect 4).

Each bomb is built here (a few hundred kB each: deflate streams of zeros) and decoded in a subprocess under an
address-space cap, so a decoder that does inflate it fails that process, not the test run; the child reports
whether it raised a DecodeError, its message and its peak RSS. Real scans (pydicom samples, a deflated copy of
one, IXI volumes, TCGA rasters) must still decode with the default limits.
"""

from __future__ import annotations

import io
import json
import os
import resource
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import raytumor
from raytumor.formats import DecodeError, decode_image, decode_scan

pydicom = pytest.importorskip("pydicom")
nib = pytest.importorskip("nibabel")

DCM_DIR = Path(pydicom.__file__).parent / "data" / "test_files"
SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SRC = Path(raytumor.__file__).resolve().parents[1]  # the raytumor under test (PYTHONPATH may point elsewhere)

PEAK_RSS_MB = 600  # a refused bomb; the old decoders peaked at 1-6 GB on these
AS_LIMIT = 3 << 30  # the child's address space: an unbounded inflate dies there, not in the machine

_CHILD = r"""
import json, resource, sys
from pathlib import Path
data = Path(sys.argv[1]).read_bytes()
from raytumor.formats import decode_scan
from raytumor.scan import DecodeError
res = {"decode_error": False, "error": None, "shape": None}
try:
    res["shape"] = list(decode_scan(data).slices.shape)
except DecodeError as e:
    res.update(decode_error=True, error=str(e))
except BaseException as e:  # MemoryError under the cap, or a decoder crash: not the contract
    res["error"] = f"{type(e).__name__}: {e}"[:300]
# VmHWM, not ru_maxrss: Linux carries ru_maxrss across fork+exec, so a child of a grown pytest process
# would report the parent's peak
hwm = [ln for ln in open("/proc/self/status") if ln.startswith("VmHWM:")]
res["peak_mb"] = int(hwm[0].split()[1]) / 1024 if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps(res))
"""


def _decode_in_child(data: bytes, tmp_path: Path) -> dict:
    path = tmp_path / "bomb.bin"
    path.write_bytes(data)
    env = dict(os.environ, PYTHONPATH=str(SRC), OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (AS_LIMIT, AS_LIMIT))

    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, str(path)],
        capture_output=True, text=True, env=env, preexec_fn=cap, timeout=300,
    )  # fmt: skip
    lines = proc.stdout.strip().splitlines()
    assert proc.returncode == 0 and lines, f"child died (rc {proc.returncode}): {proc.stderr[-2000:]}"
    return json.loads(lines[-1])


def _assert_refused(res: dict, *fragments: str) -> None:
    assert res["decode_error"], f"not refused with a DecodeError: {res}"
    assert res["error"].startswith("decompression bomb: "), res
    for frag in fragments:
        assert frag in res["error"], res
    assert res["peak_mb"] < PEAK_RSS_MB, res


# ---------------------------------------------------------------------------------------------------- builders


def _deflate_blocks(payload: bytes) -> bytes:
    """Non-final raw deflate blocks of ``payload``, byte aligned and independent of what precedes them."""
    c = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    return c.compress(payload) + c.flush(zlib.Z_FULL_FLUSH)


def _deflate(prefix: bytes, zeros: int, suffix: bytes = b"") -> bytes:
    """Raw deflate of prefix + ``zeros`` zero bytes + suffix without ever holding the zeros: one
    compressed MiB of zeros (about 1 kB) repeated, ended by an empty final block."""
    block = 1 << 20
    q, r = divmod(zeros, block)
    parts = [_deflate_blocks(prefix), _deflate_blocks(b"\0" * block) * q]
    if r:
        parts.append(_deflate_blocks(b"\0" * r))
    parts += [_deflate_blocks(suffix) if suffix else b"", b"\x03\x00"]
    return b"".join(parts)


def _checksums(prefix: bytes, zeros: int) -> tuple[int, int]:
    """(crc32, adler32) of prefix + zeros."""
    crc, adler = zlib.crc32(prefix), zlib.adler32(prefix)
    block = b"\0" * (1 << 20)
    for n in [len(block)] * (zeros // len(block)) + [zeros % len(block)]:
        crc, adler = zlib.crc32(block[:n], crc), zlib.adler32(block[:n], adler)
    return crc, adler


def _gzip_zeros(prefix: bytes, zeros: int) -> bytes:
    crc, _ = _checksums(prefix, zeros)
    head = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff"
    return head + _deflate(prefix, zeros) + struct.pack("<II", crc, (len(prefix) + zeros) & 0xFFFFFFFF)


def _explicit_le(ds) -> bytes:
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_dataset(fp, ds)
    return fp.getvalue()


def _file_meta(ts: str) -> bytes:
    from pydicom.dataset import FileMetaDataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_file_meta_info
    from pydicom.uid import MRImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ts
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_file_meta_info(fp, meta, enforce_standard=True)
    return b"\0" * 128 + b"DICM" + fp.getvalue()


def _mr_header(rows: int, cols: int, frames: int, bits: int = 16):
    from pydicom.dataset import Dataset

    ds = Dataset()
    ds.Modality = "MR"
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits, bits - 1, 0
    return ds


def _element(group: int, elem: int, vr: bytes, length: int) -> bytes:
    """An explicit VR little endian header of a long-VR element (OB/OW) with ``length`` value bytes."""
    return struct.pack("<HH2sHI", group, elem, vr, 0, length)


def _deflated_dicom(rows: int, cols: int, frames: int, private_zeros: int = 0, bits: int = 16) -> bytes:
    """A Deflated Explicit VR Little Endian file of zero pixels; ``private_zeros``: a private OB element of
    that many zero bytes before the pixel data (a header that is honest about the image, huge elsewhere)."""
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    head = _explicit_le(_mr_header(rows, cols, frames, bits))
    npix = rows * cols * frames * bits // 8
    if private_zeros:
        body = _deflate(head + _element(0x0029, 0x1010, b"OB", private_zeros), private_zeros)
        body = body[:-2] + _deflate(_element(0x7FE0, 0x0010, b"OW", npix), npix)
    else:
        body = _deflate(head + _element(0x7FE0, 0x0010, b"OW", npix), npix)
    return _file_meta(DeflatedExplicitVRLittleEndian) + body


def _nifti_gz(shape: tuple[int, ...], dtype, payload_zeros: int | None = None) -> bytes:
    """A .nii.gz whose header declares ``shape``/``dtype`` and whose voxels are zeros (all of them, or
    ``payload_zeros`` bytes: a header that lies about what follows)."""
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(shape)
    hdr.set_data_dtype(dtype)
    hdr["vox_offset"] = 352
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    return _gzip_zeros(hdr.binaryblock + b"\0" * 4, nbytes if payload_zeros is None else payload_zeros)


def _png_zeros(width: int, height: int, color_type: int = 6) -> bytes:
    """An RGBA (colour type 6) 8-bit PNG of zeros, IDAT streamed (never holding the raw rows)."""
    bands = {0: 1, 2: 3, 4: 2, 6: 4}[color_type]
    raw = height * (1 + width * bands)  # filter byte 0 + zero samples per row
    _, adler = _checksums(b"", raw)
    idat = b"\x78\xda" + _deflate(b"", raw) + struct.pack(">I", adler)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _encapsulated_dicom(frame: bytes, ts: str, rows: int, cols: int) -> bytes:
    from pydicom.encaps import encapsulate

    ds = _mr_header(rows, cols, 1, bits=8)
    ds.PixelData = encapsulate([frame])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    return _file_meta(ts) + _explicit_le(ds)


def _jpeg_declaring(width: int, height: int) -> bytes:
    """A valid 64x64 baseline JPEG whose SOF0 is rewritten to declare width x height."""
    buf = io.BytesIO()
    Image.new("L", (64, 64), 40).save(buf, "JPEG")
    data = bytearray(buf.getvalue())
    at = data.index(b"\xff\xc0")
    data[at + 5 : at + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def _j2k_declaring(width: int, height: int) -> bytes:
    """A 64x64 JPEG 2000 codestream whose SIZ is rewritten to declare width x height."""
    openjpeg = pytest.importorskip("openjpeg")
    data = bytearray(openjpeg.encode(np.full((64, 64), 40, np.uint8), bits_stored=8, codec_format=0))
    at = data.index(b"\xff\x4f\xff\x51")
    data[at + 8 : at + 16] = struct.pack(">II", width, height)
    return bytes(data)


# ---------------------------------------------------------------------------------------------------- bombs


def test_builders_make_what_they_declare():
    """The bombs are real: each stream inflates to the size its header declares."""
    d = zlib.decompressobj(-zlib.MAX_WBITS)
    assert len(d.decompress(_deflate(b"abc", 3 << 20, b"xyz"))) == 6 + (3 << 20) and d.eof
    gz = _nifti_gz((20, 20, 20), np.int16)
    assert len(zlib.decompress(gz, 16 + zlib.MAX_WBITS)) == 352 + 16000
    png = Image.open(io.BytesIO(_png_zeros(300, 200)))
    png.load()
    assert png.size == (300, 200) and png.mode == "RGBA"
    small = _deflated_dicom(32, 32, 3)
    ds = pydicom.dcmread(io.BytesIO(small))
    assert ds.pixel_array.shape == (3, 32, 32)


def test_deflated_dicom_bomb_refused_from_header(tmp_path):
    # 1024 x 1024 x 100 32-bit frames = 419 MB of pixels in 0.4 MB (105 M voxels, within every voxel cap):
    # the old decoder inflated it whole inside dcmread, then decoded it as an ordinary volume.
    bomb = _deflated_dicom(1024, 1024, 100, bits=32)
    assert len(bomb) < 1_000_000
    res = _decode_in_child(bomb, tmp_path)
    # within 512 MiB of pixels (a float32 512x512x400 volume is real), refused by the 100x ratio
    _assert_refused(res, "DICOM pixel data decodes to 419430400 bytes", "> max_ratio 100x")


def test_deflated_dicom_capped_while_inflating(tmp_path):
    # An honest 64 x 64 image behind a private element of 400 MB of zeros: the header passes, so only
    # the hard cap on the inflated output (100x the 0.4 MB stream) stops it.
    bomb = _deflated_dicom(64, 64, 1, private_zeros=400 << 20)
    assert len(bomb) < 600_000
    res = _decode_in_child(bomb, tmp_path)
    _assert_refused(res, "deflated DICOM decodes to over", "> max_ratio 100x")


def test_deflated_dicom_bomb_in_process_message():
    from raytumor.scan import DecodeLimits

    bomb = _deflated_dicom(512, 512, 8)  # 4 MiB of pixels: fine by default, refused under tighter limits
    assert decode_scan(bomb).slices.shape == (8, 512, 512)
    with pytest.raises(DecodeError, match=r"^decompression bomb: DICOM pixel data decodes to 4194304 bytes"):
        decode_scan(bomb, limits=DecodeLimits(max_decoded_bytes=1 << 20))


def test_nifti_gz_bomb_refused_from_header(tmp_path):
    # The file: 0.38 MB declaring 7000 x 7000 x 2 float32 (392 MB; the old cap allowed 400 M voxels)
    bomb = _nifti_gz((7000, 7000, 2), np.float32)
    assert len(bomb) < 500_000
    res = _decode_in_child(bomb, tmp_path)
    _assert_refused(res, "NIfTI decodes to 392000352 bytes", "> max_ratio 100x")


@pytest.mark.parametrize("payload", [None, 1000], ids=["zeros", "lying"])
def test_nifti_gz_ratio_refused_before_inflating(tmp_path, payload):
    # 72 MB of int16 declared by a 70 kB stream (or by 1 kB that then ends): under the bytes limit, but
    # no real scan compresses 1000:1. The old decoder inflated and decoded the 72 MB volume.
    bomb = _nifti_gz((3000, 3000, 4), np.int16, payload_zeros=payload)
    res = _decode_in_child(bomb, tmp_path)
    _assert_refused(res, "NIfTI decodes to 72000352 bytes from", "> max_ratio 100x")


def test_png_bomb_refused_from_header(tmp_path):
    # 7000 x 7000 RGBA (49 Mpx: under the pixel cap) = 196 MB of pixels from ~0.2 MB
    bomb = _png_zeros(7000, 7000)
    assert len(bomb) < 300_000
    res = _decode_in_child(bomb, tmp_path)
    _assert_refused(res, "PNG decodes to 196000000 bytes from", "> max_ratio 100x")


def test_tiff_deflate_bomb_refused(tmp_path):
    buf = io.BytesIO()
    Image.new("L", (7000, 7000)).save(buf, "TIFF", compression="tiff_adobe_deflate")
    bomb = buf.getvalue()
    assert len(bomb) < 500_000
    res = _decode_in_child(bomb, tmp_path)
    _assert_refused(res, "TIFF decodes to 49000000 bytes from", "> max_ratio 100x")


@pytest.mark.parametrize(
    "codec", ["jpeg", "j2k"], ids=["jpeg-baseline", "jpeg2000"]
)  # fmt: skip
def test_encapsulated_frame_larger_than_header_refused(tmp_path, codec):
    from pydicom.uid import JPEG2000Lossless, JPEGBaseline8Bit

    # The DICOM header says 64 x 64; the compressed frame itself declares 7000 x 7000 (49 MB to decode).
    if codec == "jpeg":
        bomb = _encapsulated_dicom(_jpeg_declaring(7000, 7000), JPEGBaseline8Bit, 64, 64)
    else:
        bomb = _encapsulated_dicom(_j2k_declaring(7000, 7000), JPEG2000Lossless, 64, 64)
    res = _decode_in_child(bomb, tmp_path)
    _assert_refused(res, "frame 0 codestream is 7000x7000x1 (8-bit)", "DICOM header's 64x64x1 (8-bit)")


def test_limits_live_in_one_place():
    from raytumor.scan import DEFAULT_LIMITS, DecodeLimits, inflate_limited

    lim = DecodeLimits()
    assert lim == DEFAULT_LIMITS
    real = 512 * 512 * 400 * 2  # a large real MRI volume, gzip ~3:1
    lim.check_bytes("NIfTI", real + 352, real // 3)
    lim.check_voxels(512 * 512 * 400)
    assert lim.inflate_cap(1_000_000) == 100_000_000 and lim.inflate_cap(10) == lim.ratio_floor_bytes
    assert lim.inflate_cap(1 << 30) == lim.max_decoded_bytes
    lim.check_bytes("X", 400 << 20, 400 << 20)  # the same volume as float32, stored raw
    with pytest.raises(DecodeError, match=r"^decompression bomb: X decodes to 600000000 bytes > max_decoded"):
        lim.check_bytes("X", 600_000_000, 600_000_000)
    with pytest.raises(DecodeError, match=r"^decompression bomb: X decodes to 40000000 bytes from 1000 "):
        lim.check_bytes("X", 40_000_000, 1000)
    lim.check_bytes("X", 30_000_000, 1000)  # below the ratio floor: tiny black images are fine
    # one set of limits reaches every decoder
    tight = DecodeLimits(max_decoded_bytes=4000)
    for data in (
        (DCM_DIR / "MR_small.dcm").read_bytes(),
        nib.Nifti1Image(np.ones((20, 20, 20), np.int16), np.eye(4)).to_bytes(),
        _png_zeros(100, 100),
    ):
        with pytest.raises(DecodeError, match="> max_decoded_bytes 4000$"):
            decode_scan(data, limits=tight)
    # inflating stops at the cap and says whether more was there
    stream = zlib.compress(b"\0" * 100_000)
    assert inflate_limited(stream, zlib.MAX_WBITS, 1000, "x") == (b"\0" * 1000, True)
    assert inflate_limited(stream, zlib.MAX_WBITS, 100_000, "x") == (b"\0" * 100_000, False)
    with pytest.raises(DecodeError, match="^corrupt x: bad deflate stream$"):
        inflate_limited(b"\x78\x9c\xff\xff\xff", zlib.MAX_WBITS, 1000, "x")


# ---------------------------------------------------------------------------------------------------- real scans


def _dcm(name: str) -> bytes:
    p = DCM_DIR / name
    if not p.is_file():
        pytest.skip(f"pydicom sample {name} not in this pydicom wheel")
    return p.read_bytes()


def test_real_dicom_deflated_by_pydicom_decodes_the_same():
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    for name in ("MR_small.dcm", "rtdose.dcm"):
        data = _dcm(name)
        ds = pydicom.dcmread(io.BytesIO(data))
        ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        deflated = buf.getvalue()
        assert (
            pydicom.dcmread(io.BytesIO(deflated)).file_meta.TransferSyntaxUID
            == DeflatedExplicitVRLittleEndian
        )
        a, b = decode_scan(data), decode_scan(deflated)
        assert np.array_equal(a.slices, b.slices) and (a.mode, a.modality, a.kind) == (
            b.mode,
            b.modality,
            b.kind,
        )


@pytest.mark.parametrize(
    "name",
    [
        "MR_small.dcm",
        "MR_small_RLE.dcm",
        "MR_small_jpeg_ls_lossless.dcm",
        "JPEG2000.dcm",
        "SC_rgb_jpeg.dcm",
        "SC_rgb_rle_2frame.dcm",
        "693_J2KI.dcm",
    ],
)
def test_real_compressed_dicom_still_decodes(name):
    scan = decode_scan(_dcm(name))
    ds = pydicom.dcmread(io.BytesIO(_dcm(name)))
    assert scan.slices.shape == (int(ds.get("NumberOfFrames") or 1), ds.Rows, ds.Columns)


def test_real_mri_volumes_decode_with_default_limits():
    ixi = SHARED / "ixi-t1-nichart-42" / "nifti"
    if not ixi.is_dir():
        pytest.skip(f"shared IXI data not present at {ixi}")
    for path in sorted(ixi.glob("*.nii.gz"))[:3]:
        scan = decode_scan(path.read_bytes())
        assert scan.kind == "volume" and scan.num_slices == 120 and len(scan.slice_index) >= 80


def test_large_realistic_volume_passes():
    # 256 x 256 x 260 int16 (34 MB decoded: above the ratio floor) with MR-like noise, gzip ~1.5:1
    vol = np.random.default_rng(0).integers(200, 400, (256, 256, 260), dtype=np.int16)
    data = zlib.compressobj(1, zlib.DEFLATED, 31)
    gz = data.compress(nib.Nifti1Image(vol, np.eye(4)).to_bytes()) + data.flush()
    del vol
    scan = decode_scan(gz)
    assert scan.num_slices == 260 and scan.slices.shape[1:] == (256, 256)


def test_real_rasters_still_decode():
    tcga = SHARED / "tcga-lgg-3site" / "yes" / "flair"
    if not tcga.is_dir():
        pytest.skip(f"shared TCGA data not present at {tcga}")
    for path in sorted(tcga.iterdir())[:5]:
        img = decode_image(path.read_bytes())
        assert img.pixels.ndim == 2 and img.pixels.size > 0
    # a mostly black scan-sized PNG compresses ~100:1 but is far below the ratio floor
    black = _png_zeros(1024, 1024, color_type=0)
    assert decode_image(black).pixels.shape == (1024, 1024)
