"""Two raytumor runs on one machine, each with its in-process Ray, must not disturb each other.

Train V2's placement-group cleaner asks the State API, without an address, whether the Train controller is
alive; Ray resolves that address from the machine-wide ``ray_current_cluster`` file, which the last session
to start used to overwrite. The other session's cleaner then asked the wrong cluster, heard "no such
actor" and removed its own run's placement group ("Destroying worker since its placement group was
removed"). Every process here gets one shared RAY_TMPDIR, as two runs in one user's shell would.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import run_env, stop_group

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# A session that reports what its workers see, then waits for "go" (so both sessions are alive at once) and
# asks the State API about its own actor from a detached actor, exactly as the cleaner does.
PROBE = r"""
import json, os, sys
import ray
from raytumor.runtime import init_ray

init_ray(num_cpus=1, object_store_memory=100 * 1024**2)
gcs = ray.get_runtime_context().gcs_address
print(json.dumps({"ready": gcs}), flush=True)
sys.stdin.readline()


@ray.remote(num_cpus=0)
class Cleaner:
    def look(self, actor_id):
        from ray.train.v2._internal.state.util import is_actor_alive

        env = {k: os.environ.get(k) for k in ("RAY_ADDRESS", "RAY_TMPDIR")}
        return {"alive": bool(is_actor_alive(actor_id, timeout=20)), **env}


@ray.remote(num_cpus=0)
class Controller:
    def probe(self):
        me = ray.get_runtime_context().get_actor_id()
        c = Cleaner.options(lifetime="detached", resources={"node:__internal_head__": 0.001}).remote()
        try:
            return ray.get(c.look.remote(me))
        finally:
            ray.kill(c)


out = ray.get(Controller.remote().probe.remote())
print(json.dumps({"gcs": gcs, "temp_dir": ray._private.worker._global_node.get_temp_dir_path(), **out}), flush=True)
"""


@pytest.fixture()
def shared_tmp():
    """One RAY_TMPDIR for both runs, short enough for Ray's socket paths (pytest's tmp_path is not)."""
    import shutil
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="rtiso", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _json_line(p: subprocess.Popen, key: str, deadline: float) -> dict:
    while time.time() < deadline:
        line = p.stdout.readline()
        if not line:
            break
        if line.startswith("{") and key in line:
            return json.loads(line)
    err = Path(getattr(p, "err_path", os.devnull)).read_text()[-3000:]
    raise AssertionError(f"no {key!r} line from the session (exit {p.poll()}):\n{err}")


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_two_sessions_each_find_their_own_cluster(tmp_path, shared_tmp):
    """The cleaner's lookup (State API, no address) from a detached actor finds its own session's actor
    while another session runs; workers carry their own session's address; the shared file is untouched."""
    shared = shared_tmp
    procs = []
    try:
        for i in range(2):  # the second starts after the first is up: on the old code it took over the file
            err = open(tmp_path / f"session{i}.err", "w")  # noqa: SIM115 - closed with the process
            p = subprocess.Popen(
                [sys.executable, "-c", PROBE], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
                text=True, env=run_env(shared, TUNE_DISABLE_AUTO_INIT="1"), start_new_session=True,
            )  # fmt: skip
            procs.append(p)
            p.err_path = err.name
            _json_line(p, "ready", time.time() + 180)
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        seen = [_json_line(p, "alive", time.time() + 120) for p in procs]
        codes = [p.wait(timeout=120) for p in procs]  # a normal exit: Ray stopped, temp dir removed
    finally:
        for p in procs:
            stop_group(p)
    for s in seen:
        assert s["alive"], f"the State API of session {s['gcs']} was sent to another cluster: {s}"
    a, b = seen
    assert codes == [0, 0]
    assert a["gcs"] != b["gcs"] and a["temp_dir"] != b["temp_dir"]
    for s in seen:
        assert s["RAY_ADDRESS"] == s["gcs"]  # Ray's discovery in workers is pinned to their own session
        assert s["temp_dir"].startswith(str(shared)) and Path(s["RAY_TMPDIR"], "ray") == Path(s["temp_dir"])
    assert not (shared / "ray" / "ray_current_cluster").exists()  # nothing machine-wide rewritten
    assert not list(shared.glob("rt*")), "session temp dirs are removed at exit"


