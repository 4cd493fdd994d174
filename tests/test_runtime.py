"""Resource sizing leaves CPUs to Ray Data on small machines."""

from __future__ import annotations

import pytest

from raytumor.runtime import train_resources, worker_threads


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
