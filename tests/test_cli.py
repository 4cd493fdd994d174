"""The console command and the job scripts expose the same stages with working --help."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

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
    assert args.epochs == 2 and args.weights == "none" and args.func.__module__ == "raytumor.train"


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_job_scripts_run(stage):
    r = subprocess.run(
        [sys.executable, str(REPO / "jobs" / f"{stage}.py"), "--help"], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    assert "usage:" in r.stdout


def test_missing_required_flag_fails():
    r = subprocess.run([sys.executable, str(REPO / "jobs" / "train.py")], capture_output=True, text=True)
    assert r.returncode == 2 and "--data" in r.stderr
