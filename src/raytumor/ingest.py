"""Ingest: list labelled scans from a folder, bucket or manifest, and decode them in Ray Data tasks.

Listing happens on the driver (one metadata call per directory page), reading and decoding in parallel
Ray Data tasks. Every listed file ends up in exactly one of: used, rejected (with a reason) or ignored
(hidden/documentation files outside class folders) — nothing disappears without a count.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.fs as pafs

from raytumor import formats, split
from raytumor.preprocess import PreprocessConfig, model_inputs
from raytumor.storage import StorageOptions, get_filesystem, is_manifest, read_bytes, read_manifest, to_uri

# Folder names that mean "no tumour"; compared after lower-casing and dropping non-alphanumerics.
NEGATIVE_NAMES = frozenset(
    {
        "no",
        "notumor",
        "notumour",
        "nontumor",
        "nontumour",
        "normal",
        "negative",
        "healthy",
        "absent",
        "0",
        "false",
    }
)
# Files next to the data that are documentation, not scans; skipped (and counted) when listing a tree.
DOC_SUFFIXES = (".md", ".txt", ".csv", ".json", ".yaml", ".yml", ".parquet", ".html", ".pdf")


# ----------------------------------------------------------------------------------------------------------
# Class layout


def _norm_name(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def is_negative_name(name: str) -> bool:
    return _norm_name(name) in NEGATIVE_NAMES


def class_layout(
    names: list[str] | set[str], order: list[str] | None = None, *, min_classes: int = 2
) -> tuple[list[str], str | None]:
    """Order the classes and find the no-tumour class.

    Binary sets put the no-tumour class first so index 1 means tumour; otherwise names sort. An explicit
    ``order`` wins. Returns (classes, negative_class or None). The data must hold ``min_classes`` of the
    names even when ``order`` lists more: training needs two; evaluating a bundle on a folder of healthy
    scans passes the bundle's classes as ``order`` and ``min_classes=1``.
    """
    names = sorted(set(names))
    if len(names) < min_classes:
        raise ValueError(
            f"need at least {min_classes} classes, found {names}: a labelled tree is ROOT/<class>/<files>"
        )
    if order:
        missing = set(names) - set(order)
        if missing:
            raise ValueError(f"labels {sorted(missing)} are not in the given class order {order}")
        classes = list(order)
    else:
        classes = names
        negatives = [n for n in names if is_negative_name(n)]
        if len(names) == 2 and len(negatives) == 1:
            classes = [negatives[0]] + [n for n in names if n != negatives[0]]
    if len(classes) < 2:
        raise ValueError(f"need at least 2 classes, found {classes}: a labelled tree is ROOT/<class>/<files>")
    negatives = [c for c in classes if is_negative_name(c)]
    return classes, (negatives[0] if len(negatives) == 1 else None)


# ----------------------------------------------------------------------------------------------------------
# Listing


@dataclass
class Listing:
    """Files found at one or more data arguments, before decoding."""

    source: str  # the data argument(s), joined with " + " when several
    files: pd.DataFrame  # path, class_name, source (key, see source_key) (+ patient_id from a manifest)
    ignored: list[tuple[str, str]] = field(default_factory=list)  # (path, why)
    # Negative folder names of other sources renamed to the first one's (e.g. no_tumor -> no)
    class_aliases: dict[str, str] = field(default_factory=dict)

    def summary(self) -> dict:
        out = {
            "source": self.source,
            "files_listed": int(len(self.files)),
            "files_ignored": len(self.ignored),
            "ignored_reasons": dict(Counter(why for _, why in self.ignored)),
        }
        if "source" in self.files.columns:
            out["per_source"] = {str(k): int(v) for k, v in self.files["source"].value_counts().items()}
        if self.class_aliases:
            out["class_aliases"] = dict(self.class_aliases)
        return out


# Manifest columns that describe a file and travel with it into the split manifest and the bundle's scope
# counts (view: axial/coronal/sagittal; sequence: flair/t1c...; site) besides path/label/source/patient_id.
CARRIED_COLUMNS = ("view", "sequence", "site")
# A labelled tree whose root holds this file is SYNTHETIC (raytumor.phantoms writes it): its examples never
# count towards a bundle's scope. A manifest says so with a boolean ``synthetic`` column.
SYNTHETIC_MARKER = "SYNTHETIC_README.txt"


def list_labelled(source: str | Sequence[str], storage: StorageOptions | None = None) -> Listing:
    """List a labelled tree ``ROOT/<class>/**/<file>`` or a CSV/Parquet manifest with ``path,label``.

    Several data arguments are listed one by one and concatenated; every row's ``source`` column holds
    its source key (:func:`source_key`). A file listed by two arguments is an error (it would be counted
    twice). Each source names its no-tumour folder its own way (``no``, ``no_tumor``): when every source
    has at most one negative class name, they are renamed to the first source's, so the union stays a
    binary problem (``class_aliases`` records the renames).
    """
    if not isinstance(source, str):
        sources = list(source)
        if not sources:
            raise ValueError("no data source given")
        if len(sources) > 1:
            return _list_many(sources, storage)
        source = sources[0]
    if is_manifest(source):
        return _list_manifest(source, storage)
    fs, root = get_filesystem(source, storage)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"data source not found: {source}")
    if info.type != pafs.FileType.Directory:
        raise ValueError(f"{source} is neither a directory nor a .csv/.parquet manifest")
    rows, ignored = [], []
    synthetic = False
    for fi in fs.get_file_info(pafs.FileSelector(root, recursive=True)):
        if fi.type != pafs.FileType.File:
            continue
        rel = posixpath.relpath(fi.path.replace(os.sep, "/"), root.replace(os.sep, "/"))
        parts = rel.split("/")
        uri = to_uri(source, fi.path)
        synthetic = synthetic or rel == SYNTHETIC_MARKER
        if any(p.startswith(".") for p in parts):
            ignored.append((uri, "hidden file"))
        elif len(parts) < 2:
            ignored.append((uri, "not inside a class folder"))
        elif parts[-1].lower().endswith(DOC_SUFFIXES) or parts[-1].upper().startswith(
            ("README", "PROVENANCE")
        ):
            ignored.append((uri, "documentation file"))
        else:
            rows.append((uri, parts[0]))
    files = pd.DataFrame(rows, columns=["path", "class_name"]).sort_values("path", ignore_index=True)
    if files.empty:
        raise ValueError(f"no files found under class folders in {source}: expected ROOT/<class>/<files>")
    files["source"] = source_key(None, source)
    files["synthetic"] = synthetic
    return Listing(source=source, files=files, ignored=ignored)


def _list_many(sources: list[str], storage: StorageOptions | None) -> Listing:
    listings = [list_labelled(s, storage) for s in sources]
    # Folder rows have no patient_id: concat fills NaN, which must read as "no id" (None), not a float.
    files = pd.concat([lst.files for lst in listings], ignore_index=True)
    for col in ("patient_id", *CARRIED_COLUMNS):
        if col in files.columns:
            files[col] = files[col].astype(object).where(files[col].notna(), None)
    files["synthetic"] = files["synthetic"].fillna(False).astype(bool)
    twice = files["path"].duplicated(keep=False)
    if twice.any():
        dup = files.loc[twice].sort_values("path")
        first = dup["path"].iloc[0]
        raise ValueError(
            f"{int(twice.sum())} files are listed by more than one data argument, e.g. {first} in "
            f"{sorted(set(dup.loc[dup['path'] == first, 'source']))}"
        )
    aliases: dict[str, str] = {}
    negs = [sorted({c for c in lst.files["class_name"].unique() if is_negative_name(c)}) for lst in listings]
    if all(len(n) <= 1 for n in negs) and any(negs):
        target = next(n[0] for n in negs if n)
        aliases = {n[0]: target for n in negs if n and n[0] != target}
        files["class_name"] = files["class_name"].replace(aliases)
    return Listing(
        source=" + ".join(sources),
        files=files.sort_values("path", ignore_index=True),
        ignored=[x for lst in listings for x in lst.ignored],
        class_aliases=aliases,
    )


def source_key(value: Any, default: str) -> str:
    """The source key of a row: a manifest's ``source`` value, else the data argument (``default``).

    A manifest value ``NAME via PROVENANCE`` (e.g. ``IXI T1 (2mm, uint8 downsampled) via github:...``)
    counts as ``NAME``, so per-file provenance details do not split one dataset into many sources.
    Null, NaN and blank values fall back to ``default``.
    """
    if value is None or (not isinstance(value, str) and bool(pd.isna(value))):  # None, NaN, pd.NA
        return default
    name = str(value).split(" via ", 1)[0].strip()
    return name or default


def _list_manifest(source: str, storage: StorageOptions | None) -> Listing:
    df = read_manifest(source, storage, required=("path", "label"))
    out = pd.DataFrame({"path": df["path"], "class_name": df["label"].astype(str)})
    raw = df["source"] if "source" in df.columns else pd.Series(None, index=df.index, dtype=object)
    out["source"] = [source_key(v, source) for v in raw]
    if "patient_id" in df.columns:
        # As text: numeric ids from Parquet must not clash with text ids of another source in Arrow.
        pid = df["patient_id"].astype(object)
        ok = pid.notna() & (pid.astype(str).str.strip() != "")
        out["patient_id"] = pid.astype(str).str.strip().where(ok, None)
    for col in CARRIED_COLUMNS:
        if col in df.columns:
            v = df[col].astype(object)
            ok = v.notna() & (v.astype(str).str.strip() != "")
            out[col] = v.astype(str).str.strip().where(ok, None)
    syn = df["synthetic"] if "synthetic" in df.columns else pd.Series(False, index=df.index)
    out["synthetic"] = syn.map(lambda x: str(x).strip().lower() in ("1", "true", "yes")).astype(bool)
    return Listing(source=source, files=out.reset_index(drop=True))


# ----------------------------------------------------------------------------------------------------------
# Decoding inside Ray Data tasks


def decode_batch(
    batch: dict[str, np.ndarray],
    *,
    storage: StorageOptions | None = None,
    image_size: int | None = None,
    fingerprints: bool = True,
    preprocess: dict | None = None,
) -> dict[str, np.ndarray]:
    """Read and decode each path in a batch; one output row per input row, errors as a reason string.

    With ``image_size`` an ``image`` column of (size, size) uint8 arrays is added (zeros for failed rows,
    so the tensor column keeps one shape), after the bundle's ``preprocess`` steps (head crop, intensity
    standardisation); with ``fingerprints`` the dHash/thumbnail (of the unprocessed image) for grouping.
    """
    prep = PreprocessConfig.from_dict(preprocess) if preprocess else None

    paths = [str(p) for p in batch["path"]]
    n = len(paths)
    out: dict[str, Any] = {k: v for k, v in batch.items()}
    sha = np.empty(n, dtype=object)
    err = np.empty(n, dtype=object)
    fmt = np.empty(n, dtype=object)
    mode = np.empty(n, dtype=object)
    width = np.zeros(n, dtype=np.int32)
    height = np.zeros(n, dtype=np.int32)
    dhash = np.zeros(n, dtype=np.int64)
    thumb = np.empty(n, dtype=object)
    dhash_crop = np.zeros(n, dtype=np.int64)
    thumb_crop = np.empty(n, dtype=object)
    images = np.zeros((n, image_size, image_size), dtype=np.uint8) if image_size else None
    view = np.empty(n, dtype=object)  # from the file's geometry (DICOM orientation), else None
    modality = np.empty(n, dtype=object)  # DICOM Modality, else None
    for i, path in enumerate(paths):
        try:
            data = read_bytes(path, storage)
        except Exception as e:  # unreadable: permissions, vanished object, network
            err[i] = f"unreadable: {type(e).__name__}: {e}"[:300]
            continue
        sha[i] = hashlib.sha256(data).hexdigest()
        try:
            if images is not None:
                stack, dec = model_inputs(data, image_size, prep)
                images[i], pixels = stack[0], dec.slices[0]
            else:  # catalogue: fingerprints of the full-resolution image
                dec = formats.decode_image(data)
                pixels = dec.pixels
        except formats.DecodeError as e:
            err[i] = e.reason
            fmt[i] = formats.sniff_format(data)
            continue
        except Exception as e:  # a decoder bug must cost one row, not the run
            err[i] = f"decode failed: {type(e).__name__}: {e}"[:300]
            continue
        fmt[i], mode[i], width[i], height[i] = dec.format, dec.mode, dec.width, dec.height
        view[i], modality[i] = getattr(dec, "view", None), getattr(dec, "modality", None)
        if fingerprints:
            fp = split.fingerprint(pixels)
            dhash[i], thumb[i] = fp["dhash"], fp["thumb"]
            dhash_crop[i], thumb_crop[i] = fp["dhash_crop"], fp["thumb_crop"]
    out.update(sha256=sha, error=err, format=fmt, mode=mode, width=width, height=height)
    if fingerprints:
        out.update(dhash=dhash, thumb=thumb, dhash_crop=dhash_crop, thumb_crop=thumb_crop)
    if images is not None:
        out.update(image=images, view_header=view, modality=modality)
    return out


def _num_blocks(n: int) -> int:
    import ray

    cpus = int(ray.cluster_resources().get("CPU", 2)) if ray.is_initialized() else 2
    return max(1, min(n // 32 + 1, max(4 * cpus, n // 256)))


def decode_dataset(
    files: pd.DataFrame,
    *,
    storage: StorageOptions | None = None,
    image_size: int | None = None,
    fingerprints: bool = True,
    batch_size: int = 32,
    preprocess: dict | None = None,
):
    """A lazy Ray Dataset of decoded rows for the listed ``files`` (parallel over CPU tasks)."""
    import ray.data

    ds = ray.data.from_pandas(files.reset_index(drop=True)).repartition(_num_blocks(len(files)))
    return ds.map_batches(
        decode_batch,
        fn_kwargs={
            "storage": storage,
            "image_size": image_size,
            "fingerprints": fingerprints,
            "preprocess": preprocess,
        },
        batch_size=batch_size,
        batch_format="numpy",
        num_cpus=1,
    )


@dataclass
class Catalogue:
    """Every listed file with its label, content hash, fingerprint and decode outcome (no pixels)."""

    listing: Listing
    table: pd.DataFrame  # path, class_name, label, sha256, dhash, thumb, format, mode, width, height, error
    classes: list[str]
    negative_class: str | None

    @property
    def ok(self) -> pd.DataFrame:
        return self.table[self.table["error"].isna()]

    @property
    def rejected(self) -> pd.DataFrame:
        return self.table[self.table["error"].notna()]

    def summary(self) -> dict:
        t = self.table
        return {
            **self.listing.summary(),
            "files_read": int(len(t)),
            "files_decoded": int(t["error"].isna().sum()),
            "files_rejected": int(t["error"].notna().sum()),
            "rejected_reasons": dict(Counter(_reason_key(r) for r in t["error"].dropna())),
            "rejected_files": [
                {"path": p, "reason": r} for p, r in t.loc[t["error"].notna(), ["path", "error"]].values[:200]
            ],
            "classes": self.classes,
            "negative_class": self.negative_class,
            "per_class": {
                c: int(v) for c, v in t.loc[t["error"].isna(), "class_name"].value_counts().items()
            },
            "formats": {str(k): int(v) for k, v in t["format"].value_counts().items()},
            "modes": {str(k): int(v) for k, v in t["mode"].value_counts().items()},
        }


def _reason_key(reason: str) -> str:
    # Group "decompression bomb: 9e8 pixels > ..." style messages by their stable prefix.
    return reason.split(":", 1)[0]


def build_catalogue(
    source: str | Sequence[str],
    storage: StorageOptions | None = None,
    class_order: list[str] | None = None,
    *,
    label_map: Callable[[list[str]], Mapping[str, str]] | None = None,
    min_classes: int = 2,
) -> Catalogue:
    """List and fingerprint every file at ``source`` (decodes each once, keeps no pixels).

    ``label_map`` gets the listed label names and returns renames (e.g. ``no_tumor`` -> a bundle's ``no``),
    applied before the class layout and recorded in ``listing.class_aliases``; ``min_classes`` as in
    :func:`class_layout`.
    """
    listing = list_labelled(source, storage)
    if label_map is not None:
        renames = {k: v for k, v in label_map(sorted(listing.files["class_name"].unique())).items() if k != v}
        if renames:
            listing.files["class_name"] = listing.files["class_name"].replace(renames)
            # Compose with the renames listing made across sources: original name -> final name.
            aliases = {k: renames.get(v, v) for k, v in listing.class_aliases.items()}
            aliases.update({k: v for k, v in renames.items() if k not in aliases})
            listing.class_aliases = {k: v for k, v in aliases.items() if k != v}
    classes, negative = class_layout(
        listing.files["class_name"].unique().tolist(), class_order, min_classes=min_classes
    )
    table = decode_dataset(listing.files, storage=storage, image_size=None).to_pandas()
    table = table.sort_values("path", ignore_index=True)
    table["label"] = table["class_name"].map({c: i for i, c in enumerate(classes)}).astype(np.int64)
    for col in ("error", "format", "mode", "sha256"):
        table[col] = table[col].where(table[col].notna(), None)
    return Catalogue(listing=listing, table=table, classes=classes, negative_class=negative)


def summary_to_json(summary: dict) -> dict:
    """Make a summary JSON-safe (numpy scalars to Python)."""

    return json.loads(json.dumps(summary, default=lambda o: o.item() if hasattr(o, "item") else str(o)))


__all__ = [
    "Catalogue",
    "Listing",
    "build_catalogue",
    "class_layout",
    "decode_batch",
    "decode_dataset",
    "is_negative_name",
    "list_labelled",
    "source_key",
    "summary_to_json",
]
