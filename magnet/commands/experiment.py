"""``magnet experiment``: replicates as one command, models x seeds trained as a Ray Tune grid, then scored once
on the test slides. ``launch/experiment.py`` is the same command for ``ray job submit``."""

from __future__ import annotations

import argparse
import json

from magnet.commands.sweep import add_ray_arguments, load_ray_config
from magnet.sweep.replicates import ReplicatesConfig, run_experiment

USAGE = """examples:
  magnet experiment --config configs/experiment/context.yaml [key=value ...]
  magnet experiment --config FILE --resume      # an interrupted experiment (training or evaluation)
The table (per gene group, over replicates, paired statistics, context controls) and the scatter plots
land in OUT_DIR/NAME/evaluation/ and on the MLflow parent run of the trials (magnet/sweep/replicates.py).
Keys of --config / key=value: magnet/sweep/replicates.py (ReplicatesConfig)."""


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("experiment", help="replicates: models x seeds on Ray Tune, then scored on the test "
                              "slides", description=__doc__, epilog=USAGE,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    add_ray_arguments(p, "experiment", "continue the interrupted experiment of this name")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    summary = run_experiment(load_ray_config(ReplicatesConfig, args), args.config, resume=args.resume)
    print(json.dumps({"parent_run_id": summary["parent_run_id"], "evaluation": summary["evaluation"],
                      "models": summary["models"]}))
    return 0
