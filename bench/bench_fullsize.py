"""A full-size Visium HD capture area end to end with bounded memory: time and peak memory of each step.

    python bench/bench_fullsize.py [--size-mm 6.5] [--work DIR] [--model DIR] [--no-2um] [--no-predict] [--cpus N]
                                   [--steps synth shard shard2um predict predict2um]

Steps, each in its own process tree: `magnet synth` (one slide of SIZE x SIZE mm), `magnet shard` at
8 and 16 um (configs/shard/default.yaml), at 2 um (configs/shard/bin2um.yaml), a 2-step training run
on the 8 um shards when no --model is given (configs/train/tiny.yaml, to have a model to predict
with; not a target), `magnet predict` of the slide at 8 um and (``predict2um``, after a 2-step poisson run on the
2 um shards) at 2 um with its cells (``--cells spaceranger``). For each step: wall seconds, the peak
RSS of its largest process and the peak of the tree's summed PSS (driver, Ray workers and raylet
together, shared pages counted once), polled every 0.2 s. The target is < 4 GB per step. ``--steps``
runs only some steps on the slide (and shards) already in ``--work``; a shard step whose output is
complete is skipped by ``magnet shard`` itself, so delete ``WORK/shards/2um`` to measure 2 um again.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TARGET_MB = 4096
STEPS = ["synth", "shard", "shard2um", "predict", "predict2um"]  # predict*: also a 2-step training run


def _tree(root: int) -> list[int]:
    """``root`` and its descendants now."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children.get(pid, [])
    return out


def _memory_mb(pid: int) -> tuple[float, float]:
    """(RSS, PSS) of one process in MB, from /proc/PID/smaps_rollup."""
    rss = pss = 0.0
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Rss:"):
                rss = int(line.split()[1]) / 1024
            elif line.startswith("Pss:"):
                pss = int(line.split()[1]) / 1024
    except (OSError, ValueError):
        pass
    return rss, pss


def measure(name: str, cmd: list[str], env: dict) -> dict:
    """Run ``cmd`` (a new session, so its whole tree is watched); peak memory and wall time."""
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    peak_rss = peak_pss = 0.0
    log = []
    os.set_blocking(proc.stdout.fileno(), False)
    while proc.poll() is None:
        mem = [_memory_mb(p) for p in _tree(proc.pid)]
        peak_rss = max(peak_rss, max((r for r, _ in mem), default=0.0))
        peak_pss = max(peak_pss, sum(p for _, p in mem))
        log += proc.stdout.readlines()
        time.sleep(0.2)
    log += proc.stdout.readlines()
    seconds = time.monotonic() - t0
    if proc.returncode:
        sys.exit(f"{name} failed ({proc.returncode}):\n" + "".join(log[-40:]))
    row = {"step": name, "seconds": seconds, "peak_rss_mb": peak_rss, "peak_tree_pss_mb": peak_pss, "log": log}
    flag = "" if max(peak_rss, peak_pss) < TARGET_MB else f"  OVER {TARGET_MB} MB"
    print(f"{name:28s} {seconds:8.1f} s   peak RSS {peak_rss:7.0f} MB   tree PSS {peak_pss:7.0f} MB{flag}", flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mm", type=float, default=6.5, help="side of the capture area (Visium HD: 6.5)")
    ap.add_argument("--work", default=None, help="folder for the slide, shards and outputs (default: a temporary one)")
    ap.add_argument("--model", default=None, help="model to predict with (default: a 2-step tiny run on the 8 um shards)")
    ap.add_argument("--no-2um", action="store_true", help="skip the 2 um shards")
    ap.add_argument("--no-predict", action="store_true", help="stop after sharding (prediction is the slowest step)")
    ap.add_argument("--cpus", type=int, default=2, help="Ray CPUs and torch threads")
    ap.add_argument("--steps", nargs="+", choices=STEPS, default=STEPS, help="steps to run (default: all)")
    a = ap.parse_args()
    steps = set(a.steps) - ({"shard2um"} if a.no_2um else set()) - ({"predict"} if a.no_predict else set())
    env = {**os.environ, "OMP_NUM_THREADS": str(a.cpus), "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    magnet = [sys.executable, "-m", "magnet"]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(a.work or tmp)
        slides, shards = work / "slides", work / "shards"
        size_um = a.size_mm * 1000
        print(f"capture area {a.size_mm} x {a.size_mm} mm ({(size_um / 8) ** 2:,.0f} 8 um bins, "
              f"{(size_um / 2) ** 2:,.0f} 2 um bins in the square), "
              f"{a.cpus} CPUs, target < {TARGET_MB} MB per step", flush=True)
        rows = []
        if "synth" in steps:
            rows.append(measure("synth", [*magnet, "synth", "--out", str(slides), "--slides", "1", "--size-um",
                                          str(size_um), "--seed", "0", "--overwrite"], env))
        shard = [*magnet, "shard", "--samplesheet", str(slides / "samplesheet.csv"), "--out", str(shards),
                 f"ray.num_cpus={a.cpus}", "ray.progress=false"]
        if "shard" in steps:
            rows.append(measure("shard 8+16 um", [*shard, "--bin-um", "8", "16", "--config",
                                                  str(REPO / "configs/shard/default.yaml")], env))
        if "shard2um" in steps:
            rows.append(measure("shard 2 um (bin2um.yaml)", [*shard, "--bin-um", "2", "--config",
                                                             str(REPO / "configs/shard/bin2um.yaml")], env))
        model = a.model
        if model is None and "predict" in steps:
            rows.append(measure("train 2 steps (model only)", [
                sys.executable, str(REPO / "launch/train.py"), "--config", str(REPO / "configs/train/tiny.yaml"),
                f"data.shards={shards}", "data.bin_um=8", f"train.out_dir={work / 'runs'}", "train.run_name=bench",
                "train.steps=2", "train.deepspeed=zero1", "data.workers=0", "data.epoch_samples=8"], env))
            model = str(work / "runs" / "bench" / "model")
        slide = slides / "synth_000"
        if "predict" in steps:
            rows.append(measure("predict 8 um", [*magnet, "predict", "--model", model, "--spaceranger", str(slide / "outs"),
                                                 "--image", str(slide / "synth_000_fullres.tif"), "--bin-um", "8",
                                                 "--out", str(work / "pred_8um.h5ad"), "--overwrite",
                                                 "progress=false"], env))
        if "predict2um" in steps:
            rows.append(measure("train 2 steps at 2 um (model only)", [
                sys.executable, str(REPO / "launch/train.py"), "--config", str(REPO / "configs/train/tiny.yaml"),
                f"data.shards={shards}", "data.bin_um=2", f"train.out_dir={work / 'runs'}", "train.run_name=bench2",
                "train.steps=2", "train.deepspeed=zero1", "data.workers=0", "data.epoch_samples=8",
                "loss.bin=poisson"], env))
            rows.append(measure("predict 2 um + cells", [
                *magnet, "predict", "--model", str(work / "runs" / "bench2" / "model"), "--spaceranger",
                str(slide / "outs"), "--image", str(slide / "synth_000_fullres.tif"), "--bin-um", "2",
                "--out", str(work / "pred_2um.h5ad"), "--cells", "spaceranger", "--overwrite", "progress=false"], env))
        over = [r["step"] for r in rows if max(r["peak_rss_mb"], r["peak_tree_pss_mb"]) >= TARGET_MB]
        print("all steps under the target" if not over else f"over the target: {', '.join(over)}")


if __name__ == "__main__":
    main()
