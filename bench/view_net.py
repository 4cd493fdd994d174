"""View of a 2-D slice: the shared-feature view head against a small separate view net (issue 13, item 3).

The separate net (:class:`raytumor.scope.ViewNet`, 64 px input, 8 small conv layers) trains on slices cut from volumes along each axis, where geometry gives the label: IXI fold A (T1)
and the TCGA training sites' FLAIR/post-contrast T1 stacks (the fold's sites, resliced by
``bench/generalisation.py``). It is measured where it never trained:

* IXI fold B subjects, per plane; the held-out TCGA site's stacks resliced, per plane;
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
from generalisation import BR35H, TCGA, slices, tcga_volumes  # noqa: E402

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
    from raytumor.scope import fit_view_net

    torch.set_num_threads(2)
    gen = Path(args.gen)
    train_sites = [x for x in ("CS", "DU", "EZ") if x != args.holdout_site]
    t0 = time.time()
    xa, da = load(gen / "ixi_A_views" / "manifest.csv")
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
            v: round(float((called[t == v] == v).mean()), 4) for v in ("axial", "coronal", "sagittal")
        }
        out["confusion"] = pd.crosstab(pd.Series(t, name="true"), pd.Series(called, name="called")).to_dict()
        return out

    xb, db = load(gen / "ixi_B_views" / "manifest.csv")
    res["ixi_B"] = per_plane(xb, db["view"].tolist())
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
    ok = net.predict(xs) == "axial"
    res[f"tcga_{args.holdout_site}_native_axial"] = round(float(ok.mean()), 4)
    # where in the stack the misses are (0 = skull base, 1 = vertex)
    rel = man.loc[man["site"] == args.holdout_site].reset_index(drop=True)
    rel = (rel["slice_index"] / rel["n_slices"].clip(lower=1)).to_numpy()
    bins = np.minimum((rel * 5).astype(int), 4)
    res[f"tcga_{args.holdout_site}_native_axial_by_height"] = {
        f"{b * 20}-{b * 20 + 20}%": round(float(ok[bins == b].mean()), 4)
        for b in range(5)
        if (bins == b).any()
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
    out = gen / f"view_net_{args.holdout_site}{'-native' if args.native_axial else ''}.json"
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
