"""The page's number formats, shared by the HTML and the figure legends so both print a value alike."""

from __future__ import annotations

import html
import math
from typing import Any

import numpy as np

DASH = "\u2014"


def fmt(v: Any, digits: int = 3) -> str:
    """A metric: fixed ``digits`` decimals, integers as they are, missing/NaN as a dash (tests look for
    these strings)."""
    if v is None:
        return DASH
    if isinstance(v, (bool, np.bool_)):
        return "yes" if v else "no"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        return DASH if not math.isfinite(v) else f"{float(v):.{digits}f}"
    return str(v)


def fmt_ci(ci: Any) -> str:
    """``[lo, hi]`` of a 95% interval, or "" when it is undefined."""
    if not ci or ci[0] is None or ci[1] is None:
        return ""
    return f"[{fmt(ci[0])}, {fmt(ci[1])}]"


def fmt_setting(v: Any) -> str:
    """A hyperparameter as set: significant digits, not fixed decimals, since a learning rate of 0.00154
    shown with 3 decimals reads as 0.002."""
    if isinstance(v, (float, np.floating)) and math.isfinite(v):
        return f"{float(v):.6g}"
    if isinstance(v, (list, tuple)):
        return ", ".join(fmt_setting(x) for x in v)
    if isinstance(v, dict):
        return ", ".join(f"{k}={fmt_setting(x)}" for k, x in v.items()) or DASH
    return fmt(v)


def data_text(data: Any) -> str:
    """One or several data arguments as one line."""
    return " + ".join(map(str, data)) if isinstance(data, (list, tuple)) else str(data)


def html_cell(v: Any) -> str:
    """A table cell's text: :func:`fmt` (strings as they are), HTML-escaped."""
    return html.escape(fmt(v))


def html_table(head: list[str], rows: list[list[Any]], cls: str = "") -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{html_cell(v)}</td>" for v in r) + "</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>'


def html_kv(rows: list[tuple[str, Any]]) -> str:
    """A two-column key/value table."""
    body = "".join(f"<tr><th>{html.escape(k)}</th><td>{html_cell(v)}</td></tr>" for k, v in rows)
    return f'<table class="kv"><tbody>{body}</tbody></table>'
