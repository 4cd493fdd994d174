"""Ray Train epoch throughput ÷ a single-process plain PyTorch loop, measured in one run.

Both sides train the same model on the same training files (the split the Ray run wrote), at the same
image size and global batch size, with the same augmentation function and the same ``train_one_epoch``:
the plain loop augments in-process, Ray augments in Ray Data tasks and trains in TorchTrainer workers.
Throughput = training images / seconds inside ``train_one_epoch`` (data waits included), epochs ≥ 1
(epoch 0 carries warm-up). The plain loop runs in its own process before and after the Ray runs, with Ray
shut down, and each ratio divides by the mean of the two: this machine's speed drifts by tens of percent
within minutes. Target (issue 14): ratio ≥ 0.95.

The plain loop runs twice each time: as a user would start it (glibc's malloc defaults), and with the
allocator settings raytumor gives its training workers (``raytumor.runtime.TORCH_PROCESS_ENV``). The
second ratio separates Ray's own cost from that setting's gain.

``--pairs N`` interleaves instead: plain, Ray, plain, Ray, ..., plain (N Ray runs per worker count, each
divided by the mean of the plain runs just before and just after it), and reports the median of the N
ratios with their range, so one drift of the machine's speed moves one ratio, not the result.

    python bench/train_overhead.py --data ../shared/data/br35h-3000 --limit-per-class 300
    python bench/train_overhead.py --workers 2 --pairs 5
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
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


def train_config(args, workers: int, out: Path, tag: str = ""):
    from raytumor.train import TrainConfig

    return TrainConfig(
        data=args.data,
        out=str(out),
        name=f"overhead-{workers}w{tag}",
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
        augment_in=args.augment_in,
    )


def training_files(args, out: Path) -> pd.DataFrame:
    """The training split every run of this invocation uses (the split is a function of data and seed)."""
    from raytumor.train import prepare_split

    return prepare_split(train_config(args, 1, out)).files("train")


def ray_run(args, workers: int, out: Path, tag: str = "") -> tuple[list[float], pd.DataFrame]:
    from raytumor.train import run_training

    cfg = train_config(args, workers, out, tag)
    summary = run_training(cfg)
    hist = pd.read_csv(Path(summary["bundle"]) / "history.csv")
    manifest = pd.read_parquet(cfg.run_dir / "split_manifest.parquet")
    if "train_data_wait_s" in hist:
        print(f"ray {workers}w data wait per epoch (s): {hist['train_data_wait_s'].round(2).tolist()}")
    return hist["train_images_per_s"].tolist(), manifest


def plain_process(files_json: Path, args, tuned: bool) -> list[float]:
    """The plain loop in a fresh process (no Ray imported), with or without the workers' malloc settings."""
    from raytumor.runtime import TORCH_PROCESS_ENV

    env = {k: v for k, v in os.environ.items() if k not in TORCH_PROCESS_ENV}
    if tuned:
        env.update(TORCH_PROCESS_ENV)
    cmd = [sys.executable, __file__, "--plain-only", str(files_json)]
    for k in ("backbone", "weights", "image_size", "batch_size", "epochs"):
        cmd += [f"--{k.replace('_', '-')}", str(getattr(args, k))]
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    rates = json.loads(out.strip().splitlines()[-1])
    print(f"plain{' (tuned malloc)' if tuned else ''}: {[round(r, 1) for r in rates]} img/s", flush=True)
    return rates


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
    p.add_argument("--augment-in", default="auto", choices=("auto", "data", "worker"))
    p.add_argument("--pairs", type=int, default=0, help="interleave N plain/Ray pairs; report the median ratio")
    p.add_argument("--plain-only", help=argparse.SUPPRESS)  # internal: one plain loop over a JSON file list
    args = p.parse_args()
    cores = os.cpu_count() or 1
    if args.plain_only:
        spec = json.loads(Path(args.plain_only).read_text())
        rates = plain_loop(spec["files"], np.asarray(spec["labels"], np.int64), args, cores)
        print(json.dumps(rates))
        return

    import ray

    from raytumor.runtime import init_ray

    # A fresh folder per invocation: a run folder left by an earlier invocation would be resumed from its
    # checkpoint, and its history (old epochs' rates) read back as this run's.
    runs = Path(args.out) / time.strftime("%Y%m%d-%H%M%S")
    init_ray()
    train = training_files(args, runs)
    ray.shutdown()  # the baseline gets the machine to itself
    files, labels = train["path"].tolist(), train["label"].to_numpy(np.int64)
    runs.mkdir(parents=True, exist_ok=True)
    files_json = runs / "plain_files.json"
    files_json.write_text(json.dumps({"files": files, "labels": labels.tolist()}))
    if args.pairs > 0:
        return interleaved(args, runs, files, files_json)
    plain_before = plain_process(files_json, args, tuned=False)
    tuned_before = plain_process(files_json, args, tuned=True)
    results = {}
    for w in [int(x) for x in args.workers.split(",")]:
        init_ray()
        t0 = time.time()
        rates, manifest = ray_run(args, w, runs)
        ray.shutdown()
        ray_train = manifest[manifest["split"] == "train"]
        if sorted(ray_train["path"]) != sorted(files):
            raise SystemExit("the Ray run trained on other files than the plain loop")
        results[f"ray_{w}w"] = {
            "img_s": float(np.mean(rates[1:] or rates)),
            "epochs": rates,
            "wall_s": time.time() - t0,
        }
    tuned_after = plain_process(files_json, args, tuned=True)
    plain_after = plain_process(files_json, args, tuned=False)

    before, after = rate(plain_before), rate(plain_after)
    base = (before + after) / 2
    tuned = (rate(tuned_before) + rate(tuned_after)) / 2
    results["plain"] = {"img_s": base, "before": plain_before, "after": plain_after, "threads": cores}
    results["plain_tuned_malloc"] = {"img_s": tuned, "before": tuned_before, "after": tuned_after}
    print(
        f"\n{args.backbone} {args.weights} {args.image_size}px, global batch {args.batch_size}, "
        f"{len(files)} training images, {cores} cores, augmentation in: {args.augment_in}"
    )
    print(f"plain before / after: {before:.1f} / {after:.1f} img/s")
    print(f"{'setup':<26}{'img/s':>8}{'÷ plain':>10}{'÷ plain tuned':>15}")
    print(f"{'plain 1 proc (mean)':<26}{base:>8.1f}{1.0:>10.2f}{base / tuned:>15.2f}")
    print(f"{'plain, tuned malloc':<26}{tuned:>8.1f}{tuned / base:>10.2f}{1.0:>15.2f}")
    for k, v in results.items():
        if k.startswith("ray_"):
            v["ratio"], v["ratio_tuned"] = v["img_s"] / base, v["img_s"] / tuned
            print(f"{k:<26}{v['img_s']:>8.1f}{v['ratio']:>10.2f}{v['ratio_tuned']:>15.2f}")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "train_overhead.json").write_text(json.dumps(results, indent=2))


