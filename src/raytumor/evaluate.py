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
from raytumor.bundle import FINGERPRINTS_FILE, fetch_bundle, read_meta
from raytumor.config import add_options, from_args, opt, stage_parser
from raytumor.ingest import build_catalogue, decode_dataset, is_negative_name, list_labelled, source_key
from raytumor.metrics import BINARY_METRICS, metrics_with_ci, per_source_metrics
from raytumor.predict import Predictor
from raytumor.results import read_scores
from raytumor.runtime import init_ray, predictor_resources
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
# Predicting a set of files with a bundle (Ray Data: decode on CPU tasks, model on an actor pool)


def predict_files(
    bundle_dir: str | os.PathLike,
    files: pd.DataFrame,
    storage: Any = None,
    batch_size: int = 64,
) -> pd.DataFrame:
    """Score every row of ``files`` (needs ``path``): one output row per input row, errors kept."""
    from ray.data import ActorPoolStrategy

    meta = read_meta(bundle_dir)
    r = predictor_resources()
    ds = decode_dataset(
        files, storage=storage, image_size=meta.image_size, fingerprints=False, preprocess=meta.preprocess
    )
    ds = ds.map_batches(
        Predictor,
        fn_constructor_kwargs={"bundle_dir": str(bundle_dir), "num_threads": r["threads"]},
        compute=ActorPoolStrategy(size=r["size"]),
        batch_size=batch_size,
        num_cpus=r["num_cpus"],
        num_gpus=r["num_gpus"],
        batch_format="numpy",
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
class EvaluateConfig(SourceOptions):
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


def _write_evaluation(out_dir: str | os.PathLike | None, result: dict[str, Any], preds: pd.DataFrame) -> None:
    """metrics.json and predictions.parquet (without the fingerprint thumbnails) into ``out_dir``, if given."""
    if not out_dir:
        return
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    preds.drop(columns=[c for c in ("thumb", "thumb_crop") if c in preds.columns]).to_parquet(
        out / "predictions.parquet", index=False
    )


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
) -> dict[str, Any]:
    """Metrics of ``bundle_dir`` on one or more labelled sources: pooled (``metrics``) and per source key
    (``by_source``), both with 95% bootstrap CIs; writes metrics.json and predictions.parquet (with a
    ``source`` column) to ``out_dir``. A single-class source (a folder of healthy scans) is fine."""
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
    carry = [c for c in ("source", "patient_id", "group") if c in used.columns]
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
        "seconds": round(time.time() - t0, 1),
    }
    _write_evaluation(out_dir, result, preds)
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
        vol = (df["kind"] == "volume").to_numpy() & np.isfinite(df["score"].to_numpy(np.float64))
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
    keep = ["path", "label", "source"] + [c for c in ("patient_id",) if c in table.columns]
    rows = scores.drop(columns=["path", "label", "source", "patient_id"], errors="ignore")
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
) -> dict[str, Any]:
    """Metrics of a finished ``raytumor score`` output against the labels of ``data``: no model is run.

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
            for k in ("image", "volume")
            if kinds is not None and (kinds == k).any()
        },
        "files": {
            **listing.summary(),
            "scored_rows_ignored": ignored,
            "score_errors": int(preds["error"].notna().sum()) if "error" in preds.columns else 0,
            "evaluated": int(len(preds)),
        },
        "seconds": round(time.time() - t0, 1),
    }
    _write_evaluation(out_dir, result, preds)
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
    """n, accuracy, ROC-AUC, sensitivity, specificity and false positives per source; the (long) key last."""

    def f(v: Any) -> str:
        return "-" if v is None else f"{v:.4f}"

    lines = [f"{'n':>7}{'accuracy':>10}{'roc_auc':>9}{'sensitivity':>13}{'specificity':>13}{'FP':>6}  {what}"]
    for key, m in by_source.items():
        fp = m.get("false_positives")
        lines.append(
            f"{m.get('n', 0):>7}{f(m.get('accuracy')):>10}{f(m.get('roc_auc')):>9}"
            f"{f(m.get('sensitivity')):>13}{f(m.get('specificity')):>13}{'-' if fp is None else fp:>6}  {key}"
        )
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
                  source_pattern=cfg.source_pattern)  # fmt: skip
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
    print(f"metrics written to {os.path.join(res['out'], 'metrics.json')}")
    return res
