"""Evaluate: metrics with bootstrap confidence intervals, and ``raytumor evaluate`` over labelled sources.

Point estimates come from torchmetrics; the bootstrap re-computes the same metrics with vectorised numpy
(1,000 resamples of a few thousand scans take well under a second), and a test checks both agree.

Every evaluated row carries a source key and every metric is also broken down by it
(:func:`per_source_metrics`): a model can score well pooled and fail on the one hospital it never saw.
The key is a manifest's ``source`` value, or else the ``--data`` argument the row came from. A manifest
value ``NAME via PROVENANCE`` counts as ``NAME`` (``ingest.source_key``): the IXI manifest's
``IXI T1 (2mm, uint8 downsampled) via github:...:IXI012-HH-1211_T1.nii.gz axial slice z=56`` is one source,
``IXI T1 (2mm, uint8 downsampled)``, not 462. ``--source-pattern REGEX`` replaces that rule: its first
group (else the whole match) in the raw value is the key.

Scope: a bundle refuses inputs it was not trained for (another modality or view, out of distribution), and
a prediction row says so (``in_scope``, ``scope_reason``, ``view``). Metrics are given for all rows (the
probabilities of a refused row are kept, so this is what the model would have said) and for the in-scope
rows only; refused rows are counted with their reasons, never as negatives. Predictions without these columns
(older outputs) are all in scope, view unknown. Everything is also broken down by view and, when the labelled
manifest has a ``sequence`` column, by sequence.

Localisation: when the manifest has a ``mask`` column (an expert tumour mask per tumour image, a path
relative to the manifest like ``path``), the Grad-CAM peak of each tumour image is checked against its mask
in the original image's coordinates (:func:`localise`, :func:`raytumor.explain.pointing_game`).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from raytumor import split
from raytumor.bundle import FINGERPRINTS_FILE, fetch_bundle, read_meta, validate_bundle
from raytumor.config import add_options, from_args, opt, stage_parser
from raytumor.explain import localisation_summary
from raytumor.ingest import build_catalogue, decode_dataset, is_negative_name, list_labelled, source_key
from raytumor.localise import localise
from raytumor.metrics import BINARY_METRICS, metrics_with_ci, per_source_metrics, tumour_binary
from raytumor.predict import Predictor
from raytumor.results import VOLUME_KINDS, read_scores
from raytumor.runtime import init_ray, pool_size, predictor_resources
from raytumor.scope import OUT_OF_SCOPE, UNKNOWN
from raytumor.storage import StorageOptions, is_manifest, read_manifest

# ----------------------------------------------------------------------------------------------------------
# Labels and sources of evaluation data


def map_labels(names: Iterable[str], classes: Sequence[str], negative_class: str | None) -> dict[str, str]:
    """Map the data's label names onto a bundle's classes: {data name: bundle class}.

    A name equal to a bundle class maps to it; a no-tumour name (``ingest.is_negative_name``: ``no_tumor``,
    ``normal``, ...) maps to the bundle's negative class, since every source spells "no tumour" its own
    way. Anything else is an error: guessing which tumour class ``tumour`` means would invent labels.
    """
    out: dict[str, str] = {}
    unmapped: list[str] = []
    for name in sorted({str(n) for n in names}):
        if name in classes:
            out[name] = name
        elif negative_class is not None and is_negative_name(name):
            out[name] = negative_class
        else:
            unmapped.append(name)
    if unmapped:
        hint = (
            f"; no-tumour names (no, no_tumor, normal, ...) map to {negative_class!r}"
            if negative_class is not None
            else "; the bundle has no no-tumour class"
        )
        raise ValueError(f"labels {unmapped} are not among the bundle's classes {list(classes)}{hint}")
    return out


def compile_source_pattern(pattern: str | re.Pattern | None) -> re.Pattern | None:
    if pattern is None or isinstance(pattern, re.Pattern):
        return pattern
    try:
        return re.compile(pattern)
    except re.error as e:
        raise ValueError(f"--source-pattern {pattern!r} is not a valid regular expression: {e}") from e


def source_key_of(value: Any, default: str, pattern: str | re.Pattern | None = None) -> str:
    """The source key of a row whose raw source is ``value`` (a manifest cell; None for folder rows).

    Without ``pattern``: ``ingest.source_key`` (``NAME via PROVENANCE`` -> ``NAME``, else ``default``, the
    data argument). With ``pattern``: its first group, else the whole match, searched in the raw value (the
    data argument when there is none); no match, or an empty one, falls back to the rule above.
    """
    rx = compile_source_pattern(pattern)
    if rx is None:
        return source_key(value, default)
    missing = value is None or (not isinstance(value, str) and bool(pd.isna(value)))
    m = rx.search(default if missing else str(value))
    if m is not None:
        key = m.group(1) if rx.groups and m.group(1) is not None else m.group(0)
        if key.strip():
            return key.strip()
    return source_key(value, default)


def raw_source_values(data: Sequence[str], storage: Any = None) -> dict[str, tuple[Any, str]]:
    """{path: (manifest ``source`` cell, manifest)} for the rows of the manifests among ``data``.

    Listing keeps only the derived key; ``--source-pattern`` needs the full provenance string (the IXI
    subject, scanner or commit in it). Folder rows are absent: their raw source is the data argument.
    """
    out: dict[str, tuple[Any, str]] = {}
    for d in data:
        if not is_manifest(d):
            continue
        df = read_manifest(d, storage)
        if "source" in df.columns:
            out.update(zip(df["path"], zip(df["source"].tolist(), [d] * len(df), strict=True), strict=True))
    return out


def pattern_source_keys(
    files: pd.DataFrame, data: Sequence[str], pattern: str | re.Pattern, storage: Any = None
) -> pd.Series:
    """Source keys of listed rows (``path``, ``source``) under ``pattern`` (see :func:`source_key_of`)."""
    rx = compile_source_pattern(pattern)
    raw = raw_source_values(data, storage)
    keys = [
        source_key_of(*raw.get(p, (None, str(k))), rx)
        for p, k in zip(files["path"].astype(str), files["source"], strict=True)
    ]
    return pd.Series(keys, index=files.index, dtype=object)


# ----------------------------------------------------------------------------------------------------------
# Manifest columns beyond path/label/source/patient_id (listing keeps only those)

EXTRA_COLUMNS = ("sequence", "mask")


def _resolve_like_path(manifest: str, value: Any) -> str | None:
    """A path cell resolved as ``storage.read_manifest`` resolves ``path``: absolute paths and URIs as they
    are, relative ones against the manifest's folder. Blank cells (a no-tumour slice has no mask) are None."""
    if value is None or (not isinstance(value, str) and bool(pd.isna(value))) or not str(value).strip():
        return None
    p = str(value).strip()
    if p.startswith("/") or "://" in p:
        return p
    base = manifest.rsplit("/", 1)[0] if "/" in manifest else "."
    return f"{base}/{p}" if "://" in base else os.path.abspath(os.path.join(base, p))


