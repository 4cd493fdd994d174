"""GPU check below Ray: a few training steps with bf16 autocast + channels_last through raytumor's own
model factory and ``train_one_epoch``, on synthetic phantoms made here (no data, no Ray needed).

    python bench/gpu_check.py                     # resnet50 and efficientnet_b0 at 224 px
    python bench/gpu_check.py --backbones resnet18 --steps 30

Prints training images/s per backbone. Runs on CPU too (slowly), for a smoke test.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbones", default="resnet50,efficientnet_b0")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=5)
    args = p.parse_args()

    from raytumor.model import create_model
    from raytumor.phantoms import make_phantom
    from raytumor.train import _cosine_lambda, train_one_epoch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(
        f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}; torch {torch.__version__}"
    )
    rng = np.random.default_rng(0)
    n = args.batch_size * 2
    labels = rng.integers(0, 2, n)
    images = np.stack([make_phantom(rng, size=args.image_size, tumour=bool(t)) for t in labels])
    imgs_t = torch.from_numpy(images).pin_memory() if device.type == "cuda" else torch.from_numpy(images)
    labels_t = torch.from_numpy(labels.astype(np.int64))

    def batches(steps: int):
        for s in range(steps):
            i = (s * args.batch_size) % n
            yield {"image": imgs_t[i : i + args.batch_size], "label": labels_t[i : i + args.batch_size]}

    for name in args.backbones.split(","):
        torch.manual_seed(0)
        model = create_model(name, 2, weights="none").to(device, memory_format=torch.channels_last)
        opt = torch.optim.AdamW(model.param_groups(1e-3, 3e-4, 1e-4))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _cosine_lambda(args.steps + args.warmup, 2))
        train_one_epoch(model, opt, sched, batches(args.warmup), device)  # cudnn autotune, allocator warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        r = train_one_epoch(model, opt, sched, batches(args.steps), device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        loss = r["loss_sum"] / r["n"]
        print(
            f"{name:<20} {args.image_size}px batch {args.batch_size}: {r['n'] / dt:8.1f} train img/s  (loss {loss:.3f})"
        )


if __name__ == "__main__":
    main()
