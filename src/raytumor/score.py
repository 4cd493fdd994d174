"""Batch scoring: a Ray Data job that turns a folder, bucket, manifest or archive of scans into score rows.

    list units (driver) → read + decode + preprocess (CPU tasks) → model (actor pool, GPU when present)
    → Parquet parts under OUTPUT/scores/ (+ scores.csv, per-slice rows, Grad-CAM PNGs on request)

A *unit* is what gets one output row: a file, an archive member (``archive!member``) or a volume (NIfTI,
multi-frame DICOM: one row with the max/mean slice score and the slice that gave the max). Bad input
becomes an error row, never a crash and never a missing row. Parts are written as blocks finish, so a
rerun of the same command reads the ids already written and scores only the rest (a part cut off mid
write has no Parquet footer: it is unreadable, deleted, and its units are scored again).

Nothing from inside a scan reaches the output but its pixels' scores: no DICOM tags (PHI), and archive
member names only ever appear as strings in the ``path`` column, never as output file names.
"""

from __future__ import annotations

import argparse
import json
import os
import posixpath
import tarfile
import time
import zipfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from raytumor import volumes
from raytumor.ingest import StorageOptions, get_filesystem, to_uri

SCORES_DIR = "scores"
EXPLAIN_DIR = "explain"
RUN_FILE = "run.json"
ADABN_FILE = "adabn_state.pt"
SUMMARY_FILE = "summary.json"
MANIFEST_SUFFIXES = (".csv", ".parquet", ".pq", ".txt")
# Containers whose members are scored one by one. ".gz" alone is not here: .nii.gz is a scan.
ARCHIVE_SUFFIXES = {
    ".zip": "zip",
    ".tar": "tar",
    ".tar.gz": "tar",
    ".tgz": "tar",
    ".tar.bz2": "tar",
    ".tbz2": "tar",
    ".tar.xz": "tar",
    ".txz": "tar",
}
MEMBER_SEP = "!"


def archive_kind(name: str) -> str | None:
    low = name.lower()
    for suffix, kind in ARCHIVE_SUFFIXES.items():
        if low.endswith(suffix):
            return kind
    return None


@dataclass
class ScoreConfig:
    bundle: str
    input: str
    output: str
    s3_endpoint: str | None = None
    batch_size: int | None = None  # images per forward pass; None: 256 on GPU, 8 on CPU
    threshold: float | None = None  # override the bundle's operating threshold
    csv: bool = False
    slice_rows: bool = False
    explain: bool = False
    min_foreground: float = 0.05  # volumes: slices with less head than this are not scored
    # Volumes (see raytumor.volumes): score slices 10-110 mm below the vertex; a positive must hold on
    # 10 mm of contiguous slices. 0 disables each rule.
    volume_skip_top_mm: float = volumes.DEFAULT_SKIP_TOP_MM
    volume_depth_mm: float = volumes.DEFAULT_DEPTH_MM
    volume_min_extent_mm: float = volumes.DEFAULT_MIN_EXTENT_MM
    # Test-time adaptation: "adabn" re-estimates BatchNorm statistics on (a sample of) this input first.
    adapt: str = "none"
    adapt_samples: int = 4096  # images (slices) the AdaBN pass measures; 0 = the whole input
    tta: str = "none"  # "flip": average with the left-right mirror
    max_file_bytes: int = 2 << 30
    units_per_block: int = 32  # resume granularity: a killed run loses at most the blocks in flight
    num_actors: int | None = None
    overwrite: bool = False


# ----------------------------------------------------------------------------------------------------------
# Listing (driver): every input file or archive member becomes exactly one unit


@dataclass
class Units:
    table: pd.DataFrame  # id, source, member, kind ('file' | 'zip' | 'tar'), size
    error_rows: list[tuple[str, str]] = field(default_factory=list)  # (id, reason) decided while listing
    duplicate_entries: int = 0  # manifest lines naming a path already listed


def _unit_rows(
    uri: str, fs: pafs.FileSystem, path: str, size: int
) -> tuple[list[dict], list[tuple[str, str]]]:
    kind = archive_kind(path)
    if kind == "zip":
        try:
            return _zip_members(uri, fs, path), []
        except Exception as e:  # not a zip after all, or a corrupt central directory: one error row
            return [], [(uri, f"corrupt zip archive: {type(e).__name__}: {e}"[:300])]
    return [{"id": uri, "source": uri, "member": None, "kind": kind or "file", "size": size}], []


def _zip_members(uri: str, fs: pafs.FileSystem, path: str) -> list[dict]:
    """One unit per file member; reading the central directory is a few small range reads, even on S3."""
    rows, seen = [], Counter()
    with fs.open_input_file(path) as f, zipfile.ZipFile(f) as zf:
        for info in zf.infolist():
            if info.is_dir():
                continue
            seen[info.filename] += 1
            rows.append(
                {
                    "id": _member_id(uri, info.filename, seen[info.filename]),
                    "source": uri,
                    "member": info.filename,
                    "member_n": seen[info.filename],
                    "kind": "zip",
                    "size": info.file_size,
                }
            )
    return rows


def _member_id(archive: str, member: str, occurrence: int) -> str:
    # An archive may hold the same name twice (tar appends); later copies get #2, #3... so ids stay unique.
    return f"{archive}{MEMBER_SEP}{member}" + (f"#{occurrence}" if occurrence > 1 else "")


def list_units(source: str, storage: StorageOptions | None = None) -> Units:
    """List a folder/prefix (recursively), a single file or archive, or a manifest with a ``path`` column."""
    fs, root = get_filesystem(source, storage)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"input not found: {source}")
    rows: list[dict] = []
    errors: list[tuple[str, str]] = []
    dup = 0
    if info.type == pafs.FileType.Directory:
        for fi in fs.get_file_info(pafs.FileSelector(root, recursive=True)):
            if fi.type == pafs.FileType.File:
                r, e = _unit_rows(to_uri(source, fi.path), fs, fi.path, fi.size or 0)
                rows += r
                errors += e
    elif root.lower().endswith(MANIFEST_SUFFIXES):
        paths = _read_manifest(source, fs, root)
        seen: set[str] = set()
        for p in paths:
            if p in seen:
                dup += 1
                continue
            seen.add(p)
            pfs, ppath = get_filesystem(p, storage)
            pi = pfs.get_file_info(ppath)
            if pi.type != pafs.FileType.File:
                errors.append((p, "not found" if pi.type == pafs.FileType.NotFound else "not a file"))
                continue
            r, e = _unit_rows(p, pfs, ppath, pi.size or 0)
            rows += r
            errors += e
    else:
        r, e = _unit_rows(source, fs, root, info.size or 0)
        rows += r
        errors += e
    cols = ["id", "source", "member", "member_n", "kind", "size"]
    table = pd.DataFrame(rows, columns=cols)
    table["member_n"] = table["member_n"].fillna(1).astype(np.int64)
    table["size"] = table["size"].fillna(0).astype(np.int64)
    return Units(table.sort_values("id", ignore_index=True), errors, dup)


