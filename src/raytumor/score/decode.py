"""Read, decode and preprocess score units in Ray Data CPU tasks: unit rows in, decoded rows out.

A file is read whole (bounded by ``--max-file-bytes``), a zip member in memory from the open archive (kept
open per worker process, so its central directory is read once), a tar streamed member by member; every
unit ends as exactly one decoded row or one error row, except a unit that storage did not answer for after
the retries: it gets no row (reported, so the job exits non-zero and the same command reads it later).
Archive members are bounded by the inflated bytes and the compression ratio, declared and actual.
"""

from __future__ import annotations

import atexit
import bz2
import copy
import json
import lzma
import sys
import tarfile
import threading
import zipfile
import zlib
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from raytumor.preprocess import PreprocessConfig, model_inputs, series_model_inputs
from raytumor.scan import DecodeError, sniff_format
from raytumor.storage import (
    Retrier,
    StorageOptions,
    StorageUnreachable,
    get_filesystem,
    is_transient,
    member_id,
    zip_index,
)

# What one archive member may inflate to: a 512x512x400 MRI volume is 200 MB at 16 bits, 400 MB as float32.
MAX_INFLATED_BYTES = 512 << 20
# Inflated : compressed. MRI deflates 2-20x; a bomb 1000x (deflate) to 10^6x (bzip2). Members that inflate
# to less than RATIO_FREE_BYTES are not held to it (a blank slice compresses 1000x and costs nothing).
MAX_INFLATE_RATIO = 100
RATIO_FREE_BYTES = 16 << 20
_CHUNK = 1 << 20  # inflate/read step: memory beyond the member itself stays at this
_RAW_CHUNK = 16 << 10  # compressed bytes read at a time from a compressed tar

DECODED_COLUMNS = (
    "path", "kind", "format", "n_slices", "slice_index", "spacing", "pixels", "view_header", "modality",
    "error",
)  # fmt: skip
# Unit columns a decoded row carries through to its score row (DICOM series and study fields; None for
# units that have none, e.g. tar members).
PASS_COLUMNS = (
    "study", "series", "n_files", "n_missing", "reason", "study_uid", "series_uid", "series_description",
)  # fmt: skip


def decoded_row(
    path: str,
    image_size: int,
    data: bytes | None,
    error: str | None,
    min_fg: float,
    prep: Any = None,
    volume_range: tuple[float, float] = (0.0, 0.0),
) -> dict:
    """Decode one unit's bytes into (K, S, S) uint8 model inputs (after the bundle's preprocessing; a
    volume's slices in ``volume_range``), flattened to bytes (a ragged-safe column)."""
    row = {
        "path": path,
        "kind": None,
        "format": None,
        "n_slices": 0,
        "slice_index": b"",
        "spacing": np.nan,
        "pixels": b"",
        "view_header": None,  # the view the file's geometry gives (DICOM orientation, NIfTI volume)
        "modality": None,  # DICOM Modality
    }
    if error is None and data is not None:
        try:
            stack, scan = model_inputs(
                data, image_size, prep, volumes=True, min_foreground=min_fg, volume_range=volume_range
            )
            row.update(
                kind=scan.kind,
                format=scan.format,
                n_slices=len(stack),
                slice_index=np.asarray(scan.slice_index).astype(np.int32).tobytes(),
                spacing=scan.spacing_mm if scan.spacing_mm else np.nan,
                pixels=stack.tobytes(),
                view_header=getattr(scan, "view", None),
                modality=getattr(scan, "modality", None),
            )
        except DecodeError as e:
            error = e.reason
            row["format"] = sniff_format(data)
        except MemoryError:
            error = "out of memory while decoding"
        except Exception as e:  # a decoder bug costs one row, not the run
            error = f"decode failed: {type(e).__name__}: {e}"[:300]
    row["error"] = error
    return row


class _Refused(Exception):
    """A unit refused before or while inflating; ``str`` is the row's whole error reason."""


class _ArchiveBomb(_Refused):
    """A compressed tar that inflates past the ratio limit: nothing past this point is read."""


