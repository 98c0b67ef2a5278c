"""Ray Tune sweep entry point: every trial runs ``magnet.train.loop.train`` (as ``launch/train.py``).

    python launch/sweep.py --config configs/sweep/resolutions.yaml [key=value ...]   # local Ray
    python launch/sweep.py --config FILE --address auto                             # on a Ray cluster
    python launch/sweep.py --config FILE --resume                                   # an interrupted sweep
"""

from __future__ import annotations

import argparse
import json
import sys


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from magnet.cli import ArgumentParser

    p = ArgumentParser(prog="launch/sweep.py", description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="sweep YAML (configs/sweep/*.yaml)")
    p.add_argument("--address", default=None, help="Ray cluster address ('auto' on a cluster node); default: local Ray")
    p.add_argument("--resume", action="store_true", help="continue the interrupted sweep of this name (Tuner.restore)")
    p.add_argument("overrides", nargs="*", help="key.sub=value")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from magnet.config import load_config
    from magnet.errors import UserError
    from magnet.sweep.config import SweepConfig
    from magnet.sweep.run import run_sweep

    try:
        flags = {"ray": {"address": args.address}} if args.address is not None else {}
        cfg = load_config(SweepConfig, args.config, args.overrides, **flags)
        summary = run_sweep(cfg, args.config, resume=args.resume)
    except UserError as e:
        print(f"magnet: error: {e}", file=sys.stderr)
        return 2
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
