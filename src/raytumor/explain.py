"""Grad-CAM heat maps and PNG overlays for positive scans (``raytumor score --explain``).

Hand-written rather than the ``grad-cam`` PyPI package: that one pulls in opencv and ttach, while standard
Grad-CAM (Selvaraju et al., 2017) on a single layer is a few dozen lines of torch.

The scoring actor already holds the model (eval mode, channels_last, often frozen, usually called under
``torch.inference_mode()`` and bf16 autocast); :class:`GradCAM` leaves all of that as it found it.
"""

from __future__ import annotations

import hashlib
import io
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torch import nn

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
    left, top, right, bottom = draw.textbbox((0, 0), caption, font=font)
    x, y = pad, img.height - (bottom - top) - 3 * pad
    # A dark box under the text so it is readable on top of both the scan and the heat map.
    draw.rectangle((x - pad, y - pad, x + right - left + pad, y + bottom - top + pad), fill=(0, 0, 0))
    draw.text((x - left, y - top), caption, fill=(255, 255, 255), font=font)


def explain_name(unit_id: str) -> str:
    """A file name for a unit's overlay: a hash of the id, never the id itself.

    Ids can be member names from untrusted archives (``../../etc/passwd``); hashing makes the name safe,
    fixed-length and deterministic across runs and workers.
    """
    digest = hashlib.sha1(unit_id.encode("utf-8", "surrogatepass"), usedforsecurity=False).hexdigest()
    return digest[:20] + ".png"


__all__ = ["GradCAM", "explain_name", "find_cam_layer", "overlay_png"]
