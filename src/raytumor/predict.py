"""Predictor: a model bundle that loads itself (local or ``s3://``/``gs://``) and turns scans into scores.

The one inference path: ``raytumor evaluate``'s actors (:meth:`Predictor.__call__` over Ray Data batches),
``raytumor score``'s actors and AdaBN pass (``raytumor.score.actors``), and the report's Grad-CAM gallery all
build on it, so bytes -> model input -> probabilities -> tumour score -> label is written once.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from raytumor.bundle import LoadedBundle, fetch_bundle, load_bundle
from raytumor.metrics import nonfinite_rows, predict_labels, tumour_score
from raytumor.model import fuse_for_inference
from raytumor.preprocess import model_inputs
from raytumor.scan import DecodedScan, ok_mask
from raytumor.scope import OUT_OF_SCOPE, Scope

# The error of a row the model answered with NaN/inf (broken weights, an overflow): never a class.
NONFINITE_ERROR = "non-finite score: the model produced NaN/inf (broken weights or temperature?)"


def forward_outputs(
    model: torch.nn.Module,
    images: np.ndarray | torch.Tensor,
    device: torch.device,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(softmax probabilities, features) for a (B, H, W) uint8 batch in one forward pass: channels_last,
    bf16 autocast on CUDA. The features (pooled backbone features, then the pooled intermediate stages of
    :meth:`~raytumor.model.TumorClassifier.forward_with_taps`) feed the OOD score."""
    x = torch.as_tensor(images)
    if x.ndim == 3:
        x = x.unsqueeze(1)
    if device.type == "cuda":
        x = x.pin_memory().to(device, non_blocking=True)
    x = x.to(device).contiguous(memory_format=torch.channels_last)
    with (
        torch.inference_mode(),
        torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"),
    ):
        logits, feats, _ = model.forward_with_taps(x)
    return torch.softmax(logits.float() / temperature, dim=1).cpu(), feats.float().cpu()


