"""Training data: catalogue every source once, group duplicates and patients, split by group, and build
the Ray datasets (decoded once at store size, augmented afresh each epoch)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from raytumor import split
from raytumor.augment import AugmentConfig, augment_batch, store_size
from raytumor.ingest import Catalogue, build_catalogue, decode_dataset
from raytumor.preprocess import parse_spec
from raytumor.scan import has_error
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
    holdout: dict[str, Any] | None = None  # {"source": key, "dropped_duplicates": n} when leaving one out

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


def resolve_source(name: str, keys: list[str]) -> str:
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
    raise ValueError(f"--holdout-source {name!r} {why}; sources: {keys}")


def prepare_split(cfg: TrainConfig) -> SplitData:
    """Catalogue (decode + fingerprint every file of every source), group duplicates and patients, split
    by group; with ``holdout_source`` the held-out source is the test split (:func:`split.holdout_split`).
    """
    if not cfg.data or not all(cfg.data):
        raise ValueError(f"no data source given: {cfg.data}")
    storage = StorageOptions.from_env(cfg.s3_endpoint)
    # Several sources are listed together (ingest.list_labelled), so classes are laid out over their union
    # and a single-class source (a folder of healthy scans) joins the others.
    cat = build_catalogue(cfg.data, storage, cfg.class_order)
    table = cat.table.copy()
    if cfg.limit_per_class:
        keep = (
            table[table["error"].isna()]
            .sample(frac=1.0, random_state=cfg.seed)
            .groupby("class_name")
            .head(cfg.limit_per_class)
        )
        table = table[table["path"].isin(set(keep["path"])) | table["error"].notna()].reset_index(drop=True)
    ok = table["error"].isna().to_numpy()
    good = table[ok].reset_index(drop=True)
    kw = {} if cfg.max_hamming is None else {"max_hamming": cfg.max_hamming}
    # Duplicates are found across all sources at once: a copy in another source is still a copy.
    groups = split.find_duplicate_groups(good, **kw)
    holdout = None
    if cfg.holdout_source:
        key = resolve_source(cfg.holdout_source, table["source"].astype(str).tolist())
        held = (good["source"] == key).to_numpy()
        if held.all() or not held.any():
            raise ValueError(f"--holdout-source {key!r}: need decoded files in it and in another source")
        splits, dropped = split.holdout_split(good, groups, held, fractions=cfg.split, seed=cfg.seed)
        holdout = {"source": key, "dropped_duplicates": dropped}
        if good.loc[np.isin(splits, ["train", "val"]), "label"].nunique() < 2:
            raise ValueError(f"holding out {key!r} leaves a single class to train on")
        print(
            f"[raytumor] leave-one-source-out: {int(held.sum())} files of {key!r} are the test split; "
            f"{dropped} train/val files that duplicate them dropped"
        )
    else:
        splits = split.split_groups(good, groups, fractions=cfg.split, seed=cfg.seed)
    dup = split.duplicate_report(good, groups)
    good["group"], good["split"] = groups, splits
    manifest = table.merge(good[["path", "group", "split"]], on="path", how="left")
    manifest["split"] = manifest["split"].fillna("rejected")
    manifest["group"] = manifest["group"].fillna(-1).astype(np.int64)
    dup_table = split.duplicate_groups_table(good, groups)
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


def build_datasets(train_files: pd.DataFrame, val_files: pd.DataFrame, cfg: TrainConfig) -> tuple[Any, Any]:
    """Ray datasets for one training run: decoded (and preprocessed) once at store size, augmented afresh
    each epoch."""
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

    aug = AugmentConfig(strength=cfg.augment_strength, shift=cfg.shift_augment)
    train_base = decode_dataset(
        indexed(train_files, True),
        storage=storage,
        image_size=store_size(image_size),
        fingerprints=False,
        preprocess=prep,
    )
    train_base = (
        train_base.filter(lambda r: not has_error(r["error"]))
        .select_columns(["image", "label"])
        .materialize()
    )
    train_ds = train_base.randomize_block_order().map_batches(
        augment_batch,
        fn_kwargs={"image_size": image_size, "config": aug.to_dict()},
        batch_size=64,
        batch_format="numpy",
    )
    val_ds = decode_dataset(
        indexed(val_files, False), storage=storage, image_size=image_size, fingerprints=False, preprocess=prep
    )
    val_ds = (
        val_ds.filter(lambda r: not has_error(r["error"]))
        .select_columns(["image", "label", "idx", "source_idx"])
        .materialize()
    )
    return train_ds, val_ds
