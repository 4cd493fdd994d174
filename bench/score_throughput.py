"""Batch-scoring throughput and memory, measured in one run on the same files.

1. ``raytumor score`` (Ray Data: decode fused into an actor pool, Parquet out) images/s
   ÷ a plain PyTorch loop (decode with PIL, same preprocessing, same model and batch size,
   ``torch.set_num_threads(cores)``)                                              target ≥ 1.0
   ÷ the same loop with the scoring actors' BatchNorm-folded model (reported, no target: Ray's own
   overhead against the same engine in one process)
   ÷ that loop in a process with the actors' malloc settings too (``raytumor.runtime.TORCH_PROCESS_ENV``;
   reported, no target: everything the actors get, in one process)
   ÷ model-only forward on preloaded tensors (the ceiling)                        target ≥ 0.8
2. Peak memory (PSS summed over the driver and every Ray process) scoring 1× and 10× the files
   (a small model and small images so the 10× run stays short)                    target ≤ 1.2× growth

Weights do not change speed, so the bundle is a randomly initialised model made here.

    python bench/score_throughput.py                          # all of ../shared/data/br35h-3000, ResNet-18 224 px
    python bench/score_throughput.py --limit 600 --skip-rss   # a quick look
    python bench/score_throughput.py --backbone efficientnet_lite0 --image-size 160 --copies 10 --skip-rss
                                                              # 30,000 inputs (each file 10x, other names)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "br35h-3000"


def make_bundle(out: Path, backbone: str, image_size: int) -> Path:
    from raytumor.bundle import BundleMeta, save_bundle
    from raytumor.model import create_model, normalization

    torch.manual_seed(0)
    model = create_model(backbone, 2, weights="none")
    mean, std = normalization(backbone)
    meta = BundleMeta(backbone, ["no", "yes"], "no", image_size, list(mean), list(std))
    return save_bundle(out, model.state_dict(), meta)


def list_images(data: Path, limit: int | None) -> list[Path]:
    files = sorted(
        p for p in data.rglob("*") if p.is_file() and p.suffix.lower() in (".jpg", ".jpeg", ".png")
    )
    return files[:limit] if limit else files


def plain_loop(bundle: Path, files: list[Path], batch_size: int, threads: int, fused: bool = False) -> float:
    """Images/s of decode + preprocess + forward in one process, batch by batch (``fused``: with the
    scoring actors' BatchNorm-folded model, to show how much of a ratio is the engine's, not Ray's)."""
    from raytumor.bundle import load_bundle
    from raytumor.formats import decode_image, fit_square
    from raytumor.model import fuse_for_inference
    from raytumor.predict import forward_probs

    torch.set_num_threads(threads)
    b = load_bundle(bundle, device="cpu")
    if fused:
        b.model = fuse_for_inference(b.model)
    size = b.meta.image_size
    forward_probs(b.model, np.zeros((batch_size, size, size), np.uint8), b.device)  # warm-up
    t0 = time.perf_counter()
    for i in range(0, len(files), batch_size):
        x = np.stack(
            [
                fit_square(decode_image(p.read_bytes(), draft_size=size).pixels, size)
                for p in files[i : i + batch_size]
            ]
        )
        forward_probs(b.model, x, b.device)
    return len(files) / (time.perf_counter() - t0)


def plain_tuned(bundle: Path, files: list[Path], batch_size: int, threads: int) -> float:
    """:func:`plain_loop` with the folded model, in a fresh process with the scoring actors' malloc settings."""
    from raytumor.runtime import TORCH_PROCESS_ENV

    listing = bundle.parent / "plain_files.json"
    listing.write_text(json.dumps([str(f) for f in files]))
    cmd = [sys.executable, __file__, "--plain-only", str(listing), "--bundle", str(bundle)]
    cmd += ["--batch-size", str(batch_size), "--threads", str(threads)]
    out = subprocess.run(
        cmd, env={**os.environ, **TORCH_PROCESS_ENV}, check=True, capture_output=True, text=True
    )
    return float(out.stdout.strip().splitlines()[-1])


def model_only(bundle: Path, files: list[Path], batch_size: int, threads: int) -> float:
    """Images/s of the forward pass alone on tensors decoded beforehand."""
    from raytumor.bundle import load_bundle
    from raytumor.formats import decode_image, fit_square
    from raytumor.predict import forward_probs

    torch.set_num_threads(threads)
    b = load_bundle(bundle, device="cpu")
    size = b.meta.image_size
    x = np.stack([fit_square(decode_image(p.read_bytes(), draft_size=size).pixels, size) for p in files])
    forward_probs(b.model, x[:batch_size], b.device)
    t0 = time.perf_counter()
    for i in range(0, len(x), batch_size):
        forward_probs(b.model, x[i : i + batch_size], b.device)
    return len(x) / (time.perf_counter() - t0)


class PeakMemory:
    """Samples PSS of this process and all its descendants (raylet, GCS, workers, actors)."""

    def __init__(self, interval: float = 0.25) -> None:
        import psutil

        self.psutil, self.interval = psutil, interval
        self.peak = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> int:
        me = self.psutil.Process()
        total = 0
        for p in [me, *me.children(recursive=True)]:
            try:
                total += p.memory_full_info().pss
            except (self.psutil.Error, AttributeError):
                continue
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.sample())
            time.sleep(self.interval)

    def __enter__(self) -> PeakMemory:
        self.baseline = self.sample()
        self._t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join()


