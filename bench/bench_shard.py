"""Sharding throughput, bytes and memory against the naive layout, on synthetic slides.

    .venv/bin/python bench/bench_shard.py [--size-um 1000] [--bin-um 8] [--workdir DIR]

One synthetic slide (``magnet synth``, 0.5 um/px) is sharded with the default config (8 um
bins, 512/224/112 px, regnetx_002 frozen features, JPEG q90) by the slide task of ``magnet shard``
in a fresh process, one thread; the same slide is then written the naive way (one PNG per bin
patch, per 224 px spot tile and per 512 px tile, whole image in memory, as the reference
preprocessing does). Then the slide task runs on a slide with a 4x larger image (2x the side).
Printed: bins/s, tiles/s, bytes per bin, peak RSS of each, and ratios measured in this run; and
the end-to-end ``magnet shard`` wall time (local Ray) for the first slide.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "RAY_AUTH_MODE": "disabled"}


def synth(out: Path, size_um: float) -> Path:
    subprocess.run([sys.executable, "-m", "magnet", "synth", "--out", str(out), "--slides", "1",
                    "--size-um", str(size_um), "--mpp", "0.5", "--seed", "3"], check=True, env=ENV,
                   stdout=subprocess.DEVNULL)
    return out / "samplesheet.csv"


def task(sheet: Path, bin_um: int, out: Path) -> dict:
    """In this (fresh) process: the slide task of magnet shard, timed, with its peak RSS."""
    from magnet.config import load_config
    from sharding.config import ShardConfig
    from sharding.genes import select_genes
    from sharding.reader import BinFiles, read_genes
    from sharding.samplesheet import read_samplesheet
    from sharding.slide import inspect_slide, shard_slide

    cfg = load_config(ShardConfig, REPO / "configs/shard/default.yaml", ["ray.progress=false"])
    entry = read_samplesheet(sheet)[0]
    ids, names = read_genes(BinFiles.of(entry.spaceranger, 16).matrix)
    found = inspect_slide(entry, sorted({bin_um, 16}), len(ids), cfg, 16)
    genes = select_genes(ids, names, found["stats"], cfg.genes)
    (out / ".work").mkdir(parents=True)
    import timm  # noqa: F401  a Ray worker imports torch and timm once, not per slide: not timed

    t0 = time.perf_counter()
    rec = shard_slide(entry, "train", [bin_um], {bin_um: str(out / ".work")}, genes, cfg, False)[bin_um]
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "tiles": rec["tiles"], "bins": rec["bins"],
            "bytes": sum(p["bytes"] for p in rec["parts"]), "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def naive(sheet: Path, bin_um: int, out: Path) -> dict:
    """One PNG per bin patch, per spot tile, per global tile; the whole image loaded, as in the reference."""
    import tifffile
    from PIL import Image

    from magnet.geometry import Geometry
    from sharding.reader import BinFiles, read_bins, read_mpp
    from sharding.samplesheet import read_samplesheet
    from sharding.tiles import make_tiles

    geom = Geometry()
    entry = read_samplesheet(sheet)[0]
    t0 = time.perf_counter()
    image = tifffile.imread(entry.image, level=0)
    pad = geom.global_px
    image = np.pad(image, ((pad, pad), (pad, pad), (0, 0)), constant_values=255)
    files = BinFiles.of(entry.spaceranger, bin_um)
    scale = read_mpp(files.scalefactors, bin_um) / geom.mpp
    assert abs(scale - 1) < 1e-9, "the naive path reads the image at the model pixel size"
    bins = read_bins(files, (image.shape[1] - 2 * pad, image.shape[0] - 2 * pad), np.arange(1))
    tiles = make_tiles(bins.xy * scale, bins.rc, geom, 1, 0)
    n_bytes = n_files = 0

    def save(arr, name):
        nonlocal n_bytes, n_files
        path = out / name
        Image.fromarray(arr).save(path)
        n_bytes += path.stat().st_size
        n_files += 1

    h = geom.bin_px // 2
    for i, (x, y) in enumerate(np.rint(bins.xy * scale).astype(int) + pad):
        save(image[y - h:y + h, x - h:x + h], f"bin_{i}.png")
    for gx, gy in tiles.grid:
        x0, y0 = gx * geom.global_px + pad, gy * geom.global_px + pad
        save(image[y0:y0 + geom.global_px, x0:x0 + geom.global_px], f"global_{gx}_{gy}.png")
        for j, (cx, cy) in enumerate(geom.spot_centres() - geom.margin):
            sx, sy = int(x0 + cx - geom.spot_px / 2), int(y0 + cy - geom.spot_px / 2)
            save(image[sy:sy + geom.spot_px, sx:sx + geom.spot_px], f"spot_{gx}_{gy}_{j}.png")
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "tiles": len(tiles.grid), "bins": len(bins.libsize), "bytes": n_bytes,
            "files": n_files, "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def in_fresh_process(kind: str, sheet: Path, bin_um: int, out: Path) -> dict:
    cmd = [sys.executable, __file__, "--_run", kind, str(sheet), str(bin_um), str(out)]
    res = subprocess.run(cmd, check=True, env=ENV, capture_output=True, text=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def rates(r: dict) -> str:
    return (f"{r['bins'] / r['seconds']:8.1f} bins/s {r['tiles'] / r['seconds']:6.2f} tiles/s "
            f"{r['bytes'] / r['bins']:9.0f} B/bin  peak RSS {r['rss_mb']:6.0f} MB  "
            f"({r['bins']} bins, {r['tiles']} tiles, {r['seconds']:.1f} s)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size-um", type=float, default=1000.0)
    p.add_argument("--bin-um", type=int, default=8)
    p.add_argument("--workdir", default=None)
    p.add_argument("--_run", nargs=4, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._run:
        kind, sheet, bin_um, out = args._run
        print(json.dumps((task if kind == "task" else naive)(Path(sheet), int(bin_um), Path(out))))
        return
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_shard_"))
    small, large = synth(work / "slide1x", args.size_um), synth(work / "slide4x", 2 * args.size_um)
    ours = in_fresh_process("task", small, args.bin_um, work / "ours1x")
    (work / "naive").mkdir()
    ref = in_fresh_process("naive", small, args.bin_um, work / "naive")
    big = in_fresh_process("task", large, args.bin_um, work / "ours4x")
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "magnet", "shard", "--samplesheet", str(small), "--bin-um", str(args.bin_um),
                    "--out", str(work / "cli"), "ray.num_cpus=1", "ray.progress=false"], check=True, env=ENV,
                   capture_output=True)
    cli_s = time.perf_counter() - t0
    print(f"slide {args.size_um:.0f} um at 0.5 um/px, {args.bin_um} um bins, default config, 1 thread")
    print(f"shards (magnet shard slide task): {rates(ours)}")
    print(f"naive (PNG per bin/spot/tile)   : {rates(ref)}  [{ref['files']} files]")
    print(f"ratio shards / naive            : bins/s x{(ours['bins'] / ours['seconds']) / (ref['bins'] / ref['seconds']):.2f}, "
          f"bytes x{ours['bytes'] / ref['bytes']:.3f}")
    print(f"4x larger image (slide task)    : {rates(big)}")
    print(f"peak RSS 4x / 1x                : x{big['rss_mb'] / ours['rss_mb']:.2f}")
    print(f"end to end magnet shard (local Ray, 1 CPU, incl. start): {cli_s:.1f} s "
          f"({ours['bins'] / cli_s:.1f} bins/s)")


if __name__ == "__main__":
    main()
