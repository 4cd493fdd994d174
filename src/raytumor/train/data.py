"""Training data: catalogue every source once, group duplicates and patients, split by group (or hold out
one source, or one cross-validation fold), and build the Ray datasets (decoded once at store size,
augmented afresh each epoch)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pandas as pd

from raytumor import split
from raytumor.augment import AugmentConfig, augment_batch, store_size
from raytumor.config import comma_list
from raytumor.ingest import Catalogue, build_catalogue, decode_dataset
from raytumor.preprocess import parse_spec
from raytumor.runtime import train_resources
from raytumor.scan import ok_mask
from raytumor.storage import StorageOptions
from raytumor.train.config import TrainConfig


@dataclass
class SplitData:
    """The catalogued, de-duplicated and split data: computed once, shared by a run or a whole search."""

    catalogue: Catalogue
    # one row per listed file: path, class_name, label, source, split, group, sha256, error (+ patient_id)
    manifest: pd.DataFrame
    duplicates: dict[str, Any]
    duplicate_table: pd.DataFrame
    classes: list[str]
    negative_class: str | None
    # {"source": key, "dropped_duplicates": n} when leaving one source out; a cross-validation fold adds
    # "cv": {fold, folds, by, name} (source: the held-out source of a leave-one-source-out fold, else None)
    holdout: dict[str, Any] | None = None

    def files(self, split_name: str) -> pd.DataFrame:
        cols = [c for c in ("path", "label", "source") if c in self.manifest.columns]
        return self.manifest.loc[self.manifest["split"] == split_name, cols].reset_index(drop=True)

    @property
    def n_train(self) -> int:
        return int((self.manifest["split"] == "train").sum())

    def counts(self) -> pd.DataFrame:
        return self.manifest.groupby(["split", "class_name"]).size().unstack(fill_value=0)

    def source_counts(self) -> pd.DataFrame:
        """Files per source (rows) and split (columns)."""
        m = self.manifest.assign(source=self.manifest.get("source", "?"))
        return m.groupby(["source", "split"]).size().unstack(fill_value=0)

    def fingerprints(self) -> pd.DataFrame:
        """Fingerprints of the train+val files: the bundle carries them so evaluation can drop duplicates."""
        good = self.manifest[self.manifest["split"].isin(["train", "val"])]
        fp = self.catalogue.ok.merge(good[["path"]], on="path")
        cols = ["path", "sha256", "dhash", "thumb", "dhash_crop", "thumb_crop"]
        return fp[[c for c in cols if c in fp.columns]].reset_index(drop=True)


@dataclass
class Grouping:
    """The expensive half of :func:`prepare_split`: every source catalogued (each file decoded and
    fingerprinted once) and the decoded files grouped (duplicates + patients). The split itself is cheap,
    so a cross-validation driver computes this once and its fold runs only re-split it."""

    key: tuple  # grouping_key of the configs it serves
    catalogue: Catalogue
    table: pd.DataFrame  # every listed file (after --limit-per-class)
    groups: np.ndarray  # duplicate group of each row of ``good``

    @property
    def good(self) -> pd.DataFrame:
        """The decoded files, in table order (what ``groups`` is aligned with)."""
        return self.table[self.table["error"].isna()].reset_index(drop=True)


def grouping_key(cfg: TrainConfig) -> tuple:
    """What a :class:`Grouping` depends on: two configs with the same key share one."""
    limit = cfg.limit_per_class or None
    return (
        tuple(cfg.data),
        tuple(cfg.class_order or ()),
        limit,
        cfg.seed if limit else None,
        cfg.max_hamming,
    )


def resolve_source(name: str, keys: list[str], option: str = "--holdout-source") -> str:
    """The source key ``name`` refers to: the key itself, else the one key whose last path component
    matches (``--holdout-source navoneel-253`` for ``--data ../shared/data/navoneel-253/``)."""
    keys = sorted(set(keys))
    if name in keys:
        return name

    def base(k: str) -> str:
        return k.rstrip("/").rsplit("/", 1)[-1]

    hits = [k for k in keys if k.rstrip("/") == name.rstrip("/") or base(k) == base(name)]
    if len(hits) == 1:
        return hits[0]
    why = "matches several sources" if hits else "is not a source"
    raise ValueError(f"{option} {name!r} {why}; sources: {keys}")


def check_cv(cfg: TrainConfig) -> None:
    """Fail on inconsistent cross-validation options before any data is read."""
    if cfg.cv_by not in ("group", "source"):
        raise ValueError(f"cv_by must be 'group' or 'source', got {cfg.cv_by!r}")
    if cfg.cv_fold is None:
        return
    if cfg.holdout_source:
        raise ValueError("--holdout-source and a cross-validation fold both pick the test split: give one")
    if cfg.cv_fold < 0 or (cfg.cv_by == "group" and not 0 <= cfg.cv_fold < cfg.cv_folds):
        raise ValueError(f"cv_fold {cfg.cv_fold} is not a fold of cv_folds={cfg.cv_folds} (0-based)")


def group_data(cfg: TrainConfig) -> Grouping:
    """Catalogue (decode + fingerprint every file of every source) and group duplicates and patients."""
    if not cfg.data or not all(cfg.data):
        raise ValueError(f"no data source given: {cfg.data}")
    storage = StorageOptions.from_env(cfg.s3_endpoint)
    # Several sources are listed together (ingest.list_labelled), so classes are laid out over their union
    # and a single-class source (a folder of healthy scans) joins the others.
    cat = build_catalogue(cfg.data, storage, cfg.class_order)
    table = cat.table  # read only from here on: shared by every split made from this grouping
    if cfg.limit_per_class:
        keep = (
            table[table["error"].isna()]
            .sample(frac=1.0, random_state=cfg.seed)
            .groupby("class_name")
            .head(cfg.limit_per_class)
        )
        table = table[table["path"].isin(set(keep["path"])) | table["error"].notna()].reset_index(drop=True)
    good = table[table["error"].isna()].reset_index(drop=True)
    kw = {} if cfg.max_hamming is None else {"max_hamming": cfg.max_hamming}
    # Duplicates are found across all sources at once: a copy in another source is still a copy.
    return Grouping(grouping_key(cfg), cat, table, split.find_duplicate_groups(good, **kw))


def cv_folds(cfg: TrainConfig, good: pd.DataFrame, groups: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """Cross-validation fold of each decoded file (-1: never held out, always trained on) and the folds'
    names: ``cv_folds`` group folds (:func:`split.assign_folds`, named fold-K), or one fold per source
    (:func:`split.source_folds`, named by source key, sorted). ``cv_sources`` limits the files held out
    to those sources; the other sources always train."""
    keys = sorted(good["source"].astype(str).unique()) if "source" in good.columns else []
    wanted = cfg.cv_sources or []
    wanted = comma_list(wanted) if isinstance(wanted, str) else wanted  # "A,B" from a YAML file or code
    chosen = [resolve_source(s, keys, "--cv-sources") for s in wanted]
    if cfg.cv_by == "source":
        names = sorted(set(chosen or keys))
        if len(keys) < 2:
            raise ValueError(f"leave-one-source-out needs at least 2 sources, have {keys}")
        return split.source_folds(good, names), names
    scope = good["source"].astype(str).isin(chosen).to_numpy() if chosen else None
    folds = split.assign_folds(good, groups, cfg.cv_folds, seed=cfg.seed, scope=scope)
    return folds, [f"fold-{k}" for k in range(cfg.cv_folds)]


def prepare_split(cfg: TrainConfig, grouping: Grouping | None = None) -> SplitData:
    """Catalogue, group and split by group (``grouping``: the first two done already, e.g. by a
    cross-validation driver for all its folds, else computed here). With ``holdout_source`` the held-out source is the test split;
    with ``cv_fold`` that cross-validation fold is (both through :func:`split.holdout_split`: train/val
    files duplicating a held-out file are dropped; the rest is split train/val).
    """
    check_cv(cfg)
    key = grouping_key(cfg)
    grouping = grouping or group_data(cfg)
    if grouping.key != key:
        raise ValueError(f"the grouping given was made for other data or options: {grouping.key} != {key}")
    table, good, groups = grouping.table, grouping.good, grouping.groups
    held, holdout = None, None
    if cfg.holdout_source:
        src = resolve_source(cfg.holdout_source, table["source"].astype(str).tolist())
        held, holdout, what = (good["source"] == src).to_numpy(), {"source": src}, repr(src)
        if held.all() or not held.any():
            raise ValueError(f"--holdout-source {src!r}: need decoded files in it and in another source")
    elif cfg.cv_fold is not None:
        folds, names = cv_folds(cfg, good, groups)
        if cfg.cv_fold >= len(names):
            raise ValueError(f"cv_fold {cfg.cv_fold}: there are {len(names)} folds {names}")
        name = names[cfg.cv_fold]
        held, what = folds == cfg.cv_fold, f"cross-validation fold {cfg.cv_fold} of {len(names)} ({name})"
        holdout = {"source": name if cfg.cv_by == "source" else None}
        holdout["cv"] = {"fold": cfg.cv_fold, "folds": len(names), "by": cfg.cv_by, "name": name}
        if not held.any():
            raise ValueError(f"{what} holds no decoded file")
    if held is not None:
        splits, dropped = split.holdout_split(good, groups, held, fractions=cfg.split, seed=cfg.seed)
        holdout = {**holdout, "dropped_duplicates": dropped}
        if good.loc[np.isin(splits, ["train", "val"]), "label"].nunique() < 2:
            raise ValueError(f"holding out {what} leaves a single class to train on")
        print(
            f"[raytumor] {'leave-one-source-out' if cfg.holdout_source else 'held out'}: {int(held.sum())} "
            f"files of {what} are the test split; {dropped} train/val files that duplicate them dropped"
        )
    else:
        splits = split.split_groups(good, groups, fractions=cfg.split, seed=cfg.seed)
    dup = split.duplicate_report(good, groups)
    good["group"], good["split"] = groups, splits
    manifest = table.merge(good[["path", "group", "split"]], on="path", how="left")
    manifest["split"] = manifest["split"].fillna("rejected")
    manifest["group"] = manifest["group"].fillna(-1).astype(np.int64)
    dup_table = split.duplicate_groups_table(good, groups)
    cat = grouping.catalogue
    return SplitData(cat, manifest, dup, dup_table, cat.classes, cat.negative_class, holdout)


def check_metric(metric: str, val_files: pd.DataFrame) -> None:
    """Fail before training when a cross-source metric cannot be reported (it needs ≥ 2 val sources)."""
    if not metric.startswith("val_source"):
        return
    n = val_files["source"].nunique() if "source" in val_files.columns else 1
    if n < 2:
        raise ValueError(
            f"metric {metric} needs validation files from at least 2 sources (have {n}): give --data "
            "more than once, or a manifest with a source column"
        )


MAX_SOURCE_REPEAT = 8.0


def balance_sources(files: pd.DataFrame, share: float, seed: int) -> pd.DataFrame:
    """Training rows with the smaller sources' files repeated until each source has at least ``share`` of the
    largest source's count (at most MAX_SOURCE_REPEAT times; the fractional part a seeded sample), so no
    source dominates an epoch by size alone. Repeats are augmented afresh, so they are not copies."""
    if share <= 0 or "source" not in files.columns or files["source"].nunique() < 2:
        return files
    sizes = files.groupby("source").size()
    target = share * sizes.max()
    parts = []
    for _, g in files.groupby("source", sort=True):
        reps = min(MAX_SOURCE_REPEAT, max(1.0, target / len(g)))
        whole, frac = int(reps), reps - int(reps)
        parts += [g] * whole
        if frac > 0:
            parts.append(g.sample(frac=frac, random_state=seed))
    out = pd.concat(parts, ignore_index=True)
    print(
        "[raytumor] --balance-sources: training rows per source "
        + ", ".join(f"{k} {sizes[k]} -> {int((out['source'] == k).sum())}" for k in sizes.index)
    )
    return out


def keep_decoded(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The rows that decoded (a vectorised filter: Ray Data's row-wise ``filter(fn)`` is slower and warns)."""
    keep = ok_mask(batch["error"])
    return batch if keep.all() else {k: v[keep] for k, v in batch.items()}


