"""Tune: search backbones and hyperparameters with Ray Tune, one Ray Train run per trial.

Train V2 pattern: ``Tuner(driver_fn)`` where each trial's driver builds a ``TorchTrainer`` named after the
trial id and forwards its reports with ``TuneReportCallback`` (``Tuner(trainer)`` is gone in Train V2).
The data is catalogued, de-duplicated and split once in the search driver, so every trial trains and
validates on the same leakage-safe split and the winner's test metrics are comparable with ``train``'s.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import re
import signal
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import pandas as pd
import yaml

from raytumor.config import HelpFormatter, add_options, echo, from_args, opt
from raytumor.model import check_weights, list_backbones
from raytumor.runtime import init_ray, train_resources
from raytumor.storage import StorageOptions, get_filesystem
from raytumor.train import (
    SplitData,
    TrainConfig,
    build_datasets,
    check_metric,
    discard_staging,
    export_bundle,
    is_min_metric,
    load_checkpoint_files,
    make_trainer,
    pin_augment_in,
    prepare_split,
    resolve_metric,
    run_history,
    write_split,
    write_test_report,
)

# What a search may vary; any other TrainConfig field is fixed for the search with `--set`/`fixed:`.
TUNABLE = (
    "backbone",
    "weights",
    "lr",
    "backbone_lr",
    "weight_decay",
    "batch_size",
    "augment_strength",
    "shift_augment",
    "preprocess",
    "freeze_epochs",
    "image_size",
    "dropout",
    "label_smoothing",
    "warmup_epochs",
)

# The default search: both backbones have ImageNet weights inside installed wheels, so it runs offline.
DEFAULT_SPACE: dict[str, Any] = {
    "backbone": {"choice": ["efficientnet_lite0", "efficientnet_lite1"]},
    "lr": {"loguniform": [3e-4, 3e-3]},
    "backbone_lr": {"loguniform": [1e-4, 1e-3]},
    "weight_decay": {"loguniform": [1e-5, 1e-2]},
    "batch_size": {"choice": [16, 32]},
    "augment_strength": {"uniform": [0.5, 1.0]},
    "freeze_epochs": {"choice": [0, 1]},
    "image_size": {"choice": [128, 160]},
}

SAMPLERS = ("choice", "grid", "uniform", "loguniform", "randint", "quniform")


# Training options a search takes on its command line (the base of every trial); any other training
# option is fixed for the whole search with --set KEY=VALUE or a file's `fixed:`.
SEARCH_TRAIN_OPTIONS = (
    "data",
    "holdout_source",
    "out",
    "name",
    "metric",
    "cpus_per_worker",
    "use_gpu",
    "storage_path",
    "s3_endpoint",
    "split",
    "limit_per_class",
    "test_data",
    "report",
    "seed",
)


@dataclass(kw_only=True)
class SearchConfig:
    # The base of every trial: data, split, storage, seed... (its `name` names the search, default "search")
    train: TrainConfig = opt(cli=False)
    space: dict[str, Any] = opt(factory=lambda: dict(DEFAULT_SPACE), cli=False)  # samplers, see DEFAULT_SPACE
    fixed: dict[str, Any] = opt(factory=dict, cli=False)  # TrainConfig fields held constant
    num_samples: int = opt(6, "trials (times each grid)")
    max_epochs: int = opt(6, "epochs per trial")
    grace_period: int = opt(1, "ASHA: epochs before a trial can be stopped")
    reduction_factor: float = opt(2, "ASHA reduction factor")
    max_concurrent_trials: int | None = opt(None, "trials at once (default: what the cluster fits)")
    workers_per_trial: int | None = opt(None, "training workers per trial (default: one per GPU, 2 on CPU)")

    @property
    def search_name(self) -> str:
        return self.train.name or "search"

    @property
    def run_dir(self) -> Path:
        return Path(self.train.out).expanduser().resolve() / self.search_name

    def trial_base(self, res: dict[str, Any]) -> TrainConfig:
        """Each trial's TrainConfig before its sampled values: the search's options, then ``fixed``."""
        base = replace(
            self.train,
            name=self.search_name,
            epochs=self.max_epochs,
            patience=self.max_epochs,  # ASHA decides who stops early
            num_workers=res["num_workers"],
            cpus_per_worker=res["cpus_per_worker"],
            use_gpu=str(res["use_gpu"]).lower(),
            max_failures=1,
        )
        return replace(base, **self.fixed)


# ----------------------------------------------------------------------------------------------------------
# Search space


def validate_space(space: dict[str, Any], fixed: dict[str, Any] | None = None) -> None:
    """Clear errors for unknown parameters, samplers, bounds and backbones before any trial starts."""
    train_fields = {f.name for f in fields(TrainConfig)}
    for key, spec in space.items():
        if key not in TUNABLE:
            raise ValueError(f"search space: {key!r} is not tunable; tunable: {', '.join(TUNABLE)}")
        if isinstance(spec, dict):
            if len(spec) != 1 or next(iter(spec)) not in SAMPLERS:
                raise ValueError(
                    f"search space: {key}: expected one of {SAMPLERS} as the only key, got {spec}"
                )
            kind, args = next(iter(spec.items()))
            if not isinstance(args, list) or not args:
                raise ValueError(f"search space: {key}: {kind} needs a non-empty list, got {args!r}")
            if kind in ("uniform", "loguniform", "randint", "quniform"):
                if len(args) != (3 if kind == "quniform" else 2) or not args[0] < args[1]:
                    raise ValueError(
                        f"search space: {key}: {kind} needs [low, high{', q' if kind == 'quniform' else ''}] with low < high"
                    )
                if kind == "loguniform" and args[0] <= 0:
                    raise ValueError(f"search space: {key}: loguniform bounds must be > 0")
    unknown = sorted(set(space_values(space, "backbone", [])) - set(list_backbones()))
    if unknown:
        raise ValueError(f"search space: unknown backbone(s) {unknown}; known: {list_backbones()}")
    for key in fixed or {}:
        if key not in train_fields or key in ("data", "out", "name"):
            raise ValueError(f"fixed: {key!r} is not a training option")


def space_values(space: dict[str, Any], key: str, default: Any) -> list[Any]:
    """Every value ``key`` can take in a (validated) space: a list, a choice/grid, or a scalar."""
    spec = space.get(key, default)
    if isinstance(spec, dict):
        kind, args = next(iter(spec.items()))
        return list(args) if kind in ("choice", "grid") else []
    return list(spec) if isinstance(spec, list) else [spec]


def n_trials(space: dict[str, Any], num_samples: int) -> int:
    """Trials Tune runs: ``num_samples`` times every combination of the grid dimensions."""
    n = num_samples
    for spec in space.values():
        if isinstance(spec, dict) and "grid" in spec:
            n *= len(spec["grid"])
    return n


def to_param_space(space: dict[str, Any]) -> dict[str, Any]:
    """YAML/JSON spec → Ray Tune samplers. A list is a choice, a scalar is fixed."""
    from ray import tune

    out: dict[str, Any] = {}
    for key, spec in space.items():
        if isinstance(spec, dict):
            kind, args = next(iter(spec.items()))
            out[key] = {
                "choice": lambda a: tune.choice(a),
                "grid": lambda a: tune.grid_search(a),
                "uniform": lambda a: tune.uniform(a[0], a[1]),
                "loguniform": lambda a: tune.loguniform(a[0], a[1]),
                "randint": lambda a: tune.randint(a[0], a[1]),
                "quniform": lambda a: tune.quniform(a[0], a[1], a[2]),
            }[kind](args)
        elif isinstance(spec, list):
            out[key] = tune.choice(spec)
        else:
            out[key] = spec
    return out


def load_search_file(path: str) -> dict[str, Any]:
    """A YAML or JSON file: ``space:`` (samplers), ``fixed:`` (constants) and any SearchConfig scalar."""
    text = Path(path).read_text()
    doc = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: expected a mapping with 'space:' and options, got {type(doc).__name__}")
    known = (set(SEARCH_TRAIN_OPTIONS) | {f.name for f in fields(SearchConfig)}) - {"data", "train"}
    unknown = set(doc) - known
    if unknown:
        raise ValueError(f"{path}: unknown keys {sorted(unknown)}; known: {sorted(known)}")
    return doc


# ----------------------------------------------------------------------------------------------------------
# Resources


def trial_resources(cfg: SearchConfig) -> dict[str, Any]:
    """Workers per trial and how many trials fit at once, leaving every trial a CPU for Ray Data.

    Tune packs trials by their trainers' reservations only; Ray Data then finds no CPU to decode and
    every trial waits forever (ray#54305). Cap concurrency so each running trial keeps ≥ 1 free CPU.
    """
    t = cfg.train
    res = train_resources(cfg.workers_per_trial, t.use_gpu, t.cpus_per_worker)
    if res.use_gpu and cfg.workers_per_trial is None:
        res = train_resources(1, t.use_gpu, t.cpus_per_worker)  # one GPU per trial: most trials at once
        res.cpus_per_worker = min(
            res.cpus_per_worker, max(1.0, res.cluster_cpus / max(1, res.cluster_gpus) / 2)
        )
    per_trial_cpu = res.num_workers * res.cpus_per_worker + DRIVER_CPU
    by_cpu = int(res.cluster_cpus // (per_trial_cpu + DATA_CPU_RESERVE))
    by_gpu = int(res.cluster_gpus // res.num_workers) if res.use_gpu else by_cpu
    safe = max(1, min(by_cpu, by_gpu))
    want = cfg.max_concurrent_trials or safe
    if want > safe:
        print(
            f"[raytumor] --max-concurrent-trials {want} would starve Ray Data on this cluster "
            f"({res.cluster_cpus:g} CPUs, {res.cluster_gpus:g} GPUs); using {safe}"
        )
    return {
        "num_workers": res.num_workers,
        "cpus_per_worker": res.cpus_per_worker,
        "use_gpu": res.use_gpu,
        "max_concurrent_trials": min(want, safe, max(1, n_trials(cfg.space, cfg.num_samples))),
        "cluster_cpus": res.cluster_cpus,
        "cluster_gpus": res.cluster_gpus,
    }


DRIVER_CPU = 0.0  # the driver only waits on its TorchTrainer; a fraction here would leave Ray Data 0.95 CPU: too little for a 1-CPU task
DRIVER_MEMORY = 256 * 1024**2
DATA_CPU_RESERVE = 1.0


# ----------------------------------------------------------------------------------------------------------
# One trial


def _storage(storage_path: str, s3_endpoint: str | None) -> tuple[str, Any]:
    """(path, pyarrow filesystem or None) for Ray storage; an S3 endpoint override needs an explicit fs."""
    if storage_path.startswith(("s3://", "gs://")) and s3_endpoint:
        fs, path = get_filesystem(storage_path, StorageOptions.from_env(s3_endpoint))
        return path, fs
    return storage_path, None


def trial_driver(config: dict[str, Any], payload: dict[str, Any]) -> None:
    """Runs in the Tune trial: build and fit one TorchTrainer with this trial's hyperparameters."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    init_ray()
    trial_id = ray.tune.get_context().get_trial_id()
    cfg = pin_augment_in(replace(TrainConfig(**payload["base"]), **config))
    train_ds, val_ds = build_datasets(payload["train"], payload["val"], cfg)
    path, fs = _storage(payload["trials_storage"], cfg.s3_endpoint)
    trainer, _ = make_trainer(
        cfg,
        payload["classes"],
        payload["negative_class"],
        len(payload["train"]),
        {"train": train_ds, "val": val_ds},
        name=trial_id,  # a restored search reruns this trial under the same name: Train resumes it
        storage_path=path,
        storage_filesystem=fs,
        callbacks=[TuneReportCallback()],
    )
    trainer.fit()


# ----------------------------------------------------------------------------------------------------------
# The search


# Tune's trial directory name: <trainable>_<trial id>_<index>_<config>_<date>
_TRIAL_ID = re.compile(r"_([0-9a-f]+_\d{5})_\d+_")


def trial_id_of(result: Any) -> str:
    """The Tune trial id of a result (the name its Train run is stored under), even with no metrics."""
    m = _TRIAL_ID.search(Path(result.path).name)
    return (result.metrics or {}).get("trial_id") or (m.group(1) if m else Path(result.path).name)


def _fill_lost_epochs(tune_hist: pd.DataFrame | None, own: pd.DataFrame | None) -> pd.DataFrame | None:
    """Tune's per-epoch results of a trial with the epochs before its first one taken from the Train run's
    own history: a restored trial's ``result.json`` starts again empty (Tune gets metrics, never a
    checkpoint, from ``TuneReportCallback``), so a resumed trial loses its first epochs and a finished one
    that the last state snapshot still called RUNNING loses them all. Tune's rows are kept as they are:
    epochs a trial ran after ASHA's stop but before it took effect stay off the board, as ASHA saw it."""
    if own is None:
        return tune_hist
    if tune_hist is None or tune_hist.empty or "epoch" not in tune_hist:
        return own
    lost = own[own["epoch"] < tune_hist["epoch"].min()]
    return pd.concat([lost, tune_hist], ignore_index=True) if len(lost) else tune_hist


def leaderboard(
    result_grid: Any, metric: str, mode: str, max_epochs: int, interrupted: frozenset[str] = frozenset(),
    train_runs: tuple[str, Any] | None = None,
) -> pd.DataFrame:  # fmt: skip
    """One row per trial: its config, best epoch's metrics and checkpoint, and how it ended
    (``completed``, ``stopped_early`` by ASHA, ``error``, or ``interrupted``: the trials whose directory
    names are in ``interrupted``, unfinished when the search was stopped; they resume when it is rerun).

    ``train_runs``: (path, filesystem) where the trials' Train runs are stored: the epochs a resumed
    search's Tune results lost are read back from each trial's own checkpoints (:func:`_fill_lost_epochs`)."""
    rows = []
    for r in result_grid:
        tid = trial_id_of(r)
        hist = r.metrics_dataframe
        if train_runs is not None:
            hist = _fill_lost_epochs(hist, run_history(f"{train_runs[0].rstrip('/')}/{tid}", train_runs[1]))
        row: dict[str, Any] = {"trial_id": tid}
        row.update({f"config/{k}": v for k, v in (r.config or {}).items()})
        if hist is not None and metric in hist.columns and hist[metric].notna().any():
            vals = hist[metric]
            top = vals.max() if mode == "max" else vals.min()
            # Ties go to the latest epoch: Train's checkpoint retention (num_to_keep) keeps the later of
            # equally scored checkpoints, so an earlier one may already be deleted.
            best = hist.loc[vals.index[vals == top][-1]]
            row.update(
                {
                    k: best[k]
                    for k in hist.columns
                    if k.startswith("val_") or k in ("epoch", "checkpoint_path")
                }
            )
            row["epochs_run"] = int(hist["epochs_done"].max()) if "epochs_done" in hist else len(hist)
            row["best_epoch"] = int(best["epoch"])
            row[metric] = float(best[metric])
        else:
            row["epochs_run"] = 0
        if r.error:
            row["status"] = "error"
        elif Path(r.path).name in interrupted:
            row["status"] = "interrupted"
        else:
            row["status"] = "stopped_early" if row["epochs_run"] < max_epochs else "completed"
        row["error"] = None if r.error is None else f"{type(r.error).__name__}: {r.error}"[:500]
        rows.append(row)
    df = pd.DataFrame(rows)
    if metric in df.columns:
        df = df.sort_values(metric, ascending=(mode == "min"), na_position="last", ignore_index=True)
    df.insert(0, "rank", np.arange(1, len(df) + 1))
    return df


RESUME_HINT = "run the same command again to resume"


class SearchInterrupted(Exception):
    """Ctrl-C stopped the search: Tune saved its state, nothing was exported, the same command resumes it."""

    def __init__(self, summary: dict[str, Any]):
        super().__init__(f"search interrupted; {RESUME_HINT}")
        self.summary = summary


class _DropTuneRestoreHint(logging.Filter):
    """Tune's own interrupt epilogue names ``Tuner.restore(...)``, an API a raytumor user never calls."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = str(record.msg)
        return not msg.startswith(("Experiment has been interrupted", "Trials did not complete"))


@contextlib.contextmanager
def _tune_signals() -> Iterator[None]:
    """Around ``Tuner.fit``: Tune swaps in its own SIGINT handler (first Ctrl-C: stop, save the experiment
    state, return) and leaves it installed after a normal finish, where it would swallow every later Ctrl-C
    (the demo's training, the export). Restore ours afterwards, and drop Tune's restore hint."""
    tune_log = logging.getLogger("ray.tune.tune")
    quiet = _DropTuneRestoreHint()
    tune_log.addFilter(quiet)
    handler = signal.getsignal(signal.SIGINT)
    try:
        yield
    finally:
        tune_log.removeFilter(quiet)
        with contextlib.suppress(ValueError):  # not the main thread: Tune installed nothing either
            signal.signal(signal.SIGINT, handler)


def fit_search(tuner: Any) -> tuple[Any, frozenset[str]]:
    """``tuner.fit()``; returns the results and the directory names of the trials an interrupted search
    left unfinished (empty when it ran to the end)."""
    with _tune_signals():
        grid = tuner.fit()
    return grid, unfinished_trials(grid.experiment_path, grid.filesystem)


def unfinished_trials(experiment_path: str, filesystem: Any = None) -> frozenset[str]:
    """Trials not terminated or failed in the search's saved state (what a rerun resumes).

    Not the live Trial objects fit() returns: on Ctrl-C Tune saves the state, then stops the running
    trials and marks them TERMINATED, so an interrupted trial looks finished (and was reported as
    ``stopped_early``). The state saved before that stop still says RUNNING/PAUSED/PENDING."""
    from ray.tune import ExperimentAnalysis

    # It warns about every trial that has not reported yet: expected for an interrupted search.
    quiet = logging.getLogger("ray.tune.analysis.experiment_analysis")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        saved = ExperimentAnalysis(experiment_path, storage_filesystem=filesystem)
    finally:
        quiet.setLevel(level)
    return frozenset(Path(t.path).name for t in saved.trials if t.status not in ("TERMINATED", "ERROR"))


def _make_tuner(
    cfg: SearchConfig, trainable: Any, metric: str, res: dict[str, Any], where: tuple, scheduler: Any = None
) -> Any:
    """A new Tuner, or the interrupted search at the same storage restored (finished trials kept).
    ``scheduler``: ASHA over ``cfg``'s epochs unless given (``raytumor cv``: FIFO, every fold runs out)."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import BasicVariantGenerator

    tune_path, tune_fs, storage_root = where
    experiment = f"{tune_path.rstrip('/')}/{cfg.search_name}"
    if tune.Tuner.can_restore(experiment, storage_filesystem=tune_fs):
        print(f"[raytumor] resuming search from {storage_root}/{cfg.search_name}")
        return tune.Tuner.restore(
            experiment, trainable=trainable, resume_errored=True, storage_filesystem=tune_fs
        )
    return tune.Tuner(
        trainable,
        param_space=to_param_space(cfg.space),
        tune_config=tune.TuneConfig(
            metric=metric,
            mode="min" if is_min_metric(metric) else "max",
            num_samples=cfg.num_samples,
            # A search_alg given here owns the concurrency limit (Tune ignores max_concurrent_trials).
            search_alg=BasicVariantGenerator(
                random_state=cfg.train.seed, max_concurrent=res["max_concurrent_trials"]
            ),
            scheduler=scheduler
            or ASHAScheduler(
                time_attr="epochs_done",
                max_t=cfg.max_epochs,
                grace_period=cfg.grace_period,
                reduction_factor=cfg.reduction_factor,
            ),
        ),
        run_config=tune.RunConfig(
            name=cfg.search_name,
            storage_path=tune_path,
            storage_filesystem=tune_fs,
            failure_config=tune.FailureConfig(max_failures=1),
            verbose=1,
        ),
    )


def _export_winner(
    board: pd.DataFrame, base: TrainConfig, data: SplitData, metric: str, split_sha: str, run_dir: Path,
    tune_fs: Any,
) -> tuple[Any, dict[str, Any], pd.Series, dict[str, Any]]:  # fmt: skip
    """The best trial's best checkpoint as the search's bundle; (meta, test metrics, row, its config)."""
    import ray.train

    ok = (
        board[board[metric].notna() & board["checkpoint_path"].notna()]
        if metric in board
        else board.iloc[0:0]
    )
    if ok.empty:
        raise RuntimeError(f"no trial reported {metric}; see {run_dir / 'leaderboard.csv'}")
    win = ok.iloc[0]
    winner_cfg = {k.split("/", 1)[1]: _plain(v) for k, v in win.items() if k.startswith("config/")}
    state_dict, state = load_checkpoint_files(
        ray.train.Checkpoint(win["checkpoint_path"], filesystem=tune_fs)
    )
    best_metrics = {k: _plain(v) for k, v in win.items() if k.startswith("val_") or k == "epoch"}
    meta, test = export_bundle(
        replace(base, **winner_cfg), data, state_dict, best_metrics, pd.DataFrame(state["history"]), metric,
        split_sha, run_dir / "bundle",
        extra_meta={"search": {"trial_id": win["trial_id"], "trials": len(board), "config": winner_cfg}},
    )  # fmt: skip
    return meta, test, win, winner_cfg


def run_search(cfg: SearchConfig) -> dict[str, Any]:
    """Run (or resume) the search; export the winner as a bundle with a leaderboard beside it."""
    from ray import tune

    t0 = time.time()
    validate_space(cfg.space, cfg.fixed)
    for backbone in space_values(cfg.space, "backbone", cfg.fixed.get("backbone", cfg.train.backbone)):
        check_weights(backbone, cfg.fixed.get("weights", cfg.train.weights))
    init_ray()
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    res = trial_resources(cfg)
    base = cfg.trial_base(res)
    # Echo what was searched, so a leaderboard can always be read against its space.
    (run_dir / "search.yaml").write_text(echo(cfg) + yaml.safe_dump({"resources": res}, sort_keys=False))
    data = prepare_split(base)
    split_sha, _ = write_split(data, run_dir)
    metric = resolve_metric(base.metric, data.classes, data.negative_class)
    check_metric(metric, data.files("val"))
    storage_root = base.storage_path or str(run_dir / "tune")
    tune_path, tune_fs = _storage(storage_root, base.s3_endpoint)
    payload = {
        "base": asdict(base),
        "train": data.files("train"),
        "val": data.files("val"),
        "classes": data.classes,
        "negative_class": data.negative_class,
        "trials_storage": storage_root.rstrip("/") + "/trials",
    }
    trainable = tune.with_resources(
        tune.with_parameters(trial_driver, payload=payload),
        {"CPU": DRIVER_CPU, "memory": DRIVER_MEMORY},  # Tune refuses an all-zero request
    )
    tuner = _make_tuner(cfg, trainable, metric, res, (tune_path, tune_fs, storage_root))
    mode = "min" if is_min_metric(metric) else "max"
    print(
        f"[raytumor] search: {n_trials(cfg.space, cfg.num_samples)} trials, ≤{cfg.max_epochs} epochs each, ASHA on {metric} "
        f"({mode}); {res['max_concurrent_trials']} at a time, {res['num_workers']} worker(s) × "
        f"{res['cpus_per_worker']} CPU{' + 1 GPU' if res['use_gpu'] else ''} per trial"
    )
    grid, unfinished = fit_search(tuner)
    board = leaderboard(
        grid, metric, mode, cfg.max_epochs, unfinished, _storage(payload["trials_storage"], base.s3_endpoint)
    )
    board.to_csv(run_dir / "leaderboard.csv", index=False)
    board.to_parquet(run_dir / "leaderboard.parquet", index=False)
    if unfinished:
        # Stopped by Ctrl-C: the state is saved and the winner of an unfinished search is no winner.
        summary = {
            "run_dir": str(run_dir),
            "interrupted": True,
            "resume": RESUME_HINT,
            "leaderboard": str(run_dir / "leaderboard.csv"),
            "trials": len(board),
            "trial_status": board["status"].value_counts().to_dict(),
            "metric": metric,
            "resources": res,
            "wall_seconds": round(time.time() - t0, 1),
        }
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
        raise SearchInterrupted(summary)
    meta, test, win, winner_cfg = _export_winner(board, base, data, metric, split_sha, run_dir, tune_fs)
    report = write_test_report(run_dir, data, base.s3_endpoint, base.seed) if base.report else None
    summary = {
        "run_dir": str(run_dir),
        "bundle": str(run_dir / "bundle"),
        "bundle_id": meta.bundle_id,
        "report": report,
        "leaderboard": str(run_dir / "leaderboard.csv"),
        "trials": len(board),
        "trial_status": board["status"].value_counts().to_dict(),
        "best_trial": win["trial_id"],
        "best_config": winner_cfg,
        "metric": metric,
        "val": meta.metrics["val"],
        "test": test,
        "resources": res,
        "wall_seconds": round(time.time() - t0, 1),
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    discard_staging(run_dir / "bundle")
    return summary


def _plain(v: Any) -> Any:
    """numpy scalars from a DataFrame row → Python values (for dataclasses and JSON)."""
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, float) and math.isnan(v):
        return None
    return v


# ----------------------------------------------------------------------------------------------------------
# CLI


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Search backbones and hyperparameters with Ray Tune (ASHA early stopping)",
        add_help=add_help,
        formatter_class=HelpFormatter,
    )
    add_options(p, TrainConfig, only=SEARCH_TRAIN_OPTIONS)
    add_options(p, SearchConfig)
    p.add_argument(
        "--config",
        default=None,
        metavar="FILE",
        help="YAML/JSON search file: space: (samplers), fixed: (training options held constant), and any "
        "option above by name; options on the command line win",
    )
    p.add_argument("--backbones", default=None, help="comma-separated backbones (overrides the space)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="fix a training option")
    return p


def config_from_args(args: argparse.Namespace) -> SearchConfig:
    """The search from parsed options: the search file's values where an option was left at its default
    (the command line wins), its ``space``/``fixed``, then ``--backbones`` and ``--set``."""
    doc = load_search_file(args.config) if args.config else {}
    parser = get_args_parser()
    defaults = {a.dest: a.default for a in parser._actions}
    given = {k: v for k, v in vars(args).items() if k in defaults and v != defaults[k]}
    values = {**{k: v for k, v in doc.items() if k not in ("space", "fixed")}, **given}
    merged = argparse.Namespace(**{**vars(args), **values})
    train = from_args(TrainConfig, merged, **{"data": args.data})
    space = dict(doc.get("space") or DEFAULT_SPACE)
    if args.backbones:
        space["backbone"] = {"choice": [b for b in args.backbones.split(",") if b]}
    fixed = dict(doc.get("fixed") or {})
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        fixed[key] = yaml.safe_load(value)
    # A fixed option wins over the space: `--set image_size=64` must not be re-sampled per trial.
    space = {k: v for k, v in space.items() if k not in fixed}
    return from_args(SearchConfig, merged, train=train, space=space, fixed=fixed)


def exit_interrupted(what: str, summary: dict[str, Any] | None = None) -> NoReturn:
    """Ctrl-C: one line saying what was saved and how to go on, and the shell's exit status for SIGINT."""
    status = f" (trials: {summary['trial_status']})" if summary and "trial_status" in summary else ""
    print(f"[raytumor] {what} interrupted{status}; nothing exported: {RESUME_HINT}", flush=True)
    raise SystemExit(130)


def main(args: argparse.Namespace) -> dict[str, Any]:
    try:
        summary = run_search(config_from_args(args))
    except SearchInterrupted as e:
        exit_interrupted("search", e.summary)
    except KeyboardInterrupt:  # before the search started, or a second Ctrl-C while Tune was saving
        exit_interrupted("search")
    t = summary["test"]

    def f(k: str) -> str:
        return "n/a" if t.get(k) is None else f"{t[k]:.4f}"

    print(
        f"[raytumor] {summary['trials']} trials {summary['trial_status']}; best {summary['best_trial']}: {summary['best_config']}"
    )
    print(
        f"[raytumor] winner test (n={t.get('n', 0)}): accuracy {f('accuracy')}  ROC-AUC {f('roc_auc')}  "
        f"sensitivity {f('sensitivity')}  specificity {f('specificity')}"
    )
    print(f"[raytumor] done in {summary['wall_seconds']:.0f}s")
    print(f"[raytumor] leaderboard: {summary['leaderboard']}")
    print(f"[raytumor] bundle: {summary['bundle']}")
    return summary
