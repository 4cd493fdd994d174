"""Train: leakage-safe split, Ray Data ingest + augmentation, Ray Train DDP fine-tuning, model bundle.

Shape follows torchvision's ``references/classification``: a flat ``get_args_parser()`` → ``main(args)``,
with ``train_one_epoch`` / ``evaluate_shard`` doing the per-epoch work inside each Ray Train worker.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

MODEL_FILE = "model.pt"
STATE_FILE = "train_state.pt"


@dataclass
class TrainConfig:
    # Data arguments, one source each (folder, bucket prefix or manifest); a single str is accepted.
    data: list[str]
    out: str = "runs"
    name: str | None = None
    backbone: str = "efficientnet_lite0"
    weights: str = "imagenet"
    image_size: int = 160
    epochs: int = 8
    batch_size: int = 32  # per worker
    lr: float = 1e-3  # head
    backbone_lr: float = 3e-4
    weight_decay: float = 1e-4
    warmup_epochs: float = 0.3
    freeze_epochs: int = 0
    dropout: float = 0.2
    label_smoothing: float = 0.0
    augment_strength: float = 1.0
    # Scanner/source-shift augmentation (blur/sharpen, JPEG, resampling, 90° turns, erasing); 0 = off.
    shift_augment: float = 0.0
    # Slice preprocessing recorded in the bundle and applied identically at scoring: none | crop,zscore
    preprocess: str = "none"
    metric: str = "auto"  # val_roc_auc when there is a tumour-vs-none view, else val_mc_f1_macro
    patience: int = 3
    keep_checkpoints: int = 2
    max_failures: int = 1
    num_workers: int | None = None
    use_gpu: str = "auto"
    cpus_per_worker: float | None = None
    placement_strategy: str = "PACK"  # SPREAD puts workers on different nodes
    # Custom Ray resources each training worker also asks for (e.g. {"trainer_node": 1} to keep training on
    # nodes started with `ray start --resources`); CPU/GPU come from cpus_per_worker/use_gpu.
    worker_resources: dict[str, float] = field(default_factory=dict)
    split: tuple[float, float, float] = (0.7, 0.15, 0.15)
    max_hamming: int | None = None
    test_data: str | None = None
    # Leave-one-source-out: this source key is the whole test split (see split.holdout_split).
    holdout_source: str | None = None
    class_order: list[str] | None = None
    limit_per_class: int | None = None
    storage_path: str | None = None
    s3_endpoint: str | None = None
    seed: int = 0
    target_sensitivity: float = 0.95  # operating threshold chosen on validation; 0 keeps 0.5, no calibration
    report: bool = True  # HTML evaluation report of the bundle on the test split (OUT/NAME/report/)
    # Test hook: os._exit() a worker in this epoch on the first attempt (exercises FailureConfig).
    fail_at_epoch: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from raytumor.preprocess import parse_spec

        self.data = [self.data] if isinstance(self.data, str) else list(self.data)
        parse_spec(self.preprocess)  # a typo fails here, not in a Ray task minutes later
        if self.shift_augment < 0:
            raise ValueError(f"shift_augment must be >= 0, got {self.shift_augment}")
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

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in vars(args).items() if k in known}
        if isinstance(kw.get("split"), str):
            kw["split"] = tuple(float(x) for x in kw["split"].split(","))
        if isinstance(kw.get("class_order"), str):
            kw["class_order"] = [c for c in kw["class_order"].split(",") if c]
        return cls(**kw)


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


# ----------------------------------------------------------------------------------------------------------
# Inside each Ray Train worker


def resolve_metric(metric: str, classes: list[str], negative_class: str | None) -> str:
    if metric != "auto":
        return metric
    return "val_roc_auc" if (negative_class is not None or len(classes) == 2) else "val_mc_f1_macro"


def _is_min_metric(metric: str) -> bool:
    return metric.endswith("loss")


def _cosine_lambda(total_steps: int, warmup_steps: int):
    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    return f


def _autocast(device: torch.device):
    # bf16 on GPU; fp32 on CPU where bf16 autocast is slower on most CPUs without AMX.
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def _to_input(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    x = images.to(device, non_blocking=True)
    return x.unsqueeze(1).contiguous(memory_format=torch.channels_last)


def train_one_epoch(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    batches,
    device: torch.device,
    label_smoothing: float = 0.0,
) -> dict[str, float]:
    model.train()
    loss_sum, n, t0 = 0.0, 0, time.perf_counter()
    for batch in batches:
        x, y = _to_input(batch["image"], device), batch["label"].to(device)
        with _autocast(device):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        loss_sum += float(loss.detach()) * len(y)
        n += len(y)
    return {"loss_sum": loss_sum, "n": n, "seconds": time.perf_counter() - t0}


@torch.inference_mode()
def evaluate_shard(
    model: torch.nn.Module, iterator, rank: int, world: int, device: torch.device, batch_size: int
):
    """Predict this rank's rows (``idx % world == rank``) of the full validation set: exact, no row lost.

    Returns (idx, label, probs, source_idx) tensors of this rank's rows."""
    model.eval()
    idxs, labels, probs, sources = [], [], [], []
    dtypes = {"image": torch.uint8, "label": torch.int64, "idx": torch.int64, "source_idx": torch.int64}
    for batch in iterator.iter_torch_batches(batch_size=batch_size, dtypes=dtypes):
        keep = (batch["idx"] % world) == rank
        if not bool(keep.any()):
            continue
        with _autocast(device):
            logits = model(_to_input(batch["image"][keep], device))
        probs.append(torch.softmax(logits.float(), 1).cpu())
        labels.append(batch["label"][keep].cpu())
        idxs.append(batch["idx"][keep].cpu())
        sources.append(batch["source_idx"][keep].cpu())
    if not idxs:
        empty = torch.zeros(0, dtype=torch.int64)
        return empty, empty, torch.zeros(0, 0), empty
    return torch.cat(idxs), torch.cat(labels), torch.cat(probs), torch.cat(sources)


