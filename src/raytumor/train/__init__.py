"""Training (``raytumor train``): leakage-safe split, Ray Data ingest + augmentation, Ray Train DDP
fine-tuning, a calibrated model bundle and its report.

Modules, in the order a run goes through them: ``config`` (TrainConfig, metric rules), ``data`` (catalogue,
split, Ray datasets), ``loop`` (inside each Ray Train worker), ``package`` (bundle, split files, report),
``job`` (the trainer, the whole run, the CLI).
"""

from raytumor.train.config import DATA_HELP, HOLDOUT_HELP, TrainConfig, is_min_metric, resolve_metric
from raytumor.train.data import (
    SplitData,
    build_datasets,
    check_metric,
    pin_augment_in,
    prepare_split,
    resolve_source,
)
from raytumor.train.job import get_args_parser, main, make_trainer, run_training
from raytumor.train.loop import cosine_lambda, evaluate_shard, source_metrics, train_one_epoch
from raytumor.train.package import (
    discard_staging,
    export_bundle,
    load_checkpoint_files,
    run_history,
    write_split,
    write_test_report,
)

__all__ = [
    "DATA_HELP",
    "HOLDOUT_HELP",
    "SplitData",
    "TrainConfig",
    "build_datasets",
    "pin_augment_in",
    "run_history",
    "check_metric",
    "cosine_lambda",
    "discard_staging",
    "evaluate_shard",
    "export_bundle",
    "get_args_parser",
    "is_min_metric",
    "load_checkpoint_files",
    "main",
    "make_trainer",
    "prepare_split",
    "resolve_metric",
    "resolve_source",
    "run_training",
    "source_metrics",
    "train_one_epoch",
    "write_split",
    "write_test_report",
]
