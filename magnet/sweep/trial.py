"""One trial, inside its Ray worker: the sweep's values on the base experiment, then the same
``train()`` as ``launch/train.py`` (DeepSpeed with a world of one on a free rendezvous port).

At every evaluation the trial reports ``step`` and the evaluation metrics to Tune, with a checkpoint
(``trial.json``) that records the step reported. A restored trial resumes its run from the run's latest
DeepSpeed checkpoint, which may be past the step Tune restored (Tune saves its state every few seconds,
so a killed sweep can lose the last reports from it): the evaluations between the two are reported
again from the run's ``metrics.jsonl`` before training goes on, so Tune (and ASHA) see every evaluation
once and in order. The run directories live under the sweep folder, so a multi-node sweep needs that
folder on a filesystem every node shares.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from ray import tune

from magnet import dist
from magnet.errors import UserError
from magnet.sweep.space import trial_config
from magnet.train import checkpoint
from magnet.train.loop import MetricsLog, tracked, train

TRIAL_FILE = "trial.json"


def run_trial(params: dict, *, sweep, sweep_dir: str, parent_run_id: str) -> None:
    trial_id = tune.get_context().get_trial_id()
    run_root = Path(sweep_dir) / "runs"
    cfg = trial_config(sweep, params, run_root, trial_id, parent_run_id)
    run_dir = run_root / trial_id
    # a world of one per trial process; a port of its own, so concurrent trials do not meet
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(dist.free_port()))
    reported = -1  # the last step Tune holds (a fitted model reports step 0)
    restored = tune.get_checkpoint()
    if restored is not None:
        with restored.as_directory() as d:
            reported = json.loads((Path(d) / TRIAL_FILE).read_text())["step"]
    latest = checkpoint.read_pointer(run_dir / "checkpoints")

    def report(step: int, metrics: dict) -> None:
        nonlocal reported
        dist.release_shm()  # a world of one: no peer maps the buffer; a stopped trial would leave it behind
        if step <= reported:  # Tune has it from before the trial was interrupted
            return
        if sweep.search.metric not in metrics:
            raise UserError(f"config: search.metric: '{sweep.search.metric}' is not reported; known: {', '.join(sorted(metrics))}")
        with tempfile.TemporaryDirectory() as d:
            (Path(d) / TRIAL_FILE).write_text(json.dumps({"run_dir": str(run_dir), "step": step}))
            tune.report({"step": step, **metrics}, checkpoint=tune.Checkpoint.from_directory(d))
        reported = step

    try:
        if latest is not None:
            _report_logged(run_dir, cfg.data.eval_split, checkpoint.tag_step(latest), report)
        train(cfg, resume=str(run_dir) if latest else None, report=report)
    finally:
        dist.shutdown()


def _report_logged(run_dir: Path, split: str, upto: int, report) -> None:
    """Report the evaluations the run logged up to its checkpoint at step ``upto`` (``report`` skips
    those Tune already holds); the run's later rows are redone by training."""
    for row in MetricsLog(run_dir / "metrics.jsonl", tracker=None, active=False).read(split):
        if row["step"] <= upto:
            values = {k: v for k, v in row.items() if k not in ("kind", "step")}
            report(row["step"], tracked(values, f"{split}/"))
