"""Tune: search backbones and hyperparameters with Ray Tune, one Ray Train run per trial.

Train V2 pattern: ``Tuner(driver_fn)`` where each trial's driver builds a ``TorchTrainer`` named after the
trial id and forwards its reports with ``TuneReportCallback`` (``Tuner(trainer)`` is gone in Train V2).
The data is catalogued, de-duplicated and split once in the search driver, so every trial trains and
validates on the same leakage-safe split and the winner's test metrics are comparable with ``train``'s.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from raytumor.train import DATA_HELP, HOLDOUT_HELP, TrainConfig, _is_min_metric

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


@dataclass
class SearchConfig:
    data: list[str]  # one source per entry; a single str is accepted
    out: str = "runs"
    name: str | None = None
    space: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_SPACE))
    fixed: dict[str, Any] = field(default_factory=dict)  # TrainConfig fields held constant
    num_samples: int = 6
    max_epochs: int = 6
    grace_period: int = 1
    reduction_factor: float = 2
    metric: str = "auto"
    max_concurrent_trials: int | None = None
    workers_per_trial: int | None = None
    cpus_per_worker: float | None = None
    use_gpu: str = "auto"
    storage_path: str | None = None  # local dir or s3://bucket/prefix (needed on multi-node clusters)
    s3_endpoint: str | None = None
    split: tuple[float, float, float] = (0.7, 0.15, 0.15)
    limit_per_class: int | None = None
    test_data: str | None = None
    holdout_source: str | None = None  # leave-one-source-out: this source is the test split
    report: bool = True  # HTML report of the winner on the test split
    seed: int = 0

    def __post_init__(self) -> None:
        self.data = [self.data] if isinstance(self.data, str) else list(self.data)

    @property
    def search_name(self) -> str:
        return self.name or "search"

    @property
    def run_dir(self) -> Path:
        return Path(self.out).expanduser().resolve() / self.search_name


# ----------------------------------------------------------------------------------------------------------
# Search space


def validate_space(space: dict[str, Any], fixed: dict[str, Any] | None = None) -> None:
    """Clear errors for unknown parameters, samplers, bounds and backbones before any trial starts."""
    from raytumor.model import list_backbones

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
            values = args if kind in ("choice", "grid") else []
        else:
            values = spec if isinstance(spec, list) else [spec]
        if key == "backbone":
            unknown = sorted(set(values) - set(list_backbones()))
            if unknown:
                raise ValueError(f"search space: unknown backbone(s) {unknown}; known: {list_backbones()}")
    for key in fixed or {}:
        if key not in train_fields or key in ("data", "out", "name"):
            raise ValueError(f"fixed: {key!r} is not a training option")


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
    known = {f.name for f in fields(SearchConfig)} - {"data"}
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
    from raytumor.runtime import train_resources

    res = train_resources(cfg.workers_per_trial, cfg.use_gpu, cfg.cpus_per_worker)
    if res.use_gpu and cfg.workers_per_trial is None:
        res = train_resources(1, cfg.use_gpu, cfg.cpus_per_worker)  # one GPU per trial: most trials at once
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
        "max_concurrent_trials": min(want, safe, max(1, cfg.num_samples)),
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
        from raytumor.ingest import StorageOptions, get_filesystem

        fs, path = get_filesystem(storage_path, StorageOptions.from_env(s3_endpoint))
        return path, fs
    return storage_path, None


def trial_driver(config: dict[str, Any], payload: dict[str, Any]) -> None:
    """Runs in the Tune trial: build and fit one TorchTrainer with this trial's hyperparameters."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from raytumor.runtime import init_ray
    from raytumor.train import build_datasets, make_trainer

    init_ray()
    trial_id = ray.tune.get_context().get_trial_id()
    cfg = replace(TrainConfig(**payload["base"]), **config)
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


def leaderboard(result_grid: Any, metric: str, mode: str, max_epochs: int) -> pd.DataFrame:
    """One row per trial: its config, best epoch's metrics and checkpoint, and how it ended."""
    rows = []
    for r in result_grid:
        hist = r.metrics_dataframe
        row: dict[str, Any] = {"trial_id": (r.metrics or {}).get("trial_id") or Path(r.path).name}
        row.update({f"config/{k}": v for k, v in (r.config or {}).items()})
        if hist is not None and metric in hist.columns and hist[metric].notna().any():
            best = hist.loc[hist[metric].idxmax() if mode == "max" else hist[metric].idxmin()]
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
        row["status"] = (
            "error" if r.error else ("stopped_early" if row["epochs_run"] < max_epochs else "completed")
        )
        row["error"] = None if r.error is None else f"{type(r.error).__name__}: {r.error}"[:500]
        rows.append(row)
    df = pd.DataFrame(rows)
    if metric in df.columns:
        df = df.sort_values(metric, ascending=(mode == "min"), na_position="last", ignore_index=True)
    df.insert(0, "rank", np.arange(1, len(df) + 1))
    return df


