"""Ablation: what each source-shift technique buys on another hospital's scans (issue 6).

Trains on br35h-3000 (same leakage-safe split, seed, backbone, epochs and early stopping for every row),
then scores, through ``raytumor score`` exactly as a user would:

* the in-source held-out test split (ROC-AUC, accuracy at the bundle's operating threshold), and
* the healthy IXI set from another hospital (420 axial PNG slices: slice specificity; 42 real T1
  ``.nii.gz`` volumes scored volume-level: volume specificity), at the bundle's threshold.

Rows are cumulative: baseline -> +crop to head -> +intensity standardisation -> +shift augmentation ->
+AdaBN (test-time, on each archive being scored) -> +flip TTA. Side rows (below the line in the table)
reuse a trained model: flip TTA without AdaBN, and the baseline with a shorter volume slice range (a
sensitivity check of the volume rule, chosen knowing where IXI's false positives are: not a fair result).
IXI slice false positives are also split by level: the 3 lowest of each subject's 10 PNG slices (temporal
lobes, posterior fossa, orbits: anatomy Br35H's negatives rarely show) against the 7 above.

The last rows add *local healthy scans* (no longer an unseen source): IXI's subjects are split in two folds
by patient, each model trains on br35h-3000 plus one fold's PNG slices (the training split takes its share
of them; one patient never straddles splits) and scores the other fold's slices and volumes; both folds'
outputs are pooled, so each subject is scored by a model that never saw it. Because every IXI scan is
healthy, such a model could learn "looks like IXI = healthy"; each row's in-source test is therefore also
scored in IXI's style (grey, IXI's resolution: longer side 120 px, and IXI's intensity histogram), where
that shortcut would cost sensitivity. Run::

    python bench/source_shift_ablation.py --out /tmp/ablation          # ~3.5 h on 2 idle CPU cores

It prints a Markdown table and writes ``OUT/ablation.json``; ``--only`` picks rows, and finished
rows are reused on a rerun (delete ``OUT/<row>`` to redo one).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"

# name -> (preprocess, shift_augment, adapt, tta, trained model of which row, volume depth in mm or None)
ROWS: dict[str, tuple[str, float, str, str, str, float | None]] = {
    "baseline": ("none", 0.0, "none", "none", "baseline", None),
    "+crop": ("crop", 0.0, "none", "none", "+crop", None),
    "+zscore": ("crop,zscore", 0.0, "none", "none", "+zscore", None),
    "+shift-aug": ("crop,zscore", 1.0, "none", "none", "+shift-aug", None),
    "+adabn": ("crop,zscore", 1.0, "adabn", "none", "+shift-aug", None),
    "+tta": ("crop,zscore", 1.0, "adabn", "flip", "+shift-aug", None),
    # side rows: not cumulative
    "shift-aug +tta only": ("crop,zscore", 1.0, "none", "flip", "+shift-aug", None),
    "baseline +tta only": ("none", 0.0, "none", "flip", "baseline", None),
    "baseline volumes 10-75 mm": ("none", 0.0, "none", "none", "baseline", 75.0),
    "baseline leaky split": ("none", 0.0, "none", "none", "baseline leaky split", None),
}
SIDE_ROWS = (
    "shift-aug +tta only",
    "baseline +tta only",
    "baseline volumes 10-75 mm",
    "baseline leaky split",
)
# Trained on a split that groups exact duplicates only (sha256), as a plain PyTorch script would: Br35H's
# contrast/sharpness variants of one slice then straddle train and test. Shows what "in-source AUC" means
# without near-duplicate grouping; never an option of the product.
LEAKY_ROWS = ("baseline leaky split",)
LOW_SLICES = 3  # per IXI subject: the lowest 3 of its 10 PNG slices
# Rows that add healthy slices of the target site to training: IXI's 42 subjects are split in two folds by
# patient; a model trained on br35h-3000 + one fold's PNG slices (all levels) scores the other fold's slices
# and volumes, and the two folds' outputs are pooled (every subject scored by a model that never saw it).
# name -> preprocess, shift augmentation, what the fold contributes: "png" (the dataset's 10 PNG slices per
# subject) or "volumes" (its NIfTI volumes through `raytumor slices`: every 6 mm over the scoring range, the
# product's workflow). Not an unseen source any more: "a few local healthy scans".
LOCAL_ROWS: dict[str, tuple[str, float, str]] = {
    "baseline +local healthy slices (2-fold)": ("none", 0.0, "png"),
    "baseline +local healthy volumes (2-fold)": ("none", 0.0, "volumes"),
}
FOLDS = 2
# Each row's in-source test split is also scored in IXI's style (grey, longer side 120 px like IXI's slices,
# histogram matched to IXI's): a model that learned "looks like IXI = healthy" from the local rows loses
# sensitivity there, beyond what the baseline loses.
IXI_STYLE_SIDE = 120


def _fmt(v: float | None) -> str:
    return "?" if v is None else f"{v:.3f}"


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name.strip("+")).strip("_") or "baseline"


def _exact_duplicate_groups(df: pd.DataFrame, **_: Any) -> np.ndarray:
    """Group ids from identical sha256 only (rows without one are their own group)."""
    keys = [s if isinstance(s, str) and s else f"row {i}" for i, s in enumerate(df["sha256"])]
    return pd.factorize(pd.Series(keys, dtype=object))[0].astype(np.int64)


def train_row(
    args: argparse.Namespace,
    name: str,
    extra_data: list[str] | None = None,
    run_name: str | None = None,
    spec: tuple[str, float] | None = None,
) -> Path:
    from raytumor.train import TrainConfig, run_training

    prep, shift = spec if spec is not None else ROWS[name][:2]
    run_name = run_name or _slug(name)
    run_dir = Path(args.out) / "runs" / run_name
    if (run_dir / "summary.json").is_file():
        return run_dir / "bundle"
    cfg = TrainConfig(
        data=[str(args.data), *(extra_data or [])],
        out=str(Path(args.out) / "runs"),
        name=run_name,
        backbone=args.backbone,
        image_size=args.image_size,
        epochs=args.epochs,
        patience=args.patience,
        seed=args.seed,
        preprocess=prep,
        shift_augment=shift,
        report=False,
    )
    t0 = time.time()
    from raytumor import split

    grouping = split.find_duplicate_groups
    if name in LEAKY_ROWS:  # for this row only: later rows in the same process group near-duplicates again
        split.find_duplicate_groups = _exact_duplicate_groups
    try:
        summary = run_training(cfg)
    finally:
        split.find_duplicate_groups = grouping
    print(f"[ablation] trained {run_name} in {time.time() - t0:.0f} s: test {summary['test']}", flush=True)
    return run_dir / "bundle"


def score_set(
    bundle: Path, source: str, out: Path, adapt: str, tta: str, depth_mm: float | None = None
) -> pd.DataFrame:
    from raytumor.results import read_scores
    from raytumor.score import ScoreConfig, score

    if not (out / "summary.json").is_file():
        cfg = ScoreConfig(bundle=str(bundle), input=source, output=str(out), adapt=adapt, tta=tta)
        if depth_mm is not None:
            cfg.volume_depth_mm = depth_mm
        score(cfg)
    return read_scores(str(out))


def in_source_metrics(bundle: Path, scores: pd.DataFrame, manifest: pd.DataFrame) -> dict[str, Any]:
    from raytumor.bundle import read_meta
    from raytumor.metrics import compute_metrics

    meta = read_meta(bundle)
    truth = manifest[["path", "label"]].rename(columns={"label": "truth"})  # scores have a `label` too
    df = scores.merge(truth, on="path", how="inner")
    if len(df) != len(truth):
        raise RuntimeError(f"{len(truth)} test files but {len(df)} score rows matched them")
    df = df[df["error"].isna()]
    probs = df[[f"prob_{c}" for c in meta.classes]].to_numpy(np.float32)
    m = compute_metrics(df["truth"].to_numpy(), probs, meta.classes, meta.negative_class, meta.threshold)
    return {
        "n": m["n"],
        "roc_auc": m.get("roc_auc"),
        "accuracy": m.get("accuracy"),
        "sensitivity": m.get("sensitivity"),
        "specificity": m.get("specificity"),
        "threshold": meta.threshold,
    }


def _head_mask(px: np.ndarray) -> np.ndarray:
    # Above 10 % of the bright end: the head, not the (differently sized) background.
    return px > 0.1 * np.percentile(px, 99)


def _ixi_reference(ixi_dir: str) -> np.ndarray:
    """Head pixels of all IXI PNG slices, (1, N): the histogram the IXI-style copies are matched to."""
    from PIL import Image

    pxs = [np.asarray(Image.open(f).convert("L")) for f in sorted((Path(ixi_dir) / "no_tumor").glob("*.png"))]
    return np.concatenate([p[_head_mask(p)] for p in pxs])[None]


def _ixi_style_copies(manifest: pd.DataFrame, out: Path, reference: np.ndarray) -> pd.DataFrame:
    """Grey PNG copies of the test files in IXI's style: longer side IXI_STYLE_SIDE px, IXI's histogram."""
    from PIL import Image
    from skimage.exposure import match_histograms

    rows = []
    for i, (path, label) in enumerate(zip(manifest["path"], manifest["label"], strict=True)):
        dst = out / f"{i:05d}_{Path(path).stem}.png"
        if not dst.is_file():
            img = Image.open(path).convert("L")
            img.thumbnail((IXI_STYLE_SIDE, IXI_STYLE_SIDE), Image.Resampling.LANCZOS)
            px = np.asarray(img).copy()
            head = _head_mask(px)  # only the head is matched: background shares differ between sources
            px[head] = np.clip(np.rint(match_histograms(px[head][None], reference)[0]), 0, 255)
            dst.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(px).save(dst)
        rows.append((str(dst), label))
    return pd.DataFrame(rows, columns=["path", "label"])


def in_source_rows(
    bundle: Path, data_root: str, scores_dir: Path, adapt: str, tta: str, reference: np.ndarray
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Metrics on the run's held-out br35h test files, as they are and in IXI's style."""
    run_dir = bundle.parent
    test = pd.read_parquet(run_dir / "split_manifest.parquet")
    root = str(Path(data_root).resolve())
    # Only the in-source files: the local rows' test split also holds IXI subjects of the training fold.
    test = test[
        (test["split"] == "test") & test["path"].map(lambda p: str(Path(p).resolve()).startswith(root))
    ]
    tm = scores_dir / "test_manifest.csv"
    tm.parent.mkdir(parents=True, exist_ok=True)
    test[["path"]].to_csv(tm, index=False)
    ins = in_source_metrics(bundle, score_set(bundle, str(tm), scores_dir / "test", adapt, tta), test)
    styled = _ixi_style_copies(test, scores_dir / "ixi_style_files", reference)
    sm = scores_dir / "ixi_style_manifest.csv"
    styled[["path"]].to_csv(sm, index=False)
    ixi_style = in_source_metrics(
        bundle, score_set(bundle, str(sm), scores_dir / "ixi_style", adapt, tta), styled
    )
    return ins, ixi_style


