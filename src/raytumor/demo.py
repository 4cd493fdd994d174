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
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from raytumor.config import from_args, opt, stage_parser
from raytumor.evaluate import format_table
from raytumor.model import list_backbones
from raytumor.phantoms import write_phantom_dataset
from raytumor.report import build_report
from raytumor.runtime import init_ray
from raytumor.score import ScoreConfig, score
from raytumor.train import TrainConfig, run_training
from raytumor.tune import SearchConfig, SearchInterrupted, exit_interrupted, run_search


@dataclass(kw_only=True)
class DemoConfig:
    out: str = opt("demo_out", "output folder")
    n_per_class: int = opt(300, "phantoms per class")
    n_corrupt: int = opt(3, "broken files mixed in, to show bad-input handling")
    backbones: str = opt(
        "efficientnet_lite0,efficientnet_lite1", "comma-separated backbones the small search tries"
    )
    weights: str = opt("imagenet", "imagenet | none | path to a state dict")
    image_size: int = opt(128, "model input size in pixels")
    tune_epochs: int = opt(2, "epochs per trial of the small search")
    epochs: int = opt(8, "epochs of the winner's training run")
    num_workers: int | None = opt(None, "training workers (default: 2 on CPU, one per GPU)")
    skip_tune: bool = opt(False, "train the first backbone without a search")
    seed: int = opt(0)

    @property
    def backbone_list(self) -> list[str]:
        return [b for b in self.backbones.split(",") if b]

    def __post_init__(self) -> None:
        # Checked before any phantom is written or Ray starts (issue 14: validate inputs first).
        unknown = [b for b in self.backbone_list if b not in list_backbones()]
        if unknown or not self.backbone_list:
            raise ValueError(f"--backbones: unknown {unknown or self.backbones!r}; known: {list_backbones()}")


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    return stage_parser(
        DemoConfig,
        "Synthesise labelled brain-MRI phantoms (SYNTHETIC), then tune -> train -> score -> report",
        add_help,
    )


def _train_config(cfg: DemoConfig, data: Path, out: Path) -> TrainConfig:
    return TrainConfig(
        data=str(data),
        out=str(out / "runs"),
        name="demo",
        backbone=cfg.backbone_list[0],
        weights=cfg.weights,
        image_size=cfg.image_size,
        epochs=cfg.epochs,
        num_workers=cfg.num_workers,
        batch_size=32,
        lr=3e-3,  # phantoms are far from ImageNet: a higher LR than the real-data default
        backbone_lr=1e-3,
        patience=cfg.epochs,
        seed=cfg.seed,
    )


# The recommended recipe on real data (README "Train for other hospitals' scans"); the demo prints it.
RECIPE = """[demo] on real data, the recommended multi-source recipe (README: "Train for other hospitals' scans"):
  raytumor slices --input IXI/nifti --out data/ixi_axial --label no --source IXI --patient-pattern '^(IXI\\d+)'
  raytumor slices --input IXI/nifti --out data/ixi_views --label no --source IXI --patient-pattern '^(IXI\\d+)' \\
      --planes axial,coronal,sagittal --depth-mm 0
  raytumor train --data br35h-3000 --data tcga-lgg-3site/manifest.csv --data data/ixi_axial/manifest.csv \\
      --view-data data/ixi_views/manifest.csv --known-view 'tcga-lgg-*=axial' --metric val_source_min_roc_auc
  raytumor cv --leave-source-out ... (same options): how well it generalises to a source it never saw"""


def _search_config(cfg: DemoConfig, base: TrainConfig) -> SearchConfig:
    return SearchConfig(
        train=replace(base, name="demo-search", report=False),
        # one trial per backbone (grid), a learning rate sampled for each
        space={"backbone": {"grid": cfg.backbone_list}, "lr": {"loguniform": [1e-3, 5e-3]}},
        fixed={"image_size": cfg.image_size, "batch_size": 32, "backbone_lr": 1e-3, "weights": cfg.weights},
        num_samples=1,
        max_epochs=cfg.tune_epochs,
    )