# a trains for minutes (epochs of 56 tiny images take seconds once warm), so b starts and trains meanwhile.
EPOCHS = {"a": "60", "b": "3"}


def _train_cmd(data: Path, out: Path, name: str) -> list[str]:
    return [
        str(BIN / "raytumor"), "train", "--data", str(data), "--out", str(out), "--name", name,
        "--backbone", "efficientnet_lite0", "--weights", "none", "--image-size", "64", "--batch-size", "8",
        "--epochs", EPOCHS[name], "--patience", EPOCHS[name], "--num-workers", "2", "--cpus-per-worker", "0.25",
        "--max-failures", "0", "--no-report",
    ]  # fmt: skip


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_two_concurrent_training_runs_both_finish(tmp_path, shared_tmp):
    """Two `raytumor train` runs at once, each with its own in-process Ray: both exit 0 and neither loses
    its workers (``--max-failures 0``: a removed placement group fails the run instead of retrying)."""
    from raytumor.phantoms import write_phantom_dataset

    data = tmp_path / "phantoms"
    write_phantom_dataset(data, n_per_class=40, size=64, seed=3)
    shared = shared_tmp
    runs = []
    try:
        # b starts once a trains: a's cleaner holds a's placement group by then, and on the old code b's
        # start sent it to b's cluster, which removed a's group ("Destroying worker ...").
        for name in ("a", "b"):
            log = open(tmp_path / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
            p = subprocess.Popen(
                _train_cmd(data, tmp_path / "runs", name), cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                env=run_env(shared, TUNE_DISABLE_AUTO_INIT="1"), start_new_session=True,
            )  # fmt: skip
            runs.append((name, p))
            deadline = time.time() + 900
            while name == "a" and "worker(s) on" not in (tmp_path / "a.log").read_text():
                assert p.poll() is None and time.time() < deadline, (tmp_path / "a.log").read_text()[-4000:]
                time.sleep(0.5)
        # Both must train at the same time, or the test shows nothing.
        deadline, overlapped = time.time() + 900, False
        while not overlapped and time.time() < deadline and all(p.poll() is None for _, p in runs):
            overlapped = all("worker(s) on" in (tmp_path / f"{n}.log").read_text() for n, _ in runs)
            time.sleep(0.5)
        codes = {name: p.wait(timeout=1200) for name, p in runs}
    finally:
        for _, p in runs:
            stop_group(p)
    for name, rc in codes.items():
        text = (tmp_path / f"{name}.log").read_text()
        assert rc == 0, f"run {name} failed:\n{text[-6000:]}"
        assert "placement group was removed" not in text
        assert "Failed to register placement group with cleaner" not in text  # its cleaner asked elsewhere
        assert "Found multiple active Ray instances" not in text
        assert (tmp_path / "runs" / name / "bundle" / "model.pt").exists()
    assert overlapped, "the two runs never trained at the same time: give them more epochs"
    assert not (shared / "ray" / "ray_current_cluster").exists()


@pytest.mark.ray
def test_watchdog_names_the_pending_resources(ray_session, capsys):
    """Work that waits for resources longer than the stall limit is reported with its shape."""
    import ray

    from raytumor.runtime import ResourceWatchdog

    @ray.remote(num_cpus=64)
    def never() -> None:  # more CPUs than the test session has: waits forever
        pass

    ref = never.remote()
    dog = ResourceWatchdog(ray.get_runtime_context().gcs_address, period_s=1, stall_s=1)
    dog.start()
    try:
        deadline = time.time() + 60
        while not dog.lines and time.time() < deadline:
            time.sleep(0.5)
    finally:
        dog.stop_event.set()
        ray.cancel(ref, force=True)
    assert dog.lines, "the watchdog said nothing about a task waiting for 64 CPUs"
    assert "waiting" in dog.lines[0] and "CPU: 64" in dog.lines[0] and "CPU" in dog.lines[0]
    assert dog.lines[0] in capsys.readouterr().out
