"""Storage: filesystems (local, ``s3://``, ``gs://``), URIs, manifests and the units of an input.

The lowest layer: every stage reads and writes through these helpers, so a bucket and a folder behave the
same. A *unit* is what scoring gives one row: a file, a zip/tar member, or (decided later) a volume.
"""

from __future__ import annotations

import errno
import os
import posixpath
import random
import re
import time
import zipfile
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar
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
    # A read that fails for a transient reason (network, throttling, timeout) is tried this many times in
    # all, waiting read_backoff_s, then twice that, ... between tries (RAYTUMOR_READ_ATTEMPTS/_BACKOFF_S).
    read_attempts: int = 4
    read_backoff_s: float = 0.5

    @classmethod
    def from_env(cls, endpoint: str | None = None) -> StorageOptions:
        endpoint = endpoint or os.environ.get("RAYTUMOR_S3_ENDPOINT") or os.environ.get("AWS_ENDPOINT_URL")
        return cls(
            endpoint_override=endpoint,
            region=os.environ.get("AWS_REGION"),
            read_attempts=max(1, int(os.environ.get("RAYTUMOR_READ_ATTEMPTS", cls.read_attempts))),
            read_backoff_s=max(0.0, float(os.environ.get("RAYTUMOR_READ_BACKOFF_S", cls.read_backoff_s))),
        )


# ----------------------------------------------------------------------------------------------------------
# Transient storage faults: retried with backoff, then the unit is left for a rerun (never an error row)

# Phrases of pyarrow's S3/GCS errors (AWS SDK error types, curl codes, gRPC codes) and of sockets that mean
# "try again later". Quoted key names are removed before matching, so a scan named 503.jpg stays permanent.
_TRANSIENT_CODES = re.compile(
    r"AWS Error (NETWORK_CONNECTION|SLOW_DOWN|SERVICE_UNAVAILABLE|THROTTLING|REQUEST_TIMEOUT|"
    r"INTERNAL_FAILURE|REQUEST_LIMIT_EXCEEDED)|HTTP status (5\d\d|429|408)|curlCode: (5|6|7|18|28|35|52|55|56)\b"
    r"|\b(UNAVAILABLE|DEADLINE_EXCEEDED|RESOURCE_EXHAUSTED)\b"
)
_TRANSIENT_PHRASES = re.compile(
    r"could(n't| not) connect|connection (refused|reset|aborted|closed)|broken pipe|timed out|timeout was"
    r"|slow ?down|throttl|service unavailable|too many requests|temporar(il)?y (unavailable|failure)"
    r"|try again|name resolution|network is unreachable|no route to host|server disconnected",
    re.IGNORECASE,
)
_TRANSIENT_ERRNOS = {
    errno.ECONNREFUSED, errno.ECONNRESET, errno.ECONNABORTED, errno.ETIMEDOUT, errno.EHOSTUNREACH,
    errno.ENETUNREACH, errno.ENETDOWN, errno.EPIPE, errno.EAGAIN,
}  # fmt: skip
# Never worth a retry: the input itself is missing, forbidden or corrupt.
_PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, zipfile.BadZipFile,
              EOFError, zlib.error, UnicodeError)  # fmt: skip


