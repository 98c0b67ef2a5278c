"""Training bins/s of the two regimes in one run: end to end (bin patches decoded, cut and run through the
encoder, forward and backward) against cached bin features (``model.bin_input=features``: no image decode, no
CNN in the step); same MagNet above the bin input, same shards, same stream, same optimizer. Target: x20 on a CPU.

Makes one synthetic slide of --size-um at the default geometry (0.5 um/px, 112 px bin patches) under --work and
shards it at 16 um with ``encoder.bin_features=true`` (regnetx_002, the default frozen encoder, which is also
the end-to-end model's bin encoder here), then times ``--steps`` optimizer steps of each regime in this process
(one thread, data in the process: the loader's cost counts), after ``--warmup`` steps.

    python bench/bench_bin_features.py [--work build/bench_bin_features] [--steps 10] [--max-bins 64]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from magnet.cli import main as magnet  # noqa: E402
from magnet.data.pipeline import ShardSet, TrainStream  # noqa: E402
from magnet.dist import WorldInfo  # noqa: E402
from magnet.loss_config import LossConfig  # noqa: E402
from magnet.losses import compute_loss  # noqa: E402
from magnet.models.config import ModelConfig  # noqa: E402
from magnet.models.factory import create_model  # noqa: E402
from magnet.models.init import init_from_statistics, training_statistics  # noqa: E402
from magnet.train_config import DataConfig  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def shards_with_bin_features(work: Path, size_um: float) -> Path:
    shards = work / "shards"
    if not (shards / "16um" / "manifest.json").is_file():
        assert magnet(["synth", "--config", str(REPO / "configs/synth/context.yaml"), "--out", str(work / "cohort"),
                       "--slides", "1", "--overwrite", f"size_um={size_um}"]) == 0
        assert magnet(["shard", "--samplesheet", str(work / "cohort" / "samplesheet.csv"), "--bin-um", "16",
                       "--out", str(shards), "--config", str(REPO / "configs/shard/default.yaml"),
                       "split.val_frac=0", "split.test_frac=0", "encoder.bin_features=true", "ray.num_cpus=1",
                       "ray.progress=false"]) == 0
    return shards


def rate(shards: Path, bin_input: str, steps: int, warmup: int, max_bins: int, encoder: str) -> float:
    """Bins/s of ``steps`` training steps (stream, forward, loss, backward, Adam) with ``model.bin_input``."""
    torch.manual_seed(0)
    mcfg = ModelConfig(name="magnet", bin_input=bin_input, encoder=encoder, width=64, heads=4, gat_layers=1,
                       channels_last=False)
    data = DataConfig(shards=str(shards), bin_um=16, micro_batch=2, max_bins=max_bins, shuffle_buffer=16,
                      shuffle_initial=4, workers=0, epoch_samples=10**6)
    sset = ShardSet(data.shards, 16, None, None, bin_input)
    model = create_model(mcfg, len(sset.genes), sset.manifest.feat_dim, sset.geometry).train()
    init_from_statistics(model, training_statistics(sset, "train"))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    knn = {"k_bin": mcfg.k_bin, "k_spot": mcfg.k_spot, "k_global": mcfg.k_global}
    batches = iter(TrainStream(sset, data, WorldInfo(0, 1, 0), 0, knn))
    bins = 0
    for i in range(warmup + steps):
        if i == warmup:
            t, bins = time.perf_counter(), 0
        batch = next(batches)
        loss, _ = compute_loss(model(batch), batch, LossConfig())
        opt.zero_grad()
        loss.backward()
        opt.step()
        bins += batch.num_bins
    return bins / (time.perf_counter() - t)


def run() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default=str(REPO / "build" / "bench_bin_features"))
    p.add_argument("--size-um", type=float, default=600.0)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--max-bins", type=int, default=64)
    args = p.parse_args()
    torch.set_num_threads(1)
    shards = shards_with_bin_features(Path(args.work), args.size_um)
    encoder = "regnetx_002"
    print(f"cpu threads: 1; MagNet width 64, bin encoder {encoder} at 112 px; micro-batch 2 tiles x <= "
          f"{args.max_bins} bins; {args.steps} steps after {args.warmup}")
    e2e = rate(shards, "image", args.steps, args.warmup, args.max_bins, encoder)
    feat = rate(shards, "features", args.steps, args.warmup, args.max_bins, encoder)
    print(f"end to end (bin_input=image):        {e2e:10,.0f} bins/s")
    print(f"cached features (bin_input=features): {feat:10,.0f} bins/s")
    print(f"ratio features / end to end: x{feat / e2e:.1f}")


if __name__ == "__main__":
    run()
