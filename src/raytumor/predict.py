"""Predictor: a model bundle that loads itself (local or ``s3://``/``gs://``) and turns scans into scores.

The one inference path: ``raytumor evaluate``'s actors (:meth:`Predictor.__call__` over Ray Data batches),
``raytumor score``'s actors and AdaBN pass (``raytumor.score.actors``), and the report's Grad-CAM gallery all
build on it, so bytes -> model input -> probabilities -> tumour score -> label is written once.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from raytumor.bundle import LoadedBundle, fetch_bundle, load_bundle
from raytumor.metrics import predict_labels, tumour_score
from raytumor.preprocess import model_inputs
from raytumor.scan import DecodedScan, ok_mask


def forward_probs(
    model: torch.nn.Module,
    images: np.ndarray | torch.Tensor,
    device: torch.device,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Softmax probabilities for a (B, H, W) uint8 batch: channels_last, bf16 autocast on CUDA."""
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
        logits = model(x)
    return torch.softmax(logits.float() / temperature, dim=1).cpu()


class Predictor:
    """A loaded bundle and the steps of inference; also a Ray Data ``map_batches`` callable over batches
    with an ``image`` column (adds ``prob_<class>``, ``score``, ``pred``)."""

    def __init__(
        self,
        bundle_dir: str | os.PathLike,
        device: str | None = None,
        num_threads: int | None = None,
        storage: Any = None,
    ):
        if num_threads:
            torch.set_num_threads(num_threads)
        self.bundle: LoadedBundle = load_bundle(fetch_bundle(bundle_dir, storage), device=device)
        self.meta = self.bundle.meta

    @classmethod
    def from_bundle(cls, uri: str | os.PathLike, **kwargs: Any) -> Predictor:
        """The bundle at a local path or a bucket URI (fetched once per node into a local cache)."""
        return cls(uri, **kwargs)

    def inputs(self, data: bytes, **kwargs: Any) -> tuple[np.ndarray, DecodedScan]:
        """Scan bytes -> (K, S, S) uint8 model inputs with this bundle's size and preprocessing
        (:func:`raytumor.preprocess.model_inputs`; ``volumes=True`` to keep a volume's slices)."""
        return model_inputs(data, self.meta.image_size, self.meta.preprocess, **kwargs)

    def predict_probs(self, images: np.ndarray) -> np.ndarray:
        return forward_probs(self.bundle.model, images, self.bundle.device, self.meta.temperature).numpy()

    def scores(self, probs: np.ndarray) -> np.ndarray | None:
        """Tumour score per row (float32), or None when the bundle's classes define none."""
        s = tumour_score(probs, self.meta.classes, self.meta.negative_class)
        return None if s is None else np.asarray(s, dtype=np.float32)

    def labels(
        self, probs: np.ndarray, score: np.ndarray | None, threshold: float | None = None
    ) -> np.ndarray:
        """Class index per row at the bundle's operating threshold (or ``threshold``)."""
        if score is None:
            score = np.full(len(probs), np.nan, dtype=np.float32)
        thr = self.meta.threshold if threshold is None else threshold
        return predict_labels(probs, score, self.meta.classes, self.meta.negative_class, thr)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images = batch.pop("image")
        n = len(images)
        ok = ok_mask(batch["error"]) if "error" in batch else np.ones(n, dtype=bool)
        probs = np.full((n, self.meta.num_classes), np.nan, dtype=np.float32)
        if ok.any():
            probs[ok] = self.predict_probs(images[ok])
        for i, c in enumerate(self.meta.classes):
            batch[f"prob_{c}"] = probs[:, i]
        score = self.scores(probs)
        batch["score"] = np.full(n, np.nan, dtype=np.float32) if score is None else score
        batch["pred"] = np.where(ok, self.labels(probs, score), -1).astype(np.int64)
        return batch
