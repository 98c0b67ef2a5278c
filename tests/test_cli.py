"""One command line: every way in is a ``magnet`` subcommand; ``launch/sweep.py`` and ``launch/experiment.py``
(for ``ray job submit``) are the same parser and code as ``magnet sweep`` and ``magnet experiment``."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True, cwd=REPO, timeout=120)


@pytest.mark.parametrize("command", ["sweep", "experiment"])
def test_sweep_and_experiment_are_magnet_subcommands(command):
    out = _run("-m", "magnet", command, "--help")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"usage: magnet {command} ")
    for flag in ("--config", "--address", "--resume", "key=value"):
        assert flag in out.stdout
    assert f"configs/{command}/" in out.stdout
    shim = _run(f"launch/{command}.py", "--help")  # the launcher script: the same parser
    assert shim.returncode == 0 and shim.stdout == out.stdout


def test_the_launcher_scripts_report_errors_as_magnet_does(tmp_path):
    for argv in (["-m", "magnet", "sweep", "--config", "c.yaml"], ["launch/sweep.py", "--config", "c.yaml"]):
        out = _run(*argv)
        assert out.returncode == 2 and out.stderr.strip() == "magnet: error: config: file not found: c.yaml"
    out = _run("launch/experiment.py")
    assert out.returncode == 2 and "the following arguments are required: --config" in out.stderr


def test_launch_train_parses_what_magnet_train_passes_on():
    from launch.train import parse_args
    from magnet.cli import build_parser
    from magnet.commands.train import command

    args = build_parser().parse_args(["train", "--config", "c.yaml", "--resume", "latest", "--nproc", "1",
                                      "train.steps=3"])
    rank = parse_args(command(args)[-5:] + ["--local_rank=0"])
    assert (rank.config, rank.resume, rank.overrides, rank.local_rank) == ("c.yaml", "latest", ["train.steps=3"], 0)
