"""Tests for raytumor.adapt: exact mergeable BN statistics, AdaBN schedules, flip TTA.

No Ray, no network. The shift-benefit check uses the real Br35H images when ../shared/data has them.
"""

from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest
import torch
from torch import nn

from raytumor.adapt import (
    BNStatsAccumulator,
    adapt_bn,
    adaptation_passes,
    apply_bn_state,
    bn_execution_order,
    bn_layers,
    flip_tta_probs,
    has_batchnorm,
    merge_states,
)
from raytumor.model import create_model
from raytumor.predict import forward_probs

CPU = torch.device("cpu")


# One intra-op thread (see conftest.one_torch_thread).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


class Tiny(nn.Module):
    """Conv-BN-ReLU x3 -> pool -> Linear -> BN1d: 2-D and 1-D BN, deep enough for the upstream subtlety."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 4, 3),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.Conv2d(4, 6, 3),
            nn.BatchNorm2d(6),
            nn.ReLU(),
            nn.Conv2d(6, 5, 3, padding=1),
            nn.BatchNorm2d(5),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.fc = nn.Linear(5, 7)
        self.bn_out = nn.BatchNorm1d(7)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn_out(self.fc(self.features(x)))


def tiny_model(seed: int = 0) -> Tiny:
    """Random weights and *source* running statistics far from what the target data produces."""
    torch.manual_seed(seed)
    m = Tiny()
    with torch.no_grad():
        for bn in bn_layers(m).values():
            bn.running_mean.uniform_(-2, 2)
            bn.running_var.uniform_(0.2, 3)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    return m.eval()


def target_batches(sizes=(7, 16, 3, 11, 9), seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 1, 12, 12, generator=g) * 1.7 + 0.8 for n in sizes]


def direct_stats(model: nn.Module, x: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Mean / unbiased var of every BN layer's input for one eval forward over ``x``, by plain torch ops."""
    inputs: dict[str, torch.Tensor] = {}
    handles = [
        m.register_forward_pre_hook(lambda _m, a, n=n: inputs.__setitem__(n, a[0].detach().double()))
        for n, m in bn_layers(model).items()
    ]
    with torch.no_grad():
        model.eval()(x)
    for h in handles:
        h.remove()
    out = {}
    for n, t in inputs.items():
        flat = t.transpose(0, 1).reshape(t.shape[1], -1)
        out[n] = (flat.mean(1), torch.var(flat, dim=1, unbiased=True))
    return out


def assert_stats_close(a, b, rtol=1e-6, atol=1e-8) -> None:
    assert a.keys() == b.keys()
    for n in a:
        for x, y in zip(a[n], b[n], strict=True):
            torch.testing.assert_close(x.double(), y.double(), rtol=rtol, atol=atol, msg=n)


