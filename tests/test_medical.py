"""medical: DICOM and NIfTI decoding to uint8 slice stacks (package sample files, synthetic volumes, IXI)."""

from __future__ import annotations

import csv
import gzip
import io
import os
import re
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from raytumor.formats import DecodedScan, DecodeError, decode_image, decode_scan, sniff_format
from raytumor.medical import decode_nifti_volume, plane_slices
from raytumor.scan import view_from_orientation

pydicom = pytest.importorskip("pydicom")
nib = pytest.importorskip("nibabel")

# Sample files shipped inside the wheels (never downloaded: get_testdata_file would try for missing ones).
DCM_DIR = Path(pydicom.__file__).parent / "data" / "test_files"
NII_DIR = Path(os.path.dirname(nib.__file__)) / "tests" / "data"
IXI = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ixi-t1-nichart-42"


def _dcm(name: str) -> bytes:
    p = DCM_DIR / name
    if not p.is_file():
        pytest.skip(f"pydicom sample {name} not in this pydicom wheel")
    return p.read_bytes()


def _nii(name: str) -> bytes:
    p = NII_DIR / name
    if not p.is_file():
        pytest.skip(f"nibabel sample {name} not in this nibabel install")
    return p.read_bytes()


def _ds_bytes(ds, **kw) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, **kw)
    return buf.getvalue()


