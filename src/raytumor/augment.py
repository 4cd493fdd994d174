"""CPU augmentation of training batches for Ray Data ``map_batches`` (evaluation and scoring never augment:
they use :func:`raytumor.preprocess.model_inputs`).

Batches use Ray Data's numpy format: ``batch["image"]`` is (B, H, W) uint8 grayscale; every other column
passes through untouched. Training images are stored at :func:`store_size` (a bit larger than the model
input) and :func:`augment_batch` draws fresh per-sample augmentations on every call, so every epoch sees
different views. Output stays uint8 (B, image_size, image_size): normalisation lives inside the model.

Two families, each with one knob that scales its magnitudes (and fades its probabilities in up to 1):

``strength`` (classic augmentation). Geometry (random resized crop, flips, rotation, translation) is fused
into one affine warp per sample and applied to the whole batch with a single ``grid_sample`` (one
interpolation instead of one per op). Intensity ops are per-sample, vectorised versions of
``torchvision.transforms.v2.functional``'s ``adjust_brightness`` / ``adjust_contrast`` / ``adjust_gamma``
(same formulas, tested against them), plus an MRI-style smooth multiplicative bias field (TorchIO's
``RandomBiasField`` idea: a low-order polynomial, here with a bounded amplitude) and Gaussian noise.

``shift`` (scanner/source shift, issue 6; 0 = off). Imitates how another scanner, reconstruction or export
pipeline renders the same anatomy, so a model cannot key on one dataset's artefacts: 90° turns (orientation
conventions), Gaussian blur or unsharp-mask sharpening (reconstruction kernel), down-and-up resampling
(acquisition matrix; nearest or antialiased bilinear down, bilinear up), JPEG re-compression (export) and
random erasing (annotations, cut-off field of view). Its random numbers are drawn after all of the classic
family's, and only when ``shift > 0``, so ``shift=0`` reproduces the classic output bit for bit.

Order of application: warp -> 90° turn -> bias field, brightness, contrast, gamma -> blur/sharpen ->
down-up -> noise -> JPEG -> erasing. Optics/reconstruction (blur, resolution) act on the signal, noise is
added at the acquisition resolution (so resampling does not smooth it away), JPEG compresses the finished
image including its noise, as an export would, and erasing comes last so its rectangle stays clean.
"""

from __future__ import annotations

import dataclasses
import math
import secrets
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.io import ImageReadMode, decode_jpeg, encode_jpeg
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

# Pre-shrink inputs that are much larger than needed, so the (non-antialiased) warp never decimates hard.
_MAX_WARP_DOWNSCALE = 1.25


