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
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torchmetrics.functional as tmf

BINARY_METRICS = ("accuracy", "roc_auc", "sensitivity", "specificity", "ppv", "npv", "f1")
# Undefined (None) on a set holding only tumour or only no-tumour scans, like ROC-AUC and the rate of the
# missing class; accuracy then equals specificity (or sensitivity).
SINGLE_CLASS_UNDEFINED = ("ppv", "npv", "f1")


def tumour_binary(labels: np.ndarray, probs: np.ndarray, classes: list[str], negative_class: str | None):
    """Collapse labels/probabilities to tumour (1) vs none (0) and the tumour score."""
    labels = np.asarray(labels)
    probs = np.asarray(probs, dtype=np.float64)
    if negative_class is not None:
        neg = classes.index(negative_class)
        return (labels != neg).astype(np.int64), 1.0 - probs[:, neg]
    if len(classes) == 2:
        return (labels == 1).astype(np.int64), probs[:, 1]
    return None, None


def compute_metrics(
    labels: np.ndarray,
    probs: np.ndarray,
    classes: list[str],
    negative_class: str | None = None,
    threshold: float = 0.5,
) -> dict[str, Any]:
    """Accuracy, ROC-AUC, sensitivity, specificity, PPV, NPV, F1 and the confusion matrix.

    Binary sets use the tumour score at ``threshold``; sets with more classes add macro metrics on the
    arg-max prediction (and the tumour-vs-none view when a no-tumour class exists).
    """
    labels = np.asarray(labels, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float32)
    out: dict[str, Any] = {"n": int(len(labels)), "threshold": float(threshold)}
    if len(labels) == 0:
        return out
    y, s = tumour_binary(labels, probs, classes, negative_class)
    if y is not None:
        out.update(_binary_point(y, s, threshold))
    if len(classes) > 2:
        p, t = torch.from_numpy(probs), torch.from_numpy(labels)
        c = len(classes)
        out["mc_accuracy"] = float(tmf.accuracy(p, t, task="multiclass", num_classes=c, average="micro"))
        out["mc_balanced_accuracy"] = float(
            tmf.recall(p, t, task="multiclass", num_classes=c, average="macro")
        )
        out["mc_f1_macro"] = float(tmf.f1_score(p, t, task="multiclass", num_classes=c, average="macro"))
        out["mc_roc_auc_macro"] = _safe(
            lambda: float(tmf.auroc(p, t, task="multiclass", num_classes=c, average="macro"))
        )
        out["mc_confusion_matrix"] = tmf.confusion_matrix(p, t, task="multiclass", num_classes=c).tolist()
        if y is None:
            out["accuracy"] = out["mc_accuracy"]
    return out


def _safe(fn) -> float | None:
    try:
        v = fn()
        return None if np.isnan(v) else v
    except (ValueError, RuntimeError):
        return None


def _binary_point(y: np.ndarray, s: np.ndarray, threshold: float) -> dict[str, Any]:
    # Threshold metrics from the confusion counts with `score >= threshold` (torchmetrics uses `>`), the
    # same rule as the bootstrap and the predictor; torchmetrics gives the threshold-free ROC-AUC.
    v = {k: float(a[0]) for k, a in _binary_vectorised(y[None], s[None], threshold, with_auc=False).items()}
    pred = s >= threshold
    tp, tn = int((pred & (y == 1)).sum()), int((~pred & (y == 0)).sum())
    fp, fn = int((pred & (y == 0)).sum()), int((~pred & (y == 1)).sum())
    both = 0 < y.sum() < len(y)
    auc = (
        float(tmf.auroc(torch.from_numpy(s.astype(np.float32)), torch.from_numpy(y), task="binary"))
        if both
        else None
    )
    if not both:  # one class only: PPV/NPV/F1 are trivially 0 or 1, not evidence about the model
        v.update({k: np.nan for k in SINGLE_CLASS_UNDEFINED})
    return {
        **{k: (None if np.isnan(x) else x) for k, x in v.items()},
        "roc_auc": auc,
        "confusion_matrix": [[tn, fp], [fn, tp]],  # rows: truth none/tumour; cols: predicted none/tumour
        "positives": int(y.sum()),
        "negatives": int((y == 0).sum()),
    }


