"""The ``magnet`` console command.

Each subcommand lives in ``magnet/commands/<name>.py`` with ``add_parser(subparsers)`` and ``run(args) -> int``;
a command module loads no torch, Ray or MLflow until its ``run``. ``launch/sweep.py`` and
``launch/experiment.py`` call :func:`main` (one parser). A :class:`UserError` anywhere becomes one line on
stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import sys

from magnet import commands
from magnet.commands import evaluate, experiment, predict, registry, shard, sweep, synth, train

COMMANDS = [synth, shard, train, sweep, experiment, registry, predict, evaluate]  # in the order of --help


def build_parser() -> argparse.ArgumentParser:
    return commands.build_parser(COMMANDS, __doc__.splitlines()[0])


def main(argv: list[str] | None = None) -> int:
    return commands.main(argv, COMMANDS, __doc__.splitlines()[0])


if __name__ == "__main__":
    sys.exit(main())