def _linear_window(x: np.ndarray, c: float, w: float) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2 LINEAR window to 0..255 (independent of pydicom)."""
    y = ((x - (c - 0.5)) / (w - 1) + 0.5) * 255
    y = np.where(x <= c - 0.5 - (w - 1) / 2, 0, np.where(x > c - 0.5 + (w - 1) / 2, 255, y))
    return np.rint(y)


# ---------------------------------------------------------------------------------------------------- DICOM


def test_mr_small_window_applied():
    data = _dcm("MR_small.dcm")
    scan = decode_scan(data)
    assert isinstance(scan, DecodedScan)
    assert scan.slices.shape == (1, 64, 64) and scan.slices.dtype == np.uint8
    assert (scan.format, scan.mode, scan.kind, scan.num_slices) == ("dicom", "MONOCHROME2/16", "image", 1)
    assert (scan.width, scan.height) == (64, 64)
    assert scan.slice_index.tolist() == [0] and scan.slice_index.dtype == np.int64
    ds = pydicom.dcmread(io.BytesIO(data))
    expected = _linear_window(ds.pixel_array.astype(float), float(ds.WindowCenter), float(ds.WindowWidth))
    assert np.abs(scan.slices[0].astype(int) - expected).max() <= 1
    # decode_image keeps its 2-D contract for single-frame DICOM
    img = decode_image(data)
    assert img.format == "dicom" and np.array_equal(img.pixels, scan.slices[0])
    assert img.pixels.flags.writeable and img.pixels.flags.c_contiguous


@pytest.mark.parametrize(
    "name",
    [
        "MR_small_RLE.dcm",
        "MR_small_jp2klossless.dcm",
        "MR_small_jpeg_ls_lossless.dcm",
        "MR_small_expb.dcm",
        "MR_small_bigendian.dcm",
        "MR_small_implicit.dcm",
        "MR_small_padded.dcm",
    ],
)
def test_mr_small_lossless_variants_identical(name):
    ref = decode_scan(_dcm("MR_small.dcm")).slices
    got = decode_scan(_dcm(name))
    assert got.format == "dicom" and np.array_equal(got.slices, ref)


def test_ct_rescale_applied_before_window():
    data = _dcm("CT_small.dcm")
    ds = pydicom.dcmread(io.BytesIO(data))
    assert float(ds.RescaleIntercept) != 0  # the point of the check
    # No window in the file: robust percentile window, still a full-contrast image.
    scan = decode_scan(data)
    assert scan.slices.shape == (1, 128, 128) and scan.slices.min() == 0 and scan.slices.max() == 255
    # A soft-tissue window in Hounsfield units only matches if the rescale went first.
    ds.WindowCenter, ds.WindowWidth = 40, 400
    got = decode_scan(_ds_bytes(ds)).slices[0].astype(int)
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    assert np.abs(got - _linear_window(hu, 40, 400)).max() <= 1
    assert np.abs(got - _linear_window(ds.pixel_array.astype(float), 40, 400)).max() > 50


def test_monochrome1_inverted():
    ds = pydicom.dcmread(io.BytesIO(_dcm("MR_small.dcm")))
    mono2 = decode_scan(_ds_bytes(ds)).slices
    ds.PhotometricInterpretation = "MONOCHROME1"
    scan = decode_scan(_ds_bytes(ds))
    assert scan.mode == "MONOCHROME1/16"
    assert np.array_equal(scan.slices, 255 - mono2)


def test_invalid_window_falls_back_to_percentiles():
    ds = pydicom.dcmread(io.BytesIO(_dcm("MR_small.dcm")))
    ds.WindowWidth = 0  # LINEAR needs width >= 1
    scan = decode_scan(_ds_bytes(ds))
    assert scan.slices.min() == 0 and scan.slices.max() == 255


def test_rgb_is_luminance_and_ybr_converted():
    rgb_bytes = _dcm("SC_rgb_rle.dcm")
    scan = decode_scan(rgb_bytes)
    assert scan.slices.shape == (1, 100, 100) and scan.mode == "RGB/8"
    expected = np.asarray(Image.fromarray(pydicom.dcmread(io.BytesIO(rgb_bytes)).pixel_array).convert("L"))
    assert np.abs(scan.slices[0].astype(int) - expected).max() <= 1
    # same picture stored as YBR_FULL_422 / JPEG lossless / 16-bit RLE
    for name, tol in [("SC_ybr_full_422_uncompressed.dcm", 1.0), ("SC_rgb_jpeg_gdcm.dcm", 0.0)]:
        other = decode_scan(_dcm(name))
        assert np.abs(other.slices[0].astype(int) - expected).mean() <= tol, name


def test_palette_colour():
    scan = decode_scan(_dcm("examples_palette.dcm"))
    assert scan.mode == "PALETTE COLOR/8" and scan.slices.shape == (1, 350, 800)
    assert scan.slices.std() > 5


def test_multiframe_is_volume():
    scan = decode_scan(_dcm("SC_rgb_rle_2frame.dcm"))
    assert scan.kind == "volume" and scan.slices.shape == (2, 100, 100) and scan.num_slices == 2
    assert scan.slice_index.tolist() == [0, 1]
    assert np.array_equal(scan.slices[0], decode_scan(_dcm("SC_rgb_rle.dcm")).slices[0])
    dose = decode_scan(_dcm("rtdose.dcm"))
    assert dose.slices.shape == (15, 10, 10) and dose.kind == "volume" and dose.num_slices == 15
    assert dose.slices.max() == 255 and dose.slices.min() == 0  # one window across all frames
    with pytest.raises(DecodeError, match=r"3-D volume \(dicom"):
        decode_image(_dcm("rtdose.dcm"))


def test_no_pixel_data_truncated_and_corrupt():
    for name in ("rtplan.dcm", "rtplan_truncated.dcm"):
        with pytest.raises(DecodeError, match="^DICOM without pixel data$"):
            decode_scan(_dcm(name))
    with pytest.raises(DecodeError, match="^truncated DICOM$"):
        decode_scan(_dcm("MR_truncated.dcm"))
    data = _dcm("MR_small.dcm")
    for cut in (140, 300, 1000, 2000, 5000, 9000):  # 9000: inside PixelData
        with pytest.raises(DecodeError):  # DecodeError, never another exception type
            decode_scan(data[:cut])
    rng = np.random.default_rng(3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(5):
            bad = np.frombuffer(data, np.uint8).copy()
            bad[rng.integers(132, 1500, 20)] = rng.integers(0, 256, 20)
            try:
                decode_scan(bytes(bad))
            except DecodeError:
                pass
    # pydicom's validation warnings quote header values (PHI) into worker logs: none may be raised
    assert not [w for w in caught if "pydicom" in w.filename], [str(w.message)[:80] for w in caught]


def test_undecodable_transfer_syntax_named():
    # pydicom's own plugins cannot decode this 12-bit JPEG Extended sample (gdcm can)
    with pytest.raises(DecodeError, match=r"DICOM transfer syntax JPEG Extended.*not decodable"):
        decode_scan(_dcm("JPEG-lossy.dcm"))


def test_dicom_bombs_from_header():
    with pytest.raises(DecodeError, match="^decompression bomb: 4096 pixels > limit 1000$"):
        decode_scan(_dcm("MR_small.dcm"), max_pixels=1000)
    with pytest.raises(DecodeError, match="^decompression bomb: 1500 voxels > limit 1000$"):
        decode_scan(_dcm("rtdose.dcm"), max_voxels=1000)


def test_dicom_without_preamble_sniffed_and_decoded():
    # no_meta.dcm is CT_small without file meta (and one stray leading byte)
    data = _dcm("no_meta.dcm")
    assert data[128:132] != b"DICM" and sniff_format(data) == "dicom"
    assert np.array_equal(decode_scan(data).slices, decode_scan(_dcm("CT_small.dcm")).slices)
    for name in ("ExplVR_LitEndNoMeta.dcm", "ExplVR_BigEndNoMeta.dcm"):
        assert sniff_format(_dcm(name)) == "dicom", name
        with pytest.raises(DecodeError, match="without pixel data"):
            decode_scan(_dcm(name))
    # raw implicit-VR data set written without preamble/meta, pixels present
    ds = pydicom.dcmread(io.BytesIO(_dcm("MR_small.dcm")))
    del ds.file_meta
    ds.preamble = None
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, implicit_vr=True, little_endian=True)
    raw = buf.getvalue()
    assert raw[128:132] != b"DICM" and sniff_format(raw) == "dicom"
    assert np.array_equal(decode_scan(raw).slices, decode_scan(_dcm("MR_small.dcm")).slices)


def test_no_preamble_heuristic_does_not_misfire():
    rng = np.random.default_rng(11)
    for _ in range(300):
        assert sniff_format(rng.integers(0, 256, 600, dtype=np.uint8).tobytes()) != "dicom"
    # a plausible first tag alone is not enough: the next element must chain
    assert sniff_format(b"\x08\x00\x05\x00CS\x0a\x00ISO_IR 100" + b"\xff" * 40) == "unknown"
    assert sniff_format(b"\x08\x00\x05\x00" + b"\x00" * 40) == "unknown"


@pytest.mark.filterwarnings("ignore:Invalid value for VR CS")  # written on purpose
def test_no_phi_in_outputs():
    ds = pydicom.dcmread(io.BytesIO(_dcm("MR_small.dcm")))
    ds.PatientName, ds.PatientID = "Doe^Jane", "SECRET123"
    scan = decode_scan(_ds_bytes(ds))
    text = repr(scan.__dict__.keys()) + scan.mode + scan.format + scan.kind + scan.view + scan.modality
    assert "Doe" not in text and "SECRET" not in text
    assert set(vars(scan)) == {
        "slices",
        "format",
        "mode",
        "width",
        "height",
        "kind",
        "slice_index",
        "num_slices",
        "spacing_mm",  # a float from the header geometry, never a tag value
        "view",  # derived from the orientation vectors
        "modality",  # a code string (CS characters only), else None
        "plane",  # the canonical plane a volume was cut along, from the geometry
    }
    # a Modality holding free text (here: a name) is not a code: never passed on
    ds.Modality = "Doe^Jane"
    assert decode_scan(_ds_bytes(ds)).modality is None


# ---------------------------------------------------------------------------------------------------- view


_COS30, _SIN30 = np.cos(np.radians(30)), np.sin(np.radians(30))
_COS45 = np.cos(np.radians(45))
# (ImageOrientationPatient, view): row cosines then column cosines in patient LPS
_ORIENTATIONS = [
    ((1, 0, 0, 0, 1, 0), "axial"),  # rows run to the patient's left, columns posterior: normal along z
    ((1, 0, 0, 0, 0, -1), "coronal"),  # columns run inferior: normal along y
    ((0, 1, 0, 0, 0, -1), "sagittal"),  # rows run posterior, columns inferior: normal along x
    ((0, -1, 0, 0, 0, -1), "sagittal"),  # the other side: the normal's sign does not matter
    ((1, 0, 0, 0, _COS30, -_SIN30), "axial"),  # tilted 30 degrees about x: normal (0, .5, .87)
    ((1, 0, 0, 0, _COS45, -_COS45), "oblique"),  # 45 degrees: normal (0, .71, .71), below 0.8
    ((2, 0, 0, 0, 0, -3), "coronal"),  # not unit length: only directions count
]


@pytest.mark.parametrize(("iop", "view"), _ORIENTATIONS)
def test_view_from_orientation(iop, view):
    assert view_from_orientation(iop) == view


def test_view_from_orientation_threshold_and_invalid():
    tilted30 = (1, 0, 0, 0, _COS30, -_SIN30)
    assert view_from_orientation(tilted30, oblique_cos=0.9) == "oblique"  # cos 30 = 0.87 < 0.9
    assert view_from_orientation(("1.0", "0", "0", "0", "0", "-1.0")) == "coronal"  # DS values are text
    for bad in (
        (1, 0, 0, 0, 1),  # 5 values
        (1, 0, 0, 0, 1, 0, 0),  # 7 values
        (1, 0, 0, 0, 1, float("nan")),
        (1, 0, 0, 0, float("inf"), 0),
        (0, 0, 0, 0, 1, 0),  # zero row direction
        (1, 0, 0, 2, 0, 0),  # row and column parallel: no plane
        ("a", 0, 0, 0, 1, 0),
        None,
    ):
        with pytest.raises(ValueError):
            view_from_orientation(bad)
    with pytest.raises(ValueError, match="oblique_cos"):
        view_from_orientation((1, 0, 0, 0, 1, 0), oblique_cos=1.5)


def _small_dicom(
    modality: str | None = "MR", iop=None, frames: int = 1, shared=None, per_frame=None
) -> bytes:
    """A minimal 8x8 16-bit MONOCHROME2 DICOM file; ``shared``/``per_frame``: an ImageOrientationPatient
    for the enhanced multi-frame functional groups (PlaneOrientationSequence)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4.1"  # Enhanced MR Image Storage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    if modality is not None:
        ds.Modality = modality
    if iop is not None:
        ds.ImageOrientationPatient = list(iop)

    def groups(orientation):
        plane = Dataset()
        plane.ImageOrientationPatient = list(orientation)
        item = Dataset()
        item.PlaneOrientationSequence = [plane]
        return item

    if shared is not None:
        ds.SharedFunctionalGroupsSequence = [groups(shared)]
    if per_frame is not None:
        ds.PerFrameFunctionalGroupsSequence = [groups(per_frame) for _ in range(frames)]
    ds.Rows = ds.Columns = 8
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.PixelData = np.arange(64 * frames, dtype=np.uint16).tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


