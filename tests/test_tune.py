"""Tune: search-space validation, concurrency sizing, and a real tiny ASHA search with S3 storage."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

from raytumor.train import TrainConfig
from raytumor.tune import (
    DEFAULT_SPACE,
    SearchConfig,
    config_from_args,
    get_args_parser,
    leaderboard,
    load_search_file,
    to_param_space,
    trial_resources,
    validate_space,
)


def test_default_space_is_valid_and_converts():
    validate_space(DEFAULT_SPACE)
    space = to_param_space({**DEFAULT_SPACE, "dropout": 0.3, "batch_size": [16, 32]})
    assert space["dropout"] == 0.3
    assert sorted(space["batch_size"].categories) == [16, 32]
    lr = space["lr"]
    assert lr.lower == 3e-4 and lr.upper == 3e-3
    samples = [space["lr"].sample() for _ in range(200)]
    assert min(samples) >= 3e-4 and max(samples) <= 3e-3


@pytest.mark.parametrize(
    ("space", "fixed", "match"),
    [
        ({"data": {"choice": ["x"]}}, None, "not tunable"),
        ({"backbone": {"choice": ["resnet18", "vgg99"]}}, None, "unknown backbone"),
        ({"lr": {"loguniform": [0, 1e-3]}}, None, "must be > 0"),
        ({"lr": {"uniform": [1e-3, 1e-4]}}, None, "low < high"),
        ({"lr": {"normal": [0, 1]}}, None, "expected one of"),
        ({"batch_size": {"choice": []}}, None, "non-empty list"),
        ({}, {"not_an_option": 1}, "not a training option"),
    ],
)
def test_bad_search_spaces_fail_before_any_trial(space, fixed, match):
    with pytest.raises(ValueError, match=match):
        validate_space(space, fixed)


def test_search_file_and_flags(tmp_path):
    f = tmp_path / "search.yaml"
    f.write_text(
        "num_samples: 3\nmax_epochs: 2\nspace:\n  lr: {loguniform: [1.0e-4, 1.0e-2]}\n"
        "  image_size: [96, 128]\nfixed:\n  dropout: 0.1\n"
    )
    args = get_args_parser().parse_args(
        [
            "--data",
            "d",
            "--config",
            str(f),
            "--backbones",
            "resnet18,efficientnet_lite0",
            "--set",
            "label_smoothing=0.05",
            "--set",
            "worker_resources={slot: 1}",
            "--max-epochs",
            "4",
        ]
    )
    cfg = config_from_args(args)
    assert cfg.num_samples == 3 and cfg.max_epochs == 4  # flags beat the file
    assert cfg.space["backbone"] == {"choice": ["resnet18", "efficientnet_lite0"]}
    assert cfg.space["image_size"] == [96, 128]
    assert cfg.fixed == {"dropout": 0.1, "label_smoothing": 0.05, "worker_resources": {"slot": 1}}
    from dataclasses import replace

    assert replace(TrainConfig(data="d"), **cfg.fixed).worker_resources == {"slot": 1.0}  # as each trial
    (tmp_path / "bad.yaml").write_text("num_sample: 3\n")
    with pytest.raises(ValueError, match="unknown keys"):
        load_search_file(str(tmp_path / "bad.yaml"))
    assert cfg.train.data == ["d"] and cfg.train.holdout_source is None
    assert SearchConfig(train=TrainConfig(data="x")).train.data == ["x"]


def test_several_sources_holdout_and_cross_source_objective(tmp_path):
    argv = [
        "--data",
        "a",
        "--data",
        "b.csv",
        "--holdout-source",
        "b.csv",
        "--metric",
        "val_source_min_roc_auc",
    ]
    cfg = config_from_args(get_args_parser().parse_args(argv))
    assert cfg.train.data == ["a", "b.csv"] and cfg.train.holdout_source == "b.csv"
    assert cfg.train.metric == "val_source_min_roc_auc"
    # the leaderboard ranks by the cross-source metric, higher first, each trial at its best epoch
    hist = {
        "t1": {"val_source_min_roc_auc": [0.6, 0.8, 0.7], "val_roc_auc": [0.9, 0.95, 0.97]},
        "t2": {"val_source_min_roc_auc": [0.85, 0.7], "val_roc_auc": [0.8, 0.85]},
    }
    grid = [
        SimpleNamespace(
            metrics={"trial_id": t},
            path=str(tmp_path / t),
            config={"lr": 1e-3},
            error=None,
            metrics_dataframe=pd.DataFrame(
                {
                    **h,
                    "epoch": range(len(h["val_roc_auc"])),
                    "epochs_done": range(1, len(h["val_roc_auc"]) + 1),
                }
            ),
        )
        for t, h in hist.items()
    ]
    board = leaderboard(grid, "val_source_min_roc_auc", "max", max_epochs=3)
    assert board["trial_id"].tolist() == ["t2", "t1"]
    assert board["val_source_min_roc_auc"].tolist() == [0.85, 0.8]
    assert board["best_epoch"].tolist() == [0, 1] and board["status"].tolist() == [
        "stopped_early",
        "completed",
    ]


def test_leaderboard_ties_go_to_the_checkpoint_train_keeps(tmp_path):
    """Equal best scores (a flat validation AUC): the leaderboard names the latest of them, the checkpoint
    Train's retention keeps; the earliest, which it may have deleted, broke the export of a resumed search."""
    hist = pd.DataFrame(
        {
            "val_roc_auc": [0.4375, 0.4375, 0.4375],
            "val_loss": [0.9, 0.7, 0.8],
            "epoch": [0, 1, 2],
            "epochs_done": [1, 2, 3],
            "checkpoint_path": ["ck0", "ck1", "ck2"],
        }
    )
    grid = [
        SimpleNamespace(
            metrics={"trial_id": "t"}, path=str(tmp_path / "t"), config={}, error=None, metrics_dataframe=hist
        )
    ]
    best = leaderboard(grid, "val_roc_auc", "max", max_epochs=3).iloc[0]
    assert best["checkpoint_path"] == "ck2" and best["best_epoch"] == 2
    hist.loc[2, "val_loss"] = 0.7  # a tie on a metric to minimise too
    best = leaderboard(grid, "val_loss", "min", max_epochs=3).iloc[0]
    assert best["checkpoint_path"] == "ck2" and best["val_loss"] == 0.7
    hist.loc[2, "val_loss"] = float("nan")  # a missing value never wins
    best = leaderboard(grid, "val_loss", "min", max_epochs=3).iloc[0]
    assert best["checkpoint_path"] == "ck1"


