"""``raytumor report``: one real bundle (ImageNet EfficientNet-Lite0 + a head fitted on SYNTHETIC phantom
features, conftest.head_bundle), one Ray-backed report build shared by the module, then checks of the page,
report.json and a Chromium render. The checks are of the report's own consistency, which holds on any images,
so they need no ../shared/data."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from raytumor import metrics, report

REPO = Path(__file__).resolve().parents[1]
GALLERY = 4
TARGET = 0.95
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def built(ray_session, head_bundle, tmp_path_factory):
    """The report of the session's head-fitted bundle on its held-out half (a manifest)."""
    out = tmp_path_factory.mktemp("report") / "out"
    rep = report.build_report(
        head_bundle.bundle,
        str(head_bundle.manifest),
        out,
        target_sensitivity=TARGET,
        n_boot=300,
        gallery=GALLERY,
        seed=0,
    )
    return {
        "rep": rep,
        "out": out,
        "bundle": head_bundle.bundle,
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
    roc = metrics.roc_curve(y, s)
    assert np.trapezoid(roc["tpr"], roc["fpr"]) == pytest.approx(auc)
    # AP by hand: thresholds 0.9 (P 1, R .25), 0.8 (1, .5), 0.4 (3/5, .75), 0.35 (4/6, 1)
    assert metrics.average_precision(y, s) == pytest.approx(0.25 + 0.25 + 0.25 * 3 / 5 + 0.25 * 4 / 6)
    lo, hi = _bootstrap_ap(y, s, 200, 0)
    assert lo <= hi and _bootstrap_ap(y, s, 200, 0) == [lo, hi]


def _bootstrap_ap(y: np.ndarray, s: np.ndarray, n_boot: int, seed: int) -> list[float | None]:
    """The AP interval of metrics.bootstrap_ci (the report's old bootstrap_ap is gone)."""
    probs = np.c_[1 - s, s]
    return metrics.bootstrap_ci(y, probs, ["no", "yes"], "no", 0.5, n_boot, seed)["average_precision"]


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
        f"<td>{report.fmt(ixi['specificity'])}</td><td>{report.fmt_ci(ixi['ci95']['specificity'])}</td>"
        f"<td>{report.fmt(ixi['fp_rate'])}</td><td>{report.fmt(0.5)}</td>"
    ) in section
    for v in (site["roc_auc"], site["sensitivity"], site["specificity"]):
        assert f"<td>{report.fmt(v)}</td>" in section
    assert f"<td>{report.fmt_ci(site['ci95']['roc_auc'])}</td>" in section
    assert "/data/site_a + /data/ixi.csv" in page  # the summary names both data arguments
    # one folder alone: no by-source section (its one row would repeat the pooled numbers)
    preds["source"] = "/data/site_a"
    rep = report.build_report(bundle, "/data/site_a", tmp_path / "one", n_boot=50, gallery=0)
    assert rep["by_source"] is None and 'id="by-source"' not in (tmp_path / "one" / "report.html").read_text()


# ----------------------------------------------------------------------------------------------------------
# Report fixes, Ray-free: a tiny bundle (no weights: gallery=0 never loads the model) and evaluation rows
# given by hand, or a score output written by hand and read by the real evaluate_scores.


def _tiny_bundle(path: Path, **meta_kw) -> Path:
    from raytumor.bundle import BundleMeta, save_bundle

    kw = dict(backbone="tiny", classes=["no", "yes"], negative_class="no", image_size=32, mean=[0.5],
              std=[0.25], threshold=0.5)  # fmt: skip
    return save_bundle(path, {}, BundleMeta(**{**kw, **meta_kw}))


