"""Score outputs: the row schema ``raytumor score`` writes, and reading an output folder back.

The contract between scoring (writes), evaluation and the report (read): ``OUTPUT/scores/*.parquet`` (one
row per input unit), ``summary.json``, ``run.json``, optional ``scores.csv``, ``slices.parquet`` and
``explain/``. Local folders and bucket prefixes alike.
"""

from __future__ import annotations

import hashlib
import posixpath
from collections import Counter
from datetime import datetime
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from raytumor.storage import StorageOptions, get_filesystem, join

SCORES_DIR = "scores"
EXPLAIN_DIR = "explain"
RUN_FILE = "run.json"
ADABN_FILE = "adabn_state.pt"
SUMMARY_FILE = "summary.json"
# The label of a row the bundle may not score (raytumor.scope): its probabilities are kept, its class is not.
OUT_OF_SCOPE = "out_of_scope"


def output_schema(classes: list[str], explain: bool, slice_rows: bool, with_uids: bool = False) -> pa.Schema:
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
        pa.field("view", pa.string()),
        pa.field("view_source", pa.string()),
        pa.field("ood_score", pa.float32()),
        pa.field("in_scope", pa.bool_()),
        pa.field("scope_reason", pa.string()),
        pa.field("adaptation", pa.string()),
        pa.field("bundle_id", pa.string()),
        pa.field("bundle_version", pa.string()),
        pa.field("error", pa.string()),
        pa.field("scored_at", pa.timestamp("ms", tz="UTC")),
        # Volumes and DICOM series: slice spacing; series: files, missing grid slices, why not scored
        # (``skipped: ...``), and the study/series as keyed hashes of their UIDs (raytumor.series.uid_hash).
        pa.field("spacing_mm", pa.float32()),
        pa.field("n_files", pa.int32()),
        pa.field("n_missing", pa.int32()),
        pa.field("reason", pa.string()),
        pa.field("study", pa.string()),
        pa.field("series", pa.string()),
    ]
    if with_uids:  # --with-uids: identifiers for use inside the hospital's own network
        fields += [
            pa.field("study_uid", pa.string()),
            pa.field("series_uid", pa.string()),
            pa.field("series_description", pa.string()),
        ]
    if explain:
        fields.append(pa.field("explain", pa.string()))
    if slice_rows:
        fields += [
            pa.field("slice_indices", pa.list_(pa.int32())),
            pa.field("slice_scores", pa.list_(pa.float32())),
        ]
    return pa.schema(fields)


def json_value(v: Any) -> Any:
    """A score-row value as JSON (the review page, the Serve endpoint): NaN/NA -> null, numpy scalars -> Python, arrays -> lists, times -> ISO 8601."""
    if isinstance(v, np.ndarray):
        return [json_value(x) for x in v.tolist()]
    if isinstance(v, (list, tuple)):
        return [json_value(x) for x in v]
    if v is None or v is pd.NA or v is pd.NaT:
        return None
    if isinstance(v, (np.bool_, bool)):
        return bool(v)
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        return float(v) if np.isfinite(v) else None
    if isinstance(v, (pd.Timestamp, datetime)):
        return v.isoformat()
    return v


def part_name(paths: list[str]) -> str:
    """A part's file name, from the ids it holds: a batch Ray re-runs (its actor died after writing) writes
    the same name again instead of a second copy of its rows."""
    digest = hashlib.sha1("\n".join(paths).encode("utf-8", "surrogatepass")).hexdigest()[:24]
    return f"part-{digest}.parquet"


def write_part(table: pa.Table, scores_dir: str, storage: StorageOptions | None) -> str:
    """Write one batch's rows as a Parquet part of ``scores_dir`` (OUTPUT/scores); returns its path.

    The scoring actor calls this as soon as a batch is scored, so rows reach storage at the rate the model
    computes them (separate write tasks starved for CPU next to the actors and flushed late). A part a
    killed process left without a footer is deleted by the next run (:func:`scored_ids`); on a bucket the
    object appears only once whole."""
    fs, root = get_filesystem(scores_dir, storage)
    path = posixpath.join(root, part_name(table.column("path").to_pylist()))
    with fs.open_output_stream(path) as f:
        pq.write_table(table, f)
    return path


