"""Shared fixtures: one Ray session per test run, the shared real data, SYNTHETIC phantom data and a small
head-fitted bundle built from it (so Ray-backed tests run on a fresh clone), and a loopback moto S3 server."""

from __future__ import annotations

import hashlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]
# Dummy credentials for the loopback moto server, set before Ray starts so its workers inherit them.
for _k, _v in {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}.items():
    os.environ.setdefault(_k, _v)
SHARED_DATA = REPO.parent / "shared" / "data"


def shared_dataset(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.skip(f"real data {path} is absent (expected ../shared/data/{name} beside the repo)")
    return path


@pytest.fixture(scope="session")
def navoneel() -> Path:
    return shared_dataset("navoneel-253")


@pytest.fixture(scope="session")
def br35h() -> Path:
    return shared_dataset("br35h-3000")


# ----------------------------------------------------------------------------------------------------------
# SYNTHETIC phantoms and a head-fitted bundle: real enough to exercise every pipeline stage, built in seconds

HEAD_SIZE = 96  # input size of the head-fitted bundle: small, so features and scoring are quick on CPU
PHANTOMS_PER_CLASS = 60
PHANTOM_SIZE = 128  # larger than HEAD_SIZE, so decoding really resizes, as for real scans


@dataclass(frozen=True)
class HeadBundle:
    """A bundle whose head was fitted on ``train`` (whole sha256 groups, ~half of each class of ``root``);
    ``manifest`` (path,label CSV) lists the held-out rest, ``eval``."""

    root: Path
    bundle: Path
    manifest: Path
    train: pd.DataFrame  # path, label ("no"/"yes")
    eval: pd.DataFrame


def _decode_labelled(root: Path, size: int) -> pd.DataFrame:
    from raytumor import split
    from raytumor.formats import decode_image, fit_square

    rows = []
    for p in sorted(root.glob("*/*")):
        if p.parent.name not in ("yes", "no") or not p.is_file():
            continue
        data = p.read_bytes()
        pixels = decode_image(data, draft_size=size).pixels
        rows.append(
            {
                "path": str(p),
                "label": p.parent.name,
                "sha256": hashlib.sha256(data).hexdigest(),
                "image": fit_square(pixels, size),
                **split.fingerprint(pixels),
            }
        )
    return pd.DataFrame(rows)


def build_head_bundle(root: Path, work: Path, size: int = HEAD_SIZE) -> HeadBundle:
    """A real bundle without Ray training, from a ``root/{no,yes}/`` folder (phantoms or navoneel-253):
    frozen ImageNet EfficientNet-Lite0 features, head fitted with Adam on ~half the files (whole sha256
    groups, so exact duplicates never straddle the halves); the other half is the manifest.

    The metadata stands in for a trained bundle's (threshold, temperature, history, training fingerprints,
    split counts), so reports have everything to show and scoring applies a temperature."""
    import torch

    from raytumor.bundle import BundleMeta, save_bundle
    from raytumor.model import create_model, normalization

    df = _decode_labelled(root, size)
    # Alternate whole sha256 groups per class between the halves (sha order is content-random).
    half = {}
    for _, g in df.groupby("label"):
        for i, sha in enumerate(sorted(g["sha256"].unique())):
            half[sha] = "train" if i % 2 == 0 else "eval"
    df["split"] = df["sha256"].map(half)
    train, ev = df[df["split"] == "train"], df[df["split"] == "eval"]

    torch.manual_seed(0)
    model = create_model("efficientnet_lite0", 2, weights="imagenet", dropout=0.0).eval()
    x = torch.from_numpy(np.stack(train["image"].to_numpy()))
    with torch.no_grad():
        feats = torch.cat([model.forward_features(x[i : i + 64]) for i in range(0, len(x), 64)])
    y = torch.tensor((train["label"] == "yes").to_numpy(), dtype=torch.int64)
    head = model.head[-1]
    opt = torch.optim.Adam(head.parameters(), lr=3e-3, weight_decay=1e-3)
    for _ in range(300):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(head(feats), y).backward()
        opt.step()

    mean, std = normalization("efficientnet_lite0")
    counts = {"train": train["label"].value_counts().to_dict(), "test": ev["label"].value_counts().to_dict()}
    # Fake but plausible per-epoch history (the head above was fitted in one go, not per epoch): the report
    # only plots what a real run's history.csv carries (the training loop's metric names).
    history = pd.DataFrame(
        {
            "epoch": range(5),
            "train_loss": [0.66, 0.52, 0.44, 0.40, 0.37],
            "val_loss": [0.61, 0.50, 0.46, 0.45, 0.47],
            "val_roc_auc": [0.74, 0.82, 0.86, 0.87, 0.86],
            "val_accuracy": [0.66, 0.74, 0.78, 0.80, 0.79],
            "frozen_backbone": [True, True, False, False, False],
        }
    )
    meta = BundleMeta(
        backbone="efficientnet_lite0",
        classes=["no", "yes"],
        negative_class="no",
        image_size=size,
        mean=list(mean),
        std=list(std),
        threshold=0.5,  # stands in for a validation-chosen operating threshold
        temperature=1.5,  # stands in for a fitted temperature (so the report shows before/after)
        metrics={"val": {"val_roc_auc": 0.87, "val_accuracy": 0.80, "val_n": 40}, "best_epoch": 3},
        train_config={"epochs": 5, "batch_size": 32, "seed": 0, "image_size": size},
        data={
            "source": str(root),
            "split_counts": counts,
            "duplicate_groups": int((df["sha256"].value_counts() > 1).sum()),
        },
    )
    fp_cols = ["path", "sha256", "dhash", "thumb", "dhash_crop", "thumb_crop"]
    bundle = save_bundle(work / "bundle", model.state_dict(), meta, train[fp_cols], history)
    manifest = work / "eval.csv"
    ev[["path", "label"]].to_csv(manifest, index=False)
    keep = ["path", "label"]
    return HeadBundle(
        root, bundle, manifest, train[keep].reset_index(drop=True), ev[keep].reset_index(drop=True)
    )


@pytest.fixture(scope="session")
def phantoms(tmp_path_factory) -> Path:
    """A SYNTHETIC two-class folder ``no/``, ``yes/`` (+ SYNTHETIC_README.txt at the root, outside them):
    grayscale/RGB/RGBA/palette PNG, JPEG and PNG bytes named .jpg, like the real sets. Read-only for tests."""
    from raytumor.phantoms import write_phantom_dataset

    root = tmp_path_factory.mktemp("phantoms") / "data"
    write_phantom_dataset(root, n_per_class=PHANTOMS_PER_CLASS, size=PHANTOM_SIZE, seed=0)
    return root


@pytest.fixture(scope="session")
def head_bundle(phantoms, tmp_path_factory) -> HeadBundle:
    """The head-fitted bundle on phantoms, built once per session for every module that scores or reports."""
    return build_head_bundle(phantoms, tmp_path_factory.mktemp("head_bundle"))


def phantom_volume(seed: int = 0, n_slices: int = 100, size: int = 96) -> np.ndarray:
    """(n_slices, size, size) uint8 SYNTHETIC tumour-free axial slices, inferior to superior, each as
    decoding a :func:`write_phantom_volume` file shows it (raytumor.medical's orientation)."""
    from raytumor.phantoms import make_phantom

    rng = np.random.default_rng(seed)
    return np.stack([make_phantom(rng, size=size) for _ in range(n_slices)])


def write_phantom_volume(
    path: Path,
    seed: int = 0,
    n_slices: int = 100,
    empty_top: int = 20,
    size: int = 96,
    spacing_mm: float = 2.0,
) -> Path:
    """A SYNTHETIC NIfTI volume of :func:`phantom_volume` slices ``spacing_mm`` apart, then ``empty_top`` zero
    slices above the vertex (decoding drops them, as the air above a real head)."""
    import nibabel as nib

    vol = np.zeros((size, size, n_slices + empty_top), dtype=np.uint8)
    # voxel (x, y) = image (row size-1-y, column x): decoding rotates RAS x/y back to this image
    vol[:, :, :n_slices] = np.flip(phantom_volume(seed, n_slices, size), 1).transpose(2, 1, 0)
    nib.save(nib.Nifti1Image(vol, np.diag([1.5, 1.5, spacing_mm, 1.0])), str(path))
    return path


@pytest.fixture(scope="module")
def one_torch_thread():
    """Small tensors: one intra-op thread is as fast, and immune to OpenMP spin-wait stalls that made these
    forwards ~4x slower on a busy 2-core machine. Restored after the module."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole run: each start costs seconds and GBs; 2 CPUs like CI."""
    import ray

    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    if not ray.is_initialized():
        from raytumor.runtime import init_ray

        # Isolated like every raytumor run (its own temp dir and address, nothing machine-wide written):
        # a test session that wrote the shared ray_current_cluster file once made a CI run beside it lose
        # its Train placement-group cleaner (it asked this session's GCS after it was gone) and hang.
        init_ray(num_cpus=2, include_dashboard=True, log_to_driver=True, object_store_memory=2 * 1024**3)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible server (moto) on 127.0.0.1, stopped by PID at the end."""
    pytest.importorskip("moto")
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
        except OSError:
            time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail("moto server did not start")
    yield endpoint
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture()
def s3_client(s3_server):
    import boto3

    return boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")


# ----------------------------------------------------------------------------------------------------------
# raytumor runs as subprocesses (each its own process group and in-process Ray session)


def run_env(ray_tmpdir: str | os.PathLike, **extra: str) -> dict[str, str]:
    """The environment of a ``raytumor`` subprocess: this venv's scripts first, no inherited Ray address."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env.update(
        RAY_TMPDIR=str(ray_tmpdir),
        RAY_AUTH_MODE="disabled",
        RAY_USAGE_STATS_ENABLED="0",
        RAY_TRAIN_V2_ENABLED="1",
        PYTHONUNBUFFERED="1",
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        **extra,
    )
    return env


def stop_group(p: subprocess.Popen) -> None:
    """Stop a subprocess started with ``start_new_session=True`` and everything it started, by PID."""
    if p.poll() is not None:
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(p.pid, sig)
            p.wait(timeout=20)
            return
        except subprocess.TimeoutExpired:
            continue
        except ProcessLookupError:
            return


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_RAY_PREFIX = re.compile(r"^\([\w()>.-]+ pid=\w+(, ip=[\d.]+)?\)\s*")
_OWN_LINE = re.compile(r"^\[(demo|score|raytumor|train|tune|cv|evaluate|report|slices)\]")
_WARNING_LINE = re.compile(r"warn|\bE \d+ \d+\]|error|traceback|deprecat", re.IGNORECASE)


def log_warnings(log: str) -> list[str]:
    """The lines of a run's output that warn or report an error, other than raytumor's own lines (whose
    counts say "0 errors"): a run's log must have none (issue 14)."""
    out = []
    for raw in log.splitlines():
        line = _RAY_PREFIX.sub("", _ANSI.sub("", raw).strip())
        if _WARNING_LINE.search(line) and not _OWN_LINE.match(line):
            out.append(raw)
    return out
