"""Ray Tune sweep entry point: every trial runs ``magnet.train.loop.train`` (as ``launch/train.py``).

    python launch/sweep.py --config configs/sweep/resolutions.yaml [key=value ...]   # local Ray
    python launch/sweep.py --config FILE --address auto                             # on a Ray cluster
    python launch/sweep.py --config FILE --resume                                   # an interrupted sweep
"""

from __future__ import annotations

import json
import sys


def main(argv: list[str] | None = None) -> int:
    from magnet.sweep.cli import run_cli
    from magnet.sweep.config import SweepConfig
    from magnet.sweep.run import run_sweep

    done = run_cli("launch/sweep.py", __doc__, "sweep", "continue the interrupted sweep of this name (Tuner.restore)",
                   SweepConfig, run_sweep, argv)
    if done == 2:
        return 2
    cfg, summary = done
    if summary.get("already_finished"):
        print(f"sweep {summary['sweep_dir']}: finished already, nothing to resume", file=sys.stderr)
    best = summary["best"]
    print(f"sweep {summary['sweep_dir']}: " + ", ".join(f"{n} {k}" for k, n in summary["counts"].items())
          + (f"; best {best['trial']} {cfg.search.metric}={best['value']:.4g} model version {best['model_version']}"
             if best else "; no finished trial"))
    print(json.dumps({"parent_run_id": summary["parent_run_id"], "best": best}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
