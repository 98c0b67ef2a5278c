"""Training throughput in bins/s on the CPU with 1 and 2 processes (DeepSpeed ZeRO-2, gloo).

Runs `magnet train --nproc N` on the 16 um shards of bench/bench_loader.py (made under --work if
absent) with the tiny model of configs/train/tiny.yaml at the shards' real geometry (112 px bin
patches), and reads the steady-state bins/s (all ranks together) from the run's metrics.jsonl,
skipping the first steps. The 1-process run is the baseline of the ratio.

    python bench/bench_train.py [--work build/bench] [--steps 16] [--max-bins 64]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from bench_loader import cohort  # noqa: E402


def train_rate(shards: Path, out: Path, nproc: int, steps: int, max_bins: int) -> tuple[float, float]:
    """(median bins/s over steps after the first 3, wall seconds of the whole command)."""
    name = f"p{nproc}"
    cmd = [sys.executable, "-m", "magnet", "train", "--nproc", str(nproc), "--config", str(REPO / "configs/train/tiny.yaml"),
           f"data.shards={shards}", f"train.out_dir={out}", f"train.run_name={name}", f"train.steps={steps}",
           "train.ckpt_every=0", f"data.max_bins={max_bins}", "data.micro_batch=2", "data.workers=1", "mlflow.enabled=false"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_EXTENSIONS_DIR": str(REPO / "build" / "torch_extensions")}
    t = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    wall = time.perf_counter() - t
    rows = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
    rates = [r["bins_per_s"] for r in rows if r["kind"] == "train" and r["step"] > 3]
    return statistics.median(rates), wall


def run() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default=str(REPO / "build" / "bench"))
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--max-bins", type=int, default=64)
    args = p.parse_args()
    work = Path(args.work)
    shards = cohort(work)
    out = work / "train_runs"
    if out.exists():
        shutil.rmtree(out)
    print(f"cpu cores: {os.cpu_count()}; tiny MagNet (test_resnet, width 32), 112 px patches, "
          f"micro-batch 2 tiles x <= {args.max_bins} bins, ZeRO-2 fp32, {args.steps} steps")
    base = None
    for nproc in (1, 2):
        rate, wall = train_rate(shards, out, nproc, args.steps, args.max_bins)
        base = base or rate
        print(f"{nproc} process(es): {rate:8,.0f} bins/s (x{rate / base:.2f} of 1 process); command wall {wall:.0f} s")


if __name__ == "__main__":
    run()