def rate(epochs: list[float]) -> float:
    """A run's epoch rate: epochs >= 1 (epoch 0 carries the warm-up)."""
    return float(np.mean(epochs[1:] or epochs))


def interleaved(args, runs: Path, files: list[str], files_json: Path) -> None:
    """plain, Ray (each worker count), plain, Ray, ..., plain: each Ray run against its two neighbours."""
    import ray

    from raytumor.runtime import init_ray

    workers = [int(x) for x in args.workers.split(",")]
    plains = [rate(plain_process(files_json, args, tuned=False))]
    ray_rates: dict[int, list[float]] = {w: [] for w in workers}
    neighbours: dict[int, list[tuple[int, int]]] = {w: [] for w in workers}
    for k in range(args.pairs):
        for w in workers:
            init_ray()
            rates, manifest = ray_run(args, w, runs, tag=f"-{k}")
            ray.shutdown()
            if sorted(manifest.loc[manifest["split"] == "train", "path"]) != sorted(files):
                raise SystemExit("the Ray run trained on other files than the plain loop")
            ray_rates[w].append(rate(rates))
            neighbours[w].append((len(plains) - 1, len(plains)))
            print(f"ray {w}w run {k}: {rate(rates):.1f} img/s", flush=True)
        plains.append(rate(plain_process(files_json, args, tuned=False)))
    print(
        f"\n{args.backbone} {args.weights} {args.image_size}px, global batch {args.batch_size}, {len(files)} "
        f"training images, {os.cpu_count()} cores, augmentation in: {args.augment_in}, {args.pairs} pairs"
    )
    print("plain runs (img/s, in order): " + ", ".join(f"{p:.1f}" for p in plains))
    results: dict = {"plain": plains}
    for w in workers:
        ratios = [r / ((plains[a] + plains[b]) / 2) for r, (a, b) in zip(ray_rates[w], neighbours[w], strict=True)]
        med = float(np.median(ratios))
        print(
            f"ray {w}w: img/s {', '.join(f'{r:.1f}' for r in ray_rates[w])}; ratio to its neighbours "
            f"{', '.join(f'{r:.2f}' for r in ratios)}; median {med:.2f} (range {min(ratios):.2f}-{max(ratios):.2f})"
        )
        results[f"ray_{w}w"] = {"img_s": ray_rates[w], "ratios": ratios, "median_ratio": med}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "train_overhead_pairs.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
