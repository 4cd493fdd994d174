"""Does the multi-source recipe hold up on sources it never saw? (issue 13)

One leave-one-site-out fold per run of this script, through the product's own commands (``raytumor
slices``, ``train``, ``score``), so every number is what a user would get:

* **training**: br35h-3000 + tcga-lgg-3site (all sites but ``--holdout-site``) + healthy IXI axial slices of
  half the IXI subjects (fold A, ``raytumor slices``); the view head learns from fold A's slices in all three
  planes (``--view-data``); the held-out TCGA site is the test split (``--holdout-source``);
* **held-out TCGA site**: slice ROC-AUC per sequence (FLAIR, post-contrast T1), all rows and in-scope rows;
* **IXI fold B** (subjects never trained on): slices in all three planes scored by ``raytumor score``:
  specificity among in-scope slices, the share of coronal/sagittal slices kept out of scope, the view
  head's accuracy per plane; fold B's NIfTI volumes: volume specificity;
* **view head** on 2-D files of known view: share called axial on br35h-3000 and on the held-out site;
* **OOD**: a corpus of inputs that are not brain MRI (skimage photographs and documents, pydicom's CT /
  ultrasound / nuclear-medicine / secondary-capture sample files both as DICOM and as bare PNG pixels so the
  modality rule cannot help, rendered text, noise, IXI neck slices below the skull base) and the held-out
  site's in-distribution slices: share flagged by the OOD score alone and out of scope for any reason.

Run (a fold takes ~1 h on 2 idle CPU cores at the defaults)::

    python bench/generalisation.py --out /tmp/gen --holdout-site DU
    python bench/generalisation.py --out /tmp/gen --holdout-site CS --metric val_roc_auc

Each step is skipped when its output exists (delete it to redo); the numbers go to ``OUT/<fold>/result.json``
and are printed as Markdown.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
BR35H = DATA / "br35h-3000"
TCGA = DATA / "tcga-lgg-3site" / "manifest.csv"
IXI = DATA / "ixi-t1-nichart-42" / "nifti"
SOURCES = ("br35h", "tcga", "ixi")


def ixi_folds() -> tuple[list[Path], list[Path]]:
    """IXI subjects in two folds (alternating in sorted order): A trains, B is never seen."""
    vols = sorted(IXI.glob("*.nii.gz"))
    return vols[0::2], vols[1::2]


def slices(
    out: Path,
    volumes: list[Path],
    planes: str,
    every_mm: float = 6.0,
    pattern: str = r"^(IXI\d+)",
    label: str = "no",
    source: str = "IXI",
    depth_mm: float = 110.0,
) -> Path:
    from raytumor.slices import SlicesConfig, export_slices

    manifest = out / "manifest.csv"
    if not manifest.is_file():
        listing = out.parent / f"{out.name}_inputs.txt"
        listing.parent.mkdir(parents=True, exist_ok=True)
        listing.write_text("\n".join(str(v) for v in volumes) + "\n")
        export_slices(
            SlicesConfig(
                input=[str(listing)], out=str(out), label=label, source=source,
                patient_pattern=pattern, every_mm=every_mm, planes=planes.split(","), depth_mm=depth_mm,
            )
        )  # fmt: skip
    return manifest


def tcga_volumes(out: Path, sites: list[str]) -> list[Path]:
    """Each training-site patient's FLAIR and post-contrast T1 stacks as RAS NIfTI volumes, so their slices
    cut along each axis teach the view head those sequences' look (IXI is T1 only). The stacks are axial
    256 x 256 JPEG slices from the skull base up; in-plane spacing is taken as 0.94 mm and the slice
    spacing as 150 mm over the stack (they run skull base to vertex), clipped to 2-6.5 mm: the view head
    needs the anatomy's shape, not exact millimetres."""
    import nibabel as nib

    man = pd.read_csv(TCGA)
    man = man[man["site"].isin(sites)]
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for (pid, seq), g in man.groupby(["patient_id", "sequence"]):
        f = out / f"{pid}_{seq}.nii.gz"
        paths.append(f)
        if f.is_file():
            continue
        g = g.sort_values("slice_index")
        stack = [np.asarray(Image.open(TCGA.parent / p).convert("L")) for p in g["path"]]
        # image row = posterior-going, column = patient's left (radiological): RAS voxel [x, y] = I[H-1-y, W-1-x]
        vol = np.stack([np.ascontiguousarray(im[::-1, ::-1].T) for im in stack], axis=2)
        dz = float(np.clip(150.0 / len(stack), 2.0, 6.5))
        nib.save(nib.Nifti1Image(vol.astype(np.uint8), np.diag([0.94, 0.94, dz, 1.0])), str(f))
    return paths