def is_transient(exc: BaseException) -> bool:
    """True when ``exc`` (or what it wraps) says storage could not be reached now, not that the input is
    bad: connection refused/reset, timeouts, throttling, 5xx. Corrupt or missing inputs are permanent."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, StorageUnreachable):
            return True
        if isinstance(e, _PERMANENT):
            return False
        if isinstance(e, (ConnectionError, TimeoutError)):
            return True
        if isinstance(e, OSError):
            if e.errno in _TRANSIENT_ERRNOS:
                return True
            msg = re.sub(r"'[^']*'", "''", str(e))
            if _TRANSIENT_CODES.search(msg) or _TRANSIENT_PHRASES.search(msg):
                return True
        e = e.__cause__ or e.__context__
    return False


class StorageUnreachable(OSError):
    """A read still failed for a transient reason after every try: the unit is left unscored (no row), so
    running the same command again reads it."""


T = TypeVar("T")


class Retrier:
    """Tries a read up to ``attempts`` times with exponential backoff (jittered) while it fails for a
    transient reason; permanent errors pass through at once. After a read has used up its tries the
    storage is taken to be down: later reads get one try each until one succeeds, so a dead server costs
    one backoff cycle per reader, not one per unit."""

    def __init__(
        self,
        attempts: int = StorageOptions.read_attempts,
        backoff_s: float = StorageOptions.read_backoff_s,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.attempts = max(1, int(attempts))
        self.backoff_s = backoff_s
        self.sleep = sleep
        self.down = False
        self.retries = 0  # transient failures retried, for the tests and the curious

    @classmethod
    def for_storage(cls, storage: StorageOptions | None) -> Retrier:
        s = storage or StorageOptions.from_env()
        return cls(s.read_attempts, s.read_backoff_s)

    @property
    def tries(self) -> int:
        """Tries the next read gets: all of them, or one while storage is taken to be down."""
        return 1 if self.down else self.attempts

    def pause(self, failures: int) -> None:
        """Wait before the next try: backoff_s, 2x, 4x ... (capped at 30 s), jittered so readers spread out."""
        self.retries += 1
        self.sleep(min(30.0, self.backoff_s * 2 ** (failures - 1)) * random.uniform(0.5, 1.0))

    def call(self, fn: Callable[..., T], *args: Any, what: str = "") -> T:
        tries = self.tries
        failures = 0
        while True:
            try:
                out = fn(*args)
            except StorageUnreachable:
                raise
            except Exception as e:
                if not is_transient(e):
                    raise
                failures += 1
                if failures >= tries:
                    self.down = True
                    raise StorageUnreachable(
                        f"storage unreachable{' reading ' + what if what else ''} after {tries} tries: "
                        f"{type(e).__name__}: {e}"[:400]
                    ) from e
                self.pause(failures)
            else:
                self.down = False
                return out


_FS_CACHE: dict[tuple, pafs.FileSystem] = {}


def _s3(storage: StorageOptions, single_attempt: bool = False) -> pafs.S3FileSystem:
    kwargs: dict[str, Any] = {"anonymous": storage.anonymous}
    if single_attempt:  # the caller's Retrier owns the retries (and their backoff): one SDK try each
        kwargs["retry_strategy"] = pafs.AwsStandardS3RetryStrategy(max_attempts=1)
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


def get_filesystem(
    uri: str, storage: StorageOptions | None = None, *, single_attempt: bool = False
) -> tuple[pafs.FileSystem, str]:
    """Return (filesystem, path-within-filesystem) for a local path, ``s3://`` or ``gs://`` URI.
    ``single_attempt``: S3 makes one try per request, for callers that retry through a :class:`Retrier`."""
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
    key = (scheme, storage, single_attempt)
    if key not in _FS_CACHE:
        if scheme in ("s3", "s3a"):
            _FS_CACHE[key] = _s3(storage, single_attempt)
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
    download as an unreadable file rather than a truncated scan. Transient faults are retried with backoff
    (:class:`Retrier`); :class:`StorageUnreachable` when they persist."""
    fs, path = get_filesystem(uri, storage, single_attempt=True)

    def read() -> bytes:
        with fs.open_input_stream(path, compression=None) as f:
            return f.read()

    return Retrier.for_storage(storage).call(read, what=uri)


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


def parse_member_id(uid: str, known: Callable[[str, str], bool] | None = None) -> tuple[str, str, int] | None:
    """(archive, member, occurrence) of a :func:`member_id`, or None for an id that is not an archive member.

    The archive is the shortest prefix before a ``!`` with an archive suffix (member names may hold ``!``).
    A trailing ``#N`` is an occurrence only when ``known(archive, member)`` says the name without it exists
    (without ``known``: whenever it parses), since member names may end in ``#N`` themselves."""
    start = 0
    while (i := uid.find(MEMBER_SEP, start)) > 0:
        archive, member = uid[:i], uid[i + 1 :]
        if archive_kind(archive) and member:
            m = re.fullmatch(r"(.*)#(\d+)", member, flags=re.S)
            if m and int(m.group(2)) > 1 and (known is None or not known(archive, member)):
                return archive, m.group(1), int(m.group(2))
            return archive, member, 1
        start = i + 1
    return None


@dataclass
class Units:
    table: pd.DataFrame  # id, source, member, member_n, kind ('file' | 'zip' | 'tar'), size
    error_rows: list[tuple[str, str]] = field(default_factory=list)  # (id, reason) decided while listing
    duplicate_entries: int = 0  # manifest lines naming a path already listed
    # Archives/manifest entries that storage did not answer for while listing (after retries): no row, so
    # the same command lists and scores them later.
    unreachable: list[str] = field(default_factory=list)


_ZIP_UTF8 = 0x800  # general purpose flag bit 11: name and comment are UTF-8
_UNICODE_PATH = 0x7075  # Info-ZIP Unicode Path extra field


def zip_member_name(info: zipfile.ZipInfo) -> str:
    """A member's name as its writer meant it. ``zipfile`` decodes names without flag bit 11 as cp437,
    which garbles the UTF-8 names Info-ZIP (Linux) and macOS write without the flag. Order: flag bit 11
    (UTF-8, as zipfile already did); an Info-ZIP Unicode Path extra field (0x7075) whose CRC matches the
    stored name; stored bytes that are valid UTF-8 (cp437 text with accents practically never is: a lead
    byte 0xC0-0xF4 is a box-drawing glyph, and one followed by an accented letter is no file name); cp437."""
    if info.flag_bits & _ZIP_UTF8:
        return info.filename
    raw = info.orig_filename.encode("cp437")  # zipfile decoded the stored bytes as cp437: a bijection
    name = _unicode_path_extra(info.extra, raw)
    if name is None:
        try:
            name = raw.decode("utf-8")
        except UnicodeDecodeError:
            name = info.orig_filename
    return name.split("\x00", 1)[0]  # as zipfile does: a NUL ends the name


