"""``raytumor report``: one real bundle (ImageNet EfficientNet-Lite0 + a head fitted on navoneel-253 features),
one Ray-backed report build shared by the module, then checks of the page, report.json and a Chromium render."""

from __future__ import annotations

import hashlib
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from raytumor import report

REPO = Path(__file__).resolve().parents[1]
SIZE = 96
GALLERY = 4
TARGET = 0.95
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _decode_navoneel(root: Path) -> pd.DataFrame:
    from raytumor import split
    from raytumor.formats import decode_image, fit_square

    rows = []
    for p in sorted(root.glob("*/*")):
        if p.parent.name not in ("yes", "no") or not p.is_file():
            continue
        data = p.read_bytes()
        pixels = decode_image(data, draft_size=SIZE).pixels
        rows.append(
            {
                "path": str(p),
                "label": p.parent.name,
                "sha256": hashlib.sha256(data).hexdigest(),
                "image": fit_square(pixels, SIZE),
                **split.fingerprint(pixels),
            }
        )
    return pd.DataFrame(rows)


def _build_bundle(root: Path, work: Path) -> tuple[Path, Path]:
    """A real bundle without Ray training: frozen ImageNet features, head fitted with Adam on ~half the files
    (whole sha256 groups, so exact duplicates never straddle the halves); the other half is the manifest."""
    from raytumor.bundle import BundleMeta, save_bundle
    from raytumor.model import create_model, normalization

    df = _decode_navoneel(root)
    # Alternate whole sha256 groups per class between the halves (sha order is content-random).
    half = {}
    for _, g in df.groupby("label"):
        for i, sha in enumerate(sorted(g["sha256"].unique())):
            half[sha] = "train" if i % 2 == 0 else "eval"
    df["split"] = df["sha256"].map(half)
    train, ev = df[df["split"] == "train"], df[df["split"] == "eval"]

    torch.manual_seed(0)
    model = create_model("efficientnet_lite0", 2, weights="imagenet", dropout=0.0).eval()
    with torch.no_grad():
        feats = model.forward_features(torch.from_numpy(np.stack(train["image"].to_numpy())))
    y = torch.tensor((train["label"] == "yes").to_numpy(), dtype=torch.int64)
    head = model.head[-1]
    opt = torch.optim.Adam(head.parameters(), lr=3e-3, weight_decay=1e-3)
    for _ in range(300):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(head(feats), y).backward()
        opt.step()

    mean, std = normalization("efficientnet_lite0")
    counts = {"train": train["label"].value_counts().to_dict(), "test": ev["label"].value_counts().to_dict()}
    # Fake but plausible per-epoch history (the head above was fitted in one go, not per epoch): the report
    # only plots what a real run's history.csv carries (train.py's metric names).
    history = pd.DataFrame(
        {
            "epoch": range(5),
            "train_loss": [0.66, 0.52, 0.44, 0.40, 0.37],
            "val_loss": [0.61, 0.50, 0.46, 0.45, 0.47],
            "val_roc_auc": [0.74, 0.82, 0.86, 0.87, 0.86],
            "val_accuracy": [0.66, 0.74, 0.78, 0.80, 0.79],
            "frozen_backbone": [True, True, False, False, False],
        }
    )
    meta = BundleMeta(
        backbone="efficientnet_lite0",
        classes=["no", "yes"],
        negative_class="no",
        image_size=SIZE,
        mean=list(mean),
        std=list(std),
        threshold=0.5,  # stands in for a validation-chosen operating threshold
        temperature=1.5,  # stands in for a fitted temperature (so the report shows before/after)
        metrics={"val": {"val_roc_auc": 0.87, "val_accuracy": 0.80, "val_n": 40}, "best_epoch": 3},
        train_config={"epochs": 5, "batch_size": 32, "seed": 0, "image_size": SIZE},
        data={
            "source": str(root),
            "split_counts": counts,
            "duplicate_groups": int((df["sha256"].value_counts() > 1).sum()),
        },
    )
    fp_cols = ["path", "sha256", "dhash", "thumb", "dhash_crop", "thumb_crop"]
    bundle = save_bundle(work / "bundle", model.state_dict(), meta, train[fp_cols], history)
    manifest = work / "eval.csv"
    ev[["path", "label"]].to_csv(manifest, index=False)
    return bundle, manifest