def _read_manifest(source: str, fs: pafs.FileSystem, path: str) -> list[str]:
    with fs.open_input_file(path) as f:
        low = path.lower()
        if low.endswith(".txt"):
            paths = [ln.strip() for ln in f.read().decode("utf-8").splitlines()]
            paths = [p for p in paths if p and not p.startswith("#")]
        else:
            df = pd.read_csv(f, dtype=str) if low.endswith(".csv") else pd.read_parquet(f)
            if "path" not in df.columns:
                raise ValueError(f"manifest {source} needs a 'path' column (has {list(df.columns)})")
            paths = df["path"].dropna().astype(str).tolist()
    base = source.rsplit("/", 1)[0] if "/" in source else "."
    out = []
    for p in paths:
        if p.startswith("/") or len(urlparse(p).scheme) > 1:
            out.append(p)
        else:  # relative to the manifest, like training manifests
            out.append(f"{base}/{p}" if "://" in base else os.path.normpath(os.path.join(base, p)))
    return out


# ----------------------------------------------------------------------------------------------------------
# Read + decode + preprocess (Ray Data CPU tasks)

DECODED_COLUMNS = ("path", "kind", "format", "n_slices", "slice_index", "spacing", "pixels", "error")


def _decoded_row(
    path: str,
    image_size: int,
    data: bytes | None,
    error: str | None,
    min_fg: float,
    prep: Any = None,
    volume_range: tuple[float, float] = (0.0, 0.0),
) -> dict:
    """Decode one unit's bytes into (K, S, S) uint8 model inputs (after the bundle's preprocessing),
    flattened to bytes (a ragged-safe column)."""
    from raytumor import formats
    from raytumor.preprocess import to_model_input

    row = {
        "path": path,
        "kind": None,
        "format": None,
        "n_slices": 0,
        "slice_index": b"",
        "spacing": np.nan,
        "pixels": b"",
    }
    if error is None and data is not None:
        try:
            scan = formats.decode_scan(data, draft_size=image_size, min_foreground=min_fg)
            slices, index = scan.slices, np.asarray(scan.slice_index)
            if scan.kind == "volume":  # only the slices a 2-D model was trained on (volumes.py)
                keep = volumes.brain_slice_range(index, scan.spacing_mm, *volume_range)
                slices, index = slices[keep], index[keep]
            stack = np.stack([to_model_input(s, image_size, prep) for s in slices])
            row.update(
                kind=scan.kind,
                format=scan.format,
                n_slices=len(stack),
                slice_index=index.astype(np.int32).tobytes(),
                spacing=scan.spacing_mm if scan.spacing_mm else np.nan,
                pixels=stack.tobytes(),
            )
        except formats.DecodeError as e:
            error = e.reason
            row["format"] = formats.sniff_format(data)
        except MemoryError:
            error = "out of memory while decoding"
        except Exception as e:  # a decoder bug costs one row, not the run
            error = f"decode failed: {type(e).__name__}: {e}"[:300]
    row["error"] = error
    return row


def _read_limited(stream: Any, limit: int) -> bytes:
    data = stream.read(limit + 1)
    if len(data) > limit:
        raise _TooLarge(f"larger than --max-file-bytes {limit}")
    return data


class _TooLarge(Exception):
    pass


