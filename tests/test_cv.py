"""Cross-validation: fold assignment (whole groups, stratified, every file once, leave-one-source-out),
each fold's split, pooled out-of-fold metrics at each fold's threshold, and a tiny `raytumor cv` on Ray."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from raytumor import split
from raytumor.cv import (
    CVConfig,
    _at_fold_thresholds,
    _check_resume,
    breakdowns,
    config_from_args,
    get_args_parser,
    mean_sd,
    pooled_metrics,
    render_report,
)
from raytumor.ingest import Catalogue, Listing
from raytumor.metrics import metrics_with_ci
from raytumor.train import TrainConfig, prepare_split
from raytumor.train.data import Grouping, cv_folds, grouping_key


def _table(seed: int = 0) -> tuple[pd.DataFrame, np.ndarray]:
    """Three sources: A (mixed classes, patients of 4 slices, duplicate pairs), B (single files, some
    copying an A patient's slice: groups spanning sources), C (healthy patients only)."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(30):  # A: 30 patients x 4 slices, the patient's class
        rows += [("A", f"a{p}", p % 2) for _ in range(4)]
    rows += [("A", None, int(rng.integers(0, 2))) for _ in range(60)]
    rows += [("B", None, int(rng.integers(0, 2))) for _ in range(150)]
    for p in range(10):  # C: healthy only
        rows += [("C", f"c{p}", 0) for _ in range(3)]
    df = pd.DataFrame(rows, columns=["source", "patient_id", "label"])
    df["path"] = [f"/d/{s}/{i:04d}.png" for i, s in enumerate(df["source"])]
    df["sha256"] = [f"{i:064x}" for i in range(len(df))]
    df["class_name"] = np.where(df["label"] == 0, "no", "yes")
    groups = np.arange(len(df))
    a_files = np.flatnonzero((df["source"] == "A") & df["patient_id"].isna())
    groups[a_files[1:40:2]] = groups[a_files[0:40:2]]  # duplicate pairs inside A
    b = np.flatnonzero(df["source"] == "B")
    for i, j in enumerate(b[:8]):  # B files copying slices of A patients 0..7 (same class)
        groups[j] = groups[4 * i]
        df.loc[j, ["label", "class_name"]] = [i % 2, "no" if i % 2 == 0 else "yes"]
    return df, groups


def _fold_of_groups(df: pd.DataFrame, groups: np.ndarray, folds: np.ndarray) -> pd.Series:
    merged = split.patient_groups(df, groups)
    return pd.Series(folds).groupby(merged).nunique()


def test_group_folds_keep_groups_whole_stratified_and_cover_every_file_once():
    df, groups = _table()
    folds = split.assign_folds(df, groups, 5, seed=0)
    assert folds.shape == (len(df),) and set(folds) == set(range(5))  # every file in exactly one fold
    assert (_fold_of_groups(df, groups, folds) == 1).all()  # no duplicate group or patient straddles folds
    # patients spanning sources through a duplicate stay in one fold too
    assert (
        len(set(folds[np.flatnonzero(df["patient_id"] == "a3")]) | {folds[df.index[df["source"] == "B"][3]]})
        == 1
    )
    # stratified: each fold close to the overall tumour share and source mix, and to an equal size
    sizes = np.bincount(folds)
    assert sizes.max() - sizes.min() <= 8, sizes  # the largest group (patient + copy) holds 5 files
    share = df["label"].mean()
    for k in range(5):
        f = df[folds == k]
        assert abs(f["label"].mean() - share) < 0.1, (k, f["label"].mean(), share)
        for src, n in df["source"].value_counts().items():
            assert abs((f["source"] == src).sum() - n / 5) <= 6, (k, src)
    # the held-out folds through holdout_split: no group shared between a fold's test and its training
    for k in range(5):
        s, _ = split.holdout_split(df, groups, folds == k, seed=0)
        assert split.leakage(df, s, split.patient_groups(df, groups))["groups_train_test"] == 0


def test_folds_deterministic_per_seed_and_independent_of_row_order():
    df, groups = _table()
    a = split.assign_folds(df, groups, 4, seed=3)
    assert (split.assign_folds(df, groups, 4, seed=3) == a).all()
    assert (split.assign_folds(df, groups, 4, seed=4) != a).any()
    perm = np.random.default_rng(1).permutation(len(df))
    relabel = np.random.default_rng(2).permutation(groups.max() + 1)
    b = split.assign_folds(df.iloc[perm].reset_index(drop=True), relabel[groups[perm]], 4, seed=3)
    assert (b == a[perm]).all()


def test_leave_source_out_folds_are_the_sources_and_scope_limits_what_is_held_out():
    df, groups = _table()
    folds = split.source_folds(df, ["A", "B", "C"])
    for i, src in enumerate("ABC"):
        assert ((folds == i) == (df["source"] == src).to_numpy()).all()
    only = split.source_folds(df, ["C", "A"])
    assert (only[df["source"] == "B"] == -1).all() and (only[df["source"] == "C"] == 0).all()
    # group folds inside some sources only: the others are never held out
    scoped = split.assign_folds(df, groups, 3, seed=0, scope=(df["source"] != "B").to_numpy())
    assert (scoped[df["source"] == "B"] == -1).all() and set(scoped[df["source"] != "B"]) == {0, 1, 2}
    assert (_fold_of_groups(df[df["source"] != "B"], groups[df["source"] != "B"],
                            scoped[df["source"] != "B"]) == 1).all()  # fmt: skip
    with pytest.raises(ValueError, match="folds"):
        split.assign_folds(df, groups, 1)
    with pytest.raises(ValueError, match="folds"):
        split.assign_folds(df.iloc[:3], groups[:3], 5)


def _grouping(df: pd.DataFrame, groups: np.ndarray, cfg: TrainConfig) -> Grouping:
    """A Grouping as group_data would make it, without decoding anything (no Ray needed)."""
    table = df.assign(error=None, format="PNG", mode="L", width=64, height=64)
    listing = Listing(source=" + ".join(cfg.data), files=df[["path", "class_name", "source"]])
    cat = Catalogue(listing=listing, table=table, classes=["no", "yes"], negative_class="no")
    return Grouping(grouping_key(cfg), cat, table, groups)


def test_each_fold_split_holds_out_its_fold_and_drops_duplicates_of_it():
    df, groups = _table()
    cfg = TrainConfig(data=["A", "B", "C"], cv_folds=4, seed=0)
    g = _grouping(df, groups, cfg)
    folds, names = cv_folds(cfg, g.good, g.groups)
    assert names == ["fold-0", "fold-1", "fold-2", "fold-3"]
    merged = split.patient_groups(df, groups)
    tested = []
    for k in range(4):
        data = prepare_split(replace(cfg, cv_fold=k), g)
        m = data.manifest
        test = m["split"] == "test"
        assert set(m.loc[test, "path"]) == set(df.loc[folds == k, "path"])
        assert data.holdout["cv"] == {"fold": k, "folds": 4, "by": "group", "name": f"fold-{k}"}
        assert split.leakage(m, m["split"].to_numpy(), merged)["groups_train_test"] == 0
        assert {"train", "val"} <= set(m["split"])
        tested += m.loc[test, "path"].tolist()
    assert sorted(tested) == sorted(df["path"])  # every file tested once over the folds

    # leave-one-source-out over A and B (C always trains): B files copying A slices leave A's training
    loso = replace(cfg, cv_by="source", cv_sources=["A", "B"])
    folds, names = cv_folds(loso, g.good, g.groups)
    assert names == ["A", "B"] and (folds[df["source"] == "C"] == -1).all()
    data = prepare_split(replace(loso, cv_fold=0), g)
    m = data.manifest
    assert set(m.loc[m["split"] == "test", "source"]) == {"A"}
    assert data.holdout["source"] == "A" and data.holdout["dropped_duplicates"] == 8
    assert (
        m.loc[m["path"].isin(df["path"][df["source"] == "B"][:8]), "split"] == split.HOLDOUT_DUPLICATE
    ).all()
    assert "C" in set(m.loc[m["split"] == "train", "source"])
    with pytest.raises(ValueError, match="not a fold"):
        prepare_split(replace(cfg, cv_fold=4), g)
    with pytest.raises(ValueError, match="give one"):
        prepare_split(replace(cfg, cv_fold=0, holdout_source="A"), g)
    with pytest.raises(ValueError, match="--cv-sources 'D' is not a source"):
        cv_folds(replace(loso, cv_sources=["D"]), g.good, g.groups)
    with pytest.raises(ValueError, match="other data"):
        prepare_split(replace(cfg, cv_fold=0, data=["A"]), g)


def test_pooled_threshold_metrics_use_each_fold_threshold():
    rng = np.random.default_rng(0)
    n = 400
    y = rng.integers(0, 2, n)
    score = np.clip(0.5 * y + rng.normal(0.25, 0.2, n), 0, 1)
    fold = np.arange(n) % 2
    thr = np.where(fold == 0, 0.3, 0.7)
    df = pd.DataFrame({"path": [f"f{i}" for i in range(n)], "label": y, "prob_no": 1 - score,
                       "prob_yes": score, "group": np.arange(n) // 2, "threshold": thr})  # fmt: skip
    m = pooled_metrics(df, ["no", "yes"], "no", n_boot=200, seed=0)
    called = score >= thr  # what each fold's bundle calls tumour
    tp, fn = (called & (y == 1)).sum(), (~called & (y == 1)).sum()
    tn, fp = (~called & (y == 0)).sum(), (called & (y == 0)).sum()
    assert m["sensitivity"] == pytest.approx(tp / (tp + fn)) and m["specificity"] == pytest.approx(
        tn / (tn + fp)
    )
    assert m["confusion_matrix"] == [[tn, fp], [fn, tp]] and m["threshold"] == "per fold"
    raw = metrics_with_ci(df, ["no", "yes"], "no", 0.5, n_boot=200, seed=0)
    assert m["roc_auc"] == pytest.approx(raw["roc_auc"]) and m["average_precision"] == pytest.approx(
        raw["average_precision"]
    )
    assert m["ci95_resampling"] == "duplicate groups"
    lo, hi = m["ci95"]["sensitivity"]
    assert lo <= m["sensitivity"] <= hi and m["ci95"]["roc_auc"] == raw["ci95"]["roc_auc"]
    # the mapping is monotone per fold and puts every row on the side of 0.5 its fold's call says
    a = _at_fold_thresholds(df, ["no", "yes"], "no")
    aligned = (1 - a["prob_no"].astype(np.float32)).to_numpy()
    assert ((aligned >= 0.5) == called).all()
    for k in (0, 1):
        o = np.argsort(score[fold == k])
        assert (np.diff(aligned[fold == k][o]) >= -1e-7).all()
    # mean ± sd over folds skips folds where a metric is undefined (a single-class fold has no AUC)
    ms = mean_sd([{"roc_auc": 0.8, "sensitivity": 0.9}, {"roc_auc": None, "sensitivity": 0.7}])
    assert ms["roc_auc"] == {"mean": 0.8, "sd": None, "folds": 1}
    assert ms["sensitivity"]["mean"] == pytest.approx(0.8) and ms["sensitivity"]["folds"] == 2


def test_cli_options():
    args = get_args_parser().parse_args(
        ["--data", "a", "--data", "b.csv", "--leave-source-out", "--cv-sources", "x,y", "--epochs", "2"]
    )
    cfg = config_from_args(args)
    assert cfg.leave_source_out and cfg.by == "source" and cfg.train.cv_sources == ["x", "y"]
    assert cfg.train.data == ["a", "b.csv"] and cfg.train.epochs == 2
    assert cfg.cv_name == "loso-efficientnet_lite0-160px-s0"
    assert config_from_args(get_args_parser().parse_args(["--data", "a", "--folds", "3"])).cv_name.startswith(
        "cv3-"
    )
    help_text = get_args_parser().format_help()
    assert "--folds" in help_text and "--holdout-source" not in help_text and "--cv-fold " not in help_text
    with pytest.raises(ValueError, match="at least 2"):
        CVConfig(train=TrainConfig(data="a"), folds=1)


# ----------------------------------------------------------------------------------------------------------
# End to end on Ray


@pytest.mark.ray
def test_tiny_cv_pools_every_file_once_and_resumes(ray_session, phantoms, tmp_path):
    """2 group folds of SYNTHETIC phantoms from two manifests (sources, sequences, patients), 1 epoch at
    64 px: every decoded file gets one out-of-fold prediction, each fold has its bundle, cv.json has pooled
    and per-fold metrics, the report is written, and the same command again keeps the finished folds."""
    from raytumor.cv import main

    files = sorted(p for p in phantoms.glob("*/*") if p.parent.name in ("no", "yes"))
    rows = pd.DataFrame({"path": [str(p) for p in files], "label": [p.parent.name for p in files]})
    i = np.arange(len(rows))
    rows["patient_id"] = [f"p{k}" for k in i // 2]  # pairs of slices per patient, each pair one site
    rows["sequence"] = np.where(i % 8 < 4, "t1", "t2")
    site = {k: str(tmp_path / f"site_{k}.csv") for k in "ab"}
    rows[(i // 2) % 2 == 0].to_csv(site["a"], index=False)
    rows[(i // 2) % 2 == 1].assign(source="site B via tests").to_csv(site["b"], index=False)
    argv = [
        "--data", site["a"], "--data", site["b"], "--out", str(tmp_path / "runs"), "--name", "tiny",
        "--folds", "2", "--epochs", "1", "--image-size", "64", "--batch-size", "8", "--num-workers", "1",
        "--warmup-epochs", "0", "--limit-per-class", "14", "--n-boot", "100", "--max-failures", "0",
    ]  # fmt: skip
    r = main(get_args_parser().parse_args(argv))

    run = tmp_path / "runs" / "tiny"
    oof = pd.read_parquet(run / "oof_predictions.parquet")
    folds = pd.read_csv(run / "folds.csv")
    manifest = pd.read_parquet(run / "fold-0" / "split_manifest.parquet")
    decoded = manifest.loc[manifest["split"] != "rejected", "path"]
    assert len(decoded) == 28 and not oof["path"].duplicated().any()
    assert set(oof["path"]) == set(decoded) == set(folds["path"])  # every decoded file exactly once
    assert set(oof["fold"]) == {0, 1} and oof["score"].between(0, 1).all()
    assert {"prob_no", "prob_yes", "pred", "group", "source", "threshold", "sequence"} <= set(oof.columns)
    # a patient's two slices are held out by the same fold
    pid = oof[["path", "fold"]].merge(rows[["path", "patient_id"]], on="path")
    assert pid["patient_id"].duplicated().any() and (pid.groupby("patient_id")["fold"].nunique() == 1).all()
    for k in (0, 1):
        assert (run / f"fold-{k}" / "bundle" / "bundle.json").exists()
        assert (run / f"fold-{k}" / "test_predictions.parquet").exists()
        assert not (run / f"fold-{k}" / "report").exists()  # one report for the whole CV
    cv = json.loads((run / "cv.json").read_text())
    assert cv["pooled"]["n"] == 28 and "ci95" in cv["pooled"] and cv["pooled"]["roc_auc"] is not None
    assert [f["fold"] for f in cv["folds"]] == [0, 1] and sum(f["test"]["n"] for f in cv["folds"]) == 28
    assert cv["mean_sd"]["roc_auc"]["folds"] == 2
    assert {"source", "sequence"} <= set(cv["breakdowns"])
    assert set(cv["breakdowns"]["source"]) == {site["a"], "site B"}
    assert sum(m["n"] for m in cv["breakdowns"]["sequence"].values()) == 28
    html = Path(r["report"]).read_text()
    assert "Pooled out-of-fold metrics" in html and "data:image/png;base64," in html and "By sequence" in html

    bundles = [f["bundle_id"] for f in cv["folds"]]
    again = main(get_args_parser().parse_args(argv))  # finished folds are kept, not trained again
    assert [f["bundle_id"] for f in again["folds"]] == bundles
    assert again["pooled"]["roc_auc"] == r["pooled"]["roc_auc"]


def test_rerun_must_hold_out_the_same_files(tmp_path):
    plan = pd.DataFrame({"path": pd.Series(["/d/a.png", "/d/b.png"], dtype=object), "fold": [0, 1]})
    _check_resume(tmp_path, plan)
    _check_resume(tmp_path, plan.iloc[::-1])  # same folds (read back from folds.csv): resumes
    with pytest.raises(ValueError, match="other data or options"):
        _check_resume(tmp_path, plan.assign(fold=[1, 0]))


def test_breakdowns_and_page_with_a_healthy_only_source(tmp_path):
    """Leave-one-source-out where one source holds healthy scans only: its fold and breakdown row have no
    ROC-AUC or sensitivity (shown as a dash), specificity is defined; the page is self-contained."""
    rng = np.random.default_rng(1)
    n = 90
    src = np.repeat(["A", "B", "C"], 30)
    y = np.where(src == "C", 0, rng.integers(0, 2, n))
    score = np.clip(0.4 * y + rng.uniform(0, 0.6, n), 0, 1)
    oof = pd.DataFrame({"path": [f"f{i}" for i in range(n)], "label": y, "prob_no": 1 - score,
                        "prob_yes": score, "source": src, "sequence": np.where(np.arange(n) % 2, "t1", None),
                        "fold": pd.factorize(src)[0], "threshold": np.repeat([0.4, 0.5, 0.6], 30)})  # fmt: skip
    by = breakdowns(oof, ["no", "yes"], "no", n_boot=50, seed=0)
    assert set(by) == {"source", "sequence"} and set(by["sequence"]) == {"t1", "unknown"}
    c = by["source"]["C"]
    assert c["roc_auc"] is None and c["sensitivity"] is None and c["specificity"] is not None
    folds = [{"name": s, "threshold": t, "best_epoch": 0, "dropped_duplicates": 0,
              "test": pooled_metrics(oof[oof["source"] == s], ["no", "yes"], "no", 50, 0)}
             for s, t in zip("ABC", (0.4, 0.5, 0.6), strict=True)]  # fmt: skip
    result = {
        "name": "loso", "data": ["a", "b", "c"], "metric": "val_roc_auc", "folds": folds,
        "scheme": {"description": "leave-one-source-out over 3 sources"},
        "pooled": pooled_metrics(oof, ["no", "yes"], "no", 50, 0),
        "mean_sd": mean_sd([f["test"] for f in folds]), "breakdowns": by,
        "config": {"train": {"backbone": "b", "weights": "none", "image_size": 64, "epochs": 1,
                             "target_sensitivity": 0.95, "seed": 0}},
    }  # fmt: skip
    assert result["mean_sd"]["roc_auc"]["folds"] == 2 and result["mean_sd"]["specificity"]["folds"] == 3
    page = render_report(result, b"\x89PNG")
    assert "By source" in page and "By sequence" in page and "<td>C</td>" in page
    assert "\u2014" in page and "http" not in page and "data:image/png;base64," in page