@pytest.mark.parametrize(("iop", "view"), _ORIENTATIONS)
def test_dicom_view_from_header(iop, view):
    scan = decode_scan(_small_dicom(iop=iop))
    assert scan.format == "dicom" and scan.view == view and scan.slices.shape == (1, 8, 8)


@pytest.mark.filterwarnings("ignore:Invalid value for VR CS")  # written on purpose
def test_dicom_modality_read_back():
    assert decode_scan(_small_dicom("CT")).modality == "CT"
    assert decode_scan(_small_dicom("MR")).modality == "MR"
    assert decode_scan(_small_dicom(" mr ")).modality == "MR"  # stripped, upper case
    assert decode_scan(_small_dicom(None)).modality is None
    assert decode_scan(_dcm("CT_small.dcm")).modality == "CT"  # real scanner headers
    assert (
        decode_scan(_dcm("MR_small.dcm")).modality == "MR"
        and decode_scan(_dcm("MR_small.dcm")).view == "axial"
    )


def test_dicom_view_missing_or_garbage_is_none():
    assert decode_scan(_small_dicom(iop=None)).view is None
    for bad in ((1, 0, 0, 0, 1), (0, 0, 0, 0, 0, 0), (1, 0, 0, 1, 0, 0)):
        scan = decode_scan(_small_dicom(iop=bad))  # pixels still decode: the orientation is optional
        assert scan.view is None and scan.slices.shape == (1, 8, 8)
    # a DS value that is no number at all
    ds = pydicom.dcmread(io.BytesIO(_small_dicom(iop=(1, 0, 0, 0, 1, 0))))
    ds["ImageOrientationPatient"] = pydicom.DataElement(0x00200037, "LO", "left\\up")
    scan = decode_scan(_ds_bytes(ds))
    assert scan.view is None and scan.modality == "MR"