class ReadDecode:
    """Callable for ``map_batches``: unit rows in, decoded rows out (tars expand to one row per member)."""

    def __init__(
        self,
        image_size: int,
        storage: StorageOptions | None,
        max_file_bytes: int,
        min_foreground: float,
        done_ids: Any = None,
        out_rows: int = 32,
        preprocess: dict | None = None,
        volume_range: tuple[float, float] = (0.0, 0.0),
    ) -> None:
        from raytumor.preprocess import PreprocessConfig

        self.prep = PreprocessConfig.from_dict(preprocess) if preprocess else None
        self.volume_range = tuple(volume_range)
        self.image_size = image_size
        self.storage = storage
        self.max_bytes = max_file_bytes
        self.min_fg = min_foreground
        self.done_ids = done_ids  # ray.ObjectRef of a set of ids already scored (tar members on resume)
        self.out_rows = out_rows
        self._zip: tuple[str, zipfile.ZipFile, Any, dict] | None = None

    def __call__(self, batch: dict[str, np.ndarray]) -> Iterator[dict[str, Any]]:
        done: set[str] = set()
        if self.done_ids is not None and (batch["kind"] == "tar").any():
            import ray

            done = ray.get(self.done_ids)
        rows: list[dict] = []
        try:
            for i in range(len(batch["id"])):
                kind = batch["kind"][i]
                if kind == "tar":
                    for row in self._tar_rows(str(batch["source"][i]), done):
                        rows.append(row)
                        if len(rows) >= self.out_rows:
                            yield _columns(rows)
                            rows = []
                    continue
                rows.append(self._one(batch, i))
                if len(rows) >= self.out_rows:
                    yield _columns(rows)
                    rows = []
            if rows:
                yield _columns(rows)
        finally:
            self._close_zip()

    def _one(self, batch: dict[str, np.ndarray], i: int) -> dict:
        uid, source, kind = str(batch["id"][i]), str(batch["source"][i]), batch["kind"][i]
        if int(batch["size"][i]) > self.max_bytes:
            return _decoded_row(uid, self.image_size, None, f"too large: {int(batch['size'][i])} bytes", 0)
        try:
            if kind == "zip":
                data = self._zip_member(source, str(batch["member"][i]), int(batch["member_n"][i]))
            else:
                fs, path = get_filesystem(source, self.storage)
                with fs.open_input_stream(path, compression=None) as f:  # raw bytes: see read_bytes
                    data = _read_limited(f, self.max_bytes)
        except _TooLarge as e:
            return _decoded_row(uid, self.image_size, None, f"too large: {e}", 0)
        except RuntimeError as e:  # zipfile: encrypted members need a password
            return _decoded_row(uid, self.image_size, None, f"unreadable archive member: {e}"[:300], 0)
        except Exception as e:  # permissions, vanished object, network, corrupt archive member
            return _decoded_row(uid, self.image_size, None, f"unreadable: {type(e).__name__}: {e}"[:300], 0)
        return _decoded_row(uid, self.image_size, data, None, self.min_fg, self.prep, self.volume_range)

    def _zip_member(self, source: str, member: str, occurrence: int) -> bytes:
        if self._zip is None or self._zip[0] != source:
            self._close_zip()
            fs, path = get_filesystem(source, self.storage)
            f = fs.open_input_file(path)  # random access: only the members' byte ranges are read
            zf = zipfile.ZipFile(f)
            by_name: dict[str, list[zipfile.ZipInfo]] = {}
            for z in zf.infolist():  # a name may repeat: the n-th occurrence is the n-th entry
                by_name.setdefault(z.filename, []).append(z)
            self._zip = (source, zf, f, by_name)
        zf, by_name = self._zip[1], self._zip[3]
        info = by_name[member][occurrence - 1]
        if info.file_size > self.max_bytes:
            raise _TooLarge(f"{info.file_size} bytes uncompressed")
        with zf.open(info) as m:  # reads and CRC-checks the member in memory; nothing touches disk
            return _read_limited(m, self.max_bytes)

    def _close_zip(self) -> None:
        if self._zip is not None:
            self._zip[1].close()
            self._zip[2].close()
            self._zip = None

    def _tar_rows(self, source: str, done: set[str]) -> Iterator[dict]:
        """Stream a tar(.gz/.bz2/.xz) member by member: memory holds one member, never the archive."""
        fs, path = get_filesystem(source, self.storage)
        seen: Counter = Counter()
        n = 0
        try:
            with (
                fs.open_input_stream(path, compression=None) as raw,
                tarfile.open(fileobj=raw, mode="r|*") as tf,
            ):
                for m in tf:
                    if m.isdir():
                        continue
                    seen[m.name] += 1
                    uid = _member_id(source, m.name, seen[m.name])
                    n += 1
                    if uid in done:
                        continue
                    if not m.isfile():  # links and devices are never followed
                        yield _decoded_row(uid, self.image_size, None, "archive member is a link", 0)
                    elif m.size > self.max_bytes:
                        yield _decoded_row(uid, self.image_size, None, f"too large: {m.size} bytes", 0)
                    else:
                        f = tf.extractfile(m)
                        data = f.read() if f is not None else b""
                        yield _decoded_row(
                            uid, self.image_size, data, None, self.min_fg, self.prep, self.volume_range
                        )
        except Exception as e:
            # Not a tar, or cut off: members read so far stand; the archive itself gets one error row.
            what = "truncated or corrupt tar archive" if n else "corrupt tar archive"
            if source not in done:
                yield _decoded_row(source, self.image_size, None, f"{what}: {type(e).__name__}: {e}"[:300], 0)
            return
        if n == 0 and source not in done:
            yield _decoded_row(source, self.image_size, None, "empty archive", 0)


