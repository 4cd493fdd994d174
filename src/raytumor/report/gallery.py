"""Grad-CAM gallery: the most confident errors, explained on the bundle's own model input.

The scan bytes go through :meth:`raytumor.predict.Predictor.inputs`, the one bytes -> model-input path of
training, evaluation and scoring, so the map is of the input the model actually scored.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from raytumor.explain import GradCAM, overlay_png
from raytumor.predict import Predictor
from raytumor.storage import StorageOptions, read_bytes

KINDS = ("false_negatives", "false_positives")


def gallery_items(
    paths: np.ndarray, labels: np.ndarray, pred: np.ndarray, y: np.ndarray, s: np.ndarray, thr: float, k: int
) -> dict[str, list[dict[str, Any]]]:
    """The ``k`` most confident false negatives (lowest score) and false positives (highest score); rows
    with a NaN score (errors, volumes) are never shown."""
    out: dict[str, list[dict[str, Any]]] = {}
    ok = np.isfinite(s)
    for kind, mask, conf in (
        ("false_negatives", ok & (y == 1) & (s < thr), 1.0 - s),
        ("false_positives", ok & (y == 0) & (s >= thr), s),
    ):
        rows = np.flatnonzero(mask)
        rows = rows[np.argsort(-conf[rows], kind="stable")][: max(0, k)]
        out[kind] = [
            {
                "path": str(paths[r]),
                "basename": os.path.basename(str(paths[r])),
                "label": int(labels[r]),
                "pred": int(pred[r]),
                "score": float(s[r]),
                "confidence": float(conf[r]),
            }
            for r in rows
        ]
    return out


def cam_target(kind: str, item: dict[str, Any], classes: list[str], negative_class: str | None) -> int:
    """The tumour class to explain: the true class of a missed tumour, the predicted (or only) tumour class
    of a false positive."""
    if negative_class is None:
        return 1
    if kind == "false_negatives":
        return int(item["label"])
    neg = classes.index(negative_class)
    if item["pred"] != neg:
        return int(item["pred"])
    return 1 - neg if len(classes) == 2 else int(item["pred"])


def render_gallery(
    bundle: str | os.PathLike, gallery: dict[str, list[dict[str, Any]]], storage: StorageOptions
) -> dict[str, bytes]:
    """Grad-CAM overlays (PNG bytes) keyed by file name; sets ``png`` and ``cam_target`` on each item it
    rendered and ``error`` on each it could not. Loads the model only when there is something to show."""
    items = [(kind, i, it) for kind in KINDS for i, it in enumerate(gallery.get(kind) or [])]
    if not items:
        return {}
    predictor = Predictor.from_bundle(bundle, device="cpu", storage=storage)
    meta = predictor.meta
    cam = GradCAM(predictor.bundle.model)
    pngs: dict[str, bytes] = {}
    for kind, i, it in items:
        try:
            stack, _ = predictor.inputs(read_bytes(it["path"], storage))
        except Exception as e:  # the file vanished or changed since evaluation: say so, keep going
            it["error"] = f"{type(e).__name__}: {e}"[:200]
            continue
        img = stack[0]
        target = cam_target(kind, it, list(meta.classes), meta.negative_class)
        heat = cam(img[None], [target])[0]
        caption = (
            f"{it['basename']}  true {meta.classes[it['label']]} / pred {meta.classes[it['pred']]}  "
            f"score {it['score']:.3f}"
        )
        name = f"gallery_{'fn' if kind == 'false_negatives' else 'fp'}_{i + 1:02d}.png"
        pngs[name] = overlay_png(img, heat, caption=caption)
        it.update(png=name, cam_target=meta.classes[target])
    return pngs