@pytest.fixture(scope="module")
def built(ray_session, navoneel, tmp_path_factory):
    work = tmp_path_factory.mktemp("report")
    bundle, manifest = _build_bundle(navoneel, work)
    out = work / "out"
    rep = report.build_report(
        bundle, str(manifest), out, target_sensitivity=TARGET, n_boot=300, gallery=GALLERY, seed=0
    )
    return {
        "rep": rep,
        "out": out,
        "bundle": bundle,
        "html": (out / "report.html").read_text(encoding="utf-8"),
        "json": json.loads((out / "report.json").read_text()),
        "metrics": json.loads((out / "metrics.json").read_text()),
        "preds": pd.read_parquet(out / "predictions.parquet"),
    }


def _is_png(path: Path) -> bool:
    data = path.read_bytes()
    if not data.startswith(PNG_MAGIC):
        return False
    with Image.open(io.BytesIO(data)) as im:
        im.verify()
    return True


# ----------------------------------------------------------------------------------------------------------
# Without Ray


def test_curves_match_hand_computation():
    y = np.array([0, 0, 1, 1, 0, 1, 1, 0])
    s = np.array([0.1, 0.4, 0.35, 0.8, 0.4, 0.9, 0.4, 0.2])
    pos, neg = s[y == 1], s[y == 0]
    auc = np.mean([(p > q) + 0.5 * (p == q) for p in pos for q in neg])
    roc = report.roc_curve(y, s)
    assert np.trapezoid(roc["tpr"], roc["fpr"]) == pytest.approx(auc)
    # AP by hand: thresholds 0.9 (P 1, R .25), 0.8 (1, .5), 0.4 (3/5, .75), 0.35 (4/6, 1)
    assert report.average_precision(y, s) == pytest.approx(0.25 + 0.25 + 0.25 * 3 / 5 + 0.25 * 4 / 6)
    lo, hi = report.bootstrap_ap(y, s, 200, 0)
    assert lo <= hi and report.bootstrap_ap(y, s, 200, 0) == [lo, hi]


def test_args_parser_defaults():
    a = report.get_args_parser().parse_args(["--bundle", "b", "--data", "d", "--out", "o"])
    assert (a.target_sensitivity, a.n_boot, a.gallery, a.seed, a.keep_duplicates) == (0.95, 1000, 6, 0, False)
    assert a.s3_endpoint is None


def test_show_by_source_rule():
    assert not report.show_by_source("/d/folder", {"/d/folder": {}})  # would repeat the pooled numbers
    assert not report.show_by_source(["m.csv"], {"m.csv": {}})
    assert report.show_by_source("m.csv", {"IXI T1": {}})  # keys from the manifest's source column
    assert report.show_by_source(["a/", "b/"], {"a/": {}, "b/": {}})
    assert report.show_by_source(["a/", "b/"], {"a/": {}})  # one of two sources fully excluded
    assert not report.show_by_source("a/", None)


