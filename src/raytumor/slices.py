"""Export 2-D training slices from volumes (NIfTI, multi-frame DICOM): ``raytumor slices``.

Why: the classifiers are 2-D, and their false positives on another hospital's healthy scans are mostly
anatomy their training negatives never showed (skull base, posterior fossa: see
``bench/results/source_shift_ablation.md``). A few healthy volumes from the site, exported here as axial
slices at every brain level and added to training as one more ``--data`` source, cover it. The axial slices
are exactly those ``raytumor score`` scores for a volume (same decoding, RAS-canonical orientation,
intensity window and brain slice range), taken every ``every_mm`` so neighbouring near-copies do not
dominate.

``--planes axial,coronal,sagittal`` also cuts each NIfTI volume along its other canonical axes: slices whose
view is known from geometry, which is what a view net learns from. Coronal and sagittal slices are every
``every_mm`` over all slices with at least ``min_foreground`` head (no vertex rule: that is an axial
notion), counted both ways from the middle one. Orientation (:func:`raytumor.medical.plane_slices`): axial
anterior up with the patient's right on the image right (as scoring decodes it), coronal superior up with
the patient's right on the image left, sagittal superior up with anterior on the left. Multi-frame DICOM
and 2-D files cannot be resliced (no volume geometry is decoded for them): they are exported as stored
whatever ``--planes`` says, with the view their header gives.

Output: ``OUT/<label>/<name>_<plane><index>.png`` (plane ``z`` axial, ``cor`` coronal, ``sag`` sagittal;
files exported as stored keep ``z``) and ``OUT/manifest.csv`` with ``path`` (relative to the manifest),
``label``, ``patient_id`` (from the file name: one patient never straddles training splits) and ``source``
(``NAME via <volume> z=<index>``, ``y=`` coronal, ``x=`` sagittal, which training reads as source
``NAME``), plus ``volume``, ``view`` (axial/coronal/sagittal/oblique, empty when unknown), ``slice_index``
(the canonical voxel index along the cut axis: x left -> right, y posterior -> anterior, z inferior ->
superior; the frame for DICOM) and ``mm_below_vertex`` (axial slices of volumes only). Files that cannot
be decoded are listed in ``OUT/errors.csv``; every input file is either exported or listed there. A 2-D
file (one frame of a single-frame DICOM series, a PNG) is exported as it is, and without
``--patient-pattern`` its patient is its folder: a series stored one file per slice must not become one
"patient" per slice.
"""

from __future__ import annotations

import argparse
import io
import math
import posixpath
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from raytumor import medical, volumes
from raytumor.config import comma_list, from_args, opt, stage_parser
from raytumor.formats import decode_scan
from raytumor.scan import VIEW_OF_AXIS, VIEWS, DecodedScan, DecodeError, sniff_format
from raytumor.storage import StorageOptions, get_filesystem, list_units, read_bytes

MANIFEST_FILE = "manifest.csv"
ERRORS_FILE = "errors.csv"
# Suffixes stripped from a file name to give its default patient id (one volume = one patient).
_SCAN_SUFFIX = re.compile(r"(\.nii\.gz|\.nii|\.dcm|\.dicom|\.png|\.jpe?g|\.tiff?|\.bmp)$", re.IGNORECASE)
# Plane tag of the slice file names (axial keeps the historical ``_z``) and the canonical axis in ``source``.
_NAME_TAG = {"axial": "z", "coronal": "cor", "sagittal": "sag"}
_AXIS_LETTER = "xyz"