def _fake_evaluation(monkeypatch, preds: pd.DataFrame) -> None:
    """``evaluate.evaluate_source`` replaced by one that writes ``preds`` and their metrics (as it would)."""
    from raytumor import evaluate

    def fake_evaluate_source(bundle_dir, data_, out_dir, **kw):
        out = Path(out_dir)
        preds.to_parquet(out / "predictions.parquet", index=False)
        m = metrics.metrics_with_ci(preds, ["no", "yes"], "no", 0.5, kw["n_boot"], kw["seed"])
        res = {"data": data_, "source_pattern": None, "metrics": m, "by_source": None, "rejected_files": [],
               "files": {"files_listed": len(preds), "files_decoded": len(preds), "files_rejected": 0,
                         "excluded_duplicates_of_training": 0, "evaluated": len(preds)},
               "excluded_files": []}  # fmt: skip
        (out / "metrics.json").write_text(json.dumps(res, default=str))
        return res

    monkeypatch.setattr(evaluate, "evaluate_source", fake_evaluate_source)


def _preds(n_patients: int = 0, n: int = 60, seed: int = 0) -> pd.DataFrame:
    """Binary prediction rows; with ``n_patients``, consecutive rows are scans of one patient with one
    label and nearly one score (correlated evidence, as slices of one head are)."""
    rng = np.random.default_rng(seed)
    if n_patients:
        per = n // n_patients
        ys = np.repeat(rng.permutation(np.arange(n_patients) % 2), per)
        base = np.repeat(rng.normal(0, 0.25, n_patients), per)
        score = np.clip(0.3 + 0.35 * ys + base + rng.normal(0, 0.01, len(ys)), 0, 1)
        pid = [f"P{i // per:03d}" for i in range(len(ys))]
    else:
        ys = np.arange(n) % 2
        score, pid = np.clip(0.3 + 0.4 * ys + rng.normal(0, 0.2, n), 0, 1), [None] * n
    score = score.astype(np.float32)
    return pd.DataFrame({"path": [f"/x/{i:03d}.png" for i in range(len(ys))], "label": ys, "source": "/x",
                         "patient_id": pid, "prob_no": 1 - score, "prob_yes": score, "score": score})  # fmt: skip


def _section_of(page: str, sid: str) -> str:
    part = page[page.index(f'id="{sid}"') :]
    return part[: part.index("</section>")]


def test_model_card_shows_the_hyperparameters_the_bundle_was_trained_with(tmp_path, monkeypatch):
    """Old page: "augment" (no such train_config field) so no augmentation at all, and lr with the page's
    3 decimals (0.00154 -> "0.002"); a Tune winner's searched values are the ones shown, and marked."""
    train_config = {"epochs": 6, "batch_size": 16, "lr": 0.001, "backbone_lr": 3e-4, "augment_strength": 0.7,
                    "shift_augment": 0.5, "preprocess": "crop,zscore", "seed": 0, "image_size": 32,
                    "data": ["/somewhere"], "num_workers": 2}  # fmt: skip
    search = {"trial_id": "t0003", "trials": 6, "config": {"lr": 0.00154, "augment_strength": 0.7}}
    bundle = _tiny_bundle(tmp_path / "b", train_config=train_config, metrics={"search": search})
    _fake_evaluation(monkeypatch, _preds())
    rep = report.build_report(bundle, "/x", tmp_path / "out", n_boot=50, gallery=0)
    card = _section_of((tmp_path / "out" / "report.html").read_text(encoding="utf-8"), "model-card")
    assert "<td>lr</td><td>0.00154</td><td>search (trial t0003)</td>" in card
    assert "<td>augment_strength</td><td>0.7</td><td>search (trial t0003)</td>" in card
    assert "<td>shift_augment</td><td>0.5</td><td>train config</td>" in card
    assert "<td>preprocess</td><td>crop,zscore</td>" in card and "<td>backbone_lr</td><td>0.0003</td>" in card
    assert "0.002" not in card and "num_workers" not in card  # operational fields are not hyperparameters
    mc = rep["model_card"]
    assert mc["train_config"]["lr"] == 0.00154 and mc["tuned_by_search"] == ["augment_strength", "lr"]


