"""Training-augmentation throughput: ``augment_batch`` images/s at batch 64, 184 -> 160 px, one thread,
classic family only (shift 0) vs with the scanner/source-shift family (shift 1), and the ratio. Best
(least disturbed) and median call times are both shown, by wall clock and by process CPU time; on a
shared, loaded machine trust the CPU-time figures.

One thread because Ray Data runs one map_batches task per CPU. Uses the first 64 slices of
../shared/data/br35h-3000 when present, otherwise synthetic textured images.

    python bench/augment_throughput.py [--repeats 30]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "br35h-3000"
BATCH, STORE, SIZE = 64, 184, 160


def load_images(data: Path) -> tuple[np.ndarray, str]:
    from raytumor.formats import decode_image, fit_square

    paths = sorted(data.glob("*/*.jpg"))[:BATCH] if data.is_dir() else []
    if len(paths) == BATCH:
        return np.stack([fit_square(decode_image(p.read_bytes()).pixels, STORE) for p in paths]), str(data)
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (BATCH, STORE, STORE), dtype=np.uint8), "synthetic"


def measure(batch: dict, repeats: int, clock: Callable[[], float]) -> dict[float, list[float]]:
    """Seconds per call for shift 0 and 1, interleaved so background load hits both alike."""
    from raytumor.augment import AugmentConfig, augment_batch

    configs = {shift: AugmentConfig(shift=shift) for shift in (0.0, 1.0)}
    times: dict[float, list[float]] = {shift: [] for shift in configs}
    for i in range(repeats + 1):
        for shift, cfg in configs.items():
            t0 = clock()
            augment_batch(batch, image_size=SIZE, config=cfg, seed=i)
            if i:  # the first round is warm-up (kernels, caches)
                times[shift].append(clock() - t0)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    args = ap.parse_args()
    torch.set_num_threads(1)
    images, source = load_images(args.data)
    batch = {"image": images, "label": np.zeros(BATCH, np.int64)}
    print(
        f"images: {source}, batch {BATCH}, {STORE} -> {SIZE} px, 1 thread, {args.repeats} interleaved calls"
    )
    # Wall time is what training sees; process CPU time ignores waiting for a busy CPU (shared machines).
    for label, clock in (("wall", time.perf_counter), ("cpu", time.process_time)):
        times = measure(batch, args.repeats, clock)
        rate = {shift: (BATCH / min(ts), BATCH / statistics.median(ts)) for shift, ts in times.items()}
        for shift, (best, median) in rate.items():
            print(f"{label:4s} shift {shift:g}: best {best:7.0f} img/s   median {median:7.0f} img/s")
        best_ratio, median_ratio = (rate[1.0][i] / rate[0.0][i] for i in range(2))
        print(f"{label:4s} ratio shift 1 / shift 0: best {best_ratio:.2f}   median {median_ratio:.2f}")


if __name__ == "__main__":
    main()
