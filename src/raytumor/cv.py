"""Cross-validation (``raytumor cv``): every fold one full training run, the folds in parallel on Ray Tune,
their test predictions pooled out of fold into one report.

Folds hold out whole duplicate/patient groups (``--folds K``, stratified by class and source) or one source
each (``--leave-source-out``); ``--cv-sources`` limits what is held out to some sources while the others
always train. The assignment lives in :mod:`raytumor.split`; a fold's run is ``raytumor train`` with
``cv_fold`` set (:func:`raytumor.train.prepare_split` holds the fold out as its test split and drops
train/val files that duplicate it), so a fold can be rerun alone with ``raytumor train --cv-fold K``.

The catalogue and duplicate groups (the expensive half of preparing data) are computed once here and shipped
to the trials, which only re-split them. Trials are Tune's (a grid over the fold index, FIFO: no fold is
stopped early), sized by :func:`raytumor.tune.trial_resources` and restored by its tuner, so rerunning the
same command keeps finished folds and resumes the others from their last epoch checkpoint.

Pooled metrics: ROC-AUC and average precision over the out-of-fold calibrated scores; sensitivity,
specificity and the other threshold metrics at each row's own fold bundle threshold (what each fold's model
would have called); 95 % CIs by :func:`raytumor.metrics.metrics_with_ci`'s group-aware bootstrap.
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from raytumor.bundle import read_meta
from raytumor.config import HelpFormatter, add_config_file, add_options, echo, from_args, opt
from raytumor.metrics import metrics_with_ci, roc_curve, tumour_binary, tumour_score
from raytumor.report import RESEARCH_BANNER
from raytumor.report import figures as report_figures
from raytumor.report.fmt import data_text, fmt, fmt_ci, html_kv, html_table
from raytumor.report.render import CSS
from raytumor.runtime import init_ray
from raytumor.split import HOLDOUT_DUPLICATE, SPLIT_NAMES
from raytumor.train import TrainConfig, is_min_metric, prepare_split, resolve_metric, run_training
from raytumor.train.data import Grouping, cv_folds, group_data
from raytumor.train.package import TEST_PREDICTIONS_FILE
from raytumor.tune import (
    DRIVER_CPU,
    DRIVER_MEMORY,
    SearchConfig,
    SearchInterrupted,
    _make_tuner,
    _storage,
    exit_interrupted,
    fit_search,
    trial_resources,
)

# TrainConfig options `raytumor cv` does not take: it sets them per fold (or has its own flag for them).
CV_SKIP = ("holdout_source", "cv_folds", "cv_fold", "cv_by", "test_data")
FOLDS_FILE = "folds.csv"
OOF_FILE = "oof_predictions.parquet"
CV_JSON = "cv.json"
REPORT_FILE = "cv_report.html"
# Columns describing a file (from its manifest, or the predictions' scope columns), broken down when present.
BREAKDOWNS = ("source", "sequence", "site", "view")
# Metrics summarised over folds (mean ± sd) and shown per fold, in this order, where defined.
FOLD_METRICS = (
    "roc_auc",
    "average_precision",
    "sensitivity",
    "specificity",
    "accuracy",
    "f1",
    "mc_accuracy",
    "mc_f1_macro",
)
# The report's metric rows, in order.
LABELS = {
    "roc_auc": "ROC-AUC",
    "average_precision": "average precision",
    "sensitivity": "sensitivity",
    "specificity": "specificity",
    "accuracy": "accuracy",
    "ppv": "PPV",
    "npv": "NPV",
    "f1": "F1",
    "mc_accuracy": "accuracy (all classes)",
    "mc_f1_macro": "macro F1 (all classes)",
}
# What depends on the operating threshold: taken from the metrics at each row's fold threshold.
AT_THRESHOLD = ("accuracy", "sensitivity", "specificity", "ppv", "npv", "f1", "confusion_matrix")
AT_THRESHOLD_EXTRA = ("false_positives", "fp_rate")
TRIAL_NODE_SHARE = 0.001  # of the driver node's `node:<ip>` resource: trials run where OUT is


@dataclass(kw_only=True)
class CVConfig:
    # Every fold's training options; its `name` names the cross-validation (default: see cv_name)
    train: TrainConfig = opt(cli=False)
    folds: int = opt(5, "folds over whole duplicate/patient groups, stratified by class and source")
    leave_source_out: bool = opt(
        False,
        "one fold per source instead of --folds (with --cv-sources: only those sources are held out in "
        "turn; the other sources always train)",
    )
    max_concurrent_folds: int | None = opt(
        None, "folds trained at once (default: what the cluster fits, leaving each a CPU for Ray Data)"
    )
    n_boot: int = opt(1000, "bootstrap resamples (of whole groups) for the pooled confidence intervals")

    def __post_init__(self) -> None:
        if not self.leave_source_out and self.folds < 2:
            raise ValueError(f"--folds must be at least 2, got {self.folds}")

    @property
    def by(self) -> str:
        return "source" if self.leave_source_out else "group"

    @property
    def cv_name(self) -> str:
        t = self.train
        scheme = "loso" if self.leave_source_out else f"cv{self.folds}"
        return t.name or f"{scheme}-{t.backbone}-{t.image_size}px-s{t.seed}"

    @property
    def run_dir(self) -> Path:
        return Path(self.train.out).expanduser().resolve() / self.cv_name


def fold_config(base: TrainConfig, fold: int) -> TrainConfig:
    """Fold ``fold``'s training run: ``base`` (whose ``out`` is the CV folder) writing to ``fold-K/``,
    without its own HTML report or external test set (the CV report covers every fold)."""
    return replace(base, cv_fold=fold, name=f"fold-{fold}", report=False, test_data=None)


def fold_driver(config: dict[str, Any], payload: dict[str, Any]) -> None:
    """Runs in the Tune trial: fold ``config["cv_fold"]``'s whole training run (train, bundle, test
    predictions) on the driver's grouping; Tune sees its epochs through ``TuneReportCallback``."""
    from ray.tune.integration.ray_train import TuneReportCallback

    init_ray()
    cfg = fold_config(TrainConfig(**payload["base"]), int(config["cv_fold"]))
    run_training(cfg, callbacks=[TuneReportCallback()], grouping=payload["grouping"])


