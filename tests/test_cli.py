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
    """Each jobs/<stage>.py is `raytumor <stage>`: the CLI's own run() with its stage name, so `ray job
    submit -- python jobs/<stage>.py` parses, reads YAML and reports user errors exactly as the command."""
    tree = ast.parse((REPO / "jobs" / f"{stage}.py").read_text())
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "run"]
    assert len(calls) == 1 and isinstance(calls[0].args[0], ast.List)
    assert calls[0].args[0].elts[0].value == stage


def test_job_script_runs(tmp_path):
    r = subprocess.run(
        [sys.executable, str(REPO / "jobs" / "score.py"), "--help"], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    assert "usage:" in r.stdout and "(default: 32)" in r.stdout  # --units-per-block
    r = subprocess.run(
        [sys.executable, str(REPO / "jobs" / "score.py"), "--bundle", str(tmp_path / "nope"), "--input",
         str(tmp_path), "--output", str(tmp_path / "out")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith("raytumor score: error: ") and len(r.stderr.strip().splitlines()) == 1


def test_native_stderr_filter_drops_only_the_known_lines():
    """Ray's core logs an ERROR line per Ray Data actor (ray-project/ray#57733) straight to fd 2: the
    command-line filter drops exactly those lines; other bytes, partial lines and the exit message pass
    through in order."""
    code = (
        "import os, sys, time\n"
        "from raytumor.runtime import filter_native_stderr\n"
        "filter_native_stderr()\n"
        "os.write(2, b'first\\n[2026 E 1 1] core_worker.cc:2465: Actor X has constructor arguments in the "
        "object store and max_restarts > 0. See\\nsecond\\n')\n"
        "os.write(2, b'[gcs_server] (gcs_server) Failed to kill actor 96af: RpcError: Socket closed\\n')\n"
        "os.write(2, b'(gcs_server) Failed to kill actor 96af: out of memory\\n')\n"
        "os.write(2, b'(pid=12135) [mutex.cc : 452] RAW: Lock blocking 0x563f8aed1320   @ 0x7fdd3e62b1a2\\n')\n"
        "os.write(2, b'partial')\n"
        "time.sleep(0.6)\n"
        "sys.stderr.write(' line\\n')\n"
        "raise SystemExit('bye')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    assert r.returncode == 1
    assert (
        r.stderr
        == b"first\nsecond\n(gcs_server) Failed to kill actor 96af: out of memory\npartial line\nbye\n"
    )


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


def test_demo_refuses_an_unknown_backbone_before_writing_anything(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "d"), "--backbones", "resnet18,nope"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("raytumor demo: error: --backbones: unknown ['nope']") and "Traceback" not in err
    assert not (tmp_path / "d").exists()
