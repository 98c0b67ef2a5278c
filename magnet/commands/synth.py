"""``magnet synth``: write a cohort of synthetic Visium HD slides in the Space Ranger layout."""

from __future__ import annotations

import argparse

from magnet.config import load_config
from magnet.io import check_not_input


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "synth", help="generate synthetic Visium HD slides (Space Ranger layout) and a samplesheet",
        description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, help="output folder (must be absent or empty unless --overwrite)")
    p.add_argument("--config", default=None, help="YAML file with SynthConfig keys (e.g. configs/synth/context.yaml)")
    p.add_argument("--slides", type=int, default=None, help="number of slides")
    p.add_argument("--size-um", type=float, default=None, help="side of each square slide in microns")
    p.add_argument("--mpp", type=float, default=None, help="full-resolution microns per pixel")
    p.add_argument("--seed", type=int, default=None, help="cohort seed")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. expression.n_genes=400")
    p.set_defaults(run=run)


def run(args) -> int:
    from magnet.synth import SynthConfig, generate_cohort  # start-up time: scipy, about a second

    check_not_input(args.out, "--out", [("--config", args.config)])  # --overwrite replaces the folder whole
    flags = {k: v for k, v in (("slides", args.slides), ("size_um", args.size_um), ("mpp", args.mpp),
                               ("seed", args.seed)) if v is not None}
    cfg = load_config(SynthConfig, args.config, args.overrides, **flags)
    sheet = generate_cohort(cfg, args.out, overwrite=args.overwrite, log=print)
    print(f"wrote {cfg.slides} slides; samplesheet: {sheet}")
    return 0
