"""Scoring at archive scale: a folder and a zip of >= 100,000 synthetic phantoms, end to end, as a user runs
it (`raytumor score` in its own process, its own Ray session).

For each layout, a 10,000-file and a 100,000-file archive (the large one the small one's files repeated
under other names: the same bytes, distinct inputs) are scored with a small randomly initialised model,
so the pipeline, not the network, sets the pace. Measured per run:

- rows/s in each tenth of the rows (from the Parquet parts' write times: the model actors write them as
  they score); steady state compared between the 2nd and the 9th tenth (the 1st holds start-up, the 10th
  the last partial batches)
                                                               target: last / first within 0.9-1.1
- peak memory: PSS summed over the command's process tree (driver, raylet, GCS, workers, actors)
                                                               target: 100k peak <= 1.2 x the 10k peak
- the longest silence between the command's own lines (listing, progress, summary)  target <= 30 s
- exactly one row per input (summary: rows == files, no missing, no duplicates)

    python bench/archive_scale.py                      # 10k and 100k, folder and zip (~25 min on 2 cores)
    python bench/archive_scale.py --files 2000,20000   # a quicker look
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from score_throughput import make_bundle  # noqa: E402


def phantom_pool(n: int, size: int, seed: int = 0) -> list[bytes]:
    """``n`` distinct JPEG phantoms, half with a lesion."""
    from PIL import Image

    from raytumor.phantoms import make_phantom

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(make_phantom(rng, size, tumour=bool(i % 2))).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def write_folder(pool: list[bytes], n: int, dest: Path) -> Path:
    """``n`` files in folders of 1,000: the pool written once, the rest hard links to it."""
    dest.mkdir(parents=True)
    first: list[Path] = []
    for i in range(n):
        d = dest / f"d{i // 1000:03d}"
        d.mkdir(exist_ok=True)
        p = d / f"{i:06d}.jpg"
        if i < len(pool):
            p.write_bytes(pool[i])
            first.append(p)
        else:
            os.link(first[i % len(pool)], p)
    return dest


def write_zip(pool: list[bytes], n: int, dest: Path) -> Path:
    with zipfile.ZipFile(dest, "w", zipfile.ZIP_STORED) as z:  # JPEG does not deflate
        for i in range(n):
            z.writestr(f"d{i // 1000:03d}/{i:06d}.jpg", pool[i % len(pool)])
    return dest


def tree_pss(pid: int) -> int:
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_full_info().pss
        except (psutil.Error, AttributeError):
            continue
    return total


def run_score(bundle: Path, inp: Path, out: Path, ray_tmp: Path) -> dict:
    """`raytumor score` in a new process: wall time, peak PSS of its tree, output line times."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env.update(RAY_TMPDIR=str(ray_tmp), PYTHONUNBUFFERED="1", RAY_USAGE_STATS_ENABLED="0")
    env.setdefault("RAY_AUTH_MODE", "disabled")
    ray_tmp.mkdir(parents=True, exist_ok=True)
    cmd = [str(Path(sys.executable).parent / "raytumor"), "score", "--bundle", str(bundle),
           "--input", str(inp), "--output", str(out)]  # fmt: skip
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    peak = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, tree_pss(proc.pid))
            time.sleep(0.5)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    lines: list[tuple[float, str]] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append((time.monotonic() - t0, line.rstrip()))
    rc = proc.wait()
    stop.set()
    sampler.join()
    wall = time.monotonic() - t0
    if rc != 0:
        sys.exit(f"score failed ({rc}):\n" + "\n".join(ln for _, ln in lines[-40:]))
    return {"wall_s": wall, "peak_pss": peak, "lines": lines}