def png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def ood_corpus(out: Path, ixi_b: list[Path]) -> Path:
    """Inputs that are not brain MRI, each in a subfolder naming its kind."""
    if out.is_dir():
        return out
    import nibabel as nib
    import pydicom
    import skimage.data as skd
    from pydicom.data import get_testdata_file

    from raytumor.scan import rescale_robust

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for kind in ("photo", "document", "dicom_other", "dicom_pixels", "noise", "neck"):
        (tmp / kind).mkdir(parents=True)
    for name in (
        "astronaut", "camera", "coffee", "chelsea", "rocket", "horse", "moon", "checkerboard", "clock",
        "coins", "grass", "gravel", "hubble_deep_field", "immunohistochemistry", "retina", "brick", "logo",
        "microaneurysms", "cell", "colorwheel", "cat", "binary_blobs",
    ):  # fmt: skip
        (tmp / "photo" / f"{name}.png").write_bytes(png(np.asarray(getattr(skd, name)(), dtype=np.uint8)))
    for name in ("page", "text"):
        (tmp / "document" / f"{name}.png").write_bytes(png(np.asarray(getattr(skd, name)(), dtype=np.uint8)))
    for i in range(10):
        img = Image.new("L", (400, 520), 255)
        d = ImageDraw.Draw(img)
        for line in range(24):
            d.text(
                (20, 14 + 20 * line),
                f"REPORT {i}-{line}: MRI brain w/o contrast. Impression: normal.",
                fill=0,
            )
        (tmp / "document" / f"report_{i}.png").write_bytes(png(np.asarray(img)))
    rng = np.random.default_rng(0)
    for i in range(10):
        a = (
            rng.integers(0, 256, (256, 256), dtype=np.uint8)
            if i % 2
            else (rng.random((64, 64)) * 255).astype(np.uint8)
        )
        (tmp / "noise" / f"noise_{i}.png").write_bytes(png(a))
    names = (
        "CT_small.dcm", "693_J2KI.dcm", "ExplVR_BigEnd.dcm", "JPEG2000.dcm", "JPGExtended.dcm",
        "SC_rgb_jpeg_dcmtk.dcm", "examples_ybr_color.dcm", "examples_palette.dcm", "rtdose.dcm",
        "liver_1frame.dcm", "image_dfl.dcm",
    )  # fmt: skip
    for name in names:
        f = Path(get_testdata_file(name))
        shutil.copy(f, tmp / "dicom_other" / name)
        ds = pydicom.dcmread(f)
        try:
            a = np.asarray(ds.pixel_array)
        except Exception:
            continue
        a = a[0] if a.ndim == 4 or (a.ndim == 3 and a.shape[-1] != 3) else a
        a = a.mean(-1) if a.ndim == 3 else a
        (tmp / "dicom_pixels" / f"{f.stem}.png").write_bytes(png(rescale_robust(a.astype(np.float32))))
    for v in ixi_b:  # two axial slices below the skull base of every fold-B subject
        a = np.asarray(nib.as_closest_canonical(nib.load(v)).dataobj, dtype=np.float32)
        head = (a > np.percentile(a, 99.5) * 0.05).mean((0, 1))
        z0 = int(np.flatnonzero(head > 0.05)[0])
        for z in (z0 + 1, z0 + 4):
            s = np.rot90(np.clip(a[:, :, z] / np.percentile(a, 99.5) * 255, 0, 255)).astype(np.uint8)
            (tmp / "neck" / f"{v.name.split('-')[0]}_z{z}.png").write_bytes(png(np.ascontiguousarray(s)))
    tmp.rename(out)
    return out


def score_folder(bundle: Path, inp: Path | str, out: Path) -> pd.DataFrame:
    from raytumor.results import read_scores
    from raytumor.score import ScoreConfig, score

    if not (out / "summary.json").is_file():
        score(ScoreConfig(bundle=str(bundle), input=str(inp), output=str(out), overwrite=True))
    return read_scores(str(out))


