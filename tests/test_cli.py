"""The console command and the job scripts expose the same stages with working --help."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import raytumor
from raytumor.cli import STAGES, build_parser, main

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_subcommand_help(stage, capsys):
    with pytest.raises(SystemExit) as e:
        main([stage, "--help"])
    assert e.value.code == 0
    assert "--" in capsys.readouterr().out


def test_top_level_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert all(stage in out for stage in STAGES)


def test_backbones_listed(capsys):
    main(["backbones"])
    names = capsys.readouterr().out.split()
    assert {"efficientnet_lite0", "resnet18", "resnet50", "efficientnet_b0", "mobilenet_v3_large"} <= set(
        names
    )
    assert {"densenet121", "convnext_tiny"} <= set(names)


def test_train_flags_match_job_script():
    args = build_parser().parse_args(["train", "--data", "x", "--epochs", "2", "--weights", "none"])
    assert args.epochs == 2 and args.weights == "none" and args.func.__module__.startswith("raytumor.train")


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_job_scripts_are_the_stage_entry_points(stage):
    """Each jobs/<stage>.py parses with the stage's own parser (YAML defaults applied) and calls its main."""
    tree = ast.parse((REPO / "jobs" / f"{stage}.py").read_text())
    imports = {(n.module, a.name) for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
    assert {(f"raytumor.{stage}", "get_args_parser"), (f"raytumor.{stage}", "main")} <= imports
    if stage != "tune":  # tune reads its search file (space:, fixed:) itself
        assert ("raytumor.config", "parse_args") in imports


def test_job_script_runs():
    r = subprocess.run(
        [sys.executable, str(REPO / "jobs" / "score.py"), "--help"], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    assert "usage:" in r.stdout and "(default: 32)" in r.stdout  # --units-per-block


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"raytumor {raytumor.__version__}"


def test_help_shows_every_option_with_its_default(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for flag, default in (
        ("--epochs", "8"),
        ("--lr", "0.001"),
        ("--image-size", "160"),
        ("--batch-size", "32"),
    ):
        i = out.index(f"{flag} {flag.lstrip('-').replace('-', '_').upper()} ")
        assert f"(default: {default})" in out[i : out.index("--", i + len(flag) + 2)], flag
    parser = build_parser().stage_parsers["train"]
    assert all(a.help for a in parser._actions), [a.dest for a in parser._actions if not a.help]


def test_help_texts_are_clean(capsys):
    with pytest.raises(SystemExit):
        main(["evaluate", "--help"])
    assert "%%" not in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "tune -> train -> score -> report" in " ".join(out.split())


def test_config_file_gives_defaults_and_the_command_line_wins(tmp_path):
    from raytumor.config import apply_config_file, parse_args
    from raytumor.score import get_args_parser as score_parser

    f = tmp_path / "train.yaml"
    f.write_text("data: [from_file]\nepochs: 3\nimage-size: 96\n")
    p = build_parser()
    apply_config_file(p.stage_parsers["train"], f, [a.dest for a in p.stage_parsers["train"]._actions])
    args = p.parse_args(["train", "--config", str(f), "--epochs", "5"])
    assert args.data == ["from_file"] and args.epochs == 5 and args.image_size == 96
    (tmp_path / "bad.yaml").write_text("epoch: 3\n")
    with pytest.raises(ValueError, match="unknown options"):
        apply_config_file(p.stage_parsers["train"], tmp_path / "bad.yaml", ["epochs"])
    # the jobs/*.py way: required options may come from the file
    (tmp_path / "score.yaml").write_text("bundle: b\ninput: i\noutput: o\nbatch_size: 4\n")
    args = parse_args(score_parser(), ["--config", str(tmp_path / "score.yaml"), "--output", "o2"])
    assert (args.bundle, args.input, args.output, args.batch_size) == ("b", "i", "o2", 4)


def test_missing_required_flag_fails():
    r = subprocess.run([sys.executable, str(REPO / "jobs" / "train.py")], capture_output=True, text=True)
    assert r.returncode == 2 and "--data" in r.stderr
