"""Accelerator benchmark: training samples/s, MFU and data-loader stalls under ZeRO-2, and prediction bins/s.

    python bench/bench_gpu.py                       # paper-size model on the first GPU (about 10 min on one H200)
    python bench/bench_gpu.py --smoke               # tiny model, few steps, fp32, on the CPU (the test suite runs it)
    python bench/bench_gpu.py --peak-tflops 989     # a device the peak table does not know

Paper-size model (configs/train/magnet_16um.yaml): MagNet with a ResNet-50 bin encoder on 112 px bin patches
(the shards' default geometry), width 1024, 250 genes, 8 tiles x 256 bins per micro-batch; bf16 autocast under
DeepSpeed ZeRO-2, one process. The data are a
synthetic cohort sharded once under --work (kept for re-runs). For loader workers 1, 2 and 4 it trains
--steps micro-batches after --warmup and reports samples (tiles) and bins per second, the share of step time
spent waiting for the next batch from the loader, and the MFU: model FLOPs per step / step time / peak FLOPs.
FLOPs are counted, not estimated from a formula: torch.utils.flop_counter over forward + backward of real
batches, per bin (batches differ in bins; the bin encoder's FLOPs scale with them). Peak FLOPs come from a
table by device name (dense bf16, no sparsity) or --peak-tflops. Then the model is saved in the folder
``magnet predict`` reads and one held-out slide is predicted through the real command (bins/s is the
command's own rate, without imports and model load). Last, the sharding stage's frozen encoder
(configs/shard/paper.yaml: ResNet-50 at 224 px) on the device: global tiles per second in fp32 and bf16
(``magnet shard`` runs it on a GPU with ``ray.device=auto``). The last line is every figure as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# dense bf16 peak TFLOPS by device name (vendor data sheets; SXM parts where both exist)
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "GH200": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0,
                    "A10G": 70.0, "A10": 125.0, "B200": 2250.0, "MI300X": 1307.0}

# configs/train/magnet_16um.yaml is the paper-size model (ResNet-50, width 1024, 8 tiles x 256 bins per micro-batch)
PAPER = ("configs/train/magnet_16um.yaml", ["train.precision=bf16", "data.shuffle_buffer=64", "data.shuffle_initial=16"])
SMOKE = ("configs/train/tiny.yaml", ["train.precision=fp32", "data.micro_batch=2", "data.max_bins=16"])


def peak_tflops(name: str, override: float | None) -> float | None:
    if override:
        return override
    for key in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):  # "GH200" before "H200"
        if key.lower() in name.lower():
            return PEAK_BF16_TFLOPS[key]
    return None


def make_data(work: Path, smoke: bool) -> tuple[Path, Path]:
    """(slides, shards): a synthetic cohort and its 16 um shards under ``work`` (made once)."""
    shards = work / "shards"
    if (shards / "16um" / "manifest.json").is_file():
        return work / "slides", shards
    magnet = [sys.executable, "-m", "magnet"]
    synth = ["--config", str(REPO / "configs/synth/tiny.yaml")] if smoke else ["--slides", "4", "--size-um", "1500"]
    subprocess.run(magnet + ["synth", "--out", str(work / "slides"), "--seed", "0", *synth], check=True,
                   capture_output=True)
    shard = (["--config", str(REPO / "configs/shard/tiny.yaml")] if smoke else
             ["genes.n_genes=250", "split.val_frac=0.25", "split.test_frac=0", "ray.progress=false",
              f"ray.num_cpus={os.cpu_count()}"])
    subprocess.run(magnet + ["shard", "--samplesheet", str(work / "slides" / "samplesheet.csv"), "--bin-um", "16",
                             "--out", str(shards), *shard], check=True, capture_output=True)
    return work / "slides", shards


def count_flops_per_bin(model, batches, device, bf16: bool) -> float:
    """Forward + backward FLOPs of ``batches`` (torch.utils.flop_counter), divided by their bins."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from magnet.losses import compute_loss

    flops = bins = 0
    for batch, cfg in batches:
        b = batch.to(device)
        with FlopCounterMode(display=False) as counter:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                total, _ = compute_loss(model(b), b, cfg.loss)
            total.backward()
        flops += counter.get_total_flops()
        bins += batch.num_bins
    model.zero_grad(set_to_none=True)
    return flops / bins