def ixi_inputs(args: argparse.Namespace) -> pd.DataFrame:
    """IXI's manifest with absolute paths and each subject's fold (seeded permutation of the subjects)."""
    ixi_in = Path(args.ixi)
    df = pd.read_csv(ixi_in / "manifest.csv", dtype=str)
    df["path"] = [str((ixi_in / p).resolve()) for p in df["path"]]
    subjects = np.array(sorted(df["patient_id"].unique()))
    order = subjects[np.random.default_rng(args.seed).permutation(len(subjects))]
    df["fold"] = df["patient_id"].map(dict(zip(order, np.arange(len(order)) % FOLDS, strict=True)))
    return df


def local_healthy_row(
    args: argparse.Namespace, name: str, out: Path, reference: np.ndarray
) -> dict[str, Any]:
    """Train one model per fold on br35h + that fold's IXI scans; score the other fold's IXI files."""
    from raytumor.slices import SlicesConfig, export_slices

    prep, shift, what = LOCAL_ROWS[name]
    ixi = ixi_inputs(args)
    scores, folds = [], []
    for k in range(FOLDS):
        slug = f"{_slug(name)}_fold{k}"
        scores_dir = out / "scores" / slug
        scores_dir.mkdir(parents=True, exist_ok=True)
        fold = ixi[ixi["fold"] == k]
        train_csv = scores_dir / "ixi_train_fold.csv"
        # Labelled with the training set's negative class name (IXI's manifest says no_tumor).
        if what == "png":
            fold = fold[fold["path"].str.endswith(".png")]
            fold.assign(label="no")[["path", "label", "patient_id", "source"]].to_csv(train_csv, index=False)
        else:
            vols = scores_dir / "ixi_train_volumes.csv"
            fold[fold["path"].str.endswith(".nii.gz")][["path"]].to_csv(vols, index=False)
            if not (scores_dir / "slices" / "manifest.csv").is_file():
                export_slices(
                    SlicesConfig(input=[str(vols)], out=str(scores_dir / "slices"), label="no",
                                 source="IXI local", patient_pattern=r"^(IXI\d+)")
                )  # fmt: skip
            train_csv = scores_dir / "slices" / "manifest.csv"
        bundle = train_row(args, name, [str(train_csv)], slug, (prep, shift))
        held = scores_dir / "ixi_heldout.csv"
        ixi[ixi["fold"] != k][["path"]].to_csv(held, index=False)
        scores.append(score_set(bundle, str(held), scores_dir / "ixi_heldout", "none", "none"))
        ins, ixi_style = in_source_rows(bundle, args.data, scores_dir, "none", "none", reference)
        folds.append(
            {
                "bundle": str(bundle),
                "fold_subjects": int(fold["patient_id"].nunique()),
                "fold_training_files": int(len(pd.read_csv(train_csv))),
                "in_source": ins,
                "ixi_style": ixi_style,
            }
        )
    # Per-fold thresholds differ; each fold's rows carry labels at its own bundle's threshold.
    ixi_m = ixi_metrics(Path(folds[0]["bundle"]), pd.concat(scores, ignore_index=True))
    mean = {
        k: float(np.mean([f[part][k] for f in folds]))
        for part in ("in_source",)
        for k in ("roc_auc", "accuracy", "sensitivity", "specificity", "threshold")
    }
    ixi_style_mean = {
        k: float(np.mean([f["ixi_style"][k] for f in folds]))
        for k in ("roc_auc", "sensitivity", "specificity")
    }
    return {
        "preprocess": prep,
        "shift_augment": shift,
        "adapt": "none",
        "tta": "none",
        "volume_depth_mm": None,
        "in_source": mean,
        "ixi_style": ixi_style_mean,
        "ixi": ixi_m,
        "folds": folds,
    }


