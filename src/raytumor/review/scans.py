"""The pictures behind the review page's detail view: a row's scan as the model saw it, its Grad-CAM overlay,
and a volume's or series' per-slice curve.

A row is read and decoded again with the scorer's own :class:`~raytumor.score.decode.ReadDecode` (archive
members, DICOM series from ``OUTPUT/series_files.parquet``) and the run's settings from ``run.json``, then
scored by :class:`~raytumor.score.actors.ScorePredictor` (with the run's AdaBN state, TTA and threshold), so
what the page draws is what the batch run computed. The recomputed score is compared with the stored one:
a file or bundle that changed since scoring is shown as such, never silently.
"""

from __future__ import annotations

import io
import tarfile
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch
from PIL import Image

from raytumor.bundle import fetch_bundle, read_meta
from raytumor.explain import GradCAM, overlay_png
from raytumor.formats import decode_scan
from raytumor.medical import decode_dicom_series
from raytumor.results import ADABN_FILE
from raytumor.review.store import ReviewStore
from raytumor.score.actors import ScorePredictor
from raytumor.score.decode import ReadDecode, columns, decoded_row, series_row
from raytumor.score.job import ScoreConfig
from raytumor.score.series import SERIES_FILES
from raytumor.storage import StorageOptions, archive_kind, get_filesystem, join, parse_member_id
from raytumor.volumes import volume_run

# Recomputed and stored scores further apart than this: the file or the bundle changed since scoring.
CONSISTENT_TOL = 1e-4
VIEW_SIDE = 320  # px of the detail view's pictures
THUMB_SIDE = 72
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".dcm", ".dicom", ".bmp", ".tif", ".tiff", ".webp")


class Unavailable(Exception):
    """The row has no picture (an error row, a skipped series, a missing bundle); ``str`` says why."""


@dataclass
class Detail:
    stack: np.ndarray  # (K, S, S) uint8 model inputs
    slice_index: np.ndarray  # (K,) source slice of each
    decoded_row: dict[str, Any]  # what ReadDecode gives the scoring actors for this unit
    scored: dict[str, Any] | None = None  # the recomputed score row (None before the model ran)


def run_config(store: ReviewStore) -> ScoreConfig:
    """The scoring run's config from run.json (fields a newer/older raytumor does not know are dropped)."""
    known = {f.name for f in fields(ScoreConfig)}
    cfg = {k: v for k, v in store.config.items() if k in known}
    cfg.update(input=store.run.get("input", cfg.get("input", "")), output=store.output, series_rules=None)
    return ScoreConfig(**cfg)