def run_search(cfg: SearchConfig) -> dict[str, Any]:
    """Run (or resume) the search; export the winner as a bundle with a leaderboard beside it."""
    import ray.train
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import BasicVariantGenerator

    from raytumor.runtime import init_ray
    from raytumor.train import (
        check_metric,
        export_bundle,
        load_checkpoint_files,
        prepare_split,
        resolve_metric,
        write_split,
        write_test_report,
    )

    t0 = time.time()
    validate_space(cfg.space, cfg.fixed)
    init_ray()
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    res = trial_resources(cfg)
    base = TrainConfig(
        data=cfg.data,
        out=cfg.out,
        name=cfg.search_name,
        epochs=cfg.max_epochs,
        patience=cfg.max_epochs,  # ASHA decides who stops early
        num_workers=res["num_workers"],
        cpus_per_worker=res["cpus_per_worker"],
        use_gpu=str(res["use_gpu"]).lower(),
        metric=cfg.metric,
        split=cfg.split,
        limit_per_class=cfg.limit_per_class,
        s3_endpoint=cfg.s3_endpoint,
        test_data=cfg.test_data,
        holdout_source=cfg.holdout_source,
        seed=cfg.seed,
        max_failures=1,
    )
    base = replace(base, **cfg.fixed)
    # Echo what was searched, so a leaderboard can always be read against its space.
    (run_dir / "search.yaml").write_text(
        yaml.safe_dump({**asdict(cfg), "split": list(cfg.split), "resources": res}, sort_keys=False)
    )

    data = prepare_split(base)
    split_sha, _ = write_split(data, run_dir)
    metric = resolve_metric(cfg.metric, data.classes, data.negative_class)
    check_metric(metric, data.files("val"))
    mode = "min" if _is_min_metric(metric) else "max"

    storage_root = cfg.storage_path or str(run_dir / "tune")
    tune_path, tune_fs = _storage(storage_root, cfg.s3_endpoint)
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
    experiment = f"{tune_path.rstrip('/')}/{cfg.search_name}"
    if tune.Tuner.can_restore(experiment, storage_filesystem=tune_fs):
        print(f"[raytumor] resuming search from {storage_root}/{cfg.search_name}")
        tuner = tune.Tuner.restore(
            experiment, trainable=trainable, resume_errored=True, storage_filesystem=tune_fs
        )
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=to_param_space(cfg.space),
            tune_config=tune.TuneConfig(
                metric=metric,
                mode=mode,
                num_samples=cfg.num_samples,
                # A search_alg given here owns the concurrency limit (Tune ignores max_concurrent_trials).
                search_alg=BasicVariantGenerator(
                    random_state=cfg.seed, max_concurrent=res["max_concurrent_trials"]
                ),
                scheduler=ASHAScheduler(
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
    print(
        f"[raytumor] search: {cfg.num_samples} trials, ≤{cfg.max_epochs} epochs each, ASHA on {metric} "
        f"({mode}); {res['max_concurrent_trials']} at a time, {res['num_workers']} worker(s) × "
        f"{res['cpus_per_worker']} CPU{' + 1 GPU' if res['use_gpu'] else ''} per trial"
    )
    grid = tuner.fit()

    board = leaderboard(grid, metric, mode, cfg.max_epochs)
    board.to_csv(run_dir / "leaderboard.csv", index=False)
    board.to_parquet(run_dir / "leaderboard.parquet", index=False)
    ok = (
        board[board[metric].notna() & board["checkpoint_path"].notna()]
        if metric in board
        else board.iloc[0:0]
    )
    if ok.empty:
        raise RuntimeError(f"no trial reported {metric}; see {run_dir / 'leaderboard.csv'}")
    win = ok.iloc[0]
    winner_cfg = {k.split("/", 1)[1]: _plain(v) for k, v in win.items() if k.startswith("config/")}
    wcfg = replace(base, **winner_cfg)
    ckpt = ray.train.Checkpoint(win["checkpoint_path"], filesystem=tune_fs)
    state_dict, state = load_checkpoint_files(ckpt)
    history = pd.DataFrame(state["history"])
    best_metrics = {k: _plain(v) for k, v in win.items() if k.startswith("val_") or k == "epoch"}
    bundle_dir = run_dir / "bundle"
    meta, test = export_bundle(
        wcfg,
        data,
        state_dict,
        best_metrics,
        history,
        metric,
        split_sha,
        bundle_dir,
        extra_meta={"search": {"trial_id": win["trial_id"], "trials": len(board), "config": winner_cfg}},
    )
    report = write_test_report(run_dir, data, cfg) if cfg.report else None
    summary = {
        "run_dir": str(run_dir),
        "bundle": str(bundle_dir),
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
    d = SearchConfig(data="")
    p = argparse.ArgumentParser(
        description="Search backbones and hyperparameters with Ray Tune (ASHA early stopping)",
        add_help=add_help,
    )
    p.add_argument("--data", required=True, action="append", help=DATA_HELP)
    p.add_argument("--holdout-source", default=None, metavar="KEY", help=HOLDOUT_HELP)
    p.add_argument("--out", default=d.out, help="runs directory; the search writes to OUT/NAME")
    p.add_argument("--name", default=None, help="search name (default: search); the same name resumes")
    p.add_argument("--config", default=None, help="YAML/JSON file: space:, fixed:, and any option below")
    p.add_argument("--backbones", default=None, help="comma-separated backbones (overrides the space)")
    p.add_argument("--num-samples", type=int, default=None, help=f"trials (default {d.num_samples})")
    p.add_argument("--max-epochs", type=int, default=None, help=f"epochs per trial (default {d.max_epochs})")
    p.add_argument("--grace-period", type=int, default=None, help="ASHA: epochs before a trial can stop")
    p.add_argument("--reduction-factor", type=float, default=None, help="ASHA reduction factor")
    p.add_argument(
        "--metric",
        default=None,
        help="validation metric (default auto: val_roc_auc); val_source_min_roc_auc (with several sources) "
        "selects for the worst source",
    )
    p.add_argument("--max-concurrent-trials", type=int, default=None, help="default: what the cluster fits")
    p.add_argument("--workers-per-trial", type=int, default=None)
    p.add_argument("--cpus-per-worker", type=float, default=None)
    p.add_argument("--use-gpu", default="auto", choices=["auto", "true", "false"])
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="fix a training option")
    p.add_argument("--storage-path", default=None, help="Tune/Train storage: local dir or s3://bucket/prefix")
    p.add_argument("--s3-endpoint", default=None, help="endpoint of an S3-compatible store")
    p.add_argument("--split", default=None, help="train,val,test fractions")
    p.add_argument("--limit-per-class", type=int, default=None, help="subsample for quick searches")
    p.add_argument("--test-data", default=None, help="extra labelled test source for the winner")
    p.add_argument("--no-report", dest="report", action="store_false", help="skip the winner's HTML report")
    p.add_argument("--seed", type=int, default=None)
    return p


def config_from_args(args: argparse.Namespace) -> SearchConfig:
    doc = load_search_file(args.config) if args.config else {}
    kw: dict[str, Any] = {"data": args.data, "out": args.out, "name": args.name, **doc}
    for k in (
        "num_samples",
        "max_epochs",
        "grace_period",
        "reduction_factor",
        "metric",
        "max_concurrent_trials",
        "workers_per_trial",
        "cpus_per_worker",
        "storage_path",
        "s3_endpoint",
        "limit_per_class",
        "test_data",
        "holdout_source",
        "seed",
    ):
        if getattr(args, k) is not None:
            kw[k] = getattr(args, k)
    if args.use_gpu != "auto":
        kw["use_gpu"] = args.use_gpu
    if not getattr(args, "report", True):
        kw["report"] = False
    if args.split:
        kw["split"] = tuple(float(x) for x in args.split.split(","))
    elif "split" in kw:
        kw["split"] = tuple(kw["split"])
    space = dict(kw.get("space") or DEFAULT_SPACE)
    if args.backbones:
        space["backbone"] = {"choice": [b for b in args.backbones.split(",") if b]}
    kw["space"] = space
    fixed = dict(kw.get("fixed") or {})
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        fixed[key] = yaml.safe_load(value)
    kw["fixed"] = fixed
    # A fixed option wins over the space: `--set image_size=64` must not be re-sampled per trial.
    kw["space"] = {k: v for k, v in space.items() if k not in fixed}
    return SearchConfig(**kw)


def main(args: argparse.Namespace) -> dict[str, Any]:
    summary = run_search(config_from_args(args))
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