def manifest_columns(
    data: Sequence[str], columns: Sequence[str] = EXTRA_COLUMNS, storage: Any = None
) -> pd.DataFrame:
    """``path`` plus those of ``columns`` that the manifests among ``data`` have (one row per path; blank
    cells None). ``mask`` cells are paths, resolved like ``path`` (relative to their manifest)."""
    frames = []
    for d in data:
        if not is_manifest(d):
            continue
        df = read_manifest(d, storage)
        have = [c for c in columns if c in df.columns]
        if not have:
            continue
        out = df[["path", *have]].astype(object)
        for c in have:
            if c == "mask":
                out[c] = [_resolve_like_path(d, v) for v in out[c]]
            else:
                text = out[c].where(out[c].notna(), None)
                out[c] = [None if v is None or not str(v).strip() else str(v).strip() for v in text]
        frames.append(out)
    if not frames:
        return pd.DataFrame({"path": pd.Series(dtype=object)})
    out = pd.concat(frames, ignore_index=True).drop_duplicates("path")
    return out.astype(object).where(out.notna(), None)


def _with_manifest_columns(table: pd.DataFrame, data: Sequence[str], storage: Any) -> pd.DataFrame:
    extra = manifest_columns(data, storage=storage)
    if len(extra.columns) == 1:
        return table
    return table.drop(columns=[c for c in extra.columns if c != "path" and c in table.columns]).merge(
        extra, on="path", how="left", validate="many_to_one"
    )


# ----------------------------------------------------------------------------------------------------------
# Scope: in-scope vs all rows, out-of-scope rows counted with their reasons, by view and by sequence


def _prob_ok(preds: pd.DataFrame, classes: Sequence[str]) -> np.ndarray:
    """Rows with a prediction (finite probabilities), the rows :func:`metrics_with_ci` evaluates."""
    return np.isfinite(preds[[f"prob_{c}" for c in classes]].to_numpy(dtype=np.float64)).all(1)


def _text_keys(values: pd.Series, default: str = UNKNOWN) -> pd.Series:
    """Strings with null/blank cells as ``default``."""
    v = values.astype(object)
    blank = v.isna() | (v.astype(str).str.strip() == "")
    return v.where(~blank, default).astype(str)


def out_of_scope_rows(preds: pd.DataFrame, classes: Sequence[str]) -> np.ndarray:
    """Rows the bundle refused: predicted (an error row was not scored: it is an error, not out of scope)
    and ``in_scope`` False. No ``in_scope`` column (older outputs), or a null cell: in scope."""
    if "in_scope" not in preds.columns:
        return np.zeros(len(preds), dtype=bool)
    v = preds["in_scope"].astype(object)
    refused = v.notna().to_numpy() & ~v.where(v.notna(), True).astype(bool).to_numpy()
    return refused & _prob_ok(preds, classes)


def view_keys(preds: pd.DataFrame) -> pd.Series:
    """The ``view`` of each row, ``unknown`` where nobody could tell it (or the predictions predate views)."""
    if "view" not in preds.columns:
        return pd.Series(UNKNOWN, index=preds.index, dtype=object)
    return _text_keys(preds["view"])


def metrics_by(
    preds: pd.DataFrame,
    keys: pd.Series,
    classes: list[str],
    negative_class: str | None,
    threshold: float,
    n_boot: int = 1000,
    seed: int = 0,
    out_of_scope: np.ndarray | None = None,
) -> dict[str, dict[str, Any]]:
    """{key: :func:`metrics_with_ci` of the rows with that key} (view, sequence), each with its number of
    ``out_of_scope`` rows when ``out_of_scope`` is given."""
    keys = pd.Series(np.asarray(keys, dtype=object), index=preds.index).astype(str)
    out = {}
    for key in sorted(keys.unique()):
        sel = (keys == key).to_numpy()
        m = metrics_with_ci(preds[sel], classes, negative_class, threshold, n_boot, seed)
        if out_of_scope is not None:
            m["out_of_scope"] = int(out_of_scope[sel].sum())
        out[key] = m
    return out


