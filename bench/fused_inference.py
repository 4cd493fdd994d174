"""Forward speed of a model as loaded vs with BatchNorm folded into its convolutions (what the scoring
actors run), A/B interleaved in one process so this machine's drift hits both alike.

    python bench/fused_inference.py                              # EfficientNet-Lite0 160 px, batch 8
    python bench/fused_inference.py --backbone resnet18 --image-size 224
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def rate(model: torch.nn.Module, x: torch.Tensor, threads: int, n: int) -> float:
    torch.set_num_threads(threads)
    with torch.inference_mode():
        for _ in range(3):
            model.forward_with_taps(x)
        t0 = time.perf_counter()
        for _ in range(n):
            model.forward_with_taps(x)
    return n * len(x) / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--image-size", type=int, default=160)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--steps", type=int, default=40, help="forward passes per measurement")
    args = p.parse_args()

    from raytumor.model import create_model, fuse_for_inference

    torch.manual_seed(0)
    model = create_model(args.backbone, 2, weights="none", dropout=0.0)
    model.eval().to(memory_format=torch.channels_last)
    fused = fuse_for_inference(model)
    x = torch.rand(args.batch_size, 1, args.image_size, args.image_size)
    x = x.contiguous(memory_format=torch.channels_last)
    gains: dict[int, list[float]] = {1: [], 2: []}
    for r in range(args.rounds):
        line = []
        for threads in (1, 2):
            a, b = rate(model, x, threads, args.steps), rate(fused, x, threads, args.steps)
            gains[threads].append(b / a)
            line.append(f"{threads} thread(s): {a:6.1f} -> {b:6.1f} img/s")
        print(f"round {r}: " + "; ".join(line), flush=True)
    for threads, g in gains.items():
        print(
            f"{args.backbone} {args.image_size}px batch {args.batch_size}, {threads} thread(s): "
            f"folded / as loaded = {statistics.median(g):.2f} (median of {len(g)})"
        )


if __name__ == "__main__":
    main()
