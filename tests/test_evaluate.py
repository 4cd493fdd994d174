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


# ----------------------------------------------------------------------------------------------------------
# Scope: out-of-scope rows counted apart, in-scope metrics, by view and by sequence (hand-made predictions)


def _scoped(n: int = 48, seed: int = 0) -> pd.DataFrame:
    """Prediction rows with the scope columns: 32 axial in scope, 12 sagittal refused (8 of them healthy
    scans the model calls tumour: false positives if they were counted), 2 of unknown view refused as out of
    distribution, and one error row (refused by the predictor's rule for unscored rows)."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    s = np.clip(0.25 + 0.5 * y + rng.normal(0, 0.15, n), 0.01, 0.99)
    view = ["axial"] * 32 + ["sagittal"] * 12 + [None] * 4
    in_scope = [True] * 32 + [False] * 14 + [True, False]
    reason = [None] * 32 + ["view sagittal"] * 12 + ["out of distribution"] * 2 + [None, None]
    s[32:44] = np.where(y[32:44] == 0, 0.9, 0.95)  # refused sagittal rows: all called tumour
    df = _frame(["A"] * 24 + ["B"] * 24, y, s, patient=[f"P{i // 2}" for i in range(n)])
    df = df.assign(view=view, view_source=["header"] * 44 + ["model"] * 2 + [None] * 2, in_scope=in_scope,
                   scope_reason=reason, ood_score=rng.random(n), sequence=["flair", "t1c"] * (n // 2))  # fmt: skip
    df.loc[n - 1, ["prob_no", "prob_yes"]] = np.nan  # an error row: no prediction
    df["error"] = [None] * (n - 1) + ["truncated image"]
    return df


def test_out_of_scope_rows_are_counted_apart_not_as_negatives():
    from raytumor.evaluate import scope_results
    from raytumor.metrics import metrics_with_ci, per_source_metrics

    df = _scoped()
    m_all = metrics_with_ci(df, CLASSES, "no", 0.5, n_boot=100)
    res = scope_results(df, CLASSES, "no", 0.5, m_all, per_source_metrics(df, CLASSES, "no", 0.5, 100), 100)
    sc = res["scope"]
    assert sc["recorded"] and (sc["evaluated"], sc["in_scope"], sc["out_of_scope"]) == (47, 33, 14)
    assert sc["out_of_scope_share"] == pytest.approx(14 / 47)
    assert sc["reasons"] == {"view sagittal": 12, "out of distribution": 2}  # the error row is not refused
    assert sc["out_of_scope_by_class"] == {"no": 7, "yes": 7}
    assert sc["views"] == {"axial": 32, "sagittal": 12, "unknown": 3}
    assert sc["view_source"] == {"header": 44, "model": 2, "none": 1}
    # all rows: the refused rows with their kept probabilities; in scope: without them, not as negatives
    in_rows = df.drop(index=df.index[32:46])  # the error row (in_scope False, unscored) is not refused
    assert sc["metrics"] == metrics_with_ci(in_rows, CLASSES, "no", 0.5, n_boot=100)
    assert m_all["n"] == 47 and sc["metrics"]["n"] == 33 and sc["metrics"]["failed_predictions"] == 1
    assert m_all["false_positives"] - sc["metrics"]["false_positives"] == 6  # the 6 refused healthy sagittal
    assert sc["metrics"]["positives"] == m_all["positives"] - 7
    om = sc["out_of_scope_metrics"]
    assert om["n"] == 14 and om["false_positives"] == 6
    # by view over all rows, with each view's refused count
    bv = res["by_view"]
    assert {k: (v["n"], v["out_of_scope"]) for k, v in bv.items()} == {
        "axial": (32, 0), "sagittal": (12, 12), "unknown": (3, 2)
    }  # fmt: skip
    assert bv["sagittal"]["specificity"] == 0.0 and sc["by_view"]["axial"]["n"] == 32
    assert "sagittal" not in sc["by_view"]
    # by source: the all-row entries gain their refused counts; in-scope per-source metrics apart
    assert {k: sc["by_source"][k]["n"] for k in ("A", "B")} == {"A": 24, "B": 9}


def test_predictions_without_scope_columns_are_all_in_scope():
    from raytumor.evaluate import scope_results
    from raytumor.metrics import metrics_with_ci, per_source_metrics

    df = _scoped().drop(columns=["view", "view_source", "in_scope", "scope_reason", "ood_score", "sequence"])
    m = metrics_with_ci(df, CLASSES, "no", 0.5, n_boot=50)
    by_source = per_source_metrics(df, CLASSES, "no", 0.5, 50)
    res = scope_results(df, CLASSES, "no", 0.5, m, by_source, 50)
    sc = res["scope"]
    assert not sc["recorded"] and (sc["in_scope"], sc["out_of_scope"], sc["reasons"]) == (47, 0, {})
    assert sc["metrics"] is m and sc["out_of_scope_metrics"] is None
    assert list(res["by_view"]) == ["unknown"] and res["by_view"]["unknown"]["n"] == 47
    assert res["by_sequence"] is None and by_source["A"]["out_of_scope"] == 0


def test_by_sequence_breakdown_equals_the_metrics_of_each_sequence():
    from raytumor.evaluate import format_scope, scope_results
    from raytumor.metrics import metrics_with_ci, per_source_metrics

    df = _scoped()
    df.loc[5, "sequence"] = None  # a manifest row without a sequence
    m = metrics_with_ci(df, CLASSES, "no", 0.5, n_boot=50)
    res = scope_results(df, CLASSES, "no", 0.5, m, per_source_metrics(df, CLASSES, "no", 0.5, 50), 50)
    bs = res["by_sequence"]
    assert list(bs) == ["flair", "t1c", "unknown"]
    flair = df[df["sequence"] == "flair"]
    assert {k: v for k, v in bs["flair"].items() if k != "out_of_scope"} == metrics_with_ci(
        flair, CLASSES, "no", 0.5, n_boot=50
    )
    assert bs["flair"]["out_of_scope"] == 7 and bs["t1c"]["out_of_scope"] == 7 and bs["unknown"]["n"] == 1
    assert sum(v["n"] for v in bs.values()) == m["n"]
    text = format_scope({"metrics": m, **res})
    assert "14 out of scope" in text and "view sagittal 12, out of distribution 2" in text
    assert "in-scope rows only:" in text and "per sequence" in text
    row = next(line for line in text.splitlines() if line.endswith("  sagittal"))
    assert row.split()[0] == "12" and row.split()[-2] == "12"  # n, then OOS last before the key


def test_manifest_columns_resolve_masks_like_paths(tmp_path):
    from raytumor.evaluate import manifest_columns

    (tmp_path / "sub").mkdir()
    rows = pd.DataFrame({"path": ["a.png", "b.png", "/abs/c.png"], "label": ["yes", "no", "yes"],
                         "sequence": ["flair", "", "t1c"], "mask": ["masks/a.png", None, "s3://b/m.png"]})  # fmt: skip
    rows.to_csv(tmp_path / "sub" / "m.csv", index=False)
    out = manifest_columns([str(tmp_path / "sub" / "m.csv"), str(tmp_path / "folder")]).set_index("path")
    base = str(tmp_path / "sub")
    assert out.loc[f"{base}/a.png", "mask"] == f"{base}/masks/a.png"
    assert out.loc[f"{base}/b.png", "mask"] is None and out.loc[f"{base}/b.png", "sequence"] is None
    assert out.loc["/abs/c.png", "mask"] == "s3://b/m.png" and out.loc["/abs/c.png", "sequence"] == "t1c"
    assert list(manifest_columns([str(tmp_path / "folder")]).columns) == ["path"]


def _tiny_bundle(path, **meta_kw):
    from raytumor.bundle import BundleMeta, save_bundle

    kw = dict(backbone="tiny", classes=["no", "yes"], negative_class="no", image_size=32, mean=[0.5],
              std=[0.25], threshold=0.5)  # fmt: skip
    return save_bundle(path, {}, BundleMeta(**{**kw, **meta_kw}))


def test_evaluate_scores_reports_scope_view_and_sequence(tmp_path, capsys):
    """A score output with the scope columns, joined to a manifest with a sequence column (no Ray, no model):
    the refused rows (label ``out_of_scope``) are counted apart, and the table prints them."""
    from raytumor.evaluate import evaluate_scores, format_localisation, format_scope

    bundle = _tiny_bundle(tmp_path / "bundle")
    bundle_id = json.loads((bundle / "bundle.json").read_text())["bundle_id"]
    df = _scoped().drop(columns="source")
    df["path"] = [str(tmp_path / f"f{i:02d}.png") for i in range(len(df))]
    truth = df[["path", "label", "sequence", "patient_id"]].assign(
        label=np.where(df["label"] == 1, "yes", "no")
    )
    truth.to_csv(tmp_path / "truth.csv", index=False)
    s = df["prob_yes"].to_numpy()
    called = np.where(s >= 0.5, "yes", "no")
    rows = df.drop(columns=["label", "sequence", "patient_id"]).assign(
        score=s, kind="image", adaptation="none", bundle_id=bundle_id,
        label=np.where(df["in_scope"], called, "out_of_scope"),
    )  # fmt: skip
    rows.loc[rows["error"].notna(), "label"] = None
    (tmp_path / "scores" / "scores").mkdir(parents=True)
    rows.to_parquet(tmp_path / "scores" / "scores" / "part-0.parquet", index=False)
    res = evaluate_scores(bundle, str(tmp_path / "truth.csv"), str(tmp_path / "scores"), tmp_path / "out",
                          n_boot=50)  # fmt: skip
    sc = res["scope"]
    assert (sc["in_scope"], sc["out_of_scope"]) == (33, 14) and res["metrics"]["n"] == 47
    assert set(res["by_sequence"]) == {"flair", "t1c"} and res["localisation"] is None  # no mask column
    assert res["by_view"]["sagittal"]["out_of_scope"] == 12
    written = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert written["scope"]["reasons"] == sc["reasons"] and written["by_view"]["axial"]["n"] == 32
    preds = pd.read_parquet(tmp_path / "out" / "predictions.parquet")
    assert preds["sequence"].notna().all() and (preds["label"].isin([0, 1])).all()  # truth, not the call
    assert format_localisation(res["localisation"]) == "" and "out of scope" in format_scope(res)
    # an older score output that says "out_of_scope" in its label only: still refused, not a negative
    rows.drop(columns=["in_scope", "scope_reason", "view", "view_source"]).to_parquet(
        tmp_path / "scores" / "scores" / "part-0.parquet", index=False
    )
    res = evaluate_scores(bundle, str(tmp_path / "truth.csv"), str(tmp_path / "scores"), None, n_boot=50)
    assert res["scope"]["out_of_scope"] == 14 and res["scope"]["reasons"] == {"unspecified": 14}


# ----------------------------------------------------------------------------------------------------------
# Grad-CAM localisation: the model input's geometry, through the real preprocessing


def _head_on_wide_canvas(seed: int, blob: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A SYNTHETIC 96x96 phantom head (grey levels <= 200) on a 100x160 black canvas (left offset varies), with
    a bright (250) disk of radius 5 at ``blob`` (head coordinates); returns the image and the disk mask."""
    from raytumor.phantoms import make_phantom

    rng = np.random.default_rng(seed)
    head = np.minimum(make_phantom(rng, size=96), 200).astype(np.uint8)
    canvas = np.zeros((100, 160), np.uint8)
    top, left = 2, 10 + int(rng.integers(0, 50))
    canvas[top : top + 96, left : left + 96] = head
    mask = np.zeros(canvas.shape, bool)
    if blob is not None:
        yy, xx = np.mgrid[:100, :160]
        mask = (yy - top - blob[0]) ** 2 + (xx - left - blob[1]) ** 2 <= 25
        canvas[mask] = 250
    return canvas, mask


