"""Metrics and bootstrap CIs: point estimates from torchmetrics, vectorised bootstrap agrees with them."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
import torchmetrics.functional as tmf

from raytumor.evaluate import format_table
from raytumor.metrics import _binary_vectorised, bootstrap_ci, compute_metrics

CLASSES = ["no", "yes"]


def _probs(score: np.ndarray) -> np.ndarray:
    return np.stack([1 - score, score], 1).astype(np.float32)


def test_binary_metrics_by_hand():
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 1])
    s = np.array([0.1, 0.2, 0.6, 0.3, 0.9, 0.8, 0.4, 0.7, 0.95, 0.55])
    m = compute_metrics(y, _probs(s), CLASSES, "no", threshold=0.5)
    # TP: 0.9 0.8 0.7 0.95 0.55 = 5, FN: 0.4 = 1, FP: 0.6 = 1, TN = 3
    assert m["confusion_matrix"] == [[3, 1], [1, 5]]
    assert m["sensitivity"] == pytest.approx(5 / 6)
    assert m["specificity"] == pytest.approx(3 / 4)
    assert m["accuracy"] == pytest.approx(0.8)
    assert m["ppv"] == pytest.approx(5 / 6) and m["npv"] == pytest.approx(3 / 4)
    assert m["f1"] == pytest.approx(2 * 5 / (2 * 5 + 1 + 1))
    # AUC by counting concordant pairs
    pos, neg = s[y == 1], s[y == 0]
    auc = np.mean([(p > q) + 0.5 * (p == q) for p in pos for q in neg])
    assert m["roc_auc"] == pytest.approx(auc)
    # the threshold moves the operating point, not the AUC
    m2 = compute_metrics(y, _probs(s), CLASSES, "no", threshold=0.65)
    assert m2["specificity"] == 1.0 and m2["roc_auc"] == pytest.approx(auc)


def test_negative_class_first_or_second():
    y = np.array([0, 1, 1, 0])
    p = np.array([[0.9, 0.1], [0.2, 0.8], [0.3, 0.7], [0.6, 0.4]], dtype=np.float32)
    a = compute_metrics(y, p, ["no", "yes"], "no")
    # same data with the class order swapped: label 1 is now the negative class
    b = compute_metrics(1 - y, p[:, ::-1].copy(), ["yes", "no"], "no")
    for k in ("accuracy", "roc_auc", "sensitivity", "specificity"):
        assert a[k] == pytest.approx(b[k])


def test_vectorised_matches_torchmetrics_with_ties():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    s = np.round(np.clip(y * 0.3 + rng.normal(0.4, 0.25, 300), 0, 1), 2)  # rounding makes ties
    v = _binary_vectorised(y[None], s[None], 0.5)
    assert v["roc_auc"][0] == pytest.approx(
        float(tmf.auroc(torch.tensor(s), torch.tensor(y), task="binary")), abs=1e-6
    )
    m = compute_metrics(y, _probs(s), CLASSES, "no")
    for k in ("accuracy", "sensitivity", "specificity", "f1"):
        assert v[k][0] == pytest.approx(m[k], abs=1e-6)


def test_bootstrap_ci_brackets_and_shrinks():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 2000)
    s = np.clip(y * 0.35 + rng.normal(0.35, 0.2, 2000), 0, 1)
    m = compute_metrics(y, _probs(s), CLASSES, "no")
    ci = bootstrap_ci(y, _probs(s), CLASSES, "no", n_boot=500, seed=0)
    small = bootstrap_ci(y[:100], _probs(s[:100]), CLASSES, "no", n_boot=500, seed=0)
    for k in ("accuracy", "roc_auc", "sensitivity", "specificity", "f1"):
        lo, hi = ci[k]
        assert lo <= m[k] <= hi
        assert (hi - lo) < (small[k][1] - small[k][0])  # 20x the data, narrower interval
    assert bootstrap_ci(y, _probs(s), CLASSES, "no", n_boot=200, seed=3) == bootstrap_ci(
        y, _probs(s), CLASSES, "no", n_boot=200, seed=3
    )


def test_cluster_bootstrap_counts_duplicate_groups_once():
    """100 scans each copied 10x: resampling scans would claim 1000 independent cases; resampling the
    duplicate groups gives the interval of the 100 distinct scans."""
    rng = np.random.default_rng(2)
    y0 = rng.integers(0, 2, 100)
    s0 = np.clip(y0 * 0.35 + rng.normal(0.35, 0.2, 100), 0, 1)
    y, s, groups = np.repeat(y0, 10), np.repeat(s0, 10), np.repeat(np.arange(100), 10)
    naive = bootstrap_ci(y, _probs(s), CLASSES, "no", n_boot=400, seed=0)
    grouped = bootstrap_ci(y, _probs(s), CLASSES, "no", n_boot=400, seed=0, groups=groups)
    distinct = bootstrap_ci(y0, _probs(s0), CLASSES, "no", n_boot=400, seed=0)
    m = compute_metrics(y, _probs(s), CLASSES, "no")
    for k in ("accuracy", "roc_auc", "sensitivity", "specificity"):
        w_naive, w_grouped = np.diff(naive[k])[0], np.diff(grouped[k])[0]
        w_distinct = np.diff(distinct[k])[0]
        assert w_grouped > 2 * w_naive
        assert w_grouped == pytest.approx(w_distinct, rel=0.35)
        assert grouped[k][0] <= m[k] <= grouped[k][1]


def test_multiclass_metrics():
    classes = ["glioma", "meningioma", "notumor"]
    y = np.array([0, 1, 2, 2, 1, 0])
    p = np.array(
        [
            [0.8, 0.1, 0.1],
            [0.2, 0.7, 0.1],
            [0.1, 0.1, 0.8],
            [0.5, 0.1, 0.4],
            [0.1, 0.8, 0.1],
            [0.6, 0.3, 0.1],
        ],
        dtype=np.float32,
    )
    m = compute_metrics(y, p, classes, "notumor")
    assert m["mc_accuracy"] == pytest.approx(5 / 6)
    assert m["mc_confusion_matrix"][2] == [1, 0, 1]
    # tumour-vs-none: score = 1 - P(notumor); one notumor scan called tumour at 0.5
    assert m["specificity"] == pytest.approx(0.5) and m["sensitivity"] == 1.0
    assert "accuracy" in format_table(m)


def test_single_class_sets_do_not_crash():
    y = np.zeros(5, dtype=int)
    m = compute_metrics(y, _probs(np.array([0.1, 0.2, 0.7, 0.3, 0.1])), CLASSES, "no")
    assert m["roc_auc"] is None and m["sensitivity"] is None and m["specificity"] == pytest.approx(0.8)


# ----------------------------------------------------------------------------------------------------------
# Source-aware evaluation (issue 6): label mapping, source keys, per-source metrics (no Ray)


def test_map_labels_renames_no_tumour_onto_the_bundle_negative():
    from raytumor.evaluate import map_labels

    assert map_labels(["no_tumor"], ["no", "yes"], "no") == {"no_tumor": "no"}
    # exact names first: "no" stays "no" and "Normal" joins it
    assert map_labels(["yes", "no", "Normal"], ["no", "yes"], "no") == {
        "Normal": "no",
        "no": "no",
        "yes": "yes",
    }
    assert map_labels(["glioma", "healthy"], ["glioma", "notumor"], "notumor") == {
        "glioma": "glioma",
        "healthy": "notumor",
    }


def test_map_labels_names_unmapped_labels():
    from raytumor.evaluate import map_labels

    with pytest.raises(ValueError, match=r"\['glioma', 'tumour'\].*\['no', 'yes'\]"):
        map_labels(["no_tumor", "tumour", "glioma"], ["no", "yes"], "no")
    # without a no-tumour class in the bundle, a no-tumour label has nowhere to go
    with pytest.raises(ValueError, match=r"\['no_tumor'\].*no no-tumour class"):
        map_labels(["no_tumor"], ["glioma", "meningioma", "pituitary"], None)


def test_single_class_allowed_for_evaluation_only():
    from raytumor.ingest import class_layout

    with pytest.raises(ValueError, match="at least 2 classes"):
        class_layout(["no_tumor"])  # training: one class cannot be learned
    with pytest.raises(ValueError, match="at least 2 classes"):
        class_layout(["no"], order=["no", "yes"])  # an explicit order does not hide it
    # evaluation: the bundle's classes as the order, a folder of healthy scans is fine
    assert class_layout(["no"], order=["no", "yes"], min_classes=1) == (["no", "yes"], "no")


IXI_SOURCE = (
    "IXI T1 (2mm, uint8 downsampled) via github:CBICA/NiChart_Project@e6980df1b21ab5b14bf6445aa63cc35ab2f6988f"
    ":test_data/IXI_Small/t1/IXI012-HH-1211_T1.nii.gz axial slice z=56 (RAS canonical)"
)


def test_source_key_rule_and_pattern():
    from raytumor.evaluate import compile_source_pattern, source_key_of

    assert source_key_of(IXI_SOURCE, "m.csv") == "IXI T1 (2mm, uint8 downsampled)"  # NAME via ...
    assert source_key_of("site-B", "m.csv") == "site-B"
    assert source_key_of(None, "/data/br35h/") == "/data/br35h/"  # folder rows: the data argument
    assert source_key_of(float("nan"), "m.csv") == "m.csv"
    # --source-pattern: first group, else the whole match, in the raw value (provenance included)
    assert source_key_of(IXI_SOURCE, "m.csv", r"IXI\d+-([A-Za-z]+)-") == "HH"
    assert source_key_of(IXI_SOURCE, "m.csv", r"IXI\d+") == "IXI012"
    assert source_key_of(IXI_SOURCE, "m.csv", r"@([0-9a-f]{7})") == "e6980df"
    assert source_key_of(None, "/data/br35h-3000/", r"data/([\w-]+)") == "br35h-3000"
    # no match: the default rule
    assert source_key_of(IXI_SOURCE, "m.csv", r"Guys") == "IXI T1 (2mm, uint8 downsampled)"
    with pytest.raises(ValueError, match="not a valid regular expression"):
        compile_source_pattern("(")


def test_pattern_source_keys_use_the_raw_manifest_value(tmp_path):
    import pandas as pd

    from raytumor.evaluate import pattern_source_keys
    from raytumor.ingest import list_labelled

    folder = tmp_path / "site_a"
    for c in ("no", "yes"):
        (folder / c).mkdir(parents=True)
        (folder / c / f"{c}1.png").write_bytes(b"x")
    rows = [
        ("s/IXI012-HH-1_ax1.png", "no_tumor", "IXI012", "IXI T1 via github:x@aaaaaaa1:IXI012-HH-1_T1.nii.gz"),
        (
            "s/IXI013-IOP-1_ax1.png",
            "no_tumor",
            "IXI013",
            "IXI T1 via github:x@bbbbbbb2:IXI013-IOP-1_T1.nii.gz",
        ),
        ("s/other.png", "no_tumor", None, None),
    ]
    manifest = tmp_path / "m.csv"
    pd.DataFrame(rows, columns=["path", "label", "patient_id", "source"]).to_csv(manifest, index=False)
    data = [str(folder), str(manifest)]
    files = list_labelled(data).files
    by_path = dict(zip(files["path"], files["source"], strict=True))
    assert by_path[str(tmp_path / "s/IXI012-HH-1_ax1.png")] == "IXI T1"  # default rule
    assert by_path[str(tmp_path / "s/other.png")] == str(manifest)  # no source value: the manifest
    keys = dict(zip(files["path"], pattern_source_keys(files, data, r"IXI\d+-([A-Z]+)-"), strict=True))
    assert keys[str(tmp_path / "s/IXI012-HH-1_ax1.png")] == "HH"
    assert keys[str(tmp_path / "s/IXI013-IOP-1_ax1.png")] == "IOP"
    assert keys[str(tmp_path / "s/other.png")] == str(manifest)  # no match: default rule
    assert keys[str(folder / "no" / "no1.png")] == str(folder)
    keys = pattern_source_keys(files, data, r"site_(\w)")  # applies to the folder argument too
    assert set(keys[files["path"].str.startswith(str(folder))]) == {"a"}


def _frame(source, label, score, patient=None):
    import pandas as pd

    score = np.asarray(score, dtype=float)
    df = pd.DataFrame(
        {
            "path": [f"{s}/{i:04d}.png" for i, s in enumerate(source)],
            "source": source,
            "label": label,
            "prob_no": 1 - score,
            "prob_yes": score,
        }
    )
    if patient is not None:
        df["patient_id"] = patient
    return df


def test_per_source_metrics_by_hand():
    from raytumor.metrics import metrics_with_ci, per_source_metrics

    # A: TP 0.7, FN 0.4, FP 0.6, TN 0.2; B: five healthy scans, one (0.8) called tumour
    df = _frame(
        ["A"] * 4 + ["B"] * 5, [0, 0, 1, 1, 0, 0, 0, 0, 0], [0.2, 0.6, 0.7, 0.4, 0.1, 0.3, 0.8, 0.2, 0.4]
    )
    by = per_source_metrics(df.sample(frac=1, random_state=1), CLASSES, "no", 0.5, n_boot=300, seed=0)
    assert list(by) == ["A", "B"]
    a, b = by["A"], by["B"]
    assert (a["n"], a["positives"], a["confusion_matrix"]) == (4, 2, [[1, 1], [1, 1]])
    assert a["sensitivity"] == a["specificity"] == a["accuracy"] == 0.5
    assert a["roc_auc"] == pytest.approx(
        3 / 4
    )  # pairs (0.7,0.2) (0.7,0.6) (0.4,0.2) concordant, (0.4,0.6) not
    assert (a["false_positives"], a["fp_rate"]) == (1, 0.5)
    # single-class source: specificity (with a CI) and the FP count only
    assert (b["n"], b["positives"], b["negatives"]) == (5, 0, 5)
    assert b["specificity"] == pytest.approx(0.8) and b["fp_rate"] == pytest.approx(0.2)
    assert b["false_positives"] == 1 and b["accuracy"] == pytest.approx(0.8)
    for k in ("sensitivity", "roc_auc", "ppv", "npv", "f1"):
        assert b[k] is None and b["ci95"][k] == [None, None], k
    lo, hi = b["ci95"]["specificity"]
    assert 0 <= lo <= 0.8 <= hi == 1.0
    assert a["ci95_resampling"] == b["ci95_resampling"] == "scans"
    # row order does not matter (sorted by path before resampling); pooled = all rows
    assert per_source_metrics(df, CLASSES, "no", 0.5, n_boot=300, seed=0) == by
    pooled = metrics_with_ci(df, CLASSES, "no", 0.5, n_boot=300, seed=0)
    assert pooled["n"] == 9 and pooled["false_positives"] == 2
    with pytest.raises(ValueError, match="'source' column"):
        per_source_metrics(df.drop(columns="source"), CLASSES, "no", 0.5)


def test_all_tumour_source_gets_sensitivity_only():
    from raytumor.metrics import per_source_metrics

    by = per_source_metrics(_frame(["T"] * 4, [1] * 4, [0.9, 0.3, 0.8, 0.7]), CLASSES, "no", 0.5, n_boot=200)
    t = by["T"]
    assert t["sensitivity"] == pytest.approx(0.75) and t["ci95"]["sensitivity"][1] == 1.0
    assert t["specificity"] is None and t["roc_auc"] is None and t["fp_rate"] is None
    assert t["false_positives"] == 0
    lines = format_table(t).splitlines()
    assert any(line.startswith("sensitivity") for line in lines)
    assert not any(line.startswith(("specificity", "roc_auc", "ppv")) for line in lines)


def test_patient_cluster_bootstrap_is_wider_than_per_scan():
    """30 patients x 12 scans; a patient's scans share its score (plus a little noise): resampling scans
    counts 360 independent cases where there are 30."""
    from raytumor.metrics import per_source_metrics

    rng = np.random.default_rng(4)
    y_pat = np.repeat([0, 1], 15)
    s_pat = np.clip(0.5 + (y_pat - 0.5) * 0.3 + rng.normal(0, 0.2, 30), 0, 1)
    y = np.repeat(y_pat, 12)
    s = np.clip(np.repeat(s_pat, 12) + rng.normal(0, 0.02, 360), 0, 1)
    df = _frame(["S"] * 360, y, s, patient=np.repeat([f"P{i:02d}" for i in range(30)], 12))
    scans = per_source_metrics(df.drop(columns="patient_id"), CLASSES, "no", 0.5, n_boot=400, seed=0)["S"]
    patients = per_source_metrics(df, CLASSES, "no", 0.5, n_boot=400, seed=0)["S"]
    assert (scans["ci95_resampling"], patients["ci95_resampling"]) == ("scans", "patients")
    assert patients["roc_auc"] == scans["roc_auc"]  # the point estimates do not change
    for k in ("roc_auc", "sensitivity", "specificity", "accuracy"):
        w_scan, w_pat = np.diff(scans["ci95"][k])[0], np.diff(patients["ci95"][k])[0]
        assert w_pat > 2 * w_scan, k
        assert patients["ci95"][k][0] <= patients[k] <= patients["ci95"][k][1]
    # ids are per source: "P00" of another source is another patient
    two = df.copy()
    two.loc[two.index[::2], "source"] = "S2"
    from raytumor.groups import cluster_ids

    ids, what = cluster_ids(two)
    assert what == "patients" and len(np.unique(ids)) == 60


def test_format_table_lists_sources():
    from raytumor.metrics import metrics_with_ci, per_source_metrics

    df = _frame(
        ["A"] * 4 + ["IXI T1"] * 5, [0, 0, 1, 1, 0, 0, 0, 0, 0], [0.2, 0.6, 0.7, 0.4, 0.1, 0.3, 0.8, 0.2, 0.4]
    )
    by = per_source_metrics(df, CLASSES, "no", 0.5, n_boot=50)
    text = format_table(metrics_with_ci(df, CLASSES, "no", 0.5, n_boot=50), by)
    lines = text.splitlines()
    assert "per source:" in lines
    row_a = next(line for line in lines if line.endswith("  A"))
    row_ixi = next(line for line in lines if line.endswith("  IXI T1"))
    assert row_a.split()[:6] == ["4", "0.5000", "0.7500", "0.5000", "0.5000", "1"]
    assert row_ixi.split()[:6] == ["5", "0.8000", "-", "-", "0.8000", "1"]


def test_evaluate_args_take_several_sources():
    from raytumor.evaluate import get_args_parser

    a = get_args_parser().parse_args(
        ["--bundle", "b", "--data", "x/", "--data", "m.csv", "--source-pattern", "(a)"]
    )
    assert a.data == ["x/", "m.csv"] and a.source_pattern == "(a)"
    a = get_args_parser().parse_args(["--bundle", "b", "--data", "x/"])
    assert a.data == ["x/"] and a.source_pattern is None


@pytest.mark.ray
def test_evaluate_a_bundle_in_a_bucket(ray_session, s3_server, s3_client, tmp_path, capsys):
    """`raytumor evaluate --bundle s3://...` fetches the bundle (it used to read bundle.json from the local
    disk at the URI's path and fail); the metrics equal those of the same bundle evaluated locally."""
    from raytumor.bundle import BundleMeta, save_bundle
    from raytumor.cli import main as cli_main
    from raytumor.model import create_model, normalization
    from raytumor.phantoms import write_phantom_dataset

    write_phantom_dataset(tmp_path / "data", n_per_class=12, size=64, seed=5)
    mean, std = normalization("efficientnet_lite0")
    torch_model = create_model("efficientnet_lite0", 2, weights="none", dropout=0.0)
    meta = BundleMeta(backbone="efficientnet_lite0", classes=["no", "yes"], negative_class="no", image_size=48,
                      mean=list(mean), std=list(std))  # fmt: skip
    local = save_bundle(tmp_path / "bundle", torch_model.state_dict(), meta)
    s3_client.create_bucket(Bucket="models")
    for f in local.iterdir():
        s3_client.upload_file(str(f), "models", f"b1/{f.name}")
    data = str(tmp_path / "data")
    for bundle, out in (("s3://models/b1", tmp_path / "remote"), (str(local), tmp_path / "local")):
        cli_main(["evaluate", "--bundle", bundle, "--data", data, "--out", str(out), "--s3-endpoint", s3_server,
                  "--n-boot", "200"])  # fmt: skip
    assert "metrics written to" in capsys.readouterr().out
    remote = json.loads((tmp_path / "remote" / "metrics.json").read_text())
    here = json.loads((tmp_path / "local" / "metrics.json").read_text())
    assert remote["bundle_id"] == here["bundle_id"] == meta.bundle_id
    assert remote["metrics"]["n"] == here["metrics"]["n"] == 24
    assert remote["metrics"]["roc_auc"] == pytest.approx(here["metrics"]["roc_auc"], abs=1e-6)
    assert remote["metrics"]["ci95"] == here["metrics"]["ci95"]


def test_average_precision_interval_resamples_groups():
    """metrics_with_ci gives AP and its interval, resampling duplicate groups like every other metric."""
    from raytumor.metrics import average_precision, metrics_with_ci

    rng = np.random.default_rng(3)
    y = np.repeat(rng.permutation(np.arange(40) % 2), 5)  # 40 groups of 5 near-copies
    s = np.clip(0.35 + 0.3 * y + np.repeat(rng.normal(0, 0.25, 40), 5) + rng.normal(0, 0.01, 200), 0, 1)
    df = pd.DataFrame(
        {"path": [f"f{i:03d}" for i in range(200)], "label": y, "prob_no": 1 - s, "prob_yes": s}
    )
    per_scan = metrics_with_ci(df, ["no", "yes"], "no", 0.5, n_boot=400)
    grouped = metrics_with_ci(df.assign(group=np.arange(200) // 5), ["no", "yes"], "no", 0.5, n_boot=400)
    assert per_scan["average_precision"] == pytest.approx(average_precision(y, s))
    lo, hi = grouped["ci95"]["average_precision"]
    lo1, hi1 = per_scan["ci95"]["average_precision"]
    assert lo <= grouped["average_precision"] <= hi and lo1 <= per_scan["average_precision"] <= hi1
    assert grouped["ci95_resampling"] == "duplicate groups" and (hi - lo) > 1.5 * (hi1 - lo1)
