"""Ray Train end to end on real data: 2-worker DDP on CPU (gloo), fault tolerance, resume, bundle, CLI,
several sources (per-source validation metrics, leave-one-source-out)."""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from raytumor.bundle import load_bundle, read_meta
from raytumor.config import from_args
from raytumor.split import HOLDOUT_DUPLICATE
from raytumor.train import (
    TrainConfig,
    check_metric,
    get_args_parser,
    prepare_split,
    resolve_source,
    run_training,
    source_metrics,
)
from raytumor.train.loop import SOURCE_METRICS

pytestmark = pytest.mark.ray

BR35H_KEY = "br35h-3000"
IXI_KEY = "IXI T1 (2mm, uint8 downsampled)"


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def kill_worker_once(epoch: int, marker: Path):
    """A worker callback (runs inside Ray Train workers) that kills the last rank's process mid-way through
    ``epoch``, once (``marker`` remembers), like a lost node; FailureConfig must then recover."""

    def callback(info: dict) -> None:
        if info["epoch"] != epoch or info["rank"] != info["world"] - 1 or marker.exists():
            return
        if info["step"] == info["steps_per_epoch"] // 2:
            # The controller collects reported checkpoints on its health-check poll (2 s): a crash within
            # that window of the last report would lose that checkpoint, so die after it.
            time.sleep(max(0.0, 5.0 - info["seconds"]))
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.touch()
            os._exit(1)

    return callback


def record_worker_env(path: Path):
    """A worker callback that writes the training process's malloc environment once per rank."""

    def callback(info: dict) -> None:
        f = path.with_name(f"{path.name}.{info['rank']}")
        if not f.exists():
            f.write_text(json.dumps({k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}))

    return callback


@pytest.fixture(scope="module")
def br35h_subset(navoneel, br35h, tmp_path_factory):
    """A 60-file br35h-3000 manifest (a second source, paths into the shared data), 10 of them byte copies
    of navoneel-253 files; returns (manifest path, md5s of those 10)."""
    nav = {_md5(f) for f in navoneel.glob("*/*") if f.is_file()}
    rows, overlap = [], set()
    for cls in ("yes", "no"):
        files = sorted((br35h / cls).iterdir(), key=lambda f: f.name)
        md5 = {f: _md5(f) for f in files}
        shared = [f for f in files if md5[f] in nav][:5]
        other = [f for f in files if md5[f] not in nav][::40][:25]
        overlap |= {md5[f] for f in shared}
        rows += [(str(f), cls) for f in shared + other]
    manifest = tmp_path_factory.mktemp("br35h") / "manifest.csv"
    pd.DataFrame(rows, columns=["path", "label"]).assign(
        source=f"{BR35H_KEY} via a 60-file test subset of ../shared/data/br35h-3000"
    ).to_csv(manifest, index=False)
    return str(manifest), overlap


@pytest.fixture(scope="module")
def view_manifest(tmp_path_factory) -> str:
    """Slices of 6 real IXI T1 volumes cut along each axis (the view known from geometry): the view-head data
    a user makes with ``raytumor slices --planes axial,coronal,sagittal``; 8 per axis and volume."""
    import nibabel as nib
    from PIL import Image

    from tests.conftest import shared_dataset

    vols = sorted((shared_dataset("ixi-t1-nichart-42") / "nifti").glob("*.nii.gz"))[:6]
    out = tmp_path_factory.mktemp("views")
    rows = []
    for v in vols:
        a = np.asarray(nib.as_closest_canonical(nib.load(v)).dataobj, dtype=np.float32)
        a = np.clip(a / np.percentile(a, 99.5) * 255, 0, 255).astype(np.uint8)
        pid = v.name.split("-")[0]
        for axis, view in ((2, "axial"), (1, "coronal"), (0, "sagittal")):
            for k in np.linspace(0.3, 0.7, 8) * a.shape[axis]:
                img = np.rot90(np.take(a, int(k), axis=axis))
                f = out / f"{pid}_{view}_{int(k)}.png"
                Image.fromarray(np.ascontiguousarray(img)).save(f)
                rows.append((str(f), view, pid))
    manifest = out / "views.csv"
    pd.DataFrame(rows, columns=["path", "view", "patient_id"]).to_csv(manifest, index=False)
    return str(manifest)


