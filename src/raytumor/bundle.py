"""Model bundle: a directory that carries the weights and everything needed to use them.

Layout (MONAI-bundle spirit, one JSON instead of a config tree):
  model.pt                     state dict of ``TumorClassifier`` (loadable with ``weights_only=True``)
  bundle.json                  backbone, classes, preprocessing, threshold, temperature, metrics, fingerprints
                               of data and split, package versions
  train_fingerprints.parquet   sha256/dHash/thumbnail of every train+val file, so evaluation can drop
                               test files that duplicate what the model saw
  history.csv                  per-epoch training metrics
  heads.pt                     view net and OOD reference (features of the backbone) (``raytumor.scope``;
                               tensors only, ``weights_only=True``); bundle.json's ``scope`` says what the
                               model may score
"""

from __future__ import annotations

import hashlib
import io
import json
import math
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
from raytumor.model import create_model, list_backbones
from raytumor.scope import HEADS_FILE, Heads, Scope
from raytumor.storage import get_filesystem

BUNDLE_FORMAT = 1
MODEL_FILE = "model.pt"
META_FILE = "bundle.json"
FINGERPRINTS_FILE = "train_fingerprints.parquet"
HISTORY_FILE = "history.csv"
# Model inputs smaller than this collapse to nothing in any backbone; larger ones exhaust memory per batch.
IMAGE_SIZE_RANGE = (16, 2048)
REQUIRED_FIELDS = ("backbone", "classes", "image_size", "mean", "std")


