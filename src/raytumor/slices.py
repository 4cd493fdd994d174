"""Export 2-D training slices from volumes (NIfTI, multi-frame DICOM): ``raytumor slices``.

Why: the classifiers are 2-D, and their false positives on another hospital's healthy scans are mostly
anatomy their training negatives never showed (skull base, posterior fossa: see
``bench/results/source_shift_ablation.md``). A few healthy volumes from the site, exported here as axial
slices at every brain level and added to training as one more ``--data`` source, cover it. The slices are
exactly those ``raytumor score`` scores for a volume (same decoding, RAS-canonical orientation, intensity
window and brain slice range), taken every ``every_mm`` so neighbouring near-copies do not dominate.

Output: ``OUT/<label>/<name>_z<index>.png`` and ``OUT/manifest.csv`` with ``path`` (relative to the
manifest), ``label``, ``patient_id`` (from the file name: one patient never straddles training splits) and
``source`` (``NAME via <volume> z=<index>``, which training reads as source ``NAME``), plus ``volume``,
``slice_index`` and ``mm_below_vertex``. Files that cannot be decoded are listed in ``OUT/errors.csv``;
every input file is either exported or listed there. A 2-D file (one frame of a single-frame DICOM series,
a PNG) is exported as it is, and without ``--patient-pattern`` its patient is its folder: a series stored
one file per slice must not become one "patient" per slice.
"""

from __future__ import annotations

import argparse
import io
import math
import posixpath
import re
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from raytumor import volumes
from raytumor.config import from_args, opt, stage_parser
from raytumor.formats import decode_scan
from raytumor.scan import DecodeError
from raytumor.storage import StorageOptions, get_filesystem, list_units, read_bytes

MANIFEST_FILE = "manifest.csv"
ERRORS_FILE = "errors.csv"
# Suffixes stripped from a file name to give its default patient id (one volume = one patient).
_SCAN_SUFFIX = re.compile(r"(\.nii\.gz|\.nii|\.dcm|\.dicom|\.png|\.jpe?g|\.tiff?|\.bmp)$", re.IGNORECASE)


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
    s3_endpoint: str | None = opt(None)

    def __post_init__(self) -> None:
        self.input = [self.input] if isinstance(self.input, str) else list(self.input)
        _safe_label(self.label)
        if self.every_mm < 0:
            raise ValueError(f"--every-mm must be >= 0, got {self.every_mm}")


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
    if not spacing_mm or spacing_mm <= 0 or every_mm <= 0 or not len(keep):
        return keep
    step = max(1, math.ceil(every_mm / float(spacing_mm) - 1e-9))
    order = keep[np.argsort(-np.asarray(slice_index)[keep], kind="stable")]  # superior first
    return np.sort(order[::step])


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _safe_label(label: str) -> str:
    if not label or label in (".", "..") or "/" in label or "\\" in label:
        raise ValueError(f"--label must be a plain folder name, got {label!r}")
    return label


def _export_file(
    uri: str, cfg: SlicesConfig, name: str, pattern: re.Pattern | None, storage: StorageOptions,
    out: tuple[Any, str],
) -> list[dict[str, Any]]:  # fmt: skip
    """Manifest rows of one file's exported slices; DecodeError/ValueError when it cannot be exported."""
    out_fs, out_root = out
    base = posixpath.basename(uri)
    patient_id_of(base, pattern)  # a name the pattern misses fails before any decoding
    scan = decode_scan(read_bytes(uri, storage), min_foreground=cfg.min_foreground)
    folder = posixpath.basename(posixpath.dirname(uri)) if scan.kind == "image" else None
    pid = patient_id_of(base, pattern, folder)
    index = np.asarray(scan.slice_index)
    picks = (
        pick_slices(index, scan.spacing_mm, cfg.every_mm, cfg.skip_top_mm, cfg.depth_mm)
        if scan.kind == "volume"
        else np.arange(len(index))
    )
    top = index.max() if len(index) else 0
    stem = _SCAN_SUFFIX.sub("", base)
    rows = []
    for k in picks:
        z = int(index[k])
        rel = f"{cfg.label}/{stem}_z{z:03d}.png"
        with out_fs.open_output_stream(posixpath.join(out_root, rel)) as f:
            f.write(_png(np.ascontiguousarray(scan.slices[k])))
        below = (top - z) * scan.spacing_mm if scan.kind == "volume" and scan.spacing_mm else None
        rows.append(
            {
                "path": rel,
                "label": cfg.label,
                "patient_id": pid,
                "source": f"{name} via {uri} z={z}",
                "volume": uri,
                "slice_index": z,
                "mm_below_vertex": below,
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
    cols = ["path", "label", "patient_id", "source", "volume", "slice_index", "mm_below_vertex"]
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
        "patients": int(manifest["patient_id"].nunique()),
        "manifest": posixpath.join(cfg.out.rstrip("/"), MANIFEST_FILE),
        "seconds": round(time.time() - t0, 1),
    }


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    return stage_parser(
        SlicesConfig,
        "export axial training slices (PNG + manifest) from volumes, e.g. a site's healthy scans",
        add_help,
    )


def main(args: argparse.Namespace) -> dict[str, Any]:
    cfg = from_args(SlicesConfig, args)
    s = export_slices(cfg)
    print(
        f"{s['files']} files: {s['exported_files']} exported as {s['slices']} slices of {s['patients']} "
        f"patients, {s['error_files']} not exported (listed in {ERRORS_FILE}); {s['seconds']} s"
    )
    print(
        f"manifest: {s['manifest']}  (train with: raytumor train --data <your data> --data {s['manifest']})"
    )
    return s