@pytest.fixture(scope="module")
def ddp_run(ray_session, navoneel, br35h_subset, view_manifest, tmp_path_factory):
    """One real 2-worker DDP run on two sources (navoneel-253 + a br35h-3000 subset) where a worker dies
    in epoch 1 and the run recovers; every worker's reports are recorded by a controller callback."""
    import ray.train

    class RecordReports(ray.train.UserCallback):  # local class: pickled by value to the controller
        def __init__(self, path: str) -> None:
            self.path = path

        def after_report(self, run_context, metrics, checkpoint) -> None:
            with open(self.path, "a") as f:
                f.write(json.dumps(metrics) + "\n")

    out = tmp_path_factory.mktemp("runs")
    reports = out / "worker_reports.jsonl"
    cfg = TrainConfig(
        data=[str(navoneel), br35h_subset[0]],
        out=str(out),
        name="ddp",
        backbone="efficientnet_lite0",
        weights="imagenet",
        image_size=64,
        epochs=3,
        batch_size=16,
        num_workers=2,
        patience=5,
        max_failures=1,
        seed=0,
        view_data=[view_manifest],
    )
    die = kill_worker_once(epoch=1, marker=cfg.run_dir / ".failed_once")
    env = record_worker_env(out / "worker_env.json")
    summary = run_training(cfg, callbacks=[RecordReports(str(reports))], worker_callbacks=[die, env])
    return cfg, summary, [json.loads(line) for line in reports.read_text().splitlines()]


def test_ddp_run_writes_a_loadable_bundle(ddp_run):
    cfg, summary, _ = ddp_run
    assert summary["workers"] == 2 and not summary["use_gpu"]
    assert summary["epochs_run"] == 3
    bundle = load_bundle(summary["bundle"], device="cpu")
    meta = bundle.meta
    assert meta.backbone == "efficientnet_lite0" and meta.classes == ["no", "yes"] and meta.image_size == 64
    assert meta.data["split_manifest_sha256"] and meta.versions["ray"]
    # transfer learning on real data learns something even at 64 px in 3 short epochs; ~47 test scans of two
    # sources put chance at 0.5 +- 0.09, and a fresh-clone CI run measured 0.697, so the bar is 0.6
    test = meta.metrics["test"]
    assert test["n"] > 20 and test["roc_auc"] > 0.6
    assert (
        set(test["ci95"]["roc_auc"])
        and test["ci95"]["roc_auc"][0] <= test["roc_auc"] <= test["ci95"]["roc_auc"][1]
    )
    fp = bundle.train_fingerprints()
    assert len(fp) > 100 and {"sha256", "dhash", "thumb"} <= set(fp.columns)
    # calibrated on validation: temperature fitted, threshold reaches the target sensitivity there,
    # and the test metrics are measured at that operating point
    cal = meta.metrics["calibration"]
    assert cal["fitted_on"] == "val" and cal["n"] > 20 and 0.05 <= meta.temperature <= 100
    assert meta.threshold == cal["threshold"] and cal["val_sensitivity"] >= cfg.target_sensitivity
    # the run ends with the HTML report on the test split
    assert summary["report"] and Path(summary["report"]).is_file()
    assert (Path(summary["report"]).parent / "report.json").is_file()
    (tn, fp_), (fn, tp) = test["confusion_matrix"]
    assert test["sensitivity"] == pytest.approx(tp / (tp + fn))


