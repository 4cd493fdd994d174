"""Batch scoring (``raytumor score``): a Ray Data job that turns a folder, bucket, manifest or archive of scans into score rows.

    list units (driver) → read + decode + preprocess (CPU tasks) → model (actor pool, GPU when present)
    → Parquet parts under OUTPUT/scores/ (+ scores.csv, per-slice rows, Grad-CAM PNGs on request)

A *unit* is what gets one output row: a file, an archive member (``archive!member``) or a volume (NIfTI,
multi-frame DICOM: one row with the max/mean slice score and the slice that gave the max). Bad input
becomes an error row, never a crash and never a missing row. Parts are written as blocks finish, so a
rerun of the same command reads the ids already written and scores only the rest (a part cut off mid
write has no Parquet footer: it is unreadable, deleted, and its units are scored again).

Nothing from inside a scan reaches the output but its pixels' scores: no DICOM tags (PHI), and archive
member names only ever appear as strings in the ``path`` column, never as output file names.

A DICOM series (single-frame files of one series) is one unit too: ``series`` runs the header pass that
finds them, ``dicom_sr`` writes a Structured Report per scored series on request.

Modules: ``job`` (config, plan, pipeline, summary, CLI), ``series`` (DICOM header pass), ``decode`` (read +
decode tasks), ``actors`` (the model actors, built on :class:`raytumor.predict.Predictor`), ``adabn`` (the
adaptation pass), ``dicom_sr``. Listing units lives in :mod:`raytumor.storage`, the output contract in
:mod:`raytumor.results`.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ScoreConfig", "get_args_parser", "main", "score"]


def __getattr__(name: str) -> Any:
    # Lazy: Ray tasks import this package to reach their function (e.g. the DICOM header task), and the job
    # module pulls in torch through the bundle (~1.3 s per worker process for nothing).
    if name in __all__:
        from raytumor.score import job

        return getattr(job, name)
    raise AttributeError(f"module 'raytumor.score' has no attribute {name!r}")