def _png(img: np.ndarray, side: int) -> bytes:
    im = Image.fromarray(np.ascontiguousarray(img, dtype=np.uint8), mode="L")
    im = im.resize((side, side), Image.Resampling.BILINEAR if side > im.width else Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    im.save(buf, format="PNG", optimize=side <= THUMB_SIDE)
    return buf.getvalue()


class _LRU(OrderedDict):
    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size
        self.lock = threading.Lock()

    def get_or(self, key: Any, make: Callable[[], Any]) -> Any:
        with self.lock:
            if key in self:
                self.move_to_end(key)
                return self[key]
        value = make()
        with self.lock:
            self[key] = value
            while len(self) > self.size:
                self.popitem(last=False)
        return value


class ScanViewer:
    """Reads, decodes and (for the overlay and curve) rescores one row at a time, with small caches."""

    def __init__(self, store: ReviewStore, bundle: str | None, storage: StorageOptions | None) -> None:
        self.store = store
        self.storage = storage
        self.cfg = run_config(store)
        self.bundle_uri = bundle or store.run.get("bundle") or self.cfg.bundle
        self._meta = None
        self._scorer: ScorePredictor | None = None
        self._cam: GradCAM | None = None
        self._rd: ReadDecode | None = None
        self._series: dict[str, list[str]] | None = None
        self._model_lock = threading.Lock()  # one forward/backward at a time (hooks, threads)
        self._init_lock = threading.Lock()
        self._decoded = _LRU(24)
        self._thumbs = _LRU(5000)

    # -- set-up, on first use ----------------------------------------------------------------------------

    def meta(self) -> Any:
        if self._meta is None:
            try:
                self._meta = read_meta(fetch_bundle(self.bundle_uri, self.storage))
            except Exception as e:
                raise Unavailable(
                    f"bundle {self.bundle_uri} cannot be read ({type(e).__name__}: {e}); pass --bundle"
                ) from e
        return self._meta

    def reader(self) -> ReadDecode:
        with self._init_lock:
            if self._rd is None:
                meta = self.meta()
                self._rd = ReadDecode(
                    meta.image_size, self.storage, self.cfg.max_file_bytes, self.cfg.min_foreground,
                    preprocess=meta.preprocess, volume_range=self.cfg.volume_range,
                )  # fmt: skip
        return self._rd

    def scorer(self) -> ScorePredictor:
        with self._init_lock:
            if self._scorer is None:
                bn_state = None
                if self.cfg.adapt == "adabn":
                    fs, path = get_filesystem(join(self.store.output, ADABN_FILE), self.storage)
                    if fs.get_file_info(path).type == pafs.FileType.File:
                        with fs.open_input_stream(path) as f:
                            bn_state = torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=True)
                self._scorer = ScorePredictor(
                    str(fetch_bundle(self.bundle_uri, self.storage)), batch_size=8, threshold=self.cfg.threshold,
                    num_threads=2, storage=self.storage, slice_rows=True,
                    min_extent_mm=self.cfg.volume_min_extent_mm, tta=self.cfg.tta, bn_state=bn_state,
                    adaptation=self.cfg.adaptation, score_out_of_scope=self.cfg.score_out_of_scope,
                )  # fmt: skip
                self._cam = GradCAM(self._scorer.bundle.model)
        return self._scorer

    def series_files(self, path: str) -> list[str]:
        if self._series is None:
            fs, p = get_filesystem(join(self.store.output, SERIES_FILES), self.storage)
            groups: dict[str, list[str]] = {}
            if fs.get_file_info(p).type == pafs.FileType.File:
                with fs.open_input_file(p) as f:
                    t = pq.read_table(f).to_pydict()
                for file, sp in zip(t["file"], t["series_path"], strict=True):
                    groups.setdefault(sp, []).append(file)
            self._series = groups
        return self._series.get(path, [])

    # -- reading a row again -----------------------------------------------------------------------------

    def _bytes(self, uid: str) -> bytes:
        rd = self.reader()
        m = parse_member_id(uid)
        if m is not None:
            archive, member, occ = m
            if archive_kind(archive) == "zip":
                return rd.read_unit(archive, "zip", member, occ, 0)
            return self._tar_member(archive, member, occ)
        fs, path = get_filesystem(uid, self.storage)
        info = fs.get_file_info(path)
        if info.type != pafs.FileType.File:
            raise Unavailable(f"{uid} is no longer there")
        return rd.read_unit(uid, "file", None, None, int(info.size or 0))

    def _tar_member(self, archive: str, member: str, occ: int) -> bytes:
        """One member of a tar, streamed to it (a tar has no index); bounded like the scorer's reads."""
        fs, path = get_filesystem(archive, self.storage)
        seen = 0
        with fs.open_input_stream(path, compression=None) as raw, tarfile.open(fileobj=raw, mode="r|*") as tf:
            for ti in tf:
                if ti.isfile() and ti.name == member:
                    seen += 1
                    if seen == occ:
                        if ti.size > self.cfg.max_file_bytes:
                            raise Unavailable(f"{member}: too large ({ti.size} bytes)")
                        f = tf.extractfile(ti)
                        assert f is not None
                        return f.read()
        raise Unavailable(f"no member {member!r} in {archive} (changed since scoring?)")

    def decoded(self, rid: int) -> Detail:
        """The row's model inputs, decoded again as the scorer decoded them (cached)."""
        return self._decoded.get_or(rid, lambda: self._decode(rid))

    def _decode(self, rid: int) -> Detail:
        row = self.store.df.loc[rid]
        if isinstance(row.get("reason"), str) and row["reason"]:
            raise Unavailable(f"not scored: {row['reason']}")
        if isinstance(row.get("error"), str) and row["error"]:
            raise Unavailable(f"error row: {row['error']}")
        rd = self.reader()
        path = str(row["path"])
        try:
            if row["kind"] == "series":
                files = self.series_files(path)
                if not files:
                    raise Unavailable(f"the files of series {path} are not in {SERIES_FILES}")
                dec = series_row(path, rd.image_size, [self._bytes(f) for f in files], None, rd)
            else:
                dec = decoded_row(path, rd.image_size, self._bytes(path), None, rd.min_fg, rd.prep, rd.volume_range)
        except Unavailable:
            raise
        except Exception as e:
            raise Unavailable(f"cannot read {path} now: {type(e).__name__}: {e}"[:300]) from e
        if dec["error"]:
            raise Unavailable(f"decodes with an error now: {dec['error']}")
        size = rd.image_size
        stack = np.frombuffer(dec["pixels"], dtype=np.uint8).reshape(-1, size, size)
        idx = np.frombuffer(dec["slice_index"], dtype=np.int32) if dec["slice_index"] else np.arange(len(stack))
        return Detail(stack, np.asarray(idx), dec)

    def scored(self, rid: int) -> dict[str, Any]:
        d = self.decoded(rid)
        if d.scored is None:
            scorer = self.scorer()
            with self._model_lock:
                table, _ = scorer.score_batch(columns([d.decoded_row]))
            d.scored = table.to_pylist()[0]
        return d.scored

    def _position(self, d: Detail, rid: int, slice_: int | None) -> int:
        if slice_ is None:
            s = self.store.df.at[rid, "slice"]
            slice_ = None if s is None or (isinstance(s, float) and np.isnan(s)) else int(s)
        if slice_ is None:
            return len(d.stack) // 2 if len(d.stack) > 1 else 0
        hit = np.flatnonzero(d.slice_index == slice_)
        if not len(hit):
            raise Unavailable(f"slice {slice_} is not one the model scored")
        return int(hit[0])

    # -- what the page asks for --------------------------------------------------------------------------

    def thumbnail(self, rid: int) -> bytes:
        def make() -> bytes:
            d = self.decoded(rid)
            return _png(d.stack[self._position(d, rid, None)], THUMB_SIDE)

        return self._thumbs.get_or(rid, make)

    def image(self, rid: int, slice_: int | None = None) -> bytes:
        d = self.decoded(rid)
        return _png(d.stack[self._position(d, rid, slice_)], VIEW_SIDE)

    def cam_class(self, rid: int) -> int:
        """The tumour class to explain: the called tumour class, else the likeliest tumour class."""
        meta = self.meta()
        classes = list(meta.classes)
        row = self.store.df.loc[rid]
        neg = self.store.negative_class
        tumour = [i for i, c in enumerate(classes) if c != neg]
        if row["label"] in classes and row["label"] != neg:
            return classes.index(row["label"])
        probs = [row.get(f"prob_{classes[i]}") for i in tumour]
        probs = [(-1.0 if p is None or not np.isfinite(p) else float(p)) for p in probs]
        return tumour[int(np.argmax(probs))] if tumour else 0

    def overlay(self, rid: int, slice_: int | None = None) -> bytes:
        d = self.decoded(rid)
        img = d.stack[self._position(d, rid, slice_)]
        self.scorer()
        target = self.cam_class(rid)
        with self._model_lock:
            heat = self._cam(img[None].copy(), [target])[0]  # type: ignore[misc]
        png = overlay_png(img, heat)
        im = Image.open(io.BytesIO(png))
        if im.width != VIEW_SIDE:
            im = im.resize((VIEW_SIDE, VIEW_SIDE), Image.Resampling.BILINEAR)
            buf = io.BytesIO()
            im.save(buf, format="PNG")
            png = buf.getvalue()
        return png

    def curve(self, rid: int) -> dict[str, Any]:
        """The per-slice scores of a volume/series as the batch run computed them, and whether the recomputed
        score agrees with the stored one."""
        row = self.store.df.loc[rid]
        s = self.scored(rid)
        stored, now = row["score"], s.get("score")
        same = (
            stored is not None and now is not None and np.isfinite(stored) and np.isfinite(now)
            and abs(float(stored) - float(now)) <= CONSISTENT_TOL
        )  # fmt: skip
        meta = self.meta()
        indices = [int(i) for i in (s.get("slice_indices") or [])]
        spacing = row.get("spacing_mm")
        spacing = float(spacing) if spacing is not None and np.isfinite(spacing) else None
        run: list[int] = []
        if len(indices) > 1:
            _, _, z = volume_run(np.asarray(s["slice_scores"]), np.asarray(indices), spacing, self.cfg.volume_min_extent_mm)
            run = [int(z.min()), int(z.max())] if len(z) else []
        return {
            "kind": row["kind"],
            "view": row.get("view"),
            "run": run,
            "spacing_mm": spacing,
            "min_extent_mm": float(self.cfg.volume_min_extent_mm),
            "indices": indices,
            "scores": [float(x) for x in (s.get("slice_scores") or [])],
            "slice": s.get("slice"),
            "threshold": float(self.scorer().threshold),
            "score_stored": None if stored is None or not np.isfinite(stored) else float(stored),
            "score_now": None if now is None or not np.isfinite(now) else float(now),
            "consistent": bool(same),
            "cam_class": list(meta.classes)[self.cam_class(rid)],
        }

    def export_image(self, rid: int) -> tuple[bytes, str]:
        """The corrections export's file for a row training cannot read where it is (an archive member, a
        volume, a series): (bytes, extension). A 2-D member keeps its own bytes; a volume or series gives its
        scored slice as decoded from the source (before the bundle's preprocessing, which training applies
        again) as a PNG, so training sees the slice the reviewer judged."""
        row = self.store.df.loc[rid]
        path = str(row["path"])
        if row["kind"] == "image":
            m = parse_member_id(path)
            name = (m[1] if m else path).lower()
            ext = next((e for e in IMAGE_EXTS if name.endswith(e)), ".bin")
            return self._bytes(path), ext
        rd = self.reader()
        if row["kind"] == "series":
            scan = decode_dicom_series([self._bytes(f) for f in self.series_files(path)], min_foreground=rd.min_fg)
        else:
            scan = decode_scan(self._bytes(path), min_foreground=rd.min_fg)
        s = row["slice"]
        if s is None or (isinstance(s, float) and np.isnan(s)):
            raise Unavailable("no scored slice")
        hit = np.flatnonzero(np.asarray(scan.slice_index) == int(s))
        if not len(hit):
            raise Unavailable(f"slice {int(s)} is not in the decoded scan now")
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(scan.slices[int(hit[0])]), mode="L").save(buf, format="PNG")
        return buf.getvalue(), ".png"

