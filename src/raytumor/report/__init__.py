"""``raytumor report``: a self-contained HTML evaluation report of a model bundle on labelled data.

Everything is computed once into one dict (``report.json``); the HTML page and the figures are rendered
from that dict, so the page, ``report.json`` and ``metrics.json`` (written by
:func:`raytumor.evaluate.evaluate_source`) show the same numbers. The page embeds its figures as base64
``data:`` URIs and references no external resource, so it can be mailed or archived as a single file; the
figures are also written next to it as PNG files.

Modules, top-down: :mod:`~raytumor.report.cli` (options, ``main``) -> :mod:`~raytumor.report.compute`
(the report dict) -> :mod:`~raytumor.report.card` (model card facts), :mod:`~raytumor.report.figures`
(matplotlib), :mod:`~raytumor.report.gallery` (Grad-CAM) -> :mod:`~raytumor.report.render` (HTML, one
function per section) and :mod:`~raytumor.report.fmt` (the page's number formats).
"""

from __future__ import annotations

from raytumor.report.card import INTENDED_USE, KNOWN_LIMITS, RESEARCH_BANNER
from raytumor.report.cli import get_args_parser, main
from raytumor.report.compute import N_BINS, REPORT_FILE, REPORT_JSON, build_report, show_by_source
from raytumor.report.fmt import fmt, fmt_ci
from raytumor.report.render import render_html

__all__ = [
    "INTENDED_USE",
    "KNOWN_LIMITS",
    "N_BINS",
    "REPORT_FILE",
    "REPORT_JSON",
    "RESEARCH_BANNER",
    "build_report",
    "fmt",
    "fmt_ci",
    "get_args_parser",
    "main",
    "render_html",
    "show_by_source",
]