def _unicode_path_extra(extra: bytes, raw_name: bytes) -> str | None:
    """The UTF-8 name of a 0x7075 field (version 1, CRC-32 of the stored name), or None."""
    i = 0
    while i + 4 <= len(extra):
        tag, size = int.from_bytes(extra[i : i + 2], "little"), int.from_bytes(extra[i + 2 : i + 4], "little")
        body = extra[i + 4 : i + 4 + size]
        if tag == _UNICODE_PATH and len(body) >= 5 and body[0] == 1:
            # A stale field (the name was changed by a tool that ignores the field) is ignored, as the spec says.
            if int.from_bytes(body[1:5], "little") == zlib.crc32(raw_name):
                try:
                    return body[5:].decode("utf-8")
                except UnicodeDecodeError:
                    return None
        i += 4 + size
    return None


def zip_index(zf: zipfile.ZipFile) -> dict[str, list[zipfile.ZipInfo]]:
    """Members by name (:func:`zip_member_name`); a name may repeat: the n-th occurrence is the n-th entry."""
    by_name: dict[str, list[zipfile.ZipInfo]] = {}
    for info in zf.infolist():
        by_name.setdefault(zip_member_name(info), []).append(info)
    return by_name


def _zip_members(uri: str, fs: pafs.FileSystem, path: str) -> list[dict]:
    """One unit per file member; reading the central directory is a few small range reads, even on S3."""
    rows, seen = [], Counter()
    with fs.open_input_file(path) as f, zipfile.ZipFile(f) as zf:
        for info in zf.infolist():
            if info.is_dir():
                continue
            name = zip_member_name(info)
            seen[name] += 1
            rows.append(
                {
                    "id": member_id(uri, name, seen[name]),
                    "source": uri,
                    "member": name,
                    "member_n": seen[name],
                    "kind": "zip",
                    "size": info.file_size,
                }
            )
    return rows


def _unit_rows(
    uri: str, fs: pafs.FileSystem, path: str, size: int, retry: Retrier
) -> tuple[list[dict], list[tuple[str, str]]]:
    """Raises :class:`StorageUnreachable` when a zip's central directory could not be fetched."""
    kind = archive_kind(path)
    if kind == "zip":
        try:
            return retry.call(_zip_members, uri, fs, path, what=uri), []
        except StorageUnreachable:
            raise
        except Exception as e:  # not a zip after all, or a corrupt central directory: one error row
            return [], [(uri, f"corrupt zip archive: {type(e).__name__}: {e}"[:300])]
    return [{"id": uri, "source": uri, "member": None, "kind": kind or "file", "size": size}], []


def _manifest_units(
    source: str, storage: StorageOptions | None, retry: Retrier
) -> tuple[list, list, int, list[str]]:
    rows: list[dict] = []
    errors: list[tuple[str, str]] = []
    unreachable: list[str] = []
    seen: set[str] = set()
    dup = 0
    for p in retry.call(read_manifest, source, storage, what=source)["path"]:
        if p in seen:
            dup += 1
            continue
        seen.add(p)
        pfs, ppath = get_filesystem(p, storage, single_attempt=True)
        try:
            pi = retry.call(pfs.get_file_info, ppath, what=p)
            if pi.type != pafs.FileType.File:
                errors.append((p, "not found" if pi.type == pafs.FileType.NotFound else "not a file"))
                continue
            r, e = _unit_rows(p, pfs, ppath, pi.size or 0, retry)
        except StorageUnreachable:
            unreachable.append(p)
            continue
        rows += r
        errors += e
    return rows, errors, dup, unreachable


def list_units(source: str, storage: StorageOptions | None = None) -> Units:
    """List a folder/prefix (recursively), a single file or archive, or a manifest with a ``path`` column.
    Transient storage faults are retried; if the input itself cannot be listed, :class:`StorageUnreachable`."""
    retry = Retrier.for_storage(storage)
    fs, root = get_filesystem(source, storage, single_attempt=True)
    info = retry.call(fs.get_file_info, root, what=source)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"input not found: {source}")
    rows: list[dict] = []
    errors: list[tuple[str, str]] = []
    unreachable: list[str] = []
    dup = 0

    def add(uri: str, path: str, size: int) -> None:
        try:
            r, e = _unit_rows(uri, fs, path, size, retry)
        except StorageUnreachable:
            unreachable.append(uri)
            return
        rows.extend(r)
        errors.extend(e)

    if info.type == pafs.FileType.Directory:
        selector = pafs.FileSelector(root, recursive=True)
        for fi in retry.call(fs.get_file_info, selector, what=source):
            if fi.type == pafs.FileType.File:
                add(to_uri(source, fi.path), fi.path, fi.size or 0)
    elif is_manifest(root):
        rows, errors, dup, unreachable = _manifest_units(source, storage, retry)
    else:
        add(source, root, info.size or 0)
    cols = ["id", "source", "member", "member_n", "kind", "size"]
    table = pd.DataFrame(rows, columns=cols)
    table["member_n"] = table["member_n"].fillna(1).astype(np.int64)
    table["size"] = table["size"].fillna(0).astype(np.int64)
    return Units(table.sort_values("id", ignore_index=True), errors, dup, unreachable)
