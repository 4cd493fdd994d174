"""DICOM archives as PACS exports store them: single-frame files assembled into series, one row per series,
series rules (localizers, other modalities skipped with a reason), study summaries, no identifiers out.

Real pixels (the IXI volumes in ../shared/data, written as DICOM series with invented headers by
raytumor.synth_dicom) and SYNTHETIC phantoms; every file is generated in tmp dirs by the tests.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from conftest import HEAD_SIZE, SHARED_DATA, phantom_volume

from raytumor.medical import decode_dicom_series, decode_nifti
from raytumor.results import read_scores
from raytumor.score import ScoreConfig, score
from raytumor.series import SeriesRules, assemble
from raytumor.synth_dicom import FAKE_PHI, axial_affine, new_uid, series_files, write_series

IXI = SHARED_DATA / "ixi-t1-nichart-42" / "nifti"
needs_ixi = pytest.mark.skipif(not IXI.is_dir(), reason=f"IXI volumes not at {IXI} (see ../shared/data)")


def _ixi(i: int):
    import nibabel as nib

    path = sorted(IXI.glob("*.nii.gz"))[i]
    img = nib.load(path)
    d = img.dataobj  # stored bytes + scl_slope: written as pixels + RescaleSlope, read back exactly
    return path, np.asarray(d.get_unscaled()), img.affine, (float(d.slope), float(d.inter))


def _phantom_stack(seed: int, n: int, size: int = 64) -> np.ndarray:
    """(X, Y, Z) uint8 voxels of SYNTHETIC axial phantom slices (inferior -> superior)."""
    return np.flip(phantom_volume(seed, n, size), 1).transpose(2, 1, 0).copy()


@needs_ixi
def test_a_shuffled_series_is_the_nifti_volume_again():
    """Files in random order (and a missing slice) go back on the slice grid the positions give: the slices
    equal those of the NIfTI volume they were written from, exactly."""
    path, vox, affine, rescale = _ixi(0)
    rng = np.random.default_rng(0)
    blobs = series_files(vox, affine, rng=rng, study_uid=new_uid(rng), rescale=rescale)
    want = decode_nifti(path.read_bytes())
    got = decode_dicom_series([blobs[i] for i in rng.permutation(len(blobs))])
    assert got.kind == "volume" and got.view == "axial" and got.spacing_mm == want.spacing_mm == 2.0
    np.testing.assert_array_equal(got.slices, want.slices)
    np.testing.assert_array_equal(got.slice_index, want.slice_index)
    # Sorted by name or InstanceNumber the stack would differ: the order comes from the positions.
    assert not np.array_equal(decode_dicom_series(blobs[::-1]).slices[:, ::-1], want.slices)


@needs_ixi
def test_every_ixi_volume_written_as_a_shuffled_series_decodes_to_the_nifti_slices():
    rng = np.random.default_rng(11)
    n = len(list(IXI.glob("*.nii.gz")))
    assert n == 42
    for i in range(n):
        path, vox, affine, rescale = _ixi(i)
        blobs = series_files(vox, affine, rng=rng, study_uid=new_uid(rng), rescale=rescale)
        got = decode_dicom_series([blobs[k] for k in rng.permutation(len(blobs))])
        want = decode_nifti(path.read_bytes())
        # RescaleSlope is a 16-character decimal string, NIfTI's scl_slope a float32: the intensities can
        # differ in the last bit, which moves a few voxels across a grey-level boundary (IXI162: 0.35 %).
        assert np.array_equal(got.slice_index, want.slice_index) and got.slices.shape == want.slices.shape, (
            path
        )
        diff = np.abs(got.slices.astype(np.int16) - want.slices)
        assert diff.max() <= 1 and (diff > 0).mean() < 0.005, (path, diff.max(), (diff > 0).mean())


def test_thick_non_axial_series_are_scored_in_their_own_plane_and_oblique_ones_say_so():
    rng = np.random.default_rng(1)
    vox = _phantom_stack(1, 24)
    # 24 coronal slices 5 mm apart, 1 mm pixels: axial reformats would be 5x blurred along one axis
    coronal = np.zeros((4, 4), dtype=float)
    coronal[0, 0], coronal[1, 2], coronal[2, 1], coronal[3, 3] = 1.0, 5.0, 1.0, 1.0  # y <- slice axis
    coronal[:3, 3] = [-32, 60, -32]
    scan = decode_dicom_series(series_files(vox, coronal, rng=rng, study_uid=new_uid(rng)))
    assert scan.view == "coronal" and scan.plane == "coronal" and scan.spacing_mm == 5.0
    assert scan.slices.shape[1:] == (64, 64) and scan.num_slices == 24
    # tilted 45 degrees about the left-right axis (30 would still count as axial: within 37 degrees)
    t = np.deg2rad(45)
    rot = np.array([[1, 0, 0], [0, np.cos(t), -np.sin(t)], [0, np.sin(t), np.cos(t)]])
    oblique = np.eye(4)
    oblique[:3, :3] = rot @ np.diag([1.0, 1.0, 1.0])
    assert decode_dicom_series(series_files(vox, oblique, rng=rng, study_uid=new_uid(rng))).view == "oblique"


def _headers(blobs_by_id: dict[str, bytes]) -> pd.DataFrame:
    from raytumor.score.series import header_task

    ids = list(blobs_by_id)
    tmp = Path("/tmp") / f"series-headers-{new_uid(np.random.default_rng())[-8:]}"
    tmp.mkdir()
    try:
        for i in ids:
            (tmp / i).write_bytes(blobs_by_id[i])
        batch = {
            "id": np.array(ids, dtype=object),
            "source": np.array([str(tmp / i) for i in ids], dtype=object),
            "kind": np.array(["file"] * len(ids), dtype=object),
            "member": np.array([None] * len(ids), dtype=object),
            "member_n": np.ones(len(ids), dtype=np.int64),
            "size": np.array([len(blobs_by_id[i]) for i in ids], dtype=np.int64),
        }
        out = header_task(batch, storage=None, max_file_bytes=1 << 30, salt="k", with_uids=False)
    finally:
        shutil.rmtree(tmp)
    return pd.DataFrame(out)


def test_series_rules_skip_localizers_other_modalities_and_too_few_slices():
    rng = np.random.default_rng(2)
    study = new_uid(rng)
    vox = _phantom_stack(2, 12)
    files = {}
    for name, kw in {
        "t1": {},
        "loc": {"image_type": ("ORIGINAL", "PRIMARY", "LOCALIZER")},
        "ct": {"modality": "CT"},
        "mip": {"image_type": ("DERIVED", "SECONDARY", "MIP")},
    }.items():
        for k, b in enumerate(series_files(vox, axial_affine(vox.shape), rng=rng, study_uid=study, **kw)):
            files[f"{name}-{k:02d}"] = b
    for k, b in enumerate(series_files(vox[:, :, :3], axial_affine(vox.shape), rng=rng, study_uid=study)):
        files[f"short-{k}"] = b
    asm = assemble(_headers(files), SeriesRules())
    reasons = {
        json.loads(f)[0].split("-")[0]: r if isinstance(r, str) else None
        for f, r in zip(asm.series["files"], asm.series["reason"], strict=True)
    }
    assert reasons == {
        "t1": None,
        "loc": "skipped: localizer",
        "ct": "skipped: modality CT",
        "mip": "skipped: derived images",
        "short": "skipped: 3 slices (fewer than 8)",
    }
    assert (
        set(asm.series["study"]) == {asm.series["study"].iloc[0]} and len(asm.series["study"].iloc[0]) == 20
    )
    # the rules are the user's to change: CT allowed, derived images included
    rules = SeriesRules(modalities=("MR", "CT"), include_derived=True, min_slices=3)
    assert assemble(_headers(files), rules).series["reason"].isna().sum() == 4
    with pytest.raises(ValueError, match="min_slices"):
        SeriesRules(min_slices=1)


def test_series_rules_from_yaml(tmp_path):
    p = tmp_path / "rules.yaml"
    p.write_text("modalities: [MR, CT]\nmin_slices: 20\n")
    assert SeriesRules.from_yaml(p) == SeriesRules(modalities=("MR", "CT"), min_slices=20)
    p.write_text("min_slice: 20\n")
    with pytest.raises(ValueError, match="unknown keys"):
        SeriesRules.from_yaml(p)


def _all_text(out: Path) -> str:
    """Everything a scoring run wrote, as text: Parquet tables rendered (their strings are compressed on
    disk, so a byte grep would miss them), every other file as bytes."""
    parts = []
    for f in sorted(out.rglob("*")):
        if f.is_file():
            if f.suffix == ".parquet":
                parts.append(pq.read_table(f).to_pandas().to_csv())
            else:
                parts.append(f.read_bytes().decode("latin-1"))
    return "\n".join(parts)


@needs_ixi
def test_a_pacs_export_scores_one_row_per_series_and_study_without_identifiers(
    ray_session, head_bundle, tmp_path
):
    """Three studies as a PACS export stores them (random names, a series split across folders, localizers,
    a CT series, a missing slice, a file without position, a lone image), scored: one row per series, the
    same volume scores as the NIfTI volumes, study rows, no PHI/UID in any output; a rerun adds nothing."""
    import pydicom

    rng = np.random.default_rng(3)
    root, nifti = tmp_path / "export", tmp_path / "nifti"
    nifti.mkdir()
    uids, names = [], {}
    for i, study_dir in enumerate(("STUDY_A", "STUDY_B", "STUDY_C")):
        path, vox, affine, rescale = _ixi(i)
        study, series = new_uid(rng), new_uid(rng)
        uids += [study, series]
        keep = [k for k in range(vox.shape[2]) if k != 45] if study_dir == "STUDY_C" else None  # C: a gap
        paths = write_series(root / study_dir / "S1", vox, affine, rng=rng, study_uid=study, series_uid=series,
                             rescale=rescale, keep=keep)  # fmt: skip
        if study_dir != "STUDY_C":
            shutil.copy(path, nifti / path.name)
            names[study_dir] = path.name
        if study_dir == "STUDY_A":  # A's series split across two folders
            (root / study_dir / "S1b").mkdir()
            for p in paths[::2]:
                p.rename(root / study_dir / "S1b" / p.name)
            # a file claiming A's series but without a position: its own error row
            stray = pydicom.dcmread(paths[1])
            del stray.ImagePositionPatient
            stray.SOPInstanceUID = new_uid(rng)
            stray.save_as(root / study_dir / "S1" / "NOPOS")
        if study_dir != "STUDY_C":
            loc = _phantom_stack(4, 3)
            write_series(root / study_dir / "LOC", loc, axial_affine(loc.shape), rng=rng, study_uid=study,
                         image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"))  # fmt: skip
    ct = _phantom_stack(5, 10)
    uids.append(new_uid(rng))
    write_series(root / "STUDY_CT", ct, axial_affine(ct.shape), rng=rng, study_uid=uids[-1], modality="CT")
    lone = series_files(_phantom_stack(6, 1), axial_affine((64, 64, 1)), rng=rng, study_uid=new_uid(rng))[0]
    (root / "lone.dcm").write_bytes(lone)
    n_files = sum(1 for p in root.rglob("*") if p.is_file())

    out = tmp_path / "out"
    cfg = ScoreConfig(
        bundle=str(head_bundle.bundle), input=str(root), output=str(out), csv=True, slice_rows=True
    )
    s = score(cfg)
    df = read_scores(str(out))
    series = df[df["kind"] == "series"].set_index("path")
    assert len(series) == 6  # A, B, C, two localizers, CT
    assert sorted(series["reason"].fillna("scored")) == sorted(
        ["scored"] * 3 + ["skipped: localizer"] * 2 + ["skipped: modality CT"]
    )
    scored = series[series["reason"].isna()]
    assert scored["error"].isna().all() and scored["label"].notna().all()
    assert sorted(scored["n_files"]) == [89, 90, 90] and sorted(scored["n_missing"]) == [0, 0, 1]
    assert (scored["view"] == "axial").all() and (scored["spacing_mm"] == 2.0).all()
    assert series.loc[series["reason"].notna(), "label"].isna().all()
    # Each series row is named after its files' common folder: A's spans S1 and S1b.
    a_row = next(p for p in scored.index if "/STUDY_A#series-" in p)
    stray = df[df["path"].str.endswith("NOPOS")]
    assert len(stray) == 1 and stray["error"].iloc[0].startswith("not in its series")
    assert df.loc[df["path"].str.endswith("lone.dcm"), "kind"].tolist() == ["image"]
    # Every file is in exactly one series row's n_files or has its own row.
    own_rows = df[df["kind"] != "series"]
    assert int(series["n_files"].sum()) + len(own_rows) == n_files
    assert s["files_counted_twice"] == 0 and s["series_files_mismatch"] == 0 and s["missing_rows"] == 0
    assert s["skipped"] == 3 and s["series_scored"] == 3

    # The same volumes as NIfTI: the same volume scores.
    nout = tmp_path / "nifti_out"
    ndf = read_scores(str(nout)) if score(ScoreConfig(bundle=str(head_bundle.bundle), input=str(nifti),
                                                      output=str(nout))) else None  # fmt: skip
    nrow = ndf[ndf["path"].str.endswith(names["STUDY_A"])].iloc[0]
    arow = series.loc[a_row]
    for col in ("score", "score_max", "score_mean", "prob_yes"):
        assert abs(float(arow[col]) - float(nrow[col])) <= 1e-4, col
    assert int(arow["slice"]) == int(nrow["slice"]) and int(arow["n_slices"]) == int(nrow["n_slices"])
    b_row = series.loc[[p for p in scored.index if "/STUDY_B/" in p + "/"]].iloc[0]
    b_nifti = ndf[ndf["path"].str.endswith(names["STUDY_B"])].iloc[0]
    assert abs(float(b_row["score"]) - float(b_nifti["score"])) <= 1e-4

    # One row per study: its best in-scope series; the CT-only study has none.
    studies = pd.read_parquet(out / "studies.parquet")
    assert len(studies) == 5  # A, B, C, CT, the lone file's
    a = studies[studies["study"] == arow["study"]].iloc[0]
    assert a["series_skipped"] == 1 and a["series_scored"] == 1 and a["files_in_series"] == 93  # 90 + 3
    if arow["in_scope"]:
        assert a["series_path"] == a_row and abs(a["score"] - arow["score"]) < 1e-6
    ct_study = studies[studies["series_skipped"].eq(1) & studies["series_scored"].eq(0)]
    assert len(ct_study) == 1 and ct_study["reason"].iloc[0] == "no series scored"

    # No identifying header value and no raw UID anywhere in the outputs.
    text = _all_text(out)
    for value in [*FAKE_PHI.values(), *uids]:
        if len(value) > 2:  # PatientSex "F" is in any text
            assert value not in text, value
    assert "St Nowhere" not in text

    # A rerun reads nothing and adds nothing.
    again = score(cfg)
    assert again["this_run_units"] == 0 and len(read_scores(str(out))) == len(df)
    assert again["dicom_series"]["header_files_read"] == 0

    # --with-uids: the raw identifiers, for use inside the hospital's network.
    wout = tmp_path / "with_uids"
    score(
        ScoreConfig(
            bundle=str(head_bundle.bundle), input=str(root / "STUDY_B"), output=str(wout), with_uids=True
        )
    )
    w = read_scores(str(wout))
    assert set(w["study_uid"].dropna()) == {uids[2]} and uids[3] in set(w["series_uid"].dropna())


def _sr_items(ds) -> list:
    """Every content item of an SR, depth first."""
    out = []
    for item in ds.get("ContentSequence", []):
        out.append(item)
        out += _sr_items(item)
    return out


def test_dicom_out_writes_a_valid_structured_report_per_scored_series(ray_session, head_bundle, tmp_path):
    """--dicom-out: a TID 1500 SR per labelled series, in the source study, listing every source instance as
    evidence and referencing the slice that carries the score; dciodvfy finds no error; a rerun writes none."""
    import pydicom

    rng = np.random.default_rng(7)
    root = tmp_path / "export"
    study, series = new_uid(rng), new_uid(rng)
    vox = _phantom_stack(7, 24, size=HEAD_SIZE)
    paths = write_series(root / "S", vox, axial_affine(vox.shape, slice_mm=3.0), rng=rng, study_uid=study,
                         series_uid=series)  # fmt: skip
    loc = _phantom_stack(8, 3)
    write_series(root / "L", loc, axial_affine(loc.shape), rng=rng, study_uid=study,
                 image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"))  # fmt: skip
    out, dicom = tmp_path / "out", tmp_path / "out" / "dicom"
    cfg = ScoreConfig(bundle=str(head_bundle.bundle), input=str(root), output=str(out), dicom_out=str(dicom),
                      score_out_of_scope=True, volume_depth_mm=0)  # fmt: skip
    s = score(cfg)
    row = read_scores(str(out)).query("kind == 'series' and reason.isna()").iloc[0]
    reports = sorted(dicom.iterdir())
    assert s["dicom_reports"] == 1 and len(reports) == 1  # the localizer has no result to report
    sr = pydicom.dcmread(reports[0])
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    assert sr.StudyInstanceUID == study and sr.SeriesInstanceUID != series
    assert sr.PatientID == FAKE_PHI["PatientID"]  # filed with its study: these files are for the PACS
    ev = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert ev.SeriesInstanceUID == series and len(ev.ReferencedSOPSequence) == 24
    items = _sr_items(sr)
    nums = {i.ConceptNameCodeSequence[0].CodeValue: float(i.MeasuredValueSequence[0].NumericValue)
            for i in items if i.ValueType == "NUM"}  # fmt: skip
    assert (
        abs(nums["series-score"] - row["score"]) < 1e-4
        and abs(nums["max-slice-score"] - row["score_max"]) < 1e-4
    )
    finding = next(
        i for i in items if i.ValueType == "CODE" and i.ConceptNameCodeSequence[0].CodeValue == "126952004"
    )
    assert finding.ConceptCodeSequence[0].CodeMeaning == ("Present" if row["label"] == "yes" else "Absent")
    # the slice carrying the score: axial slices written bottom to top, so canonical index k is file k
    image = next(i for i in items if i.ValueType == "IMAGE")
    want = pydicom.dcmread(paths[int(row["slice"])], stop_before_pixels=True).SOPInstanceUID
    assert image.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == want
    if shutil.which("dciodvfy"):  # Debian dicom3tools: the standard's IOD rules, offline
        import subprocess

        check = subprocess.run(["dciodvfy", str(reports[0])], capture_output=True, text=True)
        errors = [ln for ln in (check.stdout + check.stderr).splitlines() if ln.startswith("Error")]
        assert not errors, errors
    mtime = reports[0].stat().st_mtime_ns
    assert score(cfg)["dicom_reports"] == 1 and reports[0].stat().st_mtime_ns == mtime  # rerun: nothing new


def test_series_in_a_bucket_and_inside_a_zip_archive(
    ray_session, head_bundle, s3_server, s3_client, tmp_path
):
    """The same export read from s3:// (ranged header reads) and from a zip inside the bucket (members read
    in memory): each series is one row, the localizer skipped, files accounted for."""
    import io
    import zipfile

    rng = np.random.default_rng(9)
    study = new_uid(rng)
    vox = _phantom_stack(9, 12, size=HEAD_SIZE)
    blobs = series_files(vox, axial_affine(vox.shape), rng=rng, study_uid=study)
    loc = series_files(_phantom_stack(10, 3), axial_affine((64, 64, 3)), rng=rng, study_uid=study,
                       image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"))  # fmt: skip
    s3_client.create_bucket(Bucket="pacs")
    zbuf = io.BytesIO()
    with zipfile.ZipFile(zbuf, "w") as z:
        for k, b in enumerate(blobs + loc):
            name = f"{rng.bytes(5).hex()}"
            s3_client.put_object(Bucket="pacs", Key=f"export/{'a' if k % 2 else 'b'}/{name}", Body=b)
            z.writestr(f"exp/{name}", b)
    s3_client.put_object(Bucket="pacs", Key="zipped/export.zip", Body=zbuf.getvalue())
    for prefix, n_rows in (("export", 2), ("zipped", 2)):
        s = score(ScoreConfig(bundle=str(head_bundle.bundle), input=f"s3://pacs/{prefix}",
                              output=f"s3://pacs/out-{prefix}", s3_endpoint=s3_server))  # fmt: skip
        assert s["series_rows"] == n_rows and s["series_scored"] == 1 and s["skipped"] == 1, s
        assert s["files_in_series"] == 15 and s["files_counted_twice"] == 0 and s["missing_rows"] == 0
        assert s["rows"] == n_rows


def test_pydicoms_sample_archive_every_file_accounted_for(ray_session, head_bundle, tmp_path):
    """pydicom's own DICOMDIR test set (real headers from several scanners: MR scouts, CT, CR, an angio
    projection, files without geometry): each series gets its verdict, and every file is in one series row
    or has its own row."""
    import pydicom.data

    root = Path(pydicom.data.get_testdata_file("MR_small.dcm")).parent / "dicomdirtests"
    files = [p for p in root.rglob("*") if p.is_file()]
    s = score(ScoreConfig(bundle=str(head_bundle.bundle), input=str(root), output=str(tmp_path / "out")))
    df = read_scores(str(tmp_path / "out"))
    series = df[df["kind"] == "series"]
    assert sorted(series["reason"]) == sorted(
        ["skipped: 3 slices (fewer than 8)"] * 2 + ["skipped: modality CT"] * 2
        + ["skipped: localizer", "skipped: derived images"]
    )  # fmt: skip
    assert int(series["n_files"].sum()) + int((df["kind"] != "series").sum()) == len(files)
    assert s["files_counted_twice"] == 0 and s["series_files_mismatch"] == 0 and s["missing_rows"] == 0