def test_by_source_section_from_metrics(tmp_path, monkeypatch):
    """The page's by-source table shows metrics.json's ``by_source`` numbers (Ray-free: a stand-in for
    ``evaluate_source`` writes the two files it would)."""
    from raytumor import evaluate
    from raytumor.bundle import BundleMeta, save_bundle

    meta = BundleMeta(backbone="tiny", classes=["no", "yes"], negative_class="no", image_size=32,
                      mean=[0.5], std=[0.25], threshold=0.5)  # fmt: skip
    bundle = save_bundle(tmp_path / "bundle", {}, meta)
    rng = np.random.default_rng(0)
    ys = np.r_[np.repeat([0, 1], 20), np.zeros(12, int)]
    score = np.clip(0.3 + 0.4 * ys + rng.normal(0, 0.2, 52), 0, 1).astype(np.float32)
    src = ["/data/site_a"] * 40 + ["IXI T1"] * 12
    preds = pd.DataFrame({"path": [f"/x/{i:03d}.png" for i in range(52)], "label": ys, "source": src,
                          "patient_id": [None] * 40 + [f"IXI{i // 3}" for i in range(12)],
                          "prob_no": 1 - score, "prob_yes": score, "score": score})  # fmt: skip
    data = ["/data/site_a", "/data/ixi.csv"]

    def fake_evaluate_source(bundle_dir, data_, out_dir, **kw):
        out = Path(out_dir)
        preds.to_parquet(out / "predictions.parquet", index=False)
        res = {
            "data": data_,
            "source_pattern": None,
            "metrics": evaluate.metrics_with_ci(preds, ["no", "yes"], "no", 0.5, kw["n_boot"], kw["seed"]),
            "by_source": evaluate.per_source_metrics(
                preds, ["no", "yes"], "no", 0.5, kw["n_boot"], kw["seed"]
            ),
            "files": {"files_listed": 52, "evaluated": 52, "excluded_duplicates_of_training": 0},
            "rejected_files": [],
            "excluded_files": [],
        }
        (out / "metrics.json").write_text(json.dumps(res, default=str))
        return res

    monkeypatch.setattr(evaluate, "evaluate_source", fake_evaluate_source)
    rep = report.build_report(bundle, data, tmp_path / "out", n_boot=100, gallery=0)
    page = (tmp_path / "out" / "report.html").read_text(encoding="utf-8")
    by = json.loads((tmp_path / "out" / "metrics.json").read_text())["by_source"]
    assert json.loads((tmp_path / "out" / "report.json").read_text())["by_source"] == by == rep["by_source"]
    assert 'id="by-source"' in page and "By source" in page
    ixi, site = by["IXI T1"], by["/data/site_a"]
    assert ixi["n"] == 12 and ixi["sensitivity"] is None and ixi["ci95_resampling"] == "patients"
    fp = int((score[40:] >= 0.5).sum())
    assert ixi["specificity"] == pytest.approx(1 - fp / 12) and ixi["false_positives"] == fp
    section = page[page.index('id="by-source"') :]
    section = section[: section.index("</section>")]
    # source, n, positives, AUC, its CI, sensitivity, its CI, specificity, ...
    assert (
        f"<td>IXI T1</td><td>12</td><td>0</td><td>\u2014</td><td></td><td>\u2014</td><td></td>"
        f"<td>{report._fmt(ixi['specificity'])}</td><td>{report._ci(ixi['ci95']['specificity'])}</td>"
        f"<td>{report._fmt(ixi['fp_rate'])}</td><td>{report._fmt(0.5)}</td>"
    ) in section
    for v in (site["roc_auc"], site["sensitivity"], site["specificity"]):
        assert f"<td>{report._fmt(v)}</td>" in section
    assert f"<td>{report._ci(site['ci95']['roc_auc'])}</td>" in section
    assert "/data/site_a + /data/ixi.csv" in page  # the summary names both data arguments
    # one folder alone: no by-source section (its one row would repeat the pooled numbers)
    preds["source"] = "/data/site_a"
    rep = report.build_report(bundle, "/data/site_a", tmp_path / "one", n_boot=50, gallery=0)
    assert rep["by_source"] is None and 'id="by-source"' not in (tmp_path / "one" / "report.html").read_text()


# ----------------------------------------------------------------------------------------------------------
# One real report


@pytest.mark.ray
def test_files_written_and_valid(built):
    out, rep = built["out"], built["json"]
    assert (out / "report.html").is_file() and (out / "metrics.json").is_file()
    expected = {"roc.png", "pr.png", "confusion.png", "reliability.png", "thresholds.png", "training.png"}
    assert expected <= set(rep["figures"])
    for name in rep["figures"]:
        assert _is_png(out / name), name
    assert built["rep"]["outputs"]["html"] == str(out / "report.html")