def _read_limited(
    stream: Any,
    limit: int,
    too_large: str = "too large: larger than --max-file-bytes {limit}",
    compressed: Callable[[], int] | None = None,
) -> bytes:
    """Read ``stream`` in chunks, stopping as soon as it passes ``limit`` bytes (sizes in headers can lie)
    or, given the ``compressed`` bytes consumed so far, inflates more than ``MAX_INFLATE_RATIO`` to 1."""
    chunks: list[bytes] = []
    n = 0
    while True:
        b = stream.read(min(_CHUNK, limit + 1 - n))
        if not b:
            return b"".join(chunks)
        n += len(b)
        if n > limit:
            raise _Refused(too_large.format(limit=limit))
        if compressed is not None and n > RATIO_FREE_BYTES and n > MAX_INFLATE_RATIO * max(1, compressed()):
            raise _Refused(
                f"decompression bomb: member inflated past {n} bytes from {compressed()} compressed "
                f"(limit {MAX_INFLATE_RATIO}:1)"
            )
        chunks.append(b)


def _declared_refusal(size: int, compressed: int | None, limit: int) -> str | None:
    """The error reason for a member whose header (zip central directory, tar header) already rules it out."""
    if size > limit:
        return f"too large: member declares {size} bytes uncompressed (limit {limit})"
    if compressed is not None and size > RATIO_FREE_BYTES and size > MAX_INFLATE_RATIO * max(1, compressed):
        return (
            f"decompression bomb: member declares {size} bytes from {compressed} compressed "
            f"({size // max(1, compressed)}:1, limit {MAX_INFLATE_RATIO}:1)"
        )
    return None


class _Inflating:
    """``read(n)`` over a raw tar stream, inflating gzip/bzip2/xz with ``max_length`` so one read never holds
    more than ``n`` bytes (tarfile's own stream mode inflates each 10 KB read whole: 10 KB of bzip2 can be
    gigabytes). Counts raw and inflated bytes; past ``RATIO_FREE_BYTES`` the archive as a whole must stay
    under ``MAX_INFLATE_RATIO``, which also bounds the time spent skipping a refused member."""

    @staticmethod
    def compression(head: bytes) -> str | None:
        """What tarfile's ``r|*`` would detect (the same magic bytes): gz, bz2, xz (or .lzma), or None."""
        if head.startswith(b"\x1f\x8b\x08"):
            return "gz"
        if head[:3] == b"BZh" and head[4:10] == b"1AY&SY":
            return "bz2"
        if head.startswith((b"\xfd7zXZ", b"\x5d\x00\x00\x80")):
            return "xz"
        return None

    def __init__(self, raw: Any, what: str = "archive", kind: str | None = None) -> None:
        self.raw = raw
        self.what = what  # "archive" (a tar: not read further) or "member" (a zip's bzip2 member)
        self.raw_bytes = 0
        self.out_bytes = 0
        self._pending = self._fill()
        self.kind = kind or self.compression(self._pending)  # a zip member's method is known, not sniffed
        self._d = self._decompressor() if self.kind else None
        self._done = False

    def _fill(self) -> bytes:
        b = self.raw.read(_RAW_CHUNK)
        self.raw_bytes += len(b)
        return b

    def _decompressor(self) -> Any:
        if self.kind == "gz":
            return zlib.decompressobj(16 + zlib.MAX_WBITS)
        return bz2.BZ2Decompressor() if self.kind == "bz2" else lzma.LZMADecompressor()

    def read(self, n: int = -1) -> bytes:
        n = _CHUNK if n is None or n < 0 else n
        if self._d is None:  # a plain tar
            while len(self._pending) < n and (b := self._fill()):
                self._pending += b
            out, self._pending = self._pending[:n], self._pending[n:]
            self.out_bytes += len(out)
            return out
        buf = bytearray()
        while len(buf) < n and not self._done:
            d = self._d
            if self.kind == "gz":  # zlib keeps input it could not use yet in unconsumed_tail
                data = self._pending or self._fill()
                chunk = d.decompress(data, n - len(buf))
                self._pending = d.unconsumed_tail
            else:  # bz2/lzma buffer it themselves: new input only when they ask for it
                if self._pending:
                    data, self._pending = self._pending, b""
                else:
                    data = self._fill() if d.needs_input else b""
                chunk = d.decompress(data, n - len(buf))
            buf += chunk
            if d.eof:  # end of one stream: pbzip2-style archives concatenate several
                rest = d.unused_data or self._fill()
                if self.compression(rest) == self.kind:
                    self._d, self._pending = self._decompressor(), rest
                else:
                    self._done = True  # trailing padding: ignored, as tarfile does
            elif not chunk and not data and (self.kind == "gz" or d.needs_input):
                self._done = True  # cut off: tarfile then reports the archive truncated
        out = bytes(buf)
        self.out_bytes += len(out)
        if self.out_bytes > RATIO_FREE_BYTES and self.out_bytes > MAX_INFLATE_RATIO * max(1, self.raw_bytes):
            raise _ArchiveBomb(
                f"decompression bomb: {self.what} inflated past {self.out_bytes} bytes from {self.raw_bytes} "
                f"compressed (limit {MAX_INFLATE_RATIO}:1)"
                + ("; not read further" if self.what == "archive" else "")
            )
        return bytes(out)