SOURCE_METRICS = ("val_source_min_roc_auc", "val_source_mean_roc_auc", "val_source_min_specificity")


def source_metrics(
    labels: np.ndarray,
    probs: np.ndarray,
    source_idx: np.ndarray,
    classes: list[str],
    negative_class: str | None,
) -> dict[str, float]:
    """Cross-source validation metrics of the tumour-vs-none view; empty with fewer than two sources.

    ``val_source_min_roc_auc`` / ``val_source_mean_roc_auc``: worst / mean ROC-AUC over the sources that
    hold both classes; ``val_source_min_specificity``: worst specificity at 0.5 over the sources that
    hold negatives (a single-class healthy source still counts there); ``val_sources``: sources seen.
    A model that separates classes by source scores well pooled but badly within a source.
    """
    from raytumor.evaluate import compute_metrics

    src = np.asarray(source_idx)
    keys = np.unique(src)
    if len(keys) < 2:
        return {}
    labels, probs = np.asarray(labels), np.asarray(probs)
    aucs, specs = [], []
    for k in keys:
        m = compute_metrics(labels[src == k], probs[src == k], classes, negative_class, 0.5)
        if m.get("roc_auc") is not None:
            aucs.append(float(m["roc_auc"]))
        if m.get("negatives") and m.get("specificity") is not None:
            specs.append(float(m["specificity"]))
    out: dict[str, float] = {"val_sources": int(len(keys))}
    if aucs:
        out["val_source_min_roc_auc"] = min(aucs)
        out["val_source_mean_roc_auc"] = float(np.mean(aucs))
    if specs:
        out["val_source_min_specificity"] = min(specs)
    return out


def _die_midway(batches, step: int, marker: Path):
    """Test hook: kill this worker process mid-epoch, once, like a lost node (FailureConfig recovers)."""
    t0 = time.monotonic()
    for i, b in enumerate(batches):
        if i == step:
            # The controller collects reported checkpoints on its health-check poll (2 s): a crash
            # within that window of the last report would lose that checkpoint, so die after it.
            time.sleep(max(0.0, 5.0 - (time.monotonic() - t0)))
            marker.touch()
            os._exit(1)
        yield b


def _gather(obj: Any, world: int) -> list[Any]:
    if world == 1:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


def _broadcast(obj: Any, world: int) -> Any:
    """Rank 0's ``obj`` on every rank: every rank then reports (and early-stops on) identical values."""
    if world == 1:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _epoch_metrics(parts: list[tuple], cfg: dict[str, Any]) -> dict[str, Any]:
    """Train and validation metrics of one epoch from every rank's (idx, label, probs, source_idx,
    train stats)."""
    from raytumor.evaluate import compute_metrics

    order = np.argsort(np.concatenate([q[0] for q in parts]))
    y = np.concatenate([q[1] for q in parts])[order]
    p = np.concatenate([q[2] for q in parts if len(q[2])])[order]
    src = np.concatenate([q[3] for q in parts])[order]
    m = compute_metrics(y, p, cfg["classes"], cfg["negative_class"], 0.5)
    n_seen = sum(q[4]["n"] for q in parts)
    out = {
        "train_loss": sum(q[4]["loss_sum"] for q in parts) / max(1, n_seen),
        "train_images": n_seen,
        "train_images_per_s": n_seen / max(1e-9, max(q[4]["seconds"] for q in parts)),
        "val_loss": float(-np.log(np.clip(p[np.arange(len(y)), y], 1e-7, 1)).mean()),
        "val_n": int(len(y)),
    }
    out.update({f"val_{k}": v for k, v in m.items() if isinstance(v, (int, float)) and v is not None})
    out.update(source_metrics(y, p, src, cfg["classes"], cfg["negative_class"]))
    return out


