"""Model bundle: a directory that carries the weights and everything needed to use them.

Layout (MONAI-bundle spirit, one JSON instead of a config tree):
  model.pt                     state dict of ``TumorClassifier`` (loadable with ``weights_only=True``)
  bundle.json                  backbone, classes, preprocessing, threshold, temperature, metrics, fingerprints
                               of data and split, package versions
  train_fingerprints.parquet   sha256/dHash/thumbnail of every train+val file, so evaluation can drop
                               test files that duplicate what the model saw
  history.csv                  per-epoch training metrics
  heads.pt                     view head and OOD reference on the backbone's features (``raytumor.scope``;
                               tensors only, ``weights_only=True``); bundle.json's ``scope`` says what the
                               model may score
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.fs as pafs
import torch

from raytumor import __version__
from raytumor.model import create_model
from raytumor.scope import HEADS_FILE, Heads, Scope
from raytumor.storage import get_filesystem

BUNDLE_FORMAT = 1
MODEL_FILE = "model.pt"
META_FILE = "bundle.json"
FINGERPRINTS_FILE = "train_fingerprints.parquet"
HISTORY_FILE = "history.csv"


@dataclass
class BundleMeta:
    backbone: str
    classes: list[str]
    negative_class: str | None
    image_size: int
    mean: list[float]
    std: list[float]
    channels: str = "gray"  # decoded to one intensity channel; the model replicates it to 3
    geometry: str = "pad-to-square, resize (formats.fit_square)"
    # preprocess.PreprocessConfig.to_dict(): head crop / intensity standardisation applied before
    # fit_square by training, evaluation and scoring alike; {} (older bundles) means none.
    preprocess: dict[str, Any] = field(default_factory=dict)
    threshold: float = 0.5  # on the tumour score (1 - P(negative class), or P(class 1) without one)
    temperature: float = 1.0  # logits are divided by this before softmax (calibration)
    metrics: dict[str, Any] = field(default_factory=dict)
    train_config: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)  # source, split manifest sha256, counts
    versions: dict[str, str] = field(default_factory=dict)
    # raytumor.scope.Scope.to_dict(): training examples per view/sequence and class, what is in scope, the
    # OOD threshold; {} (older bundles) means no scope recorded: every input is scored as before.
    scope: dict[str, Any] = field(default_factory=dict)
    created_at: str = ""
    bundle_id: str = ""
    format: int = BUNDLE_FORMAT

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def package_versions() -> dict[str, str]:
    import ray
    import torchvision

    return {
        "raytumor": __version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "ray": ray.__version__,
        "python": platform.python_version(),
    }


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_bundle(
    path: str | os.PathLike,
    state_dict: dict[str, torch.Tensor],
    meta: BundleMeta,
    train_fingerprints: pd.DataFrame | None = None,
    history: pd.DataFrame | None = None,
    heads: Heads | None = None,
) -> Path:
    """Write a bundle atomically (to a temp dir, then rename) so a crash never leaves half a bundle."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".bundle-", dir=path.parent))
    try:
        torch.save({k: v.detach().cpu() for k, v in state_dict.items()}, tmp / MODEL_FILE)
        meta.bundle_id = file_sha256(tmp / MODEL_FILE)[:16]
        meta.created_at = meta.created_at or datetime.now(timezone.utc).isoformat(timespec="seconds")
        meta.versions = meta.versions or package_versions()
        if heads is not None and (heads.view is not None or heads.ood is not None):
            heads.save(tmp / HEADS_FILE)
            meta.scope = {**meta.scope, "heads_sha256": file_sha256(tmp / HEADS_FILE)}
        if train_fingerprints is not None:
            train_fingerprints.reset_index(drop=True).to_parquet(tmp / FINGERPRINTS_FILE, index=False)
        if history is not None:
            history.to_csv(tmp / HISTORY_FILE, index=False)
        (tmp / META_FILE).write_text(json.dumps(asdict(meta), indent=2, default=_json_default) + "\n")
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    return str(o)


def fetch_bundle(uri: str | os.PathLike, storage: Any = None) -> Path:
    """A local directory holding the bundle at ``uri``: the path itself, or a cached copy of an
    ``s3://``/``gs://`` bundle (so scoring actors on every node of a cluster load the same model).

    The cache is keyed by the URI and the remote ``model.pt``'s size and mtime, so a replaced bundle is
    fetched again; the copy lands in a temp dir first and is renamed into place (concurrent actors).
    """
    uri = str(uri)
    if "://" not in uri or uri.startswith("file://"):
        return Path(uri.removeprefix("file://"))
    fs, path = get_filesystem(uri, storage)
    info = fs.get_file_info(f"{path}/{MODEL_FILE}")
    if info.type != pafs.FileType.File:
        raise FileNotFoundError(f"{uri} is not a model bundle (no {MODEL_FILE})")
    key = hashlib.sha256(f"{uri}|{info.size}|{info.mtime_ns}".encode()).hexdigest()[:16]
    cache = Path(os.environ.get("RAYTUMOR_CACHE", Path.home() / ".cache" / "raytumor")) / "bundles"
    dest = cache / key
    if (dest / META_FILE).is_file():
        return dest
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".fetch-", dir=cache))
    try:
        pafs.copy_files(path, str(tmp), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        os.replace(tmp, dest)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (dest / META_FILE).is_file():  # another process won the rename: use its copy
            raise
    return dest


def read_meta(path: str | os.PathLike) -> BundleMeta:
    path = Path(path)
    if not (path / META_FILE).is_file():
        raise FileNotFoundError(f"{path} is not a model bundle (no {META_FILE})")
    raw = json.loads((path / META_FILE).read_text())
    if raw.get("format", 0) > BUNDLE_FORMAT:
        raise ValueError(
            f"bundle format {raw['format']} is newer than this raytumor understands ({BUNDLE_FORMAT})"
        )
    known = set(BundleMeta.__dataclass_fields__)
    return BundleMeta(**{k: v for k, v in raw.items() if k in known})


@dataclass
class LoadedBundle:
    path: Path
    meta: BundleMeta
    model: torch.nn.Module
    device: torch.device
    heads: Heads = field(default_factory=Heads)

    @property
    def scope(self) -> Scope | None:
        return Scope.from_dict(self.meta.scope)

    def train_fingerprints(self) -> pd.DataFrame | None:
        f = self.path / FINGERPRINTS_FILE
        return pd.read_parquet(f) if f.is_file() else None


def load_bundle(path: str | os.PathLike, device: str | torch.device | None = None) -> LoadedBundle:
    """Load a bundle's model in eval mode on ``device`` (CUDA when available by default), channels_last."""
    path = Path(path)
    meta = read_meta(path)
    dev = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = create_model(meta.backbone, meta.num_classes, weights="none", dropout=0.0)
    state = torch.load(path / MODEL_FILE, map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    model.eval().to(dev, memory_format=torch.channels_last)
    heads = Heads()
    if (path / HEADS_FILE).is_file():
        want = meta.scope.get("heads_sha256")
        if want and file_sha256(path / HEADS_FILE) != want:
            raise ValueError(
                f"{path / HEADS_FILE} does not match the bundle (sha256 differs from bundle.json)"
            )
        heads = Heads.load(path / HEADS_FILE)
    return LoadedBundle(path=path, meta=meta, model=model, device=dev, heads=heads)
