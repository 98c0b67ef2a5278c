"""Replicates as one command: models x seeds trained as a Ray Tune grid, then scored once on the test slides.

    python launch/experiment.py --config configs/experiment/context.yaml [key=value ...]
    python launch/experiment.py --config FILE --resume      # an interrupted experiment (training or evaluation)

The table (per gene group, over replicates, paired statistics, context controls) and the scatter plots
land in OUT_DIR/NAME/evaluation/ and on the MLflow parent run of the trials (magnet/sweep/replicates.py).
"""

from __future__ import annotations

import json
import sys


def main(argv: list[str] | None = None) -> int:
    from magnet.sweep.cli import run_cli
    from magnet.sweep.replicates import ReplicatesConfig, run_experiment

    done = run_cli("launch/experiment.py", __doc__, "experiment",
                   "continue the interrupted experiment of this name", ReplicatesConfig, run_experiment, argv)
    if done == 2:
        return 2
    _, summary = done
    print(json.dumps({"parent_run_id": summary["parent_run_id"], "evaluation": summary["evaluation"],
                      "models": summary["models"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