def auc(y: np.ndarray, s: np.ndarray) -> float | None:
    from raytumor.metrics import compute_metrics

    if len(np.unique(y)) < 2:
        return None
    probs = np.stack([1 - s, s], 1)
    return compute_metrics(y.astype(int), probs, ["no", "yes"], "no", 0.5).get("roc_auc")


def run(args: argparse.Namespace) -> dict[str, Any]:
    from raytumor.runtime import init_ray
    from raytumor.train import TrainConfig, run_training

    root = Path(args.out).resolve()
    sources = args.sources.split(",")
    fold = (
        f"loso-{args.holdout_site}-{args.metric}"
        + ("-tv" if args.tcga_views else "")
        + (f"-bal{args.balance_sources:g}" if args.balance_sources else "")
        + ("" if sources == list(SOURCES) else "-" + "+".join(sources))
        + (f"-{args.tag}" if args.tag else "")
    )
    work = root / fold
    work.mkdir(parents=True, exist_ok=True)
    init_ray()
    fold_a, fold_b = ixi_folds()
    ixi_axial = slices(root / "ixi_A_axial", fold_a, "axial")
    # down to the neck (--depth-mm 0): the view net learns "not_brain" from the axial cuts far below the vertex
    ixi_views = slices(root / "ixi_A_views_neck", fold_a, "axial,coronal,sagittal", depth_mm=0)
    ixi_b_views = slices(root / "ixi_B_views", fold_b, "axial,coronal,sagittal")
    train_sites = [x for x in ("CS", "DU", "EZ") if x != args.holdout_site]
    tcga_vols = tcga_volumes(root / "tcga_volumes", train_sites)
    tcga_views = slices(
        root / f"tcga_views_{''.join(train_sites)}",
        tcga_vols,
        "axial,coronal,sagittal",
        pattern=r"^(TCGA_\w\w_\d+)",
    )
    t0 = time.time()
    cfg = TrainConfig(
        data=[str(d) for k, d in (("br35h", BR35H), ("tcga", TCGA), ("ixi", ixi_axial)) if k in sources],
        holdout_source=f"tcga-lgg-{args.holdout_site}",
        view_data=[str(ixi_views)] + ([str(tcga_views)] if args.tcga_views else []),
        out=str(work), name="run", image_size=args.image_size, epochs=args.epochs, patience=args.patience,
        metric=args.metric, seed=args.seed, report=False, balance_sources=args.balance_sources,
        known_view=["tcga-lgg-*=axial"],  # PROVENANCE.md: axial stacks
    )  # fmt: skip
    run_dir = cfg.run_dir
    if not (run_dir / "summary.json").is_file():
        run_training(cfg)
    summary = json.loads((run_dir / "summary.json").read_text())
    bundle = run_dir / "bundle"
    meta = json.loads((bundle / "bundle.json").read_text())
    res: dict[str, Any] = {"fold": fold, "train_seconds": summary["wall_seconds"], "scope": meta["scope"]}
    res["view_head"] = meta["metrics"].get("view_head")
    res["ood_fit"] = meta["metrics"].get("ood")

    # held-out TCGA site, per sequence (the run's calibrated test predictions)
    tp = pd.read_parquet(run_dir / "test_predictions.parquet")
    man = pd.read_csv(TCGA)
    man["path"] = [str((TCGA.parent / p).resolve()) for p in man["path"]]
    tp["path_abs"] = [str(Path(p).resolve()) for p in tp["path"]]
    extra = man[["path", "sequence", "slices_from_tumour"]].rename(columns={"path": "path_abs"})
    tp = tp.drop(columns=["sequence"], errors="ignore").merge(extra, on="path_abs", how="left")
    y = tp["label"].to_numpy()
    s = tp["score"].to_numpy(dtype=float)
    ins = tp["in_scope"].fillna(False).astype(bool).to_numpy()
    site: dict[str, Any] = {"n": int(len(tp)), "roc_auc": auc(y, s), "in_scope_share": float(ins.mean())}
    site["roc_auc_in_scope"] = auc(y[ins], s[ins])
    for seq, g in tp.groupby("sequence"):
        site[f"roc_auc_{seq}"] = auc(g["label"].to_numpy(), g["score"].to_numpy(dtype=float))
    site["axial_share"] = float((tp["view"] == "axial").mean())
    site["out_of_scope_reasons"] = tp["scope_reason"].value_counts().to_dict()
    res["heldout_site"] = site

    # IXI fold B: slices of all planes, volumes
    rows = score_folder(bundle, ixi_b_views, work / "score_ixi_B_slices")
    truth = pd.read_csv(ixi_b_views)
    truth["path"] = [str((ixi_b_views.parent / p).resolve()) for p in truth["path"]]
    rows["path"] = [str(Path(p).resolve()) for p in rows["path"]]
    rows = rows.merge(truth[["path", "view"]].rename(columns={"view": "true_view"}), on="path")
    ixi: dict[str, Any] = {"slices": int(len(rows))}
    for v, g in rows.groupby("true_view"):
        inside = g[g["in_scope"].fillna(False).astype(bool)]
        ixi[v] = {
            "n": int(len(g)),
            "view_accuracy": float((g["view"] == v).mean()),
            "in_scope": int(len(inside)),
            "in_scope_specificity": float((inside["label"] == "no").mean()) if len(inside) else None,
            "specificity_if_scored_anyway": float((g["score"] < meta["threshold"]).mean()),
        }
    inside = rows[rows["in_scope"].fillna(False).astype(bool)]
    ixi["in_scope_specificity"] = float((inside["label"] == "no").mean()) if len(inside) else None
    vol_dir = work / "ixi_B_volumes"
    vol_dir.mkdir(exist_ok=True)
    for v in fold_b:
        if not (vol_dir / v.name).exists():
            (vol_dir / v.name).symlink_to(v)
    vrows = score_folder(bundle, vol_dir, work / "score_ixi_B_volumes")
    ixi["volumes"] = int(len(vrows))
    ixi["volume_specificity"] = float((vrows["label"] == "no").mean())
    ixi["volume_labels"] = vrows["label"].value_counts().to_dict()
    res["ixi_B"] = ixi

    if args.quick:  # the ablation's numbers: held-out site and IXI fold B only
        res["bench_seconds"] = round(time.time() - t0, 1)
        (work / "result.json").write_text(json.dumps(res, indent=2, default=str) + "\n")
        return res
    # view net on 2-D axial collections (all of br35h-3000)
    br = score_folder(bundle, BR35H, work / "score_br35h")
    res["br35h_axial_share"] = float((br["view"] == "axial").mean())
    res["br35h_out_of_scope_reasons"] = br["scope_reason"].value_counts().to_dict()

    # OOD corpus
    corpus = ood_corpus(root / "ood_corpus", fold_b)
    orows = score_folder(bundle, corpus, work / "score_ood")
    orows["kind"] = [Path(p).parent.name for p in orows["path"]]
    thr = meta["scope"]["ood_threshold"]
    ok = orows["error"].isna()
    ood: dict[str, Any] = {
        "n": int(len(orows)),
        "errors": int((~ok).sum()),
        "flagged_any_reason": float((~orows.loc[ok, "in_scope"].astype(bool)).mean()),
        "flagged_by_ood_score": float((orows.loc[ok, "ood_score"] > thr).mean()),
    }
    for k, g in orows[ok].groupby("kind"):
        ood[k] = {
            "n": int(len(g)),
            "out_of_scope": float((~g["in_scope"].astype(bool)).mean()),
            "ood_score_flagged": float((g["ood_score"] > thr).mean()),
        }
    ood["in_distribution_flagged_heldout_site"] = float((tp["ood_score"] > thr).mean())
    res["ood"] = ood
    res["bench_seconds"] = round(time.time() - t0, 1)
    (work / "result.json").write_text(json.dumps(res, indent=2, default=str) + "\n")
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--holdout-site", default="DU", choices=("CS", "DU", "EZ"))
    p.add_argument("--metric", default="val_source_min_roc_auc")
    p.add_argument("--image-size", type=int, default=160)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--patience", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--tcga-views", action="store_true", help="view head also learns from TCGA training-site volumes"
    )
    p.add_argument("--balance-sources", type=float, default=0.0)
    p.add_argument(
        "--sources", default=",".join(SOURCES), help="training sources for the ablation (TCGA always in)"
    )
    p.add_argument("--quick", action="store_true", help="held-out site and IXI fold B only")
    p.add_argument("--tag", default="", help="suffix of the fold's folder (a new run beside earlier ones)")
    args = p.parse_args()
    if not TCGA.is_file():
        sys.exit(f"needs {TCGA}")
    print(json.dumps(run(args), indent=2, default=str))


if __name__ == "__main__":
    main()
