"""Real Ray clusters on this machine: `ray job submit` to a `ray start --head`, and a two-node run that
loses its worker node mid-training and recovers from the last checkpoint (FailureConfig).

Every Ray process is started with `ray start --block` in its own session and stopped by PID (its process
group). These tests start their own clusters, so they run in the `slow` suite, apart from the shared one.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import stop_group

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(
        RAY_AUTH_MODE="disabled",
        RAY_USAGE_STATS_ENABLED="0",
        RAY_TRAIN_V2_ENABLED="1",
        PYTHONUNBUFFERED="1",
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",  # job entrypoints run `python` from this venv
        **extra,
    )
    return env


class RayNodes:
    """`ray start --block` processes, each in its own process group, stopped by PID."""

    def __init__(self, tmp: Path):
        self.tmp, self.procs = tmp, []
        self.port, self.dash = _free_port(), _free_port()
        self.address = f"127.0.0.1:{self.port}"

    def start(self, name: str, *args: str) -> subprocess.Popen:
        log = open(self.tmp / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
        p = subprocess.Popen(
            [str(BIN / "ray"), "start", "--block", "--disable-usage-stats", *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=_env(),
            start_new_session=True,
        )
        self.procs.append(p)
        return p

    def head(self, cpus: int, *extra: str) -> None:
        self.start(
            "head",
            *extra,
            "--head",
            f"--port={self.port}",
            "--node-ip-address=127.0.0.1",
            f"--num-cpus={cpus}",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={self.dash}",
        )
        deadline = time.time() + 90
        while time.time() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.dash}/api/version", timeout=2)
                return
            except OSError:
                time.sleep(1)
        raise RuntimeError(f"head did not come up; see {self.tmp / 'head.log'}")

    def worker(self, name: str, cpus: int, *extra: str) -> subprocess.Popen:
        return self.start(
            name, f"--address={self.address}", "--node-ip-address=127.0.0.1", f"--num-cpus={cpus}", *extra
        )

    def hold(self, name: str, resources: dict[str, float]) -> subprocess.Popen:
        """A driver holding an actor that reserves ``resources`` until the driver is stopped."""
        script = (
            "import time, ray; ray.init(address='auto', logging_level='ERROR')\n"
            f"@ray.remote(num_cpus=0, resources={resources!r})\n"
            "class Hold:\n    def ready(self): return True\n"
            "h = Hold.remote(); ray.get(h.ready.remote()); print('held', flush=True); time.sleep(3600)\n"
        )
        log = self.tmp / f"{name}.log"
        p = subprocess.Popen(
            [str(BIN / "python"), "-c", script], stdout=open(log, "w"), stderr=subprocess.STDOUT,  # noqa: SIM115
            env=_env(RAY_ADDRESS=self.address), start_new_session=True,
        )  # fmt: skip
        self.procs.append(p)
        deadline = time.time() + 120
        while "held" not in log.read_text():
            assert p.poll() is None and time.time() < deadline, log.read_text()[-2000:]
            time.sleep(0.5)
        return p

    def alive_nodes(self) -> int:
        out = subprocess.run(
            [
                str(BIN / "python"),
                "-c",
                "import ray; ray.init(address='auto', logging_level='ERROR'); "
                # a node counts once the scheduler sees its CPUs free (SPREAD is best-effort: a node
                # that is alive but not yet in the resource view gets no worker)
                "import time; time.sleep(1); r = ray.available_resources(); "
                "print(sum(n['Alive'] for n in ray.nodes()) if r.get('CPU', 0) >= 3 else 0)",
            ],
            capture_output=True,
            text=True,
            env=_env(RAY_ADDRESS=self.address),
            timeout=60,
        )
        return int(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else 0

    @staticmethod
    def stop(p: subprocess.Popen) -> None:
        stop_group(p)

    def stop_all(self) -> None:
        for p in reversed(self.procs):
            self.stop(p)


@pytest.fixture()
def phantoms(tmp_path):
    from raytumor.phantoms import write_phantom_dataset

    root = tmp_path / "phantoms"
    write_phantom_dataset(root, n_per_class=40, size=96, seed=5)
    return root


def test_ray_job_submit_tune_to_a_local_head(tmp_path, phantoms):
    """`ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- python jobs/tune.py`."""
    nodes = RayNodes(tmp_path)
    try:
        nodes.head(cpus=2)
        out = tmp_path / "runs"
        cmd = [
            str(BIN / "ray"), "job", "submit", "--address", f"http://127.0.0.1:{nodes.dash}",
            "--working-dir", str(REPO), "--runtime-env", str(REPO / "cluster" / "runtime_env.yaml"),
            "--", "python", "jobs/tune.py", "--data", str(phantoms), "--out", str(out), "--name", "submitted",
            "--backbones", "efficientnet_lite0", "--num-samples", "2", "--max-epochs", "2",
            "--set", "image_size=64", "--set", "batch_size=8",
        ]  # fmt: skip
        r = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=800, cwd=REPO)
        assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
        assert "succeeded" in (r.stdout + r.stderr).lower()
        assert f"[raytumor] bundle: {out / 'submitted' / 'bundle'}" in r.stdout
        assert f"[raytumor] leaderboard: {out / 'submitted' / 'leaderboard.csv'}" in r.stdout

        from raytumor.bundle import load_bundle

        meta = load_bundle(out / "submitted" / "bundle", device="cpu").meta
        assert meta.image_size == 64 and meta.metrics["search"]["trials"] == 2

        # the winner scores a folder as a second job on the same cluster
        scores = tmp_path / "scores"
        cmd = cmd[: cmd.index("--") + 1] + [
            "python", "jobs/score.py", "--bundle", str(out / "submitted" / "bundle"), "--input", str(phantoms),
            "--output", str(scores), "--csv",
        ]  # fmt: skip
        r = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=600, cwd=REPO)
        assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
        from raytumor.results import read_scores

        n_files = sum(1 for p in phantoms.rglob("*") if p.is_file())
        df = read_scores(str(scores))
        assert len(df) == n_files and df["path"].is_unique
        assert f"[score] {n_files} rows:" in r.stdout
    finally:
        nodes.stop_all()


def test_two_nodes_lose_the_worker_node_and_recover(tmp_path, phantoms):
    """A 2-worker run spread over a head and a second node; the second node is stopped after the first
    checkpoint, and the run resumes from that checkpoint on what is left and finishes."""
    nodes = RayNodes(tmp_path)
    try:
        # Placement is made deterministic with a custom resource rather than left to SPREAD, which is
        # best-effort (CI once packed both workers on the head): each worker needs one `slot`; the head has
        # two, one of them held by a blocker actor until the second node goes, and the second node has one.
        # So the first attempt must use both nodes, and the recovery fits on the head alone.
        nodes.head(2, '--resources={"slot": 2}')
        blocker = nodes.hold("blocker", {"slot": 1})  # created while the head is the only node
        node2 = nodes.worker("node2", 1, '--resources={"slot": 1}')
        deadline = time.time() + 60
        while nodes.alive_nodes() < 2:
            assert time.time() < deadline, "second node did not join"
            time.sleep(2)
        out = tmp_path / "runs"
        cmd = [
            str(BIN / "python"), "jobs/train.py", "--data", str(phantoms), "--out", str(out), "--name", "mn",
            "--num-workers", "2", "--cpus-per-worker", "0.5", "--placement-strategy", "SPREAD",
            "--epochs", "6", "--patience", "6", "--image-size", "64", "--batch-size", "8",
            "--max-failures", "2", "--warmup-epochs", "0", "--worker-resource", "slot=1",
        ]  # fmt: skip
        log = open(tmp_path / "driver.log", "w")  # noqa: SIM115
        driver = subprocess.Popen(
            cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=_env(RAY_ADDRESS=nodes.address),
            start_new_session=True,
        )  # fmt: skip
        nodes.procs.append(driver)
        ckpts = out / "mn" / "checkpoints" / "mn"
        deadline = time.time() + 600
        while not list(ckpts.glob("checkpoint_*/model.pt")):
            assert driver.poll() is None, (tmp_path / "driver.log").read_text()[-4000:]
            assert time.time() < deadline, "no checkpoint before the deadline"
            time.sleep(0.5)
        time.sleep(1.0)  # let the controller register the reported checkpoint
        nodes.stop(blocker)  # frees the head's second slot for the recovery
        nodes.stop(node2)  # the worker node goes away mid-training
        rc = driver.wait(timeout=700)
        text = (tmp_path / "driver.log").read_text()
        assert rc == 0, text[-6000:]
        summary = json.loads((out / "mn" / "summary.json").read_text())
        attempts = summary["worker_nodes_per_attempt"]
        assert len(attempts[0]) == 2, attempts  # spread over both nodes at first
        assert len(attempts) >= 2 and len(attempts[-1]) == 1, attempts  # recovered on the head alone
        assert summary["resumed_at_epochs"] and summary["resumed_at_epochs"][0] >= 1
        assert summary["epochs_run"] == 6

        from raytumor.bundle import load_bundle

        meta = load_bundle(summary["bundle"], device="cpu").meta
        assert meta.metrics["test"]["n"] > 0
    finally:
        nodes.stop_all()


def test_killed_search_resumes_with_the_same_command(tmp_path, phantoms):
    """`python jobs/tune.py` (in-process Ray) is killed after its first trial finished; the same command
    restores the search: the finished trial is kept (not re-run) and the rest complete."""
    out = tmp_path / "runs"
    cmd = [
        str(BIN / "python"), "jobs/tune.py", "--data", str(phantoms), "--out", str(out), "--name", "killed",
        "--backbones", "efficientnet_lite0", "--num-samples", "3", "--max-epochs", "2",
        "--set", "image_size=64", "--set", "batch_size=8",
    ]  # fmt: skip
    log = open(tmp_path / "first.log", "w")  # noqa: SIM115
    first = subprocess.Popen(
        cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=_env(), start_new_session=True
    )
    state = out / "killed" / "tune" / "killed"
    try:
        deadline = time.time() + 600
        while True:  # a trial is finished once Tune has written its result with done=True
            done = [p for p in state.glob("*/result.json") if '"done": true' in p.read_text()]
            if done:
                break
            assert first.poll() is None, (tmp_path / "first.log").read_text()[-4000:]
            assert time.time() < deadline, "no finished trial before the deadline"
            time.sleep(1)
        time.sleep(3)  # let Tune save its experiment state after that trial
    finally:
        RayNodes.stop(first)  # the whole process group: driver and its in-process Ray
    finished = sorted(p.parent.name for p in state.glob("*/result.json") if '"done": true' in p.read_text())
    before = {n: _tune_rows(state / n / "result.json") for n in finished}
    trials = out / "killed" / "tune" / "trials"
    checkpoints = {n: sorted(p.name for p in (trials / _trial_id(n)).glob("checkpoint_*")) for n in finished}

    log2 = open(tmp_path / "second.log", "w")  # noqa: SIM115
    second = subprocess.Popen(
        cmd, cwd=REPO, stdout=log2, stderr=subprocess.STDOUT, env=_env(), start_new_session=True
    )
    try:
        rc = second.wait(timeout=600)
    finally:
        RayNodes.stop(second)
    text = (tmp_path / "second.log").read_text()
    assert rc == 0, text[-6000:]
    assert "resuming search" in text
    summary = json.loads((out / "killed" / "summary.json").read_text())
    assert summary["trials"] == 3
    board = pd.read_csv(out / "killed" / "leaderboard.csv").set_index("trial_id")
    assert (board["status"] != "interrupted").all() and board["val_roc_auc"].notna().all()
    for n, rows in before.items():
        tid = _trial_id(n)
        # Not trained again: no new checkpoint. Tune may have restored it as unfinished (its last state
        # snapshot can predate the trial's end) and then emptied its result.json (CI saw that): the
        # leaderboard still ranks it on every epoch it ran, read back from its own checkpoints.
        assert sorted(p.name for p in (trials / tid).glob("checkpoint_*")) == checkpoints[n]
        assert board.loc[tid, "epochs_run"] == max(r["epochs_done"] for r in rows) == 2
        assert board.loc[tid, "val_roc_auc"] == pytest.approx(max(r["val_roc_auc"] for r in rows))

    # That race made deterministic: the saved state says the first finished trial was still RUNNING (as a
    # snapshot taken just before its end does). The rerun restores it, Train resumes it past its last
    # epoch (nothing trained), Tune empties its result.json, and the leaderboard is unchanged.
    n = finished[0]
    snapshot = max(state.glob("experiment_state-*.json"))  # Tune restores the latest session's (by name)
    saved = json.loads(snapshot.read_text())
    for entry in saved["trial_data"]:
        trial = json.loads(entry[0])
        if trial["trial_id"] == _trial_id(n):
            entry[0] = json.dumps({**trial, "status": "RUNNING"})
    snapshot.write_text(json.dumps(saved))
    third = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=_env(), timeout=600)
    assert third.returncode == 0, third.stdout[-4000:] + third.stderr[-4000:]
    assert "resuming from checkpoint after epoch 1" in third.stdout + third.stderr  # it was restored
    assert sorted(p.name for p in (trials / _trial_id(n)).glob("checkpoint_*")) == checkpoints[n]
    again = pd.read_csv(out / "killed" / "leaderboard.csv").set_index("trial_id")
    cols = ["val_roc_auc", "epochs_run", "best_epoch", "status", "checkpoint_path"]
    pd.testing.assert_frame_equal(again[cols].sort_index(), board[cols].sort_index())


def _tune_rows(result_json: Path) -> list[dict]:
    return [json.loads(line) for line in result_json.read_text().splitlines() if line.strip()]


def _trial_id(trial_dir: str) -> str:
    """Tune's trial directory ``trial_driver_<id>_<index>_<config>`` → ``<id>``, its Train run's name."""
    from raytumor.tune import _TRIAL_ID

    return _TRIAL_ID.search(trial_dir).group(1)
