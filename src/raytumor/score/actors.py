"""Model actors of the scoring job: :class:`ScorePredictor` (score rows) and :class:`BNStatsTask` (AdaBN).

Both build on :class:`raytumor.predict.Predictor`, so the bundle, its preprocessing, the forward pass, the
tumour-score rule and the label rule are those of evaluation and the report.
"""

from __future__ import annotations

import io
import posixpath
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from raytumor import volumes
from raytumor.adapt import BNStatsAccumulator, apply_bn_state, flip_tta_probs
from raytumor.explain import GradCAM, explain_name, overlay_png
from raytumor.predict import NONFINITE_ERROR, Predictor, forward_outputs
from raytumor.results import EXPLAIN_DIR, OUT_OF_SCOPE, VOLUME_KINDS, output_schema, write_part
from raytumor.scan import has_error
from raytumor.score.decode import missing
from raytumor.storage import StorageOptions, get_filesystem


def unit_stacks(batch: dict[str, np.ndarray], shape: tuple[int, int], counts: np.ndarray) -> list[np.ndarray]:
    """Each decoded unit's (K, S, S) slices (units with ``counts`` 0 are skipped)."""
    return [
        np.frombuffer(batch["pixels"][i], dtype=np.uint8).reshape(-1, *shape)
        for i in range(len(counts))
        if counts[i]
    ]


def _passed(batch: dict[str, np.ndarray], key: str, n: int, cast: type) -> list:
    """A unit column carried through decoding (DICOM series/study fields), None where a unit has none."""
    if key not in batch:
        return [None] * n
    return [None if missing(v) else cast(v) for v in batch[key]]


@dataclass
class UnitScores:
    """Per-unit results of one batch: the decision's probabilities and slice, score, mean/max slice score,
    OOD score (a volume's: the median over its slices, so a few unusual edge slices do not flag it) and the
    view net's view (a volume's: its slices' majority)."""

    probs: np.ndarray
    score: np.ndarray
    score_mean: np.ndarray
    score_max: np.ndarray
    best: np.ndarray
    slice_indices: list[list[int] | None]
    slice_scores: list[list[float] | None]
    ood: np.ndarray
    model_view: list[str | None]

    @classmethod
    def empty(cls, n: int, n_classes: int) -> UnitScores:
        nan = np.full(n, np.nan, dtype=np.float32)
        return cls(
            np.full((n, n_classes), np.nan, dtype=np.float32), nan.copy(), nan.copy(), nan.copy(),
            np.full(n, -1, dtype=np.int64), [None] * n, [None] * n, nan.copy(), [None] * n,
        )  # fmt: skip


