"""Ingest: listing, class layout, decoding in Ray Data tasks, bad input, S3."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from raytumor.ingest import (
    build_catalogue,
    class_layout,
    decode_batch,
    is_negative_name,
    list_labelled,
)
from raytumor.storage import StorageOptions, get_filesystem


def _png(value: int = 128, size=(40, 30), mode: str = "L") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, value if mode == "L" else (value,) * len(mode)).save(buf, "PNG")
    return buf.getvalue()


def _jpeg(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (48, 64), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


@pytest.mark.parametrize(
    "names,expected,negative",
    [
        (["yes", "no"], ["no", "yes"], "no"),
        (["tumor", "no_tumor"], ["no_tumor", "tumor"], "no_tumor"),
        (["Tumour", "Normal"], ["Normal", "Tumour"], "Normal"),
        (
            ["glioma", "meningioma", "notumor", "pituitary"],
            ["glioma", "meningioma", "notumor", "pituitary"],
            "notumor",
        ),
        (["a", "b"], ["a", "b"], None),
    ],
)
def test_class_layout(names, expected, negative):
    classes, neg = class_layout(names)
    assert classes == expected and neg == negative


def test_class_layout_errors_and_explicit_order():
    with pytest.raises(ValueError, match="at least 2 classes"):
        class_layout(["only"])
    with pytest.raises(ValueError, match="not in the given class order"):
        class_layout(["a", "b", "c"], order=["a", "b"])
    assert class_layout(["no", "yes"], order=["yes", "no"]) == (["yes", "no"], "no")
    assert is_negative_name("No Tumor") and not is_negative_name("tumor")


def test_list_tree_counts_ignored(tmp_path):
    for cls in ("yes", "no"):
        (tmp_path / cls / "sub").mkdir(parents=True)
        (tmp_path / cls / "a.jpg").write_bytes(_jpeg(1))
        (tmp_path / cls / "sub" / "b.png").write_bytes(_png())
    (tmp_path / "yes" / ".DS_Store").write_bytes(b"junk")
    (tmp_path / "README.md").write_text("docs")
    (tmp_path / "stray.jpg").write_bytes(_jpeg(2))
    listing = list_labelled(str(tmp_path))
    assert len(listing.files) == 4
    assert sorted(listing.files["class_name"].unique()) == ["no", "yes"]
    reasons = listing.summary()["ignored_reasons"]
    assert reasons == {"hidden file": 1, "not inside a class folder": 2}


def test_list_manifest_resolves_relative_paths(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "x.png").write_bytes(_png())
    pd.DataFrame(
        {
            "path": ["imgs/x.png", str(tmp_path / "imgs" / "x.png")],
            "label": ["yes", "no"],
            "source": ["A", None],
        }
    ).to_csv(tmp_path / "m.csv", index=False)
    listing = list_labelled(str(tmp_path / "m.csv"))
    assert listing.files["path"].tolist() == [str(tmp_path / "imgs" / "x.png")] * 2
    assert listing.files["source"].tolist()[0] == "A"
    with pytest.raises(ValueError, match="path,label"):
        pd.DataFrame({"file": ["a"]}).to_csv(tmp_path / "bad.csv", index=False)
        list_labelled(str(tmp_path / "bad.csv"))


def test_missing_source_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        list_labelled(str(tmp_path / "nope"))


def test_decode_batch_reports_every_row(tmp_path):
    good = tmp_path / "good.jpg"
    good.write_bytes(_png(200, mode="RGBA"))  # a PNG named .jpg, RGBA
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    trunc = tmp_path / "trunc.jpg"
    trunc.write_bytes(_jpeg(3)[:200])
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    paths = [str(good), str(empty), str(trunc), str(text), str(tmp_path / "vanished.png")]
    out = decode_batch({"path": np.array(paths, dtype=object)}, image_size=32)
    assert out["image"].shape == (5, 32, 32) and out["image"].dtype == np.uint8
    assert out["error"][0] is None and out["format"][0] == "png" and out["mode"][0] == "RGBA"
    assert all(e for e in out["error"][1:]), out["error"]
    assert "unreadable" in out["error"][4]
    assert out["sha256"][0] and out["dhash"].dtype == np.int64
    assert out["image"][1:].max() == 0  # failed rows keep the tensor shape, never used


def test_gzip_scans_reach_the_decoder_as_stored(tmp_path):
    """A .nii.gz is read as stored (pyarrow would inflate it by name): the NIfTI decoder's bounded gunzip
    sees it, the content hash is of the file, and a truncated download is a truncated scan."""
    import hashlib

    import nibabel as nib

    from raytumor.storage import read_bytes

    arr = (np.arange(48 * 40, dtype=np.int16).reshape(48, 40, 1) % 300).astype(np.int16)
    good = tmp_path / "slice.nii.gz"
    nib.save(nib.Nifti1Image(arr, np.eye(4)), str(good))
    raw = good.read_bytes()
    assert raw[:2] == b"\x1f\x8b" and read_bytes(str(good)) == raw
    trunc = tmp_path / "cut.nii.gz"
    trunc.write_bytes(raw[: len(raw) // 2])
    out = decode_batch({"path": np.array([str(good), str(trunc)], dtype=object)}, image_size=32)
    assert out["error"][0] is None and out["format"][0] == "nifti"
    assert out["sha256"][0] == hashlib.sha256(raw).hexdigest()
    assert "NIfTI" in out["error"][1] and "unreadable" not in out["error"][1], out["error"][1]


def test_catalogue_bad_inputs_not_fatal(ray_session, tmp_path):
    for cls in ("no", "yes"):
        (tmp_path / cls).mkdir()
        for i in range(3):
            (tmp_path / cls / f"{i}.jpg").write_bytes(_jpeg(i + (10 if cls == "yes" else 0)))
    (tmp_path / "yes" / "zero.jpg").write_bytes(b"")
    (tmp_path / "yes" / "trunc.jpg").write_bytes(_jpeg(99)[:150])
    (tmp_path / "no" / "doc.pdf.jpg").write_bytes(b"%PDF-1.4 nonsense")
    cat = build_catalogue(str(tmp_path))
    s = cat.summary()
    assert s["files_listed"] == s["files_read"] == 9
    assert s["files_decoded"] == 6 and s["files_rejected"] == 3
    assert {r["path"].rsplit("/", 1)[1] for r in s["rejected_files"]} == {
        "zero.jpg",
        "trunc.jpg",
        "doc.pdf.jpg",
    }
    assert cat.classes == ["no", "yes"] and cat.negative_class == "no"
    assert set(cat.ok["label"]) == {0, 1}


def test_catalogue_phantoms(ray_session, phantoms):
    """A SYNTHETIC folder with the real sets' oddities: every file decodes, formats are sniffed from the
    bytes (PNG named .jpg), modes as stored, the readme outside the class folders is ignored, not fatal."""
    from raytumor.formats import sniff_format

    files = sorted(p for p in phantoms.glob("*/*") if p.is_file())
    formats = pd.Series([sniff_format(p.read_bytes()) for p in files]).value_counts().to_dict()
    modes = {}
    for p in files:
        with Image.open(p) as im:
            modes[im.mode] = modes.get(im.mode, 0) + 1
    assert set(modes) == {"L", "RGB", "RGBA", "P"} and set(formats) == {"jpeg", "png"}
    cat = build_catalogue(str(phantoms))
    s = cat.summary()
    assert s["files_listed"] == s["files_decoded"] == len(files) and s["files_rejected"] == 0
    assert s["per_class"] == {c: len(list((phantoms / c).iterdir())) for c in ("no", "yes")}
    assert s["formats"] == formats and s["modes"] == modes
    assert s["ignored_reasons"] == {"not inside a class folder": 1}  # SYNTHETIC_README.txt at the root
    t = cat.table.set_index("path")
    png_named_jpg = [p for p in files if p.suffix == ".jpg" and sniff_format(p.read_bytes()) == "png"]
    assert png_named_jpg and (t.loc[[str(p) for p in png_named_jpg], "format"] == "png").all()
    assert cat.classes == ["no", "yes"] and cat.negative_class == "no"
    assert cat.table["sha256"].nunique() == len(files)  # no duplicates among phantoms


def test_catalogue_real_navoneel(ray_session, navoneel):
    cat = build_catalogue(str(navoneel))
    s = cat.summary()
    # PROVENANCE.md: 253 files (yes 155 / no 98), every one decodes; 8 PNG (6 named .jpg), 245 JPEG.
    assert s["files_listed"] == 253 and s["files_decoded"] == 253 and s["files_rejected"] == 0
    assert s["per_class"] == {"yes": 155, "no": 98}
    assert s["formats"] == {"jpeg": 245, "png": 8}
    assert s["modes"] == {"RGB": 217, "L": 30, "RGBA": 5, "P": 1}
    assert s["ignored_reasons"] == {"not inside a class folder": 1}  # PROVENANCE.md at the root
    t = cat.table.set_index("path")
    for name in ("no 96.jpg", "no.jpg", "No15.jpg", "No17.jpg", "No18.jpg", "no 98.jpg"):
        assert t.loc[str(navoneel / "no" / name), "format"] == "png"
    assert cat.table["sha256"].nunique() == 228  # 22 md5 groups, 25 redundant files


def test_s3_listing_and_decoding(ray_session, s3_server, s3_client):
    s3_client.create_bucket(Bucket="scans")
    for cls in ("no", "yes"):
        for i in range(2):
            s3_client.put_object(
                Bucket="scans", Key=f"set/{cls}/{i}.jpg", Body=_jpeg(i + (5 if cls == "yes" else 0))
            )
    s3_client.put_object(Bucket="scans", Key="set/yes/bad.jpg", Body=b"\x00\x01garbage")
    storage = StorageOptions(endpoint_override=s3_server)
    fs, path = get_filesystem("s3://scans/set", storage)
    assert path == "scans/set"
    cat = build_catalogue("s3://scans/set", storage)
    s = cat.summary()
    assert s["files_listed"] == 5 and s["files_decoded"] == 4 and s["files_rejected"] == 1
    assert all(p.startswith("s3://scans/set/") for p in cat.table["path"])