# ----------------------------------------------------------------------------------------------------------
# Folds


def plan_folds(base: TrainConfig, grouping: Grouping) -> tuple[pd.DataFrame, list[str], pd.DataFrame]:
    """(held-out files with their fold, fold names, files per fold and split) — every fold's split made
    here as its run will make it, so a fold that cannot train fails before any trial starts."""
    folds, names = cv_folds(base, grouping.good, grouping.groups)
    held, counts = [], []
    for k, name in enumerate(names):
        data = prepare_split(replace(base, cv_fold=k), grouping)
        m = data.manifest
        test = m.loc[m["split"] == "test", ["path", "class_name", "source"]]
        held.append(test.assign(fold=k, fold_name=name))
        n = m["split"].value_counts()
        row = {
            "fold": name,
            **{s: int(n.get(s, 0)) for s in SPLIT_NAMES},
            "dropped": int(n.get(HOLDOUT_DUPLICATE, 0)),
        }
        counts.append(
            row | {f"test {c}": int(v) for c, v in test["class_name"].value_counts().sort_index().items()}
        )
    plan = pd.concat(held, ignore_index=True)
    if plan["path"].duplicated().any() or len(plan) != int((folds >= 0).sum()):
        raise AssertionError("cross-validation folds do not hold out every file exactly once")
    table = pd.DataFrame(counts).set_index("fold").fillna(0).astype(int)
    return plan, names, table


