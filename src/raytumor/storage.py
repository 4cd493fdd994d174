"""Storage: filesystems (local, ``s3://``, ``gs://``), URIs, manifests and the units of an input.

The lowest layer: every stage reads and writes through these helpers, so a bucket and a folder behave the
same. A *unit* is what scoring gives one row: a file, a zip/tar member, or (decided later) a volume.
"""

from __future__ import annotations

import os
import posixpath
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

import numpy as np
import pandas as pd
import pyarrow.fs as pafs

# A manifest: .csv/.parquet with a `path` column (training manifests also `label`), or .txt (one path a line).
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


@dataclass(frozen=True)
class StorageOptions:
    """How to reach object storage. Picklable, so Ray tasks rebuild the filesystem themselves."""

    endpoint_override: str | None = None  # e.g. http://127.0.0.1:9000 for an S3-compatible store
    region: str | None = None
    anonymous: bool = False

    @classmethod
    def from_env(cls, endpoint: str | None = None) -> StorageOptions:
        endpoint = endpoint or os.environ.get("RAYTUMOR_S3_ENDPOINT") or os.environ.get("AWS_ENDPOINT_URL")
        return cls(endpoint_override=endpoint, region=os.environ.get("AWS_REGION"))


_FS_CACHE: dict[tuple, pafs.FileSystem] = {}


def _s3(storage: StorageOptions) -> pafs.S3FileSystem:
    kwargs: dict[str, Any] = {"anonymous": storage.anonymous}
    if storage.region:
        kwargs["region"] = storage.region
    if storage.endpoint_override:
        ep = urlparse(storage.endpoint_override)
        if ep.scheme in ("http", "https"):
            kwargs.update(endpoint_override=ep.netloc, scheme=ep.scheme)
        else:
            kwargs["endpoint_override"] = storage.endpoint_override
        kwargs.setdefault("region", "us-east-1")
    return pafs.S3FileSystem(**kwargs)


def get_filesystem(uri: str, storage: StorageOptions | None = None) -> tuple[pafs.FileSystem, str]:
    """Return (filesystem, path-within-filesystem) for a local path, ``s3://`` or ``gs://`` URI."""
    storage = storage or StorageOptions.from_env()
    parsed = urlparse(uri)
    scheme = parsed.scheme.lower()
    if scheme in ("", "file") or (len(scheme) == 1 and os.name == "nt"):
        path = parsed.path if scheme == "file" else uri
        key: tuple = ("local",)
        if key not in _FS_CACHE:
            _FS_CACHE[key] = pafs.LocalFileSystem()
        return _FS_CACHE[key], os.path.abspath(os.path.expanduser(path))
    path = (parsed.netloc + parsed.path).rstrip("/")
    key = (scheme, storage)
    if key not in _FS_CACHE:
        if scheme in ("s3", "s3a"):
            _FS_CACHE[key] = _s3(storage)
        elif scheme in ("gs", "gcs"):
            _FS_CACHE[key] = pafs.GcsFileSystem(anonymous=storage.anonymous)
        else:
            raise ValueError(
                f"unsupported URI scheme {scheme!r} in {uri!r}: use a local path, s3:// or gs://"
            )
    return _FS_CACHE[key], path


def to_uri(scheme_of: str, path: str) -> str:
    """Rebuild a user-facing URI for ``path`` on the same filesystem as ``scheme_of``."""
    scheme = urlparse(scheme_of).scheme.lower()
    return f"{scheme}://{path}" if scheme and scheme != "file" else path


def join(base: str, *parts: str) -> str:
    """``base/parts...`` for a local folder or a bucket prefix."""
    return posixpath.join(base.rstrip("/"), *parts) if "://" in base else os.path.join(base, *parts)


def read_bytes(uri: str, storage: StorageOptions | None = None) -> bytes:
    """The file's bytes as stored. ``compression=None``: pyarrow would otherwise inflate ``*.gz`` (a
    ``.nii.gz``) by its name, unbounded and before the decoders' size-limited gunzip, and report a truncated
    download as an unreadable file rather than a truncated scan."""
    fs, path = get_filesystem(uri, storage)
    with fs.open_input_stream(path, compression=None) as f:
        return f.read()