class ScorePredictor:
    """Actor: loads the bundle once; scores decoded units (all slices of a batch in forward chunks)."""

    def __init__(
        self,
        bundle_dir: str,
        *,
        batch_size: int,
        threshold: float | None = None,
        num_threads: int | None = None,
        explain_dir: str | None = None,
        storage: StorageOptions | None = None,
        slice_rows: bool = False,
        min_extent_mm: float = volumes.DEFAULT_MIN_EXTENT_MM,
        tta: str = "none",
        bn_state: dict | None = None,
        adaptation: str = "none",
        score_out_of_scope: bool = False,
        scores_dir: str | None = None,
        with_uids: bool = False,
    ) -> None:
        self.scores_dir = scores_dir
        self.with_uids = with_uids
        self.predictor = Predictor.from_bundle(bundle_dir, num_threads=num_threads, storage=storage)
        self.bundle = self.predictor.bundle
        if bn_state is not None:  # AdaBN: the archive's BatchNorm statistics, every weight untouched
            self.bundle.model = apply_bn_state(self.bundle.model, bn_state)
        self.meta = self.bundle.meta
        self.min_extent_mm = min_extent_mm
        self.tta = tta
        self.adaptation = adaptation
        self.score_out_of_scope = score_out_of_scope
        self.batch_size = batch_size
        self.threshold = self.meta.threshold if threshold is None else threshold  # --threshold override
        self.explain_dir = explain_dir
        self.storage = storage
        self.slice_rows = slice_rows
        self.schema = output_schema(self.meta.classes, explain_dir is not None, slice_rows, with_uids)
        self.bundle_version = f"raytumor {self.meta.versions.get('raytumor', '?')} / {self.meta.created_at}"
        size = self.meta.image_size
        self.shape = (size, size)
        self._cam: GradCAM | None = None

    def _forward(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(probabilities, pooled features) of every slice, in forward chunks of ``batch_size``."""
        m, dev, t = self.predictor.inference_model, self.bundle.device, self.meta.temperature
        probs, feats = [], []
        for s in range(0, len(images), self.batch_size):
            chunk = images[s : s + self.batch_size]
            p, f = forward_outputs(m, chunk, dev, t)
            if self.tta == "flip":  # the features (view, OOD) stay those of the image as given
                p = flip_tta_probs(m, chunk, dev, t, plain=p)
            probs.append(p.numpy())
            feats.append(f.numpy())
        if not probs:
            return np.zeros((0, self.meta.num_classes), np.float32), np.zeros((0, 0), np.float32)
        return np.concatenate(probs), np.concatenate(feats)

    def _per_unit(
        self,
        batch: dict[str, np.ndarray],
        counts: np.ndarray,
        probs: np.ndarray,
        feats: np.ndarray,
        slice_views: np.ndarray | None = None,
    ) -> UnitScores:
        """Fold slice probabilities into one result per unit: an image's one slice; a volume's score is what
        holds on enough contiguous slices (:func:`raytumor.volumes.volume_score`), with the single most
        suspicious slice and the mean kept for context. Without a tumour score the arg-max decides."""
        n = len(counts)
        slice_scores = self.predictor.scores(probs)
        slice_ood = self.predictor.ood_scores(feats)
        u = UnitScores.empty(n, self.meta.num_classes)
        spacing = np.asarray(batch["spacing"], dtype=np.float64) if "spacing" in batch else np.full(n, np.nan)
        start = 0
        for i in range(n):
            k = counts[i]
            if not k:
                continue
            p = probs[start : start + k]
            s = slice_scores[start : start + k] if slice_scores is not None else None
            u.ood[i] = np.median(slice_ood[start : start + k])
            if slice_views is not None:
                vals, n_of = np.unique(slice_views[start : start + k].astype(str), return_counts=True)
                u.model_view[i] = str(vals[np.argmax(n_of)])
            start += k
            if s is not None and k > 1:
                z = np.frombuffer(batch["slice_index"][i], dtype=np.int32)
                sp = float(spacing[i]) if np.isfinite(spacing[i]) else None
                u.score[i], j = volumes.volume_score(s, z, sp, self.min_extent_mm)
            else:
                j = int(np.argmax(s)) if s is not None else int(np.argmax(p.max(1)))
                if s is not None:
                    u.score[i] = s[j]
            u.best[i], u.probs[i] = j, p[j]
            if s is not None:
                u.score_mean[i], u.score_max[i] = s.mean(), s.max()
            if self.slice_rows:
                u.slice_indices[i] = np.frombuffer(batch["slice_index"][i], dtype=np.int32).tolist()
                u.slice_scores[i] = (s if s is not None else p.max(1)).astype(np.float32).tolist()
        return u

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table | dict[str, np.ndarray]:
        """The batch's score rows; with ``scores_dir``, written there as one Parquet part and only the
        row count returned (the job's progress), so rows land on storage as they are computed."""
        table = self.score_rows(batch)
        if self.scores_dir is None:
            return table
        if table.num_rows:  # a batch can be empty (a resumed tar's members all done)
            write_part(table, self.scores_dir, self.storage)
        return {"rows": np.array([table.num_rows], dtype=np.int64)}

    def score_rows(self, batch: dict[str, np.ndarray]) -> pa.Table:
        return self.score_batch(batch)[0]

    def score_batch(
        self, batch: dict[str, np.ndarray], overlay_for: np.ndarray | None = None
    ) -> tuple[pa.Table, dict[int, bytes]]:
        """The batch's score rows, and Grad-CAM overlay PNGs of the units flagged in ``overlay_for`` that
        got a class label (by unit position)."""
        n = len(batch["path"])
        errors = [e if has_error(e) else None for e in batch["error"]]
        counts = np.array([int(k) if errors[i] is None else 0 for i, k in enumerate(batch["n_slices"])])
        stacks = unit_stacks(batch, self.shape, counts)
        views = None
        if stacks:
            images = np.concatenate(stacks)
            probs, feats = self._forward(images)
            views = self.predictor.model_views(images)
        else:
            probs, feats = np.zeros((0, self.meta.num_classes), np.float32), np.zeros((0, 0), np.float32)
        u = self._per_unit(batch, counts, probs, feats, views)
        # A unit any of whose slices the model answered with NaN/inf is an error row, never a class.
        bad = self._nonfinite_units(counts, probs) | (
            (counts > 0) & self.predictor.nonfinite(u.probs, self.predictor.scores(u.probs))
        )
        for i in np.flatnonzero(bad):
            errors[i] = NONFINITE_ERROR
        ok = (counts > 0) & ~bad
        scope = self.predictor.assess(
            u.ood, u.model_view, batch.get("view_header"), batch.get("modality"), ok
        )
        pred = self.predictor.labels(u.probs, u.score, self.threshold)
        labels = self.predictor.label_names(pred, ok, scope.in_scope, self.score_out_of_scope)
        kinds = [k if isinstance(k, str) else None for k in batch["kind"]]
        volume = np.isin(np.array(kinds, dtype=object), VOLUME_KINDS)
        slice_src = [
            int(np.frombuffer(batch["slice_index"][i], dtype=np.int32)[u.best[i]])
            if volume[i] and ok[i]
            else None
            for i in range(n)
        ]
        cols: dict[str, Any] = {
            "path": [str(p) for p in batch["path"]],
            **{f"prob_{c}": u.probs[:, j] for j, c in enumerate(self.meta.classes)},
            "score": u.score,
            "label": labels,
            "kind": kinds,
            "format": [f if isinstance(f, str) else None for f in batch["format"]],
            "n_slices": np.where(ok, counts, 0).astype(np.int32),
            "slice": slice_src,
            "score_mean": np.where(volume, u.score_mean, np.nan),
            "score_max": np.where(volume, u.score_max, np.nan),
            **scope.columns(),
            "in_scope": [bool(scope.in_scope[i]) if ok[i] else None for i in range(n)],
            "adaptation": [self.adaptation] * n,
            "bundle_id": [self.meta.bundle_id] * n,
            "bundle_version": [self.bundle_version] * n,
            "error": errors,
            "scored_at": [datetime.now(timezone.utc)] * n,
            "spacing_mm": np.where(volume & ok, np.asarray(batch["spacing"], dtype=np.float64), np.nan),
            **{k: _passed(batch, k, n, int) for k in ("n_files", "n_missing")},
            **{k: _passed(batch, k, n, str) for k in ("reason", "study", "series")},
        }
        if self.with_uids:
            cols.update(
                {k: _passed(batch, k, n, str) for k in ("study_uid", "series_uid", "series_description")}
            )
        if self.explain_dir is not None:
            cols["explain"] = self._explain(batch, u.best, labels, u.score)
        if self.slice_rows:
            cols["slice_indices"], cols["slice_scores"] = u.slice_indices, u.slice_scores
        pngs: dict[int, bytes] = {}
        if overlay_for is not None:
            want = [i for i in range(n) if overlay_for[i] and labels[i] not in (None, OUT_OF_SCOPE)]
            pngs = self.overlays(batch, u.best, labels, u.score, want)
        return pa.Table.from_pydict(cols, schema=self.schema), pngs

    def _nonfinite_units(self, counts: np.ndarray, probs: np.ndarray) -> np.ndarray:
        """Per unit: does any of its slices have NaN/inf probabilities or score?"""
        bad = np.zeros(len(counts), dtype=bool)
        has = counts > 0
        if not has.any():
            return bad
        slice_bad = self.predictor.nonfinite(probs, self.predictor.scores(probs))
        starts = np.concatenate([[0], np.cumsum(counts[has])[:-1]])
        bad[has] = np.add.reduceat(slice_bad.astype(np.int64), starts) > 0
        return bad

    def overlays(
        self, batch: dict, best: np.ndarray, labels: list, score: np.ndarray, units: list[int]
    ) -> dict[int, bytes]:
        """Grad-CAM overlay PNGs (of the predicted class, on each unit's most suspicious slice) of ``units``:
        what ``--explain`` writes and ``raytumor serve ?explain=1`` returns."""
        if not units:
            return {}
        if self._cam is None:
            self._cam = GradCAM(self.bundle.model)
        images = np.stack(
            [
                np.frombuffer(batch["pixels"][i], dtype=np.uint8).reshape(-1, *self.shape)[best[i]]
                for i in units
            ]
        )
        targets = [self.meta.classes.index(labels[i]) for i in units]
        out = {}
        for s in range(0, len(units), self.batch_size):
            chunk = units[s : s + self.batch_size]
            cams = self._cam(images[s : s + len(chunk)], targets[s : s + len(chunk)])
            for j, i in enumerate(chunk):
                caption = f"{labels[i]} {score[i]:.2f} - research use only"
                out[i] = overlay_png(images[s + j], cams[j], caption=caption)
        return out

    def _explain(self, batch: dict, best: np.ndarray, labels: list, score: np.ndarray) -> list[str | None]:
        """Grad-CAM overlay for each positive unit (its most suspicious slice), named by a hash of its id."""
        neg = self.meta.negative_class
        positive = [
            i for i in range(len(labels))
            if labels[i] not in (None, OUT_OF_SCOPE) and (neg is None or labels[i] != neg)
        ]  # fmt: skip
        out: list[str | None] = [None] * len(labels)
        fs, root = (None, None)
        for i, png in self.overlays(batch, best, labels, score, positive).items():
            if fs is None:
                fs, root = get_filesystem(self.explain_dir, self.storage)
            name = explain_name(str(batch["path"][i]))
            with fs.open_output_stream(posixpath.join(root, name)) as f:
                f.write(png)
            out[i] = f"{EXPLAIN_DIR}/{name}"
        return out


class BNStatsTask:
    """Actor for the AdaBN pass: BatchNorm input statistics of each decoded batch (one state per batch).

    States are tiny next to the images (two float64 vectors per BN layer) and merge exactly in any order
    (``adapt.merge_states``), so the driver folds them in as they stream past."""

    def __init__(self, bundle_dir: str, storage: StorageOptions | None, num_threads: int | None) -> None:
        self.bundle = Predictor.from_bundle(bundle_dir, num_threads=num_threads, storage=storage).bundle
        size = self.bundle.meta.image_size
        self.shape = (size, size)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        counts = np.array(
            [
                0 if has_error(batch["error"][i]) else int(batch["n_slices"][i])
                for i in range(len(batch["path"]))
            ]
        )
        stacks = unit_stacks(batch, self.shape, counts)
        if not stacks:
            return {"state": np.array([], dtype=object), "images": np.array([], dtype=np.int64)}
        images = np.concatenate(stacks)
        acc = BNStatsAccumulator(self.bundle.model, upstream="batch")
        # "batch" upstream statistics improve with the batch size; 64 keeps the error ~3 % of a std.
        for s in range(0, len(images), 64):
            chunk = images[s : s + 64]
            if len(chunk) > 1 or s == 0:
                acc.update(chunk)
        buf = io.BytesIO()
        torch.save(acc.state(), buf)
        return {"state": np.array([buf.getvalue()], dtype=object), "images": np.array([len(images)])}