def part_rates(scores_dir: Path) -> dict:
    """rows/s in each tenth of the rows, from each part's row count and write time. ``first``/``last``
    compare the 2nd and 9th tenths: the 1st holds the actors' start-up, the 10th the final flush of the
    write queue (parts land in bursts); all ten are kept in ``deciles``."""
    parts = sorted(
        (p.stat().st_mtime, pq.ParquetFile(p).metadata.num_rows) for p in scores_dir.glob("*.parquet")
    )
    t = np.array([m for m, _ in parts])
    cum = np.cumsum([r for _, r in parts])
    n = int(cum[-1])

    def time_at(k: float) -> float:  # when the k-th row was on storage
        return float(t[np.searchsorted(cum, k)])

    edges = [float(t[0]), *(time_at(k * n / 10) for k in range(1, 10)), float(t[-1])]
    deciles = [0.1 * n / max(1e-9, b - a) for a, b in zip(edges[:-1], edges[1:], strict=True)]
    deciles[0] = float(0.1 * n - cum[0]) / max(1e-9, edges[1] - edges[0])  # from the first part on
    return {
        "rows": n,
        "parts": len(parts),
        "rate_first": deciles[1],
        "rate_last": deciles[8],
        "last_over_first": deciles[8] / deciles[1],
        "deciles": [round(d, 1) for d in deciles],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--files", default="10000,100000", help="small,large archive sizes")
    p.add_argument("--layouts", default="folder,zip")
    p.add_argument("--pool", type=int, default=2000, help="distinct phantoms behind the archives")
    p.add_argument("--phantom-size", type=int, default=128)
    p.add_argument("--backbone", default="mobilenet_v3_large")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--workdir", type=Path, default=None, help="keep archives and outputs here")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    small, large = (int(x) for x in args.files.split(","))
    work = args.workdir or Path(tempfile.mkdtemp(prefix="archive-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    bundle = make_bundle(work / "bundle", args.backbone, args.image_size)
    pool = phantom_pool(args.pool, args.phantom_size)
    print(f"{len(pool)} distinct phantoms; {args.backbone} {args.image_size}px; work dir {work}", flush=True)
    res: dict = {"files": [small, large], "backbone": args.backbone, "image_size": args.image_size}
    for layout in args.layouts.split(","):
        for n in (small, large):
            key = f"{layout}_{n}"
            inp = (write_folder if layout == "folder" else write_zip)(
                pool, n, work / (f"in_{n}" if layout == "folder" else f"in_{n}.zip")
            )
            out = work / f"out_{key}"
            shutil.rmtree(out, ignore_errors=True)
            r = run_score(bundle, inp, out, work / "ray")
            summary = json.loads((out / "summary.json").read_text())
            assert summary["rows"] == n and summary["missing_rows"] == 0 and summary["duplicate_rows"] == 0, (
                summary
            )
            times = [s for s, ln in r["lines"] if ln.startswith("[score]")]  # its own lines, not Ray's
            gaps = np.diff([*times, r["wall_s"]])
            rates = part_rates(out / "scores")
            res[key] = {
                "wall_s": round(r["wall_s"], 1),
                "files_per_s": round(n / r["wall_s"], 1),
                "peak_pss_mib": round(r["peak_pss"] / 2**20),
                "max_output_gap_s": round(float(gaps.max()), 1),
                **{k: round(v, 3) if isinstance(v, float) else v for k, v in rates.items()},
            }
            print(f"{key}: {json.dumps(res[key])}", flush=True)
            if layout == "folder":
                shutil.rmtree(inp)
            else:
                inp.unlink()
        res[f"{layout}_peak_growth"] = round(
            res[f"{layout}_{large}"]["peak_pss_mib"] / res[f"{layout}_{small}"]["peak_pss_mib"], 3
        )
        print(
            f"{layout}: peak {large} / {small} = {res[f'{layout}_peak_growth']} (target <= 1.2); "
            f"rate last/first 10 % at {large}: {res[f'{layout}_{large}']['last_over_first']} (target 0.9-1.1); "
            f"longest silence {res[f'{layout}_{large}']['max_output_gap_s']} s (target <= 30)",
            flush=True,
        )
    if args.json:
        args.json.write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