def test_unfitted_threshold_is_not_called_validation_fitted(tmp_path, monkeypatch):
    """Old page: "bundle (validation)" and "chosen on the validation split" for any bundle, also one whose
    threshold was never fitted (no calibration record), next to a calibration section saying uncalibrated."""
    _fake_evaluation(monkeypatch, _preds())
    rep = report.build_report(_tiny_bundle(tmp_path / "b"), "/x", tmp_path / "out", n_boot=50, gallery=0)
    page = (tmp_path / "out" / "report.html").read_text(encoding="utf-8")
    assert "validation" not in _section_of(page, "threshold") and "validation" not in _section_of(
        page, "summary"
    )
    assert "<td>bundle default (not fitted)</td>" in _section_of(page, "threshold")
    assert "uncalibrated" in page and "operating threshold is the unfitted default" in page
    ta = rep["threshold_analysis"]
    assert not ta["bundle_threshold_fitted"] and "not fitted" in ta["bundle_threshold_source"]
    # The same bundle with a threshold fitted on validation (as raytumor train records it) says so.
    cal = {
        "temperature": 1.0,
        "threshold": 0.5,
        "target_sensitivity": 0.95,
        "reason": None,
        "fitted_on": "val",
    }
    bundle = _tiny_bundle(tmp_path / "fitted", metrics={"calibration": cal})
    rep = report.build_report(bundle, "/x", tmp_path / "out2", n_boot=50, gallery=0)
    section = _section_of((tmp_path / "out2" / "report.html").read_text(encoding="utf-8"), "threshold")
    assert "<td>bundle (validation)</td>" in section and "chosen on the validation split" in section
    assert rep["threshold_analysis"]["bundle_threshold_fitted"]
    # A calibration that found no tumours in validation kept the default: not fitted either.
    bundle = _tiny_bundle(tmp_path / "nopos", metrics={"calibration": {**cal, "reason": "no positive cases"}})
    rep = report.build_report(bundle, "/x", tmp_path / "out3", n_boot=50, gallery=0)
    assert not rep["threshold_analysis"]["bundle_threshold_fitted"]
    assert "no positive cases" in rep["threshold_analysis"]["bundle_threshold_source"]


def test_ap_interval_is_metrics_group_aware_one(tmp_path, monkeypatch):
    """The AP interval is metrics.json's cluster bootstrap (whole patients), not a scan-level one: old
    report.json had a scan bootstrap of its own (metrics.json had no AP interval), too narrow here."""
    preds = _preds(n_patients=12, n=96)
    _fake_evaluation(monkeypatch, preds)
    rep = report.build_report(_tiny_bundle(tmp_path / "b"), "/x", tmp_path / "out", n_boot=300, gallery=0)
    m = json.loads((tmp_path / "out" / "metrics.json").read_text())["metrics"]
    c = rep["curves"]
    assert m["ci95_resampling"] == "patients" and c["ci95_resampling"] == "patients"
    assert c["average_precision"] == m["average_precision"] is not None
    assert (
        c["average_precision_ci95"] == m["ci95"]["average_precision"]
        and None not in c["average_precision_ci95"]
    )
    probs = preds[["prob_no", "prob_yes"]].to_numpy(np.float32)
    scans = metrics.bootstrap_ci(preds["label"].to_numpy(), probs, ["no", "yes"], "no", 0.5, 300, 0)
    width = np.diff(c["average_precision_ci95"])[0]
    assert width > np.diff(scans["average_precision"])[0]  # 12 patients are not 96 independent scans
    page = (tmp_path / "out" / "report.html").read_text(encoding="utf-8")
    assert f"<td>{report.fmt_ci(c['average_precision_ci95'])}</td>" in _section_of(page, "curves")


