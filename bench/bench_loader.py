"""Training loader throughput in bins/s per worker at 8 and 16 um (target: >= 5,000 at 16 um).

Makes a synthetic cohort at the default geometry (0.5 um/px, 512 px global tiles, 112 px bin
patches) once under --work, shards it with `magnet shard`, then times the real training stream
(shard list ... decode, subsample, augment, collate) in one process (= one worker) and with
--workers DataLoader workers. Baseline in the same run: tar reading and decoding alone, so the
ratio shows what subsampling, augmentation and collate cost on top.

    python bench/bench_loader.py [--work build/bench] [--batches 30] [--workers 2]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

from magnet.cli import main as magnet  # noqa: E402
from magnet.data.pipeline import ShardSet, TrainStream  # noqa: E402
from magnet.dist import WorldInfo  # noqa: E402
from magnet.train_config import DataConfig  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
KNN = {"k_bin": 8, "k_spot": 8, "k_global": 8}


def cohort(work: Path) -> Path:
    shards = work / "shards"
    if not (shards / "16um" / "manifest.json").is_file():
        assert magnet(["synth", "--config", str(REPO / "configs/synth/context.yaml"), "--out", str(work / "cohort"),
                       "--slides", "3", "--overwrite"]) == 0
        assert magnet(["shard", "--samplesheet", str(work / "cohort" / "samplesheet.csv"), "--bin-um", "8", "16",
                       "--out", str(shards), "--config", str(REPO / "configs/shard/default.yaml"),
                       "split.val_frac=0", "split.test_frac=0"]) == 0
    return shards


def decode_only(shards: Path, bin_um: int, n_samples: int) -> float:
    """Bins/s of reading and decoding samples through the checked reader, nothing else (the baseline)."""
    sset = ShardSet(str(shards), bin_um, None, None)
    it = sset.reader("fail").read([u for u, _ in sset.shards("train")] * 100)
    t, bins = time.perf_counter(), 0
    for _ in range(n_samples):
        bins += len(next(it)["bin_xy"])
    return bins / (time.perf_counter() - t)


def stream_rate(shards: Path, bin_um: int, workers: int, batches: int) -> tuple[float, float]:
    """(bins/s of the full training stream, mean bins per tile delivered)."""
    cfg = DataConfig(shards=str(shards), bin_um=bin_um, micro_batch=8, max_bins=256, shuffle_buffer=64,
                     shuffle_initial=16, workers=workers, prefetch=4, epoch_samples=10**6)
    stream = TrainStream(ShardSet(cfg.shards, bin_um, None, None), cfg, WorldInfo(0, 1, 0), 0, KNN)
    it = iter(stream.epoch(0))
    for _ in range(max(2, workers)):  # warm-up: worker start, shuffle buffer fill
        next(it)
    t, bins, tiles = time.perf_counter(), 0, 0
    for _ in range(batches):
        b = next(it)
        bins += b.num_bins
        tiles += b.num_samples
    return bins / (time.perf_counter() - t), bins / tiles


def run() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default=str(REPO / "build" / "bench"))
    p.add_argument("--batches", type=int, default=30)
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args()
    shards = cohort(Path(args.work))
    print(f"cpu cores: {os.cpu_count()}; micro-batch 8 tiles, max 256 bins per tile, augmentation on")
    for bin_um in (16, 8):
        base = decode_only(shards, bin_um, 8 * args.batches)
        one, per_tile = stream_rate(shards, bin_um, 0, args.batches)
        many, _ = stream_rate(shards, bin_um, args.workers, args.batches)
        print(f"{bin_um:>2} um: decode-only baseline {base:9,.0f} bins/s | full stream, 1 worker {one:9,.0f} bins/s "
              f"(x{one / base:.2f} of baseline; {per_tile:.0f} bins per tile) | {args.workers} workers "
              f"{many:9,.0f} bins/s = {many / args.workers:,.0f} per worker (x{many / one:.2f} of 1 worker)")


if __name__ == "__main__":
    run()