@pytest.mark.ray
def test_concurrency_leaves_ray_data_a_cpu(ray_session):
    """On 2 CPUs one 2-worker trial runs at a time: a second would take Ray Data's last CPU (ray#54305)."""
    r = trial_resources(SearchConfig(train=TrainConfig(data="x"), num_samples=8))
    assert r["num_workers"] == 2 and r["cpus_per_worker"] == 0.5
    assert r["max_concurrent_trials"] == 1
    capped = trial_resources(
        SearchConfig(train=TrainConfig(data="x"), num_samples=8, max_concurrent_trials=4)
    )
    assert capped["max_concurrent_trials"] == 1
    one = trial_resources(
        SearchConfig(train=TrainConfig(data="x", cpus_per_worker=0.25), num_samples=1, workers_per_trial=1)
    )
    assert one["max_concurrent_trials"] == 1  # never more trials at once than there are trials


def _train_run(root, trial_id: str, val_auc: list[float], keep: set[int]) -> dict[int, str]:
    """A Train run's storage as the loop writes it: one checkpoint_* folder per kept epoch, each with the
    progress (epoch, history so far) in train_state.json. Returns {epoch: checkpoint folder}."""
    from raytumor.train.loop import CHECKPOINT_PROGRESS

    history, kept = [], {}
    for epoch, auc in enumerate(val_auc):
        history.append({"epoch": epoch, "epochs_done": epoch + 1, "val_roc_auc": auc, "val_loss": 1 - auc})
        if epoch in keep:
            ck = root / trial_id / f"checkpoint_2026-12-08_01-00-{epoch:02d}.000000"
            ck.mkdir(parents=True)
            state = {"epoch": epoch, "best": max(h["val_roc_auc"] for h in history), "history": history}
            (ck / CHECKPOINT_PROGRESS).write_text(json.dumps(state))
            kept[epoch] = str(ck)
    (root / trial_id / "checkpoint_manager_snapshot.json").write_text("{}")  # Train's own, not a checkpoint
    return kept