# ----------------------------------------------------------------------------------------------------------
# Open zip archives, per worker process: a 100k-member central directory takes ~0.7 s to read, and Ray Data
# hands a worker one 32-unit block per task, so archives stay open across tasks (validated once per task by
# size and mtime) and close on eviction and at exit.


class _OpenZip:
    def __init__(self, fs: Any, path: str, stamp: tuple) -> None:
        self.stamp = stamp
        self.file = fs.open_input_file(path)  # random access: only the members' byte ranges are read
        try:
            self.zf = zipfile.ZipFile(self.file)
        except BaseException:
            self.file.close()
            raise
        self.by_name = zip_index(self.zf)

    def close(self) -> None:
        self.zf.close()
        self.file.close()


_ZIPS: OrderedDict[tuple, _OpenZip] = OrderedDict()
_ZIPS_LOCK = threading.Lock()
MAX_OPEN_ZIPS = 4


def close_archives() -> None:
    """Close every zip archive this process holds open."""
    with _ZIPS_LOCK:
        while _ZIPS:
            _ZIPS.popitem()[1].close()


atexit.register(close_archives)


def _stamp(fs: Any, path: str) -> tuple:
    import pyarrow.fs as pafs

    fi = fs.get_file_info(path)
    if fi.type != pafs.FileType.File:
        raise FileNotFoundError(f"archive vanished: {path}")
    return (fi.size, fi.mtime_ns)


def open_zip(source: str, storage: StorageOptions | None, revalidate: bool = True) -> _OpenZip:
    """The process's open archive for ``source`` (opened now if needed, or if it changed since)."""
    fs, path = get_filesystem(source, storage, single_attempt=True)
    key = (source, storage)
    with _ZIPS_LOCK:
        oz = _ZIPS.get(key)
        if oz is not None and revalidate and _stamp(fs, path) != oz.stamp:
            _ZIPS.pop(key).close()
            oz = None
        if oz is None:
            oz = _OpenZip(fs, path, _stamp(fs, path))
            _ZIPS[key] = oz
            while len(_ZIPS) > MAX_OPEN_ZIPS:
                _ZIPS.popitem(last=False)[1].close()
        _ZIPS.move_to_end(key)
        return oz


def _raw_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> Any:
    """The member's compressed bytes as stored (zipfile inflates bzip2 without a bound: see _Inflating)."""
    raw = copy.copy(info)
    raw.compress_type, raw.file_size = zipfile.ZIP_STORED, info.compress_size
    del raw.CRC  # the CRC is of the inflated bytes: checked by the caller
    return zf.open(raw)


# ----------------------------------------------------------------------------------------------------------
# Units that storage did not answer for: the read tasks tell a small actor of the driver's (no CPU), so the
# driver can count them after the pipeline, even for tar archives, whose members have no listed id.


class UnreachableLog:
    """Ids of the units storage did not answer for (a Ray actor: ``new_unreachable_log``)."""

    def __init__(self) -> None:
        self._ids: set[str] = set()

    def add(self, ids: list[str]) -> None:
        self._ids.update(ids)

    def ids(self) -> list[str]:
        return sorted(self._ids)


def new_unreachable_log() -> Any:
    import ray

    return ray.remote(num_cpus=0)(UnreachableLog).remote()


def report_unreachable(log: Any, ids: list[str]) -> None:
    if log is None or not ids:
        return
    try:
        import ray

        ray.get(log.add.remote(list(ids)))  # recorded before the task that found them ends
    except Exception as e:  # the listed ones still show as missing rows
        print(f"[score] could not report {len(ids)} unreachable inputs: {e}", file=sys.stderr)


def collect_unreachable(log: Any) -> list[str]:
    """The ids the read tasks reported (the log actor is released)."""
    import ray

    try:
        return ray.get(log.ids.remote())
    finally:
        ray.kill(log)


# ----------------------------------------------------------------------------------------------------------


def missing(v: Any) -> bool:
    """A unit column value that is not there: None, or a NaN that pandas/Ray put in an object column."""
    return v is None or (np.ndim(v) == 0 and not isinstance(v, str) and bool(np.isnan(v)))


