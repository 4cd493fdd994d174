"""Read, decode and preprocess score units in Ray Data CPU tasks: unit rows in, decoded rows out.

A file is read whole (bounded by ``--max-file-bytes``), a zip member in memory from the open archive, a
tar streamed member by member; every unit ends as exactly one decoded row or one error row.
"""

from __future__ import annotations

import tarfile
import zipfile
from collections import Counter
from collections.abc import Iterator
from typing import Any

import numpy as np

from raytumor.preprocess import PreprocessConfig, model_inputs
from raytumor.scan import DecodeError, sniff_format
from raytumor.storage import StorageOptions, get_filesystem, member_id

DECODED_COLUMNS = (
    "path", "kind", "format", "n_slices", "slice_index", "spacing", "pixels", "view_header", "modality",
    "error",
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
                            yield columns(rows)
                            rows = []
                    continue
                rows.append(self._one(batch, i))
                if len(rows) >= self.out_rows:
                    yield columns(rows)
                    rows = []
            if rows:
                yield columns(rows)
        finally:
            self._close_zip()

    def _one(self, batch: dict[str, np.ndarray], i: int) -> dict:
        uid, source, kind = str(batch["id"][i]), str(batch["source"][i]), batch["kind"][i]
        if int(batch["size"][i]) > self.max_bytes:
            return decoded_row(uid, self.image_size, None, f"too large: {int(batch['size'][i])} bytes", 0)
        try:
            if kind == "zip":
                data = self._zip_member(source, str(batch["member"][i]), int(batch["member_n"][i]))
            else:
                fs, path = get_filesystem(source, self.storage)
                with fs.open_input_stream(path, compression=None) as f:  # raw bytes: see read_bytes
                    data = _read_limited(f, self.max_bytes)
        except _TooLarge as e:
            return decoded_row(uid, self.image_size, None, f"too large: {e}", 0)
        except RuntimeError as e:  # zipfile: encrypted members need a password
            return decoded_row(uid, self.image_size, None, f"unreadable archive member: {e}"[:300], 0)
        except Exception as e:  # permissions, vanished object, network, corrupt archive member
            return decoded_row(uid, self.image_size, None, f"unreadable: {type(e).__name__}: {e}"[:300], 0)
        return decoded_row(uid, self.image_size, data, None, self.min_fg, self.prep, self.volume_range)

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
                    uid = member_id(source, m.name, seen[m.name])
                    n += 1
                    if uid in done:
                        continue
                    if not m.isfile():  # links and devices are never followed
                        yield decoded_row(uid, self.image_size, None, "archive member is a link", 0)
                    elif m.size > self.max_bytes:
                        yield decoded_row(uid, self.image_size, None, f"too large: {m.size} bytes", 0)
                    else:
                        f = tf.extractfile(m)
                        data = f.read() if f is not None else b""
                        yield decoded_row(
                            uid, self.image_size, data, None, self.min_fg, self.prep, self.volume_range
                        )
        except Exception as e:
            # Not a tar, or cut off: members read so far stand; the archive itself gets one error row.
            what = "truncated or corrupt tar archive" if n else "corrupt tar archive"
            if source not in done:
                yield decoded_row(source, self.image_size, None, f"{what}: {type(e).__name__}: {e}"[:300], 0)
            return
        if n == 0 and source not in done:
            yield decoded_row(source, self.image_size, None, "empty archive", 0)


def columns(rows: list[dict]) -> dict[str, Any]:
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
) -> Any:
    """The read/decode stage shared by the AdaBN pass and scoring: same decoding, preprocessing and slice
    range, so the statistics are those of exactly what the scoring actors will see."""
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
        },
        batch_size=batch_size,
        batch_format="numpy",
        num_cpus=r["decode_cpus"],
    )