@pytest.mark.ray
def test_numbers_agree_with_metrics_json(built):
    rep, m, html = built["json"], built["metrics"]["metrics"], built["html"]
    assert rep["metrics"] == m  # the report carries metrics.json's dict unchanged
    assert rep["n"] == m["n"] == len(built["preds"]) == built["metrics"]["files"]["evaluated"]
    assert rep["curves"]["roc_auc"] == m["roc_auc"]
    assert rep["curves"]["roc_auc_ci95"] == m["ci95"]["roc_auc"]
    (tn, fp), (fn, tp) = m["confusion_matrix"]
    assert tn + fp + fn + tp == m["n"]
    yes = next(r for r in rep["per_class"] if r["class"] == "yes")
    no = next(r for r in rep["per_class"] if r["class"] == "no")
    assert yes["sensitivity"] == pytest.approx(m["sensitivity"]) and yes["ppv"] == pytest.approx(m["ppv"])
    assert no["sensitivity"] == pytest.approx(m["specificity"])
    assert [yes["tp"], yes["fn"], yes["fp"], yes["tn"]] == [tp, fn, fp, tn]
    ta = rep["threshold_analysis"]["at_bundle_threshold"]
    assert (ta["sensitivity"], ta["specificity"]) == (
        pytest.approx(m["sensitivity"]),
        pytest.approx(m["specificity"]),
    )
    # the page shows these numbers in its one format
    for v in (m["roc_auc"], m["sensitivity"], m["specificity"], m["f1"], *m["ci95"]["roc_auc"]):
        assert report._fmt(v) in html
    assert report._fmt(rep["curves"]["average_precision"]) in html
    for v in (tn, fp, fn, tp, m["n"]):
        assert f"<td>{v}</td>" in html
    f = built["metrics"]["files"]
    assert f"<td>{f['excluded_duplicates_of_training']}</td>" in html
    assert rep["files"]["excluded_duplicates_of_training"] == f["excluded_duplicates_of_training"]


@pytest.mark.ray
def test_target_sensitivity_threshold_reaches_target(built):
    from raytumor.evaluate import tumour_binary

    p = built["preds"]
    probs = p[["prob_no", "prob_yes"]].to_numpy(dtype=np.float32)
    y, s = tumour_binary(p["label"].to_numpy(), probs, ["no", "yes"], "no")
    ta = built["json"]["threshold_analysis"]
    thr = ta["search"]["threshold"]
    assert (s[y == 1] >= thr).mean() >= TARGET
    assert ta["at_target_threshold"]["sensitivity"] == pytest.approx((s[y == 1] >= thr).mean())
    assert ta["at_target_threshold"]["specificity"] == pytest.approx((s[y == 0] < thr).mean())
    assert report._fmt(thr) in built["html"]


@pytest.mark.ray
def test_calibration_before_after(built):
    from raytumor import calibrate

    cal = built["json"]["calibration"]
    assert cal["temperature"] == 1.5 and cal["calibrated"]
    p = built["preds"]
    probs = p[["prob_no", "prob_yes"]].to_numpy(dtype=np.float64)
    labels = p["label"].to_numpy()
    before = calibrate.rescale_probs(probs, 1.5, 1.0)
    assert cal["ece_before"] == pytest.approx(calibrate.expected_calibration_error(before, labels))
    assert cal["ece_after"] == pytest.approx(calibrate.expected_calibration_error(probs, labels))
    assert report._fmt(cal["ece_before"]) in built["html"] and report._fmt(cal["ece_after"]) in built["html"]


@pytest.mark.ray
def test_gallery_holds_real_errors_sorted_by_confidence(built):
    gal, out, html = built["json"]["gallery"], built["out"], built["html"]
    thr = built["json"]["bundle"]["threshold"]
    assert gal["false_negatives"] or gal["false_positives"], "the quick model should make some errors"
    for kind, true, pred in (("false_negatives", 1, 0), ("false_positives", 0, 1)):
        items = gal[kind]
        assert len(items) <= GALLERY
        conf = [it["confidence"] for it in items]
        assert conf == sorted(conf, reverse=True)
        for it in items:
            assert (it["label"], it["pred"]) == (true, pred)
            assert (it["score"] < thr) if kind == "false_negatives" else (it["score"] >= thr)
            assert _is_png(out / it["png"]) and it["basename"] in html
        if not items:
            assert "none" in html
    # every FN not shown is less confident than the last one shown
    p = built["preds"]
    fn = p[(p["label"] == 1) & (p["score"] < thr)]
    if len(gal["false_negatives"]) == GALLERY and len(fn) > GALLERY:
        assert np.sort(fn["score"].to_numpy())[GALLERY] >= gal["false_negatives"][-1]["score"] - 1e-6


@pytest.mark.ray
def test_page_is_self_contained_with_banner(built):
    html = built["html"]
    assert "http://" not in html and "https://" not in html
    refs = re.findall(r"""(?:src|href)\s*=\s*["']([^"']*)""", html)
    assert refs and all(r.startswith("data:image/png;base64,") or r.startswith("#") for r in refs)
    assert "Research use only" in html and "not a medical device" in html
    for section in ("ROC", "Confusion matrix", "Calibration", "Threshold analysis", "Training curves",
                    "Data splits and duplicates", "Grad-CAM gallery", "Model card", "Known limits"):  # fmt: skip
        assert section in html, section


