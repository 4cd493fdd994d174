"""What a bundle may score: its view head, its out-of-distribution reference and its scope.

A 2-D classifier trained on axial brain MRI scores a sagittal slice, a CT or a photograph with the same
confidence as what it knows. The bundle therefore carries, next to the classifier:

* a **view net**: a small CNN (64 px, ~1.5 % of the classifier's forward) trained on slices whose view is
  known from geometry (cut from volumes along each axis, ``raytumor slices --planes``) and on training
  examples whose manifest or header gives the view. A softmax head on the classifier's own pooled features
  was measured first and did not transfer (Br35H called axial 0.86, a held-out TCGA site 0.81, against 0.98
  and 0.92 for the net: ``bench/view_net.py``): the fine-tuned features keep what separates tumour from
  healthy, not the plane;
* an **OOD reference**: class-conditional Gaussians with one shared (Ledoit-Wolf shrunk) covariance over
  the same features (Lee et al. 2018, "Mahalanobis"); an input's OOD score is its distance to the nearest
  training class, and the threshold lets ``quantile`` (~99 %) of in-distribution validation images pass;
* the **scope**: how many real (not synthetic) training examples of each class the model saw per view and
  sequence; a view is in scope only when every class has at least ``min_examples`` of them.

The arrays live in ``heads.pt`` (tensors only, loaded with ``weights_only=True``), the scope in
``bundle.json``. Every rule here is used by training (fit), the predictor (apply) and evaluation alike.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from raytumor.results import OUT_OF_SCOPE
from raytumor.scan import VIEWS

__all__ = [
    "NOT_BRAIN",
    "OUT_OF_SCOPE",
    "HEADS_FILE",
    "Heads",
    "OODReference",
    "Scope",
    "ViewNet",
    "fit_view_net",
    "geometry_views",
]

HEADS_FILE = "heads.pt"
UNKNOWN = "unknown"  # a training example or input whose view nobody could tell
DEFAULT_MODALITIES = ("MR",)
OOD_REASON = "out of distribution"
# The view net's class for slices below the brain (neck, jaw, shoulders): never in scope. Geometry labels it
# for free: axial cuts of a head volume at least NOT_BRAIN_MM below the vertex (an adult's foramen magnum
# lies ~130-140 mm below it, the chin ~200 mm); cuts between AXIAL_MAX_MM and NOT_BRAIN_MM (skull base,
# upper cervical spine) are left out of the view net's training, being neither clearly one nor the other.
NOT_BRAIN = "not_brain"
AXIAL_MAX_MM = 150.0
NOT_BRAIN_MM = 170.0
# The view net calls an input not_brain only this sure of it: a wrong not_brain loses a scan that should
# have been scored. Measured on sets it never trained on (bench/view_net.py, DU fold): at 0.5 / 0.9 / 0.99
# it catches 100 / 100 / 93 % of IXI neck slices and loses 0.8 / 0 / 0 % of Br35H, 1.5 / 0.6 / 0.2 % of
# a held-out TCGA site's axial slices (skull base) and 1.8 / 0.9 / 0.6 % of IXI brain slices.
NOT_BRAIN_MIN_P = 0.9
# No view has enough real examples of every class (e.g. a bundle trained on SYNTHETIC phantoms only).
NOTHING_IN_SCOPE = "bundle has no scope (too few real training examples)"


# ----------------------------------------------------------------------------------------------------------
# View head


VIEW_NET_SIZE = 64  # the view net's input side: plane is a matter of head shape, not detail


def geometry_views(views: Sequence[Any], mm_below_vertex: Sequence[Any] | None) -> list[str | None]:
    """The view net's training label of each slice whose view geometry gave: its plane, or
    :data:`NOT_BRAIN` for an axial cut at least NOT_BRAIN_MM below the vertex; None (left out) for an axial
    cut between AXIAL_MAX_MM and NOT_BRAIN_MM and for anything that names no plane."""
    out: list[str | None] = []
    for i, v in enumerate(views):
        if not isinstance(v, str) or v not in VIEWS:
            out.append(None)
            continue
        try:
            mm = float(mm_below_vertex[i]) if mm_below_vertex is not None else math.nan
        except (TypeError, ValueError):
            mm = math.nan
        if v != "axial" or not math.isfinite(mm) or mm <= AXIAL_MAX_MM:
            out.append(v)
        else:
            out.append(NOT_BRAIN if mm >= NOT_BRAIN_MM else None)
    return out


class ViewNet(torch.nn.Module):
    """A small CNN that tells axial / coronal / sagittal (and, when its training slices reached below the
    skull base, :data:`NOT_BRAIN`) from a (B, 1, S, S) uint8 model input, resized to VIEW_NET_SIZE and
    standardised per image; run next to the classifier (~1 % of its forward)."""

    def __init__(self, views: Sequence[str], width: int = 16):
        super().__init__()
        self.views = list(views)
        self.width = width
        chans = [1, width, 2 * width, 4 * width, 8 * width]
        layers: list[torch.nn.Module] = []
        for a, b in zip(chans[:-1], chans[1:], strict=True):
            layers += [
                torch.nn.Conv2d(a, b, 3, stride=2, padding=1, bias=False), torch.nn.BatchNorm2d(b),
                torch.nn.ReLU(inplace=True),
                torch.nn.Conv2d(b, b, 3, padding=1, bias=False), torch.nn.BatchNorm2d(b),
                torch.nn.ReLU(inplace=True),
            ]  # fmt: skip
        self.body = torch.nn.Sequential(*layers)
        self.fc = torch.nn.Linear(chans[-1], len(self.views))

    @staticmethod
    def prepare(images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """(B, S, S) or (B, 1, S, S) uint8 -> (B, 1, VIEW_NET_SIZE, VIEW_NET_SIZE) float in [0, 1]."""
        x = torch.as_tensor(images)
        if x.ndim == 3:
            x = x.unsqueeze(1)
        x = x.float().div_(255.0)
        return torch.nn.functional.interpolate(x, size=(VIEW_NET_SIZE, VIEW_NET_SIZE), mode="area")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # per-image standardisation: sequences and scanners differ in brightness, not in plane
        mu = x.mean((1, 2, 3), keepdim=True)
        sd = x.std((1, 2, 3), keepdim=True).clamp(min=1e-3)
        return self.fc(self.body((x - mu) / sd).mean((2, 3)))

    @torch.inference_mode()
    def probabilities(self, images: np.ndarray | torch.Tensor) -> np.ndarray:
        """(N, len(views)) softmax probabilities."""
        if len(images) == 0:
            return np.zeros((0, len(self.views)), dtype=np.float32)
        self.eval()
        logits = self(self.prepare(images).to(next(self.parameters()).device))
        return torch.softmax(logits.float(), 1).cpu().numpy()

    def predict(self, images: np.ndarray | torch.Tensor, not_brain_p: float = NOT_BRAIN_MIN_P) -> np.ndarray:
        """View name per image (object array): the most probable view, except that :data:`NOT_BRAIN` (which
        puts an input out of scope) needs at least ``not_brain_p``, else the most probable brain view."""
        p = self.probabilities(images)
        if len(p) and NOT_BRAIN in self.views:
            j = self.views.index(NOT_BRAIN)
            sure = p[:, j] >= not_brain_p  # p is this call's own array: edit it in place
            p[:, j] = np.where(sure, 2.0, -1.0)
        return np.asarray(self.views, dtype=object)[p.argmax(1)] if len(p) else np.zeros(0, dtype=object)


def _view_augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """What other archives change and a plane does not: framing (zoom, shift, small turns, mirror),
    contrast (a random monotone-free intensity curve stands in for other sequences), blur, noise, holes."""
    b = x.shape[0]
    u = lambda *s: torch.rand(*s, generator=g)  # noqa: E731
    ang = (u(b) - 0.5) * (2 * np.pi * 20 / 360)
    scale = 0.7 + 0.6 * u(b)
    flip = torch.where(u(b) < 0.5, -1.0, 1.0)
    cos, sin = torch.cos(ang) / scale, torch.sin(ang) / scale
    theta = torch.stack(
        [torch.stack([cos * flip, -sin, (u(b) - 0.5) * 0.25], 1),
         torch.stack([sin * flip, cos, (u(b) - 0.5) * 0.25], 1)], 1
    )  # fmt: skip
    grid = torch.nn.functional.affine_grid(theta, list(x.shape), align_corners=False)
    x = torch.nn.functional.grid_sample(x, grid, padding_mode="zeros", align_corners=False)
    # intensity curve through 5 knots, background (0) stays dark; half the batch, the rest a gamma
    knots = torch.cat([torch.zeros(b, 1), u(b, 4)], 1).view(b, 5, 1, 1).expand(b, 5, *x.shape[2:])
    pos = x.clamp(0, 1) * 4
    lo = pos.floor().clamp(max=3).long()
    frac = pos - lo
    kl, kh = torch.gather(knots, 1, lo), torch.gather(knots, 1, lo + 1)
    curved = kl + (kh - kl) * frac
    gamma = torch.exp((u(b) - 0.5) * 1.4).view(b, 1, 1, 1)
    x = torch.where((u(b) < 0.5).view(b, 1, 1, 1), curved, x.clamp(min=0) ** gamma)
    blur = (u(b) < 0.3).view(b, 1, 1, 1)
    x = torch.where(blur, torch.nn.functional.avg_pool2d(x, 3, 1, 1), x)
    x = x + torch.randn(x.shape, generator=g) * (0.04 * u(b)).view(b, 1, 1, 1)
    # one random hole per image in a quarter of the batch
    hole = u(b) < 0.25
    for i in torch.nonzero(hole).flatten().tolist():
        h, w = int(8 + 16 * u(1)), int(8 + 16 * u(1))
        y0, x0 = int(u(1) * (x.shape[2] - h)), int(u(1) * (x.shape[3] - w))
        x[i, :, y0 : y0 + h, x0 : x0 + w] = 0
    return x


def fit_view_net(
    images: np.ndarray,
    views: Sequence[str],
    epochs: int = 30,
    batch_size: int = 128,
    lr: float = 3e-3,
    seed: int = 0,
    max_steps: int = 1000,
    min_steps: int = 300,
) -> ViewNet:
    """Train a :class:`ViewNet` on (N, S, S) uint8 inputs with known views (class-balanced batches,
    AdamW with one-cycle decay, :func:`_view_augment` on every batch; 30 epochs within [``min_steps``,
    ``max_steps``] steps, at most ~3 min on two CPU cores)."""
    names = [v for v in VIEWS if v in set(views)] + sorted(set(views) - set(VIEWS))
    if len(names) < 2:
        raise ValueError(f"a view net needs examples of at least 2 views, got {names}")
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    x = ViewNet.prepare(images)
    y = torch.as_tensor([names.index(v) for v in views], dtype=torch.int64)
    net = ViewNet(names)
    counts = torch.bincount(y, minlength=len(names)).clamp(min=1).float()
    weights = (1.0 / counts)[y]
    # a small view set still gets enough augmented batches to learn the planes (~1 min on 2 cores)
    total = max(1, min(max_steps, max(min_steps, epochs * max(1, len(y) // batch_size))))
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total)
    net.train()
    for _ in range(total):
        idx = torch.multinomial(weights, batch_size, replacement=True, generator=g)
        loss = torch.nn.functional.cross_entropy(net(_view_augment(x[idx], g)), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return net.eval()


# ----------------------------------------------------------------------------------------------------------
# Out-of-distribution reference


@dataclass
class OODReference:
    """Per feature layer (the pooled final features, then each tapped stage; ``layout`` their widths): class
    means and a shared precision matrix. A layer's distance is the Mahalanobis distance to the nearest class
    mean divided by its median on the training data, and ``score`` is the largest over layers: an input
    unusual at any depth (a document's flat white page, a photograph's colour texture) stands out even where
    the fine-tuned final features map it near a class."""

    layout: list[int]
    means: list[np.ndarray]  # per layer (C, D_l)
    precisions: list[np.ndarray]  # per layer (D_l, D_l)
    scales: list[float]
    threshold: float = float("inf")

    def __post_init__(self) -> None:
        # precision = L L^T, so (x - mu)^T P (x - mu) = |(x - mu) L|^2: one (N x D)(D x D) matmul per layer for
        # all classes instead of a quadratic form per class (0.38 -> 0.03 of the forward, bench/scope_cost.py).
        self._chol = []
        self._means_z = []
        for m, p in zip(self.means, self.precisions, strict=True):
            p = np.asarray(p, dtype=np.float64)
            c = np.linalg.cholesky((p + p.T) / 2).astype(np.float32)
            self._chol.append(c)
            self._means_z.append(np.asarray(m, dtype=np.float32) @ c)

    def layer_distances(self, features: np.ndarray) -> np.ndarray:
        """(N, layers) Mahalanobis distance to the nearest class mean, per layer, unscaled."""
        f = np.asarray(features, dtype=np.float32)
        out = np.zeros((len(f), len(self.layout)), dtype=np.float32)
        start = 0
        for k, width in enumerate(self.layout):
            z = f[:, start : start + width] @ self._chol[k]
            d2 = ((z[:, None, :] - self._means_z[k][None]) ** 2).sum(-1)
            out[:, k] = np.sqrt(np.maximum(d2.min(1), 0.0))
            start += width
        return out

    def score(self, features: np.ndarray) -> np.ndarray:
        if len(features) == 0:
            return np.zeros(0, dtype=np.float32)
        return (self.layer_distances(features) / np.asarray(self.scales, dtype=np.float32)).max(1)


def ledoit_wolf(x: np.ndarray) -> np.ndarray:
    """Ledoit-Wolf shrunk covariance of centred rows ``x`` (N, D): a well-conditioned estimate when D is
    not small next to N (1,280 features, a few thousand images)."""
    x = np.asarray(x, dtype=np.float64)
    n, d = x.shape
    s = x.T @ x / n
    mu = np.trace(s) / d
    delta = s.copy()
    delta[np.diag_indices(d)] -= mu
    delta2 = (delta**2).sum() / d
    x2 = x**2
    beta2 = ((x2.T @ x2) / n - s**2).sum() / (d * n)
    shrink = min(beta2, delta2) / delta2 if delta2 > 0 else 1.0
    cov = (1 - shrink) * s
    cov[np.diag_indices(d)] += shrink * mu
    return cov


def fit_ood(features: np.ndarray, labels: Sequence[Any], layout: Sequence[int] | None = None) -> OODReference:
    """Per layer of ``layout`` (default: one layer of every column): class means, the tied Ledoit-Wolf
    covariance's inverse, and the median training distance that scales the layer (threshold set by
    :func:`fit_threshold`)."""
    f = np.asarray(features, dtype=np.float64)
    lab = np.asarray(labels)
    layout = [f.shape[1]] if layout is None else [int(w) for w in layout]
    if sum(layout) != f.shape[1]:
        raise ValueError(f"feature layout {layout} does not add up to {f.shape[1]} columns")
    classes = [c for c in np.unique(lab) if (lab == c).sum() >= 2]
    if not classes:
        raise ValueError("an OOD reference needs at least 2 examples of a class")
    means, precisions = [], []
    start = 0
    for width in layout:
        x = f[:, start : start + width]
        mu = np.stack([x[lab == c].mean(0) for c in classes])
        centred = np.concatenate([x[lab == c] - m for c, m in zip(classes, mu, strict=True)])
        means.append(mu.astype(np.float32))
        precisions.append(np.linalg.inv(ledoit_wolf(centred)).astype(np.float32))
        start += width
    ref = OODReference(layout, means, precisions, [1.0] * len(layout))
    med = np.median(ref.layer_distances(f.astype(np.float32)), axis=0)
    ref.scales = [float(m) if m > 0 else 1.0 for m in med]
    return ref


def fit_threshold(in_scores: np.ndarray, quantile: float) -> float:
    """The score below which ``quantile`` of the in-distribution (validation) scores lie."""
    s = np.asarray(in_scores, dtype=np.float64)
    s = s[np.isfinite(s)]
    if not len(s):
        raise ValueError("no finite in-distribution OOD scores to fit a threshold on")
    return float(np.quantile(s, quantile, method="higher"))


# ----------------------------------------------------------------------------------------------------------
# Heads file


@dataclass
class Heads:
    view: ViewNet | None = None
    ood: OODReference | None = None

    def to_tensors(self) -> dict[str, Any]:
        """A ``torch.save``-able dict of tensors and plain types (loads with ``weights_only=True``)."""
        out: dict[str, Any] = {}
        if self.view is not None:
            out["view_net"] = {
                "views": list(self.view.views),
                "width": int(self.view.width),
                "state": {k: v.detach().cpu() for k, v in self.view.state_dict().items()},
            }
        if self.ood is not None:
            out["ood"] = {
                "layout": [int(w) for w in self.ood.layout],
                "means": [torch.from_numpy(np.asarray(m, dtype=np.float32)) for m in self.ood.means],
                "precisions": [
                    torch.from_numpy(np.asarray(p, dtype=np.float32)) for p in self.ood.precisions
                ],
                "scales": [float(x) for x in self.ood.scales],
                "threshold": float(self.ood.threshold),
            }
        return out

    @classmethod
    def from_tensors(cls, d: Mapping[str, Any]) -> Heads:
        view = ood = None
        if "view" in d:  # the feature head of pre-release bundles
            raise ValueError("heads.pt holds a pre-release view head: retrain the bundle with this raytumor")
        if "view_net" in d:
            v = d["view_net"]
            view = ViewNet(list(v["views"]), int(v["width"]))
            view.load_state_dict(v["state"])
            view.eval()
        if "ood" in d:
            o = d["ood"]
            ood = OODReference(
                list(o["layout"]), [m.numpy() for m in o["means"]], [p.numpy() for p in o["precisions"]],
                list(o["scales"]), float(o["threshold"]),
            )  # fmt: skip
        return cls(view, ood)

    def save(self, path: Any) -> None:
        torch.save(self.to_tensors(), path)

    @classmethod
    def load(cls, path: Any) -> Heads:
        return cls.from_tensors(torch.load(path, map_location="cpu", weights_only=True))


# ----------------------------------------------------------------------------------------------------------
# Scope


@dataclass
class Scope:
    """What the bundle was trained on and therefore may score (``bundle.json``'s ``scope``).

    ``counts``: {"view": {view: {class: n}}, "sequence": {seq: {class: n}}} over the real training split;
    ``synthetic``: training examples from synthetic sources (never counted towards scope)."""

    classes: list[str]
    counts: dict[str, dict[str, dict[str, int]]] = field(default_factory=dict)
    synthetic: int = 0
    min_examples: int = 50
    modalities: list[str] = field(default_factory=lambda: list(DEFAULT_MODALITIES))
    ood_threshold: float | None = None
    ood_quantile: float | None = None
    view_head: bool = False

    def in_scope_values(self, kind: str) -> list[str]:
        """Values of ``kind`` (view/sequence) with >= min_examples real examples of every class
        (:data:`NOT_BRAIN` never: it is what the model must not score)."""
        table = self.counts.get(kind, {})
        return sorted(
            v for v, per in table.items()
            if v != NOT_BRAIN and all(int(per.get(c, 0)) >= self.min_examples for c in self.classes)
        )  # fmt: skip

    @property
    def views(self) -> list[str]:
        return self.in_scope_values("view")

    def to_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "views_in_scope": self.views,
            "sequences_in_scope": self.in_scope_values("sequence"),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> Scope | None:
        # A training run's staging bundle holds only the heads' hash until its scope is counted.
        if not d or "classes" not in d:
            return None
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in known})

    def check(
        self, views: Sequence[Any], modalities: Sequence[Any], ood: np.ndarray, gate_views: bool = True
    ) -> tuple[np.ndarray, list[str | None]]:
        """(in_scope, reason) per input: a non-MR DICOM modality, a view the model has not seen both classes
        of (``unknown`` when no one could tell the view; skipped with ``gate_views=False``), or an OOD score
        above the threshold. The first failing rule is the reason."""
        ok_views = set(self.views)
        allowed = {m.upper() for m in self.modalities}
        n = len(views)
        ood = np.asarray(ood, dtype=np.float64)
        keep = np.ones(n, dtype=bool)
        reasons: list[str | None] = [None] * n
        for i in range(n):
            m, v = modalities[i], views[i]
            view = v if isinstance(v, str) and v else UNKNOWN
            if isinstance(m, str) and m and m.upper() not in allowed:
                reasons[i] = f"modality {m.upper()}"
            elif view == NOT_BRAIN:  # whatever the bundle's scope: no brain to score
                reasons[i] = "not brain (view net)"
            elif gate_views and not ok_views:
                reasons[i] = NOTHING_IN_SCOPE
            elif gate_views and view not in ok_views:
                reasons[i] = f"view {view}"
            elif self.ood_threshold is not None and np.isfinite(ood[i]) and ood[i] > self.ood_threshold:
                reasons[i] = OOD_REASON
            keep[i] = reasons[i] is None
        return keep, reasons


def count_scope(
    labels: Sequence[str], views: Sequence[Any], sequences: Sequence[Any] | None, synthetic: Sequence[bool]
) -> tuple[dict[str, dict[str, dict[str, int]]], int]:
    """({"view": {view: {class: n}}, "sequence": ...}, synthetic count) over training examples; an
    example's missing view counts as ``unknown``; sequences only where known."""
    out: dict[str, dict[str, dict[str, int]]] = {"view": {}, "sequence": {}}
    n_syn = 0
    for i, lab in enumerate(labels):
        if synthetic[i]:
            n_syn += 1
            continue
        v = views[i] if isinstance(views[i], str) and views[i] else UNKNOWN
        per = out["view"].setdefault(v, {})
        per[str(lab)] = per.get(str(lab), 0) + 1
        if sequences is not None and isinstance(sequences[i], str) and sequences[i]:
            per = out["sequence"].setdefault(sequences[i], {})
            per[str(lab)] = per.get(str(lab), 0) + 1
    return out, n_syn
