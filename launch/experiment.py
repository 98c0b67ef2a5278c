"""Replicates as one command: models x seeds trained as a Ray Tune grid, then scored once on the test slides.

    python launch/experiment.py --config configs/experiment/context.yaml [key=value ...]
    python launch/experiment.py --config FILE --resume      # an interrupted experiment (training or evaluation)

The table (per gene group, over replicates, paired statistics, context controls) and the scatter plots
land in OUT_DIR/NAME/evaluation/ and on the MLflow parent run of the trials (magnet/sweep/experiment.py).
"""

from __future__ import annotations

import argparse
import json
import sys


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from magnet.cli import ArgumentParser

    p = ArgumentParser(prog="launch/experiment.py", description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="experiment YAML (configs/experiment/*.yaml)")
    p.add_argument("--address", default=None, help="Ray cluster address ('auto' on a cluster node); default: local Ray")
    p.add_argument("--resume", action="store_true", help="continue the interrupted experiment of this name")
    p.add_argument("overrides", nargs="*", help="key.sub=value")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from magnet.config import load_config
    from magnet.errors import UserError
    from magnet.sweep.experiment import ReplicatesConfig, run_experiment

    try:
        flags = {"ray": {"address": args.address}} if args.address is not None else {}
        cfg = load_config(ReplicatesConfig, args.config, args.overrides, **flags)
        summary = run_experiment(cfg, args.config, resume=args.resume)
    except UserError as e:
        print(f"magnet: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"parent_run_id": summary["parent_run_id"], "evaluation": summary["evaluation"],
                      "models": summary["models"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