def _count(values: pd.Series) -> dict[str, int]:
    """Counts per value, most frequent first (ties by name)."""
    vc = values.astype(str).value_counts()
    return {str(k): int(vc[k]) for k in sorted(vc.index, key=lambda k: (-vc[k], str(k)))}


def scope_results(
    preds: pd.DataFrame,
    classes: list[str],
    negative_class: str | None,
    threshold: float,
    metrics: dict[str, Any],
    by_source: dict[str, dict[str, Any]],
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """evaluate's result keys on scope: ``by_view`` and ``by_sequence`` (all rows; None without a sequence
    column), and ``scope``: how many rows were in and out of scope and why, what the model would have called
    the refused rows (``out_of_scope_metrics``), and the metrics and breakdowns of the in-scope rows only.

    ``metrics``/``by_source`` are the all-row ones already computed (``by_source`` entries gain their
    ``out_of_scope`` count). Without refused rows the in-scope numbers are those same dicts."""
    oos = out_of_scope_rows(preds, classes)
    ok = _prob_ok(preds, classes)
    views = view_keys(preds)
    seqs = (
        _text_keys(preds["sequence"])
        if "sequence" in preds.columns and preds["sequence"].notna().any()
        else None
    )
    args = (classes, negative_class, threshold, n_boot, seed)
    by_view = metrics_by(preds, views, *args, out_of_scope=oos)
    by_sequence = metrics_by(preds, seqs, *args, out_of_scope=oos) if seqs is not None else None
    if "source" in preds.columns:
        src = preds["source"].astype(str).to_numpy()
        for key, m in by_source.items():
            m["out_of_scope"] = int(oos[src == key].sum())
    scope: dict[str, Any] = {
        "recorded": "in_scope" in preds.columns,
        "evaluated": int(ok.sum()),
        "in_scope": int((ok & ~oos).sum()),
        "out_of_scope": int(oos.sum()),
        "out_of_scope_share": float(oos.sum() / ok.sum()) if ok.any() else None,
        "reasons": _count(_text_keys(preds.loc[oos, "scope_reason"], "unspecified"))
        if "scope_reason" in preds.columns
        else ({"unspecified": int(oos.sum())} if oos.any() else {}),
        "out_of_scope_by_class": _count(preds.loc[oos, "label"].map(lambda i: classes[int(i)])),
        "views": _count(views[ok]),
        "view_source": _count(_text_keys(preds.loc[ok, "view_source"], "none"))
        if "view_source" in preds.columns
        else {"none": int(ok.sum())},
    }
    if not oos.any():
        scope.update(metrics=metrics, by_source=by_source, by_view=by_view, by_sequence=by_sequence)
        scope["out_of_scope_metrics"] = None
    else:
        keep = ~oos
        sub = preds[keep]
        scope["metrics"] = metrics_with_ci(sub, *args)
        scope["by_source"] = per_source_metrics(sub, *args) if "source" in sub.columns and len(sub) else {}
        scope["by_view"] = metrics_by(sub, views[keep], *args)
        scope["by_sequence"] = metrics_by(sub, seqs[keep], *args) if seqs is not None else None
        # What the model would have said about the refused rows (their probabilities are kept).
        scope["out_of_scope_metrics"] = metrics_with_ci(preds[oos], *args)
    return {"by_view": by_view, "by_sequence": by_sequence, "scope": scope}


# ----------------------------------------------------------------------------------------------------------
# Grad-CAM localisation against expert masks (raytumor.localise does the per-image work)


def localisation_results(
    bundle_dir: str | os.PathLike,
    preds: pd.DataFrame,
    classes: list[str],
    negative_class: str | None,
    threshold: float,
    storage: Any = None,
    tolerance: float = 0.01,
    n_boot: int = 1000,
    seed: int = 0,
) -> tuple[dict[str, Any], pd.DataFrame] | None:
    """evaluate's ``localisation`` key and its per-image rows, over the true tumour images of ``preds`` that
    have a ``mask`` (single images with a prediction); None when no row has a mask or the classes define no
    tumour. The heat map explains the image's true class; ``called`` marks the images the model called
    tumour at ``threshold``."""
    if "mask" not in preds.columns or not preds["mask"].notna().any():
        return None
    ok = _prob_ok(preds, classes)
    probs = preds[[f"prob_{c}" for c in classes]].to_numpy(dtype=np.float64)
    y, s = tumour_binary(preds["label"].to_numpy().astype(np.int64), probs, classes, negative_class)
    if y is None:
        return None
    image = (
        preds["kind"].astype(str).eq("image").to_numpy()
        if "kind" in preds.columns
        else np.ones(len(preds), bool)
    )
    has_mask = preds["mask"].notna().to_numpy()
    tumour = (y == 1) & ok & image
    sel = tumour & has_mask
    keep = [
        c
        for c in ("path", "mask", "label", "patient_id", "source", "sequence", "group")
        if c in preds.columns
    ]
    rows = preds.loc[sel, keep].assign(
        called=s[sel] >= threshold, in_scope=~out_of_scope_rows(preds, classes)[sel]
    )
    loc = localise(bundle_dir, rows, storage, tolerance)
    summary = localisation_summary(loc, n_boot, seed, by=("sequence", "source"))
    summary = {
        "method": "pointing game: the Grad-CAM peak on the model input, mapped back through the head crop, "
        "padding and resize, inside the expert tumour mask of the original image",
        "heatmap": "Grad-CAM of the true class, the bundle's model as stored",
        "tolerance": float(tolerance),
        "tumour_images": int(tumour.sum()),
        "without_mask": int((tumour & ~has_mask).sum()),
        **summary,
    }
    return summary, loc


# ----------------------------------------------------------------------------------------------------------
# Predicting a set of files with a bundle (Ray Data: decode on CPU tasks, model on an actor pool)


def predict_files(
    bundle_dir: str | os.PathLike,
    files: pd.DataFrame,
    storage: Any = None,
    batch_size: int = 64,
    features: bool = False,
) -> pd.DataFrame:
    """Score every row of ``files`` (needs ``path``): one output row per input row, errors kept
    (``features``: also each image's pooled backbone features, for fitting a bundle's heads)."""
    from ray.data import ActorPoolStrategy

    meta = read_meta(bundle_dir)
    r = predictor_resources()
    ds = decode_dataset(
        files, storage=storage, image_size=meta.image_size, fingerprints=False, preprocess=meta.preprocess
    )
    ds = ds.map_batches(
        Predictor,
        fn_constructor_kwargs={
            "bundle_dir": str(bundle_dir),
            "num_threads": r["threads"],
            "features": features,
        },
        compute=ActorPoolStrategy(size=pool_size(r["size"], -(-len(files) // batch_size))),
        batch_size=batch_size,
        num_cpus=r["num_cpus"],
        num_gpus=r["num_gpus"],
        memory=r["memory"],
        batch_format="numpy",
        **r.get("remote_args", {}),
    )
    return ds.to_pandas()


# ----------------------------------------------------------------------------------------------------------
# raytumor evaluate


@dataclass(kw_only=True)
class SourceOptions:
    """Labelled data and how its rows get source keys; shared by ``raytumor evaluate`` and ``report``."""

    data: list[str] = opt(
        help="labelled tree ROOT/<class>/<files>, s3://..., or CSV/Parquet manifest (path,label[,patient_id,"
        "source]); repeat to evaluate several sources at once. Labels map onto the bundle's classes by name; "
        "no-tumour names (no_tumor, normal, ...) map to its no-tumour class",
        required=True,
    )
    source_pattern: str | None = opt(
        None,
        "source key of a row: first group (else the whole match) of REGEX in the manifest's source value "
        "(or the --data argument). Default: the source value up to ' via ', else the --data argument",
        metavar="REGEX",
    )

    def __post_init__(self) -> None:
        self.data = _data_list(self.data)
        compile_source_pattern(self.source_pattern)  # a bad pattern fails before any work starts


@dataclass(kw_only=True)
class LocalisationOptions:
    """The Grad-CAM pointing game on manifests with a ``mask`` column; shared by ``evaluate`` and ``report``."""

    localisation: bool = opt(
        True,
        "skip the Grad-CAM pointing game (is the heat map's peak inside the tumour mask?) that runs when the "
        "labelled manifest has a `mask` column (mask image paths, relative to the manifest like `path`)",
        flag="--no-localisation",
    )
    localisation_tolerance: float = opt(
        0.01, "tolerant pointing game: a peak this fraction of the image's long side from the mask is a hit"
    )


@dataclass(kw_only=True)
class EvaluateConfig(SourceOptions, LocalisationOptions):
    bundle: str = opt(
        help="model bundle: a directory or s3://|gs:// URI (from raytumor train/tune)", required=True
    )
    out: str | None = opt(
        None, "output directory for metrics.json and predictions.parquet (default: BUNDLE/evaluation)"
    )
    threshold: float | None = opt(None, "override the bundle's operating threshold")
    keep_duplicates: bool = opt(
        False, "do not exclude files that duplicate the bundle's training/validation files"
    )
    scores: str | None = opt(
        None,
        "evaluate a finished `raytumor score` output instead of predicting (volumes, --adapt/--tta runs): "
        "metrics pooled, per source and per kind (slices vs volumes)",
        metavar="SCORE_OUTPUT",
    )
    n_boot: int = opt(1000, "bootstrap resamples for the 95 percent confidence intervals")
    s3_endpoint: str | None = opt(None)
    seed: int = opt(0)


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    return stage_parser(
        EvaluateConfig,
        "Metrics of a model bundle on labelled folders, buckets or manifests, pooled and per source",
        add_help,
    )


def add_source_args(p: argparse.ArgumentParser) -> None:
    """``--data`` (repeatable) and ``--source-pattern``, shared by ``raytumor evaluate`` and ``report``."""
    add_options(p, SourceOptions)


def _data_list(data: str | Sequence[str]) -> list[str]:
    datas = [data] if isinstance(data, str) else [str(d) for d in data]
    if not datas or not all(datas):
        raise ValueError(f"no data source given: {data!r}")
    return datas


LOCALISATION_FILE = "localisation.parquet"


def _write_evaluation(
    out_dir: str | os.PathLike | None,
    result: dict[str, Any],
    preds: pd.DataFrame,
    localisation: pd.DataFrame | None = None,
) -> None:
    """metrics.json, predictions.parquet (without the fingerprint thumbnails) and, with a pointing game,
    localisation.parquet (one row per tumour image with a mask) into ``out_dir``, if given."""
    if not out_dir:
        return
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    preds.drop(columns=[c for c in ("thumb", "thumb_crop") if c in preds.columns]).to_parquet(
        out / "predictions.parquet", index=False
    )
    if localisation is not None:
        localisation.to_parquet(out / LOCALISATION_FILE, index=False)


def _scope_and_localisation(
    result: dict[str, Any],
    preds: pd.DataFrame,
    bundle_dir: Any,
    meta: Any,
    thr: float,
    storage: Any,
    localisation: bool,
    tolerance: float,
    n_boot: int,
    seed: int,
) -> pd.DataFrame | None:
    """Adds ``by_view``, ``by_sequence``, ``scope`` and ``localisation`` to ``result``; returns the pointing
    game's per-image rows (None without one)."""
    classes, neg = list(meta.classes), meta.negative_class
    result.update(
        scope_results(preds, classes, neg, thr, result["metrics"], result["by_source"], n_boot, seed)
    )
    loc = (
        localisation_results(bundle_dir, preds, classes, neg, thr, storage, tolerance, n_boot, seed)
        if localisation
        else None
    )
    result["localisation"] = loc[0] if loc is not None else None
    return loc[1] if loc is not None else None


def evaluate_source(
    bundle_dir: str | os.PathLike,
    data: str | Sequence[str],
    out_dir: str | os.PathLike | None = None,
    threshold: float | None = None,
    exclude_duplicates: bool = True,
    n_boot: int = 1000,
    seed: int = 0,
    s3_endpoint: str | None = None,
    source_pattern: str | None = None,
    localisation: bool = True,
    localisation_tolerance: float = 0.01,
) -> dict[str, Any]:
    """Metrics of ``bundle_dir`` on one or more labelled sources: pooled (``metrics``) and per source key
    (``by_source``), both with 95% bootstrap CIs; writes metrics.json and predictions.parquet (with a
    ``source`` column) to ``out_dir``. A single-class source (a folder of healthy scans) is fine. Adds the
    scope keys (:func:`scope_results`) and, for a manifest with masks, ``localisation``
    (:func:`localisation_results`)."""
    t0 = time.time()
    datas = _data_list(data)
    rx = compile_source_pattern(source_pattern)  # a bad pattern fails before any decoding
    storage = StorageOptions.from_env(s3_endpoint)
    bundle_uri, bundle_dir = str(bundle_dir), fetch_bundle(bundle_dir, storage)  # one local copy per node
    meta = read_meta(bundle_dir)
    classes = list(meta.classes)
    cat = build_catalogue(
        datas,
        storage,
        classes,
        label_map=lambda names: map_labels(names, classes, meta.negative_class),
        min_classes=1,
    )
    table = cat.table.copy()
    if "source" not in table.columns:
        table["source"] = datas[0]
    if rx is not None:
        table["source"] = pattern_source_keys(table, datas, rx, storage)
    table["source"] = table["source"].astype(str)
    table = _with_manifest_columns(table, datas, storage)  # sequence, mask
    per_source_listed = {str(k): int(v) for k, v in table["source"].value_counts().sort_index().items()}
    table = table[table["error"].isna()].copy()
    table["label"] = table["class_name"].map({c: i for i, c in enumerate(classes)}).astype(np.int64)
    excluded = np.zeros(len(table), dtype=bool)
    fp_file = Path(bundle_dir) / FINGERPRINTS_FILE
    if exclude_duplicates and fp_file.is_file():
        excluded = split.match_reference(table, pd.read_parquet(fp_file))
    used = table[~excluded].reset_index(drop=True)
    # Duplicate groups among the evaluated files: the bootstrap resamples them whole, as it does for the
    # bundle's test split (a near-copy is no independent evidence).
    used["group"] = split.find_duplicate_groups(used)
    # Only path/label/row travel through Ray Data; source and patient_id are joined back by row. A text
    # column with nulls (folder rows have no patient_id) came back from Ray 2.60 in a pandas block that
    # pandas 3.1 cannot row-index (IndexError on df[mask]).
    carry = [c for c in ("source", "patient_id", "group", *EXTRA_COLUMNS) if c in used.columns]
    preds = predict_files(
        bundle_dir, used[["path", "label"]].assign(_row=np.arange(len(used))), storage=storage
    )
    preds = preds.drop(columns=[c for c in carry if c in preds.columns]).merge(
        used[carry].assign(_row=np.arange(len(used))), on="_row", how="left", validate="one_to_one"
    )
    preds = preds.drop(columns="_row").sort_values("path", ignore_index=True)
    thr = meta.threshold if threshold is None else threshold
    metrics = metrics_with_ci(preds, classes, meta.negative_class, thr, n_boot, seed)
    by_source = per_source_metrics(preds, classes, meta.negative_class, thr, n_boot, seed)
    result = {
        "bundle": bundle_uri,
        "bundle_id": meta.bundle_id,
        "data": data if isinstance(data, str) else datas,
        "source_pattern": rx.pattern if rx is not None else None,
        "metrics": metrics,
        "by_source": by_source,
        "files": {
            **{k: v for k, v in cat.summary().items() if k != "rejected_files"},
            "per_source": per_source_listed,
            "excluded_duplicates_of_training": int(excluded.sum()),
            "evaluated": int(len(preds)),
        },
        "rejected_files": cat.summary()["rejected_files"],
        "excluded_files": table.loc[excluded, "path"].tolist()[:1000],
    }
    loc = _scope_and_localisation(
        result, preds, bundle_dir, meta, thr, storage, localisation, localisation_tolerance, n_boot, seed
    )
    result["seconds"] = round(time.time() - t0, 1)
    _write_evaluation(out_dir, result, preds, loc)
    return result


def _local_abspath(path: str) -> str:
    return path if "://" in path else os.path.abspath(path)


def score_rows_as_predictions(
    scores: pd.DataFrame, classes: list[str], negative_class: str | None
) -> pd.DataFrame:
    """Score rows (``raytumor score`` output) as prediction rows: ``prob_<class>`` are the decision's.

    A volume row's ``prob_*`` are those of its highest-scoring slice, but its label comes from ``score`` (the
    sustained volume score, see :mod:`raytumor.volumes`): so the no-tumour probability becomes ``1 - score``
    and the tumour classes share ``score`` in their slice's proportions. Error rows get NaN probabilities
    (left out of the metrics and counted by :func:`metrics_with_ci`)."""
    df = scores.copy()
    cols = [f"prob_{c}" for c in classes]
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise ValueError(f"score rows lack {missing}: were they written with another bundle?")
    probs = df[cols].to_numpy(np.float64, copy=True)
    if negative_class is not None and "kind" in df.columns and "score" in df.columns:
        vol = df["kind"].isin(VOLUME_KINDS).to_numpy() & np.isfinite(df["score"].to_numpy(np.float64))
        if vol.any():
            neg = classes.index(negative_class)
            score = df["score"].to_numpy(np.float64)[vol]
            pos = np.delete(probs[vol], neg, axis=1)
            total = pos.sum(1, keepdims=True)
            share = np.divide(pos, total, out=np.full_like(pos, 1.0 / pos.shape[1]), where=total > 0)
            probs[vol] = np.insert(share * score[:, None], neg, 1.0 - score, axis=1)
    if "error" in df.columns:
        probs[df["error"].notna().to_numpy()] = np.nan
    df[cols] = probs
    return df


def _join_score_rows(
    table: pd.DataFrame, scores: pd.DataFrame, scores_dir: str, meta: Any, bundle_dir: Any
) -> tuple[pd.DataFrame, int]:
    """Labelled rows joined to their score rows (by path) as prediction rows, and the number of score rows
    of files the labels do not list. Refuses another bundle's rows, duplicate rows and unscored files."""
    if scores.empty:
        raise ValueError(f"no score rows in {scores_dir}")
    bundle_ids = sorted(set(scores["bundle_id"].dropna().astype(str)))
    if bundle_ids and bundle_ids != [meta.bundle_id]:
        raise ValueError(
            f"{scores_dir} was scored by bundle(s) {bundle_ids}, not {meta.bundle_id} ({bundle_dir})"
        )
    scores = scores.assign(_key=scores["path"].astype(str).map(_local_abspath))
    if scores["_key"].duplicated().any():
        raise ValueError(f"{scores_dir} has several rows for one file: not the output of one scoring run")
    table = table.assign(_key=table["path"].astype(str).map(_local_abspath))
    unscored = table.loc[~table["_key"].isin(scores["_key"]), "path"]
    if len(unscored):
        raise ValueError(
            f"{len(unscored)} labelled files have no score row in {scores_dir} (e.g. {unscored.iloc[0]}): "
            "score the same files with `raytumor score` first"
        )
    keep = ["path", "label", "source"] + [c for c in ("patient_id", *EXTRA_COLUMNS) if c in table.columns]
    if "in_scope" not in scores.columns and "label" in scores.columns:  # only the label says it was refused
        refused = scores["label"].astype(str).eq(OUT_OF_SCOPE)
        if refused.any():
            scores = scores.assign(in_scope=~refused)
    # The score row's label is the model's call (a class, or out_of_scope); the truth comes from the labels.
    rows = scores.drop(columns=[c for c in keep if c != "label"] + ["label"], errors="ignore")
    preds = (
        table[keep + ["_key"]].merge(rows, on="_key", how="left", validate="one_to_one").drop(columns="_key")
    )
    preds = score_rows_as_predictions(preds, meta.classes, meta.negative_class).sort_values(
        "path", ignore_index=True
    )
    return preds, int((~scores["_key"].isin(table["_key"])).sum())


def evaluate_scores(
    bundle_dir: str | os.PathLike,
    data: str | Sequence[str],
    scores_dir: str,
    out_dir: str | os.PathLike | None = None,
    threshold: float | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    s3_endpoint: str | None = None,
    source_pattern: str | None = None,
    localisation: bool = True,
    localisation_tolerance: float = 0.01,
) -> dict[str, Any]:
    """Metrics of a finished ``raytumor score`` output against the labels of ``data``: no model is run
    (except the bundle's, as stored, for the Grad-CAM pointing game of a manifest with masks).

    This is how volumes (NIfTI, multi-frame DICOM: one volume-level row each) and test-time adaptation
    (AdaBN, flip TTA: the rows record which) are evaluated. Every labelled file must have a score row
    (matched by path); score rows of other files are ignored. Adds ``by_kind``: metrics of the image rows
    (slice false-positive rate) and of the volume rows (volume false-positive rate) apart. Duplicates of the
    training data are not excluded here (volumes have no fingerprint): score a de-duplicated archive."""
    t0 = time.time()
    datas = _data_list(data)
    rx = compile_source_pattern(source_pattern)
    storage = StorageOptions.from_env(s3_endpoint)
    bundle_uri, bundle_dir = str(bundle_dir), fetch_bundle(bundle_dir, storage)
    meta = read_meta(bundle_dir)
    classes = list(meta.classes)
    listing = list_labelled(datas, storage)
    table = listing.files.copy()
    # map_labels names every listed label (or raises on one it cannot map)
    table["class_name"] = table["class_name"].map(
        map_labels(table["class_name"].unique(), classes, meta.negative_class)
    )
    table["label"] = table["class_name"].map({c: i for i, c in enumerate(classes)}).astype(np.int64)
    if rx is not None:
        table["source"] = pattern_source_keys(table, datas, rx, storage)
    table["source"] = table["source"].astype(str)
    table = _with_manifest_columns(table, datas, storage)  # sequence, mask
    scores = read_scores(scores_dir, storage)
    preds, ignored = _join_score_rows(table, scores, scores_dir, meta, bundle_uri)
    thr = meta.threshold if threshold is None else threshold
    kinds = preds["kind"].fillna("error").astype(str) if "kind" in preds.columns else None
    result = {
        "bundle": bundle_uri,
        "bundle_id": meta.bundle_id,
        "data": data if isinstance(data, str) else datas,
        "scores": scores_dir,
        "source_pattern": rx.pattern if rx is not None else None,
        "adaptation": sorted(set(preds["adaptation"].dropna().astype(str))) if "adaptation" in preds else [],
        "metrics": metrics_with_ci(preds, classes, meta.negative_class, thr, n_boot, seed),
        "by_source": per_source_metrics(preds, classes, meta.negative_class, thr, n_boot, seed),
        "by_kind": {
            k: metrics_with_ci(preds[kinds == k], classes, meta.negative_class, thr, n_boot, seed)
            for k in ("image", *VOLUME_KINDS)
            if kinds is not None and (kinds == k).any()
        },
        "files": {
            **listing.summary(),
            "scored_rows_ignored": ignored,
            "score_errors": int(preds["error"].notna().sum()) if "error" in preds.columns else 0,
            "evaluated": int(len(preds)),
        },
    }
    loc = _scope_and_localisation(
        result, preds, bundle_dir, meta, thr, storage, localisation, localisation_tolerance, n_boot, seed
    )
    result["seconds"] = round(time.time() - t0, 1)
    _write_evaluation(out_dir, result, preds, loc)
    return result


def format_table(metrics: dict[str, Any], by_source: dict[str, dict[str, Any]] | None = None) -> str:
    """The pooled metrics with CIs, then (with ``by_source``) one line per source."""
    ci = metrics.get("ci95", {})
    lines = [f"{'metric':<14}{'value':>9}   95% CI", "-" * 40]
    for k in BINARY_METRICS:
        v = metrics.get(k)
        if v is None:
            continue
        lo, hi = ci.get(k, [None, None])
        band = f"[{lo:.3f}, {hi:.3f}]" if lo is not None else ""
        lines.append(f"{k:<14}{v:>9.4f}   {band}")
    for k in ("mc_accuracy", "mc_balanced_accuracy", "mc_f1_macro", "mc_roc_auc_macro"):
        if metrics.get(k) is not None:
            lines.append(f"{k:<22}{metrics[k]:>9.4f}")
    if "confusion_matrix" in metrics:
        (tn, fp), (fn, tp) = metrics["confusion_matrix"]
        lines.append(f"confusion (truth x pred): TN={tn} FP={fp} FN={fn} TP={tp}   n={metrics['n']}")
    if by_source:
        lines += ["", "per source:", format_source_lines(by_source)]
    return "\n".join(lines)


def format_source_lines(by_source: dict[str, dict[str, Any]], what: str = "source") -> str:
    """n, accuracy, ROC-AUC, sensitivity, specificity and false positives per source (and the rows out of
    scope, when the entries count them); the (long) key last."""

    def f(v: Any) -> str:
        return "-" if v is None else f"{v:.4f}"

    oos = any("out_of_scope" in m for m in by_source.values())
    head = f"{'n':>7}{'accuracy':>10}{'roc_auc':>9}{'sensitivity':>13}{'specificity':>13}{'FP':>6}"
    lines = [head + (f"{'OOS':>6}" if oos else "") + f"  {what}"]
    for key, m in by_source.items():
        fp = m.get("false_positives")
        n_oos = f"{m.get('out_of_scope', '-'):>6}" if oos else ""
        lines.append(
            f"{m.get('n', 0):>7}{f(m.get('accuracy')):>10}{f(m.get('roc_auc')):>9}"
            f"{f(m.get('sensitivity')):>13}{f(m.get('specificity')):>13}{'-' if fp is None else fp:>6}{n_oos}"
            f"  {key}"
        )
    return "\n".join(lines)


def format_scope(res: dict[str, Any]) -> str:
    """How many rows were in and out of scope and why, the in-scope metrics, and the by-view and
    by-sequence tables (all rows; OOS = rows out of scope)."""
    sc = res.get("scope")
    if not sc:
        return ""
    lines = [
        f"scope: {sc['evaluated']} scans with a prediction, {sc['in_scope']} in scope, "
        f"{sc['out_of_scope']} out of scope"
        + (f" ({100 * sc['out_of_scope_share']:.1f}%)" if sc.get("out_of_scope_share") else "")
    ]
    if not sc["recorded"]:
        lines.append("  (the predictions carry no scope columns: every row taken as in scope, view unknown)")
    if sc["out_of_scope"]:
        lines.append("  reasons: " + ", ".join(f"{k} {v}" for k, v in sc["reasons"].items()))
        lines.append(
            "  true classes: " + ", ".join(f"{k} {v}" for k, v in sc["out_of_scope_by_class"].items())
        )
        lines += ["", "in-scope rows only:", format_table(sc["metrics"], sc.get("by_source") or None)]
    for key, what in (("by_view", "view"), ("by_sequence", "sequence")):
        if res.get(key):
            lines += ["", f"per {what} (all rows; OOS = out of scope):", format_source_lines(res[key], what)]
    return "\n".join(lines)


def _rate(h: dict[str, Any]) -> str:
    if h.get("rate") is None:
        return f"{'-':>7}{'':>17}"
    lo, hi = h["ci95"]
    band = f"[{lo:.3f}, {hi:.3f}]" if lo is not None else ""
    return f"{h['rate']:>7.3f} {band:<16}"


def format_localisation(loc: dict[str, Any] | None, title: str = "Grad-CAM pointing game") -> str:
    """The pointing game: hit rates with 95% CIs, the tolerant variant and the baselines, pooled and per
    sequence and source (every ``by_*`` grouping with more than one group)."""
    if not loc:
        return ""

    def f(v: Any) -> str:
        return f"{'-':>9}" if v is None else f"{v:>9.3f}"

    tol = f"<={100 * loc['tolerance']:g}%"
    lines = [
        f"{title} (peak of the heat map inside the expert tumour mask, original image pixels; "
        f"95% CIs resample {loc.get('ci95_resampling', 'scans')}):",
        f"  tumour images with a mask {loc['n']} (+{loc['errors']} unreadable), without a mask "
        f"{loc.get('without_mask', 0)}; empty heat maps {loc['cam_empty']}, peaks in the padding "
        f"{loc['peak_in_padding']}",
        f"{'n':>7}{'hit':>7} {'95% CI':<16}{tol:>7} {'95% CI':<16}{'centre':>7} {'95% CI':<16}"
        f"{'random':>9}{'in head':>9}  group",
    ]

    def line(b: dict[str, Any], name: str) -> str:
        return (
            f"{b['n']:>7}{_rate(b['hit'])}{_rate(b['hit_tolerant'])}{_rate(b['centre_hit'])}"
            f"{f(b['random_point'])}{f(b['random_point_in_head'])}  {name}"
        )

    lines.append(line(loc, "all"))
    if loc.get("among_called_tumour"):
        lines.append(line(loc["among_called_tumour"], "called tumour"))
    if loc.get("in_scope"):
        lines.append(line(loc["in_scope"], "in scope"))
    for key in [
        k for k in loc if k.startswith("by_")
    ]:  # by_sequence, by_source (or what the caller grouped by)
        groups = loc[key] or {}
        for name, b in groups.items() if len(groups) > 1 else ():  # one group would repeat "all"
            lines.append(line(b, f"{key[3:]} {name}"))
    return "\n".join(lines)


def _print_files(res: dict[str, Any]) -> None:
    f = res["files"]
    if "scores" in res:
        print(
            f"files listed {f['files_listed']}, evaluated {f['evaluated']} ({f['score_errors']} error rows), "
            f"score rows of unlisted files ignored {f['scored_rows_ignored']}; adaptation {res['adaptation']}"
        )
        return
    print(
        f"files listed {f['files_listed']}, decoded {f['files_decoded']}, rejected {f['files_rejected']}, "
        f"excluded as duplicates of training data {f['excluded_duplicates_of_training']}, "
        f"evaluated {f['evaluated']}"
    )
    if f.get("class_aliases"):
        print(f"labels mapped onto the bundle's classes: {f['class_aliases']}")


def evaluate(cfg: EvaluateConfig) -> dict[str, Any]:
    """``raytumor evaluate``: a finished score output (``cfg.scores``, no model run) or the bundle's
    predictions on ``cfg.data`` (Ray Data), into ``cfg.out`` (default: BUNDLE/evaluation, or ./evaluation
    for a bundle in a bucket)."""
    out = cfg.out or (os.path.join(cfg.bundle, "evaluation") if "://" not in cfg.bundle else "evaluation")
    common = dict(threshold=cfg.threshold, n_boot=cfg.n_boot, seed=cfg.seed, s3_endpoint=cfg.s3_endpoint,
                  source_pattern=cfg.source_pattern, localisation=cfg.localisation,
                  localisation_tolerance=cfg.localisation_tolerance)  # fmt: skip
    # A bad bundle fails here in one line, before Ray starts or anything is written.
    validate_bundle(cfg.bundle, StorageOptions.from_env(cfg.s3_endpoint))
    if cfg.scores:
        res = evaluate_scores(cfg.bundle, cfg.data, cfg.scores, out, **common)
    else:
        init_ray()
        res = evaluate_source(cfg.bundle, cfg.data, out, exclude_duplicates=not cfg.keep_duplicates, **common)
    res["out"] = out
    return res


def main(args: argparse.Namespace) -> dict[str, Any]:
    res = evaluate(from_args(EvaluateConfig, args))
    _print_files(res)
    print(format_table(res["metrics"], res["by_source"]))
    if res.get("by_kind"):
        print("\nper kind (image = one slice per file, volume = volume rule):")
        print(format_source_lines(res["by_kind"], what="kind"))
    for text in (format_scope(res), format_localisation(res.get("localisation"))):
        if text:
            print("\n" + text)
    print(f"metrics written to {os.path.join(res['out'], 'metrics.json')}")
    return res