def test_dicom_enhanced_multiframe_view():
    sagittal, coronal = (0, 1, 0, 0, 0, -1), (1, 0, 0, 0, 0, -1)
    shared = decode_scan(_small_dicom(frames=3, shared=sagittal))
    assert shared.kind == "volume" and shared.slices.shape == (3, 8, 8) and shared.view == "sagittal"
    assert decode_scan(_small_dicom(frames=3, per_frame=coronal)).view == "coronal"  # first frame's
    assert decode_scan(_small_dicom(frames=3, shared=sagittal, per_frame=coronal)).view == "sagittal"
    assert decode_scan(_small_dicom(frames=3, shared=(0, 0, 0, 0, 0, 0), per_frame=coronal)).view == "coronal"
    assert decode_scan(_small_dicom(frames=3)).view is None
    # the classic top-level attribute wins over the functional groups
    assert decode_scan(_small_dicom(iop=(1, 0, 0, 0, 1, 0), frames=3, shared=sagittal)).view == "axial"


# ---------------------------------------------------------------------------------------------------- NIfTI


def _canonical_axial(img) -> np.ndarray:
    """Independent reference: RAS-canonical data as (Z, H, W) with anterior up (float)."""
    vol = nib.as_closest_canonical(img).get_fdata()
    return np.stack([np.rot90(vol[:, :, k]) for k in range(vol.shape[2])])