def _score_inbox(out: Path, holdout: Path, corrupt: list[str], bundle: str) -> dict[str, Any]:
    """Score a folder as it arrives: new scans plus the kind of junk real archives hold."""
    inbox = out / "inbox"
    shutil.rmtree(inbox, ignore_errors=True)
    shutil.copytree(holdout, inbox)
    for p in corrupt:
        shutil.copy(p, inbox / Path(p).name)
    docs = sorted(f.name for f in inbox.iterdir() if f.is_file() and f.suffix.lower() in (".txt", ".md"))
    extra = f" + {', '.join(docs)} (not a scan: an error row too)" if docs else ""
    print(f"[demo] 3/4 batch scoring {inbox} (holdout phantoms + {len(corrupt)} broken files{extra})")
    # A bundle trained on SYNTHETIC phantoms has no scope (no real examples of any view): by default every
    # scan would be labelled out_of_scope. The demo shows the pipeline, so it labels them anyway.
    print(
        "[demo]   the bundle saw only SYNTHETIC phantoms, so nothing is in its scope: scoring with "
        "--score-out-of-scope (rows keep in_scope=false and the reason)"
    )
    scores = score(
        ScoreConfig(
            bundle=bundle, input=str(inbox), output=str(out / "scores"), csv=True, explain=True,
            score_out_of_scope=True,
        )
    )  # fmt: skip
    print(
        f"[demo]   {scores['rows']} rows: {scores['scored']} scored, {scores['errors']} errors "
        f"{scores['error_reasons']}, {scores['positives']} positive"
    )
    return scores


def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    t0 = time.time()
    out = Path(cfg.out).resolve()
    data = out / "phantoms"
    print(f"[demo] writing SYNTHETIC brain-MRI phantoms (not patient data) to {data}")
    info = write_phantom_dataset(data, n_per_class=cfg.n_per_class, seed=cfg.seed, n_corrupt=cfg.n_corrupt)
    holdout = out / "phantoms_holdout"
    write_phantom_dataset(holdout, n_per_class=max(20, cfg.n_per_class // 4), seed=cfg.seed + 1000)
    init_ray()
    base = _train_config(cfg, data, out)
    search = None
    if not cfg.skip_tune and len(cfg.backbone_list) > 1:
        print(
            f"[demo] 1/4 small Ray Tune search over {cfg.backbone_list} ({cfg.tune_epochs} epochs per trial, ASHA)"
        )
        search = run_search(_search_config(cfg, base))
        best = search["best_config"]
        print(f"[demo]   winner: {best}  (leaderboard {search['leaderboard']})")
        base = replace(base, backbone=best["backbone"], lr=float(best.get("lr", base.lr)))
    print(f"[demo] 2/4 training {base.backbone} for {base.epochs} epochs on 2 Ray workers")
    # The model card names what the search chose: the retrained bundle records the values it took from the
    # winning trial (backbone and learning rate; the rest is the demo's own config).
    chosen = None
    if search:
        took = {"backbone": base.backbone, "lr": base.lr}
        chosen = {"search": {"trial_id": search["best_trial"], "trials": search["trials"], "config": took}}
    summary = run_training(base, extra_meta=chosen)
    print("[demo]   held-out test split of the training folder:")
    print(format_table(summary["test"]))
    corrupt = [str(p) for p in info.get("corrupt", [])]
    scores = _score_inbox(out, holdout, corrupt, summary["bundle"])
    print(f"[demo] 4/4 evaluation report on the independently generated holdout set {holdout}")
    rep = build_report(summary["bundle"], str(holdout), out / "report", seed=cfg.seed)
    print(format_table(rep["metrics"]))
    result = {
        "synthetic_data": str(data),
        "corrupt_files": corrupt,
        "search": search
        and {k: search[k] for k in ("run_dir", "leaderboard", "best_trial", "best_config", "trials")},
        "run_dir": summary["run_dir"],
        "bundle": summary["bundle"],
        "test_metrics": summary["test"],
        "test_report": summary.get("report"),
        "scores": str(out / "scores"),
        "score_summary": {k: scores[k] for k in ("rows", "scored", "errors", "positives")},
        "report": str(out / "report" / "report.html"),
        "holdout_metrics": str(out / "report" / "metrics.json"),
        "wall_seconds": round(time.time() - t0, 1),
    }
    (out / "demo_summary.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    return result


def main(args: argparse.Namespace) -> dict[str, Any]:
    try:
        result = run_demo(from_args(DemoConfig, args))
    except SearchInterrupted as e:  # Ctrl-C during the search: stop here, train nothing on a partial search
        exit_interrupted("demo (search)", e.summary)
    except KeyboardInterrupt:
        exit_interrupted("demo")
    out = Path(result["scores"]).parent
    print(f"[demo] done in {result['wall_seconds']:.0f}s (SYNTHETIC data).")
    if result["search"]:
        print(f"[demo]   search leaderboard: {result['search']['leaderboard']}")
    print(f"[demo]   bundle:             {result['bundle']}")
    print(f"[demo]   run folder:         {result['run_dir']} (split manifest, ingest summary, duplicates)")
    print(f"[demo]   test-split report:  {result['test_report']}")
    print(f"[demo]   scores:             {out / 'scores'} (scores.csv, explain/ Grad-CAM PNGs)")
    print(f"[demo]   holdout report:     {result['report']}")
    print(RECIPE)
    return result