def train_runs(cfg, shard_set, engine, workers_list, steps: int, warmup: int, flops_per_bin: float,
               peak: float | None) -> list[dict]:
    import torch

    from magnet import dist
    from magnet.data.pipeline import TrainStream
    from magnet.losses import compute_loss

    device = engine.device
    cuda = device.type == "cuda"
    knn = {"k_bin": cfg.model.k_bin, "k_spot": cfg.model.k_spot, "k_global": cfg.model.k_global}
    rows = []
    for workers in workers_list:
        cfg.data.workers = workers
        stream = TrainStream(shard_set, cfg.data, dist.world_info(), cfg.train.seed, knn)

        def batches():
            epoch = 0
            while True:
                yield from stream.epoch(epoch)
                epoch += 1

        it = batches()
        wait = total = 0.0
        bins = samples = 0
        for i in range(warmup + steps):
            t0 = time.perf_counter()
            batch = next(it)
            t1 = time.perf_counter()
            b = batch.to(device, non_blocking=True)
            loss, _ = compute_loss(engine(b), b, cfg.loss)
            engine.backward(loss)
            engine.step()
            if cuda:
                torch.cuda.synchronize()
            t2 = time.perf_counter()
            if i >= warmup:
                wait += t1 - t0
                total += t2 - t0
                bins += batch.num_bins
                samples += batch.num_samples
        del it
        achieved = flops_per_bin * bins / total
        rows.append({"workers": workers, "samples_per_s": round(samples / total, 2),
                     "bins_per_s": round(bins / total, 1), "step_ms": round(1000 * total / steps, 1),
                     "data_wait_pct": round(100 * wait / total, 1), "tflops": round(achieved / 1e12, 3),
                     "mfu_pct": round(100 * achieved / (peak * 1e12), 2) if peak else None})
    return rows


def predict_rate(work: Path, slides: Path, shards: Path, model_dir: Path, settings: list[str]) -> dict:
    """One held-out slide through ``magnet predict``; its own bins/s."""
    from magnet.format.manifest import Manifest

    splits = Manifest.load(shards / "16um" / "manifest.json").splits
    slide = next(s for s, split in sorted(splits.items()) if split != "train")
    folder = slides / slide
    out = work / "pred.h5ad"
    cmd = [sys.executable, "-m", "magnet", "predict", "--model", str(model_dir), "--spaceranger", str(folder / "outs"),
           "--image", str(folder / f"{slide}_fullres.tif"), "--bin-um", "16", "--out", str(out), "--overwrite",
           "progress=false", *settings]  # --overwrite: the work folder is kept for re-runs
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode:
        sys.exit("magnet predict failed:\n" + proc.stderr[-3000:])
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"slide": slide, "bins": res["bins"], "bins_per_s": res["bins_per_s"], "seconds": res["seconds"],
            "settings": " ".join(settings)}