def augment_placement(cfg: TrainConfig, use_gpu: bool) -> str:
    """Where ``--augment-in auto`` runs the augmentation: in Ray Data tasks for GPU workers (the CPUs are
    free for it while the GPU trains), inside the worker on CPUs. A CPU worker's torch threads span every
    core, so augmentation tasks running beside it make each parallel op wait for a preempted thread: Lite0
    trained at 0.82-0.88x a plain loop that way (bench/train_overhead.py), with the same total CPU work."""
    if cfg.augment_in != "auto":
        return cfg.augment_in
    return "data" if use_gpu else "worker"


def augment_kwargs(cfg: TrainConfig) -> dict[str, Any]:
    """``augment_batch`` keyword arguments of a run: the same wherever it runs."""
    aug = AugmentConfig(strength=cfg.augment_strength, shift=cfg.shift_augment)
    return {"image_size": cfg.image_size, "config": aug.to_dict()}


def resolve_augment_in(cfg: TrainConfig) -> str:
    """``augment_placement`` for this run's workers on the connected cluster (not asked once pinned)."""
    if cfg.augment_in != "auto":
        return cfg.augment_in
    return augment_placement(cfg, train_resources(cfg.num_workers, cfg.use_gpu, cfg.cpus_per_worker).use_gpu)


