"""View of a 2-D slice: the shared-feature view head against a small separate view net (issue 13, item 3).

The separate net (:class:`raytumor.scope.ViewNet`, 64 px input, 8 small conv layers) trains on slices cut
from volumes along each axis, where geometry gives the label: IXI fold A (T1, down to the neck: axial cuts
>= 170 mm below the vertex are its "not_brain" class) and the TCGA training sites' FLAIR/post-contrast T1
stacks (the fold's sites, resliced by ``bench/generalisation.py``). It is measured where it never trained:

* IXI fold B subjects, per plane and by depth below the vertex, and the OOD corpus's neck slices (not_brain);
* the held-out TCGA site's stacks resliced, per plane;
* 2-D axial collections: all of ``br35h-3000`` and the held-out TCGA site's native axial slices.

The shared-feature head's numbers on the same sets come from the fold's ``result.json``
(``bench/generalisation.py``); both columns are printed. Cost: one batch of 64 inputs through the
classifier and through the view net, same process, same threads.

    python bench/view_net.py --gen /tmp/gen --holdout-site DU
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generalisation import BR35H, TCGA, ixi_folds, slices, tcga_volumes  # noqa: E402

SIZE = 160


def _load(path: str) -> np.ndarray | None:
    from raytumor.preprocess import model_inputs

    try:
        return model_inputs(Path(path).read_bytes(), SIZE, None)[0][0]
    except Exception:  # noqa: BLE001 - an undecodable file is left out of a benchmark, counted below
        return None


def load(manifest: Path | None, paths: list[str] | None = None) -> tuple[np.ndarray, pd.DataFrame]:
    if manifest is not None:
        df = pd.read_csv(manifest)
        df["path"] = [str((manifest.parent / p).resolve()) for p in df["path"]]
    else:
        df = pd.DataFrame({"path": paths})
    with Pool(2) as pool:
        ims = pool.map(_load, df["path"].tolist(), chunksize=64)
    keep = [i for i, im in enumerate(ims) if im is not None]
    return np.stack([ims[i] for i in keep]), df.iloc[keep].reset_index(drop=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gen", required=True, help="bench/generalisation.py --out directory (slices, volumes)")
    p.add_argument("--holdout-site", default="DU", choices=("CS", "DU", "EZ"))
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--native-axial",
        action="store_true",
        help="also train on the TCGA training sites' native axial slices",
    )
    args = p.parse_args()
    from raytumor.scope import NOT_BRAIN, fit_view_net, geometry_views

    torch.set_num_threads(2)
    gen = Path(args.gen)
    train_sites = [x for x in ("CS", "DU", "EZ") if x != args.holdout_site]
    t0 = time.time()
    fold_a, fold_b = ixi_folds()
    # IXI fold A down to the neck: axial cuts >= NOT_BRAIN_MM below the vertex teach "not_brain"
    xa, da = load(slices(gen / "ixi_A_views_neck", fold_a, "axial,coronal,sagittal", depth_mm=0))
    da["view"] = geometry_views(da["view"].tolist(), da["mm_below_vertex"].tolist())
    xa, da = xa[da["view"].notna().to_numpy()], da[da["view"].notna()].reset_index(drop=True)
    tv = slices(
        gen / f"tcga_views_{''.join(train_sites)}", tcga_volumes(gen / "tcga_volumes", train_sites),
        "axial,coronal,sagittal", pattern=r"^(TCGA_\w\w_\d+)",
    )  # fmt: skip
    xt, dt = load(tv)
    x = np.concatenate([xa, xt])
    views = da["view"].tolist() + dt["view"].tolist()
    if args.native_axial:
        # the training sites' own axial slices, as the classifier's manifest gives them (view known)
        man = pd.read_csv(TCGA)
        native = [str((TCGA.parent / q).resolve()) for q in man.loc[man["site"].isin(train_sites), "path"]]
        xn, _ = load(None, native)
        x = np.concatenate([x, xn])
        views += ["axial"] * len(xn)
    print(
        f"train: {len(x)} slices ({pd.Series(views).value_counts().to_dict()}), load {time.time() - t0:.0f} s"
    )
    t1 = time.time()
    net = fit_view_net(x, views, epochs=args.epochs, seed=args.seed)
    train_s = time.time() - t1
    res: dict = {"train_slices": len(x), "train_seconds": round(train_s, 1), "epochs": args.epochs}

    def per_plane(xs: np.ndarray, truth: list[str]) -> dict:
        called = net.predict(xs)
        t = np.asarray(truth, dtype=object)
        out: dict = {
            v: round(float((called[t == v] == v).mean()), 4)
            for v in ("axial", "coronal", "sagittal", NOT_BRAIN)
            if (t == v).any()
        }
        out["confusion"] = pd.crosstab(pd.Series(t, name="true"), pd.Series(called, name="called")).to_dict()
        return out

    xb, db = load(slices(gen / "ixi_B_views_neck", fold_b, "axial,coronal,sagittal", depth_mm=0))
    vb = geometry_views(db["view"].tolist(), db["mm_below_vertex"].tolist())
    keep_b = np.array([v is not None for v in vb])
    res["ixi_B"] = per_plane(xb[keep_b], [v for v in vb if v is not None])
    # every axial cut of the held-out subjects by depth below the vertex: where "axial" turns "not_brain"
    ax = (db["view"] == "axial").to_numpy()
    called_b = net.predict(xb[ax])
    depth = db.loc[ax, "mm_below_vertex"].to_numpy(dtype=float)
    res["ixi_B_axial_called_by_depth_mm"] = {
        f"{lo:.0f}-{lo + 20:.0f}": {
            k: round(float((called_b[(depth >= lo) & (depth < lo + 20)] == k).mean()), 3)
            for k in ("axial", NOT_BRAIN)
        }
        for lo in np.arange(0, 240, 20)
        if ((depth >= lo) & (depth < lo + 20)).any()
    }
    # the OOD corpus's neck slices (bench/generalisation.py: two per fold-B subject, rendered as PNG)
    neck = sorted(str(f) for f in (gen / "ood_corpus" / "neck").glob("*.png"))
    if neck:
        xn, _ = load(None, neck)
        res["ood_neck_called_not_brain"] = round(float((net.predict(xn) == NOT_BRAIN).mean()), 4)
    hv = slices(
        gen / f"tcga_views_{args.holdout_site}", tcga_volumes(gen / "tcga_volumes", [args.holdout_site]),
        "axial,coronal,sagittal", pattern=r"^(TCGA_\w\w_\d+)",
    )  # fmt: skip
    xh, dh = load(hv)
    res[f"tcga_{args.holdout_site}_resliced"] = per_plane(xh, dh["view"].tolist())
    br = sorted(str(f) for f in BR35H.rglob("*") if f.suffix.lower() in (".jpg", ".jpeg", ".png"))
    xbr, _ = load(None, br)
    res["br35h_axial"] = round(float((net.predict(xbr) == "axial").mean()), 4)
    man = pd.read_csv(TCGA)
    site = [str((TCGA.parent / q).resolve()) for q in man.loc[man["site"] == args.holdout_site, "path"]]
    xs, keep = load(None, site)
    called_s = net.predict(xs)
    ok = called_s == "axial"
    res[f"tcga_{args.holdout_site}_native_axial"] = round(float(ok.mean()), 4)
    res[f"tcga_{args.holdout_site}_native_called_not_brain"] = round(float((called_s == NOT_BRAIN).mean()), 4)
    res["br35h_called_not_brain"] = round(float((net.predict(xbr) == NOT_BRAIN).mean()), 4)
    # where in the stack the misses are (0 = skull base, 1 = vertex)
    rel = man.loc[man["site"] == args.holdout_site].reset_index(drop=True)
    rel = (rel["slice_index"] / rel["n_slices"].clip(lower=1)).to_numpy()
    bins = np.minimum((rel * 5).astype(int), 4)
    res[f"tcga_{args.holdout_site}_native_axial_by_height"] = {
        f"{b * 20}-{b * 20 + 20}%": round(float(ok[bins == b].mean()), 4)
        for b in range(5)
        if (bins == b).any()
    }

    # how sure the net must be before it calls an input not_brain: what each threshold costs and catches
    pb_neck = net.probabilities(xn)[:, net.views.index(NOT_BRAIN)] if neck else np.zeros(0)
    pb = {
        "br35h": net.probabilities(xbr)[:, net.views.index(NOT_BRAIN)],
        f"tcga_{args.holdout_site}_native": net.probabilities(xs)[:, net.views.index(NOT_BRAIN)],
        "ixi_B_brain_axial_0-150mm": net.probabilities(xb[ax][depth <= 150])[:, net.views.index(NOT_BRAIN)],
    }
    res["not_brain_threshold"] = {
        f"{t:g}": {
            "neck_caught": round(float((pb_neck >= t).mean()), 4) if len(pb_neck) else None,
            **{f"{k}_lost": round(float((v >= t).mean()), 4) for k, v in pb.items()},
        }
        for t in (0.5, 0.7, 0.8, 0.9, 0.95, 0.99)
    }

    # cost against the classifier's forward, same batch, same threads
    from raytumor.model import create_model

    model = create_model("efficientnet_lite0", num_classes=2, weights="none").eval()
    batch = torch.as_tensor(xbr[:64]).unsqueeze(1).float().contiguous(memory_format=torch.channels_last)
    u8 = xbr[:64]

    def timed(fn, reps: int = 5) -> float:
        fn()
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - t) / reps

    with torch.inference_mode():
        t_model = timed(lambda: model.forward_with_taps(batch))
        t_view = timed(lambda: net.predict(u8))
    res["cost"] = {"classifier_s_per_64": round(t_model, 4), "view_net_s_per_64": round(t_view, 4),
                   "ratio": round(t_view / t_model, 4)}  # fmt: skip
    fold = gen / f"loso-{args.holdout_site}-val_source_min_roc_auc-tv" / "result.json"
    if fold.is_file():
        r = json.loads(fold.read_text())
        res["shared_head"] = {
            "ixi_B": {v: r["ixi_B"][v]["view_accuracy"] for v in ("axial", "coronal", "sagittal")},
            "br35h_axial": r["br35h_axial_share"],
            f"tcga_{args.holdout_site}_native_axial": r["heldout_site"]["axial_share"],
            "held_out_in_training": r.get("view_head", {}).get("held_out_per_view"),
        }
    out = gen / f"view_net_{args.holdout_site}{'-native' if args.native_axial else ''}-neck.json"
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
