"""``raytumor review OUTPUT``: a local page over a finished score output where people check flagged scans,
record verdicts (``OUTPUT/reviews.csv``) and export them as training data (``--export``).

Modules: ``store`` (rows, filters, the verdict log; no model), ``scans`` (a row's pictures and per-slice
curve, through the scorer's own decode and predictor), ``app`` (the Starlette app), ``export`` (corrections
manifest), ``job`` (config, CLI, server).
"""

from __future__ import annotations

from raytumor.review.job import ReviewConfig, get_args_parser, main

__all__ = ["ReviewConfig", "get_args_parser", "main"]