def write_text(uri: str, text: str, storage: StorageOptions | None = None) -> None:
    fs, path = get_filesystem(uri, storage)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(text.encode())


def read_text(uri: str, storage: StorageOptions | None = None) -> str | None:
    """The file's text, or None when there is no such file."""
    fs, path = get_filesystem(uri, storage)
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as f:
        return f.read().decode()


# ----------------------------------------------------------------------------------------------------------
# Manifests


def is_manifest(uri: str) -> bool:
    return uri.lower().endswith(MANIFEST_SUFFIXES)


def read_manifest(
    source: str, storage: StorageOptions | None = None, required: tuple[str, ...] = ("path",)
) -> pd.DataFrame:
    """A manifest's rows, every column as stored, with ``path`` resolved: absolute paths and URIs stand as
    they are, relative ones are relative to the manifest (made absolute, so a manifest written elsewhere,
    e.g. a run's test split, never re-resolves them against its own folder). Rows without a path are dropped.
    """
    fs, path = get_filesystem(source, storage)
    low = path.lower()
    with fs.open_input_file(path) as f:
        if low.endswith(".txt"):
            lines = [ln.strip() for ln in f.read().decode("utf-8").splitlines()]
            df = pd.DataFrame({"path": [p for p in lines if p and not p.startswith("#")]}, dtype=object)
        elif low.endswith(".csv"):
            df = pd.read_csv(f, dtype=str)
        else:
            df = pd.read_parquet(f)
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise ValueError(f"manifest {source} needs columns {','.join(required)} (has {list(df.columns)})")
    base = source.rsplit("/", 1)[0] if "/" in source else "."

    def resolve(p: str) -> str:
        if p.startswith("/") or len(urlparse(p).scheme) > 1:
            return p
        return f"{base}/{p}" if "://" in base else os.path.abspath(os.path.join(base, p))

    df = df[df["path"].notna()].reset_index(drop=True)
    df["path"] = df["path"].astype(str).map(resolve)
    return df


# ----------------------------------------------------------------------------------------------------------
# Units of an input to score: every file or archive member becomes exactly one unit


def archive_kind(name: str) -> str | None:
    low = name.lower()
    for suffix, kind in ARCHIVE_SUFFIXES.items():
        if low.endswith(suffix):
            return kind
    return None


def member_id(archive: str, member: str, occurrence: int) -> str:
    """``archive!member``; an archive may hold a name twice (tar appends): later copies get #2, #3..."""
    return f"{archive}{MEMBER_SEP}{member}" + (f"#{occurrence}" if occurrence > 1 else "")


@dataclass
class Units:
    table: pd.DataFrame  # id, source, member, member_n, kind ('file' | 'zip' | 'tar'), size
    error_rows: list[tuple[str, str]] = field(default_factory=list)  # (id, reason) decided while listing
    duplicate_entries: int = 0  # manifest lines naming a path already listed


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
                    "id": member_id(uri, info.filename, seen[info.filename]),
                    "source": uri,
                    "member": info.filename,
                    "member_n": seen[info.filename],
                    "kind": "zip",
                    "size": info.file_size,
                }
            )
    return rows


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


def _manifest_units(source: str, storage: StorageOptions | None) -> tuple[list, list, int]:
    rows: list[dict] = []
    errors: list[tuple[str, str]] = []
    seen: set[str] = set()
    dup = 0
    for p in read_manifest(source, storage)["path"]:
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
    return rows, errors, dup


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
    elif is_manifest(root):
        rows, errors, dup = _manifest_units(source, storage)
    else:
        rows, errors = _unit_rows(source, fs, root, info.size or 0)
    cols = ["id", "source", "member", "member_n", "kind", "size"]
    table = pd.DataFrame(rows, columns=cols)
    table["member_n"] = table["member_n"].fillna(1).astype(np.int64)
    table["size"] = table["size"].fillna(0).astype(np.int64)
    return Units(table.sort_values("id", ignore_index=True), errors, dup)
