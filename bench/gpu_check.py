"""GPU check below Ray: raytumor's own training step and scoring predictor on synthetic phantoms made
here (no data, no Ray needed).

- training: a few steps with bf16 autocast + channels_last through the model factory and ``train_one_epoch``;
- predictor: the scoring actor's GPU path, ``predict.forward_probs`` (uint8 batches from pinned host memory,
  copied non-blocking, normalised on the GPU, channels_last, bf16 autocast), ResNet-50 at 224 px by default.

    python bench/gpu_check.py                     # resnet50 and efficientnet_b0 training; resnet50 scoring
    python bench/gpu_check.py --backbones resnet18 --steps 30 --predict-backbones resnet18,efficientnet_lite0

Prints images/s per backbone. Runs on CPU too (slowly), for a smoke test.
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
    p.add_argument("--predict-backbones", default="resnet50")
    p.add_argument("--predict-batch-size", type=int, default=256)
    p.add_argument("--predict-steps", type=int, default=30)
    args = p.parse_args()

    from raytumor.model import create_model
    from raytumor.phantoms import make_phantom
    from raytumor.train import cosine_lambda, train_one_epoch

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
        sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine_lambda(args.steps + args.warmup, 2))
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
    predict_check(args, images, device)


def predict_check(args: argparse.Namespace, images: np.ndarray, device: torch.device) -> None:
    """Images/s of the scoring predictor's forward path, host uint8 batch to probabilities on the host."""
    from raytumor.predict import forward_probs

    bs = args.predict_batch_size
    reps = -(-bs // len(images))
    host = np.ascontiguousarray(np.concatenate([images] * reps)[:bs])  # what Ray Data hands the actor
    for name in args.predict_backbones.split(","):
        if not name:
            continue
        torch.manual_seed(0)
        model = create_eval_model(name, device)
        for _ in range(3):  # cudnn autotune, allocator warm-up
            forward_probs(model, host, device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(args.predict_steps):
            probs = forward_probs(model, host, device)  # returns on the host: includes both copies
        dt = time.perf_counter() - t0
        assert probs.shape == (bs, 2) and torch.isfinite(probs).all()
        print(
            f"{name:<20} {args.image_size}px batch {bs}: {bs * args.predict_steps / dt:8.1f} predict img/s "
            f"(bf16 autocast={device.type == 'cuda'}, channels_last, pinned host batches)"
        )


def create_eval_model(name: str, device: torch.device) -> torch.nn.Module:
    from raytumor.model import create_model

    return create_model(name, 2, weights="none").eval().to(device, memory_format=torch.channels_last)


if __name__ == "__main__":
    main()