@dataclass
class SlicesConfig:
    input: list[str] = opt(
        help="folder/prefix (recursive), file, or manifest with a path column; local or s3://. Repeatable",
        required=True,
    )
    out: str = opt(help="output folder (local or s3://): OUT/<label>/*.png, manifest.csv", required=True)
    label: str = opt(help="class of every exported slice, e.g. no_tumor", required=True)
    source: str | None = opt(None, "source name in the manifest (default: the input's folder name)")
    patient_pattern: str | None = opt(
        None,
        "patient id from the file name: first group (else the match), e.g. '^(IXI\\d+)'; "
        "default: the file name without its suffix (one patient per file)",
        metavar="REGEX",
    )
    every_mm: float = opt(5.0, "distance between exported slices (0: all)")
    skip_top_mm: float = opt(volumes.DEFAULT_SKIP_TOP_MM, "as --volume-skip-top-mm in raytumor score")
    depth_mm: float = opt(volumes.DEFAULT_DEPTH_MM, "as --volume-depth-mm in raytumor score")
    min_foreground: float = opt(0.05, "skip slices with less head than this share")
    planes: list[str] = opt(
        factory=lambda: ["axial"],
        help="planes to cut NIfTI volumes along, comma-separated: axial, coronal, sagittal (DICOM volumes "
        "and 2-D files are exported as stored)",
        parse=comma_list,
        metavar="PLANES",
    )
    s3_endpoint: str | None = opt(None)

    def __post_init__(self) -> None:
        self.input = [self.input] if isinstance(self.input, str) else list(self.input)
        _safe_label(self.label)
        if self.every_mm < 0:
            raise ValueError(f"--every-mm must be >= 0, got {self.every_mm}")
        planes = comma_list(self.planes) if isinstance(self.planes, str) else list(self.planes)
        unknown = [p for p in planes if p not in VIEWS]
        if unknown or not planes:
            raise ValueError(
                f"--planes must name some of {','.join(VIEWS)}, got {','.join(planes) or 'none'}"
            )
        self.planes = list(dict.fromkeys(planes))  # a plane named twice would export clashing names


def patient_id_of(name: str, pattern: re.Pattern[str] | None, folder: str | None = None) -> str:
    """Patient id from a file name: ``pattern``'s first group (else its whole match), else ``folder`` when
    given (2-D files: a series' slices share it), else the name without its scan suffix. Raises ValueError
    when the pattern does not match (a silent fallback could put one patient's scans on both sides of a
    split)."""
    if pattern is None:
        return folder if folder else _SCAN_SUFFIX.sub("", name)
    m = pattern.search(name)
    if m is None:
        raise ValueError(f"--patient-pattern {pattern.pattern!r} does not match the file name {name!r}")
    return m.group(1) if m.groups() and m.group(1) is not None else m.group(0)


def pick_slices(
    slice_index: np.ndarray,
    spacing_mm: float | None,
    every_mm: float,
    skip_top_mm: float = volumes.DEFAULT_SKIP_TOP_MM,
    depth_mm: float = volumes.DEFAULT_DEPTH_MM,
) -> np.ndarray:
    """Positions (into ``slice_index``) of the slices to export: the scoring range
    (:func:`volumes.brain_slice_range`), then one slice every ``ceil(every_mm / spacing)`` going down from
    the top of that range. Without a spacing every slice in range is kept."""
    keep = np.flatnonzero(volumes.brain_slice_range(slice_index, spacing_mm, skip_top_mm, depth_mm))
    order = keep[np.argsort(-np.asarray(slice_index)[keep], kind="stable")]  # superior first
    return np.sort(_every(order, spacing_mm, every_mm))


def pick_from_middle(slice_index: np.ndarray, spacing_mm: float | None, every_mm: float) -> np.ndarray:
    """Positions (into ``slice_index``) of the coronal/sagittal slices to export: all of them (no vertex
    rule), thinned to one every ``ceil(every_mm / spacing)`` counted both ways from the middle slice, so
    the central slice (mid-sagittal for a centred head) is always exported."""
    order = np.argsort(np.asarray(slice_index), kind="stable")
    mid = len(order) // 2
    return np.union1d(
        _every(order[mid:], spacing_mm, every_mm), _every(order[: mid + 1][::-1], spacing_mm, every_mm)
    )


