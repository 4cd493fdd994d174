"""The training job: a TorchTrainer over the split, the best checkpoint exported as a bundle, the CLI."""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import pandas as pd

from raytumor.config import echo, from_args, stage_parser
from raytumor.model import check_weights
from raytumor.runtime import init_ray, torch_runtime_env, train_resources
from raytumor.train.config import TrainConfig, is_min_metric, resolve_metric
from raytumor.train.data import (
    Grouping,
    augment_kwargs,
    build_datasets,
    check_metric,
    pin_augment_in,
    prepare_split,
    resolve_augment_in,
)
from raytumor.train.loop import train_loop_per_worker
from raytumor.train.package import (
    discard_staging,
    export_bundle,
    load_checkpoint_files,
    write_split,
    write_test_report,
)

# TrainConfig fields the worker loop reads (the rest is the driver's business).
LOOP_KEYS = (
    "backbone",
    "weights",
    "epochs",
    "batch_size",
    "lr",
    "backbone_lr",
    "weight_decay",
    "warmup_epochs",
    "freeze_epochs",
    "dropout",
    "label_smoothing",
    "patience",
    "seed",
)


def make_trainer(
    cfg: TrainConfig,
    classes: list[str],
    negative_class: str | None,
    n_train: int,
    datasets: dict[str, Any],
    *,
    name: str,
    storage_path: str,
    storage_filesystem: Any = None,
    callbacks: list[Any] | None = None,
    worker_callbacks: list[Callable[[dict[str, Any]], None]] | None = None,
) -> tuple[Any, str]:
    """A TorchTrainer for one run (or one Tune trial); returns it with the resolved selection metric.

    ``callbacks``: ``ray.train.UserCallback`` objects (on the controller); ``worker_callbacks``: callables
    run inside every worker before each training step (see :mod:`raytumor.train.loop`)."""
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    res = train_resources(cfg.num_workers, cfg.use_gpu, cfg.cpus_per_worker)
    metric = resolve_metric(cfg.metric, classes, negative_class)
    loop_cfg = {
        **{k: getattr(cfg, k) for k in LOOP_KEYS},
        "metric": metric,
        "num_classes": len(classes),
        "classes": classes,
        "negative_class": negative_class,
        "n_train": n_train,
        "worker_callbacks": list(worker_callbacks or []),
        "augment_in": resolve_augment_in(cfg),  # the same rule build_datasets followed
        "augment": augment_kwargs(cfg),
    }
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_cfg,
        scaling_config=ScalingConfig(
            num_workers=res.num_workers,
            use_gpu=res.use_gpu,
            resources_per_worker={
                "CPU": res.cpus_per_worker,
                **({"GPU": 1} if res.use_gpu else {}),
                **cfg.worker_resources,
            },
            placement_strategy=cfg.placement_strategy,
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            storage_filesystem=storage_filesystem,
            callbacks=callbacks,
            checkpoint_config=CheckpointConfig(
                num_to_keep=cfg.keep_checkpoints,
                checkpoint_score_attribute=metric,
                checkpoint_score_order="min" if is_min_metric(metric) else "max",
            ),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            worker_runtime_env=torch_runtime_env(),
        ),
        datasets=datasets,
        dataset_config=DataConfig(datasets_to_split=["train"]),
    )
    print(
        f"[raytumor] training {cfg.backbone} ({cfg.weights}) on {res.num_workers} "
        f"{'GPU' if res.use_gpu else 'CPU'} worker(s), {res.cpus_per_worker} CPU each"
    )
    return trainer, metric


def run_training(
    cfg: TrainConfig,
    callbacks: list[Any] | None = None,
    worker_callbacks: list[Callable[[dict[str, Any]], None]] | None = None,
    grouping: Grouping | None = None,
    extra_meta: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run the whole training job; returns a summary with the bundle path and test metrics.

    ``extra_meta``: more bundle.json fields (the demo records the search whose winner it retrains).

    ``grouping``: the catalogue and duplicate/patient groups already computed for this data (a
    cross-validation fold reuses its driver's instead of decoding every source again).

    ``callbacks``: extra ``ray.train.UserCallback`` objects (e.g. to see every worker's reports);
    ``worker_callbacks``: see :func:`make_trainer`."""
    t0 = time.time()
    check_weights(cfg.backbone, cfg.weights)
    init_ray()
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(asdict(cfg), indent=2, default=str) + "\n")
    (run_dir / "config.yaml").write_text(echo(cfg))

    data = prepare_split(cfg, grouping)
    split_sha, summary_ingest = write_split(data, run_dir)
    check_metric(resolve_metric(cfg.metric, data.classes, data.negative_class), data.files("val"))
    cfg = pin_augment_in(cfg)  # one answer for the datasets and the workers
    train_ds, val_ds = build_datasets(data.files("train"), data.files("val"), cfg)
    trainer, metric = make_trainer(
        cfg, data.classes, data.negative_class, data.n_train, {"train": train_ds, "val": val_ds},
        name=cfg.run_name, storage_path=cfg.storage_path or str(run_dir / "checkpoints"),
        callbacks=callbacks, worker_callbacks=worker_callbacks,
    )  # fmt: skip
    result = trainer.fit()
    sign = -1 if is_min_metric(metric) else 1
    best_ckpt, best_metrics = max(result.best_checkpoints, key=lambda cm: sign * cm[1][metric])
    _, final_state = load_checkpoint_files(result.checkpoint)
    history = pd.DataFrame(final_state["history"])
    state_dict, _ = load_checkpoint_files(best_ckpt)
    meta, test = export_bundle(
        cfg, data, state_dict, best_metrics, history, metric, split_sha, run_dir / "bundle", extra_meta
    )
    report = write_test_report(run_dir, data, cfg.s3_endpoint, cfg.seed) if cfg.report else None
    res = train_resources(cfg.num_workers, cfg.use_gpu, cfg.cpus_per_worker)
    summary = {
        "run_dir": str(run_dir),
        "bundle": str(run_dir / "bundle"),
        "bundle_id": meta.bundle_id,
        "best_epoch": int(best_metrics["epoch"]),
        "epochs_run": int(len(history)),
        "resumed_at_epochs": final_state["resumed_at"],
        "worker_nodes_per_attempt": final_state.get("worker_nodes", []),
        "val": meta.metrics["val"],
        "test": test,
        "holdout": data.holdout,
        "ingest": {
            k: summary_ingest[k] for k in ("files_listed", "files_decoded", "files_rejected", "files_ignored")
        },
        "workers": res.num_workers,
        "use_gpu": res.use_gpu,
        "report": report,
        "wall_seconds": round(time.time() - t0, 1),
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    discard_staging(run_dir / "bundle")
    return summary


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    return stage_parser(
        TrainConfig,
        "Fine-tune a brain-MRI tumour classifier on Ray (Ray Data ingest + Ray Train DDP)",
        add_help,
    )


def main(args: argparse.Namespace) -> dict[str, Any]:
    summary = run_training(from_args(TrainConfig, args))
    t = summary["test"]

    def f(k: str) -> str:
        return "n/a" if t.get(k) is None else f"{t[k]:.4f}"

    print(
        f"[raytumor] test (n={t.get('n', 0)}): accuracy {f('accuracy')}  ROC-AUC {f('roc_auc')}  "
        f"sensitivity {f('sensitivity')}  specificity {f('specificity')}  F1 {f('f1')}"
    )
    print(f"[raytumor] done in {summary['wall_seconds']:.0f}s; bundle: {summary['bundle']}")
    print(f"[raytumor] run folder: {summary['run_dir']}")
    return summary
