"""DICOM series: which single-frame files form one series, in what order, and which series are scored.

A PACS export holds studies -> series -> one file per slice, named meaninglessly and in random order,
mixed with localizers, other modalities and derived images. The header pass (``raytumor.score.series``)
reads each file's header; this module turns those headers into score units:

* files group by (StudyInstanceUID, SeriesInstanceUID) wherever they lie (a series split across folders
  is one series); a multi-frame file, or a series of one file, stays a file unit as before;
* each series is checked against :class:`SeriesRules` (YAML-overridable): a series that is not scored
  still gets its row, with the reason (``skipped: localizer``, ``skipped: modality CT``);
* the slice order comes from positions along the slice normal (never file names or InstanceNumber);
* a file that cannot join its series (no position/orientation) keeps its own error row.

Identifiers: rows carry a keyed hash of the study/series UIDs (:func:`uid_hash`), never the UIDs, unless
the user asks for them (``--with-uids``).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import posixpath
import secrets
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from raytumor.medical import series_grid
from raytumor.scan import view_from_orientation

__all__ = [
    "HEADER_COLUMNS",
    "Assembly",
    "SeriesRules",
    "assemble",
    "new_salt",
    "series_path",
    "uid_hash",
]

# What the header pass returns per file (besides the unit's id).
HEADER_COLUMNS = (
    "dicom", "header_error", "study_uid", "series_uid", "sop_uid", "sop_class", "frame_of_reference",
    "modality", "image_type", "iop", "ipp", "pixel_spacing", "slice_thickness", "instance_number", "rows",
    "cols", "frames", "series_description",
)  # fmt: skip

# Secondary Capture storage classes: pictures of something (screenshots, reports), never a slice stack.
_SECONDARY_CAPTURE = (
    "1.2.840.10008.5.1.4.1.1.7",
    "1.2.840.10008.5.1.4.1.1.7.1",
    "1.2.840.10008.5.1.4.1.1.7.2",
    "1.2.840.10008.5.1.4.1.1.7.3",
    "1.2.840.10008.5.1.4.1.1.7.4",
)


@dataclass(frozen=True)
class SeriesRules:
    """Which series are scored. Defaults suit a brain-MRI classifier; override any of them with a YAML
    mapping (``--series-rules rules.yaml``), unknown keys refused."""

    modalities: tuple[str, ...] = ("MR",)  # others: "skipped: modality CT"
    skip_localizers: bool = True  # ImageType LOCALIZER (scouts / survey scans)
    min_slices: int = 8  # fewer files than this: too few slices for a volume ("skipped: 3 slices")
    include_derived: bool = False  # ImageType DERIVED (reformats, MIPs, maps) and secondary captures
    max_missing_fraction: float = 0.25  # more of the slice grid missing than this: skipped
    orientation_tolerance: float = 1e-3  # largest difference of direction cosines within one series

    def __post_init__(self) -> None:
        object.__setattr__(self, "modalities", tuple(str(m).strip().upper() for m in self.modalities))
        if self.min_slices < 2:
            raise ValueError(f"series rules: min_slices must be >= 2, got {self.min_slices}")
        if not 0.0 <= self.max_missing_fraction < 1.0:
            raise ValueError(
                f"series rules: max_missing_fraction must be in [0, 1), got {self.max_missing_fraction}"
            )
        if not 0.0 < self.orientation_tolerance < 1.0:
            raise ValueError(
                f"series rules: orientation_tolerance must be in (0, 1), got {self.orientation_tolerance}"
            )

    @classmethod
    def from_yaml(cls, path: str | Path | None) -> SeriesRules:
        if not path:
            return cls()
        import yaml

        data = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"series rules {path}: a YAML mapping is needed")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"series rules {path}: unknown keys {unknown}; known: {sorted(known)}")
        if "modalities" in data:
            mods = data["modalities"]
            data["modalities"] = tuple([mods] if isinstance(mods, str) else mods)
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def new_salt() -> str:
    return secrets.token_hex(16)


def uid_hash(uid: str | None, salt: str) -> str | None:
    """A keyed hash (HMAC-SHA256, 20 hex digits) of a UID: the same UID and salt give the same value, so
    rows join back to the PACS by whoever holds the salt; without it the UID cannot be recovered or tested."""
    if not uid:
        return None
    return hmac.new(salt.encode(), uid.encode(), hashlib.sha256).hexdigest()[:20]


def _common_dir(ids: list[str]) -> str:
    dirs = [posixpath.dirname(i.replace("\\", "/")) for i in ids]
    parts = [d.split("/") for d in dirs]
    common = []
    for level in zip(*parts, strict=False):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    return "/".join(common) or "."


def series_path(files: list[str], series_hash: str) -> str:
    """The row ``path`` of a series: its files' common folder plus the series' hash (several series often
    share a folder); stable across reruns with the same salt, so a rerun sees the series as done."""
    return f"{_common_dir(files)}#series-{series_hash}"


@dataclass
class Assembly:
    """What the headers make of the files. ``series``: one row per series (id = row path, files in slice
    order, rules' verdict in ``reason``); ``lone``: files that stay file units, with their study hash;
    ``refused``: (file id, reason) of files that could not join their series (an error row each);
    ``members``: file id -> series row path, for the accounting check."""

    series: pd.DataFrame
    lone: pd.DataFrame
    refused: list[tuple[str, str]]
    members: pd.DataFrame


SERIES_COLUMNS = (
    "id", "files", "n_files", "n_slices", "n_missing", "view", "spacing_mm", "reason", "study", "series",
    "study_uid", "series_uid", "series_description", "modality",
)  # fmt: skip


def _vec(v: Any, n: int) -> np.ndarray | None:
    if not isinstance(v, (str, list, tuple, np.ndarray)):  # None, NaN, pd.NA: not given
        return None
    a = np.asarray(json.loads(v) if isinstance(v, str) else v, dtype=np.float64)
    return a if a.shape == (n,) and np.isfinite(a).all() else None


def _verdict(g: pd.DataFrame, rules: SeriesRules) -> str | None:
    """Why a series is not scored (its row's ``reason``), None to score it."""
    mods = {m for m in g["modality"] if isinstance(m, str)}
    mod = mods.pop() if len(mods) == 1 else None
    types = [set(str(t or "").split("\\")) for t in g["image_type"]]
    if rules.skip_localizers and any("LOCALIZER" in t for t in types):
        return "skipped: localizer"
    if mod is None:
        return "skipped: modality missing or mixed"
    if mod not in rules.modalities:
        return f"skipped: modality {mod}"
    if not rules.include_derived:
        if any(c in _SECONDARY_CAPTURE for c in g["sop_class"]):
            return "skipped: secondary capture"
        if any("DERIVED" in t for t in types):
            return "skipped: derived images"
    if len(g) < rules.min_slices:
        return f"skipped: {len(g)} slices (fewer than {rules.min_slices})"
    if g[["rows", "cols"]].drop_duplicates().shape[0] > 1:
        return "skipped: slices of different sizes"
    iops = np.stack([_vec(v, 6) for v in g["iop"]])
    if np.abs(iops - iops[0]).max() > rules.orientation_tolerance:
        return "skipped: inconsistent orientation"
    return None


def assemble(headers: pd.DataFrame, rules: SeriesRules) -> Assembly:
    """Group header rows into series units (see :class:`Assembly`). ``headers``: ``id`` and the header
    fields, with the study/series UIDs as keyed hashes (``study``, ``series``; :func:`uid_hash`) and the raw
    ``study_uid``/``series_uid``/``series_description`` only where the user asked for them."""
    h = headers.copy()
    h["series_key"] = [
        f"{a}|{b}" if isinstance(b, str) and b else None for a, b in zip(h["study"], h["series"], strict=True)
    ]
    single = (
        h["dicom"].astype(bool)
        & h["header_error"].isna()
        & h["series_key"].notna()
        & (h["frames"].fillna(1).astype(int) <= 1)
    )
    counts = h.loc[single, "series_key"].value_counts()
    grouped = single & h["series_key"].map(counts).fillna(0).gt(1)
    lone = [h.loc[~grouped, ["id", "study"]]]
    refused: list[tuple[str, str]] = []
    series_rows, member_rows = [], []
    for key, g in h[grouped].groupby("series_key", sort=True):
        study, series = key.split("|", 1)
        image = g["rows"].fillna(0).astype(int).gt(0) & g["cols"].fillna(0).astype(int).gt(0)
        placed_mask = image & pd.Series(
            [
                _vec(i, 6) is not None and _vec(p, 3) is not None
                for i, p in zip(g["iop"], g["ipp"], strict=True)
            ],
            index=g.index,
        )
        if not placed_mask.any():  # no slice geometry at all: not a volume; each file as it is
            lone.append(g[["id", "study"]])
            continue
        placed = g[placed_mask]
        for fid, is_image in zip(g.loc[~placed_mask, "id"], image[~placed_mask], strict=True):
            why = "no ImagePositionPatient/ImageOrientationPatient" if is_image else "no image pixel module"
            refused.append((str(fid), f"not in its series: {why}"))
        files = list(map(str, placed["id"]))
        path = series_path(sorted(files), series)
        raw = {
            k: next((v for v in g[k] if isinstance(v, str)), None)
            for k in ("study_uid", "series_uid", "series_description")
        }
        row = {
            "id": path, "study": study, "series": series, **raw,
            "modality": next((m for m in g["modality"] if isinstance(m, str)), None),
            "n_missing": 0, "view": None, "spacing_mm": np.nan, "n_slices": 0,
        }  # fmt: skip
        reason = _verdict(placed, rules)
        if reason is None:
            iop = _vec(placed["iop"].iloc[0], 6)
            try:
                order, grid, step = series_grid(np.stack([_vec(p, 3) for p in placed["ipp"]]), iop)
                files = [files[i] for i in order]
                n_grid = int(grid[-1]) + 1
                row.update(n_slices=n_grid, n_missing=n_grid - len(files), spacing_mm=step or np.nan)
                row["view"] = view_from_orientation(iop)
                if (n_grid - len(files)) / n_grid > rules.max_missing_fraction:
                    reason = f"skipped: {n_grid - len(files)} of {n_grid} slices missing"
            except ValueError as e:
                reason = f"skipped: {e}"
        row.update(files=json.dumps(files), n_files=len(files), reason=reason)
        series_rows.append(row)
        member_rows += [(f, path) for f in files]
    series = pd.DataFrame(series_rows, columns=list(SERIES_COLUMNS))
    members = pd.DataFrame(member_rows, columns=["file", "series_path"])
    return Assembly(series, pd.concat(lone, ignore_index=True), refused, members)
