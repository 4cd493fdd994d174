"""Tests for raytumor.explain: CAM layer discovery, Grad-CAM correctness and side effects, PNG overlays, names.

The localisation checks use EfficientNet-Lite0 with its packaged ImageNet weights (no download) and a head
fitted on synthetic scans where "tumour" = a bright blob in the top-left or bottom-right quadrant.
"""

from __future__ import annotations

import copy
import io
import re

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from raytumor.explain import (
    GradCAM,
    InputGeometry,
    cam_peak,
    explain_name,
    find_cam_layer,
    hit_rate,
    localisation_summary,
    overlay_png,
    point_in_mask,
    pointing_game,
)
from raytumor.formats import fit_square
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


# -- pointing game: the Grad-CAM peak against a tumour mask, in the original image's pixels ------------------


def _blob_image(h: int, w: int, cy: int, cx: int, r: int) -> tuple[np.ndarray, np.ndarray]:
    """A dim (h, w) image with a bright disk of radius ``r`` at (cy, cx), and the disk as the mask."""
    yy, xx = np.mgrid[:h, :w]
    disk = (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2
    img = np.full((h, w), 40, np.uint8)
    img[disk] = 250
    return img, disk


def test_peak_maps_back_through_the_padding_of_a_landscape_image():
    """A 60x100 image padded to 100x100 (20 rows above), resized to 32: the bright blob's peak on the model
    input must land on the blob. Scaling the input back to 60x100 without undoing the padding misses it."""
    img, mask = _blob_image(60, 100, cy=6, cx=85, r=5)
    x = fit_square(img, 32)  # what to_model_input does without a crop
    geo = InputGeometry(60, 100, (0, 60, 0, 100), 32)
    row, col = cam_peak(x.astype(np.float32) / 255)
    y, xx = geo.to_source(row, col)
    assert mask[int(y), int(xx)]
    res = pointing_game(x.astype(np.float32) / 255, geo, mask)
    assert res["hit"] and res["in_image"] and res["distance_px"] == 0 and not res["cam_empty"]
    naive_y, naive_x = (row + 0.5) * 60 / 32, (col + 0.5) * 100 / 32  # stretch, padding ignored
    assert not point_in_mask(mask, naive_y, naive_x)[0]


def test_peak_maps_back_through_the_padding_of_a_portrait_image():
    img, mask = _blob_image(90, 40, cy=70, cx=6, r=5)  # padded 25 columns left and right
    x = fit_square(img, 36)
    res = pointing_game(x.astype(np.float32), InputGeometry(90, 40, (0, 90, 0, 40), 36), mask)
    assert res["hit"] and 0 <= res["peak_x"] < 40


def test_peak_maps_back_through_a_crop():
    """The model input is a crop (rows 20:100, columns 10:70) padded to square and resized: the box has to be
    undone too, and forgetting it misses the blob."""
    img, mask = _blob_image(120, 80, cy=30, cx=60, r=4)
    box = (20, 100, 10, 70)
    x = fit_square(np.ascontiguousarray(img[20:100, 10:70]), 40).astype(np.float32)
    res = pointing_game(x, InputGeometry(120, 80, box, 40), mask)
    assert res["hit"] and res["distance_px"] == 0
    no_crop = pointing_game(x, InputGeometry(120, 80, (0, 120, 0, 80), 40), mask)
    assert not no_crop["hit"] and no_crop["distance_px"] > 4


def test_mask_at_another_resolution_is_scaled_and_other_aspect_refused():
    img, mask = _blob_image(60, 100, cy=40, cx=20, r=5)
    big = np.repeat(np.repeat(mask, 2, 0), 2, 1)  # the original was 120x200, decoded at half scale
    x = fit_square(img, 32).astype(np.float32)
    geo = InputGeometry(60, 100, (0, 60, 0, 100), 32)
    res = pointing_game(x, geo, big)
    assert res["hit"] and 60 <= res["peak_y"] < 100 and res["mask_share"] == pytest.approx(mask.mean())
    with pytest.raises(ValueError, match="aspect ratio"):
        pointing_game(x, geo, np.zeros((60, 60), bool))
    with pytest.raises(ValueError, match="model input"):
        pointing_game(x[:16], geo, mask)


def test_tolerance_empty_map_and_centre_baseline():
    mask = np.zeros((50, 50), bool)
    mask[24:27, 24:27] = True  # a small tumour in the middle
    cam = np.zeros((50, 50), np.float32)
    cam[20, 25] = 1.0  # peak 4 rows above it
    geo = InputGeometry(50, 50, (0, 50, 0, 50), 50)
    near = pointing_game(cam, geo, mask, tolerance_px=4.0)
    assert not near["hit"] and near["hit_tolerant"] and near["distance_px"] == pytest.approx(4.0)
    assert not pointing_game(cam, geo, mask, tolerance_px=3.0)["hit_tolerant"]
    assert near["centre_hit"]  # the input's centre (25, 25) is on this mask
    empty = pointing_game(np.zeros((50, 50), np.float32), geo, mask, tolerance_px=100.0)
    assert empty["cam_empty"] and not empty["hit"] and not empty["hit_tolerant"]  # no peak is a miss
    assert point_in_mask(np.zeros((4, 4), bool), 1.0, 1.0) == (False, float("inf"))


def test_peak_in_the_padding_is_a_miss_outside_the_image():
    mask = np.ones((20, 100), bool)  # everything in the image is "tumour"
    cam = np.zeros((10, 10), np.float32)
    cam[0, 5] = 1.0  # top row of the input: padding above a 20x100 image
    res = pointing_game(cam, InputGeometry(20, 100, (0, 20, 0, 100), 10), mask)
    assert not res["in_image"] and not res["hit"] and res["peak_y"] < 0


def test_hit_rate_interval_resamples_patients():
    rng = np.random.default_rng(0)
    per_patient = rng.random(20) < 0.5
    hits = np.repeat(per_patient, 10)  # 20 patients x 10 slices with one outcome each
    patients = np.repeat(np.arange(20), 10)
    grouped, scans = hit_rate(hits, patients, 400, 0), hit_rate(hits, None, 400, 0)
    assert grouped["rate"] == scans["rate"] == pytest.approx(per_patient.mean())
    assert grouped["n"] == 200 and grouped["hits"] == int(hits.sum())
    lo, hi = grouped["ci95"]
    assert lo <= grouped["rate"] <= hi
    assert (hi - lo) > 2 * (scans["ci95"][1] - scans["ci95"][0])  # 20 patients, not 200 scans
    assert hit_rate(np.zeros(0, bool)) == {"n": 0, "hits": 0, "rate": None, "ci95": [None, None]}


def test_localisation_summary_groups_and_counts():
    rows = pd.DataFrame(
        {
            "hit": [True, False, True, True, False, False],
            "hit_tolerant": [True, True, True, True, False, False],
            "centre_hit": [False, False, True, False, False, False],
            "mask_share": [0.1, 0.2, 0.1, 0.3, 0.1, np.nan],
            "head_share": [0.2, 0.4, 0.2, 0.6, 0.2, np.nan],
            "cam_empty": [False, False, False, False, True, False],
            "in_image": [True, True, True, True, False, False],
            "distance_px": [0.0, 3.0, 0.0, 0.0, np.nan, np.nan],
            "patient_id": ["a", "a", "b", "c", "c", "d"],
            "source": "s",
            "sequence": ["flair", "t1c", "flair", "t1c", None, "flair"],
            "called": [True, False, True, True, False, False],
            "error": [None, None, None, None, None, "OSError: gone"],
        }
    )
    s = localisation_summary(rows, n_boot=100)
    assert (s["n"], s["errors"], s["cam_empty"], s["peak_in_padding"]) == (5, 1, 1, 0)
    assert s["hit"]["rate"] == pytest.approx(3 / 5) and s["hit_tolerant"]["rate"] == pytest.approx(4 / 5)
    assert s["centre_hit"]["rate"] == pytest.approx(1 / 5)
    assert s["random_point"] == pytest.approx(0.16) and s["random_point_in_head"] == pytest.approx(0.32)
    assert s["median_distance_px"] == 0.0 and s["ci95_resampling"] == "patients"
    assert set(s["by_sequence"]) == {"flair", "t1c", "unknown"}
    assert s["by_sequence"]["flair"]["hit"]["rate"] == 1.0 and s["by_sequence"]["t1c"]["n"] == 2
    assert s["among_called_tumour"]["n"] == 3 and s["among_called_tumour"]["hit"]["rate"] == 1.0
    assert "in_scope" not in s  # no in_scope column: nothing refused


def test_pointing_game_on_gradcam_of_the_blob_model(fitted):
    """Real Grad-CAM: with the blob's quadrant as the "tumour mask", the peak lands on it far more often than
    the centre point or a random point would."""
    model, x, quads = fitted
    cams = GradCAM(model)(x, 1)
    geo = InputGeometry(SIZE, SIZE, (0, SIZE, 0, SIZE), SIZE)
    results = []
    for cam, q in zip(cams, quads, strict=True):
        mask = np.zeros((SIZE, SIZE), bool)
        mask[q * HALF : (q + 1) * HALF, q * HALF : (q + 1) * HALF] = True
        results.append(pointing_game(cam, geo, mask))
    hits = np.array([r["hit"] for r in results])
    centre = np.array([r["centre_hit"] for r in results])
    assert hits.mean() >= 0.9 and hits.mean() > centre.mean() + 0.3 and hits.mean() > 0.25 + 0.5


def test_a_long_caption_wraps_inside_the_image():
    """The report's scope thumbnails carry reasons longer than a 224 px tile: they wrap, never run off it."""
    from PIL import Image, ImageDraw, ImageFont

    from raytumor.explain import _wrap, overlay_png

    caption = "scan_0001.png  bundle has no scope (too few real training examples)"
    img = Image.new("RGB", (224, 224))
    draw, font = ImageDraw.Draw(img), ImageFont.load_default(size=10)
    lines = _wrap(draw, caption, font, 200)
    assert len(lines) >= 2 and " ".join(lines).split() == caption.split()
    assert all(draw.textlength(line, font=font) <= 200 for line in lines)
    png = Image.open(
        io.BytesIO(overlay_png(np.zeros((96, 96), np.uint8), np.zeros((96, 96)), caption=caption))
    )
    band = np.asarray(png.convert("L"))[-60:]
    # white text on the dark box, on at least two text rows separated by box-only rows
    rows_with_text = np.flatnonzero((band > 200).any(1))
    assert len(rows_with_text) and (np.diff(rows_with_text) > 1).any()
