"""Grad-CAM heat maps, PNG overlays for positive scans (``raytumor score --explain``), and the pointing game
that checks a heat map against an expert tumour mask.

Hand-written rather than the ``grad-cam`` PyPI package: that one pulls in opencv and ttach, while standard
Grad-CAM (Selvaraju et al., 2017) on a single layer is a few dozen lines of torch.

The scoring actor already holds the model (eval mode, channels_last, often frozen, usually called under
``torch.inference_mode()`` and bf16 autocast); :class:`GradCAM` leaves all of that as it found it.

Pointing game (Zhang et al., 2016): a heat map "hits" when its peak lies inside the tumour mask. The peak is
found on the model input and mapped back to the original image through the input's geometry
(:class:`InputGeometry`: head crop, zero-pad to square, resize), so masks are compared where the expert drew
them. This module stays free of the preprocessing code: the caller says what the geometry was.
"""

from __future__ import annotations

import hashlib
import io
import math
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torch import nn

from raytumor.groups import cluster_ids
from raytumor.metrics import bootstrap_ci
from raytumor.model import TumorClassifier

# Side of the dummy image used to locate the CAM layer: stride-32 backbones still give a 2x2 map there, which
# separates real feature maps from global-pooling outputs (always 1x1).
_PROBE_SIZE = 64
_MIN_OVERLAY_SIDE = 224  # upscale small scans so the caption stays legible

# Name of the CAM layer per model. Weak keys: the Ray actor may swap models; the cache must not keep them alive.
_LAYER_CACHE: weakref.WeakKeyDictionary[nn.Module, str] = weakref.WeakKeyDictionary()


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Temporarily eval mode (no BatchNorm statistic updates, no dropout); restores every module's own flag."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, flag in modes:
            m.training = flag


def _is_feature_map(out: object) -> bool:
    # (B, C, h, w) with h == w > 1 on the square probe: excludes pooled outputs (1x1) and the channels-last
    # (B, H, W, C) intermediates of ConvNeXt blocks (their last two dims differ).
    return isinstance(out, torch.Tensor) and out.ndim == 4 and out.shape[2] == out.shape[3] > 1


def find_cam_layer(model: TumorClassifier) -> nn.Module:
    """The backbone module whose output is the last 4-D spatial feature map of the forward pass.

    Found by one probe forward with hooks on every backbone module, so it works for any backbone. Modules
    finish after their children, so this picks the outermost module that ends with the final map (e.g.
    ``layer4`` of a ResNet, ``features`` of torchvision's EfficientNet/ConvNeXt, ``bn2`` of timm's Lite).
    """
    name = _LAYER_CACHE.get(model)
    if name is not None:
        try:
            return model.backbone.get_submodule(name)
        except AttributeError:  # backbone replaced since: probe again
            pass
    finished: list[str] = []  # names in the order their forward returned a feature map
    handles = []

    def hook(mod_name: str):
        def fn(_m: nn.Module, _inp: object, out: object) -> None:
            if _is_feature_map(out):
                finished.append(mod_name)

        return fn

    try:
        for mod_name, module in model.backbone.named_modules():
            handles.append(module.register_forward_hook(hook(mod_name)))
        device = next(model.parameters()).device
        probe = torch.zeros(1, _PROBE_SIZE, _PROBE_SIZE, dtype=torch.uint8, device=device)
        with torch.no_grad(), _eval_mode(model):
            model(probe)
    finally:
        for h in handles:
            h.remove()
    if not finished:
        raise ValueError(f"no module of {type(model.backbone).__name__} outputs a 4-D spatial feature map")
    name = finished[-1]
    _LAYER_CACHE[model] = name
    return model.backbone.get_submodule(name)


