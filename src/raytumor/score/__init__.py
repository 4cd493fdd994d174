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

Modules: ``job`` (config, plan, pipeline, summary, CLI), ``decode`` (read + decode tasks), ``actors`` (the
model actors, built on :class:`raytumor.predict.Predictor`), ``adabn`` (the adaptation pass). Listing
units lives in :mod:`raytumor.storage`, the output contract in :mod:`raytumor.results`.
"""

from raytumor.score.job import ScoreConfig, get_args_parser, main, score

__all__ = ["ScoreConfig", "get_args_parser", "main", "score"]
