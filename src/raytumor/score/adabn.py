"""The AdaBN pass of ``raytumor score --adapt adabn``: BatchNorm statistics of the archive being scored.

A first streaming pass over a seeded sample of the input, through exactly the read/decode stage and the
slice range scoring uses; the merged state is saved as OUTPUT/adabn_state.pt and a resumed run reuses it,
so every row of one output was scored with the same statistics.
"""

from __future__ import annotations

import io
import posixpath
import time
from typing import Any

import pyarrow.fs as pafs
import torch

from raytumor.adapt import has_batchnorm, merge_states
from raytumor.bundle import BundleMeta
from raytumor.predict import Predictor
from raytumor.results import ADABN_FILE
from raytumor.runtime import pool_size
from raytumor.score.actors import BNStatsTask
from raytumor.score.decode import map_read_decode
from raytumor.storage import StorageOptions, Units, get_filesystem, join


def _measure(
    cfg: Any, units: Units, meta: BundleMeta, storage: StorageOptions | None, r: dict
) -> dict | None:
    """Merged BatchNorm statistics of (a sample of) the units, or None when nothing decoded."""
    import ray.data
    from ray.data import ActorPoolStrategy

    table = units.table
    # Volumes hold ~50-100 slices each: cap units too, or the sample would be the whole archive.
    n_units = len(table) if cfg.adapt_samples <= 0 else min(len(table), cfg.adapt_samples)
    sample = table.sample(n=n_units, random_state=0) if n_units < len(table) else table
    n_blocks = max(1, -(-len(sample) // 64))
    ds = ray.data.from_pandas(sample.reset_index(drop=True)).repartition(n_blocks)
    ds = map_read_decode(ds, cfg, meta, storage, r, cfg.volume_range, 64)
    ds = ds.map_batches(
        BNStatsTask,
        fn_constructor_kwargs={
            "bundle_dir": cfg.bundle_ref(),
            "storage": storage,
            "num_threads": r["threads"],
        },
        compute=ActorPoolStrategy(size=pool_size(cfg.num_actors or r["size"], n_blocks)),
        batch_size=64,
        num_cpus=r["num_cpus"],
        num_gpus=r["num_gpus"],
        memory=r["memory"],
        batch_format="numpy",
        **r.get("remote_args", {}),
    )
    state: dict | None = None
    seen = 0
    for row in ds.iter_rows():
        part = torch.load(io.BytesIO(row["state"]), map_location="cpu", weights_only=True)
        state = part if state is None else merge_states([state, part])
        seen += int(row["images"])
        if cfg.adapt_samples > 0 and seen >= cfg.adapt_samples:
            break  # enough images: dropping the iterator stops the rest of the pass
    return state if state is not None and state["layers"] else None


def adabn_state(
    cfg: Any, units: Units, meta: BundleMeta, storage: StorageOptions | None, r: dict[str, Any]
) -> tuple[dict | None, dict[str, Any]]:
    """(BatchNorm state or None, what happened) for ``cfg`` (a ``ScoreConfig``): reused from OUTPUT when a
    previous run saved one, else measured and saved."""
    fs, path = get_filesystem(join(cfg.output, ADABN_FILE), storage)
    if fs.get_file_info(path).type == pafs.FileType.File:
        with fs.open_input_stream(path) as f:
            state = torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=True)
        return state, {"images": int(state["images_seen"]), "reused": True}
    if not has_batchnorm(Predictor.from_bundle(cfg.bundle, device="cpu", storage=storage).bundle.model):
        print(
            f"[score] AdaBN: {meta.backbone} has no BatchNorm layers; scoring without adaptation", flush=True
        )
        return None, {"images": 0, "skipped": "no BatchNorm layers"}
    t0 = time.time()
    state = _measure(cfg, units, meta, storage, r)
    if state is None:
        print("[score] AdaBN: no decodable images to adapt on; scoring without adaptation", flush=True)
        return None, {"images": 0, "skipped": "no decodable images"}
    buf = io.BytesIO()
    torch.save(state, buf)
    fs.create_dir(posixpath.dirname(path) or ".", recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(buf.getvalue())
    n_units = len(units.table) if cfg.adapt_samples <= 0 else min(len(units.table), cfg.adapt_samples)
    info = {
        "images": int(state["images_seen"]),
        "units_sampled": n_units,
        "seconds": round(time.time() - t0, 1),
    }
    print(
        f"[score] AdaBN: BatchNorm statistics from {info['images']} images in {info['seconds']} s", flush=True
    )
    return state, info