class GradCAM:
    """Grad-CAM for a :class:`TumorClassifier`: ``GradCAM(model)(images, target) -> (B, H, W)`` in [0, 1].

    The hook lives only for the duration of a call (removed in ``finally``), so there is nothing to close.
    Gradients are taken with ``torch.autograd.grad`` w.r.t. the activation only: parameters' ``.grad``,
    ``requires_grad`` flags and train/eval modes are untouched (the call runs in eval mode and restores it).
    """

    def __init__(self, model: TumorClassifier, layer: nn.Module | None = None) -> None:
        self.model = model
        self.layer = layer if layer is not None else find_cam_layer(model)

    def __call__(self, images: torch.Tensor | np.ndarray, target: int | Sequence[int]) -> np.ndarray:
        device = next(self.model.parameters()).device
        x = torch.as_tensor(images)
        if x.ndim not in (3, 4):
            raise ValueError(f"expected (B, H, W) or (B, 1, H, W) images, got shape {tuple(x.shape)}")
        b, h, w = x.shape[0], x.shape[-2], x.shape[-1]
        tlist = [int(target)] * b if isinstance(target, (int, np.integer)) else [int(t) for t in target]
        if len(tlist) != b:
            raise ValueError(f"need one target per image ({b}), got {len(tlist)}")
        if b == 0:
            return np.zeros((0, h, w), np.float32)
        acts: list[torch.Tensor] = []
        handle = self.layer.register_forward_hook(lambda _m, _i, out: acts.append(out))
        try:
            # The caller may be under inference_mode/no_grad/bf16 autocast: leave all three locally. The copy
            # makes the input a normal (non-inference) tensor that requires grad, so the graph exists even
            # when every parameter is frozen; gradients in fp32 avoid bf16 noise in the channel weights.
            with (
                torch.inference_mode(False),
                torch.enable_grad(),
                torch.autocast(device.type, enabled=False),
                _eval_mode(self.model),
            ):
                x = x.to(device=device, dtype=torch.float32, copy=True).requires_grad_(True)
                logits = self.model(x)
                if not all(0 <= t < logits.shape[1] for t in tlist):
                    raise ValueError(f"target out of range for {logits.shape[1]} classes: {tlist}")
                targets = torch.tensor(tlist, device=device)
                score = logits.gather(1, targets[:, None]).sum()  # images are independent in eval mode
                act = acts[-1]  # last call wins if the layer is reused
                (grad,) = torch.autograd.grad(score, act)
                with torch.no_grad():
                    weights = grad.float().mean(dim=(2, 3), keepdim=True)  # alpha_k: spatial mean gradient
                    cam = F.relu((weights * act.float()).sum(dim=1, keepdim=True))
                    cam = F.interpolate(cam, size=(h, w), mode="bilinear", align_corners=False)[:, 0]
                    # Scale by the max only (ReLU already made it >= 0): a map with no positive evidence
                    # stays all-zero instead of min-max stretching numerical noise into a hot spot.
                    peak = cam.amax(dim=(1, 2), keepdim=True)
                    cam = torch.where(peak > 1e-12, cam / peak.clamp_min(1e-12), torch.zeros_like(cam))
        finally:
            handle.remove()
        return cam.clamp_(0.0, 1.0).cpu().numpy().astype(np.float32, copy=False)


def overlay_png(
    image: np.ndarray, cam: np.ndarray, *, alpha: float = 0.4, caption: str | None = None, cmap: str = "jet"
) -> bytes:
    """PNG bytes: the greyscale scan with the colour-mapped CAM blended on top, plus an optional caption.

    The blend weight is ``alpha * cam`` per pixel, so where the CAM is 0 the scan shows unchanged (grey).
    Scans with a side under 224 px are upscaled so the caption stays readable; otherwise the size is kept.
    """
    from matplotlib import colormaps  # deferred: only the explain path pays for importing matplotlib

    img = np.asarray(image)
    if img.ndim != 2:
        raise ValueError(f"expected a (H, W) greyscale image, got shape {img.shape}")
    img = np.clip(img, 0, 255).astype(np.uint8, copy=False)
    heat = np.nan_to_num(np.asarray(cam, dtype=np.float32), nan=0.0)
    if heat.shape != img.shape:  # e.g. a CAM computed at model resolution for a larger original
        heat = np.asarray(Image.fromarray(heat, mode="F").resize(img.shape[::-1], Image.Resampling.BILINEAR))
    heat = np.clip(heat, 0.0, 1.0)
    colour = colormaps[cmap](heat)[..., :3].astype(np.float32) * 255.0
    a = (alpha * heat)[..., None]
    rgb = (1.0 - a) * img[..., None].astype(np.float32) + a * colour
    out = Image.fromarray(np.rint(rgb).astype(np.uint8), mode="RGB")
    short = min(out.size)
    if short < _MIN_OVERLAY_SIDE:
        s = _MIN_OVERLAY_SIDE / short
        out = out.resize((round(out.width * s), round(out.height * s)), Image.Resampling.BILINEAR)
    if caption:
        _draw_caption(out, caption)
    buf = io.BytesIO()
    out.save(buf, format="PNG")
    return buf.getvalue()