def _columns(rows: list[dict]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k in DECODED_COLUMNS:
        vals = [r[k] for r in rows]
        if k == "n_slices":
            out[k] = np.array(vals, dtype=np.int64)
        elif k == "spacing":
            out[k] = np.array(vals, dtype=np.float64)
        else:
            out[k] = np.array(vals, dtype=object)
    return out


# ----------------------------------------------------------------------------------------------------------
# Model (actor pool)


def output_schema(classes: list[str], explain: bool, slice_rows: bool) -> pa.Schema:
    fields = [
        pa.field("path", pa.string()),
        *[pa.field(f"prob_{c}", pa.float32()) for c in classes],
        pa.field("score", pa.float32()),
        pa.field("label", pa.string()),
        pa.field("kind", pa.string()),
        pa.field("format", pa.string()),
        pa.field("n_slices", pa.int32()),
        pa.field("slice", pa.int32()),
        pa.field("score_mean", pa.float32()),
        pa.field("score_max", pa.float32()),
        pa.field("adaptation", pa.string()),
        pa.field("bundle_id", pa.string()),
        pa.field("bundle_version", pa.string()),
        pa.field("error", pa.string()),
        pa.field("scored_at", pa.timestamp("ms", tz="UTC")),
    ]
    if explain:
        fields.append(pa.field("explain", pa.string()))
    if slice_rows:
        fields += [
            pa.field("slice_indices", pa.list_(pa.int32())),
            pa.field("slice_scores", pa.list_(pa.float32())),
        ]
    return pa.schema(fields)


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
    ) -> None:
        import torch

        from raytumor.adapt import apply_bn_state
        from raytumor.bundle import fetch_bundle, load_bundle

        if num_threads:
            torch.set_num_threads(num_threads)
        self.bundle = load_bundle(fetch_bundle(bundle_dir, storage))
        if bn_state is not None:  # AdaBN: the archive's BatchNorm statistics, every weight untouched
            self.bundle.model = apply_bn_state(self.bundle.model, bn_state)
        self.meta = self.bundle.meta
        self.min_extent_mm = min_extent_mm
        self.tta = tta
        self.adaptation = adaptation
        self.batch_size = batch_size
        self.threshold = self.meta.threshold if threshold is None else threshold
        self.label_meta = replace(self.meta, threshold=self.threshold)  # --threshold override
        self.explain_dir = explain_dir
        self.storage = storage
        self.slice_rows = slice_rows
        self.schema = output_schema(self.meta.classes, explain_dir is not None, slice_rows)
        self.bundle_version = f"raytumor {self.meta.versions.get('raytumor', '?')} / {self.meta.created_at}"
        size = self.meta.image_size
        self.shape = (size, size)
        self._cam = None

    def _probs(self, images: np.ndarray) -> np.ndarray:
        from raytumor.adapt import flip_tta_probs
        from raytumor.predict import forward_probs

        fwd = flip_tta_probs if self.tta == "flip" else forward_probs
        out = [
            fwd(
                self.bundle.model, images[s : s + self.batch_size], self.bundle.device, self.meta.temperature
            ).numpy()
            for s in range(0, len(images), self.batch_size)
        ]
        return np.concatenate(out) if out else np.zeros((0, self.meta.num_classes), np.float32)

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        from raytumor.bundle import tumour_scores
        from raytumor.predict import predict_labels

        n = len(batch["path"])
        errors = [e if isinstance(e, str) and e else None for e in batch["error"]]
        counts = np.array([int(k) if errors[i] is None else 0 for i, k in enumerate(batch["n_slices"])])
        stacks = [
            np.frombuffer(batch["pixels"][i], dtype=np.uint8).reshape(-1, *self.shape)
            for i in range(n)
            if counts[i]
        ]
        probs = self._probs(np.concatenate(stacks)) if stacks else np.zeros((0, self.meta.num_classes))
        try:
            slice_scores = np.asarray(tumour_scores(probs, self.meta), dtype=np.float32)
        except ValueError:  # multi-class without a negative class: no scalar score, argmax decides
            slice_scores = None
        cls = self.meta.classes
        p_out = np.full((n, len(cls)), np.nan, dtype=np.float32)
        score = np.full(n, np.nan, dtype=np.float32)
        score_mean = np.full(n, np.nan, dtype=np.float32)
        score_max = np.full(n, np.nan, dtype=np.float32)
        best = np.full(n, -1, dtype=np.int64)
        spacing = np.asarray(batch["spacing"], dtype=np.float64) if "spacing" in batch else np.full(n, np.nan)
        idx_lists: list[list[int] | None] = [None] * n
        sc_lists: list[list[float] | None] = [None] * n
        start = 0
        for i in range(n):
            k = counts[i]
            if not k:
                continue
            p = probs[start : start + k]
            s = slice_scores[start : start + k] if slice_scores is not None else None
            if s is not None and k > 1:
                # A volume scores what holds on enough contiguous slices (volumes.volume_score); the
                # single most suspicious slice and the mean are kept for context.
                z = np.frombuffer(batch["slice_index"][i], dtype=np.int32)
                sp = float(spacing[i]) if np.isfinite(spacing[i]) else None
                vs, j = volumes.volume_score(s, z, sp, self.min_extent_mm)
                score[i] = vs
            else:
                j = int(np.argmax(s)) if s is not None else int(np.argmax(p.max(1)))
                if s is not None:
                    score[i] = s[j]
            best[i], p_out[i] = j, p[j]
            if s is not None:
                score_mean[i], score_max[i] = s.mean(), s.max()
            if self.slice_rows:
                idx_lists[i] = np.frombuffer(batch["slice_index"][i], dtype=np.int32).tolist()
                sc_lists[i] = (s if s is not None else p.max(1)).astype(np.float32).tolist()
            start += k
        ok = counts > 0
        pred = predict_labels(p_out, score, self.label_meta)
        labels = [cls[int(pred[i])] if ok[i] else None for i in range(n)]
        slice_src = [
            int(np.frombuffer(batch["slice_index"][i], dtype=np.int32)[best[i]]) if ok[i] else None
            for i in range(n)
        ]
        kinds = [k if isinstance(k, str) else None for k in batch["kind"]]
        cols: dict[str, Any] = {
            "path": [str(p) for p in batch["path"]],
            **{f"prob_{c}": p_out[:, j] for j, c in enumerate(cls)},
            "score": score,
            "label": labels,
            "kind": kinds,
            "format": [f if isinstance(f, str) else None for f in batch["format"]],
            "n_slices": np.where(ok, counts, 0).astype(np.int32),
            "slice": [s if kinds[i] == "volume" else None for i, s in enumerate(slice_src)],
            "score_mean": np.where(np.array(kinds, dtype=object) == "volume", score_mean, np.nan),
            "score_max": np.where(np.array(kinds, dtype=object) == "volume", score_max, np.nan),
            "adaptation": [self.adaptation] * n,
            "bundle_id": [self.meta.bundle_id] * n,
            "bundle_version": [self.bundle_version] * n,
            "error": errors,
            "scored_at": [datetime.now(timezone.utc)] * n,
        }
        if self.explain_dir is not None:
            cols["explain"] = self._explain(batch, best, labels, score)
        if self.slice_rows:
            cols["slice_indices"], cols["slice_scores"] = idx_lists, sc_lists
        return pa.Table.from_pydict(cols, schema=self.schema)

    def _explain(self, batch: dict, best: np.ndarray, labels: list, score: np.ndarray) -> list[str | None]:
        """Grad-CAM overlay for each positive unit (its most suspicious slice), named by a hash of its id."""
        from raytumor.explain import GradCAM, explain_name, overlay_png

        neg = self.meta.negative_class
        positive = [
            i for i in range(len(labels)) if labels[i] is not None and (neg is None or labels[i] != neg)
        ]
        out: list[str | None] = [None] * len(labels)
        if not positive:
            return out
        if self._cam is None:
            self._cam = GradCAM(self.bundle.model)
        fs, root = get_filesystem(self.explain_dir, self.storage)
        images = np.stack(
            [
                np.frombuffer(batch["pixels"][i], dtype=np.uint8).reshape(-1, *self.shape)[best[i]]
                for i in positive
            ]
        )
        targets = [self.meta.classes.index(labels[i]) for i in positive]  # CAM of the predicted class
        for s in range(0, len(positive), self.batch_size):
            chunk = positive[s : s + self.batch_size]
            cams = self._cam(images[s : s + len(chunk)], targets[s : s + len(chunk)])
            for j, i in enumerate(chunk):
                name = explain_name(str(batch["path"][i]))
                png = overlay_png(
                    images[s + j], cams[j], caption=f"{labels[i]} {score[i]:.2f} - research use only"
                )
                with fs.open_output_stream(posixpath.join(root, name)) as f:
                    f.write(png)
                out[i] = f"{EXPLAIN_DIR}/{name}"
        return out