def test_bundle_records_its_scope_view_head_and_ood_reference(ddp_run):
    cfg, summary, _ = ddp_run
    bundle = load_bundle(summary["bundle"], device="cpu")
    meta = bundle.meta
    assert bundle.heads.view is not None and bundle.heads.ood is not None
    scope = meta.scope
    # every real training example is counted once, under the view its manifest, header or the view head gave
    n_train = int(
        pd.read_parquet(Path(summary["run_dir"]) / "split_manifest.parquet")["split"].eq("train").sum()
    )
    counted = sum(n for per in scope["counts"]["view"].values() for n in per.values())
    assert counted + scope["synthetic"] == n_train and scope["synthetic"] == 0
    assert set(scope["counts"]["view"]) <= {"axial", "coronal", "sagittal", "oblique", "unknown"}
    assert scope["min_examples"] == cfg.scope_min_examples and scope["view_head"] is True
    # the OOD threshold lets ~99 % of validation images pass (the val split is small: allow 1-2 over)
    ood = meta.metrics["ood"]
    assert ood["threshold"] == scope["ood_threshold"] > 0 and ood["val_flagged"] <= 0.05
    # the view head is measured on held-out IXI subjects' slices
    vh = meta.metrics["view_head"]
    assert vh["held_out_slices"] > 0 and set(vh["held_out_per_view"]) == {"axial", "coronal", "sagittal"}
    assert vh["held_out_accuracy"] > 0.8
    # the calibrated test predictions carry the score rows' scope columns (what `raytumor cv` pools)
    tp = pd.read_parquet(Path(summary["run_dir"]) / "test_predictions.parquet")
    assert {"view", "view_source", "ood_score", "in_scope", "scope_reason", "score", "pred"} <= set(
        tp.columns
    )
    assert len(tp) == meta.metrics["test"]["n"] and "features" not in tp.columns
    assert meta.metrics["test_in_scope"]["out_of_scope"] == int((~tp["in_scope"].astype(bool)).sum())


def test_bundle_and_report_cis_agree_on_the_test_split(ddp_run):
    """The bundle's test metrics and the report's on the same split are one computation: same rows, same
    clusters (duplicate groups), same seed, so the same intervals (they used to resample differently)."""
    _, summary, _ = ddp_run
    test = read_meta(summary["bundle"]).metrics["test"]
    rep = json.loads((Path(summary["report"]).parent / "metrics.json").read_text())["metrics"]
    assert rep["n"] == test["n"] and rep["ci95_resampling"] == test["ci95_resampling"] == "duplicate groups"
    for k in ("roc_auc", "sensitivity", "specificity", "average_precision"):
        assert rep[k] == pytest.approx(test[k], abs=1e-6), k
        assert rep["ci95"][k] == pytest.approx(test["ci95"][k], abs=1e-6), k


def test_training_workers_run_with_the_torch_malloc_settings(ddp_run):
    from raytumor.runtime import TORCH_PROCESS_ENV

    cfg, _, _ = ddp_run
    seen = sorted(Path(cfg.out).glob("worker_env.json.*"))
    assert [f.suffix for f in seen] == [".0", ".1"]
    for f in seen:
        assert json.loads(f.read_text()) == TORCH_PROCESS_ENV


def test_worker_failure_recovered_from_checkpoint(ddp_run):
    cfg, summary, _ = ddp_run
    assert (cfg.run_dir / ".failed_once").exists()  # a worker really died in epoch 1
    assert summary["resumed_at_epochs"] == [1]  # restarted from epoch 0's checkpoint, not from scratch
    hist = pd.read_csv(Path(summary["bundle"]) / "history.csv")
    assert hist["epoch"].tolist() == [0, 1, 2]  # epoch 0 not redone, nothing skipped


def test_split_manifest_is_leakage_safe(ddp_run):
    cfg, _, _ = ddp_run
    m = pd.read_parquet(cfg.run_dir / "split_manifest.parquet")
    assert len(m) == 253 + 60
    assert m.groupby("source").size().to_dict() == {cfg.data[0]: 253, BR35H_KEY: 60}
    used = m[m["split"] != "rejected"]
    # byte copies across the two sources are one group, hence in one split
    assert (used.groupby("sha256")["source"].nunique() > 1).sum() >= 10
    # exact duplicates (22 groups) and near-duplicates never straddle splits
    assert (used.groupby("sha256")["split"].nunique() == 1).all()
    assert (used.groupby("group")["split"].nunique() == 1).all()
    counts = used["split"].value_counts(normalize=True)
    assert 0.6 < counts["train"] < 0.8 and counts["test"] > 0.08
    ingest = json.loads((cfg.run_dir / "ingest_summary.json").read_text())
    assert ingest["files_decoded"] == 313 and ingest["duplicates"]["redundant_files"] >= 35
    assert ingest["per_source"] == {cfg.data[0]: 253, BR35H_KEY: 60}
    # both sources, both classes in validation: what the per-source metrics need
    val = used[used["split"] == "val"]
    assert val.groupby("source")["class_name"].nunique().to_dict() == {cfg.data[0]: 2, BR35H_KEY: 2}