def _binary_vectorised(
    y: np.ndarray, s: np.ndarray, threshold: float, with_auc: bool = True
) -> dict[str, np.ndarray]:
    """Binary metrics for many resamples at once: y, s are (R, N)."""
    pred = s >= threshold
    pos = y == 1
    tp = (pred & pos).sum(1).astype(float)
    tn = (~pred & ~pos).sum(1).astype(float)
    fp = (pred & ~pos).sum(1).astype(float)
    fn = (~pred & pos).sum(1).astype(float)
    n = y.shape[1]
    with np.errstate(invalid="ignore", divide="ignore"):
        out = {
            "accuracy": (tp + tn) / n,
            "sensitivity": tp / (tp + fn),
            "specificity": tn / (tn + fp),
            "ppv": tp / (tp + fp),
            "npv": tn / (tn + fn),
            "f1": 2 * tp / (2 * tp + fp + fn),
        }
        if not with_auc:
            return out
        # ROC-AUC as the Mann–Whitney U statistic with mid-ranks for ties.
        order = np.argsort(s, axis=1, kind="stable")
        ss = np.take_along_axis(s, order, 1)
        ranks = np.empty_like(ss, dtype=float)
        for r in range(s.shape[0]):  # rankdata per row; scipy handles ties
            ranks[r] = _midranks(ss[r])
        inv = np.empty_like(order)
        np.put_along_axis(inv, order, np.arange(n)[None, :].repeat(s.shape[0], 0), 1)
        r_orig = np.take_along_axis(ranks, inv, 1)
        n_pos = pos.sum(1).astype(float)
        n_neg = n - n_pos
        out["roc_auc"] = ((r_orig * pos).sum(1) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    return out


def _midranks(sorted_vals: np.ndarray) -> np.ndarray:
    n = len(sorted_vals)
    ranks = np.arange(1, n + 1, dtype=float)
    _, start, counts = np.unique(sorted_vals, return_index=True, return_counts=True)
    for st, c in zip(start[counts > 1], counts[counts > 1], strict=False):
        ranks[st : st + c] = st + (c + 1) / 2
    return ranks


def bootstrap_ci(
    labels: np.ndarray,
    probs: np.ndarray,
    classes: list[str],
    negative_class: str | None = None,
    threshold: float = 0.5,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    groups: np.ndarray | None = None,
) -> dict[str, list[float | None]]:
    """Percentile bootstrap 1-alpha intervals for the binary metrics.

    Resamples scans with replacement, or with ``groups`` whole duplicate groups (a cluster bootstrap):
    near-duplicates are not independent evidence, and counting them as such narrows the interval.
    """
    y, s = tumour_binary(labels, probs, classes, negative_class)
    if y is None or len(y) == 0:
        return {}
    rng = np.random.default_rng(seed)
    chunks = []
    if groups is not None and len(np.unique(groups)) < len(y):
        _, inverse = np.unique(np.asarray(groups), return_inverse=True)
        members = [np.flatnonzero(inverse == g) for g in range(inverse.max() + 1)]
        for _ in range(n_boot):  # replicates differ in size: one at a time
            idx = np.concatenate([members[g] for g in rng.integers(0, len(members), len(members))])
            chunks.append(_binary_vectorised(y[idx][None], s[idx][None], threshold))
    else:
        for start in range(0, n_boot, 200):  # bounded memory for large test sets
            idx = rng.integers(0, len(y), size=(min(200, n_boot - start), len(y)))
            chunks.append(_binary_vectorised(y[idx], s[idx], threshold))
    single = y.min() == y.max()
    out: dict[str, list[float | None]] = {}
    for k in chunks[0]:
        v = np.concatenate([np.atleast_1d(c[k]) for c in chunks])
        v = v[np.isfinite(v)]
        out[k] = (
            [float(np.quantile(v, alpha / 2)), float(np.quantile(v, 1 - alpha / 2))]
            if len(v) and not (single and k in SINGLE_CLASS_UNDEFINED)
            else [None, None]
        )
    return out


# ----------------------------------------------------------------------------------------------------------
# Labels and sources of evaluation data


def map_labels(names: Iterable[str], classes: Sequence[str], negative_class: str | None) -> dict[str, str]:
    """Map the data's label names onto a bundle's classes: {data name: bundle class}.

    A name equal to a bundle class maps to it; a no-tumour name (``ingest.is_negative_name``: ``no_tumor``,
    ``normal``, ...) maps to the bundle's negative class, since every source spells "no tumour" its own
    way. Anything else is an error: guessing which tumour class ``tumour`` means would invent labels.
    """
    from raytumor.ingest import is_negative_name

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
    from raytumor.ingest import source_key

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
    from raytumor.ingest import MANIFEST_SUFFIXES, get_filesystem, list_labelled

    out: dict[str, tuple[Any, str]] = {}
    for d in data:
        if not d.lower().endswith(MANIFEST_SUFFIXES):
            continue
        fs, path = get_filesystem(d, storage)
        with fs.open_input_file(path) as f:
            df = pd.read_csv(f, dtype=str) if d.lower().endswith(".csv") else pd.read_parquet(f)
        if "source" not in df.columns:
            continue
        # list_labelled resolves the paths and keeps the manifest's row order.
        paths = list_labelled(d, storage).files["path"]
        out.update(zip(paths, zip(df["source"].tolist(), [d] * len(df), strict=True), strict=True))
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
# Metrics of prediction tables: pooled and per source (pure pandas/numpy: evaluate, report, train)


def cluster_ids(df: pd.DataFrame) -> tuple[np.ndarray | None, str]:
    """Bootstrap clusters of prediction rows and what they are: a patient's scans (``patient_id``, scoped
    by ``source``) and a duplicate group (``group``) are one cluster each; (None, "scans") without either.

    Scans of one patient are correlated evidence; resampling them one by one narrows the interval.
    """
    from raytumor import split

    pid = df["patient_id"] if "patient_id" in df.columns else None
    has_pid = pid is not None and bool((pid.notna() & (pid.astype(str).str.strip() != "")).any())
    has_group = "group" in df.columns
    if not has_pid and not has_group:
        return None, "scans"
    base = df["group"].to_numpy() if has_group else np.arange(len(df))
    flat = df.reset_index(drop=True)
    ids = split.patient_groups(flat, base) if has_pid else pd.factorize(base)[0]
    what = " + ".join(w for w, on in (("duplicate groups", has_group), ("patients", has_pid)) if on)
    return np.asarray(ids, dtype=np.int64), what


def metrics_with_ci(
    df: pd.DataFrame,
    classes: list[str],
    negative_class: str | None,
    threshold: float,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """:func:`compute_metrics` plus ``ci95`` (cluster bootstrap, see :func:`cluster_ids`) of prediction
    rows: ``label`` (index into ``classes``), ``prob_<class>``; optional ``path``, ``source``,
    ``patient_id``, ``group``. Rows without finite probabilities (failed at prediction) are left out and
    counted. Adds ``false_positives`` and ``fp_rate`` (share of no-tumour scans called tumour)."""
    if "path" in df.columns:  # the bootstrap's draws depend on row order: make it the same every run
        df = df.sort_values("path", kind="stable")
    probs = df[[f"prob_{c}" for c in classes]].to_numpy(dtype=np.float32)
    ok = np.isfinite(probs).all(1)
    df, probs = df[ok], probs[ok]
    labels = df["label"].to_numpy().astype(np.int64)
    m = compute_metrics(labels, probs, classes, negative_class, threshold)
    groups, what = cluster_ids(df)
    m["ci95"] = bootstrap_ci(labels, probs, classes, negative_class, threshold, n_boot, seed, groups=groups)
    m["ci95_resampling"] = what
    if "confusion_matrix" in m:
        (tn, fp), _ = m["confusion_matrix"]
        m["false_positives"] = int(fp)
        m["fp_rate"] = float(fp / (tn + fp)) if tn + fp else None
    if not ok.all():
        m["failed_predictions"] = int((~ok).sum())
    return m


def per_source_metrics(
    df: pd.DataFrame,
    classes: list[str],
    negative_class: str | None,
    threshold: float,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, dict[str, Any]]:
    """{source key: :func:`metrics_with_ci`} over the rows of each value of ``df["source"]``.

    A source holding one class gets the metrics that class defines (a folder of healthy scans: specificity,
    its CI and the false-positive count; sensitivity and ROC-AUC None). Works on any prediction table with a
    ``source`` column: ``raytumor evaluate``'s predictions.parquet, or a leave-one-source-out run's test
    split.
    """
    if "source" not in df.columns:
        raise ValueError(f"per-source metrics need a 'source' column (have {list(df.columns)})")
    src = df["source"].astype(str)
    return {
        key: metrics_with_ci(df[src == key], classes, negative_class, threshold, n_boot, seed)
        for key in sorted(src.unique())
    }


# ----------------------------------------------------------------------------------------------------------
# Predicting a set of files with a bundle (Ray Data: decode on CPU tasks, model on an actor pool)


def predictor_resources() -> dict[str, Any]:
    """Actor count/CPUs for Predictor actors from the cluster, leaving CPUs for decoding."""
    import ray

    res = ray.cluster_resources()
    cpus, gpus = int(res.get("CPU", 1)), int(res.get("GPU", 0))
    if gpus:
        return {"size": gpus, "num_gpus": 1, "num_cpus": 1, "threads": None, "decode_cpus": 1}
    # On CPUs, model replicas beat intra-op threads: ResNet-18 on 2 cores runs 45 img/s per 1-thread
    # process (90 for two) but 81 img/s as one 2-thread process. Replicas of 1 thread on small machines,
    # 2 threads on larger ones (fewer copies of the model in memory).
    threads = 1 if cpus <= 4 else 2
    size = max(1, cpus // threads)
    # Reserve half the CPUs for the actors, leaving the rest to decode and write tasks (decoding is ~15x
    # cheaper than the forward pass, so the actors' threads may use every core). Decode tasks ask for
    # the same CPUs as an actor so Ray Data fuses them into it: each replica decodes its own batches.
    per = round(max(0.25, cpus * 0.5 / size), 3)
    return {"size": size, "num_gpus": 0, "num_cpus": per, "threads": threads, "decode_cpus": per}


def predict_files(
    bundle_dir: str | os.PathLike,
    files: pd.DataFrame,
    storage: Any = None,
    batch_size: int = 64,
) -> pd.DataFrame:
    """Score every row of ``files`` (needs ``path``): one output row per input row, errors kept."""
    from ray.data import ActorPoolStrategy

    from raytumor.bundle import read_meta
    from raytumor.ingest import decode_dataset
    from raytumor.predict import Predictor

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


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Metrics of a model bundle on labelled folders, buckets or manifests, pooled and per source",
        add_help=add_help,
    )
    p.add_argument("--bundle", required=True, help="model bundle directory (written by raytumor train)")
    add_source_args(p)
    p.add_argument("--out", default=None, help="output directory for metrics.json and predictions.parquet")
    p.add_argument("--threshold", type=float, default=None, help="override the bundle's operating threshold")
    p.add_argument(
        "--keep-duplicates",
        action="store_true",
        help="do not exclude files that duplicate the bundle's training/validation files",
    )
    p.add_argument(
        "--scores",
        default=None,
        metavar="SCORE_OUTPUT",
        help="evaluate a finished `raytumor score` output instead of predicting (volumes, --adapt/--tta runs): "
        "metrics pooled, per source and per kind (slices vs volumes)",
    )
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples for 95%% CIs")
    p.add_argument(
        "--s3-endpoint", default=None, help="endpoint of an S3-compatible store (or AWS_ENDPOINT_URL)"
    )
    p.add_argument("--seed", type=int, default=0)
    return p


def add_source_args(p: argparse.ArgumentParser) -> None:
    """``--data`` (repeatable) and ``--source-pattern``, shared by ``raytumor evaluate`` and ``report``."""
    p.add_argument(
        "--data",
        required=True,
        action="append",
        help="labelled tree ROOT/<class>/<files>, s3://..., or CSV/Parquet manifest (path,label[,patient_id,"
        "source]); repeat to evaluate several sources at once. Labels map onto the bundle's classes by name; "
        "no-tumour names (no_tumor, normal, ...) map to its no-tumour class",
    )
    p.add_argument(
        "--source-pattern",
        default=None,
        metavar="REGEX",
        help="source key of a row: first group (else the whole match) of REGEX in the manifest's source value "
        "(or the --data argument). Default: the source value up to ' via ', else the --data argument",
    )


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
    from raytumor import split
    from raytumor.bundle import FINGERPRINTS_FILE, read_meta
    from raytumor.ingest import StorageOptions, build_catalogue

    t0 = time.time()
    datas = _data_list(data)
    rx = compile_source_pattern(source_pattern)  # a bad pattern fails before any decoding
    meta = read_meta(bundle_dir)
    classes = list(meta.classes)
    storage = StorageOptions.from_env(s3_endpoint)
    cat = build_catalogue(
        datas[0] if len(datas) == 1 else datas,
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
    # Only path/label/row travel through Ray Data; source and patient_id are joined back by row. A text
    # column with nulls (folder rows have no patient_id) came back from Ray 2.60 in a pandas block that
    # pandas 3.1 cannot row-index (IndexError on df[mask]).
    carry = [c for c in ("source", "patient_id") if c in used.columns]
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
        "bundle": str(bundle_dir),
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
    from raytumor.bundle import read_meta
    from raytumor.ingest import StorageOptions, list_labelled
    from raytumor.score import read_scores

    t0 = time.time()
    datas = _data_list(data)
    rx = compile_source_pattern(source_pattern)
    meta = read_meta(bundle_dir)
    classes = list(meta.classes)
    storage = StorageOptions.from_env(s3_endpoint)
    listing = list_labelled(datas[0] if len(datas) == 1 else datas, storage)
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
    preds = score_rows_as_predictions(preds, classes, meta.negative_class).sort_values(
        "path", ignore_index=True
    )
    thr = meta.threshold if threshold is None else threshold
    kinds = preds["kind"].fillna("error").astype(str) if "kind" in preds.columns else None
    result = {
        "bundle": str(bundle_dir),
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
            "scored_rows_ignored": int((~scores["_key"].isin(table["_key"])).sum()),
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


def main(args: argparse.Namespace) -> dict[str, Any]:
    from raytumor.runtime import init_ray

    data = args.data[0] if len(args.data) == 1 else args.data  # one source: a string, as before
    compile_source_pattern(args.source_pattern)  # fail on a bad pattern before starting Ray
    out = args.out or os.path.join(str(args.bundle), "evaluation")
    if args.scores:
        res = evaluate_scores(
            args.bundle, data, args.scores, out, threshold=args.threshold, n_boot=args.n_boot, seed=args.seed,
            s3_endpoint=args.s3_endpoint, source_pattern=args.source_pattern,
        )  # fmt: skip
        f = res["files"]
        print(
            f"files listed {f['files_listed']}, evaluated {f['evaluated']} ({f['score_errors']} error rows), "
            f"score rows of unlisted files ignored {f['scored_rows_ignored']}; adaptation {res['adaptation']}"
        )
        print(format_table(res["metrics"], res["by_source"]))
        if res["by_kind"]:
            print("\nper kind (image = one slice per file, volume = volume rule):")
            print(format_source_lines(res["by_kind"], what="kind"))
        print(f"metrics written to {os.path.join(out, 'metrics.json')}")
        return res
    init_ray()
    res = evaluate_source(
        args.bundle,
        data,
        out,
        threshold=args.threshold,
        exclude_duplicates=not args.keep_duplicates,
        n_boot=args.n_boot,
        seed=args.seed,
        s3_endpoint=args.s3_endpoint,
        source_pattern=args.source_pattern,
    )
    f = res["files"]
    print(
        f"files listed {f['files_listed']}, decoded {f['files_decoded']}, rejected {f['files_rejected']}, "
        f"excluded as duplicates of training data {f['excluded_duplicates_of_training']}, "
        f"evaluated {f['evaluated']}"
    )
    if f.get("class_aliases"):
        print(f"labels mapped onto the bundle's classes: {f['class_aliases']}")
    print(format_table(res["metrics"], res["by_source"]))
    print(f"metrics written to {os.path.join(out, 'metrics.json')}")
    return res