@dataclass
class AugmentConfig:
    """Augmentation magnitudes. ``strength`` scales every classic magnitude (0 disables that family) and
    ``shift`` every scanner/source-shift magnitude (0, the default, disables that family).

    Probabilities are multiplied by ``min(strength, 1)`` (classic: ``hflip``, ``vflip``, ``p_bias``,
    ``p_noise``) or ``min(shift, 1)`` (the ``p_*`` fields below ``shift``) so they fade in with their knob but
    are not pushed towards "always" beyond 1. Ranges are drawn uniformly, then scaled as noted per field.
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

    # Scanner/source shift family (a float so Ray Tune can search it, ~0..1.5).
    shift: float = 0.0
    # Turn by k * 90°, k uniform in {1, 2, 3}. With hflip this covers all 8 orientations (vflip = hflip
    # then k = 2), so the family needs no flip of its own. 0.5 keeps the stored orientation most common.
    p_rot90: float = 0.5
    # Blur and sharpen are exclusive per sample (p_blur + p_sharpen <= 1).
    p_blur: float = 0.25
    blur_sigma: tuple[float, float] = (0.5, 1.5)  # Gaussian sigma in output pixels, times shift
    p_sharpen: float = 0.15
    sharpen: tuple[float, float] = (0.3, 1.0)  # unsharp-mask amount (sigma 1 px), times shift
    p_resample: float = 0.3
    # Side factor f of the down step; the used factor is 1 - shift * (1 - f) (so f itself at shift 1),
    # floored at 0.2. Nearest or antialiased bilinear down (50/50), bilinear up.
    resample_scale: tuple[float, float] = (0.35, 0.9)
    p_jpeg: float = 0.5
    # Integer quality q; the used quality is 100 - shift * (100 - q) (so q itself at shift 1), floored at 5.
    jpeg_quality: tuple[int, int] = (25, 90)
    p_erase: float = 0.25
    erase_area: tuple[float, float] = (0.02, 0.15)  # rectangle area fraction, times shift
    erase_ratio: tuple[float, float] = (0.3, 3.3)  # rectangle aspect ratio, log-uniform (not scaled)
    erase_noise: float = 0.5  # probability an erased rectangle is filled with uniform noise instead of 0

    def __post_init__(self) -> None:
        for name in (
            "scale",
            "ratio",
            "gamma",
            "blur_sigma",
            "sharpen",
            "resample_scale",
            "erase_area",
            "erase_ratio",
        ):
            lo, hi = getattr(self, name)
            setattr(self, name, (float(lo), float(hi)))
            if not 0 < lo <= hi:
                raise ValueError(f"{name} must satisfy 0 < lo <= hi, got {(lo, hi)}")
        for name in ("scale", "resample_scale"):
            if getattr(self, name)[1] > 1:
                raise ValueError(f"{name} must be within (0, 1], got {getattr(self, name)}")
        if self.erase_area[1] >= 1:
            raise ValueError(f"erase_area must be within (0, 1), got {self.erase_area}")
        lo, hi = self.jpeg_quality
        if lo != int(lo) or hi != int(hi) or not 1 <= lo <= hi <= 100:
            raise ValueError(f"jpeg_quality must be integers with 1 <= lo <= hi <= 100, got {(lo, hi)}")
        self.jpeg_quality = (int(lo), int(hi))
        for name in ("strength", "shift"):
            value = getattr(self, name)
            if not 0 <= value < math.inf:  # also rejects NaN
                raise ValueError(f"{name} must be finite and >= 0, got {value}")
        probs = ("hflip", "vflip", "p_noise", "p_bias", "p_rot90", "p_blur", "p_sharpen", "p_resample")
        for name in (*probs, "p_jpeg", "p_erase", "erase_noise"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} is a probability, got {getattr(self, name)}")
        if self.p_blur + self.p_sharpen > 1:
            raise ValueError(
                f"p_blur + p_sharpen must be <= 1 (exclusive), got {self.p_blur + self.p_sharpen}"
            )

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


# Scanner/source-shift family. Floors keep shift > 1 from destroying the image outright.
_MIN_RESAMPLE = 0.2
_MIN_JPEG_QUALITY = 5
_SHARPEN_SIGMA = 1.0


def gaussian_blur_batch(y: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Gaussian blur of (m, 1, H, W) float with a per-sample ``sigma`` (m,) in pixels: one separable grouped
    convolution for the whole group, reflect padding, kernel radius ceil(3 * max sigma). Same kernel and
    padding as ``torchvision.transforms.v2.functional.gaussian_blur`` (checked in tests/test_augment.py)."""
    m, _, h, w = y.shape
    r = max(1, min(math.ceil(3 * float(sigma.max())), h - 1, w - 1))
    t = torch.arange(-r, r + 1, dtype=y.dtype)
    k = torch.exp(-0.5 * (t / sigma.to(y.dtype).view(m, 1)) ** 2)
    k = k / k.sum(1, keepdim=True)  # (m, 2r + 1)
    z = F.pad(y.transpose(0, 1), (r, r, r, r), mode="reflect")  # samples as channels: (1, m, H + 2r, W + 2r)
    z = F.conv2d(z, k.view(m, 1, 1, -1), groups=m)
    z = F.conv2d(z, k.view(m, 1, -1, 1), groups=m)
    return z.transpose(0, 1)


def jpeg_roundtrip(img: torch.Tensor, quality: int) -> torch.Tensor:
    """(1, H, W) uint8 -> the same image after a grayscale JPEG encode/decode at ``quality``."""
    with warnings.catch_warnings():
        # torchvision 0.29 deprecates its image codecs (pinned here; Pillow gives bit-identical output if they
        # go). One warning per call would flood worker logs.
        warnings.filterwarnings("ignore", "The image decoding and encoding", DeprecationWarning)
        return decode_jpeg(encode_jpeg(img, quality=quality), mode=ImageReadMode.UNCHANGED)