@pytest.mark.ray
def test_chromium_screenshot(built, tmp_path):
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import render_report
    finally:
        sys.path.remove(str(REPO / "bench"))
    if render_report.find_chromium() is None:
        pytest.skip("no Chromium at /usr/bin/chromium (apt-get install chromium) to render the page")
    png = built["out"] / "report_screenshot.png"
    res = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench" / "render_report.py"),
            str(built["out"] / "report.html"),
            str(png),
        ],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert res.returncode == 0, res.stderr
    assert _is_png(png)
    with Image.open(png) as im:
        a = np.asarray(im.convert("L"), dtype=np.float32)
    assert a.shape[1] >= 1000 and a.std() > 10  # not a blank page


@pytest.fixture(scope="module")
def ixi() -> Path:
    path = REPO.parent / "shared" / "data" / "ixi-t1-nichart-42"  # as conftest.shared_dataset
    if not (path / "manifest.csv").is_file():
        pytest.skip(f"real data {path} is absent (expected ../shared/data/ixi-t1-nichart-42 beside the repo)")
    return path


@pytest.mark.ray
def test_two_sources_by_source(ixi, built, tmp_path):
    """One evaluation of two sources: a labelled folder (navoneel files the bundle did not train on) and
    20 IXI healthy slices (10 patients, label ``no_tumor``), the bundle's classes being no/yes."""
    import html as html_mod
    import shutil

    rows = pd.read_csv(ixi / "manifest.csv", dtype=str)
    rows = rows[rows["path"].str.endswith(".png")]
    rows = (
        rows[rows["patient_id"].isin(sorted(rows["patient_id"].unique())[:10])].groupby("patient_id").head(2)
    )
    rows = rows.assign(path=[str(ixi / p) for p in rows["path"]])
    assert len(rows) == 20
    manifest = tmp_path / "ixi20.csv"
    rows.to_csv(manifest, index=False)
    folder = tmp_path / "site"
    ev = built["preds"].sort_values("path")
    for label, name in ((0, "no"), (1, "yes")):
        (folder / name).mkdir(parents=True)
        for p in ev.loc[ev["label"] == label, "path"].head(5):
            shutil.copy(p, folder / name / Path(p).name)

    out = tmp_path / "out"
    report.build_report(
        built["bundle"], [str(folder), str(manifest)], out, n_boot=200, gallery=0, exclude_duplicates=False
    )
    res = json.loads((out / "metrics.json").read_text())
    preds = pd.read_parquet(out / "predictions.parquet")
    key = "IXI T1 (2mm, uint8 downsampled)"
    by = res["by_source"]
    assert set(by) == {str(folder), key}
    assert res["files"]["class_aliases"] == {"no_tumor": "no"}
    assert res["metrics"]["n"] == len(preds) == 30 == sum(m["n"] for m in by.values())
    ix = preds[preds["source"] == key]
    assert len(ix) == 20 and (ix["label"] == 0).all()  # no_tumor -> the bundle's "no"
    m = by[key]
    assert (m["n"], m["positives"], m["sensitivity"], m["roc_auc"]) == (20, 0, None, None)
    called_negative = float((ix["pred"] == 0).mean())
    assert m["specificity"] == pytest.approx(called_negative)
    assert m["false_positives"] == int((ix["pred"] == 1).sum())
    assert m["ci95_resampling"] == "patients" and by[str(folder)]["ci95_resampling"] == "scans"
    site = by[str(folder)]
    assert (site["n"], site["positives"]) == (10, 5) and site["roc_auc"] is not None

    rep = json.loads((out / "report.json").read_text())
    assert rep["by_source"] == by
    page = (out / "report.html").read_text(encoding="utf-8")
    section = page[page.index('id="by-source"') :]
    section = section[: section.index("</section>")]
    assert f"<td>{html_mod.escape(key)}</td><td>20</td><td>0</td><td>\u2014</td>" in section
    assert (
        f"<td>{report._fmt(m['specificity'])}</td><td>{report._ci(m['ci95']['specificity'])}</td>" in section
    )
    assert (
        f"<td>{html_mod.escape(str(folder))}</td><td>10</td><td>5</td><td>{report._fmt(site['roc_auc'])}</td>"
        in (section)
    )
