"""``raytumor review OUTPUT --export corrections.csv``: the reviewed rows as a training manifest.

A verdict of ``tumour`` or ``no tumour`` becomes a manifest row (``path,label,source,patient_id`` and where
the verdict came from) that ``raytumor train --data`` takes beside the other sources, so a corrected false
positive is a negative example next time. ``unsure`` rows are not exported. Rows training cannot read where
they are (archive members, volumes, DICOM series) are written next to the manifest (``<name>_files/``): a
2-D member as its own bytes, a volume or series as the slice the model flagged and the reviewer judged.
"""

from __future__ import annotations

import hashlib
import io
import posixpath
from typing import Any

import pandas as pd

from raytumor.review.scans import ScanViewer, Unavailable
from raytumor.review.store import ReviewStore
from raytumor.storage import StorageOptions, get_filesystem, parse_member_id

MANIFEST_COLUMNS = [
    "path", "label", "source", "patient_id", "verdict", "reviewer", "reviewed_at", "score", "scored_label",
    "scored_path",
]  # fmt: skip


def correction_label(row: pd.Series, verdict: str, classes: list[str], negative: str | None) -> str | None:
    """The class a verdict says: the negative class for ``no_tumour``; for ``tumour`` the called tumour class,
    or the one tumour class of a binary bundle (None: a multi-class bundle's row not called a tumour, whose
    tumour type the verdict does not say)."""
    if negative is None:
        return None
    if verdict == "no_tumour":
        return negative
    if verdict != "tumour":
        return None
    if row["label"] in classes and row["label"] != negative:
        return str(row["label"])
    tumour = [c for c in classes if c != negative]
    return tumour[0] if len(tumour) == 1 else None


def _readable_in_place(row: pd.Series) -> bool:
    return row["kind"] == "image" and parse_member_id(str(row["path"])) is None


def export_corrections(
    store: ReviewStore, viewer: ScanViewer, dest: str, storage: StorageOptions | None = None
) -> dict[str, Any]:
    """Write the manifest ``dest`` (local or bucket); returns counts and the rows left out, with why."""
    fmt = "parquet" if dest.lower().endswith(".parquet") else "csv" if dest.lower().endswith(".csv") else None
    if fmt is None:  # training reads a manifest by its name
        raise ValueError(f"--export {dest}: name the manifest .csv or .parquet")
    df = store.df[store.df["verdict"].isin(["tumour", "no_tumour", "unsure"])]
    fs, path = get_filesystem(dest, storage)
    stem = posixpath.splitext(path)[0]
    files_dir = f"{stem}_files"
    local = "://" not in dest
    out, left_out = [], []
    materialised = 0
    for rid, row in df.iterrows():
        if row["verdict"] == "unsure":
            left_out.append({"path": row["path"], "why": "verdict unsure"})
            continue
        label = correction_label(row, row["verdict"], store.classes, store.negative_class)
        if label is None:
            left_out.append({"path": row["path"], "why": "the verdict does not say which class"})
            continue
        target = str(row["path"])
        if not _readable_in_place(row):
            try:
                data, ext = viewer.export_image(int(rid))
            except (Unavailable, OSError, ValueError) as e:
                left_out.append({"path": row["path"], "why": f"cannot export its picture: {e}"[:300]})
                continue
            name = hashlib.sha256(target.encode("utf-8", "surrogatepass")).hexdigest()[:20] + ext
            if local:  # a bucket needs no folders (create_dir would leave a marker object)
                fs.create_dir(files_dir, recursive=True)
            with fs.open_output_stream(f"{files_dir}/{name}") as f:
                f.write(data)
            # relative to the manifest, which is how training resolves it: the pair can move together
            target = f"{posixpath.basename(files_dir)}/{name}"
            materialised += 1
        study = row.get("study")
        patient = store.manifest_patients.get(str(row["path"])) or (
            f"study-{study}" if isinstance(study, str) and study else ""
        )
        out.append(
            {
                "path": target, "label": label, "source": row["source"], "patient_id": patient,
                "verdict": row["verdict"], "reviewer": row["reviewer"], "reviewed_at": row["reviewed_at"],
                "score": row["score"], "scored_label": row["label"], "scored_path": row["path"],
            }
        )  # fmt: skip
    manifest = pd.DataFrame(out, columns=MANIFEST_COLUMNS)
    manifest["score"] = manifest["score"].astype(float)
    parent = posixpath.dirname(path)
    if parent and local:
        fs.create_dir(parent, recursive=True)
    if fmt == "csv":
        data = manifest.to_csv(index=False).encode()
    else:
        buf = io.BytesIO()
        manifest.astype({c: object for c in MANIFEST_COLUMNS if c != "score"}).to_parquet(buf, index=False)
        data = buf.getvalue()
    with fs.open_output_stream(path) as f:
        f.write(data)
    return {
        "manifest": dest,
        "rows": len(manifest),
        "labels": manifest["label"].value_counts().to_dict(),
        "files_written": materialised,
        "left_out": left_out,
    }
