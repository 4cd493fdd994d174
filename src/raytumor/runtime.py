"""Ray session and resource sizing shared by the jobs.

Sizes come from ``ray.cluster_resources()`` so a 2-CPU laptop and a GPU cluster both run without flags:
on 2 CPUs a 2-worker trainer asking 1 CPU each would leave Ray Data no CPU and hang forever.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("raytumor")


def init_ray(address: str | None = None, **kwargs: Any) -> None:
    """Join ``RAY_ADDRESS``/``address`` if set (a cluster or ``ray job submit``), else start Ray in-process."""
    import ray

    if ray.is_initialized():
        return
    # Ray Train V2 is the default in 2.5x; keep it explicit so workers and drivers agree.
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    # Train's print patch echoes each worker print twice on a local cluster (logger + stdout).
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    # No address: a fresh in-process Ray ("local"), never a stale cluster left in /tmp/ray by `ray start`.
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    kwargs.setdefault("log_to_driver", True)
    if address == "local":
        # The dashboard serves the State API, which Train V2's placement-group cleaner polls to free a
        # killed trial's resources (Tune/ASHA stops); without it the cleaner only logs warnings.
        kwargs.setdefault("include_dashboard", os.environ.get("RAYTUMOR_DASHBOARD", "1") != "0")
    ray.init(address=address, **kwargs)
    if address == "local":
        # Ray's State API (used by Train V2's placement-group cleaner inside workers) finds "the" local
        # cluster through /tmp/ray/ray_current_cluster, which only `ray start` writes. A stale entry
        # from a dead cluster sends it to a dead GCS: a stopped trial's workers then keep their CPUs
        # and the next trial's Ray Data waits forever. Point it at this session, as cluster_utils does.
        from ray._private.utils import write_ray_address

        write_ray_address(ray.get_runtime_context().gcs_address)
    # Quieter progress output; the jobs print their own summaries.
    ray.data.DataContext.get_current().enable_progress_bars = bool(
        int(os.environ.get("RAYTUMOR_PROGRESS", "0"))
    )


@dataclass
class TrainResources:
    num_workers: int
    use_gpu: bool
    cpus_per_worker: float
    cluster_cpus: float
    cluster_gpus: float


def train_resources(
    num_workers: int | None = None,
    use_gpu: str | bool = "auto",
    cpus_per_worker: float | None = None,
) -> TrainResources:
    """Worker count and CPU reservation for a TorchTrainer, leaving CPUs to Ray Data ingest."""
    import ray

    res = ray.cluster_resources()
    cpus, gpus = float(res.get("CPU", 1)), float(res.get("GPU", 0))
    gpu = (gpus > 0) if use_gpu == "auto" else bool(use_gpu in (True, "1", "true", "yes"))
    if gpu and gpus <= 0:
        raise RuntimeError("--use-gpu requested but the Ray cluster has no GPUs")
    if num_workers is None:
        num_workers = int(gpus) if gpu else (2 if cpus >= 2 else 1)
    if cpus_per_worker is None:
        # Keep at least half the CPUs (min 1) for decoding/augmentation tasks.
        budget = cpus - max(1.0, cpus * 0.5)
        cpus_per_worker = max(0.25, min(8.0, budget / num_workers)) if budget > 0 else 0.25
    return TrainResources(num_workers, gpu, round(cpus_per_worker, 3), cpus, gpus)


def worker_threads(local_world_size: int) -> int:
    """Torch threads for one training worker: its share of this node's cores, not its fractional Ray CPUs."""
    return max(1, (os.cpu_count() or 1) // max(1, local_world_size))


def predictor_resources() -> dict[str, Any]:
    """Actor count/CPUs for Predictor actors from the cluster, leaving CPUs for decoding."""
    import ray

    res = ray.cluster_resources()
    cpus, gpus = int(res.get("CPU", 1)), int(res.get("GPU", 0))
    if gpus:
        return {"size": gpus, "num_gpus": 1, "num_cpus": 1, "threads": None, "decode_cpus": 1}
    # On CPUs, model replicas beat intra-op threads: ResNet-18 on 2 cores runs 45 img/s per 1-thread
    # process (90 for two) but 81 img/s as one 2-thread process. Replicas of 1 thread on small machines,
    # 2 threads on larger ones (fewer copies of the model in memory).
    threads = 1 if cpus <= 4 else 2
    size = max(1, cpus // threads)
    # Reserve half the CPUs for the actors, leaving the rest to decode and write tasks (decoding is ~15x
    # cheaper than the forward pass, so the actors' threads may use every core). Decode tasks ask for
    # the same CPUs as an actor so Ray Data fuses them into it: each replica decodes its own batches.
    per = round(max(0.25, cpus * 0.5 / size), 3)
    return {"size": size, "num_gpus": 0, "num_cpus": per, "threads": threads, "decode_cpus": per}
