"""Resource sizing leaves CPUs to Ray Data on small machines."""

from __future__ import annotations

import pytest

from raytumor.runtime import (
    ACTOR_MEMORY_BYTES,
    TORCH_PROCESS_ENV,
    memory_budget,
    predictor_resources,
    torch_runtime_env,
    train_resources,
    worker_threads,
)


def test_two_cpu_machine_leaves_a_cpu_for_ingest(ray_session):
    r = train_resources()
    assert r.cluster_cpus == 2 and not r.use_gpu
    assert r.num_workers == 2 and r.cpus_per_worker == 0.5  # 1 CPU left for decode/augment tasks
    one = train_resources(num_workers=1)
    assert one.cpus_per_worker == 1.0
    assert train_resources(num_workers=4).cpus_per_worker == 0.25
    with pytest.raises(RuntimeError, match="no GPUs"):
        train_resources(use_gpu="true")


def test_worker_threads_share_cores(monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 16)
    assert worker_threads(4) == 4 and worker_threads(32) == 1


def test_scoring_replicas_reserve_their_decode_peak_and_fit_the_memory(ray_session):
    """Each scoring replica (decode fused in) reserves Ray ``memory`` for one unit at the decoders' limits
    plus its model, and a node never gets more replicas than its memory holds."""
    import ray

    r = predictor_resources()
    assert r["memory"] == ACTOR_MEMORY_BYTES and r["decode_memory"] == r["memory"]  # equal: they fuse
    assert r["size"] * r["memory"] <= ray.cluster_resources()["memory"]
    gib = 1 << 30
    assert memory_budget(16, 10 * gib, int(1.5 * gib)) == (6, int(1.5 * gib))  # memory, not CPUs, binds
    assert memory_budget(2, 64 * gib) == (2, ACTOR_MEMORY_BYTES)
    # less than one replica's budget: one replica asks for what there is rather than waiting forever
    assert memory_budget(4, gib) == (1, int(0.9 * gib))
    assert memory_budget(3, 0) == (3, 0)  # a cluster that reports no memory resource


def test_torch_processes_get_the_malloc_settings_unless_the_user_chose_their_own(monkeypatch):
    for k in TORCH_PROCESS_ENV:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.delenv("RAYTUMOR_MALLOC", raising=False)
    assert torch_runtime_env() == {"env_vars": TORCH_PROCESS_ENV}
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert torch_runtime_env()["env_vars"]["MALLOC_ARENA_MAX"] == "4"
    monkeypatch.setenv("RAYTUMOR_MALLOC", "default")
    assert torch_runtime_env() == {}


def test_scoring_actors_and_their_fused_decode_tasks_run_with_the_malloc_settings(ray_session):
    """The decode tasks and the scoring actors carry the same runtime env (or Ray Data would stop fusing
    them), and a process started with it sees the settings glibc reads at start-up."""
    import os

    import pandas as pd
    import ray.data

    r = predictor_resources()
    assert r["remote_args"] == {"runtime_env": torch_runtime_env()}

    def env(batch: pd.DataFrame) -> pd.DataFrame:
        return batch.assign(arena=os.environ.get("MALLOC_ARENA_MAX"), pid=os.getpid())

    class Env:
        def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
            return batch.assign(actor_arena=os.environ.get("MALLOC_ARENA_MAX"), actor_pid=os.getpid())

    from ray.data import ActorPoolStrategy

    ds = ray.data.from_pandas(pd.DataFrame({"x": range(8)})).map_batches(
        env, batch_format="pandas", num_cpus=r["decode_cpus"], memory=r["decode_memory"], **r["remote_args"]
    )
    ds = ds.map_batches(
        Env, batch_format="pandas", compute=ActorPoolStrategy(size=1), num_cpus=r["num_cpus"],
        memory=r["memory"], **r["remote_args"],
    )  # fmt: skip
    out = ds.to_pandas()
    assert set(out["arena"]) == set(out["actor_arena"]) == {TORCH_PROCESS_ENV["MALLOC_ARENA_MAX"]}
    assert (out["pid"] == out["actor_pid"]).all()  # fused: the actor ran the decode step itself


def test_ray_train_report_lines_are_dropped_and_nothing_else():
    """Train V2 logs each report's whole metrics dict and checkpoint path per worker per epoch; the worker
    setup hook drops those two lines (the loop prints its own epoch line) and keeps the rest."""
    import logging
    import os

    import ray

    from raytumor.runtime import quiet_train_reports

    quiet_train_reports()
    quiet_train_reports()  # idempotent: one filter per logger
    path = os.path.join(os.path.dirname(ray.__file__), "train", "v2", "_internal", "execution", "context.py")
    loggers = [logging.getLogger(path), logging.getLogger("ray.train.v2._internal.execution.storage")]
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())  # type: ignore[method-assign]
    for lg in loggers:
        assert len(lg.filters) == 1
        lg.addHandler(handler)
        lg.setLevel(logging.INFO)
    try:
        loggers[0].info("Reporting training result 2: TrainingReport(checkpoint=..., metrics={}) from rank 0")
        loggers[0].info("something else Train says")
        loggers[1].info("Checkpoint successfully created at: Checkpoint(filesystem=local, path=/x)")
        loggers[1].info("another storage line")
    finally:
        for lg in loggers:
            lg.removeHandler(handler)
            lg.setLevel(logging.NOTSET)
    assert seen == ["something else Train says", "another storage line"]
