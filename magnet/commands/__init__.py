"""The subcommands of ``magnet``, one module each with ``add_parser(subparsers)`` and ``run(args) -> int``, and
:func:`main`, which parses a command line over some of them and runs the chosen one (``magnet.cli`` over all;
``magnet experiment`` over ``magnet evaluate``). A :class:`UserError` anywhere becomes one line on stderr and
exit status 2."""

from __future__ import annotations

import argparse
import sys
from types import ModuleType

from magnet import __version__
from magnet.errors import UserError


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line too (``magnet: error: PROG: ...``, exit 2), not usage + message."""

    def error(self, message: str):
        self.exit(2, f"magnet: error: {self.prog}: {' '.join(message.split())} (see {self.prog} --help)\n")


def build_parser(commands: list[ModuleType], description: str) -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="magnet", description=description)
    parser.add_argument("--version", action="version", version=f"magnet-hd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in commands:
        command.add_parser(sub)
    return parser


def main(argv: list[str] | None, commands: list[ModuleType], description: str = "") -> int:
    args = build_parser(commands, description).parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except UserError as e:
        print(f"magnet: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("magnet: interrupted", file=sys.stderr)
        return 130
