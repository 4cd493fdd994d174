"""Grad-CAM localisation against expert masks (the "pointing game"): does the heat-map's peak, mapped back
through the model input's geometry (head crop, pad to square, resize), fall inside the tumour mask?

Used by ``raytumor evaluate``/``report`` when a labelled manifest has a ``mask`` column, and by
``bench/gradcam_localisation.py``. The peak mapping and the hit-rate statistics are in :mod:`raytumor.explain`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd

from raytumor.explain import GradCAM, InputGeometry, pointing_game
from raytumor.formats import decode_image
from raytumor.predict import Predictor
from raytumor.preprocess import PreprocessConfig, crop_box, head_mask, mask_is_plausible
from raytumor.storage import read_bytes


def input_box(gray: np.ndarray, cfg: PreprocessConfig | dict[str, Any] | None) -> tuple[int, int, int, int]:
    """The crop box (y0, y1, x0, x1) ``preprocess.apply`` takes from ``gray`` under ``cfg``; the whole slice
    without a crop."""
    if cfg is not None and not isinstance(cfg, PreprocessConfig):
        cfg = PreprocessConfig.from_dict(cfg)
    h, w = gray.shape
    if cfg is None:
        return 0, h, 0, w
    return crop_box(gray, cfg)


def input_geometry(
    gray: np.ndarray, size: int, cfg: PreprocessConfig | dict[str, Any] | None
) -> InputGeometry:
    """Where the model input ``preprocess.to_model_input(gray, size, cfg)`` came from in ``gray``."""
    h, w = gray.shape
    return InputGeometry(h, w, input_box(gray, cfg), size)


def read_mask(uri: str, storage: Any = None) -> np.ndarray:
    """A binary mask image (any raster format, 255 or 1 = tumour) as a boolean (H, W) array."""
    return decode_image(read_bytes(uri, storage)).pixels >= 128


def _head_share(gray: np.ndarray, mask: np.ndarray) -> float:
    """Share of the head covered by the mask: the hit rate of a random point inside the head, a stricter
    baseline than a random point in the whole image (heat maps rarely point at the background)."""
    head = head_mask(gray)
    if head.shape != mask.shape or not mask_is_plausible(head):
        return float("nan")
    return float((head & mask).sum() / head.sum())


Heatmap = Callable[[np.ndarray, list[int]], np.ndarray]


def localise(
    bundle_dir: str | os.PathLike,
    rows: pd.DataFrame,
    storage: Any = None,
    tolerance: float = 0.01,
    batch_size: int = 16,
    device: str | None = None,
    heatmap: Heatmap | None = None,
    with_scores: bool = False,
) -> pd.DataFrame:
    """The pointing game on each row (``path``, ``mask``, ``label``: the class index to explain): ``rows``
    plus :func:`raytumor.explain.pointing_game`'s columns, ``head_share``, ``tolerance_px`` and ``error``.

    The image goes through the bundle's own bytes -> model-input path (:meth:`Predictor.inputs`); the peak of
    ``heatmap(inputs, targets)`` (default: Grad-CAM of the bundle's model, as stored) is mapped back through
    the input's crop, padding and resize (:func:`input_geometry`). A hit within ``tolerance`` x the image's
    long side of the mask is a tolerant hit. Rows that cannot be read get an ``error`` and no result.
    ``with_scores`` adds the tumour ``score`` of the same inputs (the bundle as stored, no test-time
    adaptation), for callers without predictions."""
    predictor = Predictor.from_bundle(bundle_dir, device=device, storage=storage)
    meta = predictor.meta
    cam = heatmap if heatmap is not None else GradCAM(predictor.bundle.model)
    rows = rows.reset_index(drop=True)
    results: list[dict[str, Any]] = [{} for _ in range(len(rows))]
    pending: list[tuple[int, np.ndarray, InputGeometry, np.ndarray, int]] = []

    def flush() -> None:
        if not pending:
            return
        images = np.stack([p[1] for p in pending])
        heat = cam(images, [p[4] for p in pending])
        scores = predictor.scores(predictor.predict_probs(images)) if with_scores else None
        for j, ((i, _, geo, mask, _), h) in enumerate(zip(pending, heat, strict=True)):
            tol = tolerance * max(mask.shape)
            results[i].update(pointing_game(h, geo, mask, tol), tolerance_px=tol)
            if scores is not None:
                results[i]["score"] = float(scores[j])
        pending.clear()

    for i, r in enumerate(rows.itertuples(index=False)):
        try:
            stack, scan = predictor.inputs(read_bytes(str(r.path), storage))
            gray = scan.slices[0]
            mask = read_mask(str(r.mask), storage)
            geo = input_geometry(gray, meta.image_size, meta.preprocess)
            # the geometry's checks, before the batch's heat maps are spent on it
            pointing_game(np.zeros((meta.image_size, meta.image_size), np.float32), geo, mask)
        except Exception as e:  # a missing or broken image or mask: say which, keep going
            results[i] = {"error": f"{type(e).__name__}: {e}"[:200]}
            continue
        results[i] = {"error": None, "head_share": _head_share(gray, mask)}
        pending.append((i, stack[0], geo, mask, int(r.label)))
        if len(pending) >= batch_size:
            flush()
    flush()
    return pd.concat([rows, pd.DataFrame(results, index=rows.index)], axis=1)