def _every(order: np.ndarray, spacing_mm: float | None, every_mm: float) -> np.ndarray:
    """Every ``ceil(every_mm / spacing)``-th of ``order`` from its first; all of it without a spacing or
    with ``every_mm`` 0."""
    if not spacing_mm or spacing_mm <= 0 or every_mm <= 0:
        return order
    return order[:: max(1, math.ceil(every_mm / float(spacing_mm) - 1e-9))]


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _safe_label(label: str) -> str:
    if not label or label in (".", "..") or "/" in label or "\\" in label:
        raise ValueError(f"--label must be a plain folder name, got {label!r}")
    return label


@dataclass
class _Cut:
    """One slice to export: its pixels and what the manifest says about it."""

    pixels: np.ndarray
    view: str | None
    index: int
    tag: str  # file name suffix, e.g. "z042", "sag045"
    coord: str  # position in ``source``, e.g. "z=42"
    below: float | None  # mm below the vertex (axial slices of volumes)


def _volume_cuts(vol: medical.NiftiVolume, view: str, cfg: SlicesConfig) -> list[_Cut]:
    """The slices of a RAS-canonical volume to export along ``view``'s axis."""
    axis = VIEW_OF_AXIS.index(view)
    stack = medical.plane_slices(vol.voxels, view)
    index = medical.head_slices(stack, cfg.min_foreground)
    spacing = vol.spacing_mm[axis]
    if view == "axial":  # exactly the slices scoring sees (decode_nifti: same stack, same head rule)
        picks = pick_slices(index, spacing, cfg.every_mm, cfg.skip_top_mm, cfg.depth_mm)
    else:
        picks = pick_from_middle(index, spacing, cfg.every_mm)
    top = int(index.max())
    cuts = []
    for k in index[picks].tolist():
        below = (top - k) * spacing if view == "axial" and spacing else None
        tag, letter = _NAME_TAG[view], _AXIS_LETTER[axis]
        cuts.append(_Cut(stack[k], view, k, f"{tag}{k:03d}", f"{letter}={k}", below))
    return cuts


def _scan_cuts(scan: DecodedScan, cfg: SlicesConfig) -> list[_Cut]:
    """The slices of a file exported as stored (2-D files, DICOM volumes, single-plane NIfTI)."""
    index = np.asarray(scan.slice_index)
    picks = (
        pick_slices(index, scan.spacing_mm, cfg.every_mm, cfg.skip_top_mm, cfg.depth_mm)
        if scan.kind == "volume"
        else np.arange(len(index))
    )
    top = index.max() if len(index) else 0
    cuts = []
    for k in picks:
        z = int(index[k])
        below = (top - z) * scan.spacing_mm if scan.kind == "volume" and scan.spacing_mm else None
        cuts.append(_Cut(np.ascontiguousarray(scan.slices[k]), scan.view, z, f"z{z:03d}", f"z={z}", below))
    return cuts


def _export_file(
    uri: str, cfg: SlicesConfig, name: str, pattern: re.Pattern | None, storage: StorageOptions,
    out: tuple[Any, str],
) -> list[dict[str, Any]]:  # fmt: skip
    """Manifest rows of one file's exported slices; DecodeError/ValueError when it cannot be exported."""
    out_fs, out_root = out
    base = posixpath.basename(uri)
    patient_id_of(base, pattern)  # a name the pattern misses fails before any decoding
    data = read_bytes(uri, storage)
    vol = medical.decode_nifti_volume(data) if sniff_format(data) == "nifti" else None
    if vol is not None and min(vol.voxels.shape) > 1:  # a real 3-D volume: cut along each plane
        pid = patient_id_of(base, pattern)
        # one plane's stack in memory at a time
        cuts: Iterable[_Cut] = (c for view in cfg.planes for c in _volume_cuts(vol, view, cfg))
    else:
        scan = decode_scan(data, min_foreground=cfg.min_foreground)
        folder = posixpath.basename(posixpath.dirname(uri)) if scan.kind == "image" else None
        pid = patient_id_of(base, pattern, folder)
        cuts = _scan_cuts(scan, cfg)
    stem = _SCAN_SUFFIX.sub("", base)
    rows = []
    for cut in cuts:
        rel = f"{cfg.label}/{stem}_{cut.tag}.png"
        with out_fs.open_output_stream(posixpath.join(out_root, rel)) as f:
            f.write(_png(cut.pixels))
        rows.append(
            {
                "path": rel,
                "label": cfg.label,
                "patient_id": pid,
                "source": f"{name} via {uri} {cut.coord}",
                "volume": uri,
                "view": cut.view or "",
                "slice_index": cut.index,
                "mm_below_vertex": cut.below,
            }
        )
    return rows


