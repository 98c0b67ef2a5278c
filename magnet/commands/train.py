"""``magnet train``: start ``launch/train.py`` with the launcher that fits this machine.

One process per GPU on a CUDA machine, else ``--nproc`` CPU processes (default 2), through the
``deepspeed`` launcher (or ``torchrun`` with ``--launcher torchrun``) on a free local port.
"""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("train", help="train MagNet with DeepSpeed on this machine",
                              description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="experiment YAML (configs/train/*.yaml)")
    p.add_argument("--resume", default=None, help="'latest' or a run directory")
    p.add_argument("--nproc", type=int, default=None, help="processes (default: GPUs, else 2 on the CPU)")
    p.add_argument("--launcher", choices=["deepspeed", "torchrun"], default="deepspeed")
    p.add_argument("--master-port", type=int, default=None, help="rendezvous port (default: a free one)")
    p.add_argument("overrides", nargs="*", help="key.sub=value")
    p.set_defaults(run=run)


def command(args: argparse.Namespace) -> list[str]:
    import sys
    from pathlib import Path

    import torch

    from magnet.dist import free_port

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


def _run_folder(args: argparse.Namespace):
    """The run folder that the YAML and the overrides name, read before the config is built: building it imports
    the models (and torch) to check model.name, seconds on a busy machine. None: no name, so a new folder."""
    from pathlib import Path

    from magnet.config import load_yaml, parse_override
    from magnet.experiment import TrainConfig

    if args.resume not in (None, "latest"):
        p = Path(args.resume)
        return p.parent if p.name == "checkpoints" else p  # as launch/train.py reads it
    train = dict(load_yaml(args.config).get("train") or {})
    for override in args.overrides:
        train.update(parse_override(override).get("train") or {})
    name = train.get("run_name", TrainConfig.run_name)
    return Path(str(train.get("out_dir", TrainConfig.out_dir))) / str(name) if name else None


def run(args: argparse.Namespace) -> int:
    import subprocess

    from magnet.config import load_config
    from magnet.errors import UserError
    from magnet.experiment import ExperimentConfig, zero_file
    from magnet.format.manifest import Manifest, manifest_path
    from magnet.io import check_not_input
    from magnet.train.checkpoint import read_pointer
    from magnet.train.rundir import refuse_if_owned

    if args.nproc is not None and args.nproc < 1:  # 0 is not "the default"
        raise UserError(f"--nproc: must be >= 1, got {args.nproc}")
    folder = _run_folder(args)
    if folder is not None:  # a run in use is refused before anything else (rank 0 takes the lock itself)
        refuse_if_owned(folder)
        if args.resume is not None and read_pointer(folder / "checkpoints") is None:  # not once per rank
            raise UserError(f"--resume {args.resume}: no checkpoint found under {folder}")
    cfg = load_config(ExperimentConfig, args.config, args.overrides)  # a bad key fails here, once, before any launch
    zero_file(cfg.train.deepspeed)
    if folder is not None and args.resume is None:  # a new run writes its config.yaml, checkpoints, model there
        check_not_input(folder, "train.run_name", [("--config", args.config), ("data.shards", cfg.data.shards)])
    if cfg.mlflow.enabled:
        from magnet.registry.tracking import check_tracking_uri

        check_tracking_uri(cfg.mlflow.tracking_uri, "mlflow.tracking_uri", existing=False)
    Manifest.load(manifest_path(cfg.data.shards, cfg.data.bin_um))  # once here, not once per rank after the launch
    return subprocess.call(command(args))