class BundleError(ValueError):
    """A bundle that cannot be trusted to score, in one line saying what is wrong and where. Raised on the
    driver before any work starts (and again, cheaply, wherever a bundle is loaded)."""


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
    """The bundle's metadata, its schema checked (:func:`check_meta`); needs no model registry or weights,
    so score outputs can be read against a bundle whose weights are elsewhere."""
    path = Path(path)
    if not (path / META_FILE).is_file():
        raise FileNotFoundError(f"{path} is not a model bundle (no {META_FILE})")
    try:
        raw = json.loads((path / META_FILE).read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"bundle {path}: {META_FILE} is not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise BundleError(f"bundle {path}: {META_FILE} holds a {type(raw).__name__}, not a mapping")
    fmt = raw.get("format", 0)
    if not isinstance(fmt, int) or isinstance(fmt, bool):
        raise BundleError(f"bundle {path}: format must be an integer, got {fmt!r}")
    if fmt > BUNDLE_FORMAT:
        raise BundleError(
            f"bundle {path}: format {fmt} is newer than this raytumor understands ({BUNDLE_FORMAT})"
        )
    missing = [k for k in REQUIRED_FIELDS if k not in raw]
    if missing:
        raise BundleError(f"bundle {path}: {META_FILE} lacks {', '.join(missing)}")
    known = set(BundleMeta.__dataclass_fields__)
    raw.setdefault("negative_class", None)
    meta = BundleMeta(**{k: v for k, v in raw.items() if k in known})
    check_meta(meta, path)
    return meta


def _real(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_meta(meta: BundleMeta, where: str | os.PathLike = "bundle") -> None:
    """Raise :class:`BundleError` unless every field the model and the score rule rely on is well formed:
    these values reach every row, so a wrong one is a wrong answer on every scan, not one error row."""

    def fail(msg: str) -> BundleError:
        return BundleError(f"bundle {where}: {msg}")

    if not isinstance(meta.backbone, str) or not meta.backbone:
        raise fail(f"backbone must be a name, got {meta.backbone!r}")
    c = meta.classes
    if not isinstance(c, list) or len(c) < 2 or not all(isinstance(x, str) and x for x in c):
        raise fail(f"classes must be a list of at least 2 class names, got {c!r}")
    if len(set(c)) != len(c):
        raise fail(f"classes must be unique, got {c!r}")
    if meta.negative_class is not None and meta.negative_class not in c:
        raise fail(f"negative_class {meta.negative_class!r} is not one of the classes {c}")
    lo, hi = IMAGE_SIZE_RANGE
    if not isinstance(meta.image_size, int) or isinstance(meta.image_size, bool):
        raise fail(f"image_size must be an integer, got {meta.image_size!r}")
    if not lo <= meta.image_size <= hi:
        raise fail(f"image_size {meta.image_size} is outside {lo}..{hi}")
    for name in ("mean", "std"):
        v = getattr(meta, name)
        if not isinstance(v, list) or not v or not all(_real(x) for x in v):
            raise fail(f"{name} must be a non-empty list of finite numbers, got {v!r}")
    if len(meta.mean) != len(meta.std) or not all(x > 0 for x in meta.std):
        raise fail(f"std must hold one positive value per mean value, got mean {meta.mean}, std {meta.std}")
    if not _real(meta.temperature) or meta.temperature <= 0:
        raise fail(f"temperature must be a finite number > 0, got {meta.temperature!r}")
    if not _real(meta.threshold) or not 0.0 <= meta.threshold <= 1.0:
        raise fail(f"threshold must be a number in [0, 1], got {meta.threshold!r}")
    if not isinstance(meta.bundle_id, str):
        raise fail(f"bundle_id must be a string, got {meta.bundle_id!r}")
    for name in ("preprocess", "scope", "metrics", "versions"):
        if not isinstance(getattr(meta, name), dict):
            raise fail(f"{name} must be a mapping, got {type(getattr(meta, name)).__name__}")


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


def _load_weights(path: Path, meta: BundleMeta) -> dict[str, torch.Tensor]:
    """``model.pt``'s state dict, read once: the bytes are hashed in memory (no second read) and must match
    the ``bundle_id`` recorded at save time (its sha256 prefix), so a swapped file never scores under the
    old id."""
    f = path / MODEL_FILE
    if not f.is_file():
        raise BundleError(f"bundle {path}: no {MODEL_FILE}")
    data = f.read_bytes()
    if not meta.bundle_id:
        raise BundleError(f"bundle {path}: {META_FILE} records no bundle_id (the weights' sha256)")
    digest = hashlib.sha256(data).hexdigest()
    if not digest.startswith(meta.bundle_id.lower()):
        raise BundleError(
            f"bundle {path}: {MODEL_FILE} does not match {META_FILE} (sha256 {digest[:16]}, bundle_id "
            f"{meta.bundle_id}): the weights were replaced"
        )
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # pickle/zip/unicode errors of a file that is not a state dict
        raise BundleError(f"bundle {path}: {MODEL_FILE} is not a weights file ({type(e).__name__})") from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BundleError(f"bundle {path}: {MODEL_FILE} is not a state dict of tensors")
    return state


def _check_state_fits(path: Path, meta: BundleMeta, model: torch.nn.Module, state: dict) -> None:
    """Strict keys and shapes, in one line naming what differs (torch's own message is a page long)."""
    want = model.state_dict()
    missing = [k for k in want if k not in state]
    extra = [k for k in state if k not in want]
    shapes = [k for k in want if k in state and tuple(state[k].shape) != tuple(want[k].shape)]
    if not (missing or extra or shapes):
        return
    what = f"{meta.backbone} with {meta.num_classes} classes"
    if shapes:
        k = shapes[0]
        raise BundleError(
            f"bundle {path}: {MODEL_FILE} does not fit {what}: {k} has shape {tuple(state[k].shape)}, "
            f"expected {tuple(want[k].shape)} ({len(shapes)} tensors differ)"
        )
    raise BundleError(
        f"bundle {path}: {MODEL_FILE} does not fit {what}: {len(missing)} tensors missing "
        f"{missing[:2]}, {len(extra)} unexpected {extra[:2]}"
    )


def load_bundle(path: str | os.PathLike, device: str | torch.device | None = None) -> LoadedBundle:
    """Load a bundle's model in eval mode on ``device`` (CUDA when available by default), channels_last.

    Every check that costs no more than loading itself runs here (schema, weights hash, strict keys into
    the declared backbone and class count), so scoring actors refuse a bad bundle too; the probe forward
    lives in :func:`validate_bundle`, run once on the driver."""
    path = Path(path)
    meta = read_meta(path)
    if meta.backbone not in list_backbones():
        raise BundleError(
            f"bundle {path}: unknown backbone {meta.backbone!r} (known: {', '.join(list_backbones())})"
        )
    dev = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    state = _load_weights(path, meta)
    model = create_model(meta.backbone, meta.num_classes, weights="none", dropout=0.0)
    _check_state_fits(path, meta, model, state)
    model.load_state_dict(state, strict=True)
    model.eval().to(dev, memory_format=torch.channels_last)
    heads = Heads()
    if (path / HEADS_FILE).is_file():
        want = meta.scope.get("heads_sha256")
        if want and file_sha256(path / HEADS_FILE) != want:
            raise BundleError(
                f"{path / HEADS_FILE} does not match the bundle (sha256 differs from bundle.json)"
            )
        heads = Heads.load(path / HEADS_FILE)
    return LoadedBundle(path=path, meta=meta, model=model, device=dev, heads=heads)


def probe_inputs(size: int) -> torch.Tensor:
    """(2, 1, S, S) uint8: a black image and a bright disc on a mid-grey ramp (a crude head), the two
    extremes a decoded scan lies between."""
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    head = torch.where(xx**2 + yy**2 < 0.6, 200.0, 60.0 + 40.0 * (xx + 1))
    x = torch.zeros((2, 1, size, size), dtype=torch.uint8)
    x[1, 0] = head.round().to(torch.uint8)
    return x


def probe_bundle(b: LoadedBundle) -> None:
    """Forward :func:`probe_inputs` at the bundle's temperature: logits and probabilities must be finite
    and of the declared class count (zeroed/NaN weights, an overflowing temperature fail here)."""
    x = probe_inputs(b.meta.image_size).to(b.device).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        logits, feats, _ = b.model.forward_with_taps(x)  # type: ignore[operator]
    probs = torch.softmax(logits.float() / b.meta.temperature, dim=1)
    if tuple(logits.shape) != (2, b.meta.num_classes):
        raise BundleError(
            f"bundle {b.path}: the model gives {tuple(logits.shape)[1:]} outputs, classes declare "
            f"{b.meta.num_classes}"
        )
    if not (torch.isfinite(logits).all() and torch.isfinite(probs).all() and torch.isfinite(feats).all()):
        raise BundleError(
            f"bundle {b.path}: the model produces non-finite outputs (NaN/inf) on a probe image: "
            "its weights or temperature are broken"
        )


# Bundles that passed :func:`validate_bundle` in this process, keyed by the files' identity: a repeated
# job (demo, tests, a notebook) skips the model build and probe.
_VALIDATED: dict[tuple, BundleMeta] = {}


def _identity(path: Path) -> tuple:
    stats = []
    for name in (META_FILE, MODEL_FILE, HEADS_FILE):
        f = path / name
        st = f.stat() if f.is_file() else None
        stats.append((st.st_size, st.st_mtime_ns, st.st_ino) if st else None)
    return (str(path.resolve()), *stats)


def validate_bundle(uri: str | os.PathLike, storage: Any = None) -> BundleMeta:
    """Check the bundle at ``uri`` (local or ``s3://``/``gs://``) before any work starts: schema and ranges,
    weights hash vs ``bundle_id``, strict load into the declared backbone and class count, finite outputs
    on a probe input. Raises :class:`BundleError` (a missing bundle: FileNotFoundError); returns the
    metadata. Cached per process."""
    local = fetch_bundle(uri, storage)
    key = _identity(local) if (local / META_FILE).is_file() else None
    if key in _VALIDATED:
        return _VALIDATED[key]
    b = load_bundle(local, device="cpu")
    probe_bundle(b)
    if key is not None:
        _VALIDATED[key] = b.meta
    return b.meta