@pytest.fixture()
def score_output(tmp_path) -> dict:
    """A hand-written `raytumor score` output of 12 labelled files (a manifest) plus one unlisted file:
    one labelled file and the unlisted one are error rows."""
    bundle = _tiny_bundle(tmp_path / "bundle")
    bundle_id = json.loads((bundle / "bundle.json").read_text())["bundle_id"]
    rng = np.random.default_rng(1)
    ys = np.r_[np.zeros(5, int), np.ones(7, int)]
    s = np.clip(0.3 + 0.4 * ys + rng.normal(0, 0.15, 12), 0, 1).astype(np.float32)
    paths = [str(tmp_path / f"f{i:02d}.png") for i in range(12)] + [str(tmp_path / "junk.bin")]
    err: list[str | None] = [None] * 13
    err[7], err[12] = "not an image", "unreadable"  # f07 is a labelled tumour scan
    s = np.r_[s, np.nan].astype(np.float32)
    s[[7, 12]] = np.nan
    rows = pd.DataFrame({"path": paths, "prob_no": 1 - s, "prob_yes": s, "score": s,
                         "label": [None if e else ("yes" if v >= 0.5 else "no") for v, e in zip(s, err, strict=True)],
                         "kind": [None if e else "image" for e in err], "adaptation": "none",
                         "bundle_id": bundle_id, "error": err})  # fmt: skip
    (tmp_path / "scores" / "scores").mkdir(parents=True)
    rows.to_parquet(tmp_path / "scores" / "scores" / "part-00000.parquet", index=False)
    truth = pd.DataFrame({"path": paths[:12], "label": np.where(ys == 1, "yes", "no")})
    truth.to_csv(tmp_path / "truth.csv", index=False)
    out = tmp_path / "out"
    rep = report.build_report(
        bundle, str(tmp_path / "truth.csv"), out, n_boot=50, gallery=0, scores=str(tmp_path / "scores")
    )
    return {"rep": rep, "page": (out / "report.html").read_text(encoding="utf-8"), "ys": ys}


def test_score_output_counts_are_of_the_evaluated_rows(score_output):
    """Old page: "decoded, class no/yes 0/0" (a score output decodes nothing here) beside the evaluated
    counts, "scans evaluated 12" beside n = 11, and the per-class table counted the error row as a
    no-tumour prediction (a false negative the confusion matrix does not have)."""
    rep, page = score_output["rep"], score_output["page"]
    assert rep["n"] == rep["metrics"]["n"] == 11
    assert rep["evaluated_per_class"] == {"no": 5, "yes": 6}
    assert [r["n"] for r in rep["per_class"]] == [5, 6]
    (tn, fp), (fn, tp) = rep["metrics"]["confusion_matrix"]
    yes = rep["per_class"][1]
    assert [yes["tp"], yes["fn"], yes["fp"], yes["tn"]] == [tp, fn, fp, tn]
    data = _section_of(page, "splits")
    assert "decoded" not in data
    assert "<th>scans evaluated</th><td>11</td>" in data
    assert (
        "<th>evaluated, class no</th><td>5</td>" in data and "<th>evaluated, class yes</th><td>6</td>" in data
    )


def test_score_output_error_rows_counted(score_output):
    """Old page: one "score error rows" figure, the labelled files' only (0 when the broken file is one the
    labels do not name); the output's own error rows are counted too, and the labelled one apart."""
    rep, page = score_output["rep"], score_output["page"]
    so = rep["score_output"]
    assert (so["error_rows"], so["error_rows_labelled"], so["rows_of_unlisted_files"]) == (2, 1, 1)
    assert rep["files"]["score_errors"] == 1
    for sid in ("summary", "splits"):
        section = _section_of(page, sid)
        assert "<th>error rows in the score output (all files)</th><td>2</td>" in section
        assert "<th>labelled files with an error row (not evaluated)</th><td>1</td>" in section


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
        assert report.fmt(v) in html
    assert report.fmt(rep["curves"]["average_precision"]) in html
    for v in (tn, fp, fn, tp, m["n"]):
        assert f"<td>{v}</td>" in html
    f = built["metrics"]["files"]
    assert f"<td>{f['excluded_duplicates_of_training']}</td>" in html
    assert rep["files"]["excluded_duplicates_of_training"] == f["excluded_duplicates_of_training"]


