"""Grad-CAM gallery: the most confident errors, explained on the bundle's own model input; and thumbnails of
inputs the bundle refused (out of scope).

The scan bytes go through :meth:`raytumor.predict.Predictor.inputs`, the one bytes -> model-input path of
training, evaluation and scoring, so the map is of the input the model actually scored.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
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


def scope_items(
    paths: Sequence[str], reasons: Sequence[Any], views: Sequence[Any], scores: Sequence[float], k: int
) -> list[dict[str, Any]]:
    """Up to ``k`` out-of-scope rows to show, taking one of each reason in turn (most frequent reason first),
    so the few thumbnails cover why inputs were refused rather than ``k`` examples of the commonest reason."""
    by_reason: dict[str, list[int]] = {}
    for i, r in enumerate(reasons):
        by_reason.setdefault(str(r) if r is not None else "unspecified", []).append(i)
    queues = sorted(by_reason.items(), key=lambda kv: (-len(kv[1]), kv[0]))
    picked: list[tuple[str, int]] = []
    depth = 0
    while len(picked) < max(0, k) and any(depth < len(q) for _, q in queues):
        picked += [(r, q[depth]) for r, q in queues if depth < len(q)][: k - len(picked)]
        depth += 1
    return [
        {
            "path": str(paths[i]),
            "basename": os.path.basename(str(paths[i])),
            "reason": reason,
            "view": None if views[i] is None else str(views[i]),
            "score": None if scores[i] is None or not np.isfinite(scores[i]) else float(scores[i]),
        }
        for reason, i in picked
    ]


def render_thumbnails(
    bundle: str | os.PathLike, items: list[dict[str, Any]], storage: StorageOptions, prefix: str = "scope"
) -> dict[str, bytes]:
    """The model input of each item (a volume's middle kept slice) as a captioned greyscale PNG keyed by
    file name; sets ``png`` on each item it rendered and ``error`` on each it could not."""
    if not items:
        return {}
    predictor = Predictor.from_bundle(bundle, device="cpu", storage=storage)
    pngs: dict[str, bytes] = {}
    for i, it in enumerate(items):
        try:
            stack, _ = predictor.inputs(read_bytes(it["path"], storage), volumes=True)
        except Exception as e:  # the file vanished or changed since evaluation: say so, keep going
            it["error"] = f"{type(e).__name__}: {e}"[:200]
            continue
        img = stack[len(stack) // 2]
        name = f"{prefix}_{i + 1:02d}.png"
        # overlay_png with an empty map: the plain input, upscaled and captioned like the gallery's
        pngs[name] = overlay_png(
            img, np.zeros(img.shape, np.float32), caption=f"{it['basename']}  {it['reason']}"
        )
        it["png"] = name
    return pngs