def read_error(e: Exception) -> str:
    """A failed read's error reason (the row's ``error``)."""
    if isinstance(e, _Refused):
        return str(e)
    if isinstance(e, RuntimeError):  # zipfile: encrypted members need a password
        return f"unreadable archive member: {e}"[:300]
    return f"unreadable: {type(e).__name__}: {e}"[:300]  # permissions, vanished object, corrupt member


def series_row(uid: str, image_size: int, blobs: list[bytes] | None, error: str | None, rd: Any) -> dict:
    """The decoded row of a DICOM series (``decoded_row`` for a list of files)."""
    row = decoded_row(uid, image_size, None, error, 0)
    row.update(kind="series", format="dicom")
    if error is not None or blobs is None:
        return row
    try:
        stack, scan = series_model_inputs(
            blobs, image_size, rd.prep, min_foreground=rd.min_fg, volume_range=rd.volume_range
        )
        row.update(
            n_slices=len(stack),
            slice_index=np.asarray(scan.slice_index).astype(np.int32).tobytes(),
            spacing=scan.spacing_mm if scan.spacing_mm else np.nan,
            pixels=stack.tobytes(),
            view_header=scan.view,
            modality=scan.modality,
        )
    except DecodeError as e:
        row["error"] = e.reason
    except MemoryError:
        row["error"] = "out of memory while decoding"
    except Exception as e:  # a decoder bug costs one row, not the run
        row["error"] = f"decode failed: {type(e).__name__}: {e}"[:300]
    return row