def _draw_caption(img: Image.Image, caption: str) -> None:
    draw = ImageDraw.Draw(img)
    size = max(10, min(img.size) // 28)
    font = ImageFont.load_default(size=size)
    if not isinstance(font, ImageFont.FreeTypeFont):  # Pillow without FreeType: bitmap font is latin-1 only
        caption = caption.replace("\u2014", "-").encode("latin-1", "replace").decode("latin-1")
    pad = max(2, size // 4)
    text = "\n".join(_wrap(draw, caption, font, img.width - 4 * pad))  # a long reason is wrapped, not cut
    left, top, right, bottom = draw.multiline_textbbox((0, 0), text, font=font)
    x, y = pad, img.height - (bottom - top) - 3 * pad
    # A dark box under the text so it is readable on top of both the scan and the heat map.
    draw.rectangle((x - pad, y - pad, x + right - left + pad, y + bottom - top + pad), fill=(0, 0, 0))
    draw.multiline_text((x - left, y - top), text, fill=(255, 255, 255), font=font)


def _wrap(draw: ImageDraw.ImageDraw, text: str, font: Any, width: float) -> list[str]:
    """Greedy word wrap to ``width`` pixels (a single word longer than that keeps its own line)."""
    lines: list[str] = []
    for word in text.split():
        if lines and draw.textlength(f"{lines[-1]} {word}", font=font) <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines or [""]


def explain_name(unit_id: str) -> str:
    """A file name for a unit's overlay: a hash of the id, never the id itself.

    Ids can be member names from untrusted archives (``../../etc/passwd``); hashing makes the name safe,
    fixed-length and deterministic across runs and workers.
    """
    digest = hashlib.sha1(unit_id.encode("utf-8", "surrogatepass"), usedforsecurity=False).hexdigest()
    return digest[:20] + ".png"


# ----------------------------------------------------------------------------------------------------------
# Pointing game: does the heat map's peak fall inside the expert's tumour mask?


@dataclass(frozen=True)
class InputGeometry:
    """How a (size, size) model input was cut from its decoded (height, width) slice: the crop ``box``
    (y0, y1, x0, x1, half-open; the whole slice when nothing was cropped), then zero-padding of the shorter
    side (the odd pixel at the bottom/right) and a resize to ``size``, as ``formats.fit_square`` does."""

    height: int
    width: int
    box: tuple[int, int, int, int]
    size: int

    def __post_init__(self) -> None:
        y0, y1, x0, x1 = self.box
        if not (0 <= y0 < y1 <= self.height and 0 <= x0 < x1 <= self.width) or self.size < 1:
            raise ValueError(f"crop box {self.box} does not fit a {self.height}x{self.width} slice")

    def to_source(self, row: float, col: float) -> tuple[float, float]:
        """Continuous (y, x) in the decoded slice (pixel i spans [i, i + 1)) of the centre of model-input pixel
        (row, col). The resize maps pixel centres linearly ((i + 0.5) * side / size of the padded square);
        the result lies outside the slice when that pixel is padding."""
        y0, y1, x0, x1 = self.box
        h, w = y1 - y0, x1 - x0
        side = max(h, w)
        top, left = (side - h) // 2, (side - w) // 2
        k = side / self.size
        return (row + 0.5) * k - top + y0, (col + 0.5) * k - left + x0


def cam_peak(cam: np.ndarray) -> tuple[int, int] | None:
    """(row, col) of the heat map's maximum (the first in row-major order on ties); None for an all-zero map:
    Grad-CAM found no positive evidence anywhere, so it points nowhere."""
    c = np.nan_to_num(np.asarray(cam, dtype=np.float32), nan=0.0)
    if c.size == 0 or float(c.max()) <= 0.0:
        return None
    r, q = np.unravel_index(int(np.argmax(c)), c.shape)
    return int(r), int(q)


def point_in_mask(mask: np.ndarray, y: float, x: float) -> tuple[bool, float]:
    """(inside, distance): whether the continuous point (y, x) lies on a mask pixel (pixel i spans [i, i + 1)),
    and its distance in pixels to the nearest mask pixel's centre (0 inside, inf for an empty mask)."""
    m = np.asarray(mask, dtype=bool)
    iy, ix = math.floor(y), math.floor(x)
    if 0 <= iy < m.shape[0] and 0 <= ix < m.shape[1] and m[iy, ix]:
        return True, 0.0
    ys, xs = np.nonzero(m)
    if not len(ys):
        return False, math.inf
    return False, float(np.sqrt(((ys + 0.5 - y) ** 2 + (xs + 0.5 - x) ** 2).min()))


def pointing_game(
    cam: np.ndarray, geometry: InputGeometry, mask: np.ndarray, tolerance_px: float = 0.0
) -> dict[str, Any]:
    """The peak of ``cam`` (on the model input) against ``mask``, in the original image's pixels.

    ``mask`` has the original image's shape; a slice decoded at another resolution (a large JPEG decoded at a
    reduced DCT scale) is scaled to it, while a different aspect ratio is an error (not the same picture).
    Returns ``hit`` (peak on the mask), ``hit_tolerant`` (within ``tolerance_px`` of a mask pixel),
    ``distance_px``, the peak ``peak_y``/``peak_x`` (mask pixels), ``in_image`` (False: the peak was padding),
    ``cam_empty`` (no peak: a miss), ``centre_hit`` (the same test for the model input's centre: a baseline
    that always points there) and ``mask_share`` (the hit rate of a uniformly random point)."""
    m = np.asarray(mask, dtype=bool)
    if m.ndim != 2 or not m.size:
        raise ValueError(f"expected a 2-D mask, got shape {m.shape}")
    if tuple(np.shape(cam)) != (geometry.size, geometry.size):
        raise ValueError(
            f"heat map shape {np.shape(cam)} is not the model input's ({geometry.size}, {geometry.size})"
        )
    sy, sx = m.shape[0] / geometry.height, m.shape[1] / geometry.width
    if not math.isclose(sy, sx, rel_tol=0.02):
        raise ValueError(
            f"mask {m.shape[0]}x{m.shape[1]} and image {geometry.height}x{geometry.width} differ in aspect ratio"
        )

    def place(row: float, col: float) -> tuple[float, float]:
        y, x = geometry.to_source(row, col)
        return y * sy, x * sx

    c = (geometry.size - 1) / 2
    out: dict[str, Any] = {
        "centre_hit": point_in_mask(m, *place(c, c))[0],
        "mask_share": float(m.mean()),
        "cam_empty": False,
    }
    peak = cam_peak(cam)
    if peak is None:
        nan = float("nan")
        out.update(hit=False, hit_tolerant=False, distance_px=nan, peak_y=nan, peak_x=nan, in_image=False)
        out["cam_empty"] = True
        return out
    y, x = place(*peak)
    hit, dist = point_in_mask(m, y, x)
    in_image = 0 <= y < m.shape[0] and 0 <= x < m.shape[1]
    out.update(
        hit=hit, hit_tolerant=dist <= tolerance_px, distance_px=dist, peak_y=y, peak_x=x, in_image=in_image
    )
    return out


def hit_rate(
    hits: np.ndarray, clusters: np.ndarray | None = None, n_boot: int = 1000, seed: int = 0
) -> dict[str, Any]:
    """Share of hits with a percentile-bootstrap 95 % interval that resamples whole ``clusters`` (patients).

    The interval is :func:`raytumor.metrics.bootstrap_ci`'s sensitivity of an all-tumour set whose score is
    the hit (1) or miss (0): the same resampling as every other interval in the project."""
    h = np.asarray(hits, dtype=bool)
    n = len(h)
    if n == 0:
        return {"n": 0, "hits": 0, "rate": None, "ci95": [None, None]}
    probs = np.c_[~h, h].astype(np.float64)
    ci = bootstrap_ci(
        np.ones(n, dtype=np.int64), probs, ["miss", "hit"], "miss", 0.5, n_boot, seed, groups=clusters
    )
    return {"n": n, "hits": int(h.sum()), "rate": float(h.mean()), "ci95": ci["sensitivity"]}


def _mean_or_none(v: pd.Series) -> float | None:
    v = pd.to_numeric(v, errors="coerce").dropna()
    return float(v.mean()) if len(v) else None


def _pointing_block(df: pd.DataFrame, n_boot: int, seed: int) -> dict[str, Any]:
    clusters, what = cluster_ids(df)
    out: dict[str, Any] = {"n": int(len(df)), "ci95_resampling": what}
    for k in ("hit", "hit_tolerant", "centre_hit"):
        out[k] = hit_rate(df[k].to_numpy(dtype=bool), clusters, n_boot, seed)
    out["random_point"] = _mean_or_none(df["mask_share"])
    out["random_point_in_head"] = _mean_or_none(df["head_share"]) if "head_share" in df.columns else None
    out["cam_empty"] = int(df["cam_empty"].astype(bool).sum())
    out["peak_in_padding"] = int((~df["in_image"].astype(bool) & ~df["cam_empty"].astype(bool)).sum())
    d = pd.to_numeric(df["distance_px"], errors="coerce").to_numpy(dtype=np.float64)
    d = d[np.isfinite(d)]  # an empty map has no peak, so no distance
    out["median_distance_px"] = float(np.median(d)) if len(d) else None
    return out


def localisation_summary(
    rows: pd.DataFrame, n_boot: int = 1000, seed: int = 0, by: Sequence[str] = ("sequence", "source")
) -> dict[str, Any]:
    """Pointing-game numbers over per-image rows (:func:`pointing_game`'s columns, ``error``, and
    ``patient_id``/``source``/``group`` for the clusters): the hit rate, the within-tolerance hit rate and the
    centre point's hit rate, each with a 95 % interval over whole patients (:func:`hit_rate`), and the
    random-point baselines (mean mask share of the image, ``head_share`` of the head). The same per value of
    each column of ``by``, among the images the model called tumour (``called``) and, when some rows are out
    of scope, among the in-scope ones (``in_scope``). Rows with an ``error`` are counted, not scored."""
    err = rows["error"].notna().to_numpy() if "error" in rows.columns else np.zeros(len(rows), dtype=bool)
    ok = rows[~err].reset_index(drop=True)
    out: dict[str, Any] = {**_pointing_block(ok, n_boot, seed), "errors": int(err.sum())}
    if "called" in ok.columns:
        out["among_called_tumour"] = _pointing_block(ok[ok["called"].astype(bool)], n_boot, seed)
    if "in_scope" in ok.columns and not ok["in_scope"].astype(bool).all():
        out["in_scope"] = _pointing_block(ok[ok["in_scope"].astype(bool)], n_boot, seed)
    for col in by:
        if col in ok.columns and ok[col].notna().any():
            keys = ok[col].astype(object).where(ok[col].notna(), "unknown").astype(str)
            out[f"by_{col}"] = {
                k: _pointing_block(ok[keys == k], n_boot, seed) for k in sorted(keys.unique())
            }
    return out


__all__ = [
    "GradCAM",
    "InputGeometry",
    "cam_peak",
    "explain_name",
    "find_cam_layer",
    "hit_rate",
    "localisation_summary",
    "overlay_png",
    "point_in_mask",
    "pointing_game",
]