def ixi_metrics(bundle: Path, scores: pd.DataFrame) -> dict[str, Any]:
    from raytumor.bundle import read_meta

    neg = read_meta(bundle).negative_class
    ok = scores[scores["error"].isna()]
    sl, vol = ok[ok["kind"] == "image"], ok[ok["kind"] == "volume"]
    # Level of each PNG slice within its subject (files are SUBJECT_axNNN.png, NNN = axial index).
    parts = sl["path"].str.extract(r"(?P<subject>[^/]+)_ax(?P<z>\d+)\.png$")
    low = parts.assign(z=parts["z"].astype(float)).groupby("subject")["z"].rank(method="first") <= LOW_SLICES
    fp = sl["label"] != neg
    return {
        "slices": int(len(sl)),
        "slice_fp": int((sl["label"] != neg).sum()),
        "slice_specificity": float((sl["label"] == neg).mean()) if len(sl) else None,
        "slice_fp_low": int((fp & low).sum()),
        "slices_low": int(low.sum()),
        "slice_fp_upper": int((fp & ~low).sum()),
        "slices_upper": int((~low).sum()),
        "volumes": int(len(vol)),
        "volume_fp": int((vol["label"] != neg).sum()),
        "volume_specificity": float((vol["label"] == neg).mean()) if len(vol) else None,
        "errors": int(scores["error"].notna().sum()),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(DATA / "br35h-3000"))
    p.add_argument("--ixi", default=str(DATA / "ixi-t1-nichart-42"))
    p.add_argument("--out", default="/tmp/ablation")
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--image-size", type=int, default=160)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--patience", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", default=None, help="comma list of rows (default: all)")
    args = p.parse_args()

    from raytumor.runtime import init_ray

    init_ray()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ixi_in = Path(args.ixi)
    # IXI: the PNG slices and the NIfTI volumes (the manifest/PROVENANCE are not scans: listed, skipped).
    ixi_dirs = [str(ixi_in / "no_tumor"), str(ixi_in / "nifti")]
    all_rows = [*ROWS, *LOCAL_ROWS]
    names = all_rows if args.only is None else [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in all_rows]
    if unknown:
        p.error(f"unknown rows {unknown}; rows: {all_rows}")
    reference = _ixi_reference(args.ixi)
    results: dict[str, Any] = {}
    res_file = out / "ablation.json"
    if res_file.is_file():
        results = json.loads(res_file.read_text())
    for name in names:
        t0 = time.time()
        if name in LOCAL_ROWS:
            row = local_healthy_row(args, name, out, reference)
        else:
            prep, shift, adapt, tta, model_row, depth = ROWS[name]
            bundle = train_row(args, model_row)
            scores_dir = out / "scores" / _slug(name)
            ins, ixi_style = in_source_rows(bundle, args.data, scores_dir, adapt, tta, reference)
            ixi = pd.concat(
                [
                    score_set(bundle, src, scores_dir / f"ixi_{Path(src).name}", adapt, tta, depth)
                    for src in ixi_dirs
                ],
                ignore_index=True,
            )
            row = {
                "preprocess": prep,
                "shift_augment": shift,
                "adapt": adapt,
                "tta": tta,
                "volume_depth_mm": depth,
                "in_source": ins,
                "ixi_style": ixi_style,
                "ixi": ixi_metrics(bundle, ixi),
                "bundle": str(bundle),
            }
        row["seconds"] = round(time.time() - t0, 1)
        results[name] = row
        res_file.write_text(json.dumps(results, indent=2) + "\n")
        print(f"[ablation] {name}: {json.dumps(row)}", flush=True)

    lines = [
        "| row | preprocess | shift aug | adaptation | in-source AUC | in-source acc | in-source sens "
        "| sens in IXI style | threshold | IXI slice spec (FP/420) "
        "| slice FP lowest 3 / upper 7 per subject | IXI volume spec (FP/42) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    blank = " |" * 12
    for name in [n for n in all_rows if n in results]:
        if name in SIDE_ROWS and not any("*side rows*" in x for x in lines):
            lines.append("| *side rows*" + blank)
        if name in LOCAL_ROWS and not any("*local healthy" in x for x in lines):
            lines.append(f"| *local healthy scans ({FOLDS}-fold by IXI subject; means over folds)*" + blank)
        r = results[name]
        i, x, lo = r["in_source"], r["ixi"], r.get("ixi_style") or {}
        ada = "+".join(a for a in (r["adapt"], "tta-" + r["tta"]) if a not in ("none", "tta-none")) or "none"
        lines.append(
            f"| {name} | {r['preprocess']} | {r['shift_augment']:g} | {ada} | {i['roc_auc']:.3f} "
            f"| {i['accuracy']:.3f} | {_fmt(i.get('sensitivity'))} | {_fmt(lo.get('sensitivity'))} "
            f"| {i['threshold']:.3f} | {x['slice_specificity']:.3f} ({x['slice_fp']}) "
            f"| {x.get('slice_fp_low', '?')}/{x.get('slices_low', '?')} / "
            f"{x.get('slice_fp_upper', '?')}/{x.get('slices_upper', '?')} "
            f"| {x['volume_specificity']:.3f} ({x['volume_fp']}) |"
        )
    table = "\n".join(lines)
    (out / "ablation.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