class ReadDecode:
    """Callable for ``map_batches``: unit rows in, decoded rows out (tars expand to one row per member).
    Units that storage did not answer for after the retries get no row: their ids are in ``unreachable``
    and reported under ``unreachable_log``."""

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
        unreachable_log: Any = None,
        max_inflated_bytes: int = MAX_INFLATED_BYTES,
    ) -> None:
        self.prep = PreprocessConfig.from_dict(preprocess) if preprocess else None
        self.volume_range = tuple(volume_range)
        self.image_size = image_size
        self.storage = storage
        self.max_bytes = max_file_bytes
        self.max_member = min(max_file_bytes, max_inflated_bytes)
        self.min_fg = min_foreground
        self.done_ids = done_ids  # ray.ObjectRef of a set of ids already scored (tar members on resume)
        self.out_rows = out_rows
        self.retry = Retrier.for_storage(storage)
        self.unreachable: list[str] = []
        self.unreachable_log = unreachable_log
        self._reported = 0
        self._checked: set[str] = set()  # archives validated in this task

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
                            yield columns(rows)
                            rows = []
                    continue
                row = self._one(batch, i)
                if row is not None:
                    rows.append(row)
                if len(rows) >= self.out_rows:
                    yield columns(rows)
                    rows = []
            if rows:
                yield columns(rows)
        finally:
            report_unreachable(self.unreachable_log, self.unreachable[self._reported :])
            self._reported = len(self.unreachable)

    def _one(self, batch: dict[str, np.ndarray], i: int) -> dict | None:
        uid, kind = str(batch["id"][i]), batch["kind"][i]
        if kind == "series":
            row = self._series(
                uid, str(batch["source"][i]), batch["reason"][i] if "reason" in batch else None
            )
        else:
            row = self._unit(uid, str(batch["source"][i]), kind, batch["member"][i], batch["member_n"][i],
                             int(batch["size"][i]))  # fmt: skip
        if row is not None:
            for k in PASS_COLUMNS:
                if k in batch:
                    v = batch[k][i]
                    row[k] = None if missing(v) else v
        return row

    def read_unit(self, source: str, kind: str, member: Any, member_n: Any, size: int) -> bytes:
        """A file's or zip member's bytes, retried while storage is transiently down. Raises
        StorageUnreachable (after the retries), _Refused (too large, bomb) or the read's own error."""
        if kind != "zip" and size > self.max_bytes:
            raise _Refused(f"too large: {size} bytes")
        if kind == "zip":
            return self._zip_member(source, str(member), int(member_n))
        return self.retry.call(self._read_file, source, what=source)

    def _unit(self, uid: str, source: str, kind: str, member: Any, member_n: Any, size: int) -> dict | None:
        try:
            data = self.read_unit(source, kind, member, member_n, size)
        except StorageUnreachable:
            self.unreachable.append(uid)  # no row: the same command reads it again
            return None
        except Exception as e:
            return decoded_row(uid, self.image_size, None, read_error(e), 0)
        return decoded_row(uid, self.image_size, data, None, self.min_fg, self.prep, self.volume_range)

    def _series(self, uid: str, files_json: str, reason: Any) -> dict | None:
        """A DICOM series unit: its files (in slice order) read and assembled into one volume; a series the
        rules skipped gets its row without reading anything. A file storage did not answer for leaves the
        whole series for the next run; one that cannot be read or decoded makes it an error row."""
        if isinstance(reason, str) and reason:
            row = decoded_row(uid, self.image_size, None, None, 0)
            row.update(kind="series", format="dicom")
            return row
        blobs = []
        for source, kind, member, member_n, size in json.loads(files_json):
            try:
                blobs.append(self.read_unit(source, kind, member, member_n, int(size)))
            except StorageUnreachable:
                self.unreachable.append(uid)
                return None
            except Exception as e:
                return series_row(uid, self.image_size, None, f"series file {read_error(e)}", self)
        return series_row(uid, self.image_size, blobs, None, self)

    def _read_file(self, source: str) -> bytes:
        fs, path = get_filesystem(source, self.storage, single_attempt=True)
        with fs.open_input_stream(path, compression=None) as f:  # raw bytes: see storage.read_bytes
            return _read_limited(f, self.max_bytes)

    def read_head(self, source: str, kind: str, member: Any, member_n: Any, size: int, n: int) -> bytes:
        """The first ``n`` bytes of a file (a ranged read: a header, not the pixels); a zip member whole."""
        if kind != "file":
            return self.read_unit(source, kind, member, member_n, size)

        def head() -> bytes:
            fs, path = get_filesystem(source, self.storage, single_attempt=True)
            with fs.open_input_file(path) as f:
                return f.read(min(n, self.max_bytes))

        return self.retry.call(head, what=source)

    def _zip_member(self, source: str, member: str, occurrence: int) -> bytes:
        fresh = source not in self._checked
        oz = self.retry.call(open_zip, source, self.storage, fresh, what=source)
        self._checked.add(source)
        try:
            info = oz.by_name[member][occurrence - 1]
        except (KeyError, IndexError):
            raise FileNotFoundError(
                f"no member {member!r} in {source} (changed since it was listed?)"
            ) from None
        refusal = _declared_refusal(info.file_size, info.compress_size, self.max_member)
        if refusal:
            raise _Refused(refusal)
        return self.retry.call(self._inflate_member, oz, info, what=f"{source}!{member}")

    def _inflate_member(self, oz: _OpenZip, info: zipfile.ZipInfo) -> bytes:
        """The member's bytes, in memory (nothing touches disk), CRC-checked, never past the limits: zipfile
        stops deflate at the declared size; bzip2 is inflated here, bounded (zipfile inflates it whole)."""
        too_large = "too large: member inflates past {limit} bytes"
        if info.compress_type == zipfile.ZIP_BZIP2:
            with _raw_member(oz.zf, info) as m:
                r = _Inflating(m, "member", kind="bz2")
                data = _read_limited(r, self.max_member, too_large, lambda: r.raw_bytes)
            if len(data) != info.file_size or zlib.crc32(data) != info.CRC:
                raise zipfile.BadZipFile(f"Bad CRC-32 or size for file {info.filename!r}")
            return data
        with oz.zf.open(info) as m:
            return _read_limited(m, self.max_member, too_large, lambda: info.compress_size)

    def _tar_rows(self, source: str, done: set[str]) -> Iterator[dict]:
        """Stream a tar(.gz/.bz2/.xz) member by member: memory holds one member, never the archive. A
        transient fault re-streams the archive (members already given are skipped), with backoff."""
        fs, path = get_filesystem(source, self.storage, single_attempt=True)
        emitted: set[str] = set()
        failures = 0
        while True:
            seen: Counter = Counter()
            n = 0
            try:
                with fs.open_input_stream(path, compression=None) as raw:
                    inflating = _Inflating(raw)
                    with tarfile.open(fileobj=inflating, mode="r|") as tf:
                        for m in tf:
                            if m.isdir():
                                continue
                            seen[m.name] += 1
                            uid = member_id(source, m.name, seen[m.name])
                            n += 1
                            if uid in done or uid in emitted:
                                continue
                            row, stop = self._tar_member(tf, m, uid, inflating)
                            emitted.add(uid)
                            failures = 0  # progress: a flaky link still finishes the archive
                            yield row
                            if stop is not None:
                                raise stop
            except Exception as e:
                if is_transient(e) and not isinstance(e, _Refused):
                    failures += 1
                    if failures < self.retry.tries:
                        self.retry.pause(failures)
                        continue
                    self.retry.down = True
                    self.unreachable.append(source)  # members not given yet: the next run reads them
                    return
                if source not in done:
                    if isinstance(e, _Refused):
                        reason = str(e)
                    else:  # not a tar, or cut off: members read so far stand; the archive gets one error row
                        what = "truncated or corrupt tar archive" if n else "corrupt tar archive"
                        reason = f"{what}: {type(e).__name__}: {e}"[:300]
                    yield decoded_row(source, self.image_size, None, reason, 0)
                return
            self.retry.down = False
            break
        if n == 0 and source not in done:
            yield decoded_row(source, self.image_size, None, "empty archive", 0)

    def _tar_member(
        self, tf: tarfile.TarFile, m: tarfile.TarInfo, uid: str, inflating: _Inflating
    ) -> tuple[dict, _ArchiveBomb | None]:
        """(row, archive-level refusal to raise after the row is given)."""
        if not m.isfile():  # links and devices are never followed
            return decoded_row(uid, self.image_size, None, "archive member is a link", 0), None
        refusal = _declared_refusal(m.size, None, self.max_member)
        if refusal:
            return decoded_row(uid, self.image_size, None, refusal, 0), None
        f = tf.extractfile(m)
        raw0 = inflating.raw_bytes
        try:
            # Compressed bytes this member took (plus one raw read of slack): its own ratio, not the archive's.
            ratio_of = lambda: inflating.raw_bytes - raw0 + _RAW_CHUNK  # noqa: E731
            too_large = "too large: member inflates past {limit} bytes"
            data = _read_limited(f, self.max_member, too_large, ratio_of) if f is not None else b""
        except _Refused as e:
            stop = e if isinstance(e, _ArchiveBomb) else _ArchiveBomb(f"{e}; archive not read further")
            return decoded_row(uid, self.image_size, None, str(e), 0), stop
        row = decoded_row(uid, self.image_size, data, None, self.min_fg, self.prep, self.volume_range)
        return row, None


