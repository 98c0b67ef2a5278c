"""Benchmark of ``magnet synth``: one slide (default 2 mm x 2 mm at 0.5 um/px) on one core.

Prints seconds per stage, total, peak RSS and bin counts. The target of issue 2 is at most 60 s
for the default slide (4000 x 4000 px, about 1 million 2 um bins).

    OMP_NUM_THREADS=1 python bench/bench_synth.py [--size-um 2000] [--mpp 0.5]
"""

from __future__ import annotations

import argparse
import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import resource  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from magnet.synth import SynthConfig  # noqa: E402
from magnet.synth.cohort import generate_slide  # noqa: E402
from magnet.synth.expression import make_programs  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-um", type=float, default=2000.0)
    ap.add_argument("--mpp", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    cfg = SynthConfig(slides=1, size_um=args.size_um, mpp=args.mpp, seed=args.seed)
    t0 = time.perf_counter()
    programs = make_programs(cfg.expression, np.random.default_rng([cfg.seed, 0]))
    with tempfile.TemporaryDirectory() as tmp:
        info = generate_slide(cfg, programs, 0, Path(tmp) / "slide")
        total = time.perf_counter() - t0
        disk = sum(p.stat().st_size for p in Path(tmp).rglob("*") if p.is_file())
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"slide {args.size_um:.0f} um at {args.mpp} um/px: {info['image_px']} x {info['image_px']} px, "
          f"{info['cells']} cells, {info['umis']} UMIs")
    for b, n in info["bins"].items():
        print(f"  {b:2d} um bins: {n:9d} ({info['in_tissue'][b]} in tissue)")
    for stage, sec in info["times"].items():
        print(f"  stage {stage:13s} {sec:7.2f} s")
    print(f"total {total:.2f} s (target <= 60 s: {total / 60:.2f} of it); peak RSS {peak_mb:.0f} MB; "
          f"{disk / 1e6:.0f} MB written")


if __name__ == "__main__":
    main()
