"""Volume-level rules for 2-D slice classifiers: which axial slices of a volume to score, and how their
scores become one volume score.

Why: a 2-D model trained on axial JPEG slices (Br35H and the like: slices through the cerebrum) has never
seen the skull base, neck or shoulders that a 3-D T1 volume's field of view also covers, nor the tiny
skull-cap sections at the vertex. Scoring every slice and taking the maximum made every healthy IXI volume
positive (42/42, max over ~108 slices): with ~100 out-of-distribution draws one of them is bound to fire.

Two rules, both in millimetres so they hold for any slice thickness:

* **Slice range** (:func:`brain_slice_range`): measured down from the vertex (the most superior slice that
  still holds head, which decoding already finds), skip the first ``skip_top_mm`` (scalp and skull cap)
  and stop ``depth_mm`` below it. The cerebrum spans roughly the top 100-110 mm of an adult head, so the
  default 10-110 mm keeps the supratentorial brain and most of the posterior fossa whatever the field of
  view below it. Lesions lower than that (brainstem, foramen magnum) are not scored: pass ``depth_mm=0``
  to score every slice.
* **Sustained score** (:func:`volume_score`): a tumour the model can see spans several contiguous slices,
  an isolated false-positive slice does not. The volume score is the highest score that holds on
  ``k = ceil(min_extent_mm / spacing)`` contiguous slices (max over windows of the window minimum). With
  ``min_extent_mm=0`` or an unknown spacing it is the plain maximum.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = [
    "DEFAULT_DEPTH_MM",
    "DEFAULT_MIN_EXTENT_MM",
    "DEFAULT_SKIP_TOP_MM",
    "brain_slice_range",
    "volume_score",
]

DEFAULT_SKIP_TOP_MM = 10.0
DEFAULT_DEPTH_MM = 110.0
DEFAULT_MIN_EXTENT_MM = 10.0


def brain_slice_range(
    slice_index: np.ndarray,
    spacing_mm: float | None,
    skip_top_mm: float = DEFAULT_SKIP_TOP_MM,
    depth_mm: float = DEFAULT_DEPTH_MM,
) -> np.ndarray:
    """Boolean mask over ``slice_index`` (canonical z, inferior -> superior) of the slices to score.

    Everything is kept when the spacing is unknown (e.g. multi-frame DICOM without a reliable frame
    order), when ``depth_mm`` is 0, or when the rule would keep nothing (a thin slab)."""
    z = np.asarray(slice_index, dtype=np.float64)
    keep = np.ones(len(z), dtype=bool)
    if not len(z) or not spacing_mm or spacing_mm <= 0 or depth_mm <= 0:
        return keep
    below_top = (z.max() - z) * float(spacing_mm)  # mm below the vertex slice
    sel = (below_top >= skip_top_mm) & (below_top <= depth_mm)
    return sel if sel.any() else keep


def volume_score(
    scores: np.ndarray,
    slice_index: np.ndarray,
    spacing_mm: float | None,
    min_extent_mm: float = DEFAULT_MIN_EXTENT_MM,
) -> tuple[float, int]:
    """(volume score, position in ``scores`` of the slice that carries it).

    The score is ``max`` over runs of ``k`` contiguous slices (consecutive ``slice_index`` values) of the
    run's minimum score; the slice returned is the most suspicious one of the best run. Fewer contiguous
    slices than ``k`` anywhere: ``k`` shrinks to the longest run (a short volume is still scored). NaN
    scores count as 0 (a slice that cannot be scored never supports a positive)."""
    score, pos, _ = volume_run(scores, slice_index, spacing_mm, min_extent_mm)
    return score, pos


def volume_run(
    scores: np.ndarray,
    slice_index: np.ndarray,
    spacing_mm: float | None,
    min_extent_mm: float = DEFAULT_MIN_EXTENT_MM,
) -> tuple[float, int, np.ndarray]:
    """:func:`volume_score`, and the slice indices of the run that sets it (what the review page shades)."""
    s = np.nan_to_num(np.asarray(scores, dtype=np.float64), nan=0.0)
    z = np.asarray(slice_index, dtype=np.int64)
    if len(s) == 0:
        return float("nan"), -1, z[:0]
    order = np.argsort(z, kind="stable")
    s, z = s[order], z[order]
    k = 1
    if spacing_mm and spacing_mm > 0 and min_extent_mm > 0:
        k = max(1, math.ceil(min_extent_mm / float(spacing_mm) - 1e-9))
    # Contiguous runs of slice indices (decoding may have dropped empty slices in between).
    breaks = np.flatnonzero(np.diff(z) != 1) + 1
    runs = np.split(np.arange(len(z)), breaks)
    k = min(k, max(len(r) for r in runs))
    best, best_pos, best_window = -np.inf, -1, np.arange(0)
    for r in runs:
        if len(r) < k:
            continue
        rs = s[r]
        if k == 1:
            mins = rs
        else:
            mins = np.lib.stride_tricks.sliding_window_view(rs, k).min(axis=1)
        i = int(np.argmax(mins))
        if mins[i] > best:
            window = r[i : i + k]
            best, best_pos, best_window = float(mins[i]), int(window[np.argmax(s[window])]), window
    return best, int(order[best_pos]), z[best_window]