def test_input_box_is_the_crop_preprocess_applies():
    from raytumor.formats import fit_square
    from raytumor.localise import input_box, input_geometry
    from raytumor.preprocess import PreprocessConfig, apply, to_model_input

    gray, _ = _head_on_wide_canvas(0)
    cfg = PreprocessConfig(crop=True, margin=0.05)
    y0, y1, x0, x1 = input_box(gray, cfg)
    assert (x1 - x0) < 120 and (y0, y1, x0, x1) != (0, 100, 0, 160)  # the black sides were cropped
    np.testing.assert_array_equal(apply(gray, cfg), gray[y0:y1, x0:x1])
    np.testing.assert_array_equal(to_model_input(gray, 48, cfg), fit_square(gray[y0:y1, x0:x1], 48))
    assert input_box(gray, {"crop": False, "standardise": True}) == (0, 100, 0, 160)
    assert input_box(np.zeros((30, 40), np.uint8), cfg) == (0, 30, 0, 40)  # no head found: no crop
    assert input_geometry(gray, 48, cfg.to_dict()).box == (y0, y1, x0, x1)


@pytest.mark.parametrize("preprocess", [{}, {"crop": True, "margin": 0.05}])
def test_localise_maps_peaks_back_through_the_real_model_input(tmp_path, preprocess):
    """Non-square images (padding) and, with the crop, a head box: a heat map that is the model input's own
    brightness peaks on the bright blob, and mapped back that peak must fall on the blob's mask in the original
    image, for every image. Unreadable masks are errors, not misses."""
    from PIL import Image

    from raytumor.bundle import BundleMeta, save_bundle
    from raytumor.localise import localise
    from raytumor.model import create_model, normalization

    mean, std = normalization("efficientnet_lite0")
    meta = BundleMeta(backbone="efficientnet_lite0", classes=["no", "yes"], negative_class="no", image_size=64,
                      mean=list(mean), std=list(std), preprocess=preprocess)  # fmt: skip
    bundle = save_bundle(
        tmp_path / "b", create_model("efficientnet_lite0", 2, weights="none").state_dict(), meta
    )
    rows = []
    for i, blob in enumerate([(20, 30), (70, 60), (48, 15), (30, 80), (75, 25), (50, 50)]):
        img, mask = _head_on_wide_canvas(i + 1, blob)
        Image.fromarray(img).save(tmp_path / f"t{i}.png")
        Image.fromarray(mask.astype(np.uint8) * 255).save(tmp_path / f"t{i}_mask.png")
        rows.append({"path": str(tmp_path / f"t{i}.png"), "mask": str(tmp_path / f"t{i}_mask.png"), "label": 1,
                     "patient_id": f"P{i}"})  # fmt: skip
    rows.append({**rows[0], "mask": str(tmp_path / "missing.png")})

    def brightness(images: np.ndarray, targets: list[int]) -> np.ndarray:
        assert targets == [1] * len(images)
        return images.astype(np.float32) / 255.0

    loc = localise(bundle, pd.DataFrame(rows), tolerance=0.01, batch_size=4, heatmap=brightness)
    ok = loc[loc["error"].isna()]
    assert len(ok) == 6 and ok["hit"].all() and (ok["distance_px"] == 0).all() and ok["in_image"].all()
    assert np.allclose(ok["tolerance_px"], 1.6) and ok["mask_share"].between(0, 0.01).all()
    assert (ok["head_share"] > ok["mask_share"]).all()  # the head is a smaller region than the whole image
    assert loc["error"].iloc[-1].startswith(("FileNotFoundError", "OSError"))


