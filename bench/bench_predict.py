"""Whole-slide prediction throughput and memory: one slide through `magnet predict`.

    python bench/bench_predict.py --model runs/NAME/model [--size-um 1000] [--bin-um 16]
    python bench/bench_predict.py --model DIR --slide /path/to/synth_000 --bin-um 8 --default-only   (full size)

The slide is `--slide` (a `magnet synth` slide folder: outs/ and {name}_fullres.tif) or a synthetic one of
`--size-um`. The baseline is the settings before issue 15 (`--baseline`, default: batch norms unfolded, the
encoder's memory format as trained, the model's eval_batch chunks per pass, a whole batch per encoder call, the
256 KB glibc mmap threshold); `--default-only` skips it; `--baseline-code DIR --baseline ''` runs another
checkout (the code before a change) at its own defaults instead. Baseline and default (`--settings` adds overrides)
run `--repeats` times each, interleaved (A B A B ...), each a fresh `magnet predict` process; the medians and
their ratios are printed. Rates: bins per CPU second of the process (user + sys from getrusage, imports and
model load included), per CPU second of the prediction itself (magnet predict's `seconds.cpu`), per wall
second of the process and of the prediction (`seconds.total`). On a shared machine the CPU-second rates move
less with other jobs' load. Also the peak RSS of the predict process (polled from /proc by
bench_fullsize.measure), the output's size and RSS after imports. The default settings are also run once with
`--format spatialdata` (`--no-spatialdata` skips it) and its peak RSS is given as a ratio to the .h5ad
run's (target <= 1.2).

Measured 2026-11 (2 CPU cores shared with 3 other engineers' jobs, load 6-13, so rates are lower bounds
and vary by run; tiny 2-step model: configs/train/tiny.yaml on default-geometry 8 um shards, 250 genes;
peak RSS of the predict process polled from /proc; rates are magnet predict's own bins_per_s, which leave out
imports and model load, where this script divides by the wall time):
  1.5 mm slide, 23,630 bins   before (dense outputs, AnnData in RAM):  peak 1648 MB, 129 bins/s
                              streaming .h5ad:                         peak 1596 MB, 110 bins/s
                              + fixed glibc mmap threshold:            peak 1202 MB,  98 bins/s
  6.5 mm slide, 440,123 bins  streaming .h5ad + mmap fix + the batched Space Ranger reader, end to end:
                              1663 s wall (CI running alongside for the first 12 min; features of 545
                              tiles ~9 min), 264.6 bins/s, peak RSS 1535 MB (tree PSS 1531 MB), RSS flat
                              at 1.40-1.51 GB while predicting, .h5ad 685 MB
  (earlier, before the mmap fix and the reader's batching: stopped at 148 of 545 tiles, peak 2390 MB
  reading the matrix, RSS creeping 1.86 -> 2.18 GB while predicting)
Issue 15, before (2026-11, same tiny model on default-geometry 16 um shards, 1 mm slide of 2,692 bins, cProfile
on process time): imports + model load 17 cpu-s, model forward 27 (bin encoder 18), frozen features 6, .h5ad
2.3, tile read + JPEG encode 0.3, JPEG decode 0.2, sample building 0.3; folded + channels-last: x1.15 bins per
CPU-s; torch.compile of the bin encoder: no gain on the CPU (331 vs 369 images/CPU-s) after ~56 s of compiling.
Issue 15, after (2026-11-30, tiny 2-step model: configs/train/tiny.yaml, test_resnet on 112 px patches, 32-bin
chunks, on default-geometry 16 um shards of 3 synthetic 1 mm slides; --threads 1; 2 cores shared, load 3-7).
The profile of the prediction (10.3 cpu-s: bin encoder 6.1, frozen features 1.6, JPEG decode 0.3) led to:
the 256 KB mmap threshold had every activation page-faulted anew (the bin encoder alone, 512 patches, in
patches per CPU-s: 410 at 256 KB whatever the call size, 730 at 16-64 MB in calls of 32-64); a whole batch per
encoder call leaves the cache (480 per CPU-s for 512 per call, 770 for 32); and batch_bins was not the default
because the bin graph crossed chunks (now built within each sample: magnet/batch.py).
  1 mm slide, 2,692 bins, baseline vs default, 2 interleaved runs, medians:
      bins per CPU-s of the process 140 -> 217 (x1.54), of the prediction 226 -> 485 (x2.14), wall bins/s
      x2.25 (prediction x3.28); peak RSS 1189 -> 1327 MB
  same slide, demo model (demo/runs/magnet-16um: resnet10t on 48 px patches, width 256), same way:
      bins per CPU-s of the process 166 -> 217 (x1.31: imports and model load are ~8 of its ~16 cpu-s), of the
      prediction 289 -> 489 (x1.69), wall bins/s x1.74 (prediction x2.27); peak RSS 1189 -> 1229 MB
  3 mm slide, 23,533 bins, only the mmap threshold (0.25 vs 32 MB), one run each:
      bins per CPU-s of the prediction 300 -> 560 (x1.86); peak RSS 1405 -> 1364 MB
  batch_bins, default otherwise, bins per CPU-s of the prediction (one process, 2 interleaved runs): tiny
      model 128 (its eval_batch) 485, 256 506, 512 515, 1024 519; demo model (resnet10t, 48 px patches)
      256 (its eval_batch) 506, 512 526, 1024 531; 512 without the encoder's calls (encoder_px=0) 352 / 489
Issue 24 (2026-12-06, 2 cores shared with training runs; demo-architecture MagNet: resnet10t bin encoder on 48 px
patches, width 256, regnetx_002 frozen features; 2 mm synthetic slide, 10,549 16 um bins; --threads 1, 2
interleaved runs, medians), default settings against the baseline (the settings before issue 15):
  bins per CPU-s of the process 267 -> 401 (x1.50), of the prediction 335 -> 571 (x1.70), wall bins/s x1.68
  (prediction x1.95); peak RSS 1250 -> 1412 MB (the second default run 1310 MB)
.h5ad vs SpatialData store, same slide and model (2-step tiny model on the tiny cohort's 16 um shards, 32 genes,
--default-only --threads 1, load 14-16 on the 2 cores, 2026-11-29):
  1.5 mm slide,  6,059 16 um bins:  peak RSS .h5ad 1216 MB, spatialdata 1267 MB (x1.04)
  4 mm slide,   42,912 16 um bins:  peak RSS .h5ad 1344 MB, spatialdata 1412 MB (x1.05); outputs 65 / 179 MB
                                    (the store holds the 8000 x 8000 px image as a multiscale copy)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import h5py
import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_fullsize import measure  # noqa: E402

BASELINE = "fold_bn=false channels_last=false batch_bins=0 encoder_px=0 mmap_threshold_mb=0.25"


def _output(out: Path) -> tuple[int, float]:
    """Bins written and size in MB of an .h5ad or SpatialData store."""
    if out.suffix == ".zarr":
        bins = json.loads(next(out.glob("tables/magnet_square_*/X/zarr.json")).read_text())["shape"][0]
    else:
        with h5py.File(out) as f:
            bins = f["X"].shape[0]
    return bins, sum(p.stat().st_size for p in ([out] if out.is_file() else out.rglob("*"))) / 2**20


def _run(name: str, cmd: list[str], out: Path, env: dict) -> dict:
    """One magnet predict process: wall and CPU seconds (user + sys of the process, from getrusage), its own
    log's prediction seconds (wall and CPU, without imports and model load), peak RSS, output."""
    cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    row = measure(name, cmd + ["--out", str(out)], env)
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    own = json.loads(row.pop("log")[-1])["seconds"]
    row.update(cpu_s=cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime, own_s=own["total"],
               own_cpu_s=own["cpu"])
    row["bins"], row["mb"] = _output(out)
    shutil.rmtree(out) if out.is_dir() else out.unlink()
    (out.parent / f"{out.stem}.config.yaml").unlink()  # written beside it; the next run would refuse to replace it
    return row


