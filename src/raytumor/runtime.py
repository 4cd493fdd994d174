"""Ray session and resource sizing shared by the jobs.

Sizes come from ``ray.cluster_resources()`` so a 2-CPU laptop and a GPU cluster both run without flags:
on 2 CPUs a 2-worker trainer asking 1 CPU each would leave Ray Data no CPU and hang forever.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("raytumor")

# Run in every worker of an in-process session (the runtime_env setup hook).
_SETUP_HOOK = "raytumor.runtime._setup_worker"


def init_ray(address: str | None = None, **kwargs: Any) -> None:
    """Join ``RAY_ADDRESS``/``address`` if set (a cluster or ``ray job submit``), else start Ray in-process,
    isolated from any other Ray session on this machine (see :func:`_isolate_local_session`)."""
    import ray

    if ray.is_initialized():  # a Tune trial's driver, or a second stage in one process
        _quiet_data_progress()
        return
    # Ray Train V2 is the default in 2.5x; keep it explicit so workers and drivers agree.
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    # Train's print patch echoes each worker print twice on a local cluster (logger + stdout).
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    # No address: a fresh in-process Ray ("local"), never a stale cluster left in /tmp/ray by `ray start`.
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    kwargs.setdefault("log_to_driver", True)
    quiet_ray_internal_warnings()
    if address != "local":
        ray.init(address=address, **kwargs)
    else:
        # The dashboard serves the State API, which Train V2's placement-group cleaner polls to free a
        # killed trial's resources (Tune/ASHA stops); without it the cleaner only logs warnings.
        kwargs.setdefault("include_dashboard", os.environ.get("RAYTUMOR_DASHBOARD", "1") != "0")
        _isolate_local_session(ray, kwargs)
        _wait_for_resources(ray)
        start_watchdog()
    _quiet_data_progress()


def _quiet_data_progress() -> None:
    """Ray Data's bars off (they garble logs; the jobs print their own progress lines), and its warning
    that they are off with them. ``RAYTUMOR_PROGRESS=1`` turns them on."""
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = bool(
        int(os.environ.get("RAYTUMOR_PROGRESS", "0"))
    )
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)


def _isolate_local_session(ray: Any, kwargs: dict[str, Any]) -> None:
    """Start an in-process Ray that no other Ray session on this machine can see or disturb.

    Train V2's PlacementGroupCleaner (a detached actor) asks the State API every second whether the
    Train controller is alive, via ``ray.util.state.get_actor(id)`` with no address. Ray resolves that
    address (dashboard/utils.py ``get_address_for_submission_client``) from RAY_API_SERVER_ADDRESS, else
    RAY_ADDRESS, else ``services.get_ray_address_from_environment``: the machine-wide file
    ``$RAY_TMPDIR/ray/ray_current_cluster`` (``/tmp/ray`` by default), and failing that every raylet on
    the machine (``find_gcs_addresses``: "Found multiple active Ray instances" when there are several).
    When another session owns that file, the cleaner asks the other cluster, is told the controller does
    not exist, and removes this run's placement group: "Destroying worker since its placement group was
    removed". So each session gets:

    - its own temp dir (in ``RAY_TMPDIR`` while Ray starts, so the raylet and every worker inherit it)
      holding its own ``ray_current_cluster``; the shared file is never written;
    - a worker setup hook that sets ``RAY_ADDRESS`` to the worker's own GCS in every worker process, so
      Ray's address discovery never looks at files or other raylets at all.

    The driver's environment is left as it was, so child processes (other runs) start their own session.
    """
    from ray._private.utils import write_ray_address

    # Ray's default for a new local cluster (token auth) stays; its warning that it is the default, at the
    # top of every run, goes (RAY_AUTH_MODE=disabled still opts out, README "Security").
    logging.getLogger("ray._private.authentication.authentication_token_setup").addFilter(_quiet_auth_default)

    root = tempfile.mkdtemp(prefix="rt", dir=_temp_base())
    temp_dir = os.path.join(root, "ray")  # = Ray's default temp dir for RAY_TMPDIR=root
    kwargs.setdefault("_temp_dir", temp_dir)
    env = dict(kwargs.get("runtime_env") or {})
    env.setdefault("worker_process_setup_hook", _SETUP_HOOK)
    kwargs["runtime_env"] = env
    before = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = root
    try:
        ray.init(address="local", **kwargs)
    finally:
        if before is None:
            os.environ.pop("RAY_TMPDIR", None)
        else:
            os.environ["RAY_TMPDIR"] = before
    gcs = ray.get_runtime_context().gcs_address
    # A fallback for anything that resolves the address through the file rather than RAY_ADDRESS.
    write_ray_address(gcs, kwargs["_temp_dir"])
    _SESSION.update(gcs_address=gcs, root=root, temp_dir=kwargs["_temp_dir"])
    atexit.register(_remove_session_dir, root)
    # Once this session has shut down (Ctrl-C, exit), a Ray call from a thread still winding down (Ray
    # Data's iterator) would otherwise run ``ray.init()`` with no address and join whatever cluster the
    # machine-wide file names: another user's job. This driver only ever uses the session it started.
    from ray._private import auto_init_hook

    auto_init_hook.enable_auto_connect = False


# Ray's longest socket path below a session root; AF_UNIX paths may not exceed 107 bytes.
_SOCKET_TAIL = len("/rtxxxxxxxx/ray/session_2026-01-01_00-00-00_000000_4194304/sockets/plasma_store")


def _wait_for_resources(ray: Any, timeout_s: float = 30.0) -> None:
    """Return once a new local session reports its CPUs. Right after ``ray.init`` the resource view can be
    empty: actors would be sized for 1 CPU (``predictor_resources``) and Ray Data warns that the job
    will hang."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if ray.available_resources().get("CPU") and ray.cluster_resources().get("CPU"):
            return
        time.sleep(0.1)
    log.warning("Ray reports no available CPU %.0f s after it started; the job may wait for one", timeout_s)