@pytest.mark.ray
def test_evaluate_source_carries_sequence_and_masks(ray_session, head_bundle, tmp_path, capsys):
    """The Ray path: a manifest's sequence and mask columns reach the predictions, the by-sequence table and
    the pointing game (real Grad-CAM of the head-fitted bundle), and the command prints them."""
    from PIL import Image

    from raytumor.cli import main as cli_main
    from raytumor.phantoms import make_phantom

    rng = np.random.default_rng(9)
    rows = []
    for i in range(12):
        tumour = i % 3 == 0
        img, mask = make_phantom(rng, size=112, tumour=tumour, return_mask=True)
        Image.fromarray(img).save(tmp_path / f"s{i:02d}.png")
        if tumour:
            Image.fromarray(mask.astype(np.uint8) * 255).save(tmp_path / f"s{i:02d}_mask.png")
        rows.append({"path": f"s{i:02d}.png", "label": "yes" if tumour else "no", "patient_id": f"P{i // 2}",
                     "sequence": "t2" if i < 6 else "flair", "mask": f"s{i:02d}_mask.png" if tumour else None})  # fmt: skip
    pd.DataFrame(rows).to_csv(tmp_path / "m.csv", index=False)
    out = tmp_path / "out"
    cli_main(["evaluate", "--bundle", str(head_bundle.bundle), "--data", str(tmp_path / "m.csv"), "--out", str(out),
              "--n-boot", "100", "--keep-duplicates"])  # fmt: skip
    printed = capsys.readouterr().out
    res = json.loads((out / "metrics.json").read_text())
    preds = pd.read_parquet(out / "predictions.parquet")
    assert preds["sequence"].notna().all() and preds["mask"].notna().sum() == 4
    assert {k: v["n"] for k, v in res["by_sequence"].items()} == {"flair": 6, "t2": 6}
    assert res["scope"]["evaluated"] == 12 and res["scope"]["in_scope"] + res["scope"]["out_of_scope"] == 12
    loc = res["localisation"]
    assert loc["tumour_images"] == 4 and loc["n"] == 4 and loc["errors"] == 0
    assert set(loc["by_sequence"]) == {"flair", "t2"} and loc["ci95_resampling"].endswith("patients")
    assert len(pd.read_parquet(out / "localisation.parquet")) == 4
    assert "per sequence" in printed and "Grad-CAM pointing game" in printed
