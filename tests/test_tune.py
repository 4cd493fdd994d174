"""Tune: search-space validation, concurrency sizing, and a real tiny ASHA search with S3 storage."""

from __future__ import annotations

import json
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
