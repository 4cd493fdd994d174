"""Inside each Ray Train worker: the epoch loop, DDP, validation on every rank, checkpoints.

Shape follows torchvision's ``references/classification``: ``train_one_epoch`` / ``evaluate_shard`` do the
per-epoch work; :func:`train_loop_per_worker` wires them to Ray Train (dataset shards, reports, checkpoints,
restarts). ``worker_callbacks`` (plain callables in the loop config) see every training step: tests use one
to kill a worker mid-epoch, like a lost node.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from raytumor.augment import augment_batch
from raytumor.metrics import compute_metrics
from raytumor.model import create_model
from raytumor.runtime import worker_threads
from raytumor.train.config import is_min_metric

# Files of a training checkpoint (not the bundle's model.pt, which raytumor.bundle writes).
CHECKPOINT_MODEL = "model.pt"
CHECKPOINT_STATE = "train_state.pt"  # optimizer + scheduler tensors: loads with weights_only=True
CHECKPOINT_PROGRESS = "train_state.json"  # epoch, best, history: plain JSON, nothing to unpickle


def cosine_lambda(total_steps: int, warmup_steps: int):
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
    waited, it = 0.0, iter(batches)
    while True:
        tw = time.perf_counter()
        batch = next(it, None)  # the time spent here is the input pipeline's, not the model's
        waited += time.perf_counter() - tw
        if batch is None:
            break
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
    return {"loss_sum": loss_sum, "n": n, "seconds": time.perf_counter() - t0, "data_wait_s": waited}


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
        # the slowest rank's seconds waiting for input batches (its share of the epoch: an input-bound run)
        "train_data_wait_s": max(q[4].get("data_wait_s", 0.0) for q in parts),
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
    # Gradients as views into the all-reduce buckets: no copy of every gradient into its bucket per step.
    return DistributedDataParallel(model, device_ids=ids, gradient_as_bucket_view=True)


def _with_callbacks(
    batches: Iterable[Any], callbacks: list[Callable[[dict[str, Any]], None]], info: dict[str, Any]
) -> Iterator[Any]:
    """Yield ``batches``, calling each callback with ``info`` + ``step`` and ``seconds`` (into the epoch)
    before each training step."""
    t0 = time.monotonic()
    for step, batch in enumerate(batches):
        for cb in callbacks:
            cb({**info, "step": step, "seconds": time.monotonic() - t0})
        yield batch


def _setup(cfg: dict[str, Any], rank: int, world: int, device: torch.device) -> dict[str, Any]:
    """Model, optimiser, schedule and the fresh training state of one worker."""
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
        optimizer, cosine_lambda(total, int(cfg["warmup_epochs"] * steps_per_epoch))
    )
    minimise = is_min_metric(cfg["metric"])
    state = {
        "epoch": 0,
        "best": math.inf if minimise else -math.inf,
        "bad_epochs": 0,
        "history": [],
        "resumed_at": [],
    }
    return {
        "model": model, "optimizer": optimizer, "scheduler": scheduler, "state": state,
        "batch_size": batch_size, "steps_per_epoch": steps_per_epoch,
    }  # fmt: skip


def _json_number(o: Any) -> Any:
    if isinstance(o, np.generic | torch.Tensor):
        return o.item()
    raise TypeError(f"not JSON serialisable in training progress: {type(o).__name__}")


def read_progress(checkpoint_dir: str | Path) -> dict[str, Any]:
    """The training loop's progress (epoch, best, history) saved beside a checkpoint's tensors."""
    path = Path(checkpoint_dir) / CHECKPOINT_PROGRESS
    if not path.is_file():
        raise FileNotFoundError(
            f"{path.name} missing in checkpoint {checkpoint_dir}: written by an older raytumor that pickled "
            "training state; start the run under a new --name"
        )
    return json.loads(path.read_text())


def _restore(run: dict[str, Any], checkpoint: Any, device: torch.device, rank: int) -> None:
    """Continue from a checkpoint: a worker restart (FailureConfig) or a rerun of the same run name."""
    with checkpoint.as_directory() as d:
        run["model"].load_state_dict(
            torch.load(Path(d) / CHECKPOINT_MODEL, map_location=device, weights_only=True)
        )
        saved = torch.load(Path(d) / CHECKPOINT_STATE, map_location="cpu", weights_only=True)
        state = read_progress(d)
    run["optimizer"].load_state_dict(saved["optimizer"])
    run["scheduler"].load_state_dict(saved["scheduler"])
    state["epoch"] += 1
    state["resumed_at"].append(state["epoch"])
    run["state"] = state
    if rank == 0:
        print(f"[raytumor] resuming from checkpoint after epoch {state['epoch'] - 1}")


def _report(run: dict[str, Any], metrics: dict[str, Any], rank: int) -> None:
    """``ray.train.report`` with a checkpoint from rank 0 (model state of the unwrapped module)."""
    import ray.train

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = None
        if rank == 0:
            torch.save(run["model"].state_dict(), Path(tmp) / CHECKPOINT_MODEL)
            # A checkpoint on shared --storage-path must not run code when loaded: tensors in the .pt
            # (weights_only=True), the loop's progress as JSON.
            torch.save(
                {"optimizer": run["optimizer"].state_dict(), "scheduler": run["scheduler"].state_dict()},
                Path(tmp) / CHECKPOINT_STATE,
            )
            (Path(tmp) / CHECKPOINT_PROGRESS).write_text(json.dumps(run["state"], default=_json_number))
            ckpt = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=ckpt)


def _print_epoch(metrics: dict[str, Any], metric: str, frozen: bool) -> None:
    worst = metrics.get("val_source_min_roc_auc")
    extra = "" if worst is None or metric == "val_source_min_roc_auc" else f"worst-source AUC {worst:.4f} "
    print(
        f"[raytumor] epoch {metrics['epoch']}: train_loss {metrics['train_loss']:.4f} "
        f"val_loss {metrics['val_loss']:.4f} {metric} {metrics[metric]:.4f} {extra}"
        f"({metrics['train_images_per_s']:.1f} img/s{', backbone frozen' if frozen else ''})"
    )


def _run_epoch(run: dict[str, Any], cfg: dict[str, Any], epoch: int, io: dict[str, Any]) -> dict[str, Any]:
    """Train one epoch, validate on every rank, and return the epoch's metrics (identical on all ranks)."""
    rank, world, device = io["rank"], io["world"], io["device"]
    model, bs = run["model"], run["batch_size"]
    frozen = epoch < cfg["freeze_epochs"]
    model.set_backbone_trainable(not frozen)
    if run.get("phase") != frozen:  # DDP registers the trainable params at construction: rebuild
        run["ddp"], run["phase"] = _wrap_ddp(model, world, device), frozen
    batches = _train_batches(io["train"], bs, cfg)
    if cfg.get("worker_callbacks"):
        info = {"epoch": epoch, "rank": rank, "world": world, "steps_per_epoch": run["steps_per_epoch"]}
        batches = _with_callbacks(batches, cfg["worker_callbacks"], info)
    tr = train_one_epoch(
        run["ddp"], run["optimizer"], run["scheduler"], batches, device, cfg["label_smoothing"]
    )
    idx, labels, probs, srcs = evaluate_shard(model, io["val"], rank, world, device, bs * 2)
    parts = _gather((idx.numpy(), labels.numpy(), probs.numpy(), srcs.numpy(), tr), world)
    # Computed once on rank 0 and broadcast: result.metrics is rank 0's, but every rank must report
    # the same keys and take the same early-stopping decision.
    epoch_metrics = _broadcast(_epoch_metrics(parts, cfg) if rank == 0 else None, world)
    return {
        "epoch": epoch,
        "epochs_done": epoch + 1,  # Tune's ASHA time attribute
        **epoch_metrics,
        "lr_head": run["optimizer"].param_groups[-1]["lr"],
        "frozen_backbone": frozen,
    }


