"""The HTML page: one function per section, each rendering its part of the report dict.

The page is self-contained (figures embedded as base64 ``data:`` URIs, no external resource), so it can be
mailed or archived as one file. Values are escaped here and nowhere else; numbers go through
:mod:`raytumor.report.fmt`, the one format of the page.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Callable
from typing import Any

from raytumor.report.card import unfitted_threshold
from raytumor.report.fmt import data_text, fmt, fmt_ci, fmt_setting, html_cell, html_kv, html_table

Figures = dict[str, bytes]

CSS = """
body{font-family:-apple-system,"Segoe UI",Roboto,"DejaVu Sans",Arial,sans-serif;margin:0;background:#f4f6f8;
color:#1d2733;font-size:14px;line-height:1.45}
main{max-width:1180px;margin:0 auto;padding:16px 24px 48px}
.banner{background:#b00020;color:#fff;font-weight:700;padding:10px 24px;text-align:center;font-size:15px}
h1{font-size:24px;margin:18px 0 4px} h2{font-size:18px;margin:0 0 10px;color:#0b3d6b}
section{background:#fff;border:1px solid #dde3ea;border-radius:8px;padding:16px 20px;margin:16px 0}
.sub{color:#5a6b7d;margin:0 0 8px}
.grid{display:grid;grid-template-columns:1fr 1fr;gap:16px;align-items:start}
img{max-width:100%;height:auto;display:block}
table{border-collapse:collapse;margin:6px 0 10px;font-variant-numeric:tabular-nums}
th,td{border:1px solid #dde3ea;padding:4px 10px;text-align:right}
th{background:#eef2f6;font-weight:600} td:first-child,th:first-child{text-align:left}
table.kv th{text-align:left;width:260px} table.kv td{text-align:left}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(220px,1fr));gap:12px}
.card{border:1px solid #dde3ea;border-radius:6px;padding:6px;background:#fafbfc;font-size:12px}
.card p{margin:4px 2px;word-break:break-all} .card img{width:100%}
.note{color:#5a6b7d;font-style:italic}
.metric{display:inline-block;margin:0 18px 8px 0} .metric b{font-size:20px;display:block}
ul{margin:4px 0 8px 18px;padding:0}
"""


def render_html(rep: dict[str, Any], figures: Figures) -> str:
    """The whole page from a JSON-clean report dict (``report.json``) and its PNGs."""
    sections: list[Callable[[dict[str, Any], Figures], str]] = [
        _summary, _curves, _by_source, _by_kind, _scope, _confusion, _calibration, _threshold, _training,
        _splits, _gallery, _localisation, _model_card,
    ]  # fmt: skip
    b = rep["bundle"]
    head = (
        f'<div class="banner" id="banner">{html.escape(rep["banner"])}</div><main>'
        f"<h1>Evaluation report \u2014 {html.escape(b['backbone'])} bundle {html.escape(b['bundle_id'])}</h1>"
        f'<p class="sub">generated {html.escape(rep["generated_at"])}</p>'
    )
    parts = [head, *(section(rep, figures) for section in sections)]
    parts.append(f'<p class="sub">{html.escape(rep["banner"])}</p></main>')
    title = f"raytumor report {b['bundle_id']}"
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>\n"
        + "\n".join(p for p in parts if p)
        + "\n</body></html>\n"
    )


# ----------------------------------------------------------------------------------------------------------
# Building blocks


def _img(figures: Figures, name: str, alt: str) -> str:
    if name not in figures:
        return ""
    b64 = base64.b64encode(figures[name]).decode("ascii")
    return f'<img src="data:image/png;base64,{b64}" alt="{html.escape(alt)}">'


def _section(sid: str, title: str, *body: str) -> str:
    return f'<section id="{sid}"><h2>{html.escape(title)}</h2>' + "".join(body) + "</section>"


def _note(text: str) -> str:
    return f'<p class="note">{html.escape(text)}</p>'


def _threshold_words(rep: dict[str, Any]) -> dict[str, Any]:
    """Where the bundle's threshold came from (the model card's record); a report.json written before it
    was recorded cannot show a fit, so it reads as the unfitted default."""
    return (rep.get("model_card") or {}).get("threshold") or unfitted_threshold("not recorded")


def _evaluation_rows(rep: dict[str, Any]) -> list[tuple[str, Any]]:
    """What happened to the listed files. Per-class counts are of the evaluated rows (those with a
    prediction), so they add up to n whatever produced the predictions."""
    f, m, so = rep["files"], rep["metrics"], rep.get("score_output")
    rows: list[tuple[str, Any]] = [("files listed", f.get("files_listed"))]
    if so:
        rows += [
            ("error rows in the score output (all files)", so["error_rows"]),
            ("labelled files with an error row (not evaluated)", so["error_rows_labelled"]),
            ("score rows of unlisted files (ignored)", so["rows_of_unlisted_files"]),
        ]
    else:
        rows += [
            ("files decoded", f.get("files_decoded")),
            ("files rejected", f.get("files_rejected")),
            ("excluded as duplicates of training data", f.get("excluded_duplicates_of_training")),
        ]
        if m.get("failed_predictions"):  # a score output's error rows are these, counted above
            rows.append(("failed at prediction (not evaluated)", m["failed_predictions"]))
    rows.append(("scans evaluated", rep["n"]))
    rows += [(f"evaluated, class {k}", v) for k, v in rep["evaluated_per_class"].items()]
    return rows


# ----------------------------------------------------------------------------------------------------------
# Sections, in page order


def _summary(rep: dict[str, Any], figures: Figures) -> str:
    b, m, f, so = rep["bundle"], rep["metrics"], rep["files"], rep.get("score_output")
    headline = [("n scans", rep["n"]), ("ROC AUC", m.get("roc_auc")), ("sensitivity", m.get("sensitivity")),
                ("specificity", m.get("specificity"))]  # fmt: skip
    metrics = "".join(
        f'<span class="metric"><b>{html_cell(v)}</b>{html.escape(k)}</span>' for k, v in headline
    )
    rows: list[tuple[str, Any]] = [
        ("bundle id", b["bundle_id"]),
        ("backbone", b["backbone"]),
        ("classes", ", ".join(b["classes"])),
        ("negative (no-tumour) class", b["negative_class"]),
        ("input", f"{b['image_size']} px, {b['channels']}, {b['geometry']}"),
        ("operating threshold (bundle)", f"{fmt(b['threshold'])} ({_threshold_words(rep)['label']})"),
        ("temperature (bundle)", fmt(b["temperature"])),
        ("bundle created", b["created_at"]),
        ("data evaluated", data_text(rep["data"])),
        ("scans evaluated (n)", rep["n"]),
    ]
    if so:
        rows += [
            ("predictions from score output", so["path"]),
            ("test-time adaptation (as scored)", ", ".join(rep.get("adaptation") or []) or "none"),
            ("error rows in the score output (all files)", so["error_rows"]),
            ("labelled files with an error row (not evaluated)", so["error_rows_labelled"]),
        ]
    else:
        rows += [
            ("excluded as duplicates of training data", f.get("excluded_duplicates_of_training")),
            ("rejected files (could not be decoded)", f.get("files_rejected")),
        ]
    sc = rep.get("scope")
    if sc and sc.get("recorded"):
        rows.append(("out of scope (refused by the bundle)", f"{sc['out_of_scope']} of {sc['evaluated']}"))
    rows += [
        ("files listed", f.get("files_listed")),
        ("bootstrap resamples (95% CI)", rep["settings"]["n_boot"]),
    ]
    return _section("summary", "Summary", metrics, html_kv(rows))


def _curves(rep: dict[str, Any], figures: Figures) -> str:
    title = "Discrimination: ROC and precision\u2013recall"
    c, m = rep.get("curves"), rep["metrics"]
    if not c:
        return _section("curves", title, _note("No single tumour score (multi-class without a no-tumour "
                                               "class): no ROC/PR."))  # fmt: skip
    ci = m.get("ci95", {})
    rows = [
        ["ROC AUC", c["roc_auc"], fmt_ci(c["roc_auc_ci95"])],
        ["average precision", c["average_precision"], fmt_ci(c["average_precision_ci95"])],
        *[
            [k, m.get(k), fmt_ci(ci.get(k))]
            for k in ("accuracy", "sensitivity", "specificity", "ppv", "npv", "f1")
        ],
    ]
    resampling = c.get("ci95_resampling") or "scans"
    text = (
        f'<p class="sub">Tumour score vs tumour label; prevalence {html_cell(c["prevalence"])}. Red dot: operating '
        f"point at the bundle threshold {html_cell(rep['bundle']['threshold'])}. The 95% intervals resample "
        f"{html.escape(resampling)}.</p>"
    )
    grid = f'<div class="grid">{_img(figures, "roc.png", "ROC curve")}{_img(figures, "pr.png", "PR curve")}</div>'
    return _section("curves", title, html_table(["metric", "value", "95% CI (bootstrap)"], rows), text, grid)


def _by_source(rep: dict[str, Any], figures: Figures) -> str:
    bs = rep.get("by_source")
    if not bs:
        return ""
    rows = []
    for key, sm in bs.items():
        sci = sm.get("ci95") or {}
        rows.append(
            [key, sm.get("n"), sm.get("positives"), sm.get("roc_auc"), fmt_ci(sci.get("roc_auc")),
             sm.get("sensitivity"), fmt_ci(sci.get("sensitivity")), sm.get("specificity"),
             fmt_ci(sci.get("specificity")), sm.get("fp_rate"), sm.get("threshold")]
        )  # fmt: skip
    head = ["source", "n", "positives", "ROC AUC", "AUC 95% CI", "sensitivity", "sensitivity 95% CI",
            "specificity", "specificity 95% CI", "FP rate", "threshold"]  # fmt: skip
    clustered = sum(sm.get("ci95_resampling", "scans") != "scans" for sm in bs.values())
    text = (
        '<p class="sub">One row per source key: a manifest\'s <code>source</code> value up to '
        "\u201c via \u201d (or the <code>--source-pattern</code> match), else the data argument. A pooled "
        "metric can hide a source where the model fails; a source holding only no-tumour scans (healthy "
        "controls from a new site) has no sensitivity or AUC, and its specificity is the share of its "
        "scans called no tumour (FP rate = 1 \u2212 specificity). Bootstrap 95% CIs resample whole "
        f"patients where the data names them (patient_id: {clustered} of {len(bs)} sources), else "
        "single scans.</p>"
    )
    return _section("by-source", "By source", html_table(head, rows, "by-source"), text)


def _by_kind(rep: dict[str, Any], figures: Figures) -> str:
    bk = rep.get("by_kind")
    if not bk:
        return ""
    names = {
        "image": "slices (one image per file)",
        "volume": "volumes (volume rule)",
        "series": "DICOM series (volume rule)",
    }
    rows = []
    for key, km in bk.items():
        kci = km.get("ci95") or {}
        rows.append(
            [names.get(key, key), km.get("n"), km.get("positives"), km.get("roc_auc"),
             km.get("sensitivity"), fmt_ci(kci.get("sensitivity")), km.get("specificity"),
             fmt_ci(kci.get("specificity")), km.get("false_positives"), km.get("fp_rate")]
        )  # fmt: skip
    head = ["kind", "n", "positives", "ROC AUC", "sensitivity", "sensitivity 95% CI", "specificity",
            "specificity 95% CI", "false positives", "FP rate"]  # fmt: skip
    text = (
        '<p class="sub">A NIfTI or multi-frame DICOM file is one volume row, judged by its volume score '
        "(the tumour score sustained over adjacent slices, see <code>raytumor score --help</code>), not by "
        "its most suspicious slice; every other file is one slice. The volume false-positive rate is the "
        "share of healthy volumes flagged as a whole.</p>"
    )
    return _section("by-kind", "Slices and volumes", html_table(head, rows, "by-kind"), text)


SCOPE_METRICS = ("accuracy", "roc_auc", "sensitivity", "specificity", "ppv", "npv", "f1")


def _breakdown_table(by: dict[str, dict[str, Any]], what: str, cls: str) -> str:
    """One row per key (view, sequence): n, rows out of scope, positives, AUC, sensitivity and specificity
    with their 95% CIs, FP rate."""
    rows = []
    for key, m in by.items():
        ci = m.get("ci95") or {}
        rows.append(
            [key, m.get("n"), m.get("out_of_scope"), m.get("positives"), m.get("roc_auc"),
             m.get("sensitivity"), fmt_ci(ci.get("sensitivity")), m.get("specificity"),
             fmt_ci(ci.get("specificity")), m.get("fp_rate")]
        )  # fmt: skip
    head = [what, "n", "out of scope", "positives", "ROC AUC", "sensitivity", "sensitivity 95% CI",
            "specificity", "specificity 95% CI", "FP rate"]  # fmt: skip
    return html_table(head, rows, cls)


def _scope(rep: dict[str, Any], figures: Figures) -> str:
    sc = rep.get("scope")
    if not sc:
        return ""
    body = [
        '<p class="sub">The bundle scores only inputs like those it was trained on: an MR modality, a view of '
        "which it saw enough examples of every class, and features not too far from its training data (OOD "
        "score). Refused rows keep their probabilities: “all rows” is what the model would have "
        "said about everything, “in scope” what it reports. Refused rows are counted here, never "
        "as negatives.</p>"
    ]
    if not sc.get("recorded"):
        body.append(_note("These predictions carry no scope columns (written before bundles knew their "
                          "scope): every row is taken as in scope, view unknown."))  # fmt: skip
    share = sc.get("out_of_scope_share")
    body.append(
        html_kv([("scans with a prediction", sc["evaluated"]), ("in scope", sc["in_scope"]),
             ("out of scope", sc["out_of_scope"]), ("out-of-scope share", share)])
    )  # fmt: skip
    if sc["out_of_scope"]:
        body.append("<h3>Why inputs were refused</h3>")
        body.append(
            html_table(["reason", "scans"], [[k, v] for k, v in sc["reasons"].items()], "scope-reasons")
        )
        body.append(html_table(["true class of refused scans", "scans"],
                           [[k, v] for k, v in sc["out_of_scope_by_class"].items()]))  # fmt: skip
    m_all, m_in = rep["metrics"], sc.get("metrics") or {}
    ci_all, ci_in = m_all.get("ci95") or {}, m_in.get("ci95") or {}
    rows = [["n", m_all.get("n"), "", m_in.get("n"), ""]]
    rows += [
        [k, m_all.get(k), fmt_ci(ci_all.get(k)), m_in.get(k), fmt_ci(ci_in.get(k))] for k in SCOPE_METRICS
    ]
    rows.append(["false positives", m_all.get("false_positives"), "", m_in.get("false_positives"), ""])
    body.append("<h3>All rows vs in scope</h3>")
    body.append(
        html_table(["metric", "all rows", "95% CI", "in scope only", "95% CI"], rows, "scope-metrics")
    )
    om = sc.get("out_of_scope_metrics")
    if om:
        body.append(
            f'<p class="sub">Had the model scored the {html_cell(om.get("n"))} refused scans at its threshold: '
            f"sensitivity {html_cell(om.get('sensitivity'))}, specificity {html_cell(om.get('specificity'))}, "
            f"{html_cell(om.get('false_positives'))} false positives.</p>"
        )
    vs = sc.get("view_source") or {}
    body.append(
        '<p class="sub">View of each scan: from the DICOM/NIfTI geometry (header) or the bundle\'s view net '
        "(model); " + html.escape(", ".join(f"{k} {v}" for k, v in vs.items())) + ".</p>"
    )
    if rep.get("by_view"):
        body += ["<h3>By view (all rows)</h3>", _breakdown_table(rep["by_view"], "view", "by-view")]
    if rep.get("by_sequence"):
        body += [
            "<h3>By sequence (all rows)</h3>",
            _breakdown_table(rep["by_sequence"], "sequence", "by-sequence"),
        ]
    thumbs = sc.get("thumbnails") or []
    if thumbs:
        cards = []
        for it in thumbs:
            pic = _img(figures, it.get("png", ""), it["basename"]) or _note(
                f"not rendered: {it.get('error', '')}"
            )
            # the view, unless the reason already names it
            view = "" if it["reason"].startswith("view") else f" \u00b7 view {it.get('view') or 'unknown'}"
            cards.append(
                f'<div class="card">{pic}<p><b>{html.escape(it["basename"])}</b><br>'
                f"{html.escape(it['reason'] + view)}<br>"
                f"score {html_cell(it.get('score'))}</p></div>"
            )
        body += [f"<h3>Refused inputs \u2014 {len(thumbs)} shown (model input)</h3>",
                 '<div class="cards">' + "".join(cards) + "</div>"]  # fmt: skip
    return _section("scope", "Scope: in scope vs all inputs", *body)


def _localisation(rep: dict[str, Any], figures: Figures) -> str:
    title = "Grad-CAM localisation: does the heat map point at the tumour?"
    loc = rep.get("localisation")
    if not loc:
        why = (
            "The pointing game was switched off (--no-localisation)."
            if not rep["settings"].get("localisation", True)
            else "The labelled data has no mask column (expert tumour masks): no localisation check."
        )
        return _section("localisation", title, _note(why))
    tol = f"within {100 * loc['tolerance']:g}% of the image"
    text = (
        '<p class="sub">Pointing game: for each tumour image with an expert mask, the peak of the Grad-CAM '
        "heat map of its true class, found on the model input and mapped back through the head crop, padding "
        "and resize to the original image, hits when it lies on the mask. The tolerant variant also counts a "
        f"peak {html.escape(tol)} (long side) from the mask. Baselines: a point that always sits at the centre "
        "of the model input, and a uniformly random point in the image or in the head (the mask's share of "
        "them). 95% intervals resample "
        f"{html.escape(loc.get('ci95_resampling') or 'scans')}. A hit says where the evidence came from, not "
        "that it is clinically meaningful.</p>"
    )
    rows = [_localisation_row("all tumour images", loc)]
    if loc.get("among_called_tumour"):
        rows.append(_localisation_row("called tumour by the model", loc["among_called_tumour"]))
    if loc.get("in_scope"):
        rows.append(_localisation_row("in scope", loc["in_scope"]))
    for key, what in (("by_sequence", "sequence"), ("by_source", "source")):
        groups = loc.get(key) or {}
        if len(groups) > 1:  # one group would repeat the first row
            rows += [_localisation_row(f"{what} {k}", b) for k, b in groups.items()]
    head = ["images", "n", "hit rate", "95% CI", f"hit {tol}", "95% CI", "centre point", "95% CI",
            "random point", "random point in head"]  # fmt: skip
    facts = html_kv(
        [("tumour images with a mask", loc["n"]), ("unreadable image or mask (not scored)", loc["errors"]),
         ("tumour images without a mask", loc["without_mask"]), ("empty heat maps (a miss)", loc["cam_empty"]),
         ("peaks in the padding (a miss)", loc["peak_in_padding"]),
         ("median distance of the peak to the mask (px)", loc.get("median_distance_px")),
         ("heat map", loc.get("heatmap"))]
    )  # fmt: skip
    return _section("localisation", title, text, html_table(head, rows, "localisation"), facts)


def _localisation_row(name: str, b: dict[str, Any]) -> list[Any]:
    return [name, b["n"], b["hit"]["rate"], fmt_ci(b["hit"]["ci95"]), b["hit_tolerant"]["rate"],
            fmt_ci(b["hit_tolerant"]["ci95"]), b["centre_hit"]["rate"], fmt_ci(b["centre_hit"]["ci95"]),
            b.get("random_point"), b.get("random_point_in_head")]  # fmt: skip


def _confusion(rep: dict[str, Any], figures: Figures) -> str:
    m, cls = rep["metrics"], rep["bundle"]["classes"]
    left = []
    if "confusion_matrix" in m:
        (tn, fp), (fn, tp) = m["confusion_matrix"]
        left += [
            f'<p class="sub">Tumour vs no tumour at the bundle threshold {html_cell(m.get("threshold"))}.</p>',
            html_table(["truth \\ predicted", "no tumour", "tumour"], [["no tumour", tn, fp], ["tumour", fn, tp]],
                   "cm"),
            html_kv([("TN", tn), ("FP", fp), ("FN", fn), ("TP", tp), ("n", m["n"])]),
        ]  # fmt: skip
    if "mc_confusion_matrix" in m:
        left.append(html_table(["truth \\ predicted", *cls], [[c, *r] for c, r in zip(cls, m["mc_confusion_matrix"],
                                                                                    strict=True)]))  # fmt: skip
    right = _img(figures, "confusion.png", "confusion matrix") + _img(
        figures, "confusion_multiclass.png", "multi-class confusion matrix"
    )
    per_class = html_table(
        ["class", "n", "sensitivity / recall", "specificity", "PPV", "NPV", "F1"],
        [[r["class"], r["n"], r["sensitivity"], r["specificity"], r["ppv"], r["npv"], r["f1"]]
         for r in rep["per_class"]],
    )  # fmt: skip
    rule = (
        f'<p class="sub">One-vs-rest per class; predicted class by {html.escape(rep["per_class_rule"])}.</p>'
    )
    grid = f'<div class="grid"><div>{"".join(left)}</div><div>{right}</div></div>'
    return _section("confusion", "Confusion matrix and per-class metrics", grid, rule, per_class)


def _calibration(rep: dict[str, Any], figures: Figures) -> str:
    cal = rep["calibration"]
    body = []
    if not cal["calibrated"]:
        thr = (
            "" if _threshold_words(rep)["fitted"] else ", and its operating threshold is the unfitted default"
        )
        body.append(
            '<p class="note">The bundle has temperature 1: its probabilities are <b>uncalibrated</b> '
            f"(no temperature scaling was fitted){html.escape(thr)}.</p>"
        )
    rows = [["top-label ECE", cal["ece_before"], cal["ece_after"]]]
    if "binary_ece_before" in cal:
        rows.append(["tumour-score ECE", cal["binary_ece_before"], cal["binary_ece_after"]])
    body.append(html_table(["", "before (T = 1)", f"after (T = {fmt(cal['temperature'])})"], rows))
    body.append(
        html_kv([("bundle temperature", cal["temperature"]),
             ("temperature fitted on this data (diagnostic only)", cal["temperature_fitted_on_this_data"]),
             ("bins", cal["n_bins"])])
    )  # fmt: skip
    body.append(
        '<p class="sub">ECE: mean |accuracy \u2212 confidence| over equal-width confidence bins, weighted by '
        "the share of scans per bin. Predictions are made at the bundle temperature; T = 1 is recovered from "
        "them. A temperature fitted on evaluation data must not be used to tune the model.</p>"
    )
    fig = _img(figures, "reliability.png", "reliability diagram")
    return _section(
        "calibration", "Calibration", f'<div class="grid"><div>{"".join(body)}</div><div>{fig}</div></div>'
    )


def _threshold(rep: dict[str, Any], figures: Figures) -> str:
    title = "Threshold analysis"
    ta = rep.get("threshold_analysis")
    if not ta:
        return _section("threshold", title, _note("No single tumour score: no threshold analysis."))
    ab, at, tgt = ta["at_bundle_threshold"], ta["at_target_threshold"], ta["search"]
    words = _threshold_words(rep)
    head = ["threshold", "value", "sensitivity", "specificity", "PPV", "NPV", "FN", "FP"]
    rows = [
        [words["row"], ab["threshold"], ab["sensitivity"], ab["specificity"], ab["ppv"], ab["npv"], ab["fn"],
         ab["fp"]],
        [f"sensitivity \u2265 {ta['target_sensitivity']:g} on this data", at["threshold"], at["sensitivity"],
         at["specificity"], at["ppv"], at["npv"], at["fn"], at["fp"]],
    ]  # fmt: skip
    origin = (
        f"The bundle's threshold was chosen on the {html.escape(words['source'])}"
        if words["fitted"]
        else f"The bundle's threshold is the {html.escape(words['source'])}"
    )
    if tgt.get("reason"):
        text = _note(tgt["reason"]) + f'<p class="sub">{origin}.</p>'
    else:
        cost = ta["specificity_cost"]
        word = "costs" if cost is not None and cost >= 0 else "gains"
        text = (
            f"<p>Reaching sensitivity \u2265 {ta['target_sensitivity']:g} on this data needs threshold "
            f"<b>{html_cell(at['threshold'])}</b> (sensitivity {html_cell(at['sensitivity'])}) and {word} "
            f"<b>{html_cell(abs(cost) if cost is not None else None)}</b> specificity compared with the bundle's "
            f"operating threshold {html_cell(ab['threshold'])} (specificity {html_cell(ab['specificity'])} \u2192 "
            f"{html_cell(at['specificity'])}). {origin}; a threshold picked on this evaluation data is optimistic "
            "for this data.</p>"
        )
    fig = _img(figures, "thresholds.png", "sensitivity and specificity vs threshold")
    return _section("threshold", title, html_table(head, rows), text, fig)


def _training(rep: dict[str, Any], figures: Figures) -> str:
    tr = rep.get("training")
    if not tr:
        return _section("training", "Training curves", _note("The bundle has no history.csv: no per-epoch "
                                                              "training curves."))  # fmt: skip
    cols = tr["shown_columns"]
    return _section(
        "training",
        "Training curves",
        f'<p class="sub">{tr["epochs"]} epochs from the bundle\'s history.csv; best epoch '
        f"{html_cell(tr['best_epoch'])}.</p>",
        _img(figures, "training.png", "training curves"),
        html_table(cols, [[r.get(k) for k in cols] for r in tr["rows"][:60]]),
    )


def _splits(rep: dict[str, Any], figures: Figures) -> str:
    sp = rep["splits"]
    counts = sp.get("split_counts") or {}
    left = [f"<p>Training source: <code>{html.escape(str(sp['source']))}</code></p>"]
    if counts:
        names = sorted({k for row in counts.values() for k in row})
        rows = [[s, *[row.get(k, 0) for k in names], sum(row.values())] for s, row in counts.items()]
        left.append(html_table(["split", *names, "total"], rows))
    else:
        left.append(_note("The bundle records no split counts."))
    left.append(html_kv([("duplicate groups in the training source", sp.get("duplicate_groups"))]))
    right = ["<p>This evaluation:</p>", html_kv(_evaluation_rows(rep))]
    if rep.get("rejected_files"):
        rejected = [[r["path"], r["reason"]] for r in rep["rejected_files"][:20]]
        right.append(html_table(["rejected file", "reason"], rejected))
    grid = f'<div class="grid"><div>{"".join(left)}</div><div>{"".join(right)}</div></div>'
    return _section("splits", "Data splits and duplicates", grid)


def _gallery(rep: dict[str, Any], figures: Figures) -> str:
    body = [
        '<p class="sub">Grad-CAM of the tumour class on the model input (the preprocessed scan). For a '
        "missed tumour a faint map means the model found little tumour evidence anywhere; for a false "
        "positive it shows what looked like tumour. Heat maps show where the evidence came from, not "
        "that it is clinically meaningful.</p>"
    ]
    if rep.get("scores"):
        body.append(
            '<p class="sub">Predictions come from a score output: single-image rows only (volumes are not '
            "shown here), and the maps are of the bundle's model as stored, without any test-time "
            "adaptation the scoring run applied.</p>"
        )
    gal = rep.get("gallery")
    if gal is None:
        body.append(_note("No single tumour score: no error gallery."))
    else:
        for kind, title in (("false_negatives", "False negatives (missed tumours)"),
                            ("false_positives", "False positives")):  # fmt: skip
            body.append(_gallery_cards(title, gal.get(kind) or [], rep["bundle"]["classes"], figures))
    return _section("gallery", "Grad-CAM gallery: most confident errors", *body)


def _gallery_cards(title: str, items: list[dict[str, Any]], cls: list[str], figures: Figures) -> str:
    head = f"<h3>{title} \u2014 {len(items)} shown</h3>"
    if not items:
        return head + _note("none")
    cards = []
    for it in items:
        pic = _img(figures, it.get("png", ""), it["basename"]) or _note(
            f"not rendered: {it.get('error', '')}"
        )
        cards.append(
            f'<div class="card">{pic}<p><b>{html.escape(it["basename"])}</b><br>true '
            f"{html.escape(cls[it['label']])} / pred {html.escape(cls[it['pred']])}<br>"
            f"score {html_cell(it['score'])} \u00b7 Grad-CAM for {html.escape(str(it.get('cam_target', '')))}</p></div>"
        )
    return head + '<div class="cards">' + "".join(cards) + "</div>"


def _model_card(rep: dict[str, Any], figures: Figures) -> str:
    mc, sp, m = rep["model_card"], rep["splits"], rep["metrics"]
    counts = sp.get("split_counts") or {}
    limits = "".join(f"<li>{html.escape(x)}</li>" for x in mc["known_limits"])
    data = html_kv(
        [("training source", sp.get("source")), ("split manifest sha256", sp.get("split_manifest_sha256")),
         ("duplicate groups", sp.get("duplicate_groups")),
         *[(f"{s} scans", sum(row.values())) for s, row in counts.items()],
         ("evaluated here", data_text(rep["data"]))]
    )  # fmt: skip
    keys = ["n", "roc_auc", "sensitivity", "specificity", "accuracy", "f1"]
    val, test = mc.get("validation_metrics") or {}, mc.get("test_metrics") or {}
    rows = [["validation (training run)", *[val.get(f"val_{k}") for k in keys]]] if val else []
    rows += [["test split (training run)", *[test.get(k) for k in keys]]] if test else []
    rows.append(["this evaluation", *[m.get(k) for k in keys]])
    return _section(
        "model-card",
        "Model card",
        f"<h3>Intended use</h3><p>{html.escape(mc['intended_use'])}</p>",
        f"<h3>Known limits</h3><ul>{limits}</ul>",
        "<h3>Data</h3>",
        data,
        "<h3>Metrics summary</h3>",
        html_table(["", *keys], rows),
        _hyperparameters(rep),
        "<h3>Versions</h3>" + html_kv(list((mc.get("versions") or {}).items())),
    )


def _hyperparameters(rep: dict[str, Any]) -> str:
    """The run's hyperparameters as set (significant digits, not the page's 3 decimals), the ones a search
    chose marked, and where the operating threshold came from."""
    mc, b = rep["model_card"], rep["bundle"]
    words = _threshold_words(rep)
    tuned = set(mc.get("tuned_by_search") or [])
    trial = mc.get("search_trial")
    searched = f"search (trial {trial})" if trial else "search"
    rows = [[k, fmt_setting(v), searched if k in tuned else "train config"]
            for k, v in (mc.get("train_config") or {}).items()]  # fmt: skip
    out = "<h3>Training configuration</h3>"
    out += (
        html_table(["hyperparameter", "value", "set by"], rows) if rows else _note("The bundle records none.")
    )
    return out + html_kv([("operating threshold", b["threshold"]), ("threshold source", words["source"])])
