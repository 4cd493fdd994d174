"""``raytumor`` console command: one sub-command per stage, each the same as ``python jobs/<stage>.py``.

Errors a user can fix from the message alone (a missing input, a bad bundle or config, an output folder
that is not a run's) end the command with one line on stderr and exit status 2; ``--debug`` (before or
after the sub-command) shows the traceback instead.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from importlib import import_module

import raytumor
from raytumor.config import HelpFormatter, apply_config_file
from raytumor.model import WeightsUnavailableError, list_backbones
from raytumor.runtime import filter_native_stderr

# name -> (module, help); modules expose get_args_parser(add_help) and main(args). Modules are imported when
# the parser is built, so `raytumor --help` stays fast (Ray itself is imported only by a stage's work).
STAGES: dict[str, tuple[str, str]] = {
    "train": ("raytumor.train", "fine-tune a classifier on a labelled folder/bucket/manifest"),
    "tune": ("raytumor.tune", "search backbones and hyperparameters with Ray Tune (ASHA)"),
    "cv": (
        "raytumor.cv",
        "cross-validate: group folds or leave-one-source-out, folds in parallel, one report",
    ),
    "score": ("raytumor.score", "batch-score a folder/bucket/archive of scans: one row per file, resumable"),
    "serve": (
        "raytumor.serve",
        "serve a bundle over HTTP on Ray Serve: one scan per request, the batch scorer's rows",
    ),
    "review": (
        "raytumor.review",
        "review flagged scans of a score output in a local web page; export verdicts as training data",
    ),
    "report": ("raytumor.report", "self-contained HTML evaluation report of a bundle on labelled data"),
    "evaluate": ("raytumor.evaluate", "metrics of a bundle on labelled data, with 95 percent CIs"),
    "slices": (
        "raytumor.slices",
        "export training slices (PNG + manifest) from volumes: axial, or every plane for the view net",
    ),
    "demo": ("raytumor.demo", "synthetic phantoms -> tune -> train -> score -> report, on a fresh machine"),
}


DEBUG_HELP = "show the full traceback of an error instead of one line"


def user_error(e: BaseException) -> bool:
    """Foreseeable errors the message explains (bad paths, storage, bundles, configs, values, weights
    offline): ValueError (incl. BundleError), OSError (incl. FileNotFoundError), YAML, WeightsUnavailable.
    Ray's wrapped worker errors, which may subclass ValueError too, and anything else are bugs: they keep
    their traceback."""
    import yaml

    if type(e).__module__.split(".")[0] == "ray":
        return False
    return isinstance(e, (ValueError, OSError, yaml.YAMLError, WeightsUnavailableError))


def _backbones(_: argparse.Namespace) -> None:
    for name in list_backbones():
        print(name)


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser; ``parser.stage_parsers`` maps each stage to its sub-parser."""
    p = argparse.ArgumentParser(prog="raytumor", description="Brain-MRI tumour classifiers on Ray")
    p.add_argument("--version", action="version", version=f"raytumor {raytumor.__version__}")
    p.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    stages: dict[str, argparse.ArgumentParser] = {}
    for name, (module, help_) in STAGES.items():
        mod = import_module(module)
        sp = sub.add_parser(
            name,
            help=help_,
            parents=[mod.get_args_parser(add_help=False)],
            description=help_,
            formatter_class=HelpFormatter,
        )
        # SUPPRESS: the sub-command's flag must not reset a --debug given before it
        sp.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
        sp.set_defaults(func=mod.main)
        stages[name] = sp
    sp = sub.add_parser("backbones", help="list the backbones the model factory builds")
    sp.set_defaults(func=_backbones)
    p.stage_parsers = stages  # type: ignore[attr-defined]
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    pre.add_argument("--debug", action="store_true")
    known = pre.parse_known_args(argv)[0]
    try:
        if known.config and command in parser.stage_parsers and command != "tune":  # tune reads its own
            # YAML as defaults, the command line over it (timm's way); options the file gives are not required.
            sp = parser.stage_parsers[command]
            apply_config_file(sp, known.config, [a.dest for a in sp._actions])
        args = parser.parse_args(argv)
        func: Callable = args.func
        func(args)
    except KeyboardInterrupt:  # a stage that has nothing to save or say (score and tune say more)
        if known.debug:
            raise
        print(f"raytumor {command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if known.debug or not user_error(e):
            raise
        msg = " ".join(str(e).split()) or type(e).__name__
        print(f"raytumor {command}: error: {msg} (--debug shows the traceback)", file=sys.stderr)
        return 2
    return 0


def run(argv: list[str] | None = None) -> int:
    """The console command and ``jobs/*.py``: :func:`main` in a process of its own, whose log is kept
    free of Ray's known-harmless native lines (``--debug`` keeps everything)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--debug" not in argv:
        filter_native_stderr()
    return main(argv)


if __name__ == "__main__":
    sys.exit(run())
