"""``raytumor`` console command: one sub-command per stage, each the same as ``python jobs/<stage>.py``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from importlib import import_module

# name -> (module, help); modules expose get_args_parser(add_help) and main(args)
STAGES: dict[str, tuple[str, str]] = {
    "train": ("raytumor.train", "fine-tune a classifier on a labelled folder/bucket/manifest"),
    "tune": ("raytumor.tune", "search backbones and hyperparameters with Ray Tune (ASHA)"),
    "score": ("raytumor.score", "batch-score a folder/bucket/archive of scans: one row per file, resumable"),
    "report": ("raytumor.report", "self-contained HTML evaluation report of a bundle on labelled data"),
    "evaluate": ("raytumor.evaluate", "metrics of a bundle on labelled data, with 95%% CIs"),
    "slices": ("raytumor.slices", "export axial training slices (PNG + manifest) from volumes"),
    "demo": ("raytumor.demo", "synthetic phantoms -> train -> evaluate, on a fresh machine"),
}


def _backbones(_: argparse.Namespace) -> None:
    from raytumor.model import list_backbones

    for name in list_backbones():
        print(name)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="raytumor", description="Brain-MRI tumour classifiers on Ray")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_) in STAGES.items():
        mod = import_module(module)
        sp = sub.add_parser(
            name, help=help_, parents=[mod.get_args_parser(add_help=False)], description=help_
        )
        sp.set_defaults(func=mod.main)
    sp = sub.add_parser("backbones", help="list the backbones the model factory builds")
    sp.set_defaults(func=_backbones)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Callable = args.func
    func(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
