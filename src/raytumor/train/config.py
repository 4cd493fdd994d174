"""The training config: one dataclass, its options (help and defaults in one place) and metric rules."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from raytumor.config import comma_floats, comma_list, opt
from raytumor.preprocess import parse_spec
from raytumor.scan import VIEWS

DATA_HELP = (
    "labelled tree ROOT/<class>/<files> (local or s3://), or a CSV/Parquet manifest (path,label[,patient_id,"
    "source]); repeat for several sources. A row's source is the manifest's source column (text before "
    "' via ') or else the --data argument; validation then also reports the worst/mean per-source "
    "metrics (val_source_min_roc_auc, val_source_mean_roc_auc, val_source_min_specificity)"
)
HOLDOUT_HELP = (
    "leave one source out: every file of source KEY (a --data argument, its last path component, or a "
    "manifest source name) is the test split; the other sources are split train/val only (the --split "
    "train:val ratio kept), and their files that duplicate a held-out file are dropped (counted in "
    "ingest_summary.json and the bundle). The held-out source may hold one class only (e.g. healthy scans)"
)


@dataclass(kw_only=True)
class TrainConfig:
    data: list[str] = opt(help=DATA_HELP, required=True)
    holdout_source: str | None = opt(None, HOLDOUT_HELP, metavar="KEY")
    cv_folds: int = opt(
        0,
        "cross-validation folds over whole duplicate/patient groups, stratified by class and source "
        "(`raytumor cv` runs them all; here with --cv-fold: train one)",
    )
    cv_fold: int | None = opt(
        None,
        "hold out this cross-validation fold (0-based) as the test split, as `raytumor cv` does; the rest is "
        "split train/val by the --split ratio, dropping files that duplicate a held-out one",
        metavar="K",
    )
    cv_by: str = opt(
        "group",
        "what a fold holds out: whole groups (--cv-folds of them), or one source (leave-one-source-out; "
        "folds are the sources, sorted)",
        choices=("group", "source"),
    )
    cv_sources: list[str] | None = opt(
        None,
        "comma list of the sources whose files are held out in turn; the other sources always train",
        parse=comma_list,
        metavar="KEY,...",
    )
    out: str = opt("runs", "runs directory; the run writes to OUT/NAME")
    name: str | None = opt(None, "run name (default: backbone-size-seed); the same name resumes")
    backbone: str = opt("efficientnet_lite0", "model backbone; see `raytumor backbones`")
    weights: str = opt("imagenet", "imagenet | none | path to a state dict")
    image_size: int = opt(160, "model input size in pixels (square)")
    epochs: int = opt(8, "training epochs (fewer with early stopping)")
    batch_size: int = opt(32, "images per batch and worker")
    lr: float = opt(1e-3, "learning rate of the classifier head")
    backbone_lr: float = opt(3e-4, "learning rate of the pretrained backbone")
    weight_decay: float = opt(1e-4, "AdamW weight decay")
    warmup_epochs: float = opt(0.3, "linear learning-rate warm-up (epochs), then cosine decay")
    freeze_epochs: int = opt(0, "epochs with a frozen backbone (head-only warm-up)")
    dropout: float = opt(0.2, "dropout before the classifier head")
    label_smoothing: float = opt(0.0, "cross-entropy label smoothing")
    augment_strength: float = opt(1.0, "strength of the geometric/intensity augmentation (0: off)")
    shift_augment: float = opt(
        0.0,
        "strength of scanner/source-shift augmentation (blur/sharpen, JPEG, resampling, 90° turns, erasing); "
        "0 = off",
    )
    augment_in: str = opt(
        "auto",
        "where the training augmentation runs: data (Ray Data tasks beside the workers; keeps GPU workers fed) "
        "or worker (inside each training worker, between its steps: on CPU workers, concurrent augmentation "
        "tasks stall the model's intra-op threads); auto = worker on CPU, data on GPU",
        choices=("auto", "data", "worker"),
    )
    preprocess: str = opt(
        "none",
        "slice preprocessing stored in the bundle and reused when scoring: none, or a comma list of crop "
        "(crop to the head) and zscore (intensity standardisation inside the head)",
    )
    metric: str = opt(
        "auto",
        "validation metric for the best checkpoint and early stopping (auto: val_roc_auc with a no-tumour "
        "class, else val_mc_f1_macro; e.g. val_loss, or val_source_min_roc_auc with several sources)",
    )
    patience: int = opt(3, "early-stopping patience in epochs")
    keep_checkpoints: int = opt(2, "checkpoints kept (the best by --metric)")
    max_failures: int = opt(1, "worker failures a run recovers from (restart from the last checkpoint)")
    num_workers: int | None = opt(None, "training workers (default: one per GPU, or 2 on CPU)")
    use_gpu: str = opt("auto", "train on GPUs", choices=("auto", "true", "false"))
    cpus_per_worker: float | None = opt(None, "CPUs reserved per worker (default: leave half to Ray Data)")
    placement_strategy: str = opt(
        "PACK",
        "how Ray places training workers across nodes (SPREAD: different nodes)",
        choices=("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"),
    )
    # Custom Ray resources each training worker also asks for (e.g. {"trainer_node": 1} to keep training on
    # nodes started with `ray start --resources`); CPU/GPU come from cpus_per_worker/use_gpu.
    worker_resources: dict[str, float] = opt(
        factory=dict,
        help="custom Ray resource each training worker also needs (repeatable), e.g. trainer_node=1",
        flag="--worker-resource",
        metavar="NAME=AMOUNT",
        repeat=True,
    )
    split: tuple[float, float, float] = opt((0.7, 0.15, 0.15), "train,val,test fractions", parse=comma_floats)
    max_hamming: int | None = opt(None, "dHash distance for near-duplicates (default: see raytumor.split)")
    test_data: str | None = opt(None, "extra labelled test source (its duplicates of training data dropped)")
    class_order: list[str] | None = opt(
        None, "comma-separated class order (default: no-tumour first)", parse=comma_list
    )
    limit_per_class: int | None = opt(None, "subsample each class to this many files (quick runs)")
    storage_path: str | None = opt(None, "Ray Train storage (local or s3://) for checkpoints")
    s3_endpoint: str | None = opt(None)
    seed: int = opt(0)
    target_sensitivity: float = opt(
        0.95,
        "fit temperature scaling on validation and set the operating threshold that reaches this "
        "sensitivity there (0: no calibration, threshold 0.5)",
    )
    report: bool = opt(True, "skip the HTML report on the test split", flag="--no-report")
    view_data: list[str] = opt(
        factory=list,
        help="slices with a known view for the bundle's view net: a manifest (path,view[,patient_id]) such "
        "as `raytumor slices --planes axial,coronal,sagittal` writes; repeatable. Without it the bundle has "
        "no view net and 2-D files' views are unknown (then only header views count towards scope)",
    )
    known_view: list[str] = opt(
        factory=list,
        help="SOURCE=VIEW: the view of every training file of the sources matching SOURCE (a source key or "
        "glob, e.g. 'tcga-lgg-*=axial') whose manifest has no view column: they count towards scope and "
        "teach the view net that source's look; repeatable",
        metavar="SOURCE=VIEW",
    )
    scope_min_examples: int = opt(
        50,
        "a view/sequence is in the bundle's scope only with at least this many real (not synthetic) "
        "training examples of every class",
    )
    balance_sources: float = opt(
        0.0,
        "repeat the training files of smaller sources (augmented afresh each epoch) until each has at least "
        "this share of the largest source's count, at most 8x; 0: every file once",
    )
    ood_quantile: float = opt(
        0.99, "share of in-distribution validation images the out-of-distribution threshold lets pass"
    )

    def __post_init__(self) -> None:
        self.data = [self.data] if isinstance(self.data, str) else list(self.data)
        parse_spec(self.preprocess)  # a typo fails here, not in a Ray task minutes later
        self.known_view = [self.known_view] if isinstance(self.known_view, str) else list(self.known_view)
        known_views(self.known_view)
        if self.shift_augment < 0:
            raise ValueError(f"shift_augment must be >= 0, got {self.shift_augment}")
        self.split = tuple(float(x) for x in self.split)
        # ["NAME=AMOUNT", ...] from the command line, or a dict from Tune's --set / a YAML: the same checks
        res = self.worker_resources
        self.worker_resources = parse_resources(
            res if isinstance(res, list) else [f"{k}={v}" for k, v in dict(res).items()]
        )

    @property
    def run_name(self) -> str:
        return self.name or f"{self.backbone}-{self.image_size}px-s{self.seed}"

    @property
    def run_dir(self) -> Path:
        return Path(self.out).expanduser().resolve() / self.run_name


def known_views(items: list[str]) -> list[tuple[str, str]]:
    """``["tcga-lgg-*=axial"]`` → ``[("tcga-lgg-*", "axial")]`` (checked: a known view, a pattern)."""
    out = []
    for item in items:
        pattern, sep, view = item.rpartition("=")
        if not sep or not pattern.strip() or view.strip() not in VIEWS:
            raise ValueError(
                f"--known-view {item!r}: expected SOURCE=VIEW with VIEW one of {', '.join(VIEWS)}"
            )
        out.append((pattern.strip(), view.strip()))
    return out


def parse_resources(items: list[str]) -> dict[str, float]:
    """``["slot=1", "memory=2e9"]`` → ``{"slot": 1.0, "memory": 2e9}``; CPU/GPU have their own flags."""
    out: dict[str, float] = {}
    for item in items:
        name, sep, amount = item.partition("=")
        name = name.strip()
        try:
            value = float(amount)
        except ValueError:
            value = -1.0
        if not sep or not name or value <= 0:
            raise ValueError(f"worker resource {item!r}: expected NAME=AMOUNT with AMOUNT > 0")
        if name in ("CPU", "GPU"):
            raise ValueError(f"worker resource {name}: use --cpus-per-worker / --use-gpu")
        out[name] = value
    return out


def resolve_metric(metric: str, classes: list[str], negative_class: str | None) -> str:
    if metric != "auto":
        return metric
    return "val_roc_auc" if (negative_class is not None or len(classes) == 2) else "val_mc_f1_macro"


def is_min_metric(metric: str) -> bool:
    return metric.endswith("loss")