def _quiet_auth_default(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Token authentication is enabled for this Ray cluster")


def _temp_base() -> str:
    """Where session roots go: RAY_TMPDIR, else the system temp dir, else /tmp, whichever is short enough
    for Ray's socket paths (a long TMPDIR would otherwise fail ray.init)."""
    candidates = [os.environ.get("RAY_TMPDIR"), tempfile.gettempdir(), "/tmp"]
    for base in candidates:
        if base and len(base) + _SOCKET_TAIL <= 107 and os.path.isdir(base) and os.access(base, os.W_OK):
            return base
    return next(b for b in candidates if b)  # Ray then says which path is too long


# The in-process session this driver started: its GCS address and private temp dirs.
_SESSION: dict[str, str] = {}


def session_info() -> dict[str, str]:
    """``gcs_address``, ``root`` and ``temp_dir`` of the in-process session (empty when joined)."""
    return dict(_SESSION)


def quiet_ray_internal_warnings() -> None:
    """Warnings Ray raises about its own internals, which no option of ours changes: Train V2's dataset
    manager still sets the deprecated ``ExecutionOptions.exclude_resources`` (Ray 2.60)."""
    import warnings

    warnings.filterwarnings("ignore", message=r"`ExecutionOptions\.exclude_resources` is deprecated")


# INFO lines Ray Train V2 logs in every training worker at each report, repeating what the loop's own
# ``[raytumor] epoch N`` line says: the whole metrics dict and the checkpoint path, twice per epoch. Their
# logger: by module name, or (a path ending in .py) by file path relative to the ray package, as the
# module names it (``logging.getLogger(__file__)``).
TRAIN_REPORT_NOISE: dict[str, str] = {
    "train/v2/_internal/execution/context.py": "Reporting training result ",
    "ray.train.v2._internal.execution.storage": "Checkpoint successfully created at",
}


class _DropPrefix(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


def quiet_train_reports() -> None:
    """Drop :data:`TRAIN_REPORT_NOISE` from this process's Ray Train loggers (nothing else they log)."""
    import ray

    root = os.path.dirname(ray.__file__)
    for name, prefix in TRAIN_REPORT_NOISE.items():
        lg = logging.getLogger(os.path.join(root, *name.split("/")) if name.endswith(".py") else name)
        if not any(isinstance(f, _DropPrefix) and f.prefix == prefix for f in lg.filters):
            lg.addFilter(_DropPrefix(prefix))


def _setup_worker() -> None:
    """Worker setup hook of an in-process session: Ray's own address discovery (State API clients, e.g.
    Train's placement-group cleaner) must find this worker's cluster, never another one on the machine;
    and the worker's log stays free of Ray's warnings about its own internals."""
    quiet_ray_internal_warnings()
    try:
        quiet_train_reports()
    except Exception:  # noqa: BLE001 - log noise is never worth a failed worker
        log.debug("could not quiet Ray Train's report lines", exc_info=True)
    try:
        import ray

        os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
        # It would win over RAY_ADDRESS; inherited from the user's shell it can only name another cluster.
        os.environ.pop("RAY_API_SERVER_ADDRESS", None)
    except Exception:  # noqa: BLE001 - a failed hook would kill the worker; discovery then falls back to the file
        log.debug("could not pin the session address", exc_info=True)


# Lines Ray's C++ core writes to the driver's fd 2 that say nothing about the run (a line is dropped when
# it holds every part of one entry):
NATIVE_NOISE: tuple[tuple[bytes, ...], ...] = (
    # Ray Data hands every map actor its own context by object reference, which core logs at ERROR for
    # each actor it starts (ray-project/ray#57733); harmless while the driver, which owns them, lives.
    (b"has constructor arguments in the object store and max_restarts > 0",),
    # GCS, forwarded: an actor Ray Data released had already exited when GCS came to kill it.
    (b"(gcs_server)", b"Failed to kill actor", b"Socket closed"),
    # Abseil's raw mutex tracing, which a worker's native code sometimes switches on: lock addresses only.
    (b"[mutex.cc : ", b"] RAW: "),
)
_STDERR_FILTER: dict[str, Any] = {}


def filter_native_stderr(patterns: tuple[tuple[bytes, ...], ...] = NATIVE_NOISE) -> None:
    """Drop the lines that match an entry of ``patterns`` from this process's fd 2 (native code bypasses Python's
    logging, so only a pipe sees them); every other byte passes through unchanged and in order. For
    command-line entry points only: restored at exit, after Ray has stopped (atexit runs LIFO)."""
    import select

    if _STDERR_FILTER:
        return
    try:
        sys.stderr.flush()
        saved = os.dup(2)
        r, w = os.pipe()
        os.dup2(w, 2)
        os.close(w)
    except OSError:  # no usable fd 2 (a daemon): nothing to filter
        return

    def write(data: bytes) -> None:
        while data:
            data = data[os.write(saved, data) :]

    def pump() -> None:
        buf = b""
        while True:
            # A partial line (a prompt, a \r progress bar) is passed on after 0.2 s without more bytes.
            if buf and not select.select([r], [], [], 0.2)[0]:
                write(buf)
                buf = b""
                continue
            chunk = os.read(r, 65536)
            if not chunk:
                break
            *lines, buf = (buf + chunk).split(b"\n")
            write(b"".join(ln + b"\n" for ln in lines if not any(all(p in ln for p in e) for e in patterns)))
        write(buf)
        os.close(r)

    t = threading.Thread(target=pump, daemon=True, name="raytumor-stderr-filter")
    t.start()

    def restore() -> None:
        try:
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        os.dup2(saved, 2)  # drops the pipe's last writer here: the pump drains it and sees EOF
        t.join(timeout=2.0)

    _STDERR_FILTER.update(thread=t, saved=saved)
    atexit.register(restore)


def _remove_session_dir(root: str) -> None:
    """At exit: stop Ray first (its atexit hook may run after this one), then drop the session's temp dir
    (logs, sockets, spilled objects) rather than pile up one per run. Kept after a crash (an uncaught
    exception) or with RAYTUMOR_KEEP_RAY_TMP=1, for Ray's logs."""
    if os.environ.get("RAYTUMOR_KEEP_RAY_TMP", "0") != "0" or getattr(sys, "last_value", None) is not None:
        print(f"[raytumor] Ray's logs of this run are kept in {root}", file=sys.stderr, flush=True)
        return
    try:
        import ray

        if ray.is_initialized() and _SESSION.get("root") == root:
            ray.shutdown()
    except Exception:  # noqa: BLE001 - best effort at interpreter exit
        pass
    shutil.rmtree(root, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------------
# Watchdog: a job stalled on resources says so


def pending_demands(gcs_address: str) -> tuple[dict[str, str], dict[str, tuple[float, float]]]:
    """What the cluster cannot schedule now, from the GCS's autoscaler view (what `ray status` shows):
    ``{key: text}`` for tasks/actors waiting (by shape) and placement groups waiting (by id), and
    ``{resource: (used, total)}``."""
    from ray.autoscaler.v2.sdk import get_cluster_status

    status = get_cluster_status(gcs_address, timeout=10)
    demand = status.resource_demands
    out: dict[str, str] = {}
    for d in demand.ray_task_actor_demand:
        for b in d.bundles_by_count:
            out[f"shape:{_shape(b.bundle)}"] = f"{b.count}x {_shape(b.bundle)} (tasks/actors)"
    for d in demand.placement_group_demand:
        shapes = ", ".join(f"{b.count}x {_shape(b.bundle)}" for b in d.bundles_by_count)
        pg = d.pg_id or d.details or shapes
        out[f"pg:{pg}"] = f"placement group {pg[:8]} {d.state or 'PENDING'} [{shapes}]"
    usage = {u.resource_name: (u.used, u.total) for u in status.cluster_resource_usage}
    return out, usage


def oldest_pending_tasks(min_age_s: float) -> list[str] | None:
    """Names of tasks/actors waiting for a node (resources) for ``min_age_s`` or more, oldest first; None
    when the State API (the dashboard) cannot say. A busy queue moves; a task this old does not."""
    try:
        import ray
        from ray.util.state import list_tasks

        url = ray._private.worker.get_dashboard_url()
        if not url:
            return None
        tasks = list_tasks(
            address=f"http://{url}",
            filters=[("state", "=", "PENDING_NODE_ASSIGNMENT")],
            detail=True,
            limit=200,
            timeout=10,
            raise_on_missing_output=False,
        )
    except Exception:  # noqa: BLE001 - no State API: the caller falls back to the GCS view alone
        return None
    now_ms = time.time() * 1000
    old = sorted(
        (t.creation_time_ms, t.name)
        for t in tasks
        if t.creation_time_ms and now_ms - t.creation_time_ms >= min_age_s * 1000
    )
    return [name for _, name in old]


def _shape(bundle: dict[str, float]) -> str:
    keep = {k: v for k, v in bundle.items() if not k.startswith("node:") and not k.startswith("bundle_group")}
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(keep.items())) + "}"


def _stall_line(
    waited: float, demands: list[str], tasks: list[str], usage: dict[str, tuple[float, float]]
) -> str:
    free = ", ".join(
        f"{k} {t - u:g}/{t:g} free" for k, (u, t) in sorted(usage.items()) if k in ("CPU", "GPU", "memory")
    )
    names = sorted(set(tasks))
    who = f" ({', '.join(names[:4])}{', ...' if len(names) > 4 else ''})" if names else ""
    return (
        f"[raytumor] waiting {waited:.0f}s for resources: {'; '.join(demands)}{who} pending ({free}). "
        "Something holds them (another job's actors or placement groups: `ray status`), or the request "
        "can never fit this cluster."
    )


class ResourceWatchdog(threading.Thread):
    """Prints a line every ``period_s`` while some work has waited ``stall_s`` or more for resources: a
    placement group pending that long, or tasks/actors of one shape waiting that long of which the State
    API confirms one has (a busy but moving queue keeps a backlog without any one task that old)."""

    def __init__(self, gcs_address: str, period_s: float = 30.0, stall_s: float = 120.0):
        super().__init__(name="raytumor-resource-watchdog", daemon=True)
        self.gcs_address, self.period_s, self.stall_s = gcs_address, period_s, stall_s
        self.stop_event = threading.Event()
        self.lines: list[str] = []

    def _same_session(self) -> bool:
        import ray

        return ray.is_initialized() and ray.get_runtime_context().gcs_address == self.gcs_address

    def run(self) -> None:
        first_seen: dict[str, float] = {}  # demand key -> when it was first seen, while it stays pending
        spoke = float("-inf")
        poll = max(1.0, min(self.period_s, self.stall_s / 4))
        while not self.stop_event.wait(poll):
            try:
                if not self._same_session():
                    return
                demands, usage = pending_demands(self.gcs_address)
            except Exception:  # noqa: BLE001 - a watchdog must never take the job down
                log.debug("resource watchdog check failed", exc_info=True)
                continue
            now = time.monotonic()
            first_seen = {k: first_seen.get(k, now) for k in demands}
            stalled = {k for k, t in first_seen.items() if now - t >= self.stall_s}
            if not stalled or now - spoke < self.period_s:
                continue
            tasks: list[str] = []
            if any(k.startswith("shape:") for k in stalled):
                old = oldest_pending_tasks(self.stall_s)
                if old is not None:
                    tasks = old
                    if not old:  # the queue moves: only placement groups can be stuck
                        stalled = {k for k in stalled if k.startswith("pg:")}
            if not stalled:
                continue
            waited = max(now - first_seen[k] for k in stalled)
            line = _stall_line(waited, [demands[k] for k in sorted(stalled)], tasks, usage)
            self.lines.append(line)
            print(line, flush=True)
            spoke = now


_WATCHDOG: list[ResourceWatchdog] = []


def start_watchdog(period_s: float | None = None, stall_s: float | None = None) -> ResourceWatchdog | None:
    """Start the resource watchdog for this driver's session (``RAYTUMOR_WATCHDOG_S`` sets the period,
    0 turns it off; ``RAYTUMOR_WATCHDOG_STALL_S`` how long work waits before it speaks)."""
    import ray

    period = float(os.environ.get("RAYTUMOR_WATCHDOG_S", "30")) if period_s is None else period_s
    if period <= 0 or not ray.is_initialized():
        return None
    stall = float(os.environ.get("RAYTUMOR_WATCHDOG_STALL_S", "120")) if stall_s is None else stall_s
    for old in _WATCHDOG:
        old.stop_event.set()
    _WATCHDOG.clear()
    dog = ResourceWatchdog(ray.get_runtime_context().gcs_address, period, stall)
    dog.start()
    _WATCHDOG.append(dog)
    return dog


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


# glibc malloc settings for processes that run torch on CPUs (training workers, scoring replicas). By
# default every activation above the dynamic mmap threshold is a fresh mmap, and a thread other than the
# main one (Train V2 runs the training function in one) allocates from a capped 64 MB arena, so each step
# re-faults its activations from the kernel: 2.3-2.9 M page faults and ~25 % of the CPU time in the kernel
# per 480 Lite0 training images at 160 px. One arena with a fixed 32 MB mmap threshold (glibc's maximum)
# and no trimming keeps them in the heap: 40 -> 50 img/s in a thread, 45 -> 55 in the main thread
# (bench/train_overhead.py measures it in place). Read at process start, so they go in as env vars.
TORCH_PROCESS_ENV = {
    "MALLOC_ARENA_MAX": "1",
    "MALLOC_MMAP_THRESHOLD_": str(32 << 20),
    "MALLOC_TRIM_THRESHOLD_": str(4 << 30),
    "MALLOC_TOP_PAD_": str(256 << 20),
}


def torch_runtime_env() -> dict[str, Any]:
    """Runtime env for Ray actors that run torch on CPUs: :data:`TORCH_PROCESS_ENV`, unless the user set
    any of those variables in their own environment (theirs win; ``RAYTUMOR_MALLOC=default`` keeps
    glibc's defaults)."""
    if os.environ.get("RAYTUMOR_MALLOC", "") == "default":
        return {}
    return {"env_vars": {k: os.environ.get(k, v) for k, v in TORCH_PROCESS_ENV.items()}}


def worker_threads(local_world_size: int) -> int:
    """Torch threads for one training worker: its share of this node's cores, not its fractional Ray CPUs."""
    return max(1, (os.cpu_count() or 1) // max(1, local_world_size))


def pool_size(size: int, n_inputs: int) -> int:
    """Actors for a Ray Data actor pool: never more than its inputs (blocks/batches), since an idle replica
    only costs its start-up (and Ray Data warns of it)."""
    return max(1, min(size, n_inputs))


# Per-actor memory budget of a scoring replica: one unit decoding at the decoders' size limits
# (raytumor.scan.DecodeLimits: a 512x512x400 .nii.gz peaks at ~1.0 GB while windowed in float32) plus the
# model, its activations and a batch of decoded slices (~0.3 GB for ResNet-50 at batch 256 / 224 px).
# Ray's ``memory`` resource then keeps a node from running more decoding replicas than its RAM holds.
DECODE_PEAK_BYTES = 1 << 30
MODEL_WORKING_BYTES = 512 << 20
ACTOR_MEMORY_BYTES = DECODE_PEAK_BYTES + MODEL_WORKING_BYTES


def memory_budget(size: int, total_memory: float, per_actor: int = ACTOR_MEMORY_BYTES) -> tuple[int, int]:
    """(actors, bytes each): no more replicas than ``total_memory`` (Ray's schedulable ``memory``) holds at
    ``per_actor`` each; where even one does not fit, one replica asks for what there is, so the job runs
    (its decoders' own limits still bound it) instead of waiting forever for memory no node has."""
    if total_memory <= 0:
        return size, 0
    fits = int(total_memory // per_actor)
    if fits >= 1:
        return min(size, fits), per_actor
    return 1, int(total_memory * 0.9)


def predictor_resources() -> dict[str, Any]:
    """Actor count, CPUs and memory for Predictor actors from the cluster, leaving CPUs for decoding."""
    import ray

    res = ray.cluster_resources()
    cpus, gpus = int(res.get("CPU", 1)), int(res.get("GPU", 0))
    total_memory = float(res.get("memory", 0))
    if gpus:
        size, mem = memory_budget(gpus, total_memory)
        # GPU replicas get separate decode tasks, one unit in flight each: they reserve the decode peak.
        return {
            "size": size, "num_gpus": 1, "num_cpus": 1, "threads": None, "decode_cpus": 1, "memory": mem,
            "decode_memory": min(mem, DECODE_PEAK_BYTES), "remote_args": {},
        }  # fmt: skip
    # On CPUs, model replicas beat intra-op threads: ResNet-18 on 2 cores runs 45 img/s per 1-thread
    # process (90 for two) but 81 img/s as one 2-thread process. Replicas of 1 thread on small machines,
    # 2 threads on larger ones (fewer copies of the model in memory).
    threads = 1 if cpus <= 4 else 2
    size, mem = memory_budget(max(1, cpus // threads), total_memory)
    # Reserve half the CPUs for the actors, leaving the rest to decode tasks and Ray itself (decoding is ~15x
    # cheaper than the forward pass, so the actors' threads may use every core). Decode tasks ask for
    # the same CPUs and memory as an actor so Ray Data fuses them into it: each replica decodes its own
    # batches, one unit at a time, inside its memory budget.
    per = round(max(0.25, cpus * 0.5 / size), 3)
    env = torch_runtime_env()
    return {
        "size": size, "num_gpus": 0, "num_cpus": per, "threads": threads, "decode_cpus": per, "memory": mem,
        "decode_memory": mem,
        # The same on the decode tasks and the actors, or Ray Data stops fusing them.
        "remote_args": {"runtime_env": env} if env else {},
    }  # fmt: skip
