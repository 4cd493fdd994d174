"""Groups of rows that are one piece of evidence: connected components over "same key" links.

The base of leakage-safe splitting (``split``: duplicates + patients never straddle splits) and of the
cluster bootstrap (``metrics``: a patient's scans, or a duplicate group, are resampled together).
Pure numpy/pandas.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

__all__ = [
    "cluster_ids",
    "components",
    "dense_ids",
    "equal_value_edges",
    "null_strings",
    "patient_groups",
    "patient_keys",
]


def null_strings(s: pd.Series) -> np.ndarray:
    """Mask of null/empty entries in a string-ish column."""
    return (s.isna() | (s.astype(str).str.strip() == "")).to_numpy()


def patient_keys(df: pd.DataFrame) -> tuple[pd.Series, np.ndarray] | None:
    """(patient key per row, null mask), or None without a ``patient_id`` column. The key is scoped by
    ``source`` when that column exists: "1" of one dataset is not "1" of another."""
    if "patient_id" not in df.columns:
        return None
    pid = df["patient_id"]
    null = null_strings(pid)
    key = pid.astype(str)
    if "source" in df.columns:
        key = df["source"].astype(str) + "\x1f" + key
    return key.reset_index(drop=True), null


def components(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Connected components over edges (a[i], b[i]): the smallest row index of each row's component.

    Vectorised hook-and-compress: hook every larger root onto the smallest root it touches, then
    pointer-jump; roots only ever decrease, so there are no cycles and rounds are few in practice.
    """
    parent = np.arange(n, dtype=np.int64)
    a = np.asarray(a, dtype=np.int64)
    b = np.asarray(b, dtype=np.int64)
    while True:
        while True:
            gp = parent[parent]
            if np.array_equal(gp, parent):
                break
            parent = gp
        pa, pb = parent[a], parent[b]
        diff = pa != pb
        if not diff.any():
            return parent
        a, b, pa, pb = a[diff], b[diff], pa[diff], pb[diff]
        np.minimum.at(parent, np.maximum(pa, pb), np.minimum(pa, pb))


def dense_ids(root: np.ndarray) -> np.ndarray:
    """Group ids 0..G-1 numbered by first row (roots are component minima)."""
    return np.unique(root, return_inverse=True)[1].astype(np.int64).reshape(-1)


def equal_value_edges(s: pd.Series, null: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Edges linking each non-null row to the first row with the same value."""
    rows = np.flatnonzero(~null)
    if len(rows) == 0:
        return rows, rows
    codes, _ = pd.factorize(s.iloc[rows].astype(str))
    first = np.full(codes.max() + 1, len(rows), dtype=np.int64)
    np.minimum.at(first, codes, np.arange(len(rows)))
    return rows, rows[first[codes]]


def patient_groups(df: pd.DataFrame, groups: np.ndarray) -> np.ndarray:
    """``groups`` merged with patients: union-find over "same group" and "same non-null patient_id" (per
    ``source``). Dense ids 0..G-1 by first row; ``groups`` unchanged (re-numbered) without patient ids."""
    groups = np.asarray(groups)
    n = len(groups)
    if len(df) != n:
        raise ValueError(f"groups has {n} entries for {len(df)} rows")
    gid = pd.factorize(groups)[0].astype(np.int64)
    patients = patient_keys(df)
    if patients is None or patients[1].all():
        return dense_ids(gid)
    first = np.full(int(gid.max()) + 1 if n else 0, n, dtype=np.int64)
    np.minimum.at(first, gid, np.arange(n))
    pa, pb = equal_value_edges(*patients)
    a = np.concatenate([np.arange(n), pa])
    b = np.concatenate([first[gid], pb])
    return dense_ids(components(n, a, b))


def cluster_ids(df: pd.DataFrame) -> tuple[np.ndarray | None, str]:
    """Bootstrap clusters of prediction rows and what they are: a patient's scans (``patient_id``, scoped
    by ``source``) and a duplicate group (``group``) are one cluster each; (None, "scans") without either.

    Scans of one patient are correlated evidence; resampling them one by one narrows the interval.
    """
    pid = df["patient_id"] if "patient_id" in df.columns else None
    has_pid = pid is not None and bool((pid.notna() & (pid.astype(str).str.strip() != "")).any())
    has_group = "group" in df.columns
    if not has_pid and not has_group:
        return None, "scans"
    base = df["group"].to_numpy() if has_group else np.arange(len(df))
    flat = df.reset_index(drop=True)
    ids = patient_groups(flat, base) if has_pid else pd.factorize(base)[0]
    what = " + ".join(w for w, on in (("duplicate groups", has_group), ("patients", has_pid)) if on)
    return np.asarray(ids, dtype=np.int64), what
