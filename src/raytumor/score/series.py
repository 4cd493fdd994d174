"""The DICOM header pass of the scoring job: which listed files form series, scored as one volume each.

Two passes, chosen by measurement (bench/dicom_archive.py): Ray Data tasks read each candidate file's
header (a ranged read of its first 64 KiB, pixels never touched) and return a few hundred bytes per file;
the driver groups those rows into series (:func:`raytumor.series.assemble`) and the series become units of
the ordinary scoring pipeline, one task reading all of a series' files. A Ray Data ``groupby`` on the
series key would shuffle the headers through the object store for a table that fits in the driver (200 B
a file: 10 M files are 2 GB), and could not keep the slice order and the rules in one place.

UIDs are hashed with the run's salt inside the tasks: raw UIDs reach the driver only with ``--with-uids``.
The headers are kept in ``OUTPUT/dicom_headers.parquet`` (hashes and geometry only), so a rerun reads the
headers of new files only.
"""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np
import pandas as pd

from raytumor.medical import SERIES_HEADER_PEEK, dicom_header
from raytumor.runtime import init_ray, predictor_resources
from raytumor.score.decode import ReadDecode
from raytumor.series import HEADER_COLUMNS, Assembly, SeriesRules, assemble, uid_hash
from raytumor.storage import StorageOptions, Units, get_filesystem, join

HEADERS_FILE = "dicom_headers.parquet"
UNREADABLE = "unreadable"
HEADER_BLOCK = 512  # files per header task: ~0.3 s of reading and parsing
SERIES_FILES = "series_files.parquet"

# Names that are never DICOM: their files skip the header pass (the decoders still sniff content, so a
# DICOM named .jpg is scored as the single file it is, not lost).
NOT_DICOM_SUFFIXES = (
    ".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".nii", ".nii.gz", ".txt", ".csv",
    ".json", ".xml", ".html", ".pdf", ".md", ".parquet",
)  # fmt: skip

# Columns of a header row that leave the tasks (raw UIDs and descriptions only with --with-uids).
_OUT = (
    "id", "size", "dicom", "header_error", "study", "series", "study_uid", "series_uid", "series_description",
    "sop_class", "modality", "image_type", "iop", "ipp", "pixel_spacing", "rows", "cols", "frames",
)  # fmt: skip


def candidates(table: pd.DataFrame) -> pd.Series:
    """Units the header pass reads: files and zip members whose names could be DICOM."""
    names = table["member"].where(table["kind"] == "zip", table["source"]).astype(str).str.lower()
    return table["kind"].isin(["file", "zip"]) & ~names.str.endswith(NOT_DICOM_SUFFIXES)


def _header(rd: ReadDecode, b: dict[str, np.ndarray], i: int) -> dict:
    args = (str(b["source"][i]), b["kind"][i], b["member"][i], b["member_n"][i], int(b["size"][i]))
    head = rd.read_head(*args, SERIES_HEADER_PEEK)
    h = dicom_header(head, complete=args[1] != "file" or len(head) < SERIES_HEADER_PEEK)
    return h if h is not None else dicom_header(rd.read_unit(*args), complete=True)


def header_task(
    batch: dict[str, np.ndarray], *, storage: StorageOptions | None, max_file_bytes: int, salt: str,
    with_uids: bool,
) -> dict[str, np.ndarray]:  # fmt: skip
    """Ray Data task body: unit rows in, one header row per unit out. A file that cannot be read here is
    no series member: the scoring pass reads it again and gives it its row (or retries it later)."""
    rd = ReadDecode(0, storage, max_file_bytes, 0.0)
    rows = []
    for i in range(len(batch["id"])):
        try:
            h = _header(rd, batch, i)
        except Exception:  # noqa: BLE001 - unreadable or unreachable now: the scoring pass decides
            h = {"dicom": False, "header_error": UNREADABLE}
        h = {k: h.get(k) for k in HEADER_COLUMNS}
        h.update(
            id=str(batch["id"][i]),
            size=int(batch["size"][i]),
            dicom=bool(h["dicom"]),
            study=uid_hash(h["study_uid"], salt),
            series=uid_hash(h["series_uid"], salt),
            frames=int(h["frames"] or 1),
            rows=int(h["rows"] or 0),
            cols=int(h["cols"] or 0),
            **{k: json.dumps(h[k]) if h[k] is not None else None for k in ("iop", "ipp", "pixel_spacing")},
        )
        if not with_uids:
            h.update(study_uid=None, series_uid=None, series_description=None)
        rows.append(h)
    return {k: np.array([r[k] for r in rows], dtype=object) for k in _OUT}


def _cached(output: str, storage: StorageOptions | None) -> pd.DataFrame | None:
    import pyarrow.parquet as pq

    fs, path = get_filesystem(join(output, HEADERS_FILE), storage)
    try:
        with fs.open_input_file(path) as f:
            return pq.read_table(f).to_pandas()
    except (FileNotFoundError, OSError):
        return None


def _write(df: pd.DataFrame, uri: str, storage: StorageOptions | None) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    fs, path = get_filesystem(uri, storage)
    with fs.open_output_stream(path) as f:
        pq.write_table(pa.Table.from_pandas(df, preserve_index=False), f)