def _wrap_ddp(model: torch.nn.Module, world: int, device: torch.device) -> torch.nn.Module:
    if world == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def train_loop_per_worker(cfg: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    from raytumor.model import create_model
    from raytumor.runtime import worker_threads

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(cfg.get("torch_threads") or worker_threads(ctx.get_local_world_size()))
    torch.manual_seed(cfg["seed"])  # identical init on every rank; DDP also broadcasts rank 0's weights
    device = ray.train.torch.get_device()

    model = create_model(cfg["backbone"], cfg["num_classes"], weights=cfg["weights"], dropout=cfg["dropout"])
    model.to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.param_groups(cfg["lr"], cfg["backbone_lr"], cfg["weight_decay"]))
    # A batch larger than a worker's shard would give zero steps per epoch (drop_last): cap it.
    batch_size = max(2, min(cfg["batch_size"], cfg["n_train"] // world))
    if batch_size != cfg["batch_size"] and rank == 0:
        print(
            f"[raytumor] batch size {cfg['batch_size']} > {cfg['n_train'] // world} images per worker: using {batch_size}"
        )
    steps_per_epoch = max(1, cfg["n_train"] // (batch_size * world))
    total = steps_per_epoch * cfg["epochs"]
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _cosine_lambda(total, int(cfg["warmup_epochs"] * steps_per_epoch))
    )
    metric, minimise = cfg["metric"], _is_min_metric(cfg["metric"])
    state = {
        "epoch": 0,
        "best": math.inf if minimise else -math.inf,
        "bad_epochs": 0,
        "history": [],
        "resumed_at": [],
    }

    checkpoint = ray.train.get_checkpoint()
    if checkpoint:  # worker restart (FailureConfig) or a rerun of the same run name
        with checkpoint.as_directory() as d:
            model.load_state_dict(torch.load(Path(d) / MODEL_FILE, map_location=device, weights_only=True))
            saved = torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=False)
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        state = saved["state"]
        state["epoch"] += 1
        state["resumed_at"].append(state["epoch"])
        if rank == 0:
            print(f"[raytumor] resuming from checkpoint after epoch {state['epoch'] - 1}")

    # Which nodes this attempt's workers run on (recorded per attempt: a recovery may land elsewhere).
    nodes = sorted(set(_gather(ray.get_runtime_context().get_node_id(), world)))
    state.setdefault("worker_nodes", []).append(nodes)
    if rank == 0:
        print(f"[raytumor] {world} worker(s) on {len(nodes)} node(s)")

    train_it = ray.train.get_dataset_shard("train")
    val_it = ray.train.get_dataset_shard("val")
    ddp, phase = None, None
    for epoch in range(state["epoch"], cfg["epochs"]):
        if state["bad_epochs"] >= cfg["patience"]:
            break  # a resumed run that had already stopped early
        frozen = epoch < cfg["freeze_epochs"]
        model.set_backbone_trainable(not frozen)
        if phase != frozen:  # DDP registers the trainable params at construction: rebuild on phase change
            ddp, phase = _wrap_ddp(model, world, device), frozen
        batches = train_it.iter_torch_batches(
            batch_size=batch_size,
            dtypes={"image": torch.uint8, "label": torch.int64},
            drop_last=True,  # a trailing batch of 1 breaks BatchNorm in train mode
            local_shuffle_buffer_size=batch_size * 8,
        )
        if cfg.get("fail_at_epoch") == epoch and rank == world - 1 and not Path(cfg["fail_marker"]).exists():
            batches = _die_midway(batches, steps_per_epoch // 2, Path(cfg["fail_marker"]))
        tr = train_one_epoch(ddp, optimizer, scheduler, batches, device, cfg["label_smoothing"])
        idx, labels, probs, srcs = evaluate_shard(model, val_it, rank, world, device, batch_size * 2)
        parts = _gather((idx.numpy(), labels.numpy(), probs.numpy(), srcs.numpy(), tr), world)
        # Computed once on rank 0 and broadcast: result.metrics is rank 0's, but every rank must report
        # the same keys and take the same early-stopping decision.
        epoch_metrics = _broadcast(_epoch_metrics(parts, cfg) if rank == 0 else None, world)
        metrics = {
            "epoch": epoch,
            "epochs_done": epoch + 1,  # Tune's ASHA time attribute
            **epoch_metrics,
            "lr_head": optimizer.param_groups[-1]["lr"],
            "frozen_backbone": frozen,
        }
        val_loss = metrics["val_loss"]
        value = metrics.get(metric)
        if value is None:
            raise KeyError(f"metric {metric!r} not reported; available: {sorted(metrics)}")
        improved = value < state["best"] if minimise else value > state["best"]
        state["best"] = value if improved else state["best"]
        state["bad_epochs"] = 0 if improved else state["bad_epochs"] + 1
        state["epoch"] = epoch
        state["history"].append(metrics)
        metrics["best_" + metric] = state["best"]
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if (
                rank == 0
            ):  # model is the unwrapped module: this is model.module.state_dict() of the DDP wrapper
                torch.save(model.state_dict(), Path(tmp) / MODEL_FILE)
                torch.save(
                    {
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "state": state,
                    },
                    Path(tmp) / STATE_FILE,
                )
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=ckpt)
        if rank == 0:
            worst = metrics.get("val_source_min_roc_auc")
            extra = (
                ""
                if worst is None or metric == "val_source_min_roc_auc"
                else f"worst-source AUC {worst:.4f} "
            )
            print(
                f"[raytumor] epoch {epoch}: train_loss {metrics['train_loss']:.4f} "
                f"val_loss {val_loss:.4f} {metric} {value:.4f} {extra}"
                f"({metrics['train_images_per_s']:.1f} img/s{', backbone frozen' if frozen else ''})"
            )
        if state["bad_epochs"] >= cfg["patience"]:
            if rank == 0:
                print(f"[raytumor] early stop: {metric} has not improved for {cfg['patience']} epochs")
            break


# ----------------------------------------------------------------------------------------------------------
# Driver


@dataclass
class SplitData:
    """The catalogued, de-duplicated and split data: computed once, shared by a run or a whole search."""

    catalogue: Any
    # one row per listed file: path, class_name, label, source, split, group, sha256, error (+ patient_id)
    manifest: pd.DataFrame
    duplicates: dict[str, Any]
    duplicate_table: pd.DataFrame
    classes: list[str]
    negative_class: str | None
    holdout: dict[str, Any] | None = None  # {"source": key, "dropped_duplicates": n} when leaving one out

    def files(self, split_name: str) -> pd.DataFrame:
        cols = [c for c in ("path", "label", "source") if c in self.manifest.columns]
        return self.manifest.loc[self.manifest["split"] == split_name, cols].reset_index(drop=True)

    @property
    def n_train(self) -> int:
        return int((self.manifest["split"] == "train").sum())

    def counts(self) -> pd.DataFrame:
        return self.manifest.groupby(["split", "class_name"]).size().unstack(fill_value=0)

    def source_counts(self) -> pd.DataFrame:
        """Files per source (rows) and split (columns)."""
        m = self.manifest.assign(source=self.manifest.get("source", "?"))
        return m.groupby(["source", "split"]).size().unstack(fill_value=0)

    def fingerprints(self) -> pd.DataFrame:
        """Fingerprints of the train+val files: the bundle carries them so evaluation can drop duplicates."""
        good = self.manifest[self.manifest["split"].isin(["train", "val"])]
        fp = self.catalogue.ok.merge(good[["path"]], on="path")
        cols = ["path", "sha256", "dhash", "thumb", "dhash_crop", "thumb_crop"]
        return fp[[c for c in cols if c in fp.columns]].reset_index(drop=True)


def resolve_source(name: str, keys: list[str]) -> str:
    """The source key ``name`` refers to: the key itself, else the one key whose last path component
    matches (``--holdout-source navoneel-253`` for ``--data ../shared/data/navoneel-253/``)."""
    keys = sorted(set(keys))
    if name in keys:
        return name

    def base(k: str) -> str:
        return k.rstrip("/").rsplit("/", 1)[-1]

    hits = [k for k in keys if k.rstrip("/") == name.rstrip("/") or base(k) == base(name)]
    if len(hits) == 1:
        return hits[0]
    why = "matches several sources" if hits else "is not a source"
    raise ValueError(f"--holdout-source {name!r} {why}; sources: {keys}")


def prepare_split(cfg: TrainConfig) -> SplitData:
    """Catalogue (decode + fingerprint every file of every source), group duplicates and patients, split
    by group; with ``holdout_source`` the held-out source is the test split (:func:`split.holdout_split`).
    """
    from raytumor import split
    from raytumor.ingest import StorageOptions, build_catalogue

    if not cfg.data or not all(cfg.data):
        raise ValueError(f"no data source given: {cfg.data}")
    storage = StorageOptions.from_env(cfg.s3_endpoint)
    # Several sources are listed together (ingest.list_labelled), so classes are laid out over their union
    # and a single-class source (a folder of healthy scans) joins the others.
    cat = build_catalogue(cfg.data[0] if len(cfg.data) == 1 else cfg.data, storage, cfg.class_order)
    table = cat.table.copy()
    if cfg.limit_per_class:
        keep = (
            table[table["error"].isna()]
            .sample(frac=1.0, random_state=cfg.seed)
            .groupby("class_name")
            .head(cfg.limit_per_class)
        )
        table = table[table["path"].isin(set(keep["path"])) | table["error"].notna()].reset_index(drop=True)
    ok = table["error"].isna().to_numpy()
    good = table[ok].reset_index(drop=True)
    kw = {} if cfg.max_hamming is None else {"max_hamming": cfg.max_hamming}
    # Duplicates are found across all sources at once: a copy in another source is still a copy.
    groups = split.find_duplicate_groups(good, **kw)
    holdout = None
    if cfg.holdout_source:
        key = resolve_source(cfg.holdout_source, table["source"].astype(str).tolist())
        held = (good["source"] == key).to_numpy()
        if held.all() or not held.any():
            raise ValueError(f"--holdout-source {key!r}: need decoded files in it and in another source")
        splits, dropped = split.holdout_split(good, groups, held, fractions=cfg.split, seed=cfg.seed)
        holdout = {"source": key, "dropped_duplicates": dropped}
        if good.loc[np.isin(splits, ["train", "val"]), "label"].nunique() < 2:
            raise ValueError(f"holding out {key!r} leaves a single class to train on")
        print(
            f"[raytumor] leave-one-source-out: {int(held.sum())} files of {key!r} are the test split; "
            f"{dropped} train/val files that duplicate them dropped"
        )
    else:
        splits = split.split_groups(good, groups, fractions=cfg.split, seed=cfg.seed)
    dup = split.duplicate_report(good, groups)
    good["group"], good["split"] = groups, splits
    manifest = table.merge(good[["path", "group", "split"]], on="path", how="left")
    manifest["split"] = manifest["split"].fillna("rejected")
    manifest["group"] = manifest["group"].fillna(-1).astype(np.int64)
    dup_table = split.duplicate_groups_table(good, groups)
    return SplitData(cat, manifest, dup, dup_table, cat.classes, cat.negative_class, holdout)


def check_metric(metric: str, val_files: pd.DataFrame) -> None:
    """Fail before training when a cross-source metric cannot be reported (it needs ≥ 2 val sources)."""
    if not metric.startswith("val_source"):
        return
    n = val_files["source"].nunique() if "source" in val_files.columns else 1
    if n < 2:
        raise ValueError(
            f"metric {metric} needs validation files from at least 2 sources (have {n}): give --data "
            "more than once, or a manifest with a source column"
        )


def build_datasets(train_files: pd.DataFrame, val_files: pd.DataFrame, cfg: TrainConfig) -> tuple[Any, Any]:
    """Ray datasets for one training run: decoded (and preprocessed) once at store size, augmented afresh
    each epoch."""
    from raytumor.augment import AugmentConfig, augment_batch, store_size
    from raytumor.ingest import StorageOptions, decode_dataset, has_error
    from raytumor.preprocess import parse_spec

    storage = StorageOptions.from_env(cfg.s3_endpoint)
    image_size, seed = cfg.image_size, cfg.seed
    prep = parse_spec(cfg.preprocess).to_dict()

    def indexed(df: pd.DataFrame, shuffle: bool) -> pd.DataFrame:
        # Integer source ids (sorted keys) for the per-source validation metrics; 0 without a source column.
        src = pd.factorize(df["source"], sort=True)[0] if "source" in df.columns else np.zeros(len(df))
        df = df[["path", "label"]].assign(source_idx=np.asarray(src, dtype=np.int64))
        if shuffle:  # mix classes across blocks so block-order randomisation gives mixed batches
            df = df.sample(frac=1.0, random_state=seed)
        df = df.reset_index(drop=True)
        df["idx"] = np.arange(len(df), dtype=np.int64)
        return df

    aug = AugmentConfig(strength=cfg.augment_strength, shift=cfg.shift_augment)
    train_base = decode_dataset(
        indexed(train_files, True),
        storage=storage,
        image_size=store_size(image_size),
        fingerprints=False,
        preprocess=prep,
    )
    train_base = (
        train_base.filter(lambda r: not has_error(r["error"]))
        .select_columns(["image", "label"])
        .materialize()
    )
    train_ds = train_base.randomize_block_order().map_batches(
        augment_batch,
        fn_kwargs={"image_size": image_size, "config": aug.to_dict()},
        batch_size=64,
        batch_format="numpy",
    )
    val_ds = decode_dataset(
        indexed(val_files, False), storage=storage, image_size=image_size, fingerprints=False, preprocess=prep
    )
    val_ds = (
        val_ds.filter(lambda r: not has_error(r["error"]))
        .select_columns(["image", "label", "idx", "source_idx"])
        .materialize()
    )
    return train_ds, val_ds


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
    "fail_at_epoch",
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
    fail_marker: str = "",
) -> tuple[Any, str]:
    """A TorchTrainer for one run (or one Tune trial); returns it with the resolved selection metric."""
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from raytumor.runtime import train_resources

    res = train_resources(cfg.num_workers, cfg.use_gpu, cfg.cpus_per_worker)
    metric = resolve_metric(cfg.metric, classes, negative_class)
    loop_cfg = {
        **{k: getattr(cfg, k) for k in LOOP_KEYS},
        "metric": metric,
        "num_classes": len(classes),
        "classes": classes,
        "negative_class": negative_class,
        "n_train": n_train,
        "fail_marker": fail_marker,
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
                checkpoint_score_order="min" if _is_min_metric(metric) else "max",
            ),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
        ),
        datasets=datasets,
        dataset_config=DataConfig(datasets_to_split=["train"]),
    )
    print(
        f"[raytumor] training {cfg.backbone} ({cfg.weights}) on {res.num_workers} "
        f"{'GPU' if res.use_gpu else 'CPU'} worker(s), {res.cpus_per_worker} CPU each"
    )
    return trainer, metric