def export_slices(cfg: SlicesConfig) -> dict[str, Any]:
    """Export the slices of every file under ``cfg.input``; returns a summary (also the printed one)."""
    t0 = time.time()
    pattern = re.compile(cfg.patient_pattern) if cfg.patient_pattern else None
    storage = StorageOptions.from_env(cfg.s3_endpoint)
    out_fs, out_root = get_filesystem(cfg.out, storage)
    out_fs.create_dir(posixpath.join(out_root, cfg.label), recursive=True)
    rows: list[dict[str, Any]] = []
    errors: list[tuple[str, str]] = []
    n_files = 0
    for source_arg in cfg.input:
        units = list_units(source_arg, storage)
        name = cfg.source or posixpath.basename(source_arg.rstrip("/")) or source_arg
        errors += units.error_rows
        n_files += len(units.table) + len(units.error_rows)
        for uri, kind in zip(units.table["id"], units.table["kind"], strict=True):
            if kind != "file":  # zip/tar members: score reads them, export does not (unpack first)
                errors.append((uri, f"inside a {kind} archive: unpack it first"))
                continue
            try:
                rows += _export_file(uri, cfg, name, pattern, storage, (out_fs, out_root))
            except DecodeError as e:
                errors.append((uri, e.reason))
            except ValueError as e:
                errors.append((uri, str(e)))
    cols = ["path", "label", "patient_id", "source", "volume", "view", "slice_index", "mm_below_vertex"]
    manifest = pd.DataFrame(rows, columns=cols)
    if manifest["path"].duplicated().any():
        dup = manifest.loc[manifest["path"].duplicated(), "path"].iloc[0]
        raise ValueError(f"two input files export to the same slice name ({dup}): give them distinct names")
    with out_fs.open_output_stream(posixpath.join(out_root, MANIFEST_FILE)) as f:
        f.write(manifest.to_csv(index=False).encode())
    with out_fs.open_output_stream(posixpath.join(out_root, ERRORS_FILE)) as f:
        f.write(pd.DataFrame(errors, columns=["path", "error"]).to_csv(index=False).encode())
    return {
        "files": n_files,
        "exported_files": int(manifest["volume"].nunique()),
        "error_files": len(errors),
        "slices": len(manifest),
        "views": {str(v): int(n) for v, n in manifest["view"].value_counts(sort=False).items()},
        "patients": int(manifest["patient_id"].nunique()),
        "manifest": posixpath.join(cfg.out.rstrip("/"), MANIFEST_FILE),
        "seconds": round(time.time() - t0, 1),
    }


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    return stage_parser(
        SlicesConfig,
        "export training slices (PNG + manifest) from volumes along the chosen planes, e.g. a site's "
        "healthy scans",
        add_help,
    )


def main(args: argparse.Namespace) -> dict[str, Any]:
    cfg = from_args(SlicesConfig, args)
    s = export_slices(cfg)
    views = ", ".join(f"{n} {v or 'unknown view'}" for v, n in s["views"].items())
    print(
        f"{s['files']} files: {s['exported_files']} exported as {s['slices']} slices ({views or 'none'}) "
        f"of {s['patients']} patients, {s['error_files']} not exported (listed in {ERRORS_FILE}); "
        f"{s['seconds']} s"
    )
    print(
        f"manifest: {s['manifest']}  (train with: raytumor train --data <your data> --data {s['manifest']})"
    )
    return s