def read_headers(
    units: Units, cfg: Any, storage: StorageOptions | None, salt: str
) -> tuple[pd.DataFrame, int]:
    """Header rows of every candidate unit (cached ones reused when id and size match); (rows, read now).
    Ray starts only when some header is not cached (a finished run's rerun stays on the driver)."""
    import ray.data

    table = units.table[candidates(units.table)]
    cache = _cached(cfg.output, storage)
    known = pd.DataFrame(columns=list(_OUT))
    if cache is not None and set(_OUT) <= set(cache.columns):
        merged = table[["id", "size"]].merge(cache, on=["id", "size"], how="inner")
        known = merged[list(_OUT)]
    todo = table[~table["id"].isin(known["id"])]
    fresh = pd.DataFrame(columns=list(_OUT))
    ray_start_s = 0.0
    if len(todo):
        t_ray = time.time()
        init_ray()
        r = predictor_resources()
        ray_start_s = round(time.time() - t_ray, 2)
        # Blocks cut on the driver (a repartition is an all-to-all pass: it took most of the time) of up to
        # HEADER_BLOCK files, at least 4 per CPU while the archive allows: one task each.
        todo = todo.reset_index(drop=True)
        cpus = int(ray.cluster_resources().get("CPU", 1))
        per = max(16, min(HEADER_BLOCK, -(-len(todo) // (4 * cpus))))
        ds = ray.data.from_pandas([todo.iloc[i : i + per] for i in range(0, len(todo), per)])
        ds = ds.map_batches(
            header_task,
            fn_kwargs={"storage": storage, "max_file_bytes": cfg.max_file_bytes, "salt": salt,
                       "with_uids": cfg.with_uids},
            batch_size=None,
            batch_format="numpy",
            num_cpus=r.get("decode_cpus", 1),  # no torch here: Ray's pre-started workers do (no malloc env)
        )  # fmt: skip
        # block by block: Ray's to_pandas() concatenates with a pandas call that warns on pandas >= 3.1
        fresh = pd.concat(list(ds.iter_batches(batch_size=None, batch_format="pandas")), ignore_index=True)
    headers = pd.concat([known, fresh], ignore_index=True) if len(known) else fresh
    if len(fresh):
        # A header that could not be read now is read again next time (storage may have been down).
        _write(
            headers.loc[headers["header_error"].ne(UNREADABLE), list(_OUT)],
            join(cfg.output, HEADERS_FILE),
            storage,
        )
    return headers.reset_index(drop=True), len(todo), ray_start_s


def _file_record(t: pd.DataFrame) -> dict[str, list]:
    return {
        i: [s, k, m if isinstance(m, str) else None, int(n) if pd.notna(n) else 1, int(z)]
        for i, s, k, m, n, z in zip(t["id"], t["source"], t["kind"], t["member"], t["member_n"], t["size"],
                                    strict=True)
    }  # fmt: skip


def series_units(
    units: Units, cfg: Any, storage: StorageOptions | None, salt: str
) -> tuple[Units, Assembly | None, dict[str, Any]]:
    """``units`` with the files of each DICOM series replaced by one series unit, files that could not
    join their series as listing errors, and the study hash on every DICOM unit. Writes the file -> series
    map (``OUTPUT/series_files.parquet``) for the accounting check. Returns (units, assembly, stats)."""
    t0 = time.time()
    headers, n_read, ray_start_s = read_headers(units, cfg, storage, salt)
    stats = {"header_files": len(headers), "header_files_read": n_read, "ray_start_seconds": ray_start_s}
    if not len(headers) or not headers["dicom"].astype(bool).any():
        stats["header_seconds"] = round(time.time() - t0, 2)
        return units, None, stats
    rules = SeriesRules.from_yaml(cfg.series_rules)
    asm = assemble(headers, rules)
    table = units.table
    records = _file_record(table)
    grouped = set(asm.members["file"]) | {f for f, _ in asm.refused}
    keep = table[~table["id"].isin(grouped)].copy()
    study_of = dict(zip(asm.lone["id"], asm.lone["study"], strict=True))
    keep["study"] = keep["id"].map(study_of)
    s = asm.series
    series_table = pd.DataFrame(
        {
            "id": s["id"],
            "source": [json.dumps([records[f] for f in json.loads(fs)]) for fs in s["files"]],
            "member": None,
            "member_n": 1,
            "kind": "series",
            "size": [sum(records[f][4] for f in json.loads(fs)) for fs in s["files"]],
            **{k: s[k] for k in ("study", "series", "n_files", "n_missing", "reason", "study_uid", "series_uid",
                                 "series_description")},
        }
    )  # fmt: skip
    new = Units(
        table=pd.concat([keep, series_table], ignore_index=True),
        error_rows=list(units.error_rows) + asm.refused,
        duplicate_entries=units.duplicate_entries,
        unreachable=list(units.unreachable),
    )
    if len(asm.members):
        _write(asm.members, join(cfg.output, SERIES_FILES), storage)
    stats.update(
        {
            "series": len(s),
            "series_to_score": int(s["reason"].isna().sum()),
            "series_skipped": int(s["reason"].notna().sum()),
            "files_in_series": len(asm.members),
            "files_refused": len(asm.refused),
            "header_seconds": round(time.time() - t0, 2),
            "series_rules": rules.to_dict(),
        }
    )
    return new, asm, stats
