"""``magnet train``: start ``launch/train.py`` with the launcher that fits this machine.

One process per GPU on a CUDA machine, else ``--nproc`` CPU processes (default 2), through the
``deepspeed`` launcher (or ``torchrun`` with ``--launcher torchrun``) on a free local port, under
:mod:`magnet.train.guard`, so that killing ``magnet train`` (even with SIGKILL) ends the launcher and every rank.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from magnet.config import load_config
from magnet.dist import free_port
from magnet.errors import UserError
from magnet.format.manifest import Manifest, manifest_path
from magnet.io import check_not_input
from magnet.registry.tracking import check_tracking_uri
from magnet.train.checkpoint import read_pointer
from magnet.train.rundir import check_writable, refuse_if_owned
from magnet.train_config import ExperimentConfig, zero_file


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments ``magnet train`` passes on to each rank's ``launch/train.py``, which parses them too."""
    p.add_argument("--config", required=True, help="experiment YAML (configs/train/*.yaml)")
    p.add_argument("--resume", default=None, help="'latest' (this run name's newest checkpoint) or a run directory")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.steps=100")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("train", help="train MagNet with DeepSpeed on this machine",
                              description=__doc__.splitlines()[0])
    add_arguments(p)
    p.add_argument("--nproc", type=int, default=None, help="processes (default: GPUs, else 2 on the CPU)")
    p.add_argument("--launcher", choices=["deepspeed", "torchrun"], default="deepspeed")
    p.add_argument("--master-port", type=int, default=None, help="rendezvous port (default: a free one)")
    p.set_defaults(run=run)


def command(args: argparse.Namespace) -> list[str]:
    import torch  # start-up time: the other commands and --help load no torch

    nproc = args.nproc if args.nproc is not None else (torch.cuda.device_count() or 2)
    script = str(Path(__file__).resolve().parents[2] / "launch" / "train.py")
    port = str(args.master_port or free_port())
    if args.launcher == "torchrun":
        head = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                "--master_addr", "127.0.0.1", "--master_port", port]
    else:
        head = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc), "--master_port", port]
    tail = ["--config", args.config] + (["--resume", args.resume] if args.resume else []) + list(args.overrides)
    return head + [script] + tail


def run_folder(cfg: ExperimentConfig, resume: str | None) -> Path | None:
    """The run folder of ``cfg`` (as launch/train.py reads it); None: no run name, so a new timestamped folder."""
    if resume not in (None, "latest"):
        p = Path(resume)
        return p.parent if p.name == "checkpoints" else p
    return Path(cfg.train.out_dir) / cfg.train.run_name if cfg.train.run_name else None


def guarded(cmd: list[str]) -> list[str]:
    """``cmd`` under :mod:`magnet.train.guard`, which ends its whole process tree when this process dies."""
    return [sys.executable, "-m", "magnet.train.guard", str(os.getpid()), *cmd]


def run(args: argparse.Namespace) -> int:
    if args.nproc is not None and args.nproc < 1:  # 0 is not "the default"
        raise UserError(f"--nproc: must be >= 1, got {args.nproc}")
    cfg = load_config(ExperimentConfig, args.config, args.overrides)  # a bad key fails here, once, before any launch
    folder = run_folder(cfg, args.resume)
    if folder is not None:  # a run in use is refused before any launch (rank 0 takes the lock itself)
        refuse_if_owned(folder)
        if args.resume is not None and read_pointer(folder / "checkpoints") is None:  # not once per rank
            raise UserError(f"--resume {args.resume}: no checkpoint found under {folder}")
    check_writable(Path(cfg.train.out_dir), "train.out_dir")
    zero_file(cfg.train.deepspeed)
    if folder is not None and args.resume is None:  # a new run writes its config.yaml, checkpoints, model there
        check_not_input(folder, "train.run_name", [("--config", args.config), ("data.shards", cfg.data.shards)])
    if cfg.mlflow.enabled:
        check_tracking_uri(cfg.mlflow.tracking_uri, "mlflow.tracking_uri", existing=False)
    Manifest.load(manifest_path(cfg.data.shards, cfg.data.bin_um))  # once here, not once per rank after the launch
    proc = subprocess.Popen(guarded(command(args)))
    try:
        return proc.wait()
    except KeyboardInterrupt:  # the whole foreground group got SIGINT: the ranks stop by themselves, give them time
        try:
            proc.wait(timeout=60)
        except (subprocess.TimeoutExpired, KeyboardInterrupt):
            proc.terminate()  # the guard ends the tree
            proc.wait()
        raise