@dataclass
class _ShiftDraw:
    """Per-sample parameters of the shift family, all drawn up front (fixed order, whole-batch vectors so
    that changing one op's probability does not change another op's draws)."""

    rot_k: torch.Tensor  # (n,) int, 0 = no turn
    blur: torch.Tensor  # (n,) bool
    sharpen: torch.Tensor  # (n,) bool
    sigma: torch.Tensor  # (n,) blur sigma
    amount: torch.Tensor  # (n,) sharpen amount
    resample: torch.Tensor  # (n,) bool
    down_side: torch.Tensor  # (n,) int, side of the low-resolution image
    nearest: torch.Tensor  # (n,) bool, nearest (else antialiased bilinear) down step
    jpeg: torch.Tensor  # (n,) bool
    quality: torch.Tensor  # (n,) int
    erase: torch.Tensor  # (n,) bool
    box: torch.Tensor  # (n, 4) int: top, left, height, width
    noise_fill: torch.Tensor  # (n,) bool


def _draw_shift(g: torch.Generator, n: int, size: int, cfg: AugmentConfig) -> _ShiftDraw:
    sh = cfg.shift
    p = min(sh, 1.0)
    rot = _bernoulli(g, n, p * cfg.p_rot90)
    rot_k = torch.where(rot, torch.randint(1, 4, (n,), generator=g), 0)
    u = torch.rand(n, generator=g)
    blur = u < p * cfg.p_blur
    sharpen = ~blur & (u < p * (cfg.p_blur + cfg.p_sharpen))
    sigma = _uniform(g, n, *cfg.blur_sigma) * sh
    amount = _uniform(g, n, *cfg.sharpen) * sh
    resample = _bernoulli(g, n, p * cfg.p_resample)
    factor = (1 - sh * (1 - _uniform(g, n, *cfg.resample_scale))).clamp(min=_MIN_RESAMPLE)
    down_side = (factor * size).round().long().clamp(2, size)
    nearest = _bernoulli(g, n, 0.5)
    jpeg = _bernoulli(g, n, p * cfg.p_jpeg)
    q = _uniform(g, n, cfg.jpeg_quality[0], cfg.jpeg_quality[1])
    quality = (100 - sh * (100 - q)).round().long().clamp(_MIN_JPEG_QUALITY, 100)
    erase = _bernoulli(g, n, p * cfg.p_erase)
    # Like torchvision RandomErasing (area fraction, log-uniform aspect), clipped to the image, not resampled.
    area = _uniform(g, n, *cfg.erase_area) * sh * size * size
    aspect = torch.exp(_uniform(g, n, math.log(cfg.erase_ratio[0]), math.log(cfg.erase_ratio[1])))
    eh = torch.sqrt(area * aspect).round().long().clamp(1, size)
    ew = torch.sqrt(area / aspect).round().long().clamp(1, size)
    top = (torch.rand(n, generator=g) * (size - eh + 1)).long().clamp(max=size - eh)
    left = (torch.rand(n, generator=g) * (size - ew + 1)).long().clamp(max=size - ew)
    noise_fill = _bernoulli(g, n, cfg.erase_noise)
    return _ShiftDraw(
        rot_k=rot_k,
        blur=blur & (sigma > 0),
        sharpen=sharpen & (amount > 0),
        sigma=sigma,
        amount=amount,
        resample=resample & (down_side < size),
        down_side=down_side,
        nearest=nearest,
        jpeg=jpeg,
        quality=quality,
        erase=erase,
        box=torch.stack([top, left, eh, ew], 1),
        noise_fill=noise_fill,
    )


