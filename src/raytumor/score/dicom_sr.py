"""Results back to PACS: a DICOM Structured Report per scored series (``raytumor score --dicom-out DIR``).

A TID 1500 Measurement Report (Comprehensive 3D SR, written with highdicom) in the source study: the
series' tumour score and most suspicious slice score as measurements, "Neoplasm of brain: present/absent"
as the qualitative evaluation, the algorithm (raytumor, the bundle id) identified, every source instance
listed as evidence, and the slice that carries the score referenced where it is one source image (a series
scored in its acquired plane). The SR copies the patient and study module of its source (it must, to be
filed with the study): unlike the score rows, these files identify the patient, and are for the PACS only.

Only series with a class label get a report: a skipped, failed or out-of-scope series has no result to send.
"""

from __future__ import annotations

import io
import json
import posixpath
from typing import Any

import numpy as np
import pandas as pd

from raytumor.medical import series_grid
from raytumor.runtime import init_ray
from raytumor.scan import view_from_orientation
from raytumor.score.decode import ReadDecode
from raytumor.storage import StorageOptions, get_filesystem

# Private coding scheme for what no standard code names (DICOM PS3.16 8.2: "99" prefix).
SCHEME = "99RAYTUMOR"
REPORT_COLUMNS = ["path", "kind", "label", "score", "score_max", "slice", "view", "error", "reason", "series",
                  "bundle_id"]  # fmt: skip


def report_name(series_hash: str) -> str:
    return f"sr-{series_hash}.dcm"


def _headers(rd: ReadDecode, files: list[list]) -> list[Any]:
    import pydicom

    out = []
    for source, kind, member, member_n, size in files:
        data = rd.read_unit(source, kind, member, member_n, int(size))
        out.append(pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, force=True))
    return out


def _scored_image(evidence: list[Any], row: dict) -> Any | None:
    """The source instance the row's ``slice`` (canonical index along the scored plane) is, when the
    series was scored in its acquired plane; None for a reformatted or oblique series."""
    iop = [float(v) for v in evidence[0].ImageOrientationPatient]
    if row.get("view") in (None, "oblique") or view_from_orientation(iop) != row["view"]:
        return None
    order, grid, _ = series_grid(
        np.array([[float(v) for v in d.ImagePositionPatient] for d in evidence]), iop
    )
    r, c = np.asarray(iop[:3]), np.asarray(iop[3:])
    n = np.cross(r, c)
    ras = np.array([-n[0], -n[1], n[2]])  # LPS -> RAS
    axis = int(np.argmax(np.abs(ras)))
    n_grid = int(grid[-1]) + 1
    canon = grid if ras[axis] > 0 else n_grid - 1 - grid  # canonical (RAS+) index of each sorted file
    hit = np.flatnonzero(canon == int(row["slice"]))
    return evidence[order[hit[0]]] if hit.size else None


