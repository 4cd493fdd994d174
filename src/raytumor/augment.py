"""CPU augmentation for Ray Data ``map_batches`` and the deterministic eval/inference preprocessing.

Batches use Ray Data's numpy format: ``batch["image"]`` is (B, H, W) uint8 grayscale; every other column
passes through untouched. Training images are stored at :func:`store_size` (a bit larger than the model
input) and :func:`augment_batch` draws fresh per-sample augmentations on every call, so every epoch sees
different views. Output stays uint8 (B, image_size, image_size): normalisation lives inside the model.

Geometry (random resized crop, flips, rotation, translation) is fused into one affine warp per sample and
applied to the whole batch with a single ``grid_sample`` (one interpolation instead of one per op).
Intensity ops are per-sample, vectorised versions of ``torchvision.transforms.v2.functional``'s
``adjust_brightness`` / ``adjust_contrast`` / ``adjust_gamma`` (same formulas, tested against them), plus an
MRI-style smooth multiplicative bias field (TorchIO's ``RandomBiasField`` idea: a low-order polynomial, here
with a bounded amplitude) and Gaussian noise.
"""

from __future__ import annotations

import dataclasses
import math
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

# Pre-shrink inputs that are much larger than needed, so the (non-antialiased) warp never decimates hard.
_MAX_WARP_DOWNSCALE = 1.25