def _check_resume(run_dir: Path, plan: pd.DataFrame) -> None:
    """A rerun must hold out the same files per fold as the folds it resumes."""
    path = run_dir / FOLDS_FILE

    def pairs(df: pd.DataFrame) -> set[tuple[str, int]]:
        return set(zip(df["path"].astype(str), df["fold"].astype(int), strict=True))

    if path.exists():
        if pairs(pd.read_csv(path, usecols=["path", "fold"])) != pairs(plan):
            raise ValueError(
                f"{run_dir} holds folds made from other data or options (see {path}); give another --name"
            )
    plan.to_csv(path, index=False)


def _driver_node() -> dict[str, float]:
    """A small share of this node's ``node:<ip>`` resource: fold runs write OUT/NAME/fold-K/ (a local
    path), so their trial drivers run on this node; their training workers go anywhere."""
    import ray

    node = ray.get_runtime_context().get_node_id()
    ip = next((n["NodeManagerAddress"] for n in ray.nodes() if n["NodeID"] == node), None)
    key = f"node:{ip}"
    return {key: TRIAL_NODE_SHARE} if ip and key in ray.cluster_resources() else {}


# ----------------------------------------------------------------------------------------------------------
# Pooling and metrics


def pool_predictions(run_dir: Path, names: list[str], grouping: Grouping) -> pd.DataFrame:
    """Every fold's calibrated test predictions, one table: ``fold``, ``fold_name``, ``threshold`` (that
    fold bundle's operating threshold) added, and the catalogue's describing columns (sequence, site,
    view...) joined by path where the predictions lack them."""
    parts = []
    for k, name in enumerate(names):
        fold_dir = run_dir / f"fold-{k}"
        preds = pd.read_parquet(fold_dir / TEST_PREDICTIONS_FILE)
        meta = read_meta(fold_dir / "bundle")
        parts.append(preds.assign(fold=k, fold_name=name, threshold=float(meta.threshold)))
    oof = pd.concat(parts, ignore_index=True)
    extra = [c for c in BREAKDOWNS if c in grouping.table.columns and c not in oof.columns]
    if extra:
        oof = oof.merge(grouping.table[["path", *extra]], on="path", how="left")
    return oof