def _train_batches(shard: Any, batch_size: int, cfg: dict[str, Any]) -> Iterator[dict[str, torch.Tensor]]:
    """This rank's training batches as uint8/int64 tensors. With ``augment_in == "worker"`` the shard holds
    store-size images and they are augmented here, between steps, on the threads the model uses."""
    common = {"batch_size": batch_size, "drop_last": True, "local_shuffle_buffer_size": batch_size * 8}
    # drop_last: a trailing batch of 1 breaks BatchNorm in train mode.
    if cfg.get("augment_in", "data") == "data":
        yield from shard.iter_torch_batches(dtypes={"image": torch.uint8, "label": torch.int64}, **common)
        return
    for batch in shard.iter_batches(batch_format="numpy", **common):
        out = augment_batch(batch, **cfg["augment"])
        # Ray's label arrays are read-only views of the object store: copied (from_numpy would warn).
        yield {
            "image": torch.from_numpy(out["image"]),
            "label": torch.tensor(out["label"], dtype=torch.int64),
        }


def _track_best(state: dict[str, Any], metrics: dict[str, Any], metric: str) -> None:
    value = metrics.get(metric)
    if value is None:
        raise KeyError(f"metric {metric!r} not reported; available: {sorted(metrics)}")
    improved = value < state["best"] if is_min_metric(metric) else value > state["best"]
    state["best"] = value if improved else state["best"]
    state["bad_epochs"] = 0 if improved else state["bad_epochs"] + 1
    state["epoch"] = metrics["epoch"]
    state["history"].append(metrics)  # the same dict: history rows also carry best_<metric>
    metrics["best_" + metric] = state["best"]


def train_loop_per_worker(cfg: dict[str, Any]) -> None:
    import ray
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(worker_threads(ctx.get_local_world_size()))
    torch.manual_seed(cfg["seed"])  # identical init on every rank; DDP also broadcasts rank 0's weights
    device = ray.train.torch.get_device()
    run = _setup(cfg, rank, world, device)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        _restore(run, checkpoint, device, rank)
    state, metric = run["state"], cfg["metric"]
    # Which nodes this attempt's workers run on (recorded per attempt: a recovery may land elsewhere).
    nodes = sorted(set(_gather(ray.get_runtime_context().get_node_id(), world)))
    state.setdefault("worker_nodes", []).append(nodes)
    if rank == 0:
        print(f"[raytumor] {world} worker(s) on {len(nodes)} node(s)")
    io = {
        "rank": rank, "world": world, "device": device,
        "train": ray.train.get_dataset_shard("train"), "val": ray.train.get_dataset_shard("val"),
    }  # fmt: skip
    for epoch in range(state["epoch"], cfg["epochs"]):
        if state["bad_epochs"] >= cfg["patience"]:
            break  # a resumed run that had already stopped early
        metrics = _run_epoch(run, cfg, epoch, io)
        _track_best(state, metrics, metric)
        _report(run, metrics, rank)
        if rank == 0:
            _print_epoch(metrics, metric, metrics["frozen_backbone"])
        if state["bad_epochs"] >= cfg["patience"]:
            if rank == 0:
                print(f"[raytumor] early stop: {metric} has not improved for {cfg['patience']} epochs")
            break