def feature_rate(shard_config: str, device, n_tiles: int) -> list[dict]:
    """The sharding stage's frozen encoder (``shard_config``'s, random weights) on ``device``: global tiles per
    second, each its spot crops plus the resized global tile, in blocks as ``magnet shard`` reads them, fp32 and
    bf16."""
    import dataclasses

    import numpy as np
    import torch

    from magnet.config import load_config
    from sharding.config import ShardConfig
    from sharding.features import FeatureExtractor
    from sharding.samples import TILES_PER_BATCH

    cfg = load_config(ShardConfig, REPO / shard_config, [])
    geom = cfg.shard.geometry()
    rng = np.random.default_rng(0)
    tiles = [rng.integers(0, 256, (geom.image_px,) * 2 + (3,), dtype=np.uint8) for _ in range(n_tiles)]
    rows = []
    for precision in ("fp32", "bf16"):
        ex = FeatureExtractor(dataclasses.replace(cfg.encoder, precision=precision), geom, 0,
                              torch.get_num_threads(), device.type)
        ex(tiles[:TILES_PER_BATCH])  # warm-up: kernels chosen, memory allocated
        t0 = time.perf_counter()
        for i in range(0, n_tiles, TILES_PER_BATCH):
            ex(tiles[i:i + TILES_PER_BATCH])  # returns numpy: each block waits for the device
        dt = time.perf_counter() - t0
        rows.append({"encoder": cfg.encoder.name, "precision": precision, "tiles_per_s": round(n_tiles / dt, 1),
                     "images_per_s": round(n_tiles * (geom.n_spots + 1) / dt, 1)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny model, few steps, fp32 (CPU smoke test)")
    ap.add_argument("--work", default=str(REPO / "build" / "bench_gpu"), help="data and model folder (kept)")
    ap.add_argument("--shards", default=None, help="existing shard root with 16um/ (with --slides; default: made)")
    ap.add_argument("--slides", default=None, help="the `magnet synth` / Space Ranger slide folders of --shards")
    ap.add_argument("--steps", type=int, default=None, help="timed micro-batches per loader setting (40; smoke 3)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed micro-batches first (10; smoke 1)")
    ap.add_argument("--workers", type=int, nargs="+", default=None, help="loader workers to try (1 2 4; smoke 1)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="device peak (dense bf16) when not in the table")
    ap.add_argument("--predict", action="append", default=None,
                    help="a magnet predict config override for the prediction rate (repeatable; default batch_bins=2048)")
    ap.add_argument("overrides", nargs="*", metavar="key=value", help="training config overrides")
    a = ap.parse_args()
    if (a.shards is None) != (a.slides is None):
        ap.error("--shards and --slides go together")
    steps = a.steps or (3 if a.smoke else 40)
    warmup = a.warmup if a.warmup is not None else (1 if a.smoke else 10)
    a.predict = a.predict or ["batch_bins=2048"]
    workers = a.workers or ([1] if a.smoke else [1, 2, 4])
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / "build" / "torch_extensions"))
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    t_data = time.perf_counter()
    slides, shards = (Path(a.slides), Path(a.shards)) if a.shards else make_data(work, a.smoke)
    t_data = time.perf_counter() - t_data

    import deepspeed
    import torch

    from magnet import dist
    from magnet.config import load_config
    from magnet.data.pipeline import ShardSet, TrainStream
    from magnet.models.factory import create_model
    from magnet.train_config import ExperimentConfig
    from magnet.train.ds_config import deepspeed_config, resolve_precision
    from magnet.train.schedule import make_scheduler

    base = [f"data.shards={shards}", "data.bin_um=16", "mlflow.enabled=false", "train.progress=false",
            f"train.out_dir={work / 'runs'}", "train.deepspeed=zero2"]
    config_file, preset = SMOKE if a.smoke else PAPER
    cfg = load_config(ExperimentConfig, REPO / config_file, base + preset + a.overrides)
    cfg.train.steps = 10**6  # the scheduler's horizon; this loop stops on its own
    cuda = torch.cuda.is_available()
    precision = resolve_precision(cfg.train.precision, cuda)
    dist.init()
    device = dist.device()
    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    peak = peak_tflops(name, a.peak_tflops)
    shard_set = ShardSet.for_training(cfg.data)
    cfg.data.genes, cfg.data.normalisation, cfg.data.folds = shard_set.genes, shard_set.normalisation, shard_set.folds
    torch.manual_seed(cfg.train.seed)
    model = create_model(cfg.model, len(shard_set.genes), shard_set.manifest.feat_dim, shard_set.geometry).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    knn = {"k_bin": cfg.model.k_bin, "k_spot": cfg.model.k_spot, "k_global": cfg.model.k_global}
    cfg.data.workers = 0
    sample_it = TrainStream(shard_set, cfg.data, dist.world_info(), cfg.train.seed, knn).epoch(0)
    flops_per_bin = count_flops_per_bin(model, [(next(sample_it), cfg) for _ in range(3)], device,
                                        precision == "bf16")
    del sample_it
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
        config=deepspeed_config(cfg, cuda), lr_scheduler=lambda opt: make_scheduler(opt, cfg, cfg.train.steps))
    engine.train()
    head = {"device": name, "precision": precision, "zero_stage": 2, "params_m": round(n_params / 1e6, 2),
            "encoder": cfg.model.encoder, "width": cfg.model.width, "genes": len(shard_set.genes),
            "bin_px": shard_set.geometry.bin_px, "micro_batch": cfg.data.micro_batch, "max_bins": cfg.data.max_bins,
            "flops_per_bin": round(flops_per_bin), "peak_tflops": peak, "data_prep_s": round(t_data, 1)}
    print(" ".join(f"{k}={v}" for k, v in head.items()), flush=True)
    rows = train_runs(cfg, shard_set, engine, workers, steps, warmup, flops_per_bin, peak)
    for r in rows:
        print("train " + " ".join(f"{k}={v}" for k, v in r.items()), flush=True)

    from magnet.train.loop import example_sample, full_state_dict
    from magnet.registry.pyfunc import model_input, write_model_files
    from magnet.batch import collate

    model_dir = work / "model"
    sample = example_sample(shard_set, cfg)
    engine.eval()
    with torch.no_grad():
        pred = engine(collate([sample], shard_set.geometry, **knn).to(device))
    output = {k: v.float().cpu().numpy() for k, v in (("bin", pred.bin), ("spot", pred.spot), ("global", pred.glob))
              if v is not None}
    write_model_files(model_dir, full_state_dict(engine), cfg, shard_set, model_input(sample), output)
    del engine, model
    if cuda:
        torch.cuda.empty_cache()
    pred_row = predict_rate(work, slides, shards, model_dir, a.predict)
    print("predict " + " ".join(f"{k}={v}" for k, v in pred_row.items() if k != "seconds"), flush=True)
    feat_rows = feature_rate("configs/shard/tiny.yaml" if a.smoke else "configs/shard/paper.yaml", device,
                             16 if a.smoke else 256)
    for r in feat_rows:
        print("features " + " ".join(f"{k}={v}" for k, v in r.items()), flush=True)
    print(json.dumps({**head, "train": rows, "predict": pred_row, "features": feat_rows}))
    dist.shutdown()


if __name__ == "__main__":
    main()