def _at_fold_thresholds(df: pd.DataFrame, classes: list[str], negative_class: str | None) -> pd.DataFrame:
    """The rows with each tumour score mapped monotonically per fold so that its fold threshold lands on 0.5
    (below: [0, 0.49], at or above: [0.5, 1]): metrics at threshold 0.5 are then each fold model's calls.
    Only the threshold metrics of this table mean anything (the mapping changes the pooled ranking)."""
    cols = [f"prob_{c}" for c in classes]
    probs = df[cols].to_numpy(dtype=np.float64)
    s = tumour_score(probs, classes, negative_class)
    t = df["threshold"].to_numpy(dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        up = 0.5 + 0.5 * (s - t) / np.maximum(1.0 - t, 1e-12)
        down = 0.49 * s / np.maximum(t, 1e-12)  # the gap keeps float32 rounding from crossing 0.5
    a = np.clip(np.where(s >= t, up, down), 0.0, 1.0)
    a = np.where(np.isfinite(s), a, np.nan)
    out = df.copy()
    if negative_class is None:  # binary without a no-tumour class: P(class 1) is the score
        out[cols[0]], out[cols[1]] = 1.0 - a, a
        return out
    neg = list(classes).index(negative_class)
    with np.errstate(invalid="ignore", divide="ignore"):
        scale = np.where(s > 0, a / s, 0.0)
    for i, c in enumerate(cols):
        out[c] = 1.0 - a if i == neg else probs[:, i] * scale
    return out


def pooled_metrics(
    df: pd.DataFrame, classes: list[str], negative_class: str | None, n_boot: int, seed: int
) -> dict[str, Any]:
    """:func:`metrics_with_ci` of out-of-fold rows: threshold-free metrics (ROC-AUC, AP, multi-class) of
    the pooled scores, threshold metrics (and their CIs) at each row's fold threshold."""
    if df.empty:
        return {"n": 0}
    m = metrics_with_ci(df, classes, negative_class, 0.5, n_boot=n_boot, seed=seed)
    if tumour_score(np.zeros((0, len(classes))), classes, negative_class) is None:
        return m  # no tumour score: every call is an arg-max, no threshold involved
    at = metrics_with_ci(
        _at_fold_thresholds(df, classes, negative_class),
        classes,
        negative_class,
        0.5,
        n_boot=n_boot,
        seed=seed,
    )
    for k in (*AT_THRESHOLD, *AT_THRESHOLD_EXTRA):
        if k in at:
            m[k] = at[k]
    for k in AT_THRESHOLD:
        if k in at.get("ci95", {}):
            m["ci95"][k] = at["ci95"][k]
    m["threshold"] = "per fold"
    return m


def mean_sd(per_fold: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Mean and sample sd over the folds where a metric is defined (a single-class fold has no ROC-AUC)."""
    out = {}
    for k in FOLD_METRICS:
        v = [float(f[k]) for f in per_fold if isinstance(f.get(k), (int, float)) and math.isfinite(f[k])]
        if v:
            out[k] = {
                "mean": float(np.mean(v)),
                "sd": float(np.std(v, ddof=1)) if len(v) > 1 else None,
                "folds": len(v),
            }
    return out


def breakdowns(
    oof: pd.DataFrame, classes: list[str], negative_class: str | None, n_boot: int, seed: int
) -> dict[str, dict[str, Any]]:
    """{column: {value: pooled metrics}} per describing column (source, sequence, site, view) that splits
    the rows (files without a value count as "unknown"); per source always."""
    out = {}
    for col in BREAKDOWNS:
        if col not in oof.columns:
            continue
        known = oof[col].notna() & (oof[col].astype(str).str.strip() != "")
        key = oof[col].astype(str).where(known, "unknown")
        if not known.any() or (key.nunique() < 2 and col != "source"):
            continue
        out[col] = {
            val: pooled_metrics(oof[key == val], classes, negative_class, n_boot, seed)
            for val in sorted(key.unique())
        }
    return out


# ----------------------------------------------------------------------------------------------------------
# The run


def run_cv(cfg: CVConfig) -> dict[str, Any]:
    """Run (or resume) every fold on Ray Tune, pool the out-of-fold predictions, write cv.json, the
    predictions and the HTML report; returns cv.json's content."""
    from ray import tune
    from ray.tune.schedulers import FIFOScheduler

    t0 = time.time()
    init_ray()
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "cv.yaml").write_text(echo(cfg))
    t = cfg.train
    # Checkpoints: OUT/NAME/fold-K/checkpoints, or a prefix of this CV under shared storage.
    fold_store = f"{t.storage_path.rstrip('/')}/{cfg.cv_name}/folds" if t.storage_path else None
    base = replace(
        t, out=str(run_dir), cv_by=cfg.by, cv_folds=cfg.folds, holdout_source=None, storage_path=fold_store
    )
    grouping = group_data(base)
    folds, names, table = plan_folds(base, grouping)
    base = replace(base, cv_folds=len(names))
    _check_resume(run_dir, folds)
    scheme = (
        f"leave-one-source-out over {len(names)} sources"
        if cfg.leave_source_out
        else f"{len(names)} group folds (duplicates + patients), stratified by class and source"
    )
    print(f"[raytumor] cross-validation: {scheme}; files per fold and split:\n{table.to_string()}")

    search = SearchConfig(
        train=replace(base, name=cfg.cv_name),
        space={"cv_fold": {"grid": list(range(len(names)))}},
        num_samples=len(names),  # trial_resources caps concurrency at the trial count: the folds
        max_epochs=base.epochs,
        max_concurrent_trials=cfg.max_concurrent_folds,
        workers_per_trial=base.num_workers,
    )
    res = trial_resources(search)
    base = replace(
        base,
        num_workers=res["num_workers"],
        cpus_per_worker=res["cpus_per_worker"],
        use_gpu=str(res["use_gpu"]).lower(),
    )
    cat = grouping.catalogue
    metric = resolve_metric(base.metric, cat.classes, cat.negative_class)
    storage_root = t.storage_path or str(run_dir / "tune")
    tune_path, tune_fs = _storage(storage_root, t.s3_endpoint)
    trainable = tune.with_resources(
        tune.with_parameters(fold_driver, payload={"base": asdict(base), "grouping": grouping}),
        {"CPU": DRIVER_CPU, "memory": DRIVER_MEMORY, **_driver_node()},
    )
    tuner = _make_tuner(
        replace(search, num_samples=1),
        trainable,
        metric,
        res,
        (tune_path, tune_fs, storage_root),
        scheduler=FIFOScheduler(),
    )
    print(
        f"[raytumor] {len(names)} folds, {res['max_concurrent_trials']} at a time, {res['num_workers']} "
        f"worker(s) × {res['cpus_per_worker']} CPU{' + 1 GPU' if res['use_gpu'] else ''} per fold; "
        f"≤{base.epochs} epochs, best by {metric} ({'min' if is_min_metric(metric) else 'max'})"
    )
    grid, unfinished = fit_search(tuner)
    if unfinished:  # Ctrl-C: Tune saved the folds' state; pooling unfinished folds would mislead
        raise SearchInterrupted({"run_dir": str(run_dir), "interrupted": True, "unfinished": len(unfinished)})
    errors = {
        int((r.config or {}).get("cv_fold", -1)): f"{type(r.error).__name__}: {r.error}"[:500]
        for r in grid
        if r.error
    }
    missing = [k for k in range(len(names)) if not (run_dir / f"fold-{k}" / "summary.json").exists()]
    if errors or missing:
        why = "; ".join(
            f"fold {k}: {errors.get(k, 'no summary.json')}" for k in sorted(set(errors) | set(missing))
        )
        raise RuntimeError(f"cross-validation incomplete ({why}); run the same command again to resume")

    per_fold = []
    for k, name in enumerate(names):
        s = json.loads((run_dir / f"fold-{k}" / "summary.json").read_text())
        meta = read_meta(run_dir / f"fold-{k}" / "bundle")
        per_fold.append(
            {
                "fold": k,
                "name": name,
                "run_dir": s["run_dir"],
                "bundle": s["bundle"],
                "bundle_id": s["bundle_id"],
                "threshold": float(meta.threshold),
                "temperature": float(meta.temperature),
                "best_epoch": s["best_epoch"],
                "epochs_run": s["epochs_run"],
                "dropped_duplicates": (s.get("holdout") or {}).get("dropped_duplicates"),
                "split": {split: int(n) for split, n in table.loc[name].items()},
                "test": s["test"],
            }
        )
    oof = pool_predictions(run_dir, names, grouping)
    if oof["path"].duplicated().any() or set(oof["path"]) != set(folds["path"]):
        raise AssertionError("out-of-fold predictions do not cover every held-out file exactly once")
    oof.to_parquet(run_dir / OOF_FILE, index=False)
    classes, neg = cat.classes, cat.negative_class
    flat = [{"fold": f["fold"], **f["test"]} for f in per_fold]
    result = {
        "name": cfg.cv_name,
        "run_dir": str(run_dir),
        "data": list(t.data),
        "scheme": {
            "by": cfg.by,
            "folds": len(names),
            "names": names,
            "description": scheme,
            "cv_sources": list(t.cv_sources or []),
            "seed": t.seed,
        },
        "classes": classes,
        "negative_class": neg,
        "metric": metric,
        "folds": per_fold,
        "mean_sd": mean_sd(flat),
        "pooled": pooled_metrics(oof, classes, neg, cfg.n_boot, t.seed),
        "breakdowns": breakdowns(oof, classes, neg, cfg.n_boot, t.seed),
        "oof_predictions": str(run_dir / OOF_FILE),
        "folds_file": str(run_dir / FOLDS_FILE),
        "resources": res,
        "config": asdict(cfg),
    }
    y, s = tumour_binary(
        oof["label"].to_numpy(), oof[[f"prob_{c}" for c in classes]].to_numpy(), classes, neg
    )
    result["report"] = write_report(result, y, s, run_dir) if t.report else None
    result["wall_seconds"] = round(time.time() - t0, 1)
    (run_dir / CV_JSON).write_text(json.dumps(result, indent=2, default=_json_default) + "\n")
    return result


def _json_default(o: Any) -> Any:
    return o.item() if isinstance(o, np.generic) else str(o)


# ----------------------------------------------------------------------------------------------------------
# The report: one self-contained page


def _with_ci(m: dict[str, Any], k: str) -> str:
    return f"{fmt(m.get(k))} {fmt_ci(m.get('ci95', {}).get(k))}".strip()


def _section(title: str, *body: str) -> str:
    return f"<section><h2>{html.escape(title)}</h2>{''.join(body)}</section>"


def render_report(result: dict[str, Any], roc_png: bytes | None) -> str:
    """The CV page from cv.json's content (and the pooled ROC figure): summary, pooled metrics with CIs and
    mean ± sd over folds, each fold, and the breakdowns."""
    p, ms, cfg = result["pooled"], result["mean_sd"], result["config"]["train"]
    keys = [k for k in LABELS if p.get(k) is not None or k in ms]

    def over_folds(k: str) -> str:
        v = ms.get(k)
        return f"{fmt(v['mean'])} ± {fmt(v['sd'])} ({v['folds']} folds)" if v else ""

    held = f"{p.get('n', 0)}: {p.get('positives', '—')} tumour, {p.get('negatives', '—')} no tumour"
    model = f"{cfg['backbone']} ({cfg['weights']}), {cfg['image_size']} px, ≤{cfg['epochs']} epochs"
    choice = f"best {result['metric']} on its validation split; {cfg['target_sensitivity']} sensitivity there"
    summary = html_kv(
        [
            ("data", data_text(result["data"])),
            ("folds", result["scheme"]["description"]),
            ("files held out (pooled)", held),
            ("model", model),
            ("each fold's checkpoint and threshold", choice),
            ("seed", str(cfg["seed"])),
        ]
    )
    pooled = html_table(
        ["metric", "pooled out of fold [95% CI]", "mean ± sd over folds"],
        [[LABELS[k], _with_ci(p, k), over_folds(k)] for k in keys],
    )
    shown = keys[:6]
    folds = html_table(
        ["fold", "test files", "threshold", *[LABELS[k] for k in shown], "best epoch", "dropped duplicates"],
        [
            [f["name"], f["test"].get("n", 0), f["threshold"], *[f["test"].get(k) for k in shown],
             f["best_epoch"], f["dropped_duplicates"]]
            for f in result["folds"]
        ],
    )  # fmt: skip
    parts = []
    for col, per in result["breakdowns"].items():
        head = [col, "files", "tumour", "no tumour", "ROC-AUC", "sensitivity", "specificity", "AP"]
        rows = [
            [val, m.get("n", 0), m.get("positives"), m.get("negatives"),
             *[_with_ci(m, k) for k in ("roc_auc", "sensitivity", "specificity", "average_precision")]]
            for val, m in per.items()
        ]  # fmt: skip
        parts.append(_section(f"By {col}", html_table(head, rows)))
    img = ""
    if roc_png:
        b64 = base64.b64encode(roc_png).decode("ascii")
        img = f'<img src="data:image/png;base64,{b64}" alt="pooled out-of-fold ROC curve">'
    note = (
        "Every file is scored once, by the model of the fold that held it out. ROC-AUC and AP rank the "
        "pooled calibrated scores; sensitivity, specificity and the other threshold metrics use each fold "
        f"bundle's own operating threshold. 95% CIs: bootstrap resampling whole "
        f"{p.get('ci95_resampling', 'scans')}."
    )
    banner = html.escape(RESEARCH_BANNER)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>raytumor cross-validation {html.escape(result['name'])}</title><style>{CSS}</style></head>"
        f'<body>\n<div class="banner">{banner}</div><main>'
        f"<h1>Cross-validation report \u2014 {html.escape(result['name'])}</h1>"
        + _section("Summary", summary)
        + _section("Pooled out-of-fold metrics", pooled, img, f'<p class="note">{html.escape(note)}</p>')
        + _section("Folds", folds)
        + "".join(parts)
        + f'<p class="sub">{banner}</p></main>\n</body></html>\n'
    )


