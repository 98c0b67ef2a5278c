"""bench/bench_gpu.py in its CPU smoke mode (tiny model, fp32, ZeRO-2 over gloo, one loader worker) on the
session's tiny shards: every figure is printed, and the FLOP-based ones agree with each other."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import train_env

REPO = Path(__file__).resolve().parents[1]


def test_smoke_mode_prints_every_figure(tiny_cohort, tiny_shards, tmp_path):
    proc = subprocess.run([sys.executable, "bench/bench_gpu.py", "--smoke", "--shards", str(tiny_shards), "--slides",
                           str(tiny_cohort), "--work", str(tmp_path), "--peak-tflops", "0.5", "--steps", "3"],
                          cwd=REPO, env=train_env(RAY_AUTH_MODE="disabled"), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    res = json.loads(lines[-1])
    assert res["device"] == "cpu" and res["precision"] == "fp32" and res["zero_stage"] == 2
    assert res["flops_per_bin"] > 1e6 and res["peak_tflops"] == 0.5
    (train,) = res["train"]
    assert train["workers"] == 1 and train["samples_per_s"] > 0 and train["bins_per_s"] > 0
    assert 0 <= train["data_wait_pct"] < 100
    achieved = res["flops_per_bin"] * train["bins_per_s"] / 1e12
    assert abs(train["tflops"] - achieved) <= 0.002 + 0.02 * achieved
    assert abs(train["mfu_pct"] - 100 * train["tflops"] / 0.5) < 0.5
    assert res["predict"]["bins"] > 0 and res["predict"]["bins_per_s"] > 0
    assert any(line.startswith("train workers=1 samples_per_s=") and "mfu_pct=" in line for line in lines)
    assert any(line.startswith("predict slide=") for line in lines)
    assert (tmp_path / "model" / "model.safetensors").is_file()
    assert [f["precision"] for f in res["features"]] == ["fp32", "bf16"]
    for f in res["features"]:  # a tile is 4 spot crops and its global tile
        assert f["encoder"] == "test_resnet" and f["tiles_per_s"] > 0
        assert abs(f["images_per_s"] - 5 * f["tiles_per_s"]) < 1
