"""The command line shared by ``launch/sweep.py`` and ``launch/experiment.py``: ``--config``, ``--address``,
``--resume`` and ``key=value`` overrides; a UserError is one line and exit status 2."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any


def run_cli(prog: str, doc: str, what: str, resume_help: str, config_cls: type, runner: Callable[..., dict],
            argv: list[str] | None = None) -> tuple[Any, dict] | int:
    """Parse ``argv``, load ``config_cls`` and call ``runner(cfg, config_path, resume=...)``: ``(cfg, summary)``,
    or 2 after printing a UserError."""
    from magnet.cli import ArgumentParser
    from magnet.config import load_config
    from magnet.errors import UserError

    p = ArgumentParser(prog=prog, description=doc.splitlines()[0])
    p.add_argument("--config", required=True, help=f"{what} YAML (configs/{what}/*.yaml)")
    p.add_argument("--address", default=None, help="Ray cluster address ('auto' on a cluster node); default: local Ray")
    p.add_argument("--resume", action="store_true", help=resume_help)
    p.add_argument("overrides", nargs="*", help="key.sub=value")
    args = p.parse_args(argv)
    try:
        flags = {"ray": {"address": args.address}} if args.address is not None else {}
        cfg = load_config(config_cls, args.config, args.overrides, **flags)
        return cfg, runner(cfg, args.config, resume=args.resume)
    except UserError as e:
        print(f"magnet: error: {e}", file=sys.stderr)
        return 2