def load_checkpoint_files(checkpoint: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(model state dict, training state) from a ``ray.train.Checkpoint`` on local or remote storage."""
    with checkpoint.as_directory() as d:
        state_dict = torch.load(Path(d) / MODEL_FILE, map_location="cpu", weights_only=True)
        state = torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=False)["state"]
    return state_dict, state


def export_bundle(
    cfg: TrainConfig,
    data: SplitData,
    state_dict: dict[str, torch.Tensor],
    best_metrics: dict[str, Any],
    history: pd.DataFrame,
    metric: str,
    split_sha: str,
    bundle_dir: Path,
    extra_meta: dict[str, Any] | None = None,
) -> tuple[Any, dict[str, Any]]:
    """Write the bundle, score the held-out test split through the inference path, record it in the bundle."""
    from raytumor import bundle as bundle_mod
    from raytumor.ingest import StorageOptions
    from raytumor.model import normalization
    from raytumor.preprocess import parse_spec

    mean, std = normalization(cfg.backbone)
    counts = data.counts()
    meta = bundle_mod.BundleMeta(
        backbone=cfg.backbone,
        classes=data.classes,
        negative_class=data.negative_class,
        image_size=cfg.image_size,
        mean=list(mean),
        std=list(std),
        preprocess=parse_spec(cfg.preprocess).to_dict(),
        metrics={
            "val": {k: v for k, v in best_metrics.items() if k.startswith("val_")},
            "best_epoch": best_metrics["epoch"],
            "selection_metric": metric,
            **(extra_meta or {}),
        },
        train_config=asdict(cfg),
        data={
            "source": " + ".join(cfg.data),  # a string, as before multi-source training
            "sources": {
                str(k): {str(s): int(v) for s, v in row.items()} for k, row in data.source_counts().iterrows()
            },
            "holdout": data.holdout,
            "split_manifest_sha256": split_sha,
            "split_counts": {s: {c: int(v) for c, v in row.items()} for s, row in counts.iterrows()},
            "duplicate_groups": data.duplicates["groups_with_duplicates"],
        },
    )
    fingerprints = data.fingerprints()
    bundle_mod.save_bundle(bundle_dir, state_dict, meta, fingerprints, history)
    # Validation and held-out test splits in one pass through the Predictor path `raytumor score` uses
    # (temperature 1 so far). Validation calibrates: temperature scaling, then the operating threshold
    # that reaches the target sensitivity; the test split is then measured at that calibration.
    from raytumor.calibrate import calibrate_bundle_meta, rescale_probs
    from raytumor.evaluate import predict_files

    files = data.manifest.loc[
        data.manifest["split"].isin(["val", "test"]), ["path", "label", "group", "split"]
    ]
    preds = pd.DataFrame(columns=["path"])
    if not files.empty:
        preds = predict_files(
            bundle_dir, files[["path", "label"]], storage=StorageOptions.from_env(cfg.s3_endpoint)
        )
        preds = preds.merge(files[["path", "group", "split"]], on="path", how="left")
    prob_cols = [f"prob_{c}" for c in meta.classes]
    val = preds[preds["split"] == "val"] if len(preds) else preds
    if cfg.target_sensitivity and len(val):
        vp = val[prob_cols].to_numpy(dtype=np.float64)
        ok = np.isfinite(vp).all(1)
        cal = calibrate_bundle_meta(meta, vp[ok], val["label"].to_numpy()[ok], cfg.target_sensitivity)
        meta.temperature, meta.threshold = float(cal["temperature"]), float(cal["threshold"])
        meta.metrics["calibration"] = {**cal, "fitted_on": "val"}
    test_preds = preds[preds["split"] == "test"].copy() if len(preds) else preds
    if len(test_preds) and meta.temperature != 1.0:
        tp = test_preds[prob_cols].to_numpy(dtype=np.float64)
        test_preds[prob_cols] = rescale_probs(tp, 1.0, meta.temperature).astype(np.float32)
    test = _measure(test_preds, meta)
    meta.metrics["test"] = test
    if cfg.test_data:
        from raytumor.evaluate import evaluate_source

        ext = evaluate_source(
            bundle_dir, cfg.test_data, bundle_dir.parent / "external_test", s3_endpoint=cfg.s3_endpoint
        )
        meta.metrics["external_test"] = {"data": cfg.test_data, **ext["metrics"], "files": ext["files"]}
    bundle_mod.save_bundle(bundle_dir, state_dict, meta, fingerprints, history)
    return meta, test


def write_split(data: SplitData, run_dir: Path) -> tuple[str, dict[str, Any]]:
    """Write the split manifest, ingest summary and duplicate groups next to the run; print the summary."""
    from raytumor import bundle as bundle_mod
    from raytumor.ingest import summary_to_json

    manifest_path = run_dir / "split_manifest.parquet"
    drop = [c for c in ("thumb", "thumb_crop") if c in data.manifest.columns]
    data.manifest.drop(columns=drop).to_parquet(manifest_path, index=False)
    summary_ingest = summary_to_json(data.catalogue.summary())
    summary_ingest["duplicates"] = {k: v for k, v in data.duplicates.items() if k != "groups"}
    (run_dir / "ingest_summary.json").write_text(json.dumps(summary_ingest, indent=2) + "\n")
    data.duplicate_table.to_csv(run_dir / "duplicate_groups.csv", index=False)
    print(
        f"[raytumor] {summary_ingest['files_listed']} files listed, {summary_ingest['files_decoded']} decoded, "
        f"{summary_ingest['files_rejected']} rejected {summary_ingest['rejected_reasons']}, "
        f"{summary_ingest['files_ignored']} ignored; duplicate groups "
        f"{data.duplicates['groups_with_duplicates']} ({data.duplicates['redundant_files']} redundant files)"
    )
    print("[raytumor] split (files per class):\n" + data.counts().to_string())
    if "source" in data.manifest.columns and data.manifest["source"].nunique() > 1:
        print("[raytumor] split (files per source):\n" + data.source_counts().to_string())
    if data.holdout:
        summary_ingest["holdout"] = data.holdout
        (run_dir / "ingest_summary.json").write_text(json.dumps(summary_ingest, indent=2) + "\n")
    return bundle_mod.file_sha256(manifest_path), summary_ingest


def run_training(cfg: TrainConfig, callbacks: list[Any] | None = None) -> dict[str, Any]:
    """Run the whole training job; returns a summary with the bundle path and test metrics.

    ``callbacks``: extra ``ray.train.UserCallback`` objects (e.g. to see every worker's reports)."""
    from raytumor.runtime import init_ray, train_resources

    t0 = time.time()
    init_ray()
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(asdict(cfg), indent=2, default=str) + "\n")

    data = prepare_split(cfg)
    split_sha, summary_ingest = write_split(data, run_dir)
    check_metric(resolve_metric(cfg.metric, data.classes, data.negative_class), data.files("val"))
    train_ds, val_ds = build_datasets(data.files("train"), data.files("val"), cfg)
    trainer, metric = make_trainer(
        cfg,
        data.classes,
        data.negative_class,
        data.n_train,
        {"train": train_ds, "val": val_ds},
        name=cfg.run_name,
        storage_path=cfg.storage_path or str(run_dir / "checkpoints"),
        fail_marker=str(run_dir / ".failed_once"),
        callbacks=callbacks,
    )
    result = trainer.fit()
    sign = -1 if _is_min_metric(metric) else 1
    best_ckpt, best_metrics = max(result.best_checkpoints, key=lambda cm: sign * cm[1][metric])
    _, final_state = load_checkpoint_files(result.checkpoint)
    history = pd.DataFrame(final_state["history"])
    state_dict, _ = load_checkpoint_files(best_ckpt)
    meta, test = export_bundle(
        cfg, data, state_dict, best_metrics, history, metric, split_sha, run_dir / "bundle"
    )
    report = write_test_report(run_dir, data, cfg) if cfg.report else None
    res = train_resources(cfg.num_workers, cfg.use_gpu, cfg.cpus_per_worker)
    wall = time.time() - t0
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
        "wall_seconds": round(wall, 1),
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return summary


def write_test_report(run_dir: Path, data: SplitData, cfg: Any) -> str | None:
    """``raytumor report`` on the held-out test split (a manifest written next to the run)."""
    from raytumor.report import build_report

    # source/patient_id travel with the manifest so the report breaks metrics down by source (LOSO runs).
    cols = ["path", "class_name"] + [c for c in ("source", "patient_id") if c in data.manifest.columns]
    test = data.manifest.loc[data.manifest["split"] == "test", cols]
    if test.empty:
        return None
    manifest = run_dir / "test_manifest.csv"
    test.rename(columns={"class_name": "label"}).to_csv(manifest, index=False)
    build_report(
        run_dir / "bundle", str(manifest), run_dir / "report", s3_endpoint=cfg.s3_endpoint, seed=cfg.seed
    )
    path = str(run_dir / "report" / "report.html")
    print(f"[raytumor] report: {path}")
    return path


def _measure(preds: pd.DataFrame, meta: Any) -> dict[str, Any]:
    """Metrics with 95 % CIs of predictions (``path, label, prob_<class>`` and optional ``group``)."""
    from raytumor.evaluate import bootstrap_ci, compute_metrics

    if preds.empty:
        return {"n": 0}
    preds = preds.sort_values("path", ignore_index=True)
    probs = preds[[f"prob_{c}" for c in meta.classes]].to_numpy(dtype=np.float32)
    ok = np.isfinite(probs).all(1)
    labels = preds["label"].to_numpy().astype(np.int64)[ok]
    m = compute_metrics(labels, probs[ok], meta.classes, meta.negative_class, meta.threshold)
    groups = None
    if "group" in preds.columns:  # cluster bootstrap over duplicate groups
        groups = preds["group"].to_numpy()[ok]
    m["ci95"] = bootstrap_ci(
        labels, probs[ok], meta.classes, meta.negative_class, meta.threshold, groups=groups
    )
    m["ci95_resampling"] = "duplicate groups" if groups is not None else "scans"
    return m


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


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    d = TrainConfig(data="")
    p = argparse.ArgumentParser(
        description="Fine-tune a brain-MRI tumour classifier on Ray", add_help=add_help
    )
    p.add_argument("--data", required=True, action="append", help=DATA_HELP)
    p.add_argument("--holdout-source", default=None, metavar="KEY", help=HOLDOUT_HELP)
    p.add_argument("--out", default=d.out, help="runs directory; the run writes to OUT/NAME")
    p.add_argument("--name", default=None, help="run name (default: backbone-size-seed); same name resumes")
    p.add_argument("--backbone", default=d.backbone, help="see `raytumor backbones`")
    p.add_argument("--weights", default=d.weights, help="imagenet | none | path to a state dict")
    p.add_argument("--image-size", type=int, default=d.image_size)
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="per worker")
    p.add_argument("--lr", type=float, default=d.lr, help="head learning rate")
    p.add_argument("--backbone-lr", type=float, default=d.backbone_lr)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--warmup-epochs", type=float, default=d.warmup_epochs)
    p.add_argument(
        "--freeze-epochs", type=int, default=d.freeze_epochs, help="frozen-backbone warm-up epochs"
    )
    p.add_argument("--dropout", type=float, default=d.dropout)
    p.add_argument("--label-smoothing", type=float, default=d.label_smoothing)
    p.add_argument("--augment-strength", type=float, default=d.augment_strength)
    p.add_argument(
        "--shift-augment",
        type=float,
        default=d.shift_augment,
        help="strength of scanner/source-shift augmentation (blur/sharpen, JPEG, resampling, 90° turns, "
        "erasing); 0 = off",
    )
    p.add_argument(
        "--preprocess",
        default=d.preprocess,
        help="slice preprocessing stored in the bundle and reused when scoring: none, or a comma list of "
        "crop (crop to the head) and zscore (intensity standardisation inside the head)",
    )
    p.add_argument(
        "--metric",
        default=d.metric,
        help="val metric for best checkpoint / early stopping (e.g. val_roc_auc, val_loss, or "
        "val_source_min_roc_auc with several sources)",
    )
    p.add_argument("--patience", type=int, default=d.patience, help="early-stopping patience in epochs")
    p.add_argument("--keep-checkpoints", type=int, default=d.keep_checkpoints)
    p.add_argument("--max-failures", type=int, default=d.max_failures)
    p.add_argument("--num-workers", type=int, default=None, help="default: #GPUs, or 2 on CPU")
    p.add_argument("--use-gpu", default="auto", choices=["auto", "true", "false"])
    p.add_argument(
        "--cpus-per-worker", type=float, default=None, help="default: leave half the CPUs to Ray Data"
    )
    p.add_argument(
        "--placement-strategy",
        default=d.placement_strategy,
        choices=["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"],
        help="how Ray places training workers across nodes",
    )
    p.add_argument(
        "--worker-resource",
        dest="worker_resources",
        action="append",
        default=[],
        metavar="NAME=AMOUNT",
        help="custom Ray resource each training worker also needs (repeatable), e.g. trainer_node=1",
    )
    p.add_argument("--split", default="0.7,0.15,0.15", help="train,val,test fractions")
    p.add_argument("--max-hamming", type=int, default=None, help="dHash distance for near-duplicates")
    p.add_argument(
        "--test-data", default=None, help="extra labelled test source (duplicates of training dropped)"
    )
    p.add_argument(
        "--class-order", default=None, help="comma-separated class order (default: no-tumour first)"
    )
    p.add_argument("--limit-per-class", type=int, default=None, help="subsample for quick runs")
    p.add_argument("--storage-path", default=None, help="Ray Train storage (local or s3://) for checkpoints")
    p.add_argument("--s3-endpoint", default=None, help="endpoint of an S3-compatible store")
    p.add_argument(
        "--target-sensitivity",
        type=float,
        default=d.target_sensitivity,
        help="fit temperature scaling on validation and set the operating threshold that reaches this "
        "sensitivity there (0: no calibration, threshold 0.5)",
    )
    p.add_argument(
        "--no-report", dest="report", action="store_false", help="skip the HTML report on the test split"
    )
    p.add_argument("--seed", type=int, default=d.seed)
    return p


def main(args: argparse.Namespace) -> dict[str, Any]:
    cfg = TrainConfig.from_args(args)
    summary = run_training(cfg)
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