@pytest.mark.ray
def test_target_sensitivity_threshold_reaches_target(built):
    from raytumor.metrics import tumour_binary

    p = built["preds"]
    probs = p[["prob_no", "prob_yes"]].to_numpy(dtype=np.float32)
    y, s = tumour_binary(p["label"].to_numpy(), probs, ["no", "yes"], "no")
    ta = built["json"]["threshold_analysis"]
    thr = ta["search"]["threshold"]
    assert (s[y == 1] >= thr).mean() >= TARGET
    assert ta["at_target_threshold"]["sensitivity"] == pytest.approx((s[y == 1] >= thr).mean())
    assert ta["at_target_threshold"]["specificity"] == pytest.approx((s[y == 0] < thr).mean())
    assert report.fmt(thr) in built["html"]


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
    assert report.fmt(cal["ece_before"]) in built["html"] and report.fmt(cal["ece_after"]) in built["html"]


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
def healthy_manifest(tmp_path_factory) -> tuple[Path, str]:
    """(manifest, source key): 20 SYNTHETIC tumour-free slices of 10 "patients", label ``no_tumor``, with the
    columns of a real dataset manifest (path, label, patient_id, source "NAME via provenance")."""
    from raytumor.phantoms import make_phantom

    root = tmp_path_factory.mktemp("healthy")
    rng = np.random.default_rng(7)
    rows = []
    for i in range(20):
        path = root / "no_tumor" / f"P{i // 2:02d}_ax{i % 2}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(make_phantom(rng, size=128)).save(path)
        rows.append(
            (str(path), "no_tumor", f"P{i // 2:02d}", "SYNTHETIC T1 (phantom) via raytumor.phantoms seed 7")
        )
    manifest = root / "healthy20.csv"
    pd.DataFrame(rows, columns=["path", "label", "patient_id", "source"]).to_csv(manifest, index=False)
    return manifest, "SYNTHETIC T1 (phantom)"


@pytest.mark.ray
def test_two_sources_by_source(healthy_manifest, built, tmp_path):
    """One evaluation of two sources: a labelled folder (files the bundle did not train on) and a manifest
    of 20 healthy slices (10 patients, label ``no_tumor``), the bundle's classes being no/yes."""
    import html as html_mod
    import shutil

    manifest, key = healthy_manifest
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
    # Each source's interval resamples its own clusters (groups.cluster_ids): the manifest's patients, which
    # the folder has none of (duplicate groups are clusters too when evaluation carries them).
    from raytumor.groups import cluster_ids

    for source_key, rows in preds.groupby("source"):
        assert by[source_key]["ci95_resampling"] == cluster_ids(rows)[1]
    assert m["ci95_resampling"].endswith("patients") and "patients" not in by[str(folder)]["ci95_resampling"]
    site = by[str(folder)]
    assert (site["n"], site["positives"]) == (10, 5) and site["roc_auc"] is not None

    rep = json.loads((out / "report.json").read_text())
    assert rep["by_source"] == by
    page = (out / "report.html").read_text(encoding="utf-8")
    section = page[page.index('id="by-source"') :]
    section = section[: section.index("</section>")]
    assert f"<td>{html_mod.escape(key)}</td><td>20</td><td>0</td><td>\u2014</td>" in section
    assert (
        f"<td>{report.fmt(m['specificity'])}</td><td>{report.fmt_ci(m['ci95']['specificity'])}</td>"
        in section
    )
    assert (
        f"<td>{html_mod.escape(str(folder))}</td><td>10</td><td>5</td><td>{report.fmt(site['roc_auc'])}</td>"
        in (section)
    )


# ----------------------------------------------------------------------------------------------------------
# Scope and Grad-CAM localisation sections, Ray-free: a hand-written score output of the head-fitted bundle
# (real model: gallery, thumbnails and pointing game run) on SYNTHETIC phantoms with lesion masks