# ----------------------------------------------------------------------------------------------------------
# Output folder: resume, summary, CSV, per-slice rows


def _join(base: str, *parts: str) -> str:
    return posixpath.join(base.rstrip("/"), *parts) if "://" in base else os.path.join(base, *parts)


def scored_ids(output: str, storage: StorageOptions | None) -> tuple[set[str], int]:
    """Ids already in OUTPUT/scores; parts without a readable footer (a killed write) are deleted."""
    fs, root = get_filesystem(_join(output, SCORES_DIR), storage)
    if fs.get_file_info(root).type != pafs.FileType.Directory:
        return set(), 0
    ids: set[str] = set()
    removed = 0
    for fi in fs.get_file_info(pafs.FileSelector(root, recursive=False)):
        if fi.type != pafs.FileType.File or not fi.path.endswith(".parquet"):
            continue
        try:
            with fs.open_input_file(fi.path) as f:
                ids.update(pq.read_table(f, columns=["path"]).column("path").to_pylist())
        except Exception:
            fs.delete_file(fi.path)
            removed += 1
    return ids, removed


def _parts(output: str, storage: StorageOptions | None) -> tuple[pafs.FileSystem, list[str]]:
    fs, root = get_filesystem(_join(output, SCORES_DIR), storage)
    if fs.get_file_info(root).type != pafs.FileType.Directory:
        return fs, []
    sel = fs.get_file_info(pafs.FileSelector(root, recursive=False))
    return fs, sorted(fi.path for fi in sel if fi.type == pafs.FileType.File and fi.path.endswith(".parquet"))


def read_scores(
    output: str,
    storage: StorageOptions | None = None,
    columns: list[str] | None = None,
    skip_unreadable: bool = False,
) -> pd.DataFrame:
    """All score rows of an output folder as one DataFrame (for tests and small runs).

    ``skip_unreadable``: ignore parts a killed run left half-written (the next run deletes them).
    """
    fs, parts = _parts(output, storage)
    tables = []
    for p in parts:
        try:
            with fs.open_input_file(p) as f:
                tables.append(pq.read_table(f, columns=columns))
        except Exception:
            if not skip_unreadable:
                raise
    if not tables:
        return pd.DataFrame(columns=columns or ["path"])
    return pa.concat_tables(tables, promote_options="default").to_pandas()


def _write_text(uri: str, text: str, storage: StorageOptions | None) -> None:
    fs, path = get_filesystem(uri, storage)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(text.encode())


def _read_text(uri: str, storage: StorageOptions | None) -> str | None:
    fs, path = get_filesystem(uri, storage)
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as f:
        return f.read().decode()


def write_csv(output: str, storage: StorageOptions | None) -> str:
    """OUTPUT/scores.csv from the Parquet parts, one part at a time (bounded memory)."""
    import pyarrow.csv as pacsv

    fs, parts = _parts(output, storage)
    ofs, opath = get_filesystem(_join(output, "scores.csv"), storage)
    writer = None
    with ofs.open_output_stream(opath) as out:
        for p in parts:
            with fs.open_input_file(p) as f:
                t = pq.read_table(f)
            t = t.drop_columns([c for c in ("slice_indices", "slice_scores") if c in t.column_names])
            if writer is None:
                writer = pacsv.CSVWriter(out, t.schema)
            writer.write_table(t)
        if writer is not None:
            writer.close()
    return _join(output, "scores.csv")


def write_slice_rows(output: str, storage: StorageOptions | None) -> str:
    """OUTPUT/slices.parquet: one row per scored slice of every volume (path, slice, score)."""
    fs, parts = _parts(output, storage)
    ofs, opath = get_filesystem(_join(output, "slices.parquet"), storage)
    schema = pa.schema([("path", pa.string()), ("slice", pa.int32()), ("score", pa.float32())])
    with ofs.open_output_stream(opath) as out, pq.ParquetWriter(out, schema) as w:
        for p in parts:
            with fs.open_input_file(p) as f:
                t = pq.read_table(f, columns=["path", "kind", "slice_indices", "slice_scores"])
            t = t.filter(pa.compute.equal(t["kind"], "volume"))
            if t.num_rows == 0:
                continue
            lens = pa.compute.list_value_length(t["slice_indices"])
            w.write_table(
                pa.table(
                    {
                        "path": np.repeat(t["path"].to_numpy(zero_copy_only=False), lens.to_numpy()),
                        "slice": pa.compute.list_flatten(t["slice_indices"]),
                        "score": pa.compute.list_flatten(t["slice_scores"]),
                    },
                    schema=schema,
                )
            )
    return _join(output, "slices.parquet")


SUMMARY_COLUMNS = ["path", "label", "error", "kind", "n_slices"]


def summarise(df: pd.DataFrame, negative_class: str | None) -> dict[str, Any]:
    """Counts over all score rows (``SUMMARY_COLUMNS`` of an output folder)."""
    err = df["error"].notna()
    # Without a no-tumour class (multi-class bundles) nothing is "positive": see the label counts.
    if negative_class:
        pos = df["label"].notna() & (df["label"] != negative_class)
    else:
        pos = pd.Series(False, index=df.index)
    return {
        "labels": {str(k): int(v) for k, v in df["label"].value_counts().items()},
        "rows": int(len(df)),
        "unique_paths": int(df["path"].nunique()),
        "scored": int((~err).sum()),
        "errors": int(err.sum()),
        "positives": int(pos.sum()),
        "volumes": int((df["kind"] == "volume").sum()),
        "images_scored": int(df["n_slices"].fillna(0).sum()),
        "error_reasons": dict(Counter(str(e).split(":", 1)[0] for e in df.loc[err, "error"]).most_common(20)),
    }


# ----------------------------------------------------------------------------------------------------------
# The job