def test_per_source_val_metrics_identical_on_every_rank(ddp_run):
    cfg, summary, reports = ddp_run
    # attempt 1 reported epoch 0 and died in epoch 1; attempt 2 reported epochs 1 and 2
    assert [r[0]["epoch"] for r in reports] == [0, 1, 2]
    for per_worker in reports:
        assert len(per_worker) == 2 and per_worker[0] == per_worker[1]  # same keys and values on both ranks
        m = per_worker[0]
        assert m["val_sources"] == 2 and set(SOURCE_METRICS) <= set(m)
        assert 0 <= m["val_source_min_roc_auc"] <= m["val_source_mean_roc_auc"] <= 1
        assert 0 <= m["val_source_min_specificity"] <= 1
    hist = pd.read_csv(Path(summary["bundle"]) / "history.csv")
    for k in SOURCE_METRICS:
        assert hist[k].tolist() == pytest.approx([r[0][k] for r in reports])
        assert k in summary["val"]
    meta = read_meta(summary["bundle"])
    assert meta.data["source"] == " + ".join(cfg.data) and meta.train_config["data"] == cfg.data
    assert set(meta.data["sources"]) == {cfg.data[0], BR35H_KEY} and meta.data["holdout"] is None


def test_evaluate_cli_excludes_training_duplicates(ddp_run, navoneel, tmp_path):
    from raytumor.cli import main

    _, summary, _ = ddp_run
    out = tmp_path / "ev"
    main(
        [
            "evaluate",
            "--bundle",
            summary["bundle"],
            "--data",
            str(navoneel),
            "--out",
            str(out),
            "--n-boot",
            "200",
        ]
    )
    res = json.loads((out / "metrics.json").read_text())
    # evaluating on the training folder itself: everything seen in train/val is dropped, the test split remains
    files = res["files"]
    assert files["excluded_duplicates_of_training"] + files["evaluated"] == 253
    assert files["evaluated"] <= read_meta(summary["bundle"]).metrics["test"]["n"] + 5
    preds = pd.read_parquet(out / "predictions.parquet")
    assert len(preds) == files["evaluated"] and np.isfinite(preds["score"]).all()


def test_resume_after_interrupted_run_three_classes(ray_session, tmp_path):
    """A run that dies (no retries left) resumes from its last checkpoint when rerun with the same name.

    Three classes (no-tumour + two tumour folders) exercise the multi-class path at the same time.
    """
    from raytumor.phantoms import write_phantom_dataset

    write_phantom_dataset(
        tmp_path / "data", n_per_class=40, size=96, seed=3, class_names=("notumor", "glioma")
    )
    (tmp_path / "data" / "meningioma").mkdir()
    for f in sorted((tmp_path / "data" / "glioma").iterdir())[::2]:
        f.rename(tmp_path / "data" / "meningioma" / f.name)
    base = dict(
        data=str(tmp_path / "data"),
        out=str(tmp_path / "runs"),
        name="resume",
        backbone="efficientnet_lite0",
        weights="none",
        image_size=48,
        epochs=3,
        batch_size=16,
        num_workers=1,
        patience=5,
        seed=1,
        augment_in="data",  # the GPU path (augmentation in Ray Data tasks); ddp_run covers "worker"
    )
    cfg = TrainConfig(**base, max_failures=0)
    with pytest.raises(Exception):  # noqa: B017 - Ray wraps the worker death in its own error types
        run_training(cfg, worker_callbacks=[kill_worker_once(epoch=1, marker=cfg.run_dir / ".failed_once")])
    summary = run_training(TrainConfig(**base, max_failures=0))
    assert summary["resumed_at_epochs"] == [1]
    hist = pd.read_csv(Path(summary["bundle"]) / "history.csv")
    assert hist["epoch"].tolist() == [0, 1, 2]
    meta = read_meta(summary["bundle"])
    assert meta.classes == ["glioma", "meningioma", "notumor"] and meta.negative_class == "notumor"
    assert meta.metrics["selection_metric"] == "val_roc_auc"
    assert len(meta.metrics["test"]["mc_confusion_matrix"]) == 3 and "mc_f1_macro" in meta.metrics["test"]


