"""One trial, inside its Ray worker: the sweep's values on the base experiment, then the same
``train()`` as ``launch/train.py`` (DeepSpeed with a world of one on a free rendezvous port).

At every evaluation the trial reports ``step`` and the evaluation metrics to Tune, with a checkpoint
that names the trial's run directory (``trial.json``); a restored trial resumes that run from its
latest DeepSpeed checkpoint. The run directories live under the sweep folder, so a multi-node sweep
needs that folder on a filesystem every node shares.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch.distributed as td
from ray import tune

from magnet import dist
from magnet.errors import UserError
from magnet.io import atomic_write_text
from magnet.sweep.space import trial_config
from magnet.train import checkpoint
from magnet.train.loop import train

TRIAL_FILE = "trial.json"


def run_trial(params: dict, *, sweep, sweep_dir: str, parent_run_id: str) -> None:
    trial_id = tune.get_context().get_trial_id()
    run_root = Path(sweep_dir) / "runs"
    cfg = trial_config(sweep, params, run_root, trial_id, parent_run_id)
    run_dir = run_root / trial_id
    # a world of one per trial process; a port of its own, so concurrent trials do not meet
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(dist.free_port()))
    restored = tune.get_checkpoint()
    if restored is not None:
        with restored.as_directory() as d:
            saved = json.loads((Path(d) / TRIAL_FILE).read_text())
        resume = saved["run_dir"]
        _rewind(Path(resume) / "checkpoints", saved["tag"])
    else:  # restarted without a Tune checkpoint: a DeepSpeed checkpoint saved after the last report
        resume = str(run_dir) if checkpoint.read_pointer(run_dir / "checkpoints") else None

    def report(step: int, metrics: dict) -> None:
        dist.release_shm()  # a world of one: no peer maps the buffer; a stopped trial would leave it behind
        if sweep.search.metric not in metrics:
            raise UserError(f"config: search.metric: '{sweep.search.metric}' is not reported; known: {', '.join(sorted(metrics))}")
        row = {"step": step, **metrics}
        tag = checkpoint.read_pointer(run_dir / "checkpoints")
        if tag is None:
            tune.report(row)
            return
        with tempfile.TemporaryDirectory() as d:
            (Path(d) / TRIAL_FILE).write_text(json.dumps({"run_dir": str(run_dir), "step": step, "tag": tag}))
            tune.report(row, checkpoint=tune.Checkpoint.from_directory(d))

    try:
        train(cfg, resume=resume, report=report)
    finally:
        if td.is_initialized():
            td.destroy_process_group()
        dist.release_shm()


def _rewind(ckpt_dir: Path, tag: str) -> None:
    """Point ``latest`` at the checkpoint of Tune's last report: an interrupted trial may have trained
    (and checkpointed) past it; it redoes those steps and reports them this time."""
    if (ckpt_dir / tag).is_dir() and checkpoint.read_pointer(ckpt_dir) != tag:
        atomic_write_text(ckpt_dir / "latest", tag)
