"""Demo: the whole pipeline on synthetic brain-MRI phantoms, on a fresh machine, in a few minutes.

    phantoms → tune (2 backbones, ASHA) → train the winner → score a folder with broken files → report

The phantoms are SYNTHETIC (ellipses, skull ring, textured grey/white matter, irregular lesions): they show
the pipeline works end to end; a model trained on them says nothing about real scans.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Any


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Synthesise labelled brain-MRI phantoms (SYNTHETIC), then tune, train, score and report",
        add_help=add_help,
    )
    p.add_argument("--out", default="demo_out", help="output folder")
    p.add_argument("--n-per-class", type=int, default=300, help="phantoms per class")
    p.add_argument(
        "--n-corrupt", type=int, default=3, help="broken files mixed in, to show bad-input handling"
    )
    p.add_argument(
        "--backbones", default="efficientnet_lite0,efficientnet_lite1", help="searched by the small tune"
    )
    p.add_argument("--weights", default="imagenet")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--tune-epochs", type=int, default=2, help="epochs per trial of the small search")
    p.add_argument("--epochs", type=int, default=8, help="epochs of the winner's training run")
    p.add_argument("--num-workers", type=int, default=None)
    p.add_argument("--skip-tune", action="store_true", help="train the first backbone without a search")
    p.add_argument("--seed", type=int, default=0)
    return p


def main(args: argparse.Namespace) -> dict[str, Any]:
    from raytumor.evaluate import format_table
    from raytumor.phantoms import write_phantom_dataset
    from raytumor.report import build_report
    from raytumor.runtime import init_ray
    from raytumor.score import ScoreConfig, score
    from raytumor.train import TrainConfig, run_training
    from raytumor.tune import run_search

    t0 = time.time()
    out = Path(args.out).resolve()
    data = out / "phantoms"
    print(f"[demo] writing SYNTHETIC brain-MRI phantoms (not patient data) to {data}")
    info = write_phantom_dataset(data, n_per_class=args.n_per_class, seed=args.seed, n_corrupt=args.n_corrupt)
    holdout = out / "phantoms_holdout"
    write_phantom_dataset(holdout, n_per_class=max(20, args.n_per_class // 4), seed=args.seed + 1000)
    init_ray()
    backbones = [b for b in args.backbones.split(",") if b]
    base = TrainConfig(
        data=str(data),
        out=str(out / "runs"),
        name="demo",
        backbone=backbones[0],
        weights=args.weights,
        image_size=args.image_size,
        epochs=args.epochs,
        num_workers=args.num_workers,
        batch_size=32,
        lr=3e-3,  # phantoms are far from ImageNet: a higher LR than the real-data default
        backbone_lr=1e-3,
        patience=args.epochs,
        seed=args.seed,
    )

    search = None
    if not args.skip_tune and len(backbones) > 1:
        print(
            f"[demo] 1/4 small Ray Tune search over {backbones} ({args.tune_epochs} epochs per trial, ASHA)"
        )
        search = run_search(_search_config(args, data, out, backbones))
        best = search["best_config"]
        print(f"[demo]   winner: {best}  (leaderboard {search['leaderboard']})")
        base = replace(base, backbone=best["backbone"], lr=float(best.get("lr", base.lr)))

    print(f"[demo] 2/4 training {base.backbone} for {base.epochs} epochs on 2 Ray workers")
    summary = run_training(base)
    print("[demo]   held-out test split of the training folder:")
    print(format_table(summary["test"]))

    # A folder as it arrives for scoring: new scans plus the kind of junk real archives hold.
    inbox = out / "inbox"
    shutil.rmtree(inbox, ignore_errors=True)
    shutil.copytree(holdout, inbox)
    for p in info.get("corrupt", []):
        shutil.copy(p, inbox / Path(p).name)
    print(
        f"[demo] 3/4 batch scoring {inbox} (holdout phantoms + {len(info.get('corrupt', []))} broken files)"
    )
    scores = score(
        ScoreConfig(
            bundle=summary["bundle"], input=str(inbox), output=str(out / "scores"), csv=True, explain=True
        )
    )
    print(
        f"[demo]   {scores['rows']} rows: {scores['scored']} scored, {scores['errors']} errors "
        f"{scores['error_reasons']}, {scores['positives']} positive"
    )

    print(f"[demo] 4/4 evaluation report on the independently generated holdout set {holdout}")
    rep = build_report(summary["bundle"], str(holdout), out / "report", seed=args.seed)
    m = rep["metrics"]
    print(format_table(m))

    result = {
        "synthetic_data": str(data),
        "corrupt_files": [str(p) for p in info.get("corrupt", [])],
        "search": search and {k: search[k] for k in ("run_dir", "leaderboard", "best_config", "trials")},
        "run_dir": summary["run_dir"],
        "bundle": summary["bundle"],
        "test_metrics": summary["test"],
        "scores": str(out / "scores"),
        "score_summary": {k: scores[k] for k in ("rows", "scored", "errors", "positives")},
        "report": str(out / "report" / "report.html"),
        "holdout_metrics": str(out / "report" / "metrics.json"),
        "wall_seconds": round(time.time() - t0, 1),
    }
    (out / "demo_summary.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"[demo] done in {result['wall_seconds']:.0f}s (SYNTHETIC data).")
    if search:
        print(f"[demo]   search leaderboard: {search['leaderboard']}")
    print(f"[demo]   bundle:             {summary['bundle']}")
    print(f"[demo]   run folder:         {summary['run_dir']} (split manifest, ingest summary, duplicates)")
    print(f"[demo]   test-split report:  {summary.get('report')}")
    print(f"[demo]   scores:             {out / 'scores'} (scores.csv, explain/ Grad-CAM PNGs)")
    print(f"[demo]   holdout report:     {result['report']}")
    return result


def _search_config(args: argparse.Namespace, data: Path, out: Path, backbones: list[str]) -> Any:
    from raytumor.tune import SearchConfig

    return SearchConfig(
        data=str(data),
        out=str(out / "runs"),
        name="demo-search",
        # one trial per backbone (grid), a learning rate sampled for each
        space={"backbone": {"grid": backbones}, "lr": {"loguniform": [1e-3, 5e-3]}},
        fixed={"image_size": args.image_size, "batch_size": 32, "backbone_lr": 1e-3, "weights": args.weights},
        num_samples=1,
        max_epochs=args.tune_epochs,
        report=False,
        seed=args.seed,
    )