def scored_ids(output: str, storage: StorageOptions | None) -> tuple[set[str], int]:
    """Ids already in OUTPUT/scores; parts without a readable footer (a killed write) are deleted."""
    fs, root = get_filesystem(join(output, SCORES_DIR), storage)
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
    fs, root = get_filesystem(join(output, SCORES_DIR), storage)
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
                pf = pq.ParquetFile(f)
                # Parts written before a column existed (e.g. scope_reason) still read; the column is null.
                cols = None if columns is None else [c for c in columns if c in pf.schema_arrow.names]
                tables.append(pf.read(columns=cols))
        except Exception:
            if not skip_unreadable:
                raise
    if not tables:
        return pd.DataFrame(columns=columns or ["path"])
    return pa.concat_tables(tables, promote_options="default").to_pandas()


def write_csv(output: str, storage: StorageOptions | None) -> str:
    """OUTPUT/scores.csv from the Parquet parts, one part at a time (bounded memory)."""
    fs, parts = _parts(output, storage)
    ofs, opath = get_filesystem(join(output, "scores.csv"), storage)
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
    return join(output, "scores.csv")


def write_slice_rows(output: str, storage: StorageOptions | None) -> str:
    """OUTPUT/slices.parquet: one row per scored slice of every volume (path, slice, score)."""
    fs, parts = _parts(output, storage)
    ofs, opath = get_filesystem(join(output, "slices.parquet"), storage)
    schema = pa.schema([("path", pa.string()), ("slice", pa.int32()), ("score", pa.float32())])
    with ofs.open_output_stream(opath) as out, pq.ParquetWriter(out, schema) as w:
        for p in parts:
            with fs.open_input_file(p) as f:
                t = pq.read_table(f, columns=["path", "kind", "slice_indices", "slice_scores"])
            # scored volumes/series only (a skipped series or an error row has no slice scores)
            t = t.filter(
                pc.and_(pc.is_in(t["kind"], pa.array(VOLUME_KINDS)), pc.is_valid(t["slice_indices"]))
            )
            if t.num_rows == 0:
                continue
            lens = pc.list_value_length(t["slice_indices"])
            w.write_table(
                pa.table(
                    {
                        "path": np.repeat(t["path"].to_numpy(zero_copy_only=False), lens.to_numpy()),
                        "slice": pc.list_flatten(t["slice_indices"]),
                        "score": pc.list_flatten(t["slice_scores"]),
                    },
                    schema=schema,
                )
            )
    return join(output, "slices.parquet")


SUMMARY_COLUMNS = [
    "path",
    "label",
    "error",
    "kind",
    "n_slices",
    "scope_reason",
    "in_scope",
    "reason",
    "n_files",
]
# Row kinds scored as a stack of slices with the volume rules.
VOLUME_KINDS = ("volume", "series")