def series_report(evidence: list[Any], row: dict, meta: dict[str, Any], number: int = 9001) -> Any:
    """The SR data set for one scored series row (``row``: the score row's fields)."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    device = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=hd.UID(), name="raytumor", manufacturer_name="raytumor (research use only)",
            model_name=str(meta["backbone"])[:64],
        ),
    )  # fmt: skip
    algorithm = hd.sr.AlgorithmIdentification(
        name="raytumor", version=str(meta["version"])[:64], parameters={"bundle_id": str(row["bundle_id"])}
    )
    referenced = []
    image = _scored_image(evidence, row)
    if image is not None:
        referenced = [hd.sr.SourceImageForMeasurement(image.SOPClassUID, image.SOPInstanceUID)]
    unit = codes.UCUM.NoUnits
    measurements = [
        hd.sr.Measurement(
            name=hd.sr.CodedConcept("series-score", SCHEME, "Tumour score (sustained over slices)"),
            value=float(row["score"]), unit=unit, algorithm_id=algorithm, referenced_images=referenced or None,
        ),
        hd.sr.Measurement(
            name=hd.sr.CodedConcept("max-slice-score", SCHEME, "Highest slice tumour score"),
            value=float(row["score_max"]), unit=unit, algorithm_id=algorithm,
        ),
    ]  # fmt: skip
    positive = row["label"] != meta["negative_class"]
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=hd.UID(), identifier=f"raytumor series {row['series']}"
        ),
        algorithm_id=algorithm,
        measurements=measurements,
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(
                name=hd.sr.CodedConcept("126952004", "SCT", "Neoplasm of brain"),
                value=codes.SCT.Present if positive else codes.SCT.Absent,
            )
        ],
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=device),
        procedure_reported=hd.sr.CodedConcept("24590-2", "LN", "MR Brain"),
        imaging_measurements=[group],
    )
    sr = hd.sr.Comprehensive3DSR(
        evidence=evidence, content=report, series_instance_uid=hd.UID(), series_number=number,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="raytumor", is_complete=True,
    )  # fmt: skip
    sr.SeriesDescription = "raytumor tumour score - research use only"
    return sr


def report_task(
    batch: dict[str, np.ndarray], *, out_dir: str, storage: StorageOptions | None, max_file_bytes: int,
    meta: dict[str, Any],
) -> dict[str, np.ndarray]:  # fmt: skip
    """Ray Data task body: series rows (with their files) in, one SR file each written to ``out_dir``."""
    rd = ReadDecode(0, storage, max_file_bytes, 0.0)
    fs, root = get_filesystem(out_dir, storage)
    written, errors = [], []
    for i in range(len(batch["path"])):
        row = {k: batch[k][i] for k in batch}
        try:
            sr = series_report(_headers(rd, json.loads(row["files"])), row, meta)
            buf = io.BytesIO()
            sr.save_as(buf, enforce_file_format=True)
            with fs.open_output_stream(posixpath.join(root, report_name(str(row["series"])))) as f:
                f.write(buf.getvalue())
            written.append(1)
            errors.append(None)
        except Exception as e:  # noqa: BLE001 - one series' report, not the run
            written.append(0)
            errors.append(f"{row['path']}: {type(e).__name__}: {e}"[:300])
    return {"written": np.array(written, dtype=np.int64), "error": np.array(errors, dtype=object)}


def write_reports(
    rows: pd.DataFrame, units: pd.DataFrame, out_dir: str, storage: StorageOptions | None, max_file_bytes: int,
    meta: dict[str, Any], decode_cpus: float = 1.0,
) -> dict[str, Any]:  # fmt: skip
    """An SR for every series row with a class label that has none in ``out_dir`` yet (a rerun writes only
    the missing ones). Returns counts and the reasons of reports that could not be written."""
    import pyarrow.fs as pafs
    import ray.data

    fs, root = get_filesystem(out_dir, storage)
    fs.create_dir(root, recursive=True)
    have = {i.base_name for i in fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))}
    labelled = rows[
        rows["kind"].eq("series") & rows["error"].isna() & rows["reason"].isna() & rows["label"].notna()
        & rows["label"].ne("out_of_scope")
    ]  # fmt: skip
    todo = labelled[[report_name(s) not in have for s in labelled["series"]]]
    todo = todo.merge(units[["id", "source"]].rename(columns={"id": "path", "source": "files"}), on="path")
    result = {"dicom_reports": len(labelled) - len(todo), "dicom_report_errors": []}
    if todo.empty:
        return result
    init_ray()
    ds = ray.data.from_pandas(todo[REPORT_COLUMNS + ["files"]].reset_index(drop=True)).map_batches(
        report_task,
        fn_kwargs={"out_dir": out_dir, "storage": storage, "max_file_bytes": max_file_bytes, "meta": meta},
        batch_size=4,
        batch_format="numpy",
        num_cpus=decode_cpus,
    )
    for b in ds.iter_batches(batch_size=None, batch_format="numpy"):
        result["dicom_reports"] += int(b["written"].sum())
        result["dicom_report_errors"] += [e for e in b["error"] if isinstance(e, str)]
    return result