def ray_score(bundle: Path, input_dir: Path, out: Path, batch_size: int) -> dict:
    from raytumor.score import ScoreConfig, score

    return score(
        ScoreConfig(bundle=str(bundle), input=str(input_dir), output=str(out), batch_size=batch_size)
    )


def link_copies(files: list[Path], dest: Path, copies: int) -> Path:
    """``copies`` × the files as symlinks with distinct names: distinct units, the same bytes."""
    dest.mkdir(parents=True)
    for c in range(copies):
        d = dest / f"c{c:02d}"
        d.mkdir()
        for i, p in enumerate(files):
            (d / f"{i:05d}{p.suffix}").symlink_to(p.resolve())
    return dest


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--limit", type=int, default=None, help="first N files only")
    p.add_argument("--copies", type=int, default=1, help="score each file this many times (distinct inputs)")
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=8, help="both sides; 8 is raytumor score's CPU default")
    p.add_argument("--rss-backbone", default="mobilenet_v3_large")
    p.add_argument("--rss-image-size", type=int, default=64)
    p.add_argument("--skip-rss", action="store_true")
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    # internal: one fused plain loop over a JSON file list (plain_tuned's subprocess)
    p.add_argument("--plain-only", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--bundle", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.plain_only:
        listing = [Path(f) for f in json.loads(args.plain_only.read_text())]
        print(plain_loop(args.bundle, listing, args.batch_size, args.threads, fused=True))
        return
    if not args.data.is_dir():
        sys.exit(f"{args.data} not found: pass --data (e.g. ../shared/data/br35h-3000)")

    from raytumor.runtime import init_ray

    threads = os.cpu_count() or 1
    files = list_images(args.data, args.limit) * args.copies
    res: dict = {
        "files": len(files),
        "backbone": args.backbone,
        "image_size": args.image_size,
        "threads": threads,
    }
    print(
        f"{len(files)} files from {args.data}; {args.backbone} {args.image_size}px batch {args.batch_size}; {threads} threads"
    )
    with tempfile.TemporaryDirectory(prefix="score-bench-") as tmp:
        tmp = Path(tmp)
        bundle = make_bundle(tmp / "bundle", args.backbone, args.image_size)
        inp = link_copies(files[: len(files) // args.copies], tmp / "in", args.copies)
        res["model_only"] = model_only(bundle, files, args.batch_size, threads)
        print(f"model only (preloaded tensors): {res['model_only']:8.1f} img/s", flush=True)
        res["plain"] = plain_loop(bundle, files, args.batch_size, threads)
        print(f"plain PyTorch loop (PIL decode): {res['plain']:8.1f} img/s", flush=True)
        res["plain_fused"] = plain_loop(bundle, files, args.batch_size, threads, fused=True)
        print(f"  same, BatchNorm folded:         {res['plain_fused']:8.1f} img/s", flush=True)
        res["plain_fused_tuned"] = plain_tuned(bundle, files, args.batch_size, threads)
        print(f"  folded + actors' malloc env:    {res['plain_fused_tuned']:8.1f} img/s", flush=True)
        init_ray(num_cpus=threads)
        # Ray's fixed cost per job (actor processes start, import torch, load the model; executor start):
        # a 16-file job in the same session. Steady-state rate = the rest of the time.
        tiny = link_copies(files[:16], tmp / "tiny", 1)
        res["ray_fixed_s"] = ray_score(bundle, tiny, tmp / "tiny_out", args.batch_size)["seconds"]
        s = ray_score(bundle, inp, tmp / "out", args.batch_size)
        assert s["rows"] == len(files) and s["errors"] == 0, s
        res["ray"] = len(files) / s["seconds"]
        res["ray_listing_s"] = s["listing_seconds"]
        print(
            f"raytumor score (Ray Data):      {res['ray']:8.1f} img/s  ({s['seconds']} s incl. listing and actor start)"
        )
        res["ray_steady"] = (len(files) - 16) / max(1e-9, s["seconds"] - res["ray_fixed_s"])
        # This machine's speed drifts by tens of percent over minutes: the plain loop runs again after the
        # Ray job (its session shut down first) and every ratio uses the mean of its two runs.
        import ray

        ray.shutdown()
        first = res["plain"]
        again = plain_loop(bundle, files, args.batch_size, threads)
        res["plain_runs"] = [first, again]
        res["plain"] = (first + again) / 2
        print(f"plain PyTorch loop again:        {again:8.1f} img/s (mean {res['plain']:.1f})", flush=True)
        print(
            f"  of which fixed cost {res['ray_fixed_s']:.1f} s (a 16-file job); steady state "
            f"{res['ray_steady']:.1f} img/s = {res['ray_steady'] / res['plain']:.3f}x the plain loop (mean)"
        )
        res["ray_vs_plain"] = res["ray"] / res["plain"]
        res["ray_vs_model_only"] = res["ray"] / res["model_only"]
        print(f"ratio Ray / plain loop:  {res['ray_vs_plain']:.3f}   (target >= 1.0)")
        print(f"ratio Ray / model only:  {res['ray_vs_model_only']:.3f}   (target >= 0.8)")
        res["ray_vs_plain_fused"] = res["ray"] / res["plain_fused"]
        print(
            f"ratio Ray / plain loop with BatchNorm folded: {res['ray_vs_plain_fused']:.3f}   "
            "(Ray's own overhead against the same engine in one process)"
        )
        res["ray_vs_plain_fused_tuned"] = res["ray"] / res["plain_fused_tuned"]
        print(
            f"ratio Ray / plain loop folded, actors' malloc env: {res['ray_vs_plain_fused_tuned']:.3f}   "
            "(everything the actors get, in one process)"
        )

        if not args.skip_rss:
            init_ray(num_cpus=threads)
            small = make_bundle(tmp / "small", args.rss_backbone, args.rss_image_size)
            peaks = {}
            for copies in (1, 10):
                src = link_copies(files[: len(files) // args.copies], tmp / f"rss{copies}", copies)
                with PeakMemory() as m:
                    s = ray_score(small, src, tmp / f"rss_out{copies}", 256)
                assert s["rows"] == copies * len(files) // args.copies and s["missing_rows"] == 0, s
                peaks[copies] = m.peak
                print(
                    f"{copies:>2}x files ({copies * len(files)}): peak PSS {m.peak / 2**20:8.0f} MiB "
                    f"(before {m.baseline / 2**20:.0f} MiB), {s['units_per_s']} units/s",
                    flush=True,
                )
            res["peak_pss_1x_mib"] = peaks[1] / 2**20
            res["peak_pss_10x_mib"] = peaks[10] / 2**20
            res["rss_growth_10x"] = peaks[10] / peaks[1]
            print(f"peak memory 10x / 1x: {res['rss_growth_10x']:.3f}   (target <= 1.2)")
    if args.json:
        args.json.write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
