"""Distributed training entry point.

    deepspeed [--hostfile hosts | --num_gpus N] launch/train.py --config FILE [--resume latest] [key=value ...]
    torchrun --nproc_per_node N launch/train.py --config FILE ...
    python launch/train.py --config FILE ...          # one plain process (rendezvous variables filled in)

Ends with ``os._exit`` after flushing: ZeRO-3 on gloo can abort in interpreter teardown after all
work is done (about 1 run in 7 on the CPU, seen with DeepSpeed 0.19); everything (checkpoints, MLflow, logs) is closed by then.
"""

from __future__ import annotations

import argparse
import os
import sys

from magnet.commands import ArgumentParser
from magnet.commands.train import add_arguments
from magnet.config import load_config
from magnet.dist import release_shm
from magnet.errors import UserError
from magnet.io import exit_on_sigterm
from magnet.registry.tracking import check_tracking_uri
from magnet.train.loop import train
from magnet.train.rundir import release_all
from magnet.train_config import ExperimentConfig


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The arguments of ``magnet train`` that it passes on (magnet/commands/train.py), plus the launcher's."""
    p = ArgumentParser(prog="launch/train.py", description=__doc__.splitlines()[0])
    add_arguments(p)
    p.add_argument("--local_rank", "--local-rank", type=int, default=None,
                   help=argparse.SUPPRESS)  # set by the deepspeed launcher
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    try:
        # SIGTERM (the launcher stopping the ranks after one failed) unwinds like an error, so the run is recorded
        # FAILED in MLflow and its run folder unlocked
        with exit_on_sigterm():
            cfg = load_config(ExperimentConfig, args.config, args.overrides)
            if cfg.mlflow.enabled and int(os.environ.get("RANK", "0")) == 0:  # rank 0 alone talks to MLflow
                check_tracking_uri(cfg.mlflow.tracking_uri, "mlflow.tracking_uri", existing=False)
            train(cfg, resume=args.resume)
    except UserError as e:
        if not e.collective or int(os.environ.get("RANK", "0")) == 0:  # every rank raised it: one line
            print(f"magnet: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C reaches every rank: one line, from rank 0
        if int(os.environ.get("RANK", "0")) == 0:
            print("magnet: error: interrupted; the checkpoints written so far are kept (--resume latest)", file=sys.stderr)
        return 130
    except SystemExit as e:  # SIGTERM (exit_on_sigterm), after the loop recorded the run FAILED
        return int(e.code or 0)
    return 0


if __name__ == "__main__":
    rc = main()
    release_all()  # os._exit skips atexit: a failed run must not leave its run folder locked
    release_shm()  # nor its 69 MB DeepSpeed buffer in /dev/shm (a finished run has released it already)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)