def score(cfg: ScoreConfig) -> dict[str, Any]:
    """Score every unit at ``cfg.input`` into ``cfg.output``; returns the run summary."""
    import ray
    import ray.data
    from ray.data import ActorPoolStrategy

    from raytumor.bundle import fetch_bundle, read_meta
    from raytumor.evaluate import predictor_resources

    t0 = time.time()
    storage = StorageOptions.from_env(cfg.s3_endpoint)
    meta = read_meta(fetch_bundle(cfg.bundle, storage))
    threshold = meta.threshold if cfg.threshold is None else cfg.threshold
    if cfg.adapt not in ("none", "adabn") or cfg.tta not in ("none", "flip"):
        raise ValueError(f"adapt must be none|adabn and tta none|flip, got {cfg.adapt!r}, {cfg.tta!r}")
    adaptation = adaptation_label(cfg)
    run = {
        "bundle": str(cfg.bundle),
        "bundle_id": meta.bundle_id,
        "input": cfg.input,
        "threshold": threshold,
        "adaptation": adaptation,
        "volume_rule": [cfg.volume_skip_top_mm, cfg.volume_depth_mm, cfg.volume_min_extent_mm],
    }
    previous = _read_text(_join(cfg.output, RUN_FILE), storage)
    if previous and not cfg.overwrite:
        prev = json.loads(previous)
        prev.setdefault("adaptation", "none")  # outputs written before adaptation existed
        prev.setdefault("volume_rule", run["volume_rule"])
        for k in ("bundle_id", "input", "threshold", "adaptation", "volume_rule"):
            if prev.get(k) != run[k]:
                raise ValueError(
                    f"{cfg.output} holds scores for {k}={prev.get(k)!r}, not {run[k]!r}: "
                    "use another --output, or --overwrite to start again"
                )
    if cfg.overwrite:
        fs, root = get_filesystem(cfg.output, storage)
        if fs.get_file_info(root).type == pafs.FileType.Directory:
            fs.delete_dir_contents(root)
    _write_text(
        _join(cfg.output, RUN_FILE), json.dumps({**run, "config": asdict(cfg)}, indent=2) + "\n", storage
    )

    units = list_units(cfg.input, storage)
    done, removed = scored_ids(cfg.output, storage)
    todo = units.table[~units.table["id"].isin(done) | (units.table["kind"] == "tar")]
    listing_errors = [(i, r) for i, r in units.error_rows if i not in done]
    t_list = time.time() - t0
    print(
        f"[score] {len(units.table)} units listed ({(units.table['kind'] == 'tar').sum()} tar archives streamed), "
        f"{len(done)} already scored, {len(todo)} to read"
        + (f", {removed} partial parts from an interrupted run removed" if removed else ""),
        flush=True,
    )

    r = predictor_resources()
    gpu = r["num_gpus"] > 0
    volume_range = (cfg.volume_skip_top_mm, cfg.volume_depth_mm)
    bn_state, adapt_info = None, None
    if cfg.adapt == "adabn" and (len(todo) or listing_errors):
        bn_state, adapt_info = _adabn_state(cfg, units, meta, storage, r, volume_range)
    # CPU: small batches stay in cache; measured on 2 cores, 1-thread replica, images/s at 8/16/32/64:
    # ResNet-18 224 px 56/51/49/45, EfficientNet-Lite0 160 px 162/114/140/- (bench/score_throughput.py).
    batch_size = cfg.batch_size or (256 if gpu else 8)
    explain_dir = _join(cfg.output, EXPLAIN_DIR) if cfg.explain else None
    if explain_dir and "://" not in explain_dir:
        os.makedirs(explain_dir, exist_ok=True)
    scores_uri = _join(cfg.output, SCORES_DIR)
    sfs, spath = get_filesystem(scores_uri, storage)
    sfs.create_dir(spath, recursive=True)
    done_ref = ray.put(done) if done and (todo["kind"] == "tar").any() else None
    n_todo = len(todo) + len(listing_errors)
    if n_todo:
        err_rows = pd.DataFrame(
            [
                {"id": i, "source": i, "member": None, "member_n": 1, "kind": "error", "size": 0}
                for i, _ in listing_errors
            ],
            columns=todo.columns,
        )
        frame = (
            pd.concat([todo, err_rows], ignore_index=True) if listing_errors else todo.reset_index(drop=True)
        )
        reasons = dict(listing_errors)
        n_blocks = max(1, -(-len(frame) // cfg.units_per_block))
        ds = ray.data.from_pandas(frame).repartition(n_blocks)
        ds = _map_read_decode(
            ds, cfg, meta, storage, r, volume_range, cfg.units_per_block, done_ids=done_ref, errors=reasons
        )
        size = cfg.num_actors or r["size"]
        ds = ds.map_batches(
            ScorePredictor,
            fn_constructor_kwargs={
                # a bucket URI stays a URI: actors on other nodes fetch it themselves
                "bundle_dir": cfg.bundle if "://" in cfg.bundle else str(Path(cfg.bundle).resolve()),
                "batch_size": batch_size,
                "threshold": cfg.threshold,
                "num_threads": r["threads"],
                "explain_dir": explain_dir,
                "storage": storage,
                "slice_rows": cfg.slice_rows,
                "min_extent_mm": cfg.volume_min_extent_mm,
                "tta": cfg.tta,
                "bn_state": bn_state,
                "adaptation": adaptation,
            },
            compute=ActorPoolStrategy(size=size),
            # A GPU wants whole forward batches; blocks stay small (resume granularity) and get bundled.
            batch_size=max(cfg.units_per_block, batch_size if gpu else 0),
            num_cpus=r["num_cpus"],
            num_gpus=r["num_gpus"],
            batch_format="numpy",
        )
        ds.write_parquet(spath, filesystem=sfs)
    wall = time.time() - t0
    rows = read_scores(cfg.output, storage, columns=SUMMARY_COLUMNS)
    summary = summarise(rows, meta.negative_class)
    # Rows in == rows out: every listed file/zip member has a row (tar members are known only once read).
    listed = set(units.table.loc[units.table["kind"] != "tar", "id"]) | {i for i, _ in units.error_rows}
    ids = set(rows["path"])
    summary.update(
        {
            "input": cfg.input,
            "output": cfg.output,
            "bundle_id": meta.bundle_id,
            "threshold": threshold,
            "units_listed": len(units.table) + len(units.error_rows),
            "duplicate_manifest_entries": units.duplicate_entries,
            "missing_rows": len(listed - ids),
            "duplicate_rows": summary["rows"] - summary["unique_paths"],
            "this_run_units": n_todo,
            "resumed_from": len(done),
            "seconds": round(wall, 2),
            "listing_seconds": round(t_list, 2),
            "units_per_s": round(n_todo / wall, 2) if wall > 0 else None,
            "device": "gpu" if gpu else "cpu",
            "batch_size": batch_size,
            "actors": cfg.num_actors or r["size"],
            "adaptation": adaptation,
            **({"adabn": adapt_info} if adapt_info else {}),
        }
    )
    if cfg.csv:
        summary["csv"] = write_csv(cfg.output, storage)
    if cfg.slice_rows:
        summary["slices"] = write_slice_rows(cfg.output, storage)
    _write_text(_join(cfg.output, SUMMARY_FILE), json.dumps(summary, indent=2, default=str) + "\n", storage)
    return summary


def adaptation_label(cfg: ScoreConfig) -> str:
    """What the ``adaptation`` column says: ``none``, ``adabn``, ``tta-flip`` or ``adabn+tta-flip``."""
    parts = (["adabn"] if cfg.adapt == "adabn" else []) + (["tta-flip"] if cfg.tta == "flip" else [])
    return "+".join(parts) or "none"


class BNStatsTask:
    """Actor for the AdaBN pass: BatchNorm input statistics of each decoded batch (one state per batch).

    States are tiny next to the images (two float64 vectors per BN layer) and merge exactly in any order
    (``adapt.merge_states``), so the driver folds them in as they stream past."""

    def __init__(self, bundle_dir: str, storage: StorageOptions | None, num_threads: int | None) -> None:
        import torch

        from raytumor.bundle import fetch_bundle, load_bundle

        if num_threads:
            torch.set_num_threads(num_threads)
        self.bundle = load_bundle(fetch_bundle(bundle_dir, storage))
        size = self.bundle.meta.image_size
        self.shape = (size, size)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import io

        import torch

        from raytumor.adapt import BNStatsAccumulator

        stacks = [
            np.frombuffer(batch["pixels"][i], dtype=np.uint8).reshape(-1, *self.shape)
            for i in range(len(batch["path"]))
            if not (isinstance(batch["error"][i], str) and batch["error"][i]) and int(batch["n_slices"][i])
        ]
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


def _map_read_decode(
    ds: Any,
    cfg: ScoreConfig,
    meta: Any,
    storage: Any,
    r: dict[str, Any],
    volume_range: tuple[float, float],
    batch_size: int,
    *,
    done_ids: Any = None,
    errors: dict[str, str] | None = None,
) -> Any:
    """The read/decode stage shared by the AdaBN pass and scoring: same decoding, preprocessing and slice
    range, so the statistics are those of exactly what the scoring actors will see."""
    return ds.map_batches(
        _read_decode_task,
        fn_kwargs={
            "image_size": meta.image_size,
            "storage": storage,
            "max_file_bytes": cfg.max_file_bytes,
            "min_foreground": cfg.min_foreground,
            "preprocess": meta.preprocess,
            "volume_range": volume_range,
            "done_ids": done_ids,
            "listing_errors": errors or {},
        },
        batch_size=batch_size,
        batch_format="numpy",
        num_cpus=r["decode_cpus"],
    )


def _adabn_state(
    cfg: ScoreConfig,
    units: Units,
    meta: Any,
    storage: StorageOptions | None,
    r: dict[str, Any],
    volume_range: tuple[float, float],
) -> tuple[dict | None, dict[str, Any]]:
    """First streaming pass of ``--adapt adabn``: BN statistics of (a seeded random sample of) the input.

    Saved as OUTPUT/adabn_state.pt; a resumed run reuses it, so every row of one output was scored with the
    same statistics."""
    import io

    import ray.data
    import torch
    from ray.data import ActorPoolStrategy

    from raytumor.adapt import has_batchnorm, merge_states

    uri = _join(cfg.output, ADABN_FILE)
    fs, path = get_filesystem(uri, storage)
    if fs.get_file_info(path).type == pafs.FileType.File:
        with fs.open_input_stream(path) as f:
            state = torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=True)
        return state, {"images": int(state["images_seen"]), "reused": True}
    from raytumor.bundle import fetch_bundle, load_bundle

    if not has_batchnorm(load_bundle(fetch_bundle(cfg.bundle, storage), device="cpu").model):
        print(
            f"[score] AdaBN: {meta.backbone} has no BatchNorm layers; scoring without adaptation", flush=True
        )
        return None, {"images": 0, "skipped": "no BatchNorm layers"}
    t0 = time.time()
    table = units.table
    # Volumes hold ~50-100 slices each: cap units too, or the sample would be the whole archive.
    n_units = len(table) if cfg.adapt_samples <= 0 else min(len(table), cfg.adapt_samples)
    sample = table.sample(n=n_units, random_state=0) if n_units < len(table) else table
    ds = ray.data.from_pandas(sample.reset_index(drop=True)).repartition(max(1, -(-len(sample) // 64)))
    ds = _map_read_decode(ds, cfg, meta, storage, r, volume_range, 64)
    ds = ds.map_batches(
        BNStatsTask,
        fn_constructor_kwargs={
            "bundle_dir": cfg.bundle if "://" in cfg.bundle else str(Path(cfg.bundle).resolve()),
            "storage": storage,
            "num_threads": r["threads"],
        },
        compute=ActorPoolStrategy(size=cfg.num_actors or r["size"]),
        batch_size=64,
        num_cpus=r["num_cpus"],
        num_gpus=r["num_gpus"],
        batch_format="numpy",
    )
    state: dict | None = None
    seen = 0
    for row in ds.iter_rows():
        part = torch.load(io.BytesIO(row["state"]), map_location="cpu", weights_only=True)
        state = part if state is None else merge_states([state, part])
        seen += int(row["images"])
        if cfg.adapt_samples > 0 and seen >= cfg.adapt_samples:
            break  # enough images: dropping the iterator stops the rest of the pass
    if state is None or not state["layers"]:
        print("[score] AdaBN: no decodable images to adapt on; scoring without adaptation", flush=True)
        return None, {"images": 0, "skipped": "no decodable images"}
    buf = io.BytesIO()
    torch.save(state, buf)
    fs.create_dir(posixpath.dirname(path) or ".", recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(buf.getvalue())
    info = {
        "images": int(state["images_seen"]),
        "units_sampled": n_units,
        "seconds": round(time.time() - t0, 1),
    }
    print(
        f"[score] AdaBN: BatchNorm statistics from {info['images']} images in {info['seconds']} s", flush=True
    )
    return state, info


def _read_decode_task(
    batch: dict[str, np.ndarray],
    *,
    image_size: int,
    storage: StorageOptions | None,
    max_file_bytes: int,
    min_foreground: float,
    done_ids: Any,
    listing_errors: dict[str, str],
    preprocess: dict | None = None,
    volume_range: tuple[float, float] = (0.0, 0.0),
) -> Iterator[dict[str, Any]]:
    """Ray Data task body: units whose fate was decided while listing pass through as error rows."""
    listed = np.array([k == "error" for k in batch["kind"]], dtype=bool)
    if listed.any():
        rows = [
            _decoded_row(str(i), image_size, None, listing_errors.get(str(i), "unreadable"), 0)
            for i in batch["id"][listed]
        ]
        yield _columns(rows)
        batch = {k: v[~listed] for k, v in batch.items()}
        if not len(batch["id"]):
            return
    yield from ReadDecode(
        image_size,
        storage,
        max_file_bytes,
        min_foreground,
        done_ids,
        preprocess=preprocess,
        volume_range=volume_range,
    )(batch)


# ----------------------------------------------------------------------------------------------------------
# CLI


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Batch-score a folder, bucket, manifest or .zip/.tar archive of scans with a model bundle "
        "(one row per file/member/volume, resumable)",
        add_help=add_help,
    )
    p.add_argument("--bundle", required=True, help="model bundle directory (from raytumor train/tune)")
    p.add_argument(
        "--input",
        required=True,
        help="folder, s3://|gs:// prefix, .zip/.tar(.gz) archive, or manifest (.csv/.parquet with a path column, .txt)",
    )
    p.add_argument(
        "--output", required=True, help="output folder or s3://|gs:// prefix (Parquet parts + summary)"
    )
    p.add_argument(
        "--s3-endpoint", default=None, help="endpoint of an S3-compatible store (or AWS_ENDPOINT_URL)"
    )
    p.add_argument(
        "--batch-size", type=int, default=None, help="images per forward pass (default 256 GPU / 8 CPU)"
    )
    p.add_argument("--threshold", type=float, default=None, help="override the bundle's operating threshold")
    p.add_argument("--csv", action="store_true", help="also write OUTPUT/scores.csv")
    p.add_argument(
        "--slice-rows", action="store_true", help="also write OUTPUT/slices.parquet: one row per volume slice"
    )
    p.add_argument(
        "--explain", action="store_true", help="Grad-CAM overlays (PNG) of positive scans in OUTPUT/explain/"
    )
    p.add_argument(
        "--min-foreground", type=float, default=0.05, help="volumes: skip slices with less head than this"
    )
    p.add_argument(
        "--volume-skip-top-mm",
        type=float,
        default=volumes.DEFAULT_SKIP_TOP_MM,
        help="volumes: do not score slices within this distance below the vertex (skull cap)",
    )
    p.add_argument(
        "--volume-depth-mm",
        type=float,
        default=volumes.DEFAULT_DEPTH_MM,
        help="volumes: score slices down to this distance below the vertex (0: all slices)",
    )
    p.add_argument(
        "--volume-min-extent-mm",
        type=float,
        default=volumes.DEFAULT_MIN_EXTENT_MM,
        help="volumes: the volume score must hold on this many mm of contiguous slices (0: max slice)",
    )
    p.add_argument(
        "--adapt",
        default="none",
        choices=["none", "adabn"],
        help="test-time adaptation: adabn re-estimates BatchNorm statistics on this input first "
        "(a streaming pass over a sample; saved as OUTPUT/adabn_state.pt and reused on resume)",
    )
    p.add_argument(
        "--adapt-samples", type=int, default=4096, help="images the AdaBN pass measures (0: all of them)"
    )
    p.add_argument(
        "--tta", default="none", choices=["none", "flip"], help="flip: average with the left-right mirror"
    )
    p.add_argument(
        "--max-file-bytes", type=int, default=2 << 30, help="larger files/members become error rows"
    )
    p.add_argument(
        "--units-per-block", type=int, default=32, help="units per block: what an interrupted run can lose"
    )
    p.add_argument(
        "--num-actors", type=int, default=None, help="model actors (default: one per GPU, or from CPUs)"
    )
    p.add_argument("--overwrite", action="store_true", help="clear OUTPUT first instead of resuming")
    return p


def main(args: argparse.Namespace) -> dict[str, Any]:
    from raytumor.runtime import init_ray

    init_ray()
    cfg = ScoreConfig(
        bundle=args.bundle,
        input=args.input,
        output=args.output,
        s3_endpoint=args.s3_endpoint,
        batch_size=args.batch_size,
        threshold=args.threshold,
        csv=args.csv,
        slice_rows=args.slice_rows,
        explain=args.explain,
        min_foreground=args.min_foreground,
        volume_skip_top_mm=args.volume_skip_top_mm,
        volume_depth_mm=args.volume_depth_mm,
        volume_min_extent_mm=args.volume_min_extent_mm,
        adapt=args.adapt,
        adapt_samples=args.adapt_samples,
        tta=args.tta,
        max_file_bytes=args.max_file_bytes,
        num_actors=args.num_actors,
        units_per_block=args.units_per_block,
        overwrite=args.overwrite,
    )
    s = score(cfg)
    print(
        f"[score] {s['rows']} rows: {s['scored']} scored, {s['errors']} errors, {s['positives']} positive "
        f"({s['volumes']} volumes); this run {s['this_run_units']} units in {s['seconds']} s "
        f"({s['units_per_s']} units/s, {s['device']}, batch {s['batch_size']})"
    )
    if s["error_reasons"]:
        print("[score] errors by reason: " + ", ".join(f"{k} {v}" for k, v in s["error_reasons"].items()))
    if s["missing_rows"] or s["duplicate_rows"]:
        print(
            f"[score] WARNING: {s['missing_rows']} listed files without a row, {s['duplicate_rows']} duplicate rows"
        )
    print(f"[score] scores: {_join(s['output'], SCORES_DIR)}  summary: {_join(s['output'], SUMMARY_FILE)}")
    return s