def columns(rows: list[dict]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k in DECODED_COLUMNS + PASS_COLUMNS:
        vals = [r.get(k) for r in rows]
        if k == "n_slices":
            out[k] = np.array(vals, dtype=np.int64)
        elif k == "spacing":
            out[k] = np.array(vals, dtype=np.float64)
        else:
            out[k] = np.array(vals, dtype=object)
    return out


def read_decode_task(
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
    unreachable_log: Any = None,
    max_inflated_bytes: int = MAX_INFLATED_BYTES,
) -> Iterator[dict[str, Any]]:
    """Ray Data task body: units whose fate was decided while listing pass through as error rows."""
    listed = np.array([k == "error" for k in batch["kind"]], dtype=bool)
    if listed.any():
        rows = [
            decoded_row(str(i), image_size, None, listing_errors.get(str(i), "unreadable"), 0)
            for i in batch["id"][listed]
        ]
        yield columns(rows)
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
        unreachable_log=unreachable_log,
        max_inflated_bytes=max_inflated_bytes,
    )(batch)


def map_read_decode(
    ds: Any,
    cfg: Any,
    meta: Any,
    storage: Any,
    r: dict[str, Any],
    volume_range: tuple[float, float],
    batch_size: int,
    *,
    done_ids: Any = None,
    errors: dict[str, str] | None = None,
    unreachable_log: Any = None,
) -> Any:
    """The read/decode stage shared by the AdaBN pass and scoring: same decoding, preprocessing and slice
    range, so the statistics are those of exactly what the scoring actors will see. Units storage did not
    answer for get no row; their ids go to :func:`collect_unreachable` (``unreachable_log``)."""
    return ds.map_batches(
        read_decode_task,
        fn_kwargs={
            "image_size": meta.image_size,
            "storage": storage,
            "max_file_bytes": cfg.max_file_bytes,
            "min_foreground": cfg.min_foreground,
            "preprocess": meta.preprocess,
            "volume_range": volume_range,
            "done_ids": done_ids,
            "listing_errors": errors or {},
            "unreachable_log": unreachable_log,
            "max_inflated_bytes": getattr(cfg, "max_inflated_bytes", MAX_INFLATED_BYTES),
        },
        batch_size=batch_size,
        batch_format="numpy",
        num_cpus=r["decode_cpus"],
        memory=r["decode_memory"],
        **r.get("remote_args", {}),
    )
