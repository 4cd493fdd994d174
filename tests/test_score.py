"""Batch scoring: listing (folders, archives, manifests), one row per unit, S3, bad input, volumes, Grad-CAM,
resume after a killed run.

Everything here is pipeline behaviour that holds on any images, so it runs on SYNTHETIC phantoms and the
session's head-fitted bundle (conftest.head_bundle) and needs no ../shared/data."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
import zipfile
import zlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import HEAD_SIZE, write_phantom_volume
from PIL import Image
from torchmetrics.functional.classification import binary_auroc

from raytumor import formats
from raytumor.bundle import fetch_bundle, load_bundle, save_bundle
from raytumor.predict import forward_probs
from raytumor.results import read_scores
from raytumor.score import ScoreConfig, score
from raytumor.storage import StorageOptions, archive_kind, list_units

SIZE = HEAD_SIZE


# ----------------------------------------------------------------------------------------------------------
# Fixtures: a head-fitted bundle, and a corpus of every kind of bad input


def _load_gray(path: Path, size: int = SIZE) -> np.ndarray:
    """The preprocessing training and scoring share (incl. JPEG draft decoding at the target size)."""
    return formats.fit_square(formats.decode_image(path.read_bytes(), draft_size=size).pixels, size)


@pytest.fixture(scope="module")
def bundle(head_bundle) -> Path:
    """EfficientNet-Lite0 with ImageNet features and a head fitted on half the phantoms (temperature 1.5,
    threshold 0.5): scores that mean something, so positives exist for Grad-CAM and the tumour/no split is
    testable. Built once per session (conftest.build_head_bundle), shared with test_report."""
    return head_bundle.bundle


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def _pydicom_file(name: str) -> Path:
    from pydicom.data import get_testdata_file

    return Path(get_testdata_file(name))


def _nibabel_file(name: str) -> Path:
    import nibabel

    return Path(nibabel.__file__).parent / "tests" / "data" / name


@pytest.fixture(scope="module")
def bad_corpus(phantoms, tmp_path_factory) -> tuple[Path, dict[str, str | None]]:
    """A folder with good, odd and broken files: (root, {unit id: expected error substring or None})."""
    root = tmp_path_factory.mktemp("corpus")
    jpgs = sorted((phantoms / "yes").glob("*.jpg"))
    real = next(p for p in jpgs if formats.sniff_format(p.read_bytes()) == "jpeg").read_bytes()
    # a PNG named .jpg (phantoms write some, as real sets ship them)
    real_png = next(
        p.read_bytes()
        for p in sorted((phantoms / "no").glob("*.jpg"))
        if formats.sniff_format(p.read_bytes()) == "png"
    )
    gray = _load_gray(jpgs[0], 200)
    exp: dict[str, str | None] = {}

    def put(rel: str, data: bytes, expect: str | None) -> Path:
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        exp[str(p)] = expect
        return p

    put("good.jpg", real, None)
    put("png_named_as.jpg", real_png, None)
    put("nested/deeper/gray16.png", _png(Image.fromarray(gray.astype(np.uint16) * 200)), None)
    put("rgba.png", _png(Image.fromarray(gray).convert("RGBA")), None)
    put("palette.png", _png(Image.fromarray(gray).convert("P")), None)
    put("empty.jpg", b"", "empty file")
    put("truncated.jpg", real[: len(real) // 3], "truncated")
    put("notes.txt", b"not an image at all\n" * 10, "unknown format")
    # A PNG whose header claims 100,000 x 100,000 pixels: refused before any pixel buffer exists.
    bomb = bytearray(_png(Image.new("L", (8, 8))))
    bomb[16:24] = (100_000).to_bytes(4, "big") * 2
    bomb[29:33] = zlib.crc32(bytes(bomb[12:29])).to_bytes(4, "big")  # a valid IHDR: refused for its size
    put("bomb.png", bytes(bomb), "decompression bomb")
    put("mr.dcm", _pydicom_file("MR_small.dcm").read_bytes(), None)
    put("rtplan.dcm", _pydicom_file("rtplan.dcm").read_bytes(), "without pixel data")
    put("anatomical.nii", _nibabel_file("anatomical.nii").read_bytes(), None)
    put("fmri.nii.gz", _nibabel_file("example4d.nii.gz").read_bytes(), "4-D")
    put("broken.zip", b"PK\x03\x04" + os.urandom(300), "corrupt zip archive")

    zbuf = io.BytesIO()
    with zipfile.ZipFile(zbuf, "w") as z:
        z.writestr("scans/", b"")  # a directory entry: not a unit
        z.writestr("scans/a.jpg", real)
        z.writestr("scans/../../escape.png", real_png)  # hostile name: only ever a string in the row
        z.writestr("scans/readme.txt", b"hello")
    zpath = put("batch.zip", zbuf.getvalue(), None)
    del exp[str(zpath)]
    exp[f"{zpath}!scans/a.jpg"] = None
    exp[f"{zpath}!scans/../../escape.png"] = None
    exp[f"{zpath}!scans/readme.txt"] = "unknown format"

    tbuf = io.BytesIO()
    with tarfile.open(fileobj=tbuf, mode="w:gz") as t:
        for name, data in (("x/one.jpg", real), ("x/one.jpg", real_png), ("x/broken.png", real_png[:200])):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("x/link.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        t.addfile(link)
    tpath = put("more.tar.gz", tbuf.getvalue(), None)
    del exp[str(tpath)]
    exp[f"{tpath}!x/one.jpg"] = None
    exp[f"{tpath}!x/one.jpg#2"] = None  # the same name twice: both rows, distinct ids
    exp[f"{tpath}!x/broken.png"] = "truncated"
    exp[f"{tpath}!x/link.jpg"] = "link"

    ebuf = io.BytesIO()
    with tarfile.open(fileobj=ebuf, mode="w"):
        pass
    put("empty.tar", ebuf.getvalue(), "empty archive")
    put("fake.tar", b"this is not a tar archive" * 40, "corrupt tar")
    return root, exp


# ----------------------------------------------------------------------------------------------------------
# Listing (no Ray)


def test_archive_kinds():
    assert (
        archive_kind("a/b.ZIP") == "zip"
        and archive_kind("x.tar.gz") == "tar"
        and archive_kind("x.tgz") == "tar"
    )
    assert archive_kind("brain.nii.gz") is None and archive_kind("scan.jpg") is None


def test_list_units_expands_zips_and_keeps_tars_whole(bad_corpus):
    root, exp = bad_corpus
    units = list_units(str(root))
    t = units.table
    assert t["id"].is_unique
    zip_ids = set(t.loc[t["kind"] == "zip", "id"])
    assert zip_ids == {i for i in exp if "batch.zip!" in i}  # directory entry skipped
    assert (t["kind"] == "tar").sum() == 3  # streamed in tasks: member count unknown until read
    assert [i for i, _ in units.error_rows] == [str(root / "broken.zip")]
    assert "corrupt zip archive" in units.error_rows[0][1]


def test_list_units_from_manifest(bad_corpus, tmp_path):
    root, _ = bad_corpus
    m = tmp_path / "list.csv"
    rel = os.path.relpath(root / "good.jpg", tmp_path)
    pd.DataFrame(
        {"path": [rel, str(root / "good.jpg"), str(root / "missing.jpg"), str(root / "batch.zip")]}
    ).to_csv(m, index=False)
    units = list_units(str(m))
    assert units.duplicate_entries == 1  # relative and absolute name the same file once resolved
    assert str(root / "good.jpg") in set(units.table["id"])
    assert (units.table["kind"] == "zip").sum() == 3
    assert (str(root / "missing.jpg"), "not found") in units.error_rows
    with pytest.raises(FileNotFoundError):
        list_units(str(tmp_path / "nowhere"))


# ----------------------------------------------------------------------------------------------------------
# Scoring with Ray


@pytest.mark.ray
def test_scores_a_folder_exactly_like_the_model(ray_session, head_bundle, tmp_path):
    bundle, root = head_bundle.bundle, head_bundle.root
    out = tmp_path / "out"
    s = score(ScoreConfig(bundle=str(bundle), input=str(root), output=str(out), csv=True))
    files = sorted(p for p in root.rglob("*") if p.is_file())
    n_images = len(head_bundle.train) + len(head_bundle.eval)
    df = read_scores(str(out))
    # rows in == rows out, one per file (SYNTHETIC_README.txt becomes an error row, not a lost file)
    assert len(df) == len(files) == s["rows"] and df["path"].is_unique and s["missing_rows"] == 0
    images = df[df["error"].isna()]
    assert len(images) == n_images and s["scored"] == n_images and s["errors"] == len(files) - n_images == 1
    # the Ray path computes the same probabilities as the model applied directly (at the bundle's temperature)
    b = load_bundle(bundle, device="cpu")
    assert b.meta.temperature == 1.5
    sample = images.sample(24, random_state=0)
    x = np.stack([_load_gray(Path(p)) for p in sample["path"]])
    direct = forward_probs(b.model, x, b.device, b.meta.temperature)[:, 1].numpy()
    np.testing.assert_allclose(sample["prob_yes"].to_numpy(), direct, atol=1e-4)
    np.testing.assert_allclose(sample["score"], sample["prob_yes"], atol=1e-6)
    # the score means tumour: the fitted model separates the folders of the files its head was fitted on
    fitted = images[images["path"].isin(head_bundle.train["path"])]
    assert len(fitted) == len(head_bundle.train)
    truth = torch.tensor(fitted["path"].str.contains("/yes/").to_numpy())
    assert binary_auroc(torch.tensor(fitted["score"].to_numpy()), truth).item() > 0.85
    assert set(images["label"]) <= {"no", "yes"} and (images["label"] == "yes").sum() == s["positives"]
    assert (df["bundle_id"] == b.meta.bundle_id).all() and df["scored_at"].notna().all()
    # no scan metadata in the table, only what the contract lists
    assert not {"width", "height", "mode", "sha256", "PatientName"} & set(df.columns)
    csv = pd.read_csv(out / "scores.csv")
    assert len(csv) == len(df) and set(csv["path"]) == set(df["path"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rows"] == len(files) and summary["duplicate_rows"] == 0


@pytest.mark.ray
def test_bad_input_corpus_rows_in_equal_rows_out(
    ray_session, bundle, bad_corpus, tmp_path, capsys, monkeypatch
):
    from raytumor.score import get_args_parser, main

    monkeypatch.setenv("RAYTUMOR_PROGRESS_S", "0.2")  # a progress line even in a job of seconds
    root, exp = bad_corpus
    out = tmp_path / "out"
    s = main(
        get_args_parser().parse_args(["--bundle", str(bundle), "--input", str(root), "--output", str(out)])
    )
    df = read_scores(str(out)).set_index("path")
    assert df.index.is_unique and set(df.index) == set(exp), set(df.index) ^ set(exp)
    for uid, want in exp.items():
        err = df.at[uid, "error"]
        if want is None:
            assert err is None or pd.isna(err), (uid, err)
            assert 0 <= df.at[uid, "score"] <= 1 and df.at[uid, "label"] in ("no", "yes")
        else:
            assert isinstance(err, str) and want in err, (uid, err)
            assert pd.isna(df.at[uid, "score"]) and pd.isna(df.at[uid, "label"])
    vol = df.loc[str(root / "anatomical.nii")]
    assert (
        vol["kind"] == "volume"
        and vol["n_slices"] > 1
        and 0 <= vol["slice"]
        and not pd.isna(vol["score_mean"])
    )
    assert df.loc[str(root / "mr.dcm"), "format"] == "dicom"
    assert s["errors"] == sum(v is not None for v in exp.values())
    printed = capsys.readouterr().out
    assert f"{len(exp)} rows: {len(exp) - s['errors']} scored, {s['errors']} errors" in printed
    assert "[score] progress: " in printed and "rows/s" in printed
    # nothing was extracted next to the input, and no output file is named after a member
    assert not (root.parent / "escape.png").exists()
    known = {"run.json", "summary.json", "uid_salt", "dicom_headers.parquet", "studies.parquet"}
    assert {p.name for p in out.rglob("*") if p.is_file()} <= known | {
        p.name for p in (out / "scores").iterdir()
    }


@pytest.mark.ray
def test_volumes_per_slice_rows_and_gradcam(ray_session, head_bundle, tmp_path):
    bundle = head_bundle.bundle
    src = tmp_path / "in"
    src.mkdir()
    # two healthy 2 mm volumes (100 head slices under 20 empty ones), 12 tumour scans the head was fitted on
    for seed in (0, 1):
        write_phantom_volume(src / f"phantom{seed}_T1.nii.gz", seed=seed)
    fitted_yes = head_bundle.train.loc[head_bundle.train["label"] == "yes", "path"]
    for p in map(Path, sorted(fitted_yes)[:12]):
        (src / p.name).symlink_to(p)
    out = tmp_path / "out"
    s = score(ScoreConfig(bundle=str(bundle), input=str(src), output=str(out), slice_rows=True, explain=True))
    df = read_scores(str(out)).set_index("path")
    assert len(df) == 14 and s["errors"] == 0
    vols = df[df["kind"] == "volume"]
    assert len(vols) == 2 and (vols["n_slices"] > 20).all()
    slices = pd.read_parquet(out / "slices.parquet")
    assert len(slices) == vols["n_slices"].sum()
    from raytumor.volumes import volume_score

    for path, row in vols.iterrows():
        mine = slices[slices["path"] == path].reset_index(drop=True)
        # 2 mm volumes: only slices 10-110 mm below the vertex are scored, 5 contiguous needed
        z = mine["slice"].to_numpy()
        top = formats.decode_scan(Path(path).read_bytes()).slice_index.max()
        assert top == 99  # the empty slices above the head are not the vertex
        assert ((top - z) * 2.0 >= 10).all() and ((top - z) * 2.0 <= 110).all()
        assert len(mine) == 51  # every slice in range: z 44..94
        vs, j = volume_score(mine["score"].to_numpy(), z, 2.0, 10.0)
        assert row["score"] == pytest.approx(vs, abs=1e-6) and row["slice"] == z[j]
        assert row["score_max"] == pytest.approx(mine["score"].max(), abs=1e-6)
        assert row["score_max"] >= row["score"]
        assert row["score_mean"] == pytest.approx(mine["score"].mean(), abs=1e-5)
        assert row["adaptation"] == "none"
    pos = df[df["label"] == "yes"]
    assert len(pos) >= 6  # the fitted model calls most tumour scans positive
    assert pos["explain"].notna().all() and df.loc[df["label"] == "no", "explain"].isna().all()

    # `raytumor evaluate --scores`: labels from a manifest, volume rows judged by their volume score
    from raytumor.evaluate import evaluate_scores

    truth = pd.DataFrame(
        {"path": df.index, "label": ["no_tumor" if p.endswith(".nii.gz") else "yes" for p in df.index]}
    )
    truth.to_csv(tmp_path / "truth.csv", index=False)
    res = evaluate_scores(str(bundle), str(tmp_path / "truth.csv"), str(out), tmp_path / "ev", n_boot=50)
    vol_m, img_m = res["by_kind"]["volume"], res["by_kind"]["image"]
    assert vol_m["n"] == 2 and vol_m["false_positives"] == int((vols["label"] == "yes").sum())
    assert vol_m["specificity"] == pytest.approx((vols["label"] == "no").mean())
    imgs = df[df["kind"] == "image"]
    assert img_m["n"] == 12 and img_m["sensitivity"] == pytest.approx((imgs["label"] == "yes").mean())
    assert res["metrics"]["n"] == 14 and res["adaptation"] == ["none"]
    preds = pd.read_parquet(tmp_path / "ev" / "predictions.parquet").set_index("path")
    assert np.allclose(preds.loc[vols.index, "prob_yes"], vols["score"], atol=1e-6)  # not score_max
    assert np.allclose(preds.loc[imgs.index, "prob_yes"], imgs["prob_yes"], atol=1e-6)
    pd.concat([truth, pd.DataFrame({"path": [str(tmp_path / "unscored.png")], "label": ["yes"]})]).to_csv(
        tmp_path / "more.csv", index=False
    )
    with pytest.raises(ValueError, match="1 labelled files have no score row"):
        evaluate_scores(str(bundle), str(tmp_path / "more.csv"), str(out), n_boot=10)

    # `raytumor report --scores`: the same rows in the HTML report, slices and volumes apart; the
    # Grad-CAM gallery shows single images only (the healthy volumes are the only negatives here).
    from raytumor.report import get_args_parser
    from raytumor.report import main as report_main

    rargs = get_args_parser().parse_args(
        ["--bundle", str(bundle), "--data", str(tmp_path / "truth.csv"), "--scores", str(out),
         "--out", str(tmp_path / "rep"), "--n-boot", "50", "--gallery", "3"]
    )  # fmt: skip
    rep = report_main(rargs)
    assert rep["by_kind"]["volume"]["false_positives"] == vol_m["false_positives"]
    assert rep["by_kind"]["image"]["n"] == 12 and rep["n"] == 14 and rep["adaptation"] == ["none"]
    assert rep["metrics"]["sensitivity"] == pytest.approx(res["metrics"]["sensitivity"])
    assert rep["gallery"]["false_positives"] == []
    assert all(it["path"] in imgs.index for it in rep["gallery"]["false_negatives"])
    page = (tmp_path / "rep" / "report.html").read_text()
    assert 'id="by-kind"' in page and "volumes (volume rule)" in page and str(out) in page
    for rel in pos["explain"]:
        assert "/" not in rel.split("explain/", 1)[1]
        with Image.open(out / rel) as im:
            assert im.format == "PNG" and im.mode == "RGB" and min(im.size) >= SIZE


@pytest.mark.ray
def test_s3_bucket_in_and_out(ray_session, bundle, phantoms, s3_server, s3_client, tmp_path):
    s3_client.create_bucket(Bucket="scans")
    files = sorted((phantoms / "yes").iterdir())[:20] + sorted((phantoms / "no").iterdir())[:20]
    for p in files:
        s3_client.upload_file(str(p), "scans", f"archive/{p.parent.name}/{p.name}")
    zbuf = io.BytesIO()
    with zipfile.ZipFile(zbuf, "w") as z:
        for p in files[:5]:
            z.write(p, f"zipped/{p.name}")
    s3_client.put_object(Bucket="scans", Key="archive/batch.zip", Body=zbuf.getvalue())
    # the bundle lives in the bucket too, as it would for a multi-node cluster
    for f in Path(bundle).iterdir():
        s3_client.upload_file(str(f), "scans", f"models/b1/{f.name}")
    local = fetch_bundle("s3://scans/models/b1", StorageOptions(endpoint_override=s3_server))
    assert (
        local != Path(bundle)
        and (local / "model.pt").read_bytes() == (Path(bundle) / "model.pt").read_bytes()
    )
    s = score(
        ScoreConfig(
            bundle="s3://scans/models/b1",
            input="s3://scans/archive",
            output="s3://scans/results",
            s3_endpoint=s3_server,
            csv=True,
        )
    )
    assert s["rows"] == 45 and s["scored"] == 45 and s["missing_rows"] == 0
    storage = StorageOptions(endpoint_override=s3_server)
    df = read_scores("s3://scans/results", storage)
    assert df["path"].str.startswith("s3://scans/archive/").all() and df["path"].is_unique
    assert (df["path"].str.contains("batch.zip!zipped/")).sum() == 5
    keys = {o["Key"] for o in s3_client.list_objects_v2(Bucket="scans", Prefix="results/")["Contents"]}
    assert {"results/summary.json", "results/run.json", "results/scores.csv"} <= keys
    # rerun: everything is already there, nothing is scored twice
    again = score(
        ScoreConfig(
            bundle=str(bundle), input="s3://scans/archive", output="s3://scans/results", s3_endpoint=s3_server
        )
    )
    assert again["this_run_units"] == 0 and again["rows"] == 45 and again["duplicate_rows"] == 0


@pytest.mark.ray
def test_output_of_another_bundle_is_not_mixed(ray_session, bundle, tmp_path, phantoms):
    out = tmp_path / "out"
    (out).mkdir()
    (out / "run.json").write_text(
        json.dumps({"bundle_id": "other", "input": str(phantoms), "threshold": 0.5})
    )
    with pytest.raises(ValueError, match="--overwrite"):
        score(ScoreConfig(bundle=str(bundle), input=str(phantoms), output=str(out)))


@pytest.mark.slow
def test_resume_after_killed_run_scores_only_the_rest(bundle, tmp_path):
    """Kill a real `raytumor score` process mid-run (SIGKILL, whole process group), rerun the same command."""
    from raytumor.phantoms import write_phantom_dataset

    src = tmp_path / "in"
    write_phantom_dataset(src, n_per_class=300, size=128, seed=1)
    (src / "SYNTHETIC_README.txt").unlink()  # 600 images, no error row
    out = tmp_path / "out"
    cmd = [
        sys.executable, "-m", "raytumor.cli", "score", "--bundle", str(bundle), "--input", str(src),
        "--output", str(out), "--units-per-block", "16",
    ]  # fmt: skip
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "disabled",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAYTUMOR_DASHBOARD": "0",
    }
    proc = subprocess.Popen(
        cmd, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    parts = out / "scores"
    deadline = time.time() + 240
    try:
        while time.time() < deadline and proc.poll() is None:
            if parts.is_dir() and len(list(parts.glob("*.parquet"))) >= 3:
                break
            time.sleep(0.2)
        assert proc.poll() is None, "the run finished before it could be killed"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    first = read_scores(str(out), columns=["path"], skip_unreadable=True)
    assert 0 < len(first) < 600
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "already scored" in done.stdout
    df = read_scores(str(out))
    assert len(df) == 600 and df["path"].is_unique and df["error"].isna().all()
    summary = json.loads((out / "summary.json").read_text())
    assert (
        summary["resumed_from"] >= len(first) and summary["this_run_units"] == 600 - summary["resumed_from"]
    )


def test_predictor_applies_the_bundles_temperature_and_threshold(bundle, phantoms, tmp_path):
    """In-process (no Ray): labels follow the stored operating threshold, probabilities its temperature."""
    from raytumor.bundle import read_meta
    from raytumor.score.actors import ScorePredictor
    from raytumor.score.decode import columns as _columns
    from raytumor.score.decode import decoded_row as _decoded_row

    meta = read_meta(bundle)
    t0 = meta.temperature
    meta.threshold, meta.temperature = 0.9, 2.0
    calibrated = save_bundle(tmp_path / "cal", load_bundle(bundle, device="cpu").model.state_dict(), meta)
    files = sorted((phantoms / "yes").iterdir())[:16] + sorted((phantoms / "no").iterdir())[:16]
    rows = [_decoded_row(str(p), SIZE, p.read_bytes(), None, 0.05) for p in files]
    plain = ScorePredictor(str(bundle), batch_size=8)(_columns(rows)).to_pandas()
    cal = ScorePredictor(str(calibrated), batch_size=8)(_columns(rows)).to_pandas()
    # softmax(z / 2) from softmax(z / t0): the same ranking, probabilities pulled towards 0.5
    from raytumor.calibrate import rescale_probs

    expect = rescale_probs(plain[["prob_no", "prob_yes"]].to_numpy(np.float64), t0, 2.0)[:, 1]
    np.testing.assert_allclose(cal["score"], expect, atol=1e-4)
    assert ((cal["score"] >= 0.9) == (cal["label"] == "yes")).all()
    assert (cal["label"] == "yes").sum() < (plain["label"] == "yes").sum()


def test_adabn_and_flip_tta_rows_record_the_adaptation(ray_session, bundle, phantoms, tmp_path):
    """--adapt adabn --tta flip: a first pass measures BN statistics on the input (saved, reused on
    resume), every row says which adaptation scored it, and the scores are those of the adapted model."""
    from raytumor.adapt import apply_bn_state, flip_tta_probs

    src = tmp_path / "in"
    src.mkdir()
    files = sorted((phantoms / "no").iterdir())[:40]
    for p in files:
        (src / p.name).symlink_to(p)
    out = tmp_path / "out"
    cfg = ScoreConfig(bundle=str(bundle), input=str(src), output=str(out), adapt="adabn", tta="flip")
    s = score(cfg)
    assert s["rows"] == 40 and s["errors"] == 0 and s["adaptation"] == "adabn+tta-flip"
    assert s["adabn"]["images"] == 40
    state = torch.load(out / "adabn_state.pt", weights_only=True)
    assert state["images_seen"] == 40 and state["layers"]
    df = read_scores(str(out)).set_index("path")
    assert (df["adaptation"] == "adabn+tta-flip").all()
    # The rows equal the adapted model + flip TTA applied in-process with the saved statistics.
    loaded = load_bundle(bundle, device="cpu")
    adapted = apply_bn_state(loaded.model, state)
    x = np.stack([_load_gray(p) for p in files])
    t = loaded.meta.temperature
    expect = flip_tta_probs(adapted, x, torch.device("cpu"), temperature=t)[:, 1].numpy()
    got = df.loc[[str(src / p.name) for p in files], "score"].to_numpy()
    np.testing.assert_allclose(got, expect, atol=1e-4)
    plain = forward_probs(loaded.model, x, torch.device("cpu"), t)[:, 1].numpy()
    assert np.abs(plain - expect).max() > 1e-3  # adaptation changed the scores
    # The same output with another adaptation is refused; the same command resumes (nothing new).
    with pytest.raises(ValueError, match="adaptation"):
        score(replace(cfg, adapt="none"))
    again = score(cfg)
    assert again["this_run_units"] == 0 and again["rows"] == 40 and "adabn" not in again


@pytest.mark.ray
def test_score_command_in_a_fresh_process(head_bundle, tmp_path):
    """`raytumor score` as a user runs it: a new process with no Ray yet (it starts its own session), Ray's
    default token auth (RAY_AUTH_MODE unset), and a log without a single warning (issue 14)."""
    from tests.conftest import log_warnings, run_env

    src = tmp_path / "in"
    src.mkdir()
    for p in list(head_bundle.eval["path"])[:40]:  # two blocks: two actors
        (src / Path(p).name).write_bytes(Path(p).read_bytes())
    out = tmp_path / "out"
    env = run_env(tmp_path / "ray", HOME=str(tmp_path / "home"))  # Ray keeps its token in ~/.ray
    env.pop("RAY_AUTH_MODE")
    r = subprocess.run(
        [str(Path(sys.executable).parent / "raytumor"), "score", "--bundle", str(head_bundle.bundle),
         "--input", str(src), "--output", str(out)],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-6000:]
    assert "[score] 40 rows:" in r.stdout
    assert len(read_scores(str(out))) == 40
    warned = log_warnings(log)
    assert not warned, "\n".join(warned)
    assert (tmp_path / "home" / ".ray" / "auth_token").is_file()  # token auth stayed on