RATES = {"bins/cpu-s": "cpu_s", "own bins/cpu-s": "own_cpu_s", "bins/s": "seconds", "own bins/s": "own_s"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True, help="model folder or URI (as magnet predict --model)")
    ap.add_argument("--tracking-uri", default=None)
    ap.add_argument("--slide", default=None, help="existing slide folder (outs/, {name}_fullres.tif)")
    ap.add_argument("--size-um", type=float, default=1000.0, help="side of the synthetic slide without --slide")
    ap.add_argument("--bin-um", type=int, default=16)
    ap.add_argument("--default-only", action="store_true", help="skip the baseline run")
    ap.add_argument("--baseline", default=BASELINE,
                    help="predict config overrides of the baseline run (the settings before issue 15)")
    ap.add_argument("--settings", default="", help="predict config overrides of the run compared with it")
    ap.add_argument("--baseline-code", default=None,
                    help="a checkout whose magnet the baseline runs import (PYTHONPATH), e.g. the code before a "
                         "change; with --baseline '' it runs at that code's defaults")
    ap.add_argument("--repeats", type=int, default=2, help="baseline and default runs, interleaved (A B A B ...)")
    ap.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of the predict process")
    ap.add_argument("--no-spatialdata", action="store_true", help="skip the --format spatialdata run")
    a = ap.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "PYTHONUNBUFFERED": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        if a.slide:
            slide = Path(a.slide).resolve()  # the runs start in the repository
        else:
            cfg = Path(tmp) / "synth.yaml"
            cfg.write_text(yaml.safe_dump({"slides": 1, "size_um": a.size_um, "mpp": 0.5, "seed": 1,
                                           "expression": {"n_genes": 300}}))
            subprocess.run([sys.executable, "-m", "magnet", "synth", "--config", str(cfg), "--out", f"{tmp}/c"],
                           check=True, capture_output=True)
            slide = Path(tmp) / "c" / "synth_000"
        model = str(Path(a.model).resolve()) if Path(a.model).is_dir() else a.model
        base = [sys.executable, "-m", "magnet", "predict", "--model", model, "--spaceranger", str(slide / "outs"),
                "--image", str(slide / f"{slide.name}_fullres.tif"), "--bin-um", str(a.bin_um), "progress=false"]
        if a.tracking_uri:
            base += ["--tracking-uri", a.tracking_uri]
        idle = subprocess.run([sys.executable, "-c", "import resource, torch, mlflow, anndata, magnet.predict.slide;"
                               "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)"],
                              capture_output=True, text=True, check=True)
        print(f"slide {slide}, {a.bin_um} um bins; RSS after imports {float(idle.stdout):.0f} MB", flush=True)
        after = ("default" + (f" {a.settings}" if a.settings else ""), base + a.settings.split(), env)
        before = (f"baseline {a.baseline}".rstrip(), base + a.baseline.split(), env)
        if a.baseline_code:  # -P: the runs start in this repository, whose magnet would come first on sys.path
            before = (f"baseline code {a.baseline}".rstrip(), [sys.executable, "-P", *base[1:], *a.baseline.split()],
                      {**env, "PYTHONPATH": str(Path(a.baseline_code).resolve())})
        variants = [after] if a.default_only else [before, after]
        runs: dict[str, list[dict]] = {name: [] for name, _, _ in variants}
        for r in range(a.repeats):
            for name, cmd, run_env in variants:
                row = _run(name, cmd, Path(tmp) / "out.h5ad", run_env)
                runs[name].append(row)
                print(f"  run {r}: {name:40s} bins {row['bins']:7d} "
                      + " ".join(f"{k} {row['bins'] / row[v]:7.1f}" for k, v in RATES.items())
                      + f" peak RSS {row['peak_rss_mb']:5.0f} MB", flush=True)
        med = {name: {k: float(np.median([x["bins"] / x[v] for x in rows])) for k, v in RATES.items()}
               for name, rows in runs.items()}
        ref = med[variants[0][0]]
        print(f"medians of {a.repeats} interleaved runs, ratios to the first:")
        for name, rows in runs.items():
            print(f"{name:48s} " + " ".join(f"{k} {med[name][k]:7.1f} (x{med[name][k] / ref[k]:.2f})" for k in RATES)
                  + f" peak RSS {max(x['peak_rss_mb'] for x in rows):5.0f} MB output {rows[-1]['mb']:6.0f} MB")
        if not a.no_spatialdata:  # the same prediction as a SpatialData store
            sdata = _run("default, spatialdata", after[1] + ["--format", "spatialdata"],
                         Path(tmp) / "out.zarr", env)
            h5ad = max(x["peak_rss_mb"] for x in runs[after[0]])
            print(f"peak RSS spatialdata / h5ad: {sdata['peak_rss_mb']:.0f} / {h5ad:.0f} MB = "
                  f"x{sdata['peak_rss_mb'] / h5ad:.2f} (target <= 1.2); store {sdata['mb']:.0f} MB")


if __name__ == "__main__":
    main()
