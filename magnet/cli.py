"""The ``magnet`` console command.

Each subcommand lives in ``magnet/commands/<name>.py`` with ``add_parser(subparsers)`` (light:
argparse only) and ``run(args) -> int`` (imports what it needs). A :class:`UserError` anywhere
becomes one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from magnet import __version__
from magnet.errors import UserError

COMMANDS = ["synth", "train", "registry", "shard", "predict", "evaluate"]


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line too (``magnet: error: PROG: ...``, exit 2), not usage + message."""

    def error(self, message: str):
        self.exit(2, f"magnet: error: {self.prog}: {' '.join(message.split())} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="magnet", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"magnet-hd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"magnet.commands.{name}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except UserError as e:
        print(f"magnet: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("magnet: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
