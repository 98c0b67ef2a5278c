"""Sharding throughput against the naive layout, at 8 and 16 um, measured in one run.

    .venv/bin/python bench/bench_shard.py [--size-um 2500] [--mpp 0.2738] [--slides 4] [--bin-um 8 16] [--workdir DIR]
                                          [--set KEY=VALUE ...]

One synthetic slide (``magnet synth``, ``--size-um`` square at ``--mpp`` um/px full resolution) is
written, for each bin size in turn (interleaved, so both sides see the same machine load):

- naive: the reference-style writer, one PNG per bin patch (112 px) and per spot (224 px) and
  global (512 px) tile at the slide's own pixel size, the whole image in memory, labels pickled,
  no features; timed from after its imports;
- ``magnet shard`` on that one slide, end to end as a user runs it (interpreter start, imports,
  checks, encoder build, the slide, manifest), default config plus ``--set`` overrides (e.g.
  ``encoder.precision=bf16``), one core (``ray.num_cpus=1``);
- ``magnet shard`` on a cohort of ``--slides`` slides of that size in one call: the fixed costs are
  paid once, so (cohort - first slide) / (slides - 1) is the steady-state cost (and bins) of a slide.

Printed: bins/s and ratios against naive (wall and CPU seconds: this process's children), and
the breakdown of the one-slide run (``magnet shard``'s ``shard: seconds:`` line; interpreter start
and imports are the rest of its wall time). Finally every bin size in one call on the slide, as
``magnet shard --bin-um 8 16`` is run, against the naive writer run once per bin size. The last
line holds the figures as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

from magnet.geometry import Geometry
from sharding.binned_outputs import BinFiles, read_bins, read_mpp
from sharding.samplesheet import read_samplesheet
from sharding.tiles import make_tiles

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "RAY_AUTH_MODE": "disabled"}


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def timed(cmd: list[str]) -> tuple[float, float, str]:
    """(wall s, CPU s, stderr) of a command run to completion in a fresh process."""
    c0, t0 = children_cpu(), time.perf_counter()
    res = subprocess.run(cmd, env=ENV, capture_output=True, text=True, cwd=REPO)
    wall, cpu = time.perf_counter() - t0, children_cpu() - c0
    if res.returncode != 0:
        sys.exit(f"bench_shard: {' '.join(cmd[:4])} failed:\n{res.stderr[-3000:]}")
    return wall, cpu, res.stderr + res.stdout


def synth(out: Path, size_um: float, mpp: float, slides: int) -> tuple[Path, Path]:
    """``slides`` synthetic slides of one size; samplesheets of the first alone and of all (a cohort). Distinct
    slides, not copies of one: magnet shard refuses one slide under two names."""
    subprocess.run([sys.executable, "-m", "magnet", "synth", "--out", str(out), "--slides", str(slides), "--size-um",
                    str(size_um), "--mpp", str(mpp), "--seed", "3"], check=True, env=ENV, stdout=subprocess.DEVNULL)
    cohort = out / "samplesheet.csv"
    header, first = cohort.read_text().splitlines()[:2]
    one = out / "one.csv"
    one.write_text(f"{header}\n{first}\n")
    return one, cohort


def magnet_shard(sheet: Path, bins: list[int], out: Path, overrides: list[str]) -> dict:
    cmd = [sys.executable, "-m", "magnet", "shard", "--samplesheet", str(sheet), "--bin-um", *map(str, bins),
           "--out", str(out), *overrides, "ray.num_cpus=1", "ray.progress=false"]
    wall, cpu, log = timed(cmd)
    seconds = json.loads(log.split("shard: seconds: ", 1)[1].splitlines()[0])
    summaries = [json.loads(line) for line in log.splitlines() if line.startswith('{"bin_um"')]
    return {"wall": wall, "cpu": cpu, "seconds": seconds, "bins": sum(s["bins"] for s in summaries),
            "tiles": sum(s["tiles"] for s in summaries), "bytes": sum(s["bytes"] for s in summaries)}


def naive(sheet: Path, bin_um: int, out: Path) -> dict:
    """In this (fresh) process: one PNG per bin patch, spot tile and global tile at the slide's pixel size."""
    entry = read_samplesheet(sheet)[0]
    t0, c0 = time.perf_counter(), time.process_time()
    files = BinFiles.of(entry.spaceranger, bin_um)
    geom = Geometry(mpp=read_mpp(files.scalefactors, bin_um))  # 112 / 224 / 512 px at the slide's own pixels
    image = tifffile.imread(entry.image, level=0)
    pad = geom.global_px
    image = np.pad(image, ((pad, pad), (pad, pad), (0, 0)), constant_values=255)
    bins = read_bins(files, (image.shape[1] - 2 * pad, image.shape[0] - 2 * pad), np.arange(250))
    tiles = make_tiles(bins.xy, bins.rc, geom, 1, 0)
    n_bytes = n_files = 0

    def save(arr, name):
        nonlocal n_bytes, n_files
        path = out / name
        Image.fromarray(arr).save(path)
        n_bytes += path.stat().st_size
        n_files += 1

    h = geom.bin_px // 2
    for i, (x, y) in enumerate(np.rint(bins.xy).astype(int) + pad):
        save(image[y - h:y + h, x - h:x + h], f"bin_{i}.png")
    for gx, gy in tiles.grid:
        x0, y0 = gx * geom.global_px + pad, gy * geom.global_px + pad
        save(image[y0:y0 + geom.global_px, x0:x0 + geom.global_px], f"global_{gx}_{gy}.png")
        for j, (cx, cy) in enumerate(geom.spot_centres() - geom.margin):
            sx, sy = int(x0 + cx - geom.spot_px / 2), int(y0 + cy - geom.spot_px / 2)
            save(image[sy:sy + geom.spot_px, sx:sx + geom.spot_px], f"spot_{gx}_{gy}_{j}.png")
    with open(out / "labels.pkl", "wb") as fh:
        pickle.dump({"xy": bins.xy, "counts": bins.counts.toarray()}, fh)
    n_bytes += (out / "labels.pkl").stat().st_size
    return {"wall": time.perf_counter() - t0, "cpu": time.process_time() - c0, "bins": len(bins.libsize),
            "tiles": len(tiles.grid), "bytes": n_bytes, "files": n_files + 1}