def _rot90(y: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    for i in k.nonzero().squeeze(1).tolist():  # a per-sample loop beats gather/scatter by ~2x
        y[i] = torch.rot90(y[i], int(k[i]), dims=(-2, -1))
    return y


def _blur_or_sharpen(y: torch.Tensor, d: _ShiftDraw) -> torch.Tensor:
    idx = (d.blur | d.sharpen).nonzero().squeeze(1)
    if len(idx):
        sigma = torch.where(d.blur[idx], d.sigma[idx], _SHARPEN_SIGMA)
        src = y[idx]
        smooth = gaussian_blur_batch(src, sigma)
        # Unsharp mask: add back the detail the blur removed, scaled by the amount.
        amount = d.amount[idx].view(-1, 1, 1, 1)
        sharp = (src + amount * (src - smooth)).clamp_(0, 255)
        y[idx] = torch.where(d.blur[idx].view(-1, 1, 1, 1), smooth, sharp)
    return y


def _down_up(y: torch.Tensor, d: _ShiftDraw) -> torch.Tensor:
    size = y.shape[-1]
    for i in d.resample.nonzero().squeeze(1).tolist():
        side = int(d.down_side[i])
        if d.nearest[i]:  # aliasing, like a coarse matrix without filtering
            small = F.interpolate(y[i : i + 1], size=(side, side), mode="nearest-exact")
        else:
            small = F.interpolate(y[i : i + 1], size=(side, side), mode="bilinear", antialias=True)
        y[i : i + 1] = F.interpolate(small, size=(size, size), mode="bilinear", align_corners=False)
    return y


def _jpeg(y: torch.Tensor, d: _ShiftDraw) -> torch.Tensor:
    for i in d.jpeg.nonzero().squeeze(1).tolist():
        img = y[i].round().clamp_(0, 255).to(torch.uint8)
        y[i] = jpeg_roundtrip(img, int(d.quality[i])).float()
    return y


def _erase(g: torch.Generator, y: torch.Tensor, d: _ShiftDraw) -> torch.Tensor:
    for i in d.erase.nonzero().squeeze(1).tolist():
        top, left, h, w = d.box[i].tolist()
        if d.noise_fill[i]:
            v = torch.rand(1, h, w, generator=g) * 255
        else:
            v = torch.zeros(1, 1, 1)
        y[i] = TF.erase(y[i], top, left, h, w, v)
    return y


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

    # All classic draws first, in their historical order (the stream must not change: shift=0 is
    # bit-identical to the code before the shift family); then the shift family's; then apply in the
    # order of the module docstring.
    if min(h, w) > _MAX_WARP_DOWNSCALE * store_size(image_size):
        x = resize_images(x, store_size(image_size))
        h = w = x.shape[-1]
    theta = _geometry(g, n, h, w, cfg)
    bias_idx = bias = None
    if cfg.bias_field * s > 0 and p * cfg.p_bias > 0:
        bias_idx = _bernoulli(g, n, p * cfg.p_bias).nonzero().squeeze(1)
        if len(bias_idx):
            bias = bias_fields(g, len(bias_idx), image_size, image_size, min(cfg.bias_field * s, 0.95))
    b = c = gam = None
    if cfg.brightness * s > 0:
        b = _uniform(g, n, max(0.0, 1 - s * cfg.brightness), 1 + s * cfg.brightness).view(n, 1, 1, 1)
    if cfg.contrast * s > 0:
        c = _uniform(g, n, max(0.0, 1 - s * cfg.contrast), 1 + s * cfg.contrast).view(n, 1, 1, 1)
    glo, ghi = (s * math.log(cfg.gamma[0]), s * math.log(cfg.gamma[1]))
    if ghi > glo:
        gam = torch.exp(_uniform(g, n, glo, ghi)).view(n, 1, 1, 1)
    noise_idx = noise = None
    if cfg.noise_std * s > 0 and p * cfg.p_noise > 0:
        noise_idx = _bernoulli(g, n, p * cfg.p_noise).nonzero().squeeze(1)
        if len(noise_idx):
            sigma = _uniform(g, len(noise_idx), 0, cfg.noise_std * s * 255).view(-1, 1, 1, 1)
            noise = sigma * torch.randn((len(noise_idx), 1, image_size, image_size), generator=g)
    shift = _draw_shift(g, n, image_size, cfg) if cfg.shift > 0 else None

    if theta is None:
        y = resize_images(x, image_size).float()
    else:
        grid = F.affine_grid(theta, [n, 1, image_size, image_size], align_corners=False)
        y = F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if shift is not None:
        y = _rot90(y, shift.rot_k)  # exact, so it joins the geometry without a second interpolation

    # Intensity, float in 0..255. Each op only touches the samples it was drawn for.
    if bias is not None:
        y[bias_idx] *= bias
    if b is not None:
        y = adjust_brightness(y, b)
    if c is not None:
        y = adjust_contrast(y, c)
    if gam is not None:
        y = adjust_gamma(y, gam)
    if shift is not None:
        y = _down_up(_blur_or_sharpen(y, shift), shift)
    if noise is not None:
        y[noise_idx] += noise
    if shift is not None:
        y = _erase(g, _jpeg(y, shift), shift)
    out = y.round_().clamp_(0, 255).to(torch.uint8)
    return _with_images(batch, out)


__all__ = [
    "AugmentConfig",
    "adjust_brightness",
    "adjust_contrast",
    "adjust_gamma",
    "augment_batch",
    "bias_fields",
    "gaussian_blur_batch",
    "jpeg_roundtrip",
    "resize_images",
    "store_size",
]
