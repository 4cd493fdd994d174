"""Leave-one-site-out, pooled: the out-of-fold predictions of several ``bench/generalisation.py`` folds
(each fold's ``run/test_predictions.parquet``: the held-out site scored by a bundle that never saw it) in
one table, ROC-AUC per fold and pooled with a 95 % CI that resamples patients, per sequence, all rows and
in scope (issue 13: target >= 0.95 pooled over folds).

    python bench/loso_pool.py /tmp/gen/loso-DU-...-nb /tmp/gen/loso-CS-...-nb /tmp/gen/loso-EZ-...
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def fold_predictions(fold: Path) -> pd.DataFrame:
    from raytumor.scan import ok_mask

    tp = pd.read_parquet(fold / "run" / "test_predictions.parquet")
    tp = tp[ok_mask(tp["error"])].copy()
    tp["fold"] = fold.name
    if "group" in tp.columns:  # group ids are per run: never let two folds' groups merge
        tp["group"] = fold.name + ":" + tp["group"].astype(str)
    return tp


def roc(df: pd.DataFrame, n_boot: int) -> dict[str, Any]:
    from raytumor.metrics import metrics_with_ci

    if df.empty or df["label"].nunique() < 2:
        return {"n": int(len(df)), "roc_auc": None}
    m = metrics_with_ci(df, ["no", "yes"], "no", 0.5, n_boot=n_boot)
    ci = m["ci95"].get("roc_auc")
    return {
        "n": int(len(df)),
        "patients": int(df["patient_id"].nunique()),
        "roc_auc": round(float(m["roc_auc"]), 4),
        "ci95": [round(float(x), 4) for x in ci] if ci else None,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folds", nargs="+", type=Path)
    p.add_argument("--n-boot", type=int, default=1000)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    df = pd.concat([fold_predictions(f) for f in args.folds], ignore_index=True)
    ins = df["in_scope"].fillna(False).astype(bool)
    res: dict[str, Any] = {
        "per_fold": {f: roc(g, args.n_boot) for f, g in df.groupby("fold")},
        "pooled": roc(df, args.n_boot),
        "pooled_in_scope": roc(df[ins], args.n_boot),
        "pooled_by_sequence": {str(s): roc(g, args.n_boot) for s, g in df.groupby("sequence")},
        "in_scope_share": round(float(ins.mean()), 4),
    }
    text = json.dumps(res, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