def forward_probs(
    model: torch.nn.Module,
    images: np.ndarray | torch.Tensor,
    device: torch.device,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Softmax probabilities for a (B, H, W) uint8 batch (:func:`forward_outputs` without the features)."""
    return forward_outputs(model, images, device, temperature)[0]


@dataclass
class Assessment:
    """Per input: the view and where it came from, the OOD score, and whether the bundle may score it."""

    view: list[str | None]
    view_source: list[str | None]
    ood_score: np.ndarray
    in_scope: np.ndarray
    scope_reason: list[str | None]

    def columns(self) -> dict[str, Any]:
        return {
            "view": self.view,
            "view_source": self.view_source,
            "ood_score": self.ood_score,
            "in_scope": self.in_scope,
            "scope_reason": self.scope_reason,
        }


class Predictor:
    """A loaded bundle and the steps of inference; also a Ray Data ``map_batches`` callable over batches
    with an ``image`` column (adds ``prob_<class>``, ``score``, ``pred`` and the :class:`Assessment`
    columns; ``features=True`` also the pooled features, for fitting the bundle's heads)."""

    def __init__(
        self,
        bundle_dir: str | os.PathLike,
        device: str | None = None,
        num_threads: int | None = None,
        storage: Any = None,
        features: bool = False,
    ):
        if num_threads:
            torch.set_num_threads(num_threads)
        self.bundle: LoadedBundle = load_bundle(fetch_bundle(bundle_dir, storage), device=device)
        self.meta = self.bundle.meta
        self.heads = self.bundle.heads
        self.scope: Scope = self.bundle.scope or Scope(classes=list(self.meta.classes), counts={})
        self.scope_recorded = self.bundle.scope is not None
        self.with_features = features

    @classmethod
    def from_bundle(cls, uri: str | os.PathLike, **kwargs: Any) -> Predictor:
        """The bundle at a local path or a bucket URI (fetched once per node into a local cache)."""
        return cls(uri, **kwargs)

    def inputs(self, data: bytes, **kwargs: Any) -> tuple[np.ndarray, DecodedScan]:
        """Scan bytes -> (K, S, S) uint8 model inputs with this bundle's size and preprocessing
        (:func:`raytumor.preprocess.model_inputs`; ``volumes=True`` to keep a volume's slices)."""
        return model_inputs(data, self.meta.image_size, self.meta.preprocess, **kwargs)

    def predict_probs(self, images: np.ndarray) -> np.ndarray:
        return self.predict(images)[0]

    @property
    def inference_model(self) -> torch.nn.Module:
        """The bundle's model with BatchNorm folded into its convolutions (:func:`fuse_for_inference`: the
        same outputs, faster); built on first use, and again once ``bundle.model`` is replaced (AdaBN swaps
        in a copy with the archive's statistics)."""
        model = self.bundle.model
        if getattr(self, "_fused_from", None) is not model:
            self._fused, self._fused_from = fuse_for_inference(model), model
        return self._fused

    def predict(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(probabilities, pooled features) of a (B, S, S) uint8 batch."""
        p, f = forward_outputs(self.inference_model, images, self.bundle.device, self.meta.temperature)
        return p.numpy(), f.numpy()

    def feature_layout(self) -> list[int]:
        """Widths of the parts of :meth:`predict`'s features (pooled final features, then each tap)."""
        if not hasattr(self, "_layout"):
            size = self.meta.image_size
            x = torch.zeros((1, 1, size, size), device=self.bundle.device)
            with torch.inference_mode():
                self._layout = self.bundle.model.forward_with_taps(
                    x.contiguous(memory_format=torch.channels_last)
                )[2]
        return self._layout

    def ood_scores(self, features: np.ndarray) -> np.ndarray:
        """OOD score per row (NaN without an OOD reference in the bundle)."""
        if self.heads.ood is None:
            return np.full(len(features), np.nan, dtype=np.float32)
        return self.heads.ood.score(features)

    def assess(
        self,
        ood: np.ndarray,
        model_views: Sequence[Any] | None,
        header_views: Sequence[Any] | None = None,
        modalities: Sequence[Any] | None = None,
        ok: np.ndarray | None = None,
    ) -> Assessment:
        """View (the header's when it has one, else the view net's), scope and reason per unit; units that
        are not ``ok`` (decode errors) get nulls."""
        n = len(ood)
        ok = np.ones(n, dtype=bool) if ok is None else np.asarray(ok, dtype=bool)
        views: list[str | None] = [None] * n
        source: list[str | None] = [None] * n
        for i in range(n):
            hv = header_views[i] if header_views is not None else None
            mv = model_views[i] if model_views is not None else None
            if isinstance(hv, str) and hv:
                views[i], source[i] = hv, "header"
            elif isinstance(mv, str) and mv:
                views[i], source[i] = mv, "model"
        mods = list(modalities) if modalities is not None else [None] * n
        # No scope recorded (an older bundle): only the modality rule applies.
        keep, reasons = self.scope.check(views, mods, ood, gate_views=self.scope_recorded)
        in_scope = np.where(ok, keep, False)
        reasons = [r if ok[i] else None for i, r in enumerate(reasons)]
        return Assessment(
            view=[v if ok[i] else None for i, v in enumerate(views)],
            view_source=[s if ok[i] else None for i, s in enumerate(source)],
            ood_score=np.where(ok, ood, np.nan).astype(np.float32),
            in_scope=in_scope,
            scope_reason=reasons,
        )

    def label_names(
        self, pred: np.ndarray, ok: np.ndarray, in_scope: np.ndarray, score_out_of_scope: bool = False
    ) -> list[str | None]:
        """Class name per unit, ``out_of_scope`` where the bundle may not score it (unless the user asked to
        score out-of-scope inputs anyway), None for decode errors and rows without a class (``pred`` -1)."""
        return [
            None if not ok[i] or pred[i] < 0
            else OUT_OF_SCOPE if not (in_scope[i] or score_out_of_scope)
            else self.meta.classes[int(pred[i])]
            for i in range(len(pred))
        ]  # fmt: skip

    def model_views(self, images: np.ndarray, ok: np.ndarray | None = None) -> np.ndarray | None:
        """The bundle's view net's call per (B, S, S) uint8 input (None for rows not ``ok``; None without a
        view net)."""
        if self.heads.view is None:
            return None
        ok = np.ones(len(images), dtype=bool) if ok is None else np.asarray(ok, dtype=bool)
        out = np.full(len(images), None, dtype=object)
        if ok.any():
            out[ok] = self.heads.view.predict(np.asarray(images)[ok])
        return out

    def scores(self, probs: np.ndarray) -> np.ndarray | None:
        """Tumour score per row (float32), or None when the bundle's classes define none."""
        s = tumour_score(probs, self.meta.classes, self.meta.negative_class)
        return None if s is None else np.asarray(s, dtype=np.float32)

    def nonfinite(self, probs: np.ndarray, score: np.ndarray | None) -> np.ndarray:
        """Rows the model answered with NaN/inf (:data:`NONFINITE_ERROR` rows)."""
        return nonfinite_rows(probs, score)

    def labels(
        self, probs: np.ndarray, score: np.ndarray | None, threshold: float | None = None
    ) -> np.ndarray:
        """Class index per row at the bundle's operating threshold (or ``threshold``); -1 where the
        probabilities or score are not finite."""
        if score is None:
            score = np.full(len(probs), np.nan, dtype=np.float32)
        thr = self.meta.threshold if threshold is None else threshold
        return predict_labels(probs, score, self.meta.classes, self.meta.negative_class, thr)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images = batch.pop("image")
        n = len(images)
        ok = ok_mask(batch["error"]) if "error" in batch else np.ones(n, dtype=bool)
        probs = np.full((n, self.meta.num_classes), np.nan, dtype=np.float32)
        feats = np.zeros((n, 0), dtype=np.float32)
        if ok.any():
            p, f = self.predict(images[ok])
            probs[ok] = p
            feats = np.zeros((n, f.shape[1]), dtype=np.float32)
            feats[ok] = f
        ood = self.ood_scores(feats) if feats.shape[1] else np.full(n, np.nan, dtype=np.float32)
        mv = self.model_views(images, ok)
        a = self.assess(ood, mv, batch.get("view_header"), batch.get("modality"), ok)
        batch.update(
            {k: np.asarray(v, dtype=object) if isinstance(v, list) else v for k, v in a.columns().items()}
        )
        if self.with_features:
            batch["features"] = feats
            batch["model_view"] = mv if mv is not None else np.full(n, None, dtype=object)
        for i, c in enumerate(self.meta.classes):
            batch[f"prob_{c}"] = probs[:, i]
        score = self.scores(probs)
        batch["score"] = np.full(n, np.nan, dtype=np.float32) if score is None else score
        batch["pred"] = np.where(ok, self.labels(probs, score), -1).astype(np.int64)
        bad = ok & self.nonfinite(probs, score)
        if bad.any():  # an error row (evaluation drops it), not a prediction
            errors = batch["error"] if "error" in batch else np.full(n, None, dtype=object)
            batch["error"] = np.where(bad, NONFINITE_ERROR, np.asarray(errors, dtype=object)).astype(object)
        return batch
