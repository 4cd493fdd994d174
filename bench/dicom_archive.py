"""Scoring a PACS export at archive scale: >= 20,000 single-frame DICOM files in >= 100 series, end to end
(`raytumor score` in its own process and Ray session, as a user runs it).

The archive: studies of one MR series (SYNTHETIC phantom slices, 2 mm apart, random file names, shuffled
into folders of a few hundred files as exports are), a 3-slice localizer each, and a CT series in every
fifth study. Each study/series/instance has its own UIDs; the pixels come from a small pool of phantom
volumes (the model sets the pace, not the generator). Measured for a small and a 5x larger archive:

- files/s end to end, and the share of the wall time in the header pass (header tasks + grouping on the
  driver; Ray's start-up, which the header pass triggers, reported apart)
- peak memory: PSS summed over the command's process tree               target: large <= 1.2 x small
- exactly one row per series, every file in one series row or its own row (the summary's accounting)
- the grouping step both ways on the large archive's headers: pandas on the driver (what scoring does)
  against a Ray Data ``groupby("series").map_groups`` that sorts each series (the alternative)

    python bench/dicom_archive.py                         # 4,140 and 20,700 files (~6 min on 2 cores)
    python bench/dicom_archive.py --studies 10,50         # a quicker look
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from archive_scale import run_score  # noqa: E402
from score_throughput import make_bundle  # noqa: E402


def phantom_volumes(n: int, slices: int, size: int) -> list[np.ndarray]:
    """``n`` SYNTHETIC (X, Y, Z) uint8 volumes of axial phantom slices, inferior -> superior."""
    from raytumor.phantoms import make_phantom

    rng = np.random.default_rng(0)
    return [
        np.flip(np.stack([make_phantom(rng, size, tumour=bool(v % 2)) for _ in range(slices)]), 1).transpose(
            2, 1, 0
        )
        for v in range(n)
    ]


def write_archive(dest: Path, studies: int, pool: list[np.ndarray], seed: int = 0) -> int:
    """The export: per study an MR series, a localizer, every fifth a CT series; files named at random and
    spread over folders of ~250. Returns the number of files."""
    from raytumor.synth_dicom import axial_affine, new_uid, series_files

    rng = np.random.default_rng(seed)
    dest.mkdir(parents=True)
    n = 0
    for s in range(studies):
        study = new_uid(rng)
        vol = pool[s % len(pool)]
        blobs = series_files(vol, axial_affine(vol.shape, slice_mm=2.0), rng=rng, study_uid=study)
        blobs += series_files(vol[:, :, :3], axial_affine(vol.shape), rng=rng, study_uid=study,
                              image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"))  # fmt: skip
        if s % 5 == 0:
            blobs += series_files(
                vol[:, :, :20], axial_affine(vol.shape), rng=rng, study_uid=study, modality="CT"
            )
        for b in blobs:
            d = dest / f"s{s:04d}" / f"f{rng.integers(0, max(1, len(blobs) // 250) + 1)}"
            d.mkdir(parents=True, exist_ok=True)
            (d / rng.bytes(8).hex().upper()).write_bytes(b)
        n += len(blobs)
    return n


def compare_grouping(headers_file: Path) -> dict:
    """Seconds to group the header rows into ordered series: the driver's pandas pass (raytumor.series) and
    a Ray Data groupby/map_groups doing the same sort (in a local Ray session of its own)."""
    import ray

    from raytumor.medical import series_grid
    from raytumor.series import SeriesRules, assemble

    headers = pd.read_parquet(headers_file)
    t0 = time.perf_counter()
    asm = assemble(headers, SeriesRules())
    driver_s = time.perf_counter() - t0

    def order(g: pd.DataFrame) -> pd.DataFrame:
        iop = json.loads(g["iop"].iloc[0]) if isinstance(g["iop"].iloc[0], str) else None
        if iop is None or len(g) < 2:
            return g[["id", "series"]].assign(k=0)
        o, grid, _ = series_grid(np.array([json.loads(p) for p in g["ipp"]]), iop)
        return g.iloc[o][["id", "series"]].assign(k=grid)

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        ds = ray.data.from_pandas(headers[headers["series"].notna()])
        t0 = time.perf_counter()
        n = ds.groupby("series").map_groups(order, batch_format="pandas").count()
        ray_s = time.perf_counter() - t0
    finally:
        ray.shutdown()
    return {"rows": len(headers), "series": len(asm.series), "driver_pandas_s": round(driver_s, 2),
            "ray_data_groupby_s": round(ray_s, 2), "ray_rows": n}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--studies", default="20,100", help="small,large archive sizes in studies")
    p.add_argument("--slices", type=int, default=200, help="slices of each MR series")
    p.add_argument("--size", type=int, default=128, help="phantom slice size (pixels)")
    p.add_argument("--backbone", default="mobilenet_v3_large")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    small, large = (int(x) for x in args.studies.split(","))
    work = args.workdir or Path(tempfile.mkdtemp(prefix="dicom-archive-"))
    work.mkdir(parents=True, exist_ok=True)
    bundle = make_bundle(work / "bundle", args.backbone, args.image_size)
    pool = phantom_volumes(4, args.slices, args.size)
    res: dict = {"backbone": args.backbone, "image_size": args.image_size, "slices": args.slices}
    for studies in (small, large):
        inp, out = work / f"in_{studies}", work / f"out_{studies}"
        shutil.rmtree(inp, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.time()
        n = write_archive(inp, studies, pool)
        print(f"{studies} studies: {n:,} files written in {time.time() - t0:.0f} s", flush=True)
        r = run_score(bundle, inp, out, work / "ray")
        s = json.loads((out / "summary.json").read_text())
        ds = s["dicom_series"]
        assert s["missing_rows"] == 0 and s["duplicate_rows"] == 0 and s["files_counted_twice"] == 0, s
        assert s["series_files_mismatch"] == 0 and s["files_in_series"] == n, s
        header_s = ds["header_seconds"] - ds["ray_start_seconds"]
        res[str(studies)] = {
            "files": n,
            "series": ds["series"],
            "series_scored": s["series_scored"],
            "series_skipped": s["skipped"],
            "wall_s": round(r["wall_s"], 1),
            "files_per_s": round(n / r["wall_s"], 1),
            "header_pass_s": round(header_s, 1),
            "header_share": round(header_s / r["wall_s"], 3),
            "ray_start_s": ds["ray_start_seconds"],
            "peak_pss_mib": round(r["peak_pss"] / 2**20),
            "slices_scored": s["images_scored"],
        }
        print(f"{studies}: {json.dumps(res[str(studies)])}", flush=True)
        shutil.rmtree(inp)
    res["peak_growth"] = round(res[str(large)]["peak_pss_mib"] / res[str(small)]["peak_pss_mib"], 3)
    res["grouping"] = compare_grouping(work / f"out_{large}" / "dicom_headers.parquet")
    print(
        f"peak {large} / {small} studies = {res['peak_growth']} (target <= 1.2); grouping: {res['grouping']}"
    )
    if args.json:
        args.json.write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
