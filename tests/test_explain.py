"""Tests for raytumor.explain: CAM layer discovery, Grad-CAM correctness and side effects, PNG overlays, names.

The localisation checks use EfficientNet-Lite0 with its packaged ImageNet weights (no download) and a head
fitted on synthetic scans where "tumour" = a bright blob in the top-left or bottom-right quadrant.
"""

from __future__ import annotations

import copy
import io
import re

import numpy as np
import pytest
import torch
from PIL import Image

from raytumor.explain import GradCAM, explain_name, find_cam_layer, overlay_png
from raytumor.model import create_model, list_backbones

SIZE = 128  # Lite0 has stride 32: a 4x4 final map, so each quadrant owns 2x2 cells
HALF = SIZE // 2
RADIUS = SIZE // 8
N_TEST = 20


@pytest.fixture(autouse=True, scope="module")
def _two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(min(2, before))
    yield
    torch.set_num_threads(before)


def _scans(rng: np.random.Generator, n: int, tumour: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Noisy grey scans; tumour rows get a bright blob in quadrant 0 (top-left) or 1 (bottom-right)."""
    yy, xx = np.mgrid[:SIZE, :SIZE]
    imgs = rng.normal(60, 15, (n, SIZE, SIZE))
    quads = np.full(n, -1)
    for i in np.flatnonzero(tumour):
        quads[i] = rng.integers(0, 2)
        cy, cx = rng.integers(RADIUS + 2, HALF - RADIUS - 2, 2) + quads[i] * HALF
        imgs[i] += 150 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * (RADIUS / 1.5) ** 2))
    return np.clip(imgs, 0, 255).astype(np.uint8), quads


@pytest.fixture(scope="module")
def fitted():
    """(model, test images, blob quadrant per image): Lite0 features + a logistic-regression head."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model = create_model("efficientnet_lite0", 2, weights="imagenet", dropout=0.0).eval()
    y = np.arange(200) % 2
    x, _ = _scans(rng, len(y), y)
    with torch.no_grad():
        feats = torch.cat(
            [model.forward_features(torch.from_numpy(x[i : i + 50])) for i in range(0, len(x), 50)]
        )
    lin, target = model.head[1], torch.from_numpy(y)
    opt = torch.optim.LBFGS(lin.parameters(), max_iter=100)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(lin(feats), target) + 1e-3 * lin.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    model.zero_grad(set_to_none=True)
    for p in model.parameters():  # as in scoring: a frozen model
        p.requires_grad_(False)
    test_x, quads = _scans(rng, N_TEST, np.ones(N_TEST, dtype=int))
    with torch.no_grad():
        assert (model(torch.from_numpy(test_x)).argmax(1) == 1).all(), "head fit failed; test is meaningless"
    return model, test_x, quads


def _quadrant_means(cams: np.ndarray, quads: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per image: mean CAM in the blob's quadrant, mean over the other three, and the hottest quadrant."""
    q = np.stack(
        [
            cams[:, :HALF, :HALF].mean((1, 2)),  # 0: top-left
            cams[:, HALF:, HALF:].mean((1, 2)),  # 1: bottom-right
            cams[:, :HALF, HALF:].mean((1, 2)),
            cams[:, HALF:, :HALF].mean((1, 2)),
        ],
        axis=1,
    )
    own = q[np.arange(len(q)), quads]
    return own, (q.sum(1) - own) / 3, q.argmax(1)


def _no_forward_hooks(model: torch.nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


# -- find_cam_layer ------------------------------------------------------------------------------------


@pytest.mark.parametrize("backbone", list_backbones())
def test_find_cam_layer_every_backbone(backbone):
    model = create_model(backbone, 2, weights="none").eval()
    layer = find_cam_layer(model)
    assert any(layer is m for m in model.backbone.modules())
    assert _no_forward_hooks(model)
    seen = []
    handle = layer.register_forward_hook(lambda _m, _i, out: seen.append(out.shape))
    with torch.no_grad():
        model(torch.zeros(1, 64, 64, dtype=torch.uint8))
    handle.remove()
    # The final stage (stride 32), not an earlier one (4x4 or larger) and not the pooled 1x1 output.
    assert len(seen) >= 1 and len(seen[-1]) == 4 and tuple(seen[-1][2:]) == (2, 2), seen
    assert not model.training


def test_find_cam_layer_expected_modules_and_cache():
    resnet = create_model("resnet18", 2, weights="none").eval()
    assert find_cam_layer(resnet) is resnet.backbone.layer4
    lite = create_model("efficientnet_lite0", 2, weights="none").eval()
    assert find_cam_layer(lite) is lite.backbone.bn2
    calls = []
    handle = lite.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        assert find_cam_layer(lite) is lite.backbone.bn2
    finally:
        handle.remove()
    assert calls == [], "second lookup should come from the cache, without a probe forward"


def test_find_cam_layer_leaves_train_mode_and_bn_stats():
    model = create_model("resnet18", 2, weights="none").train()
    stats = {k: v.clone() for k, v in model.state_dict().items()}
    find_cam_layer(model)
    assert model.training and all(m.training for m in model.modules())
    for k, v in model.state_dict().items():
        assert torch.equal(v, stats[k]), k


# -- GradCAM: shape, range, side effects -----------------------------------------------------------------


def test_gradcam_shape_range_and_no_side_effects(fitted):
    model, x, _ = fitted
    params = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    cams = GradCAM(model)(x[:4], 1)
    assert cams.shape == (4, SIZE, SIZE) and cams.dtype == np.float32
    assert cams.min() >= 0.0 and cams.max() <= 1.0
    np.testing.assert_allclose(cams.max(axis=(1, 2)), 1.0, rtol=1e-6)  # per-image normalisation
    assert _no_forward_hooks(model)
    assert not any(m.training for m in model.modules())
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())  # no .grad accumulated on parameters
    for k, v in model.state_dict().items():
        assert torch.equal(v, params[k]), k


def test_gradcam_same_under_inference_mode_no_grad_and_channels_last(fitted):
    model, x, _ = fitted
    ref = GradCAM(model)(x[:3], 1)
    with torch.inference_mode():
        inf = GradCAM(model)(torch.from_numpy(x[:3]), 1)  # an inference tensor as input
    with torch.no_grad():
        nog = GradCAM(model)(x[:3], [1, 1, 1])
    cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    chl = GradCAM(cl)(torch.from_numpy(x[:3])[:, None], 1)  # (B, 1, H, W) input too
    for other in (inf, nog, chl):
        np.testing.assert_allclose(other, ref, atol=1e-4)
    assert _no_forward_hooks(model) and _no_forward_hooks(cl)


def test_gradcam_train_mode_model_restored_without_bn_update():
    model = create_model("resnet18", 2, weights="none").train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    GradCAM(model)(np.random.default_rng(0).integers(0, 256, (2, 64, 64), dtype=np.uint8), 0)
    assert all(m.training for m in model.modules())
    for k, v in model.state_dict().items():  # BatchNorm running stats included
        assert torch.equal(v, state[k]), k


def test_gradcam_bad_target_raises_and_removes_hook(fitted):
    model, x, _ = fitted
    cam = GradCAM(model)
    with pytest.raises(ValueError, match="out of range"):
        cam(x[:2], 5)
    with pytest.raises(ValueError, match="one target per image"):
        cam(x[:2], [1])
    assert _no_forward_hooks(model)
    assert cam(x[:0], 1).shape == (0, SIZE, SIZE)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gradcam_cuda_matches_cpu_under_autocast(fitted):
    model, x, _ = fitted
    ref = GradCAM(model)(x[:4], 1)
    gpu = copy.deepcopy(model).cuda().to(memory_format=torch.channels_last)
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
        out = GradCAM(gpu)(torch.from_numpy(x[:4]).cuda(), 1)
    np.testing.assert_allclose(out, ref, atol=2e-2)


# -- GradCAM: does it explain the model? -------------------------------------------------------------------


def test_gradcam_localises_the_blob(fitted):
    model, x, quads = fitted
    cams = GradCAM(model)(x, 1)
    own, other, hottest = _quadrant_means(cams, quads)
    # Blobs sit in two different quadrants, so a map that ignores the image cannot pass this.
    assert (hottest == quads).all(), (hottest, quads)
    assert own.mean() > 2 * other.mean(), (own.mean(), other.mean())
    assert np.median(own / np.maximum(other, 1e-9)) > 2


def test_gradcam_depends_on_target(fitted):
    model, x, quads = fitted
    cams = GradCAM(model)(x, [0] * len(x))
    own, other, _ = _quadrant_means(cams, quads)
    # Evidence for "no tumour" is not on the tumour.
    assert own.mean() < 0.5 * other.mean(), (own.mean(), other.mean())


def test_gradcam_changes_when_head_is_randomised(fitted):
    """Model-parameter randomisation test (Adebayo et al., 2018): a CAM that ignores the weights fails."""
    model, x, _ = fitted
    ref = GradCAM(model)(x, 1).ravel()
    randomised = copy.deepcopy(model)
    corrs = []
    for seed in range(5):
        torch.manual_seed(seed)
        randomised.head[1].reset_parameters()
        cams = GradCAM(randomised)(x, 1).ravel()
        corrs.append(0.0 if cams.std() == 0 else float(np.corrcoef(ref, cams)[0, 1]))
    assert max(corrs) < 0.9 and np.mean(corrs) < 0.5, corrs


def test_gradcam_without_positive_evidence_is_all_zero(fitted):
    model, x, _ = fitted
    negative = copy.deepcopy(model)
    with (
        torch.no_grad()
    ):  # Lite0's last map is post-ReLU6 (>= 0): all-negative weights => no positive evidence
        negative.head[1].weight[1] = -negative.head[1].weight[1].abs() - 1e-3
    cams = GradCAM(negative)(x[:4], 1)
    assert cams.shape == (4, SIZE, SIZE) and not cams.any()  # not min-max stretched noise


# -- overlay_png ---------------------------------------------------------------------------------------------


def _decode(png: bytes) -> Image.Image:
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    img = Image.open(io.BytesIO(png))
    assert img.format == "PNG"
    return img


def test_overlay_png_blends_only_where_cam_is_hot():
    rng = np.random.default_rng(0)
    h, w = 240, 256
    image = rng.integers(0, 256, (h, w), dtype=np.uint8)
    cam = np.zeros((h, w), np.float32)
    cam[40:100, 120:200] = 1.0
    img = _decode(overlay_png(image, cam))
    assert img.mode == "RGB" and img.size == (w, h)
    rgb = np.asarray(img).astype(int)
    cold = np.ones((h, w), bool)
    cold[30:110, 110:210] = False
    # CAM == 0: the plain scan, grey, unchanged.
    assert (rgb[cold] == image[cold][:, None]).all()
    # CAM == 1: visibly tinted (jet at 1.0 is dark red: R dominates, B ~ 0).
    hot = rgb[50:90, 130:190]
    assert (np.abs(hot - image[50:90, 130:190, None]).max(axis=2) > 20).mean() > 0.9
    assert (hot[..., 0] > hot[..., 2]).mean() > 0.9
    # alpha=0 is the plain scan everywhere.
    plain = np.asarray(_decode(overlay_png(image, cam, alpha=0.0))).astype(int)
    assert (plain == image[..., None]).all()


def test_overlay_png_upscales_small_scans_and_draws_caption():
    image = np.full((64, 80), 100, np.uint8)
    cam = np.zeros((32, 40), np.float32)  # coarser CAM: resized to the image
    cam[8:16, 10:20] = 1.0
    bare = _decode(overlay_png(image, cam))
    assert bare.mode == "RGB" and bare.size == (280, 224)  # short side 224, aspect kept
    captioned = _decode(overlay_png(image, cam, caption="tumour 0.97 \u2014 research use only"))
    assert captioned.size == bare.size
    a, b = np.asarray(bare).astype(int), np.asarray(captioned).astype(int)
    diff = np.abs(a - b).max(axis=2) > 0
    ys, xs = np.nonzero(diff)
    assert diff.any() and ys.min() > 224 // 2 and xs.min() < 280 // 4  # bottom-left corner only
    assert diff.mean() < 0.15  # small


def test_overlay_png_rejects_colour_input():
    with pytest.raises(ValueError):
        overlay_png(np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8)))


# -- explain_name ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "unit_id",
    [
        "../../etc/passwd",
        "a/b\\c",
        "/abs/x.png",
        "..",
        "",
        "C:\\evil.dcm",
        "scan\x00.png",
        "\udcff bad bytes",
    ],
)
def test_explain_name_is_safe(unit_id):
    name = explain_name(unit_id)
    assert re.fullmatch(r"[0-9a-f]{20}\.png", name), name
    assert "/" not in name and "\\" not in name and ".." not in name
    assert explain_name(unit_id) == name


def test_explain_name_deterministic_and_distinct():
    ids = ["archive.zip!yes/Y1.jpg", "archive.zip!yes/Y2.jpg", "archive.zip!no/Y1.jpg", "Y1.jpg"]
    names = [explain_name(i) for i in ids]
    assert len(set(names)) == len(ids)
    assert explain_name("archive.zip!yes/Y1.jpg") == names[0]
    # Pinned: stable across processes and versions (SHA-1 of the UTF-8 id).
    assert explain_name("abc") == "a9993e364706816aba3e.png"