def write_report(result: dict[str, Any], y: np.ndarray | None, s: np.ndarray | None, run_dir: Path) -> str:
    """cv_report.html (self-contained) and the pooled ROC figure as a PNG beside it."""
    png = None
    if y is not None:
        ok = np.isfinite(s)
        if 0 < y[ok].sum() < ok.sum():
            p = result["pooled"]
            op = {
                "sensitivity": p.get("sensitivity"),
                "specificity": p.get("specificity"),
                "threshold": "per fold",
            }
            png = report_figures.roc(
                roc_curve(y[ok], s[ok]), p.get("roc_auc"), p.get("ci95", {}).get("roc_auc"), op
            )
            (run_dir / "cv_roc.png").write_bytes(png)
    path = run_dir / REPORT_FILE
    path.write_text(render_report(result, png), encoding="utf-8")
    return str(path)


# ----------------------------------------------------------------------------------------------------------
# CLI


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Cross-validate (group folds or leave-one-source-out), every fold a training run on Ray",
        add_help=add_help,
        formatter_class=HelpFormatter,
    )
    add_options(p, TrainConfig, skip=CV_SKIP)
    add_options(p, CVConfig)
    add_config_file(p)
    return p


def config_from_args(args: argparse.Namespace) -> CVConfig:
    return from_args(CVConfig, args, train=from_args(TrainConfig, args))