def test_holdout_source_is_the_whole_test_split(ray_session, navoneel, br35h_subset, tmp_path):
    """Leave-one-source-out at the split level (no training): the held-out source is the test split,
    train/val files that duplicate it are dropped and counted, a healthy-only source takes part."""
    from raytumor.train import write_split

    ixi = navoneel.parent / "ixi-t1-nichart-42" / "manifest.csv"
    if not ixi.is_file():
        pytest.skip(f"{ixi} is absent")
    rows = pd.read_csv(ixi, dtype=str)
    rows = rows[rows["path"].str.endswith(".png")]
    rows = rows[rows["patient_id"].isin(sorted(rows["patient_id"].unique())[:5])]
    ixi_subset = tmp_path / "ixi.csv"
    rows.assign(path=[str(ixi.parent / p) for p in rows["path"]]).to_csv(ixi_subset, index=False)

    manifest, overlap = br35h_subset
    cfg = TrainConfig(data=[str(navoneel), manifest, str(ixi_subset)], holdout_source=BR35H_KEY, seed=0)
    data = prepare_split(cfg)
    m = data.manifest
    assert data.classes == ["no", "yes"]  # no_tumor (IXI) joined no
    assert set(m.loc[m["split"] == "test", "source"]) == {BR35H_KEY}
    assert (m.loc[m["source"] == BR35H_KEY, "split"] == "test").all()
    # every navoneel byte copy of a held-out file is dropped (near duplicates may add more)
    nav_copies = m["source"].eq(str(navoneel)) & m["sha256"].isin(m.loc[m["source"] == BR35H_KEY, "sha256"])
    assert nav_copies.sum() >= len(overlap)
    assert (m.loc[nav_copies, "split"] == HOLDOUT_DUPLICATE).all()
    dropped = int((m["split"] == HOLDOUT_DUPLICATE).sum())
    assert data.holdout == {"source": BR35H_KEY, "dropped_duplicates": dropped}
    assert set(m.loc[m["split"].isin(["train", "val"]), "source"]) == {str(navoneel), IXI_KEY}
    assert set(m["split"]) == {"train", "val", "test", HOLDOUT_DUPLICATE}
    # the IXI subjects' slices stay together; the split manifest records source and patient_id
    ixi_rows = m[m["source"] == IXI_KEY]
    assert len(ixi_rows) == 50 and (ixi_rows.groupby("patient_id")["split"].nunique() == 1).all()
    write_split(data, tmp_path)
    written = pd.read_parquet(tmp_path / "split_manifest.parquet")
    assert {"source", "patient_id"} <= set(written.columns)
    assert json.loads((tmp_path / "ingest_summary.json").read_text())["holdout"] == data.holdout

    # a healthy-only source held out: a single-class test split
    data = prepare_split(replace(cfg, data=[manifest, str(ixi_subset)], holdout_source=IXI_KEY))
    test = data.manifest[data.manifest["split"] == "test"]
    assert len(test) == 50 and set(test["class_name"]) == {"no"} and data.holdout["dropped_duplicates"] == 0
    check_metric("val_roc_auc", data.files("val"))
    with pytest.raises(ValueError, match="at least 2 sources"):
        check_metric("val_source_min_roc_auc", data.files("val"))