def run_naive(sheet: Path, bin_um: int, out: Path) -> dict:
    out.mkdir(parents=True)
    _, _, log = timed([sys.executable, __file__, "--_naive", str(sheet), str(bin_um), str(out)])
    subprocess.run(["rm", "-rf", str(out)], check=True)  # tens of thousands of PNGs
    return json.loads(log.strip().splitlines()[-1])


def rate(r: dict, key: str) -> float:
    return r["bins"] / r[key]


def row(label: str, r: dict, ref: dict) -> str:
    return (f"  {label:34s} {r['wall']:7.1f} s {r['cpu']:7.1f} CPU s  {rate(r, 'wall'):8.0f} bins/s "
            f"(x{rate(r, 'wall') / rate(ref, 'wall'):5.1f})  {rate(r, 'cpu'):8.0f} bins/CPU s "
            f"(x{rate(r, 'cpu') / rate(ref, 'cpu'):5.1f})")


def figures(ref: dict, ours: dict[str, dict]) -> dict:
    """bins/s (wall and CPU) of the naive writer and of ours, and ours / naive, for the JSON line."""
    out = {"bins": ref["bins"], "naive": {"wall": ref["wall"], "cpu": ref["cpu"]}}
    for name, r in ours.items():
        out[name] = {"wall": r["wall"], "cpu": r["cpu"], "bins": r["bins"],
                     "ratio_wall": rate(r, "wall") / rate(ref, "wall"), "ratio_cpu": rate(r, "cpu") / rate(ref, "cpu")}
        if "seconds" in r:
            out[name]["seconds"] = r["seconds"]
    return out


def breakdown(one: dict) -> str:
    s = dict(one["seconds"])
    phases = s.pop("slide_phases")
    inside = sum(s.values())
    parts = [f"interpreter+imports {one['wall'] - inside:.1f}"] + [f"{k} {v:.1f}" for k, v in s.items()]
    return ("    run:   " + ", ".join(parts) + "\n    slide: " + ", ".join(f"{k} {v:.1f}" for k, v in phases.items()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size-um", type=float, default=2500.0)
    p.add_argument("--mpp", type=float, default=0.2738)
    p.add_argument("--slides", type=int, default=4, help="slides in the cohort run (>= 2)")
    p.add_argument("--bin-um", type=int, nargs="+", default=[8, 16])
    p.add_argument("--workdir", default=None)
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="magnet shard config overrides")
    p.add_argument("--_naive", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._naive:
        sheet, bin_um, out = args._naive
        print(json.dumps(naive(Path(sheet), int(bin_um), Path(out))))
        return
    if args.slides < 2:
        p.error("--slides must be >= 2 (the steady state is the cohort minus one slide)")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_shard_"))
    one, cohort = synth(work / "slides", args.size_um, args.mpp, args.slides)
    print(f"slide {args.size_um:.0f} um at {args.mpp} um/px, magnet shard default config "
          f"{' '.join(args.set) or '(no overrides)'}, one core; cohort: {args.slides} slides of that size")
    refs, results = {}, {"size_um": args.size_um, "mpp": args.mpp, "slides": args.slides, "overrides": args.set}

    def compare(bin_ums: list[int], ref: dict, tag: str) -> tuple[dict, dict]:
        """One slide end to end and a slide's share of the cohort run, printed against ``ref``."""
        single = magnet_shard(one, bin_ums, work / f"one{tag}", args.set)
        many = magnet_shard(cohort, bin_ums, work / f"cohort{tag}", args.set)
        steady = {k: (many[k] - single[k]) / (args.slides - 1) for k in ("wall", "cpu")}
        steady["bins"] = (many["bins"] - single["bins"]) / (args.slides - 1)  # the other slides' bins
        print(row("naive writer (after imports)", ref, ref))
        print(row("magnet shard, one slide, end to end", single, ref))
        print(row("magnet shard, a slide in a cohort", steady, ref))
        print("  one-slide breakdown (s):\n" + breakdown(single))
        return single, figures(ref, {"one_slide": single, "cohort_slide": steady})

    for b in args.bin_um:
        ref = refs[b] = run_naive(one, b, work / f"naive{b}")
        print(f"{b} um: naive: {ref['bins']} bins, {ref['files']} files ({ref['bytes'] / ref['bins']:.0f} B/bin)")
        single, results[f"{b}um"] = compare([b], ref, str(b))
        print(f"  magnet shard: {single['bins']} bins, {single['tiles']} tiles "
              f"({single['bytes'] / single['bins']:.0f} B/bin)")
    if len(args.bin_um) > 1:  # one call writes every bin size: tile images and features are shared
        naive_all = {k: sum(r[k] for r in refs.values()) for k in ("wall", "cpu", "bins")}
        print(f"{' + '.join(map(str, args.bin_um))} um in one call against the naive writer run once per bin size:")
        _, results["+".join(map(str, args.bin_um)) + "um"] = compare(args.bin_um, naive_all, "_both")
    print(json.dumps(results))

if __name__ == "__main__":
    main()