def summarise(df: pd.DataFrame, negative_class: str | None) -> dict[str, Any]:
    """Counts over all score rows (``SUMMARY_COLUMNS`` of an output folder)."""
    err = df["error"].notna()
    skipped = df["reason"].notna() if "reason" in df.columns else pd.Series(False, index=df.index)
    series = df["kind"].eq("series")
    oos = df["label"] == OUT_OF_SCOPE
    outside = df["in_scope"].eq(False) if "in_scope" in df.columns else pd.Series(False, index=df.index)
    anyway = outside & ~oos & ~err
    if "scope_reason" not in df.columns:
        df = df.assign(scope_reason=None)
    # Without a no-tumour class (multi-class bundles) nothing is "positive": see the label counts.
    if negative_class:
        pos = df["label"].notna() & (df["label"] != negative_class) & ~oos
    else:
        pos = pd.Series(False, index=df.index)
    return {
        "labels": {str(k): int(v) for k, v in df["label"].value_counts().items()},
        "rows": int(len(df)),
        "unique_paths": int(df["path"].nunique()),
        "scored": int((~err & ~skipped).sum()),
        "errors": int(err.sum()),
        "skipped": int(skipped.sum()),
        "skipped_reasons": {str(k): int(v) for k, v in df.loc[skipped, "reason"].value_counts().items()},
        "series_rows": int(series.sum()),
        "series_scored": int((series & ~err & ~skipped).sum()),
        "positives": int(pos.sum()),
        "out_of_scope": int(oos.sum()),
        "out_of_scope_reasons": {
            str(k): int(v) for k, v in df.loc[oos, "scope_reason"].fillna("?").value_counts().items()
        },
        # --score-out-of-scope: rows outside the scope that got a class anyway, counted so that they show
        "out_of_scope_labelled": int(anyway.sum()),
        "out_of_scope_labelled_reasons": {
            str(k): int(v) for k, v in df.loc[anyway, "scope_reason"].fillna("?").value_counts().items()
        },
        "volumes": int((df["kind"] == "volume").sum()),
        "files_in_series_rows": int(df.loc[series, "n_files"].fillna(0).sum())
        if "n_files" in df.columns
        else 0,
        "images_scored": int(df["n_slices"].fillna(0).sum()),
        "error_reasons": dict(Counter(str(e).split(":", 1)[0] for e in df.loc[err, "error"]).most_common(20)),
    }


STUDIES_COLUMNS = [
    "path",
    "kind",
    "study",
    "series",
    "score",
    "label",
    "in_scope",
    "error",
    "reason",
    "n_files",
]


def study_rows(df: pd.DataFrame, negative_class: str | None) -> pd.DataFrame:
    """One row per study (rows with a ``study`` hash): the highest-scoring in-scope scored series (its path,
    score and label: the study's), and counts of series scored/skipped/failed and of single-file rows. A
    study with no in-scope scored series has no score and label, and says why in ``reason``."""
    if "study" not in df.columns:
        return pd.DataFrame(columns=["study"])
    df = df[df["study"].notna()]
    out = []
    for study, g in df.groupby("study", sort=True):
        series = g[g["kind"] == "series"]
        err, skipped = series["error"].notna(), series["reason"].notna()
        scored = series[~err & ~skipped]
        usable = scored[scored["in_scope"].eq(True) & scored["score"].notna()]
        top = usable.loc[usable["score"].idxmax()] if len(usable) else None
        if top is None:
            why = "no series scored" if scored.empty else "no series in scope"
        out.append(
            {
                "study": study,
                "score": float(top["score"]) if top is not None else np.nan,
                "label": top["label"] if top is not None else None,
                "positive": (top["label"] != negative_class) if top is not None and negative_class else None,
                "series_path": top["path"] if top is not None else None,
                "series_scored": int(len(scored)),
                "series_in_scope": int(len(usable)),
                "series_skipped": int(skipped.sum()),
                "series_errors": int((err & ~skipped).sum()),
                "files_in_series": int(series["n_files"].fillna(0).sum()),
                "single_file_rows": int((g["kind"] != "series").sum()),
                "reason": None if top is not None else why,
            }
        )
    return pd.DataFrame(out)


def write_studies(output: str, storage: StorageOptions | None, negative_class: str | None) -> str | None:
    """OUTPUT/studies.parquet from all score rows (:func:`study_rows`); None when no row has a study."""
    rows = read_scores(output, storage, columns=STUDIES_COLUMNS)
    studies = study_rows(rows, negative_class)
    if studies.empty:
        return None
    fs, path = get_filesystem(join(output, "studies.parquet"), storage)
    with fs.open_output_stream(path) as f:
        pq.write_table(pa.Table.from_pandas(studies, preserve_index=False), f)
    return join(output, "studies.parquet")