def train_mode_reference(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """Independent AdaBN target: train-mode BN over ALL target data as one batch with momentum=None, so
    every layer normalises with the population statistics of its (already adapted) input."""
    ref = copy.deepcopy(model)
    for bn in bn_layers(ref).values():
        bn.reset_running_stats()
        bn.momentum = None
    ref.train()
    with torch.no_grad():
        ref(x)
    return ref.eval()


def bn_buffers(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {n: (bn.running_mean.clone(), bn.running_var.clone()) for n, bn in bn_layers(model).items()}


# -- exactness / mergeability --------------------------------------------------------------------------


def test_running_upstream_stats_equal_direct_computation_in_any_order_and_split():
    model = tiny_model()
    batches = target_batches()
    direct = direct_stats(model, torch.cat(batches))

    whole = BNStatsAccumulator(model, upstream="running").update(torch.cat(batches))
    streamed = BNStatsAccumulator(model, upstream="running")
    for b in batches:
        streamed.update(b)
    reverse = BNStatsAccumulator(model, upstream="running")
    for b in reversed(batches):
        reverse.update(b)
    # Two workers, states shipped through pickle like Ray would, merged on the driver in both orders.
    w1, w2 = BNStatsAccumulator(model, upstream="running"), BNStatsAccumulator(model, upstream="running")
    for b in batches[::2]:
        w1.update(b)
    for b in batches[1::2]:
        w2.update(b)
    s1, s2 = pickle.loads(pickle.dumps(w1.state())), pickle.loads(pickle.dumps(w2.state()))
    merged_12 = BNStatsAccumulator.from_state(merge_states([s1, s2]))
    merged_21 = BNStatsAccumulator.from_state(s2).merge(BNStatsAccumulator.from_state(s1))

    assert len(direct) == 4
    for acc in (whole, streamed, reverse, merged_12, merged_21):
        assert acc.images_seen == 46
        assert_stats_close(acc.running_stats(), direct, rtol=1e-5, atol=1e-7)
    # Streaming vs merging: identical up to float64 rounding, not just float32.
    assert_stats_close(streamed.running_stats(), merged_12.running_stats(), rtol=1e-12, atol=1e-12)
    assert_stats_close(streamed.running_stats(), reverse.running_stats(), rtol=1e-12, atol=1e-12)
    # The source statistics were far from these: the comparison above is not vacuous.
    src_mean = bn_layers(model)["features.1"].running_mean.double()
    assert (src_mean - direct["features.1"][0]).abs().max() > 0.1


def test_batch_upstream_is_mergeable_and_order_independent():
    model = tiny_model()
    batches = target_batches()
    one = BNStatsAccumulator(model)  # upstream="batch" (default)
    for b in batches:
        one.update(b)
    rev = BNStatsAccumulator(model)
    for b in reversed(batches):
        rev.update(b)
    a, b_ = BNStatsAccumulator(model), BNStatsAccumulator(model)
    for b in batches[:2]:
        a.update(b)
    for b in batches[2:]:
        b_.update(b)
    merged = BNStatsAccumulator.from_state(b_.state()).merge(a.state())
    assert_stats_close(one.running_stats(), rev.running_stats(), rtol=1e-12, atol=1e-12)
    assert_stats_close(one.running_stats(), merged.running_stats(), rtol=1e-12, atol=1e-12)
    # The first BN layer has nothing upstream: every method measures it exactly.
    direct = direct_stats(model, torch.cat(batches))
    torch.testing.assert_close(
        one.running_stats()["features.1"][1], direct["features.1"][1], rtol=1e-5, atol=0
    )


def test_state_is_plain_and_validated():
    model = tiny_model()
    acc = BNStatsAccumulator(model).update(target_batches()[0])
    state = acc.state()
    assert state["version"] == 1 and state["images_seen"] == 7
    for layer in state["layers"].values():
        assert isinstance(layer["count"], int)
        assert layer["mean"].dtype == torch.float64 and layer["mean"].device.type == "cpu"
    with pytest.raises(ValueError, match="version"):
        BNStatsAccumulator(None).merge({**state, "version": 99})
    with pytest.raises(RuntimeError, match="no model"):
        BNStatsAccumulator.from_state(state).update(target_batches()[0])
    with pytest.raises(ValueError, match="does not have"):
        acc.apply(create_model("resnet18", 2, weights="none"))
    with pytest.raises(ValueError, match="no BN statistics"):
        BNStatsAccumulator(None).apply(model)


# -- AdaBN on the real classifier ----------------------------------------------------------------------


def test_adabn_sets_target_stats_and_leaves_every_parameter_bit_identical():
    torch.manual_seed(0)
    model = create_model("resnet18", 2, weights="none").eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(3)
    images = [torch.randint(40, 200, (6, 40, 40), generator=g, dtype=torch.uint8) for _ in range(3)]

    adapted = adapt_bn(model, images)

    assert adapted is not model
    for k, v in model.state_dict().items():  # the source model is untouched
        assert torch.equal(v, before[k]), k
    adapted_sd = adapted.state_dict()
    bn_keys = {f"{n}.{b}" for n in bn_layers(model) for b in ("running_mean", "running_var")}
    assert len(bn_keys) == 2 * 20
    for k, v in before.items():
        if k in bn_keys:
            assert not torch.allclose(adapted_sd[k], v), f"{k} was not re-estimated"
        else:  # weights, BN affine, num_batches_tracked, input normalisation buffers
            assert torch.equal(adapted_sd[k], v), k
    for (n, p), (n2, p2) in zip(model.named_parameters(), adapted.named_parameters(), strict=True):
        assert n == n2 and torch.equal(p, p2) and p.data_ptr() != p2.data_ptr()
    # Stem BN = statistics of conv1 over the target images, computed directly.
    direct = direct_stats(model, torch.cat(images))["backbone.bn1"]
    torch.testing.assert_close(adapted.backbone.bn1.running_mean.double(), direct[0], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(adapted.backbone.bn1.running_var.double(), direct[1], rtol=1e-4, atol=1e-6)
    assert not adapted.training


def test_layernorm_model_is_a_documented_no_op():
    convnext = create_model("convnext_tiny", 2, weights="none").eval()
    assert not has_batchnorm(convnext)
    assert has_batchnorm(create_model("efficientnet_lite0", 2, weights="none"))
    images = [np.full((2, 32, 32), 77, np.uint8)]
    assert adaptation_passes(convnext, "sequential", images[0]) == []
    acc = BNStatsAccumulator(convnext).update(images[0])
    assert acc.stats == {} and acc.images_seen == 0  # no forward pass was spent
    adapted = adapt_bn(convnext, images)
    assert adapted is not convnext
    for (k, v), (k2, v2) in zip(convnext.state_dict().items(), adapted.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(v, v2)


# -- the upstream subtlety -----------------------------------------------------------------------------


def test_sequential_matches_train_mode_reference_and_naive_does_not():
    model = tiny_model()
    batches = target_batches(sizes=(40, 25, 35))
    reference = bn_buffers(train_mode_reference(model, torch.cat(batches)))

    passes = adaptation_passes(model, "sequential", batches[0])
    assert [p["layers"] for p in passes] == [["features.1"], ["features.4"], ["features.7"], ["bn_out"]]
    sequential = bn_buffers(adapt_bn(model, batches, method="sequential"))
    # Tolerance only for the reference normalising with the biased variance (n = 100 for bn_out).
    assert_stats_close(sequential, reference, rtol=2e-2, atol=1e-4)
    assert_stats_close({"f": sequential["features.4"]}, {"f": reference["features.4"]}, rtol=1e-4, atol=1e-6)

    naive = bn_buffers(adapt_bn(model, batches, method="naive"))
    torch.testing.assert_close(naive["features.1"], reference["features.1"], rtol=1e-4, atol=1e-6)
    deeper_err = max((naive[n][0] - reference[n][0]).abs().max().item() for n in ("features.4", "features.7"))
    assert deeper_err > 0.1, "source statistics upstream should visibly bias the deeper layers"

    with pytest.raises(TypeError, match="iterator"):
        adapt_bn(model, iter(batches), method="sequential")


def test_sequential_exact_on_efficientnet_lite_and_batch_method_close():
    """Real architecture (timm BatchNormAct, residuals): the 49-sweep schedule equals the reference."""
    torch.manual_seed(0)
    model = create_model("efficientnet_lite0", 2, weights="imagenet").eval()
    g = torch.Generator().manual_seed(5)
    # Dark, low-contrast "scanner": far from ImageNet statistics.
    images = (torch.rand(24, 64, 64, generator=g) ** 2 * 120).to(torch.uint8)
    batches = [images[:12], images[12:]]
    reference = bn_buffers(train_mode_reference(model, images))
    order = bn_execution_order(model, images)
    assert len(order) == 49 and set(order) == set(bn_layers(model))

    adapted = adapt_bn(model, batches, method="sequential")
    sequential = bn_buffers(adapted)
    batch = bn_buffers(adapt_bn(model, batches, method="batch"))
    naive = bn_buffers(adapt_bn(model, batches, method="naive"))

    def worst_mean_error(stats, ref) -> float:  # in units of the reference channel std
        return max(((stats[n][0] - ref[n][0]).abs() / (ref[n][1].sqrt() + 1e-3)).max().item() for n in order)

    # Defining property of exact AdaBN: the adapted model's BN statistics are those of the inputs it feeds
    # its BN layers (checked by a plain eval forward and torch.var).
    own = {n: (m.float(), v.float()) for n, (m, v) in direct_stats(adapted, images).items()}
    assert worst_mean_error(sequential, own) < 1e-3  # measured 1.8e-5
    # vs train mode, which normalises with the *biased* variance: deep layers see 2x2 x 24 = 96 values per
    # channel, so a ~0.5 % scale difference compounds with depth (measured 0.035 std).
    assert worst_mean_error(sequential, reference) < 0.1
    # Tiny batches (12 images, 2x2 maps at the end) are the worst case for "batch" (measured 4.0 std, vs
    # 22 std for source statistics upstream).
    assert worst_mean_error(naive, reference) > 2 * worst_mean_error(batch, reference)


# -- does it help under a scanner shift? ---------------------------------------------------------------


def _load_br35h(root, per_class: int, size: int = 96) -> tuple[np.ndarray, np.ndarray]:
    from raytumor.formats import decode_image, fit_square

    rng = np.random.default_rng(0)
    images, labels = [], []
    for label, cls in ((1, "yes"), (0, "no")):
        files = sorted((root / cls).iterdir())
        for i in rng.choice(len(files), per_class, replace=False):
            images.append(fit_square(decode_image(files[i].read_bytes(), draft_size=size).pixels, size))
            labels.append(label)
    return np.stack(images), np.asarray(labels)


def _scanner_shift(
    x: np.ndarray, gamma: float = 2.0, contrast: float = 0.6, offset: float = 30.0
) -> np.ndarray:
    """Another scanner / protocol: gamma, reduced contrast and a raised floor on the 0..255 intensities."""
    f = (x.astype(np.float32) / 255.0) ** gamma * contrast + offset / 255.0
    return np.clip(np.round(f * 255.0), 0, 255).astype(np.uint8)


def _features(model, x: np.ndarray) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat(
            [model.forward_features(torch.as_tensor(x[i : i + 50])) for i in range(0, len(x), 50)]
        )


def _fit_logistic(f: torch.Tensor, y: np.ndarray, l2: float = 1e-2):
    mu, sd = f.mean(0), f.std(0) + 1e-6
    z = (f - mu) / sd
    w = torch.zeros(f.shape[1], requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    yt = torch.as_tensor(y, dtype=torch.float32)
    opt = torch.optim.LBFGS([w, b], max_iter=200)

    def closure():
        opt.zero_grad()
        loss = nn.functional.binary_cross_entropy_with_logits(z @ w + b, yt) + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return lambda g: (((g - mu) / sd) @ w + b).detach().numpy()


def _auc(y: np.ndarray, s: np.ndarray) -> float:
    ranks = np.empty(len(s))
    ranks[np.argsort(s, kind="stable")] = np.arange(1, len(s) + 1)
    n1 = int(y.sum())
    n0 = len(y) - n1
    return float((ranks[y == 1].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def test_adabn_recovers_auc_lost_to_an_intensity_shift(br35h, capsys):
    """Source model: frozen ImageNet EfficientNet-Lite0 with source-adapted BN + logistic head on Br35H.
    Target: the held-out half after a gamma/contrast/offset shift. AdaBN sees only unlabelled target images.
    """
    x, y = _load_br35h(br35h, per_class=90)
    base = create_model("efficientnet_lite0", 2, weights="imagenet").eval()
    rows = []
    for seed in range(3):
        perm = np.random.default_rng(seed).permutation(len(x))
        tr, te = perm[: len(x) // 2], perm[len(x) // 2 :]
        # A model trained at the source hospital carries the source's BN statistics.
        source = adapt_bn(base, [x[tr][i : i + 45] for i in range(0, len(tr), 45)])
        head = _fit_logistic(_features(source, x[tr]), y[tr])
        target = _scanner_shift(x[te])
        adapted = adapt_bn(source, [target[i : i + 45] for i in range(0, len(te), 45)])
        auc_src = _auc(y[te], head(_features(source, x[te])))
        auc_shift = _auc(y[te], head(_features(source, target)))
        auc_ada = _auc(y[te], head(_features(adapted, target)))
        rows.append((auc_src, auc_shift, auc_ada))
    with capsys.disabled():
        print(
            "\nAUC source / shifted / shifted+AdaBN per seed:", [tuple(round(a, 3) for a in r) for r in rows]
        )
    for auc_src, auc_shift, auc_ada in rows:
        assert auc_src - auc_shift > 0.05, "the shift should hurt, else the check is vacuous"
        assert auc_ada - auc_shift > 0.03
    drop = np.mean([r[0] - r[1] for r in rows])
    gain = np.mean([r[2] - r[1] for r in rows])
    assert gain > 0.3 * drop


# -- flip TTA ------------------------------------------------------------------------------------------


def test_flip_tta_is_the_mean_of_both_views_and_flip_invariant():
    torch.manual_seed(0)
    model = create_model("resnet18", 3, weights="none").eval()
    images = np.random.default_rng(0).integers(0, 256, (4, 32, 32), dtype=np.uint8)
    images[:, :, :10] = 0  # asymmetric, so the two views really differ

    p = flip_tta_probs(model, images, CPU)
    p_orig = forward_probs(model, images, CPU)
    p_flip = forward_probs(model, np.ascontiguousarray(images[:, :, ::-1]), CPU)
    assert (p_orig - p_flip).abs().max() > 1e-4
    torch.testing.assert_close(p, (p_orig + p_flip) / 2, rtol=0, atol=1e-6)
    torch.testing.assert_close(p.sum(1), torch.ones(4), rtol=0, atol=1e-5)
    torch.testing.assert_close(flip_tta_probs(model, images[:, :, ::-1], CPU), p, rtol=0, atol=1e-6)
    # Temperature goes through to forward_probs; (B, 1, H, W) tensors work as well.
    p_t = flip_tta_probs(model, torch.as_tensor(images).unsqueeze(1), CPU, temperature=2.0)
    assert p_t.shape == (4, 3) and (p_t.max(1).values <= p.max(1).values + 1e-6).all()


def test_apply_bn_state_accepts_partial_states():
    model = tiny_model()
    acc = BNStatsAccumulator(model, layers=["features.1"]).update(target_batches()[0])
    assert set(acc.stats) == {"features.1"}
    adapted = apply_bn_state(model, acc.state())
    assert torch.equal(adapted.bn_out.running_mean, model.bn_out.running_mean)
    assert not torch.equal(adapted.features[1].running_mean, model.features[1].running_mean)