def test_leaderboard_reads_each_trial_from_its_own_checkpoints(tmp_path):
    """A resumed search: Tune restored the trials without their results (it gets metrics, never a checkpoint,
    from TuneReportCallback), so a finished trial the last snapshot called RUNNING came back with an empty
    result.json, and one resumed mid-way lost its first epochs. The leaderboard reads each trial's history
    from its Train run's checkpoints instead, so neither is ranked on what Tune lost."""
    runs = tmp_path / "trials"
    done = _train_run(runs, "ab12c_00000", [0.70, 0.90, 0.80], keep={1, 2})  # finished; best epoch 1
    cut = _train_run(runs, "ab12c_00001", [0.95, 0.60, 0.65, 0.70], keep={0, 3})  # resumed after epoch 1
    grid = [
        SimpleNamespace(  # Tune's view after the restart: no metrics at all
            metrics={}, config={"lr": 1e-3}, error=None, metrics_dataframe=None,
            path=str(tmp_path / "s" / "trial_driver_ab12c_00000_0_lr=0.0010_2026-12-08_01-00-00"),
        ),
        SimpleNamespace(  # only the epochs after the restart
            metrics={"trial_id": "ab12c_00001"}, config={"lr": 3e-3}, error=None,
            path=str(tmp_path / "s" / "trial_driver_ab12c_00001_1_lr=0.0030_2026-12-08_01-00-01"),
            metrics_dataframe=pd.DataFrame(
                {"epoch": [2, 3], "epochs_done": [3, 4], "val_roc_auc": [0.65, 0.70], "val_loss": [0.35, 0.3]}
            ),
        ),
        SimpleNamespace(  # a trial that never saved a checkpoint keeps Tune's results
            metrics={"trial_id": "ab12c_00002"}, config={"lr": 1.0}, error=None,
            path=str(tmp_path / "s" / "trial_driver_ab12c_00002_2_lr=1.0000_2026-12-08_01-00-02"),
            metrics_dataframe=pd.DataFrame({"epoch": [0], "epochs_done": [1], "val_roc_auc": [0.5]}),
        ),
    ]  # fmt: skip
    tune_only = leaderboard(grid, "val_roc_auc", "max", max_epochs=4).set_index("trial_id")
    assert tune_only.loc["ab12c_00000", "epochs_run"] == 0  # what the old leaderboard saw
    assert tune_only.loc["ab12c_00001", "val_roc_auc"] == 0.70

    board = leaderboard(grid, "val_roc_auc", "max", max_epochs=4, train_runs=(str(runs), None))
    assert board["trial_id"].tolist() == ["ab12c_00001", "ab12c_00000", "ab12c_00002"]
    b = board.set_index("trial_id")
    assert b.loc["ab12c_00001", "val_roc_auc"] == 0.95 and b.loc["ab12c_00001", "best_epoch"] == 0
    assert b.loc["ab12c_00001", "checkpoint_path"] == cut[0] and b.loc["ab12c_00001", "status"] == "completed"
    assert b.loc["ab12c_00000", "val_roc_auc"] == 0.90 and b.loc["ab12c_00000", "checkpoint_path"] == done[1]
    assert b.loc["ab12c_00000", "epochs_run"] == 3 and b.loc["ab12c_00000", "status"] == "stopped_early"
    assert b.loc["ab12c_00002", "epochs_run"] == 1 and b.loc["ab12c_00002", "val_roc_auc"] == 0.5


def test_run_history_on_s3(tmp_path, s3_server, s3_client):
    """The same history from a Train run stored in a bucket (``--storage-path s3://...``); checkpoint paths
    are on the bucket's filesystem, as Train reports them."""
    from raytumor.train import run_history
    from raytumor.tune import _storage

    kept = _train_run(tmp_path, "cd34e_00000", [0.6, 0.8], keep={0, 1})
    s3_client.create_bucket(Bucket="runs")
    for p in (tmp_path / "cd34e_00000").rglob("*"):
        if p.is_file():
            s3_client.upload_file(str(p), "runs", f"search/trials/{p.relative_to(tmp_path).as_posix()}")
    path, fs = _storage("s3://runs/search/trials", s3_server)
    hist = run_history(f"{path}/cd34e_00000", fs)
    assert hist["val_roc_auc"].tolist() == [0.6, 0.8]
    assert hist["checkpoint_path"].tolist() == [
        f"runs/search/trials/{Path(k).relative_to(tmp_path).as_posix()}" for k in kept.values()
    ]
    assert run_history(f"{path}/no-such-trial", fs) is None