@dataclass
class AugmentConfig:
    """Augmentation magnitudes. ``strength`` scales every magnitude (0 disables augmentation entirely).

    Probabilities (``hflip``, ``vflip``, ``p_bias``, ``p_noise``) are multiplied by ``min(strength, 1)`` so
    they fade in with strength but are not pushed towards "always" beyond 1.
    """

    strength: float = 1.0
    scale: tuple[float, float] = (0.7, 1.0)  # random resized crop: area fraction range
    ratio: tuple[float, float] = (0.9, 1.1)  # random resized crop: aspect ratio range
    hflip: float = 0.5  # probability
    vflip: float = 0.0  # probability
    rotate_deg: float = 10.0  # max |angle|
    translate: float = 0.05  # max |shift| as a fraction of the output size
    brightness: float = 0.2  # factor drawn from [1 - b, 1 + b]
    contrast: float = 0.2  # factor drawn from [1 - c, 1 + c]
    gamma: tuple[float, float] = (0.8, 1.25)  # drawn log-uniformly
    noise_std: float = 0.03  # max Gaussian noise std as a fraction of 255
    p_noise: float = 0.5
    bias_field: float = 0.3  # max amplitude a of the multiplicative field (values within [1 - a, 1 + a])
    p_bias: float = 0.5

    def __post_init__(self) -> None:
        for name in ("scale", "ratio", "gamma"):
            lo, hi = getattr(self, name)
            setattr(self, name, (float(lo), float(hi)))
            if not 0 < lo <= hi:
                raise ValueError(f"{name} must satisfy 0 < lo <= hi, got {(lo, hi)}")
        if self.scale[1] > 1:
            raise ValueError(f"scale must be within (0, 1], got {self.scale}")
        if self.strength < 0:
            raise ValueError(f"strength must be >= 0, got {self.strength}")
        for name in ("hflip", "vflip", "p_noise", "p_bias"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} is a probability, got {getattr(self, name)}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> AugmentConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown augmentation options {unknown}; valid: {sorted(known)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def store_size(image_size: int) -> int:
    """Side length at which training images are decoded/cached: ~15% margin for random crops, multiple of 8."""
    return max(image_size, int(round(image_size * 1.15 / 8)) * 8)


def _as_config(config: Mapping[str, Any] | AugmentConfig | None) -> AugmentConfig:
    if config is None:
        return AugmentConfig()
    if isinstance(config, AugmentConfig):
        return config
    return AugmentConfig.from_dict(config)


def _images_tensor(images: Any) -> torch.Tensor:
    """(B, H, W) uint8 numpy (or a list of equal-shape 2-D arrays) -> (B, 1, H, W) uint8 tensor."""
    arr = np.stack(list(images)) if not isinstance(images, np.ndarray) or images.dtype == object else images
    if arr.ndim != 3:
        raise ValueError(f"expected images of shape (B, H, W), got {arr.shape}")
    if arr.dtype != np.uint8:
        raise ValueError(f"expected uint8 images, got {arr.dtype}")
    if not arr.flags.writeable:  # zero-copy Arrow buffers are read-only; torch wants writable memory
        arr = arr.copy()
    return torch.from_numpy(np.ascontiguousarray(arr)).unsqueeze(1)


def resize_images(x: torch.Tensor, size: int) -> torch.Tensor:
    """Antialiased bilinear resize of (B, 1, H, W) uint8 to (B, 1, size, size); non-square inputs are
    zero-padded (centred) to a square first so the aspect ratio is preserved."""
    h, w = x.shape[-2:]
    if h != w:
        side = max(h, w)
        top, left = (side - h) // 2, (side - w) // 2
        x = F.pad(x, (left, side - w - left, top, side - h - top))
    if x.shape[-1] == size:
        return x
    return TF.resize(x, [size, size], interpolation=InterpolationMode.BILINEAR, antialias=True)


def _with_images(batch: Mapping[str, Any], images: torch.Tensor) -> dict[str, Any]:
    out = dict(batch)
    out["image"] = images.squeeze(1).contiguous().numpy()
    return out


def eval_batch(batch: Mapping[str, Any], *, image_size: int) -> dict[str, Any]:
    """Deterministic eval/inference preprocessing: (B, image_size, image_size) uint8.

    Images normally arrive at image_size already (ingest decodes them so) and pass through unchanged;
    anything else is resized with :func:`resize_images`.
    """
    images = batch["image"]
    if isinstance(images, np.ndarray) and images.dtype == np.uint8 and images.shape[1:] == (image_size,) * 2:
        return dict(batch)  # the normal case: nothing to do, no copy
    return _with_images(batch, resize_images(_images_tensor(images), image_size))


def _uniform(g: torch.Generator, n: int, lo: float, hi: float) -> torch.Tensor:
    return torch.rand(n, generator=g) * (hi - lo) + lo


def _bernoulli(g: torch.Generator, n: int, p: float) -> torch.Tensor:
    return torch.rand(n, generator=g) < p


def _geometry(g: torch.Generator, n: int, h: int, w: int, cfg: AugmentConfig) -> torch.Tensor | None:
    """Per-sample affine matrices (n, 2, 3) for ``affine_grid`` (output -> input, normalised coordinates),
    or None when every geometric op is disabled (then a plain resize is exact and better)."""
    s = cfg.strength
    p = min(s, 1.0)
    lo_area = max(0.05, 1.0 - s * (1.0 - cfg.scale[0]))
    hi_area = max(lo_area, 1.0 - s * (1.0 - cfg.scale[1]))
    log_r = (s * math.log(cfg.ratio[0]), s * math.log(cfg.ratio[1]))
    max_rot = math.radians(s * cfg.rotate_deg)
    max_shift = s * cfg.translate
    if (
        lo_area == hi_area == 1.0
        and log_r == (0.0, 0.0)
        and max_rot == 0
        and max_shift == 0
        and p * cfg.hflip == 0
        and p * cfg.vflip == 0
    ):
        return None

    # Random resized crop, in pixels (like torchvision RandomResizedCrop, clipped instead of resampled).
    area = _uniform(g, n, lo_area, hi_area) * (h * w)
    ratio = torch.exp(_uniform(g, n, *log_r))
    cw = torch.sqrt(area * ratio).clamp(max=w)
    ch = torch.sqrt(area / ratio).clamp(max=h)
    cx = (torch.rand(n, generator=g) - 0.5) * (w - cw)  # crop centre offset from the image centre
    cy = (torch.rand(n, generator=g) - 0.5) * (h - ch)
    fx = torch.where(_bernoulli(g, n, p * cfg.hflip), -1.0, 1.0)
    fy = torch.where(_bernoulli(g, n, p * cfg.vflip), -1.0, 1.0)
    angle = _uniform(g, n, -max_rot, max_rot)
    tx = _uniform(g, n, -max_shift, max_shift) * 2  # fraction of output size -> normalised units
    ty = _uniform(g, n, -max_shift, max_shift) * 2

    # Output point u in [-1, 1]^2 -> crop-local pixels D u (D = diag(flip * crop/2)) -> rotate -> + centre,
    # then normalise by the input half-size. Translation shifts content by t (output units): u -> u - t.
    cos, sin = torch.cos(angle), torch.sin(angle)
    ax, ay = fx * cw / 2, fy * ch / 2
    a = torch.stack(
        [torch.stack([cos * ax, -sin * ay], -1), torch.stack([sin * ax, cos * ay], -1)], -2
    )  # (n, 2, 2) in pixels
    centre = torch.stack([cx, cy], -1) - (a @ torch.stack([tx, ty], -1).unsqueeze(-1)).squeeze(-1)
    norm = torch.tensor([2.0 / w, 2.0 / h]).view(1, 2, 1)
    return torch.cat([a * norm, centre.unsqueeze(-1) * norm], -1)


_BIAS_ORDER = 3
_basis_cache: dict[tuple[int, int], torch.Tensor] = {}


def _bias_basis(h: int, w: int) -> torch.Tensor:
    """Polynomial terms x^i y^j (1 <= i + j <= 3) on [-1, 1]^2, shape (K, h, w). No constant term: a global
    gain is brightness's job."""
    key = (h, w)
    if key not in _basis_cache:
        y = torch.linspace(-1, 1, h).view(h, 1)
        x = torch.linspace(-1, 1, w).view(1, w)
        terms = [
            (x**i) * (y**j) for i in range(_BIAS_ORDER + 1) for j in range(_BIAS_ORDER + 1 - i) if i + j > 0
        ]
        _basis_cache[key] = torch.stack([t.expand(h, w) for t in terms]).contiguous()
    return _basis_cache[key]


def bias_fields(g: torch.Generator, n: int, h: int, w: int, amplitude: float) -> torch.Tensor:
    """Smooth multiplicative fields (n, 1, h, w) with values in [1 - amplitude, 1 + amplitude]."""
    basis = _bias_basis(h, w)
    coef = torch.rand(n, basis.shape[0], generator=g) * 2 - 1
    field = torch.einsum("nk,khw->nhw", coef, basis)
    peak = field.abs().amax(dim=(1, 2), keepdim=True).clamp(min=1e-6)
    amp = torch.rand(n, 1, 1, generator=g) * amplitude
    return (1 + amp * field / peak).unsqueeze(1)


# Per-sample versions of torchvision.transforms.v2.functional.adjust_* for float images on a 0..255 scale;
# factors are (B, 1, 1, 1) tensors. Same formulas as torchvision (checked in tests/test_augment.py).
def adjust_brightness(y: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (y * factor).clamp_(0, 255)


def adjust_contrast(y: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    # Blend with the per-image mean (of the grayscale image: single channel here).
    mean = y.mean(dim=(-3, -2, -1), keepdim=True)
    return (factor * y + (1 - factor) * mean).clamp_(0, 255)


def adjust_gamma(y: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    return (y.clamp(0, 255) / 255).pow_(gamma).mul_(255)


def augment_batch(
    batch: Mapping[str, Any],
    *,
    image_size: int,
    config: Mapping[str, Any] | AugmentConfig | None = None,
    seed: int | None = None,
) -> dict[str, Any]:
    """Random training augmentation of ``batch["image"]`` (B, S, S) uint8 -> (B, image_size, image_size) uint8.

    A fresh RNG is drawn from OS entropy on every call unless ``seed`` is given (then the output is
    reproducible). Other columns are returned as the same objects.
    """
    cfg = _as_config(config)
    g = torch.Generator().manual_seed(secrets.randbits(63) if seed is None else int(seed))
    x = _images_tensor(batch["image"])
    n, _, h, w = x.shape
    if n == 0:
        return _with_images(batch, torch.zeros((0, 1, image_size, image_size), dtype=torch.uint8))
    s = cfg.strength
    p = min(s, 1.0)

    if min(h, w) > _MAX_WARP_DOWNSCALE * store_size(image_size):
        x = resize_images(x, store_size(image_size))
        h = w = x.shape[-1]
    theta = _geometry(g, n, h, w, cfg)
    if theta is None:
        y = resize_images(x, image_size).float()
    else:
        grid = F.affine_grid(theta, [n, 1, image_size, image_size], align_corners=False)
        y = F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    # Intensity, float in 0..255. Each op only touches the samples it was drawn for.
    if cfg.bias_field * s > 0 and p * cfg.p_bias > 0:
        idx = _bernoulli(g, n, p * cfg.p_bias).nonzero().squeeze(1)
        if len(idx):
            y[idx] *= bias_fields(g, len(idx), image_size, image_size, min(cfg.bias_field * s, 0.95))
    if cfg.brightness * s > 0:
        b = _uniform(g, n, max(0.0, 1 - s * cfg.brightness), 1 + s * cfg.brightness).view(n, 1, 1, 1)
        y = adjust_brightness(y, b)
    if cfg.contrast * s > 0:
        c = _uniform(g, n, max(0.0, 1 - s * cfg.contrast), 1 + s * cfg.contrast).view(n, 1, 1, 1)
        y = adjust_contrast(y, c)
    glo, ghi = (s * math.log(cfg.gamma[0]), s * math.log(cfg.gamma[1]))
    if ghi > glo:
        gam = torch.exp(_uniform(g, n, glo, ghi)).view(n, 1, 1, 1)
        y = adjust_gamma(y, gam)
    if cfg.noise_std * s > 0 and p * cfg.p_noise > 0:
        idx = _bernoulli(g, n, p * cfg.p_noise).nonzero().squeeze(1)
        if len(idx):
            sigma = _uniform(g, len(idx), 0, cfg.noise_std * s * 255).view(-1, 1, 1, 1)
            y[idx] += sigma * torch.randn(y[idx].shape, generator=g)
    out = y.round_().clamp_(0, 255).to(torch.uint8)
    return _with_images(batch, out)


__all__ = [
    "AugmentConfig",
    "adjust_brightness",
    "adjust_contrast",
    "adjust_gamma",
    "augment_batch",
    "bias_fields",
    "eval_batch",
    "resize_images",
    "store_size",
]