def main(args: argparse.Namespace) -> dict[str, Any]:
    try:
        r = run_cv(config_from_args(args))
    except (SearchInterrupted, KeyboardInterrupt):
        exit_interrupted("cross-validation")
    keys = ("n", "threshold", "roc_auc", "average_precision", "sensitivity", "specificity", "accuracy")
    rows = [
        {"fold": f["name"], **{k: f["threshold"] if k == "threshold" else f["test"].get(k) for k in keys}}
        for f in r["folds"]
    ]
    table = pd.DataFrame(rows).set_index("fold").map(lambda v: v if isinstance(v, int) else fmt(v))
    print(f"[raytumor] test split of each fold:\n{table.to_string()}")
    p = r["pooled"]
    print(
        f"[raytumor] pooled out of fold (n={p.get('n', 0)}): ROC-AUC {_with_ci(p, 'roc_auc')}  "
        f"AP {_with_ci(p, 'average_precision')}  sensitivity {_with_ci(p, 'sensitivity')}  "
        f"specificity {_with_ci(p, 'specificity')} (each fold's threshold)"
    )
    ms = r["mean_sd"].get("roc_auc")
    if ms:
        print(f"[raytumor] ROC-AUC over folds: {fmt(ms['mean'])} ± {fmt(ms['sd'])}")
    print(f"[raytumor] done in {r['wall_seconds']:.0f}s; {CV_JSON}: {r['run_dir']}/{CV_JSON}")
    print(f"[raytumor] out-of-fold predictions: {r['oof_predictions']}")
    if r["report"]:
        print(f"[raytumor] report: {r['report']}")
    return r
