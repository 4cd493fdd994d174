"""Predictor: a model bundle that loads itself and turns batches of decoded images into probabilities.

Used as a Ray Data ``map_batches`` actor (``compute=ActorPoolStrategy``) by evaluation and scoring, and
directly in-process by tests and benchmarks, so every path runs the same preprocessing and forward code.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from raytumor.bundle import LoadedBundle, load_bundle, tumour_scores
from raytumor.ingest import ok_mask


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
    """Callable over Ray Data numpy batches with an ``image`` column; adds ``prob_<class>``, ``score``, ``pred``."""

    def __init__(
        self, bundle_dir: str | os.PathLike, device: str | None = None, num_threads: int | None = None
    ):
        if num_threads:
            torch.set_num_threads(num_threads)
        self.bundle: LoadedBundle = load_bundle(bundle_dir, device=device)
        self.meta = self.bundle.meta

    @classmethod
    def from_bundle(cls, bundle_dir: str | os.PathLike, **kwargs: Any) -> Predictor:
        return cls(bundle_dir, **kwargs)

    def predict_probs(self, images: np.ndarray) -> np.ndarray:
        return forward_probs(self.bundle.model, images, self.bundle.device, self.meta.temperature).numpy()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images = batch.pop("image")
        n = len(images)
        ok = ok_mask(batch["error"]) if "error" in batch else np.ones(n, dtype=bool)
        probs = np.full((n, self.meta.num_classes), np.nan, dtype=np.float32)
        if ok.any():
            probs[ok] = self.predict_probs(images[ok])
        for i, c in enumerate(self.meta.classes):
            batch[f"prob_{c}"] = probs[:, i]
        try:
            score = np.asarray(tumour_scores(probs, self.meta), dtype=np.float32)
        except ValueError:
            score = np.full(n, np.nan, dtype=np.float32)
        batch["score"] = score
        batch["pred"] = np.where(ok, predict_labels(probs, score, self.meta), -1).astype(np.int64)
        return batch


def predict_labels(probs: np.ndarray, score: np.ndarray, meta: Any) -> np.ndarray:
    """Class index per row: binary sets use the bundle's operating threshold on the tumour score."""
    if len(probs) == 0:
        return np.zeros(0, dtype=np.int64)
    if meta.num_classes == 2:
        neg = meta.classes.index(meta.negative_class) if meta.negative_class is not None else 0
        return np.where(np.nan_to_num(score, nan=-1.0) >= meta.threshold, 1 - neg, neg)
    return np.nan_to_num(probs, nan=-1.0).argmax(1)
