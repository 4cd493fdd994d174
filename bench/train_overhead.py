"""Ray Train epoch throughput ÷ a single-process plain PyTorch loop, measured in one run.

Both sides train the same model on the same training files (the split the Ray run wrote), at the same
image size and global batch size, with the same augmentation function and the same ``train_one_epoch``:
the plain loop augments in-process, Ray augments in Ray Data tasks and trains in TorchTrainer workers.
Throughput = training images / seconds inside ``train_one_epoch`` (data waits included), epochs ≥ 1
(epoch 0 carries warm-up). Target: ratio ≥ 0.9.

    python bench/train_overhead.py --data ../shared/data/br35h-3000 --limit-per-class 300
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def plain_loop(files: list[str], labels: np.ndarray, args, threads: int) -> list[float]:
    from raytumor.augment import AugmentConfig, augment_batch, store_size
    from raytumor.formats import decode_image, fit_square
    from raytumor.model import create_model
    from raytumor.train import cosine_lambda, train_one_epoch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    s = store_size(args.image_size)
    images = np.stack([fit_square(decode_image(Path(f).read_bytes()).pixels, s) for f in files])
    model = create_model(args.backbone, 2, weights=args.weights).to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.param_groups(1e-3, 3e-4, 1e-4))
    steps = len(files) // args.batch_size
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine_lambda(steps * args.epochs, steps // 3))
    aug = AugmentConfig().to_dict()
    rng = np.random.default_rng(0)

    def batches():
        order = rng.permutation(len(images))
        for i in range(0, len(order) - args.batch_size + 1, args.batch_size):
            idx = order[i : i + args.batch_size]
            b = augment_batch(
                {"image": images[idx], "label": labels[idx]}, image_size=args.image_size, config=aug
            )
            yield {"image": torch.from_numpy(b["image"]), "label": torch.from_numpy(b["label"])}

    rates = []
    for epoch in range(args.epochs):
        r = train_one_epoch(model, opt, sched, batches(), torch.device("cpu"))
        rates.append(r["n"] / r["seconds"])
        print(f"plain  epoch {epoch}: {rates[-1]:.1f} img/s")
    return rates


def ray_run(args, workers: int, out: Path) -> tuple[list[float], pd.DataFrame]:
    from raytumor.train import TrainConfig, run_training

    cfg = TrainConfig(
        data=args.data,
        out=str(out),
        name=f"overhead-{workers}w",
        backbone=args.backbone,
        weights=args.weights,
        image_size=args.image_size,
        epochs=args.epochs,
        batch_size=args.batch_size // workers,  # same global batch
        num_workers=workers,
        patience=args.epochs,
        limit_per_class=args.limit_per_class,
        split=(0.8, 0.1, 0.1),
        seed=0,
    )
    summary = run_training(cfg)
    hist = pd.read_csv(Path(summary["bundle"]) / "history.csv")
    manifest = pd.read_parquet(cfg.run_dir / "split_manifest.parquet")
    if "train_data_wait_s" in hist:
        print(f"ray {workers}w data wait per epoch (s): {hist['train_data_wait_s'].round(2).tolist()}")
    return hist["train_images_per_s"].tolist(), manifest


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/br35h-3000"))
    p.add_argument("--limit-per-class", type=int, default=300)
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--weights", default="imagenet")
    p.add_argument("--image-size", type=int, default=160)
    p.add_argument("--batch-size", type=int, default=32, help="global batch")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--workers", default="1,2", help="Ray Train worker counts to measure")
    p.add_argument("--out", default="/tmp/raytumor-bench-overhead")
    args = p.parse_args()

    from raytumor.runtime import init_ray

    init_ray()
    cores = os.cpu_count() or 1
    results = {}
    manifest = None
    # A fresh folder per invocation: a run folder left by an earlier invocation would be resumed from its
    # checkpoint, and its history (old epochs' rates) read back as this run's.
    runs = Path(args.out) / time.strftime("%Y%m%d-%H%M%S")
    for w in [int(x) for x in args.workers.split(",")]:
        t0 = time.time()
        rates, manifest = ray_run(args, w, runs)
        results[f"ray_{w}w"] = {
            "img_s": float(np.mean(rates[1:] or rates)),
            "epochs": rates,
            "wall_s": time.time() - t0,
        }
    import ray

    ray.shutdown()  # the baseline gets the machine to itself
    train = manifest[manifest["split"] == "train"]
    plain = plain_loop(train["path"].tolist(), train["label"].to_numpy(np.int64), args, cores)
    base = float(np.mean(plain[1:] or plain))
    results["plain"] = {"img_s": base, "epochs": plain, "threads": cores}
    print(
        f"\n{args.backbone} {args.weights} {args.image_size}px, global batch {args.batch_size}, "
        f"{len(train)} training images, {cores} cores"
    )
    print(f"{'setup':<14}{'img/s':>9}{'ratio':>8}")
    print(f"{'plain 1 proc':<14}{base:>9.1f}{1.0:>8.2f}")
    for k, v in results.items():
        if k.startswith("ray_"):
            v["ratio"] = v["img_s"] / base
            print(f"{k:<14}{v['img_s']:>9.1f}{v['ratio']:>8.2f}")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "train_overhead.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
