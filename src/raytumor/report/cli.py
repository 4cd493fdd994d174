"""``raytumor report``: its config (one dataclass, the options built from it) and entry point."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

from raytumor.config import from_args, opt, stage_parser
from raytumor.evaluate import LocalisationOptions, SourceOptions
from raytumor.report.compute import build_report
from raytumor.runtime import init_ray  # imports Ray only when called


@dataclass(kw_only=True)
class ReportConfig(SourceOptions, LocalisationOptions):
    """``--data`` (repeatable), ``--source-pattern`` and the pointing-game options are evaluate's
    (:class:`SourceOptions`, :class:`LocalisationOptions`), so both stages read sources alike."""

    bundle: str = opt(
        help="model bundle: a directory or s3://|gs:// URI (from raytumor train/tune)", required=True
    )
    out: str = opt(help="output directory for report.html, report.json and PNGs", required=True)
    target_sensitivity: float = opt(0.95, "sensitivity the threshold analysis searches a threshold for")
    n_boot: int = opt(1000, "bootstrap resamples for the 95 percent confidence intervals")
    gallery: int = opt(6, "Grad-CAM overlays per error kind (FN, FP)")
    s3_endpoint: str | None = opt(None)
    seed: int = opt(0)
    keep_duplicates: bool = opt(
        False, "do not exclude files that duplicate the bundle's training/validation files"
    )
    scores: str | None = opt(
        None,
        "report on a finished `raytumor score` output of the same files instead of predicting (no Ray): "
        "volumes (NIfTI, multi-frame DICOM) as volume rows with slice and volume false-positive rates, "
        "test-time adaptation as it was scored. Files are not de-duplicated against the training data",
        metavar="SCORE_OUTPUT",
    )


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    return stage_parser(
        ReportConfig, "Self-contained HTML evaluation report of a model bundle on labelled data", add_help
    )


def main(args: argparse.Namespace) -> dict[str, Any]:
    cfg = from_args(ReportConfig, args)  # a bad --source-pattern fails here, before Ray starts
    if not cfg.scores:  # a score output is read without Ray
        init_ray()
    rep = build_report(
        cfg.bundle,
        cfg.data,
        cfg.out,
        target_sensitivity=cfg.target_sensitivity,
        n_boot=cfg.n_boot,
        gallery=cfg.gallery,
        seed=cfg.seed,
        s3_endpoint=cfg.s3_endpoint,
        exclude_duplicates=not cfg.keep_duplicates,
        source_pattern=cfg.source_pattern,
        scores=cfg.scores,
        localisation=cfg.localisation,
        localisation_tolerance=cfg.localisation_tolerance,
    )
    print(f"report written to {rep['outputs']['html']}")
    print(f"metrics written to {rep['outputs']['metrics_json']}")
    return rep