@pytest.fixture(scope="module")
def scoped_report(head_bundle, tmp_path_factory) -> dict:
    """24 phantoms (12 with a tumour and its lesion mask) in a manifest with sequence and mask columns, and
    a score output in which 5 are refused: 4 sagittal (3 healthy, called tumour) and 1 out of distribution."""
    from raytumor.phantoms import make_phantom

    root = tmp_path_factory.mktemp("scoped")
    (root / "img").mkdir()
    (root / "masks").mkdir()
    bundle_id = json.loads((head_bundle.bundle / "bundle.json").read_text())["bundle_id"]
    rng = np.random.default_rng(5)
    truth, scores = [], []
    for i in range(24):
        tumour = i % 2 == 1
        img, mask = make_phantom(rng, size=128, tumour=tumour, return_mask=True)
        name = f"img/P{i // 4:02d}_{i:02d}.png"
        Image.fromarray(img).save(root / name)
        mask_rel = None
        if tumour:
            mask_rel = f"masks/P{i // 4:02d}_{i:02d}.png"
            Image.fromarray(mask.astype(np.uint8) * 255).save(root / mask_rel)
        truth.append({"path": name, "label": "yes" if tumour else "no", "patient_id": f"P{i // 4:02d}",
                      "sequence": "flair" if i < 12 else "t1c", "mask": mask_rel})  # fmt: skip
        refused = "view sagittal" if i in (0, 2, 4, 5) else ("out of distribution" if i == 9 else None)
        s = float(np.clip((0.7 if tumour else 0.3) + rng.normal(0, 0.15), 0.02, 0.98))
        if refused == "view sagittal" and not tumour:
            s = 0.9  # what the model says about views it never saw
        scores.append({"path": str(root / name), "prob_no": 1 - s, "prob_yes": s, "score": s,
                       "label": "out_of_scope" if refused else ("yes" if s >= 0.5 else "no"), "kind": "image",
                       "view": "sagittal" if refused == "view sagittal" else "axial", "view_source": "model",
                       "ood_score": 3.0, "in_scope": refused is None, "scope_reason": refused,
                       "adaptation": "none", "bundle_id": bundle_id, "error": None})  # fmt: skip
    pd.DataFrame(truth).to_csv(root / "manifest.csv", index=False)
    (root / "scores" / "scores").mkdir(parents=True)
    pd.DataFrame(scores).to_parquet(root / "scores" / "scores" / "part-0.parquet", index=False)
    out = root / "out"
    rep = report.build_report(head_bundle.bundle, str(root / "manifest.csv"), out, n_boot=100, gallery=2,
                              scores=str(root / "scores"))  # fmt: skip
    return {
        "rep": rep,
        "out": out,
        "page": (out / "report.html").read_text(encoding="utf-8"),
        "json": json.loads((out / "report.json").read_text()),
        "metrics": json.loads((out / "metrics.json").read_text()),
    }


def test_scope_section_counts_refused_inputs_apart(scoped_report):
    rj, mj, page = scoped_report["json"], scoped_report["metrics"], scoped_report["page"]
    sc = rj["scope"]
    assert (sc["evaluated"], sc["in_scope"], sc["out_of_scope"]) == (24, 19, 5)
    assert sc["reasons"] == {"view sagittal": 4, "out of distribution": 1}
    assert sc["out_of_scope_by_class"] == {"no": 3, "yes": 2}
    assert rj["metrics"]["n"] == 24 and sc["metrics"]["n"] == 19
    assert rj["metrics"]["false_positives"] - sc["metrics"]["false_positives"] == 3  # refused, not negatives
    # report.json holds metrics.json's numbers (plus the thumbnails)
    assert {k: v for k, v in sc.items() if k != "thumbnails"} == mj["scope"]
    assert rj["by_view"] == mj["by_view"] and rj["by_sequence"] == mj["by_sequence"]
    section = _section_of(page, "scope")
    assert (
        "<td>view sagittal</td><td>4</td>" in section and "<td>out of distribution</td><td>1</td>" in section
    )
    assert "<th>out of scope</th><td>5</td>" in section and "<th>in scope</th><td>19</td>" in section
    m_all, m_in = rj["metrics"], sc["metrics"]
    assert "<td>n</td><td>24</td><td></td><td>19</td><td></td>" in section
    assert (
        f"<td>specificity</td><td>{report.fmt(m_all['specificity'])}</td>"
        f"<td>{report.fmt_ci(m_all['ci95']['specificity'])}</td><td>{report.fmt(m_in['specificity'])}</td>"
    ) in section
    sag = rj["by_view"]["sagittal"]
    assert sag["n"] == sag["out_of_scope"] == 4
    assert f"<td>sagittal</td><td>4</td><td>4</td><td>{sag['positives']}</td>" in section
    flair = rj["by_sequence"]["flair"]
    assert (
        f"<td>flair</td><td>12</td><td>{flair['out_of_scope']}</td>" in section and flair["out_of_scope"] == 5
    )
    assert "out of scope (refused by the bundle)" in _section_of(page, "summary")


