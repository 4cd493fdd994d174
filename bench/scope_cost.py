"""What the bundle's view net and OOD score cost next to the classifier's forward pass (issue 13).

The OOD score reads the features of the classifier's one forward pass (a Mahalanobis distance per layer);
the view net is a small CNN on the same uint8 input at 64 px. This times, on the same images and thread
count, the forward pass (``Predictor.predict``: probabilities + features) against both heads, and reports
the ratio::

    python bench/scope_cost.py                       # random heads of the real size on EfficientNet-Lite0
    python bench/scope_cost.py --bundle runs/x/bundle  # a trained bundle's own heads

Ratios are against a baseline measured in the same run; say what else ran on the machine.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from raytumor.bundle import BundleMeta, save_bundle
from raytumor.model import create_model, normalization
from raytumor.predict import Predictor
from raytumor.scope import Heads, Scope, ViewNet, fit_ood


def synthetic_bundle(root: Path, size: int) -> Path:
    """A Lite0 bundle with random heads of the shipped shapes (features of every OOD layer, 2 classes,
    3 views)."""
    model = create_model("efficientnet_lite0", 2, weights="none").eval()
    mean, std = normalization("efficientnet_lite0")
    with torch.inference_mode():
        layout = model.forward_with_taps(torch.zeros(1, 1, size, size))[2]
    rng = np.random.default_rng(0)
    # positive-definite per-layer matrices: the cost does not depend on their values
    fake = rng.normal(size=(4 * sum(layout), sum(layout)))
    heads = Heads(
        ViewNet(["axial", "coronal", "sagittal"]).eval(),
        fit_ood(fake, np.array([0, 1] * (len(fake) // 2)), layout),
    )
    meta = BundleMeta(
        backbone="efficientnet_lite0", classes=["no", "yes"], negative_class="no", image_size=size,
        mean=list(mean), std=list(std),
        scope=Scope(classes=["no", "yes"], counts={"view": {"axial": {"no": 99, "yes": 99}}}).to_dict(),
    )  # fmt: skip
    return save_bundle(root / "bundle", model.state_dict(), meta, heads=heads)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", default=None)
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp())
    try:
        bundle = args.bundle or synthetic_bundle(tmp, 160)
        pr = Predictor.from_bundle(bundle, device="cpu")
        size = pr.meta.image_size
        x = np.random.default_rng(1).integers(0, 256, (args.images, size, size), dtype=np.uint8)
        fwd, heads = [], []
        for _ in range(args.repeats):
            t = time.perf_counter()
            feats = np.concatenate(
                [pr.predict(x[i : i + args.batch])[1] for i in range(0, len(x), args.batch)]
            )
            fwd.append(time.perf_counter() - t)
            t = time.perf_counter()
            for i in range(0, len(x), args.batch):
                f = feats[i : i + args.batch]
                pr.assess(pr.ood_scores(f), pr.model_views(x[i : i + args.batch]))
            heads.append(time.perf_counter() - t)
        out = {
            "images": args.images,
            "image_size": size,
            "threads": args.threads,
            "forward_img_per_s": round(args.images / min(fwd), 1),
            "heads_img_per_s": round(args.images / min(heads), 1),
            "heads_cost_vs_forward": round(min(heads) / min(fwd), 4),
        }
        print(json.dumps(out, indent=2))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
