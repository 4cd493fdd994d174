"""Write a volume as a DICOM series of single-frame MR files, as a scanner or PACS export stores it.

For tests and benches: the pixels are whatever volume is given (a public volume, a phantom); every header
value that would identify a person is invented here (the defaults are distinctive on purpose, so a test can
search outputs for them). Geometry is exact: each slice's ImagePositionPatient/ImageOrientationPatient and
PixelSpacing come from the volume's RAS affine, so a reader that assembles the series by the DICOM rules
gets the volume back.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["FAKE_PHI", "axial_affine", "new_uid", "series_files", "write_series"]

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"

# Invented identifying values written into every file; outputs must never contain any of them by default.
FAKE_PHI = {
    "PatientName": "Testperson^Ada^Q",
    "PatientID": "PID-4711-QX",
    "PatientBirthDate": "19370411",
    "PatientSex": "F",
    "StudyDate": "20240229",
    "StudyTime": "101112",
    "AccessionNumber": "ACC-99421-ZZ",
    "InstitutionName": "St Nowhere Infirmary",
    "ReferringPhysicianName": "Doctor^Who",
    "StudyID": "STUDY-8812",
}


def new_uid(rng: np.random.Generator) -> str:
    """A random UID under the 2.25 (UUID-derived) root: unique, meaningless."""
    return "2.25." + str(int.from_bytes(rng.bytes(16), "big"))


def axial_affine(shape: Sequence[int], pixel_mm: float = 1.0, slice_mm: float = 3.0) -> np.ndarray:
    """RAS affine of an (X: left->right, Y: posterior->anterior, Z: inferior->superior) stack centred on 0."""
    a = np.diag([pixel_mm, pixel_mm, slice_mm, 1.0])
    a[:3, 3] = -0.5 * (np.asarray(shape[:3]) - 1) * np.diag(a)[:3]
    return a


def series_files(
    voxels: np.ndarray,
    affine: np.ndarray,
    *,
    rng: np.random.Generator,
    study_uid: str,
    series_uid: str | None = None,
    series_number: int = 1,
    modality: str = "MR",
    image_type: Sequence[str] = ("ORIGINAL", "PRIMARY", "M", "ND"),
    description: str = "T1 3D",
    phi: dict[str, str] | None = None,
    frame_of_reference: str | None = None,
    rescale: tuple[float, float] | None = None,
) -> list[bytes]:
    """One DICOM file (bytes) per slice along axis 2 of ``voxels`` (X, Y, Z), in slice order.

    Voxel axis 0 runs along the image rows (column index), axis 1 down the columns (row index). Values must
    be integers in 0..65535 (stored as 16-bit unsigned) so a reader gets them back exactly; ``rescale``
    (slope, intercept) is written as RescaleSlope/RescaleIntercept (a NIfTI's scl_slope/scl_inter)."""
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian
    from pydicom.valuerep import format_number_as_ds

    vox = np.asarray(voxels)
    if vox.ndim != 3:
        raise ValueError(f"a 3-D volume is needed, got shape {vox.shape}")
    if vox.min() < 0 or vox.max() > 65535 or not np.array_equal(vox, np.rint(vox)):
        raise ValueError("voxels must be integers in 0..65535")
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.asarray(affine, dtype=np.float64)
    col_step, row_step = lps[:3, 0], lps[:3, 1]
    px_col, px_row = float(np.linalg.norm(col_step)), float(np.linalg.norm(row_step))
    iop = [*(col_step / px_col), *(row_step / px_row)]
    series_uid = series_uid or new_uid(rng)
    frame_of_reference = frame_of_reference or new_uid(rng)
    sop_class = CT_IMAGE_STORAGE if modality == "CT" else MR_IMAGE_STORAGE
    out = []
    for k in range(vox.shape[2]):
        ipp = (lps @ [0.0, 0.0, float(k), 1.0])[:3]
        sop_uid = new_uid(rng)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = sop_class
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds = Dataset()
        ds.file_meta = meta
        for key, value in {**FAKE_PHI, **(phi or {})}.items():
            setattr(ds, key, value)
        ds.SOPClassUID, ds.SOPInstanceUID = sop_class, sop_uid
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.FrameOfReferenceUID = frame_of_reference
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber = modality, series_number, k + 1
        ds.SeriesDescription = description
        ds.ImageType = list(image_type)
        ds.ImageOrientationPatient = [round(float(v), 8) for v in iop]
        ds.ImagePositionPatient = [round(float(v), 6) for v in ipp]
        ds.PixelSpacing = [round(px_row, 6), round(px_col, 6)]  # between rows, between columns
        ds.SliceThickness = round(float(np.linalg.norm(lps[:3, 2])), 6)
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        plane = np.ascontiguousarray(vox[:, :, k].T.astype(np.uint16))  # (rows, columns)
        ds.Rows, ds.Columns = plane.shape
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.PixelData = plane.tobytes()
        if rescale is not None:
            ds.RescaleSlope, ds.RescaleIntercept = (format_number_as_ds(float(v)) for v in rescale)
        buf = io.BytesIO()
        pydicom.dcmwrite(buf, ds, enforce_file_format=True)
        out.append(buf.getvalue())
    return out


def write_series(
    folder: str | Path,
    voxels: np.ndarray,
    affine: np.ndarray,
    *,
    rng: np.random.Generator,
    keep: Sequence[int] | None = None,
    **kw: Any,
) -> list[Path]:
    """Write :func:`series_files` into ``folder`` under random names (a PACS export's are meaningless),
    only the slices in ``keep`` when given (a missing slice). Returns the paths in slice order."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, data in enumerate(series_files(voxels, affine, rng=rng, **kw)):
        if keep is not None and k not in keep:
            continue
        p = folder / f"{rng.bytes(6).hex().upper()}"
        p.write_bytes(data)
        paths.append(p)
    return paths
