"""`raytumor slices`: volumes -> axial (and coronal/sagittal) training slices + manifest (SYNTHETIC phantom
and marker volumes; real IXI T1 volumes for the facts about that dataset: its patient ids, its own PNG
slices and its anatomy)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import phantom_volume, shared_dataset, write_phantom_volume
from PIL import Image

from raytumor.cli import main as cli_main
from raytumor.slices import SlicesConfig, export_slices, patient_id_of, pick_from_middle, pick_slices


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


def test_pick_from_middle_rule():
    z = np.arange(10, 71)  # coronal/sagittal: every slice given has head; no vertex rule
    got = z[pick_from_middle(z, 2.0, every_mm=5.0)]
    # every ceil(5 / 2) = 3 slices both ways from the middle one (z 40), out to both ends of the range
    assert 40 in got and np.all(np.diff(got) == 3) and got.min() == 10 and got.max() == 70
    assert np.array_equal(z[pick_from_middle(z[::-1], 2.0, every_mm=5.0)[::-1]], got[::-1])  # any order
    assert len(pick_from_middle(z, 2.0, every_mm=0.0)) == len(z) == len(pick_from_middle(z, None, 5.0))
    assert len(pick_from_middle(np.zeros(0, np.int64), 2.0, 5.0)) == 0


def test_planes_option():
    base = {"input": ["x"], "out": "o", "label": "no"}
    assert SlicesConfig(**base).planes == ["axial"]  # today's export unless asked
    assert SlicesConfig(**base, planes="sagittal, axial,sagittal").planes == ["sagittal", "axial"]
    for bad in ("axial,transverse", "", "oblique"):
        with pytest.raises(ValueError, match="--planes must name some of axial,coronal,sagittal"):
            SlicesConfig(**base, planes=bad)
    from raytumor.config import from_args
    from raytumor.slices import get_args_parser

    args = get_args_parser().parse_args(
        ["--input", "x", "--out", "o", "--label", "no", "--planes", "axial,coronal,sagittal"]
    )
    assert from_args(SlicesConfig, args).planes == ["axial", "coronal", "sagittal"]


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
    assert (man["view"] == "axial").all() and man["path"].str.contains(r"_z\d{3}\.png$").all()
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
    assert man["view"].isna().all()  # a PNG does not say its view: empty, never guessed
    for p, src in zip(man["path"], man["volume"], strict=True):
        assert np.array_equal(np.asarray(Image.open(tmp_path / "o" / p)), np.asarray(Image.open(src)))


def test_two_d_dicom_keeps_its_header_view(tmp_path):
    """2-D files are exported as stored whatever --planes asks; their view is what the header says."""
    pydicom = pytest.importorskip("pydicom")
    sample = Path(pydicom.__file__).parent / "data" / "test_files" / "MR_small.dcm"
    if not sample.is_file():
        pytest.skip("pydicom sample MR_small.dcm not in this pydicom wheel")
    (tmp_path / "in").mkdir()
    ds = pydicom.dcmread(sample)
    ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]  # a sagittal image
    ds.save_as(tmp_path / "in" / "sag.dcm")
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.save_as(tmp_path / "in" / "ax.dcm")
    export_slices(
        SlicesConfig(input=[str(tmp_path / "in")], out=str(tmp_path / "o"), label="no", planes=["coronal"])
    )
    man = pd.read_csv(tmp_path / "o" / "manifest.csv").set_index("path")
    assert man["view"].to_dict() == {"no/ax_z000.png": "axial", "no/sag_z000.png": "sagittal"}


# ---------------------------------------------------------------------------------------------------------
# Coronal and sagittal planes

# SYNTHETIC marker volume in RAS voxel order (x: left -> right, y: posterior -> anterior, z: inferior ->
# superior), each axis a different length and voxel size, so any swapped axis shows in shapes and steps.
_SHAPE = (24, 30, 36)
_ZOOMS = (1.0, 1.5, 2.0)
_MARKER = (slice(16, 20), slice(20, 24), slice(24, 28))  # right, anterior, superior


def _marker_volume() -> np.ndarray:
    """A bright 4x4x4 cube (right/anterior/superior) in an ellipsoid head (100) in a faint scalp (5)."""
    x, y, z = np.meshgrid(*(np.arange(n) for n in _SHAPE), indexing="ij")
    r2 = sum(((a - (n - 1) / 2) / (n / 2.6)) ** 2 for a, n in zip((x, y, z), _SHAPE, strict=True))
    vol = np.where(r2 < 1, 100.0, np.where(r2 < 1.35, 5.0, 0.0)).astype(np.float32)
    vol[_MARKER] = 400.0
    return vol


def _write_stored_as(vol: np.ndarray, path: Path, codes: tuple[str, str, str]) -> Path:
    """Save the RAS volume with voxel axes stored as ``codes`` (the affine says so): export must undo it."""
    import nibabel as nib

    ras = nib.Nifti1Image(vol, np.diag([*_ZOOMS, 1.0]))
    ornt = nib.orientations.ornt_transform(
        nib.orientations.axcodes2ornt(("R", "A", "S")), nib.orientations.axcodes2ornt(codes)
    )
    stored = ras.as_reoriented(ornt)
    assert nib.aff2axcodes(stored.affine) == codes
    nib.save(stored, str(path))
    return path


def _bright(png: Path) -> set[tuple[int, int]]:
    a = np.asarray(Image.open(png))
    return {(int(r), int(c)) for r, c in zip(*np.nonzero(a == 255), strict=True)}


@pytest.mark.parametrize("codes", [("R", "A", "S"), ("P", "I", "L")])
def test_planes_marker_orientation(tmp_path, codes):
    """The marker at the patient's right, anterior and superior lands in the corner each convention puts
    it: axial top right (anterior up, right on the right), coronal top left (superior up, the patient's
    right on the image left), sagittal top left (superior up, anterior on the left)."""
    vol = _write_stored_as(_marker_volume(), tmp_path / "m01.nii.gz", codes)
    out = tmp_path / "out"
    export_slices(
        SlicesConfig(input=[str(vol)], out=str(out), label="no", source="m", every_mm=0, depth_mm=0,
                     planes=["axial", "coronal", "sagittal"])
    )  # fmt: skip
    man = pd.read_csv(out / "manifest.csv")
    X, Y, Z = _SHAPE
    rows_sup = set(range(Z - 28, Z - 24))  # z 24..27 with superior up: rows Z-1-z
    want = {
        # view: (file tag, marker indices along the cut axis, image shape, bright (row, column) pixels)
        "axial": ("z", range(24, 28), (Y, X), {(Y - 1 - y, x) for y in range(20, 24) for x in range(16, 20)}),
        "coronal": ("cor", range(20, 24), (Z, X), {(r, X - 1 - x) for r in rows_sup for x in range(16, 20)}),
        "sagittal": ("sag", range(16, 20), (Z, Y), {(r, Y - 1 - y) for r in rows_sup for y in range(20, 24)}),
    }
    for view, (tag, through, shape, bright) in want.items():
        g = man[man["view"] == view]
        assert len(g) and g["path"].str.fullmatch(rf"no/m01_{tag}\d{{3}}\.png").all(), view
        letter = "xyz"[("sagittal", "coronal", "axial").index(view)]
        assert (g["source"] == [f"m via {vol} {letter}={k}" for k in g["slice_index"]]).all()
        for k in through:
            png = out / f"no/m01_{tag}{k:03d}.png"
            assert np.asarray(Image.open(png)).shape == shape, view
            assert _bright(png) == bright, (view, k)
            rows = [r for r, _ in bright]
            cols = [c for _, c in bright]
            corner = ("top", "right" if view == "axial" else "left")
            assert max(rows) < shape[0] / 2, (view, corner)
            assert (min(cols) > shape[1] / 2) if corner[1] == "right" else (max(cols) < shape[1] / 2), view
        # slices beside the marker do not show it
        assert not _bright(out / f"no/m01_{tag}{through[0] - 1:03d}.png"), view
    # only slices with head are exported; coronal/sagittal have no vertex (mm below it) rule
    assert man.loc[man["view"] != "axial", "mm_below_vertex"].isna().all()
    assert man.loc[man["view"] == "axial", "mm_below_vertex"].notna().all()
    for view, n in (("sagittal", X), ("coronal", Y)):
        idx = man.loc[man["view"] == view, "slice_index"]
        assert 0 < idx.min() and idx.max() < n - 1 and len(idx) == idx.max() - idx.min() + 1, view


def test_planes_every_mm_uses_each_axis_spacing(tmp_path):
    vol = _write_stored_as(_marker_volume(), tmp_path / "m01.nii.gz", ("L", "S", "P"))
    export_slices(
        SlicesConfig(input=[str(vol)], out=str(tmp_path / "o"), label="no", every_mm=3.0,
                     planes=["sagittal", "coronal"])
    )  # fmt: skip
    man = pd.read_csv(tmp_path / "o" / "manifest.csv")
    assert set(man["view"]) == {"sagittal", "coronal"}
    # x is 1 mm: every 3rd slice; y is 1.5 mm: every 2nd
    for view, step in (("sagittal", 3), ("coronal", 2)):
        idx = np.sort(man.loc[man["view"] == view, "slice_index"].to_numpy())
        assert len(idx) > 3 and np.all(np.diff(idx) == step), view


def test_planes_real_volume(tmp_path):
    """A real IXI T1 volume cut along all three planes: every view exported and named, the axial slices
    exactly today's, and the anatomy where each convention puts it."""
    ixi = shared_dataset("ixi-t1-nichart-42")
    vol = sorted((ixi / "nifti").glob("*.nii.gz"))[0]
    stem = vol.name.removesuffix(".nii.gz")
    out = tmp_path / "three"
    rc = cli_main(
        ["slices", "--input", str(vol), "--out", str(out), "--label", "no_tumor",
         "--patient-pattern", r"^(IXI\d+)", "--planes", "axial,coronal,sagittal"]
    )  # fmt: skip
    assert rc == 0
    man = pd.read_csv(out / "manifest.csv")
    assert pd.read_csv(out / "errors.csv").empty
    tags = {"axial": "z", "coronal": "cor", "sagittal": "sag"}
    counts = man["view"].value_counts()
    assert set(counts.index) == set(tags) and (counts >= 10).all(), counts
    for view, tag in tags.items():
        g = man[man["view"] == view]
        assert (g["path"] == [f"no_tumor/{stem}_{tag}{k:03d}.png" for k in g["slice_index"]]).all(), view
    assert (man["patient_id"] == stem[:6]).all()

    # Axial: exactly what the default (axial-only) export writes, pixels included.
    export_slices(SlicesConfig(input=[str(vol)], out=str(tmp_path / "ax"), label="no_tumor"))
    ref = pd.read_csv(tmp_path / "ax" / "manifest.csv")
    axial = man[man["view"] == "axial"].reset_index(drop=True)
    pd.testing.assert_frame_equal(axial.drop(columns="patient_id"), ref.drop(columns="patient_id"))
    for p in ref["path"]:
        assert (out / p).read_bytes() == (tmp_path / "ax" / p).read_bytes()

    def png(view: str, k: int) -> np.ndarray:
        return np.asarray(Image.open(out / f"no_tumor/{stem}_{tags[view]}{k:03d}.png"))

    sag_k = man.loc[man["view"] == "sagittal", "slice_index"].to_numpy()
    cor_k = man.loc[man["view"] == "coronal", "slice_index"].to_numpy()
    ax_k = man.loc[man["view"] == "axial", "slice_index"].to_numpy()
    n_sup = png("sagittal", sag_k[0]).shape[0]  # rows of a sagittal/coronal slice: the z extent
    # Every plane is a cut through the same volume as the axial slices (checked against the dataset's own
    # PNGs in test_export_real_volumes): a sagittal slice x, row of height z, is the axial slice z's
    # column x read top (anterior) to bottom; a coronal slice y at height z is axial row y, mirrored.
    n_ap = png("axial", ax_k[0]).shape[0]
    for z in ax_k[::4]:
        ax = png("axial", z)
        for x in sag_k[::5]:
            assert np.array_equal(png("sagittal", x)[n_sup - 1 - z], ax[:, x])
        for y in cor_k[::5]:
            assert np.array_equal(png("coronal", y)[n_sup - 1 - z], ax[n_ap - 1 - y, ::-1])

    # Anatomy, without the volume: the middle sagittal slice is a profile (face and back of the head
    # differ), the middle coronal and axial slices are left-right symmetric; swapping x and y fails this.
    def mirror_r(a: np.ndarray) -> float:
        a = a.astype(float)
        return float(np.corrcoef(a.ravel(), a[:, ::-1].ravel())[0, 1])

    mid = {v: int(np.median(man.loc[man["view"] == v, "slice_index"])) for v in ("sagittal", "coronal")}
    sag, cor = png("sagittal", mid["sagittal"]), png("coronal", mid["coronal"])
    assert mirror_r(sag) < 0.65 < min(mirror_r(cor), mirror_r(png("axial", int(np.median(ax_k)))))
    # superior up: air above the vertex at the top, the neck leaving the field of view at the bottom
    for img in (sag, cor):
        assert (img[:4] > 12).mean() < 0.01 and (img[-4:] > 12).mean() > 0.3