def test_source_metrics_worst_and_mean_over_sources():
    classes, neg = ["no", "yes"], "no"
    y = np.array([0, 0, 1, 1, 0, 0, 1, 1, 0, 0, 0])
    score = np.array([0.1, 0.2, 0.8, 0.9, 0.3, 0.7, 0.6, 0.4, 0.6, 0.4, 0.1])  # P(yes)
    src = np.array([0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2])  # 0: perfect, 1: AUC 0.5, 2: healthy only
    probs = np.stack([1 - score, score], 1)
    m = source_metrics(y, probs, src, classes, neg)
    assert m["val_sources"] == 3
    assert m["val_source_min_roc_auc"] == pytest.approx(0.5)
    assert m["val_source_mean_roc_auc"] == pytest.approx(0.75)  # source 2 has no AUC
    assert m["val_source_min_specificity"] == pytest.approx(0.5)  # source 1: 1/2; source 2: 2/3
    assert source_metrics(y, probs, np.zeros_like(src), classes, neg) == {}  # one source: nothing
    only_neg = source_metrics(y[8:], probs[8:], np.array([0, 1, 1]), classes, neg)
    assert only_neg == {"val_sources": 2, "val_source_min_specificity": pytest.approx(0.0)}


def test_resolve_source_and_check_metric():
    keys = ["../shared/data/navoneel-253", "s3://b/br35h/", IXI_KEY]
    assert resolve_source(IXI_KEY, keys) == IXI_KEY
    assert resolve_source("navoneel-253", keys) == keys[0]
    assert resolve_source("../shared/data/navoneel-253/", keys) == keys[0]
    assert resolve_source("br35h", keys) == keys[1]
    with pytest.raises(ValueError, match="is not a source"):
        resolve_source("ixi", keys)
    with pytest.raises(ValueError, match="several sources"):
        resolve_source("x", ["a/x", "b/x"])
    two = pd.DataFrame({"path": ["a", "b"], "label": [0, 1], "source": ["s1", "s2"]})
    check_metric("val_source_min_specificity", two)
    with pytest.raises(ValueError, match="at least 2 sources"):
        check_metric("val_source_mean_roc_auc", two.drop(columns="source"))


def test_args_parser_round_trip():
    args = get_args_parser().parse_args(["--data", "d", "--split", "0.8,0.1,0.1", "--class-order", "no,yes"])
    cfg = from_args(TrainConfig, args)
    assert (
        cfg.split == (0.8, 0.1, 0.1)
        and cfg.class_order == ["no", "yes"]
        and cfg.backbone == "efficientnet_lite0"
    )
    assert cfg.data == ["d"] and cfg.holdout_source is None and TrainConfig(data="x").data == ["x"]
    args = get_args_parser().parse_args(["--data", "a", "--data", "m.csv", "--holdout-source", "a"])
    cfg = from_args(TrainConfig, args)
    assert cfg.data == ["a", "m.csv"] and cfg.holdout_source == "a"
    assert "--holdout-source" in get_args_parser().format_help()
    assert cfg.worker_resources == {}
    args = get_args_parser().parse_args(
        ["--data", "a", "--worker-resource", "slot=1", "--worker-resource", "m=0.5"]
    )
    assert from_args(TrainConfig, args).worker_resources == {"slot": 1.0, "m": 0.5}
    for bad in ("slot", "slot=0", "=1", "slot=x", "CPU=2"):
        with pytest.raises(ValueError, match="worker resource"):
            from_args(TrainConfig, get_args_parser().parse_args(["--data", "a", "--worker-resource", bad]))
    # a dict (Tune's `--set worker_resources={slot: 1}`, a search YAML) gets the same checks
    assert TrainConfig(data="a", worker_resources={"slot": 1}).worker_resources == {"slot": 1.0}
    with pytest.raises(ValueError, match="worker resource"):
        TrainConfig(data="a", worker_resources={"GPU": 1})


def test_balance_sources_repeats_smaller_sources_up_to_a_share_and_a_cap():
    from raytumor.train.data import MAX_SOURCE_REPEAT, balance_sources

    files = pd.DataFrame(
        {
            "path": [f"f{i}" for i in range(1110)],
            "label": 0,
            "source": ["big"] * 1000 + ["mid"] * 100 + ["tiny"] * 10,
        }
    )
    out = balance_sources(files, 0.5, seed=0)
    n = out["source"].value_counts()
    assert n["big"] == 1000 and n["mid"] == 500  # 5 whole repeats
    assert n["tiny"] == 10 * MAX_SOURCE_REPEAT  # capped: 50x would be memorising 10 files
    assert set(out.loc[out["source"] == "mid", "path"]) == set(files.loc[files["source"] == "mid", "path"])
    fractional = balance_sources(files, 0.25, seed=0)["source"].value_counts()
    assert fractional["mid"] == 250 and balance_sources(files, 0.25, seed=0).equals(
        balance_sources(files, 0.25, 0)
    )
    assert balance_sources(files, 0.0, 0) is files and balance_sources(
        files[files.source == "big"], 1.0, 0
    ).equals(files[files.source == "big"])


