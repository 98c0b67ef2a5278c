"""Whole-slide prediction throughput and memory: one synthetic slide through `magnet predict`.

    python bench/bench_predict.py --model runs/NAME/model [--size-um 1000] [--bin-um 16]

Prints bins/s and peak RSS of the predict process for the default batch size and, as the baseline
measured in the same run, batch_size=1 (one tile per forward pass); and RSS after imports alone.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True, help="model folder or URI (as magnet predict --model)")
    ap.add_argument("--tracking-uri", default=None)
    ap.add_argument("--size-um", type=float, default=1000.0)
    ap.add_argument("--bin-um", type=int, default=16)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "synth.yaml"
        cfg.write_text(yaml.safe_dump({"slides": 1, "size_um": a.size_um, "mpp": 0.5, "seed": 1,
                                       "expression": {"n_genes": 300}}))
        subprocess.run([sys.executable, "-m", "magnet", "synth", "--config", str(cfg), "--out", f"{tmp}/c"], check=True,
                       capture_output=True)
        slide = Path(tmp) / "c" / "synth_000"
        base = [sys.executable, "-m", "magnet", "predict", "--model", a.model, "--spaceranger", str(slide / "outs"),
                "--image", str(slide / "synth_000_fullres.tif"), "--bin-um", str(a.bin_um)]
        if a.tracking_uri:
            base += ["--tracking-uri", a.tracking_uri]
        idle = subprocess.run([sys.executable, "-c", "import resource, torch, mlflow, anndata, magnet.predict.slide;"
                               "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)"],
                              capture_output=True, text=True, check=True)
        rows = {}
        for name, extra in (("batch_size=1 (baseline)", ["batch_size=1"]), ("default batch", [])):
            out = subprocess.run(base + ["--out", f"{tmp}/{len(rows)}.h5ad", "progress=false", *extra],
                                 capture_output=True, text=True)
            if out.returncode:
                sys.exit(out.stderr[-2000:])
            rows[name] = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"slide {a.size_um:.0f} um square, {a.bin_um} um bins; RSS after imports {float(idle.stdout):.0f} MB")
    base_rate = rows["batch_size=1 (baseline)"]["bins_per_s"]
    for name, r in rows.items():
        print(f"{name:24s} bins {r['bins']:7d} tiles {r['tiles']:5d} bins/s {r['bins_per_s']:9.1f} "
              f"(x{r['bins_per_s'] / base_rate:.2f}) peak RSS {r['peak_rss_mb']:.0f} MB seconds {r['seconds']}")


if __name__ == "__main__":
    main()
