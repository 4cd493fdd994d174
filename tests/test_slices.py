"""`raytumor slices`: volumes -> axial training slices + manifest (SYNTHETIC phantom volumes; real IXI T1
volumes for the facts about that dataset: its patient ids and its own PNG slices)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import phantom_volume, shared_dataset, write_phantom_volume
from PIL import Image

from raytumor.cli import main as cli_main
from raytumor.slices import SlicesConfig, export_slices, patient_id_of, pick_slices


def test_pick_slices_rule():
    z = np.arange(100)  # canonical z, inferior -> superior; vertex slice = 99
    got = z[pick_slices(z, 1.0, every_mm=5.0)]
    # 10-110 mm below the vertex (z 89 down to 0), one every 5 mm from the top of that range
    assert got.max() == 89 and got.min() == 4 and np.all(np.diff(got) == 5)
    # 2 mm slices: z 94 (10 mm) down to 44 (110 mm), every ceil(5 / 2) = 3 slices
    assert np.array_equal(z[pick_slices(z, 2.0, every_mm=5.0)], np.arange(94, 43, -3)[::-1])
    assert len(pick_slices(z, 1.0, every_mm=0.0)) == 90  # every slice in range
    assert len(pick_slices(z, None, every_mm=5.0)) == 100  # no spacing: no mm rule at all
    assert np.all(np.diff(z[pick_slices(z, 3.0, every_mm=5.0)]) == 2)  # ceil(5 / 3) slices: 6 mm apart


def test_patient_id_from_file_name():
    assert patient_id_of("IXI012-HH-1211_T1.nii.gz", None) == "IXI012-HH-1211_T1"
    assert patient_id_of("scan.DCM", None) == "scan"
    assert patient_id_of("IXI012-HH-1211_T1.nii.gz", re.compile(r"^(IXI\d+)")) == "IXI012"
    assert patient_id_of("p7_t1.nii", re.compile(r"p\d+")) == "p7"  # no group: the whole match
    with pytest.raises(ValueError, match="does not match the file name"):
        patient_id_of("anon.nii.gz", re.compile(r"^(IXI\d+)"))
    assert patient_id_of("IM0001.dcm", None, folder="series7") == "series7"  # 2-D files: their folder
    assert patient_id_of("p7_IM1.dcm", re.compile(r"p\d+"), folder="series7") == "p7"  # the pattern wins


def _export_two(vols: list[Path], tmp_path: Path, pattern: str) -> pd.DataFrame:
    """Export two 2 mm volumes plus a truncated and a missing one through the CLI, check what holds for any
    such volumes, and return the manifest."""
    (tmp_path / "IXI999-broken.nii.gz").write_bytes(vols[0].read_bytes()[:300])  # a truncated download
    listing = [str(v) for v in vols] + [str(tmp_path / "IXI999-broken.nii.gz"), str(tmp_path / "gone.nii.gz")]
    pd.DataFrame({"path": listing}).to_csv(tmp_path / "in.csv", index=False)
    out = tmp_path / "out"
    rc = cli_main(
        ["slices", "--input", str(tmp_path / "in.csv"), "--out", str(out), "--label", "no_tumor",
         "--source", "IXI local", "--patient-pattern", pattern]
    )  # fmt: skip
    assert rc == 0
    man = pd.read_csv(out / "manifest.csv")
    errors = pd.read_csv(out / "errors.csv").set_index("path")["error"]
    # every input is exported or named with a reason
    assert set(errors.index) == {str(tmp_path / "IXI999-broken.nii.gz"), str(tmp_path / "gone.nii.gz")}
    assert (
        errors[str(tmp_path / "gone.nii.gz")] == "not found"
        and "NIfTI" in errors[str(tmp_path / "IXI999-broken.nii.gz")]
    )
    assert set(man["volume"]) == {str(v) for v in vols}
    for _, g in man.groupby("volume"):
        below = g.sort_values("slice_index", ascending=False)["mm_below_vertex"].to_numpy()
        assert below.min() >= 10 and below.max() <= 110 and np.allclose(np.diff(below), 6.0)  # 2 mm, every 5
        assert len(g) >= 15  # the whole cerebrum down to the posterior fossa, not a handful of slices
    assert (man["label"] == "no_tumor").all() and man["source"].str.startswith("IXI local via ").all()
    for p in man["path"]:
        with Image.open(out / p) as im:
            assert im.format == "PNG" and im.mode == "L"
    # the manifest is training data as it stands: source name, patient ids, label, resolvable paths
    from raytumor.ingest import list_labelled

    files = list_labelled(str(out / "manifest.csv")).files
    assert set(files["source"]) == {"IXI local"} and set(files["class_name"]) == {"no_tumor"}
    assert files["patient_id"].nunique() == 2 and all(Path(p).is_file() for p in files["path"])
    return man


def _export_all(vol: Path, tmp_path: Path) -> Path:
    """Every slice of one volume (no mm rule) into tmp_path/all/no/; returns that folder."""
    export_slices(
        SlicesConfig(input=[str(vol)], out=str(tmp_path / "all"), label="no", every_mm=0, depth_mm=0)
    )
    return tmp_path / "all" / "no"


def test_export_phantom_volumes(tmp_path):
    vols = [write_phantom_volume(tmp_path / f"IXI90{i}-XX-0000_T1.nii.gz", seed=i) for i in (1, 2)]
    man = _export_two(vols, tmp_path, r"^(IXI\d+)")
    assert set(man["patient_id"]) == {"IXI901", "IXI902"}
    # 100 head slices under 20 empty ones: the vertex is z 99; every 3rd z from 94 (10 mm) to 46 (110 mm: 44)
    assert sorted(man.loc[man["volume"] == str(vols[0]), "slice_index"]) == list(range(46, 95, 3))

    # Orientation and slice index: the exported slice z is the phantom drawn at z, not mirrored or shifted.
    drawn = phantom_volume(seed=1)
    stem = vols[0].name.removesuffix(".nii.gz")
    folder = _export_all(vols[0], tmp_path)
    for z in (20, 60, 90):
        mine = np.asarray(Image.open(folder / f"{stem}_z{z:03d}.png"), float).ravel()
        for other in (np.flipud(drawn[z]), np.fliplr(drawn[z]), drawn[z - 12]):
            assert np.corrcoef(mine, drawn[z].ravel())[0, 1] > 0.99 > np.corrcoef(mine, other.ravel())[0, 1]


def test_export_real_volumes(tmp_path):
    ixi = shared_dataset("ixi-t1-nichart-42")
    ref = pd.read_csv(ixi / "manifest.csv")
    vols = sorted((ixi / "nifti").glob("*.nii.gz"))[:2]
    man = _export_two(vols, tmp_path, r"^(IXI\d+)")
    # patient ids as the dataset's own manifest names them
    want = ref.assign(name=ref["path"].map(lambda p: Path(p).name)).set_index("name")["patient_id"]
    assert (man["patient_id"] == man["volume"].map(lambda v: want[Path(v).name])).all()

    # Orientation and slice index: the exported slice z matches the dataset's own PNG of that z.
    folder = _export_all(vols[0], tmp_path)
    stem = vols[0].name.removesuffix(".nii.gz")
    pngs = sorted((ixi / "no_tumor").glob(f"{stem.removesuffix('_T1')}_ax*.png"))
    assert pngs
    for png in pngs[:3]:
        z = int(png.stem.rsplit("_ax", 1)[1])
        mine = np.asarray(Image.open(folder / f"{stem}_z{z:03d}.png"), float).ravel()
        theirs = np.asarray(Image.open(png).convert("L"), float).ravel()
        other = np.asarray(Image.open(folder / f"{stem}_z{z - 12:03d}.png"), float).ravel()
        assert np.corrcoef(mine, theirs)[0, 1] > 0.99 > np.corrcoef(other, theirs)[0, 1]


def test_bad_label_and_clash(tmp_path):
    with pytest.raises(ValueError, match="plain folder name"):
        export_slices(SlicesConfig(input=[str(tmp_path)], out=str(tmp_path / "o"), label="../up"))
    v = write_phantom_volume(tmp_path / "IXI901-XX-0000_T1.nii.gz")  # any volume: the names clash
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for d in ("a", "b"):
        (tmp_path / d / v.name).symlink_to(v)
    with pytest.raises(ValueError, match="same slice name"):
        export_slices(
            SlicesConfig(
                input=[str(tmp_path / "a"), str(tmp_path / "b")], out=str(tmp_path / "o"), label="no"
            )
        )


def test_two_d_series_is_one_patient(tmp_path):
    """One file per slice (single-frame DICOM series, PNG stacks): every file exported, patient = folder."""
    series = tmp_path / "in" / "series7"
    series.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (40, 48), dtype=np.uint8)).save(series / f"IM{i:04d}.png")
    s = export_slices(SlicesConfig(input=[str(tmp_path / "in")], out=str(tmp_path / "o"), label="no"))
    man = pd.read_csv(tmp_path / "o" / "manifest.csv")
    assert s["slices"] == 3 and s["patients"] == 1 and set(man["patient_id"]) == {"series7"}
    assert man["mm_below_vertex"].isna().all() and set(man["source"].str.split(" via ").str[0]) == {"in"}
    for p, src in zip(man["path"], man["volume"], strict=True):
        assert np.array_equal(np.asarray(Image.open(tmp_path / "o" / p)), np.asarray(Image.open(src)))