def test_scope_thumbnails_show_one_refused_input_per_reason_first(scoped_report):
    rj, out, page = scoped_report["json"], scoped_report["out"], scoped_report["page"]
    thumbs = rj["scope"]["thumbnails"]
    assert [t["reason"] for t in thumbs[:2]] == ["view sagittal", "out of distribution"]
    assert len(thumbs) == 2  # gallery=2: one of each reason
    for t in thumbs:
        assert _is_png(out / t["png"]) and t["png"] in rj["figures"]
        assert t["basename"] in _section_of(page, "scope")


def test_localisation_section_equals_metrics_json(scoped_report):
    rj, mj, out, page = (
        scoped_report["json"],
        scoped_report["metrics"],
        scoped_report["out"],
        scoped_report["page"],
    )
    loc = rj["localisation"]
    assert loc == mj["localisation"] is not None
    assert loc["tumour_images"] == 12 and loc["n"] + loc["errors"] == 12 and loc["without_mask"] == 0
    assert loc["ci95_resampling"] == "patients" and set(loc["by_sequence"]) == {"flair", "t1c"}
    assert "in_scope" in loc and loc["in_scope"]["n"] == 10  # 2 refused tumour images
    rows = pd.read_parquet(out / "localisation.parquet")
    assert len(rows) == 12 and rows["hit"].sum() == loc["hit"]["hits"]
    assert rows["mask_share"].mean() == pytest.approx(loc["random_point"])
    assert (rows["mask_share"] < rows["head_share"]).all()  # the head is part of the image
    section = _section_of(page, "localisation")
    h, t, c = loc["hit"], loc["hit_tolerant"], loc["centre_hit"]
    assert (
        f"<td>all tumour images</td><td>{loc['n']}</td><td>{report.fmt(h['rate'])}</td>"
        f"<td>{report.fmt_ci(h['ci95'])}</td><td>{report.fmt(t['rate'])}</td><td>{report.fmt_ci(t['ci95'])}</td>"
        f"<td>{report.fmt(c['rate'])}</td><td>{report.fmt_ci(c['ci95'])}</td>"
        f"<td>{report.fmt(loc['random_point'])}</td><td>{report.fmt(loc['random_point_in_head'])}</td>"
    ) in section
    assert "<td>sequence flair</td><td>6</td>" in section and "within 1% of the image" in section


def test_report_without_scope_or_masks_says_so(tmp_path, monkeypatch):
    """An evaluation written before scope existed (no scope keys): no Scope section; no mask column: the
    localisation section says there is nothing to check."""
    _fake_evaluation(monkeypatch, _preds())
    rep = report.build_report(_tiny_bundle(tmp_path / "b"), "/x", tmp_path / "out", n_boot=50, gallery=0)
    page = (tmp_path / "out" / "report.html").read_text(encoding="utf-8")
    assert rep["scope"] is None and rep["localisation"] is None and 'id="scope"' not in page
    assert "no mask column" in _section_of(page, "localisation")
