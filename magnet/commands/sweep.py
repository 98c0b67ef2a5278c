"""``magnet sweep``: a Ray Tune sweep over hyperparameters and bin resolutions; every trial runs
``magnet.train.loop.train`` (as ``launch/train.py``). ``launch/sweep.py`` is the same command for
``ray job submit``."""

from __future__ import annotations

import argparse
import json
import sys

from magnet.config import load_config
from magnet.sweep.config import SweepConfig
from magnet.sweep.run import run_sweep

USAGE = """examples:
  magnet sweep --config configs/sweep/resolutions.yaml [key=value ...]    # local Ray
  magnet sweep --config FILE --address auto                              # on a Ray cluster node
  magnet sweep --config FILE --resume                                    # an interrupted sweep
Keys of --config / key=value: magnet/sweep/config.py."""


def add_ray_arguments(p: argparse.ArgumentParser, what: str, resume_help: str) -> None:
    """The arguments ``magnet sweep`` and ``magnet experiment`` share."""
    p.add_argument("--config", required=True, help=f"{what} YAML (configs/{what}/*.yaml)")
    p.add_argument("--address", default=None, help="Ray cluster address ('auto' on a cluster node); default: local Ray")
    p.add_argument("--resume", action="store_true", help=resume_help)
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. asha.enabled=false")


def load_ray_config(config_cls: type, args: argparse.Namespace):
    """The config of ``--config`` and the overrides, ``--address`` as ``ray.address``."""
    flags = {"ray": {"address": args.address}} if args.address is not None else {}
    return load_config(config_cls, args.config, args.overrides, **flags)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("sweep", help="Ray Tune sweep: trials of launch/train.py, the best one registered",
                              description=__doc__, epilog=USAGE, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_ray_arguments(p, "sweep", "continue the interrupted sweep of this name (Tuner.restore)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    cfg = load_ray_config(SweepConfig, args)
    summary = run_sweep(cfg, args.config, resume=args.resume)
    if summary.get("already_finished"):
        print(f"sweep {summary['sweep_dir']}: finished already, nothing to resume", file=sys.stderr)
    best = summary["best"]
    print(f"sweep {summary['sweep_dir']}: " + ", ".join(f"{n} {k}" for k, n in summary["counts"].items())
          + (f"; best {best['trial']} {cfg.search.metric}={best['value']:.4g} model version {best['model_version']}"
             if best else "; no finished trial"))
    print(json.dumps({"parent_run_id": summary["parent_run_id"], "best": best}))
    return 0