@pytest.mark.ray
def test_tiny_search_on_s3_asha_leaderboard_bundle_and_resume(ray_session, tmp_path, s3_server, s3_client):
    """4 trials (a sane and a diverging head learning rate, twice), ASHA stops the diverging ones early; the
    winner is exported as a bundle, every trial is on the leaderboard, and the same command resumes."""
    from raytumor.bundle import load_bundle
    from raytumor.phantoms import write_phantom_dataset
    from raytumor.tune import main

    data = tmp_path / "phantoms"
    write_phantom_dataset(data, n_per_class=24, size=96, seed=3)
    # The same images as two sources: a manifest per half (B's names itself in a source column), so every
    # trial also reports the cross-source validation metrics.
    files = sorted(p for p in data.glob("*/*") if p.parent.name in ("no", "yes"))
    site = {"a": str(tmp_path / "site_a.csv"), "b": str(tmp_path / "site_b.csv")}
    half = pd.DataFrame({"path": [str(p) for p in files], "label": [p.parent.name for p in files]})
    half.iloc[::2].to_csv(site["a"], index=False)
    half.iloc[1::2].assign(source="phantom site B via tests").to_csv(site["b"], index=False)
    s3_client.create_bucket(Bucket="tune-store")
    argv = [
        "--data", site["a"], "--data", site["b"], "--out", str(tmp_path / "runs"), "--name", "tiny",
        "--backbones", "efficientnet_lite0", "--num-samples", "2", "--max-epochs", "3",
        "--grace-period", "1", "--reduction-factor", "2", "--metric", "val_loss",
        "--storage-path", "s3://tune-store/searches", "--s3-endpoint", s3_server,
        "--set", "image_size=64", "--set", "batch_size=8", "--set", "weights=imagenet",
        "--set", "warmup_epochs=0",
    ]  # fmt: skip
    cfg_file = tmp_path / "space.json"
    cfg_file.write_text(json.dumps({"space": {"lr": {"grid": [1e-3, 10.0]}, "backbone_lr": [3e-4]}}))
    args = get_args_parser().parse_args([*argv, "--config", str(cfg_file)])
    summary = main(args)

    run = tmp_path / "runs" / "tiny"
    board = pd.read_csv(run / "leaderboard.csv")
    assert len(board) == 4 == summary["trials"]
    assert set(board["config/lr"]) == {1e-3, 10.0}
    # Grid order runs a sane trial first, so each diverging one is below the rung-1 cutoff when it gets there.
    stopped = board.loc[board["status"] == "stopped_early"]
    diverging = board.loc[board["config/lr"] == 10.0]
    assert (diverging["status"] == "stopped_early").all(), board[["config/lr", "status", "epochs_run"]]
    assert (diverging["epochs_run"] == 1).all()  # cut at the first rung (grace period 1)
    assert (stopped["epochs_run"] < 3).all()
    assert board["val_loss"].is_monotonic_increasing  # ranked best first (val_loss: lower is better)
    # every trial saw both sources in validation (the driver's payload carries the source column)
    assert (board["val_sources"] == 2).all() and board["val_source_min_roc_auc"].between(0, 1).all()
    assert summary["best_config"]["lr"] == 1e-3
    assert (run / "search.yaml").exists() and (run / "split_manifest.parquet").exists()
    keys = {o["Key"] for o in s3_client.list_objects_v2(Bucket="tune-store")["Contents"]}
    assert any(k.startswith("searches/tiny/") for k in keys)  # Tune's experiment state
    assert any(k.startswith("searches/trials/") and k.endswith("model.pt") for k in keys)  # checkpoints

    meta = load_bundle(run / "bundle", device="cpu").meta
    assert meta.image_size == 64 and meta.metrics["search"]["config"]["lr"] == 1e-3
    assert meta.metrics["test"]["n"] > 0 and meta.metrics["selection_metric"] == "val_loss"
    assert meta.data["split_manifest_sha256"]
    assert set(meta.data["sources"]) == {site["a"], "phantom site B"}
    assert meta.train_config["data"] == [site["a"], site["b"]]

    # The same command again restores the finished search from S3 instead of re-running the trials.
    again = main(get_args_parser().parse_args([*argv, "--config", str(cfg_file)]))
    assert again["trials"] == 4 and again["best_trial"] == summary["best_trial"]
    assert again["wall_seconds"] < summary["wall_seconds"]


def test_trial_count_multiplies_the_grid():
    """The demo's search (num_samples 1, a 2-backbone grid) runs 2 trials: the log said "1 trials"."""
    from raytumor.tune import n_trials

    space = {
        "backbone": {"grid": ["efficientnet_lite0", "efficientnet_lite1"]},
        "lr": {"loguniform": [1e-3, 5e-3]},
    }
    assert n_trials(space, 1) == 2
    assert n_trials({**space, "batch_size": {"grid": [16, 32, 64]}}, 2) == 12
    assert n_trials({"lr": [1e-3, 3e-3]}, 6) == 6  # a list is a choice, sampled per trial
