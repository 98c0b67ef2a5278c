"""ASHA for sweeps of ``train()``: a trial's last evaluation is never cut (the trial then logs its
model), and every early stop is written to a file, so the results tell a trial ASHA stopped from
one an interrupted sweep left unfinished. Imported by the driver only (it imports Ray)."""

from __future__ import annotations

from pathlib import Path

from ray.tune.schedulers import ASHAScheduler, TrialScheduler

STOPPED_FILE = "stopped_early.txt"


class SweepASHA(ASHAScheduler):
    def __init__(self, *, last_step: int, sweep_dir: str, **kwargs):
        super().__init__(time_attr="step", max_t=last_step, **kwargs)
        self.last_step, self.sweep_dir = last_step, sweep_dir

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        action = super().on_trial_result(tune_controller, trial, result)
        if action != TrialScheduler.STOP:
            return action
        if result.get("step", 0) >= self.last_step:  # ends by itself now, after logging its model
            return TrialScheduler.CONTINUE
        with open(Path(self.sweep_dir) / STOPPED_FILE, "a") as f:
            f.write(trial.trial_id + "\n")
        return action


def stopped_trials(sweep_dir: Path) -> set[str]:
    path = Path(sweep_dir) / STOPPED_FILE
    return set(path.read_text().split()) if path.is_file() else set()