def pin_augment_in(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with ``augment_in`` decided once, before the datasets and the trainer are built: both ask
    where augmentation runs, and a GPU node joining between the two questions would otherwise give a
    dataset that skipped augmentation to workers that skip it too (an unaugmented run, silently)."""
    return replace(cfg, augment_in=resolve_augment_in(cfg))


def build_datasets(train_files: pd.DataFrame, val_files: pd.DataFrame, cfg: TrainConfig) -> tuple[Any, Any]:
    """Ray datasets for one training run: decoded (and preprocessed) once at store size, augmented afresh
    each epoch (by Ray Data, or by the workers themselves: :func:`resolve_augment_in`)."""
    storage = StorageOptions.from_env(cfg.s3_endpoint)
    image_size, seed = cfg.image_size, cfg.seed
    prep = parse_spec(cfg.preprocess).to_dict()

    def indexed(df: pd.DataFrame, shuffle: bool) -> pd.DataFrame:
        # Integer source ids (sorted keys) for the per-source validation metrics; 0 without a source column.
        src = pd.factorize(df["source"], sort=True)[0] if "source" in df.columns else np.zeros(len(df))
        df = df[["path", "label"]].assign(source_idx=np.asarray(src, dtype=np.int64))
        if shuffle:  # mix classes across blocks so block-order randomisation gives mixed batches
            df = df.sample(frac=1.0, random_state=seed)
        df = df.reset_index(drop=True)
        df["idx"] = np.arange(len(df), dtype=np.int64)
        return df

    train_files = balance_sources(train_files, cfg.balance_sources, seed)
    train_base = decode_dataset(
        indexed(train_files, True),
        storage=storage,
        image_size=store_size(image_size),
        fingerprints=False,
        preprocess=prep,
    )
    train_base = (
        train_base.map_batches(keep_decoded, batch_format="numpy")
        .select_columns(["image", "label"])
        .materialize()
    )
    train_ds = train_base.randomize_block_order()
    if resolve_augment_in(cfg) == "data":
        train_ds = train_ds.map_batches(
            augment_batch, fn_kwargs=augment_kwargs(cfg), batch_size=64, batch_format="numpy"
        )
    val_ds = decode_dataset(
        indexed(val_files, False), storage=storage, image_size=image_size, fingerprints=False, preprocess=prep
    )
    val_ds = (
        val_ds.map_batches(keep_decoded, batch_format="numpy")
        .select_columns(["image", "label", "idx", "source_idx"])
        .materialize()
    )
    return train_ds, val_ds