def test_augmentation_runs_in_the_worker_on_cpus_and_in_ray_data_on_gpus():
    from raytumor.train.data import augment_placement

    cfg = TrainConfig(data="x")
    assert augment_placement(cfg, use_gpu=False) == "worker"
    assert augment_placement(cfg, use_gpu=True) == "data"
    assert augment_placement(replace(cfg, augment_in="data"), use_gpu=False) == "data"
    assert augment_placement(replace(cfg, augment_in="worker"), use_gpu=True) == "worker"
    with pytest.raises(SystemExit):
        from_args(TrainConfig, get_args_parser().parse_args(["--data", "x", "--augment-in", "gpu"]))


def test_augmentation_placement_is_decided_once_for_the_datasets_and_the_workers(monkeypatch):
    """A GPU node joining between build_datasets and make_trainer must not give an unaugmented run: the
    run pins the answer once, and both then read the pinned value without asking the cluster again."""
    import raytumor.train.data as train_data
    from raytumor.runtime import TrainResources

    answers = iter([False, True, True, True])  # CPU workers at first, a GPU node afterwards
    calls = []

    def flipping_cluster(num_workers, use_gpu, cpus_per_worker):
        calls.append(1)
        return TrainResources(1, next(answers), 1.0, 2.0, 1.0)

    monkeypatch.setattr(train_data, "train_resources", flipping_cluster)
    cfg = TrainConfig(data="x")
    pinned = train_data.pin_augment_in(cfg)
    assert pinned.augment_in == "worker" and len(calls) == 1
    # What build_datasets and make_trainer each ask: the same answer, and the cluster is not asked again.
    assert train_data.resolve_augment_in(pinned) == train_data.resolve_augment_in(pinned) == "worker"
    assert len(calls) == 1
    # Unpinned, the two questions would have disagreed (the defect this guards against).
    assert train_data.resolve_augment_in(cfg) == "data"


def test_worker_side_augmentation_turns_store_size_images_into_fresh_training_batches():
    """With ``augment_in="worker"`` the shard holds store-size uint8 images: the loop augments them into
    model-size tensors, differently each epoch, and keeps labels aligned and drop_last's batch count."""
    from raytumor.augment import store_size
    from raytumor.train.data import augment_kwargs
    from raytumor.train.loop import _train_batches

    size, n, bs = 48, 20, 8
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (n, store_size(size), store_size(size)), dtype=np.uint8)
    labels = np.arange(n) % 2
    images.flags.writeable = labels.flags.writeable = False  # as Ray hands them out of the object store

    class Shard:  # the slice of Ray Data's DataIterator API the loop uses
        def iter_batches(self, batch_size, batch_format, drop_last, local_shuffle_buffer_size):
            assert batch_format == "numpy" and drop_last
            for i in range(0, n - batch_size + 1, batch_size):
                yield {"image": images[i : i + batch_size], "label": labels[i : i + batch_size]}

    cfg = {"augment_in": "worker", "augment": augment_kwargs(TrainConfig(data="x", image_size=size))}
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. torch's "The given NumPy array is not writable"
        first, second = list(_train_batches(Shard(), bs, cfg)), list(_train_batches(Shard(), bs, cfg))
    assert len(first) == n // bs
    for b in first:
        assert b["image"].dtype == torch.uint8 and tuple(b["image"].shape) == (bs, size, size)
        assert b["label"].dtype == torch.int64
    assert [b["label"].tolist() for b in first] == [labels[i : i + bs].tolist() for i in (0, 8)]
    assert not torch.equal(first[0]["image"], second[0]["image"])  # augmented afresh each pass