def test_anatomical_big_endian_nifti():
    data = _nii("anatomical.nii")
    assert sniff_format(data) == "nifti"
    scan = decode_scan(data)
    ref = _canonical_axial(nib.Nifti1Image.from_bytes(data))
    assert scan.format == "nifti" and scan.mode == "int16" and scan.kind == "volume"
    assert scan.num_slices == ref.shape[0] and scan.slices.shape[1:] == ref.shape[1:]
    assert (scan.height, scan.width) == ref.shape[1:]
    k = int(scan.slice_index[len(scan.slice_index) // 2])
    r = np.corrcoef(scan.slices[len(scan.slice_index) // 2].ravel(), ref[k].ravel())[0, 1]
    assert r > 0.95


def test_standard_gz_and_nifti2():
    scan = decode_scan(_nii("standard.nii.gz"))
    assert scan.format == "nifti" and scan.mode == "uint8"
    assert scan.num_slices == 7 and scan.slices.shape == (7, 5, 4)  # (4, 5, 7) RAS -> 7 slices 5 rows 4 cols
    vol = np.random.default_rng(0).integers(1, 1000, (12, 10, 8)).astype(np.int16)
    s1 = decode_scan(gzip.compress(nib.Nifti1Image(vol, np.eye(4)).to_bytes()))
    s2 = decode_scan(nib.Nifti2Image(vol, np.eye(4)).to_bytes())
    assert np.array_equal(s1.slices, s2.slices) and s1.slices.shape == (8, 10, 12)


@pytest.mark.parametrize("name", ["example4d.nii.gz", "example_nifti2.nii.gz"])
def test_4d_rejected(name):
    with pytest.raises(DecodeError, match=r"^4-D NIfTI \(2 volumes\): score 3-D structural volumes$"):
        decode_scan(_nii(name))


def test_nifti_truncated_corrupt_and_bombs():
    data = _nii("standard.nii.gz")
    with pytest.raises(DecodeError, match="^truncated NIfTI$"):
        decode_scan(data[:-10])
    raw = nib.Nifti1Image(np.arange(8000, dtype=np.int16).reshape(20, 20, 20), np.eye(4)).to_bytes()
    comp = gzip.compress(raw)
    for cut in (len(comp) // 3, len(comp) // 2, len(comp) - 20):
        assert sniff_format(comp[:cut]) == "nifti"
        with pytest.raises(DecodeError, match="^truncated NIfTI$"):
            decode_scan(comp[:cut])
    with pytest.raises(DecodeError, match="^truncated NIfTI$"):
        decode_scan(raw[:-100])
    bad = bytearray(gzip.compress(raw))
    bad[200:260] = b"\xff" * 60
    with pytest.raises(DecodeError):
        decode_scan(bytes(bad))
    with pytest.raises(DecodeError, match="^decompression bomb: 8000 voxels > limit 1000$"):
        decode_scan(raw, max_voxels=1000)
    # header claims a huge volume: refused from the header alone, without inflating anything
    hdr = nib.Nifti1Header()
    hdr.set_data_shape((3000, 3000, 3000))
    hdr.set_data_dtype(np.uint8)
    with pytest.raises(DecodeError, match="decompression bomb"):
        decode_scan(gzip.compress(hdr.binaryblock + b"\x00" * 4 + b"\x00" * 10000))


def test_nifti_gzip_payload_beyond_header_not_inflated():
    # 10x10x10 volume followed by 64 MiB of zeros in the gzip stream: only the declared bytes decode
    raw = nib.Nifti1Image(np.full((10, 10, 10), 7, np.uint8), np.eye(4)).to_bytes()
    comp = gzip.compress(raw + b"\x00" * (64 << 20), compresslevel=1)
    scan = decode_scan(comp)
    assert scan.slices.shape == (10, 10, 10)


def _synthetic_head(nx: int = 20, ny: int = 24, nz: int = 16) -> np.ndarray:
    """RAS-ordered volume: head disc in z 4..11 (z=5 half as bright) in a faint rim, a tiny dim blob
    at z=13, and a bright marker at right/anterior in the top head slice."""
    vol = np.zeros((nx, ny, nz), np.float32)
    xx, yy = np.meshgrid(np.arange(nx), np.arange(ny), indexing="ij")
    disc = ((xx - nx / 2) / (nx / 2.5)) ** 2 + ((yy - ny / 2) / (ny / 2.5)) ** 2 < 1
    rim = ~disc & (((xx - nx / 2) / (nx / 2.2)) ** 2 + ((yy - ny / 2) / (ny / 2.2)) ** 2 < 1)
    for z in range(4, 12):
        vol[:, :, z][disc] = 100.0
        vol[:, :, z][rim] = 2.0  # faint scalp: sets the low end of the window near zero
    vol[:, :, 5][disc] = 50.0
    vol[0:2, 0:2, 13] = 10.0  # 4 of 480 pixels, dim: below the 5 % foreground, dropped
    vol[nx - 3 : nx - 1, ny - 3 : ny - 1, 11] = 400.0  # marker: right, anterior, top head slice
    return vol


def test_synthetic_slice_selection_window_and_orientation():
    vol = _synthetic_head()
    scan = decode_scan(nib.Nifti1Image(vol, np.eye(4)).to_bytes())
    assert scan.kind == "volume" and scan.num_slices == 16
    assert scan.slice_index.tolist() == list(range(4, 12))  # empty and tiny slices skipped
    assert scan.slices.shape == (8, 24, 20) and (scan.height, scan.width) == (24, 20)
    # marker at x=R (high), y=A (high) -> after rot90: top rows (anterior up), right columns
    top = scan.slices[-1].astype(int)
    r, c = np.unravel_index(np.argmax(top), top.shape)
    assert (r, c) in {(1, 17), (1, 18), (2, 17), (2, 18)} and top[r, c] == 255
    # one window per volume: the half-bright slice stays about half as bright, not stretched
    full, half = (
        scan.slices[scan.slice_index.tolist().index(6)],
        scan.slices[scan.slice_index.tolist().index(5)],
    )
    assert 0.35 < half.max() / full.max() < 0.65
    # ... and the near-empty dim slice is not stretched to full contrast either
    every = decode_scan(nib.Nifti1Image(vol, np.eye(4)).to_bytes(), min_foreground=0.0)
    assert every.slice_index.tolist() == list(range(16))
    assert every.slices[:4].max() == 0 and 0 < every.slices[13].max() < 40


def _reoriented(ras_img, codes: tuple[str, str, str]):
    """The same image stored with voxel axes ``codes`` (the affine says so)."""
    ornt = nib.orientations.ornt_transform(
        nib.orientations.axcodes2ornt(("R", "A", "S")), nib.orientations.axcodes2ornt(codes)
    )
    stored = ras_img.as_reoriented(ornt)
    assert nib.aff2axcodes(stored.affine) == codes
    return stored


@pytest.mark.parametrize("codes", [("L", "P", "I"), ("P", "S", "R"), ("A", "I", "L")])
def test_orientation_independent_of_storage(codes):
    vol = _synthetic_head()
    ras = nib.Nifti1Image(vol, np.diag([2.0, 2.0, 3.0, 1.0]))
    ref = decode_scan(ras.to_bytes())
    ornt = nib.orientations.ornt_transform(
        nib.orientations.axcodes2ornt(("R", "A", "S")), nib.orientations.axcodes2ornt(codes)
    )
    stored = ras.as_reoriented(ornt)
    assert nib.aff2axcodes(stored.affine) == codes
    got = decode_scan(gzip.compress(stored.to_bytes()))
    assert np.array_equal(got.slices, ref.slices) and np.array_equal(got.slice_index, ref.slice_index)


def test_hand_flipped_affine():
    # voxel order reversed along x and z, affine saying so: same picture as the RAS original
    vol = _synthetic_head()
    aff = np.diag([-1.0, 1.0, -1.0, 1.0])
    aff[:3, 3] = [vol.shape[0] - 1, 0, vol.shape[2] - 1]
    got = decode_scan(nib.Nifti1Image(vol[::-1, :, ::-1].copy(), aff).to_bytes())
    ref = decode_scan(nib.Nifti1Image(vol, np.eye(4)).to_bytes())
    assert np.array_equal(got.slices, ref.slices) and got.slice_index.tolist() == list(range(4, 12))


def test_nifti_2d_singletons_and_nan():
    plane = np.outer(np.arange(1, 13), np.arange(1, 9)).astype(np.float32)  # (x=12, y=8)
    for arr in (plane, plane[:, :, None], plane[:, :, None, None]):
        data = nib.Nifti1Image(arr, np.eye(4)).to_bytes()
        scan = decode_scan(data)
        assert scan.kind == "image" and scan.slices.shape == (1, 8, 12) and scan.num_slices == 1
        assert np.array_equal(decode_image(data).pixels, scan.slices[0])
    # trailing singleton 4th dim is squeezed, not a 4-D error
    vol = _synthetic_head()
    s4 = decode_scan(nib.Nifti1Image(vol[..., None], np.eye(4)).to_bytes())
    assert np.array_equal(s4.slices, decode_scan(nib.Nifti1Image(vol, np.eye(4)).to_bytes()).slices)
    with pytest.raises(DecodeError, match=r"^3-D volume \(nifti"):
        decode_image(nib.Nifti1Image(vol, np.eye(4)).to_bytes())
    vol[3, 3, 6] = np.nan
    scan = decode_scan(nib.Nifti1Image(vol, np.eye(4)).to_bytes())
    assert scan.slices.dtype == np.uint8 and scan.slice_index.tolist() == list(range(4, 12))


def test_nifti_view_and_no_modality():
    vol = _synthetic_head()
    scan = decode_scan(nib.Nifti1Image(vol, np.eye(4)).to_bytes())
    assert scan.kind == "volume" and scan.view == "axial" and scan.modality is None
    # stored in another orientation: still sliced along canonical z, so still axial
    stored = _reoriented(nib.Nifti1Image(vol, np.eye(4)), ("P", "S", "R"))
    assert decode_scan(stored.to_bytes()).view == "axial"
    # a single plane: its view is the axis it is thin along (canonical RAS: x sagittal, y coronal, z axial)
    plane = np.outer(np.arange(1, 13), np.arange(1, 9)).astype(np.float32)
    for arr, view in ((plane[None], "sagittal"), (plane[:, None], "coronal"), (plane[:, :, None], "axial")):
        scan = decode_scan(nib.Nifti1Image(arr, np.eye(4)).to_bytes())
        assert scan.kind == "image" and scan.slices.shape == (1, 8, 12) and scan.view == view, view
    # ... also when the file stores the thin axis elsewhere: (y, z, x) storage of a sagittal plane
    stored = _reoriented(nib.Nifti1Image(plane[None], np.eye(4)), ("A", "S", "R"))
    assert stored.shape == (12, 8, 1) and decode_scan(stored.to_bytes()).view == "sagittal"


def test_nifti_volume_entry_point():
    vol = _synthetic_head()
    ras = nib.Nifti1Image(vol, np.diag([1.0, 1.5, 2.0, 1.0]))
    stored = _reoriented(ras, ("P", "S", "L"))
    got = decode_nifti_volume(gzip.compress(stored.to_bytes()))
    assert got.voxels.shape == vol.shape and got.voxels.dtype == np.uint8 and got.mode == "float32"
    assert got.spacing_mm == (1.0, 1.5, 2.0)  # per canonical axis, whatever the storage order
    # the same voxels and window decode_nifti slices: its axial stack is the volume's axial plane stack
    scan = decode_scan(ras.to_bytes(), min_foreground=0.0)
    assert np.array_equal(plane_slices(got.voxels, "axial"), scan.slices)
    assert np.array_equal(plane_slices(got.voxels, "axial")[11], np.rot90(got.voxels[:, :, 11]))
    # the marker (right, anterior, top head slice) is where it was drawn, not mirrored
    assert got.voxels[18, 22, 11] == 255 and got.voxels[1, 22, 11] == got.voxels[18, 1, 11] == 0
    with pytest.raises(ValueError, match="unknown view"):
        plane_slices(got.voxels, "oblique")
    with pytest.raises(DecodeError, match="decompression bomb"):
        decode_nifti_volume(ras.to_bytes(), max_voxels=100)


def test_nifti_all_empty_keeps_middle_slice():
    scan = decode_scan(nib.Nifti1Image(np.zeros((6, 7, 9), np.int16), np.eye(4)).to_bytes())
    assert scan.slice_index.tolist() == [4] and scan.slices.shape == (1, 7, 6) and scan.slices.max() == 0


def test_raster_wrapped_as_single_slice():
    buf = io.BytesIO()
    Image.fromarray(np.arange(48, dtype=np.uint8).reshape(6, 8)).save(buf, "PNG")
    scan = decode_scan(buf.getvalue())
    assert (scan.kind, scan.format, scan.mode, scan.num_slices) == ("image", "png", "L", 1)
    assert scan.slices.shape == (1, 6, 8) and scan.slice_index.tolist() == [0]
    assert scan.view is None and scan.modality is None  # a raster says neither
    with pytest.raises(DecodeError, match="^empty file$"):
        decode_scan(b"")
    with pytest.raises(DecodeError, match="^unknown format$"):
        decode_scan(struct.pack("<4I", 1, 2, 3, 4) * 50)


# ---------------------------------------------------------------------------------------------------- IXI


def test_ixi_volumes_match_shared_pngs():
    manifest = IXI / "manifest.csv"
    if not manifest.is_file():
        pytest.skip(f"shared IXI data not present at {IXI}")
    rows = list(csv.DictReader(manifest.open()))
    volumes = [r["path"] for r in rows if r["path"].startswith("nifti/")]
    pngs: dict[str, list[tuple[int, str]]] = {}
    for r in rows:  # source column: "... <volume path> axial slice z=56 (RAS canonical)"
        m = re.search(r"t1/(\S+)\.nii\.gz axial slice z=(\d+)", r["source"])
        if r["path"].startswith("no_tumor/") and m:
            pngs.setdefault(m.group(1), []).append((int(m.group(2)), r["path"]))
    assert len(volumes) == 42 and sum(map(len, pngs.values())) == 420
    for vpath in volumes:
        scan = decode_scan((IXI / vpath).read_bytes())
        # 120 axial 2 mm slices; the empty slices above the vertex are dropped. The neck below the
        # head still covers > 5 % of the slice, so K is ~100 rather than just the brain.
        assert scan.num_slices == 120 and scan.slices.shape[1:] == (120, 90)
        assert 80 <= len(scan.slice_index) < 120
        idx = scan.slice_index.tolist()
        for z, png in pngs[Path(vpath).name.removesuffix(".nii.gz")]:
            assert z in idx
            ref = np.asarray(Image.open(IXI / png), dtype=np.float64)
            r = np.corrcoef(ref.ravel(), scan.slices[idx.index(z)].ravel())[0, 1]
            assert r > 0.98, (png, r)
